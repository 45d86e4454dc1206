"""SchNetPack 2's PaiNN on QM9 U0 at equal minutes, for ``python -m benchmarks.peers
--models painn --minutes M``: our side of it.

The molecules of our split (the ``cpu`` preset's 15,000 / 1,000 / 5,000, ``make_split``
seed 0: the split every ``--minutes`` row uses) go to the worker as arrays
(:func:`painn_inputs`: z, positions in Å, U0 in eV, QM9 ids, the parts as row indices, and
the per-element reference ``PropertyTask().prepare`` fits on the training part, eV per atom
of each Z), which builds SchNetPack's ASE database from them (no download) and trains in
SchNetPack's own venv (``benchmarks/peer_workers/painn_worker.py`` says how, and why so).
Its test predictions come back by QM9 id and are scored here (:func:`score_predictions`,
``mpattn.train.metrics.error_report``), beside our ``cpu`` preset's row of the same minutes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["painn_inputs", "painn_row", "score_predictions"]


def painn_inputs(ms, split, transform) -> dict:
    """Arrays for the worker: the molecules of ``split`` (train, val, test, in that order)."""
    from mpattn.elements import QM9_ELEMENTS

    order = np.concatenate([split.train, split.val, split.test]).astype(np.int64)
    sub = ms.subset(ms.index_of(order))
    if not np.array_equal(np.asarray(sub.ids, np.int64), order):
        raise RuntimeError("painn_inputs: the molecules did not come back in split order")
    n_train, n_val = len(split.train), len(split.val)
    refs = np.zeros(max(QM9_ELEMENTS) + 1)
    if transform.coef is not None:
        refs[list(transform.elements)] = transform.coef
    rows = np.arange(len(order))
    return {"z": sub.z.astype(np.int64), "positions": sub.positions.astype(np.float64),
            "n_atoms": sub.n_atoms.astype(np.int64), "energy": sub.targets["U0"].astype(
                np.float64), "ids": order, "train": rows[:n_train],
            "val": rows[n_train:n_train + n_val], "test": rows[n_train + n_val:],
            "atomrefs": refs}


def score_predictions(test_ids, true, n_atoms, pred_ids, pred) -> dict:
    """``error_report`` of predictions given by id against the test part (ids, eV, atoms);
    refuses a prediction set that misses or repeats a test molecule."""
    from mpattn.train.metrics import error_report

    test_ids, pred_ids = np.asarray(test_ids, np.int64), np.asarray(pred_ids, np.int64)
    if len(pred_ids) != len(test_ids) or len(np.unique(pred_ids)) != len(pred_ids) or \
            not np.array_equal(np.sort(pred_ids), np.sort(test_ids)):
        raise ValueError(f"{len(pred_ids)} predictions do not cover the {len(test_ids)} test "
                         "molecules once each")
    where = {int(i): k for k, i in enumerate(pred_ids)}
    aligned = np.asarray(pred, np.float64)[[where[int(i)] for i in test_ids]]
    return error_report(aligned, np.asarray(true, np.float64), n_atoms=np.asarray(n_atoms))


def painn_row(ms, split, prepared, *, minutes: float, workdir: Path, venvs: Path,
              log=print) -> dict:
    """Train PaiNN for ``minutes`` in its venv; the accuracy-table row (``test_mae_mev``...).
    ``prepared``: ``PropertyTask().prepare(ms, split, ...)`` (its reference and test part)."""
    from benchmarks.peer_venvs import ensure_venv, run_worker

    python = ensure_venv("schnetpack", venvs, log=log)
    workdir = Path(workdir).resolve()  # the worker runs in its own folder
    workdir.mkdir(parents=True, exist_ok=True)
    inputs = painn_inputs(ms, split, prepared.transform)
    np.savez(workdir / "qm9_u0.npz", **inputs)
    out = workdir / "painn"
    report = run_worker(python, "painn_worker.py", ["--data", workdir / "qm9_u0.npz",
                                                    "--minutes", minutes, "--out", out],
                        out, log=log)
    pred = np.load(out / "predictions.npz")
    test = prepared.test
    errors = score_predictions(test.ids, test.true, test.n_atoms, pred["test_id"],
                               pred["test_energy"])
    val = [f for _, f in report["curve"]]
    return {"model": "painn", "framework": "schnetpack", "epochs": report["epochs"],
            "planned_epochs": None, "mol_per_s": report["train_mol_per_s"] or float("nan"),
            "seconds": report["wall_seconds"],
            "val_mae_mev": min(val) if val else float("nan"),
            "test_mae_mev": errors["mae_mev"], "params": report["params"],
            "versions": report["versions"], "val_history": report["curve"],
            "settings": "SchNetPack's qm9_atomwise experiment with PaiNN (painn_worker.py)"}
