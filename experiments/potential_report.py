"""The evaluation of ``python -m experiments.potential``: the metrics a chemist reads.

For each part (``val``, ``test``: seen molecules, ``test_unseen``: molecules held out of
training) the task's report (:meth:`~mpattn.train.forces.EnergyForceTask.report`): energy
MAE/RMSE in meV and meV/atom, force MAE/RMSE in meV/Å, per element and per molecule (the
worst ten named). Then seed 004's post-hoc energy fit (per-element energies fitted on the
training frames to the model's energy errors; :func:`~mpattn.train.forces.posthoc_energy_fit`)
with the energy errors before and after it on every part; a force-only run (β = 1) keeps
it as the potential's (``energy_fit.json``). Parity plots of forces and energies.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

__all__ = ["evaluate", "summary_table"]


def _energy_errors(energy, part) -> dict:
    de = (np.asarray(energy) - part.energy) * 1000.0
    return {"energy_mae_mev": float(np.mean(np.abs(de))),
            "energy_mae_mev_per_atom": float(np.mean(np.abs(de / part.n_atoms)))}


def evaluate(trainer, data, unseen, task, workdir: Path, log=print) -> dict:
    """Reports of every part, the post-hoc energy fit, the plots; the ``results.json``
    entries (``val``, ``test``, ``test_unseen``, ``energy_fit``)."""
    from mpattn.elements import element_counts
    from mpattn.train.forces import ENERGY_FIT_FILE, posthoc_energy_fit
    from mpattn.train.report import plot_parity

    parts = {"val": data.val, "test": data.test}
    if unseen is not None:
        parts["test_unseen"] = unseen
    reports = {name: trainer.report(part) for name, part in parts.items()}
    train_energy = trainer.report("train")["_energy"]
    elements = data.reference.elements
    delta = posthoc_energy_fit(data.train, train_energy, elements)
    fit = {"elements": list(elements), "delta": delta.tolist(),
           "fitted_on": f"{len(data.train.graphs)} training frames",
           "applied": task.beta == 1.0}
    for name, part in {"train": data.train, **parts}.items():
        energy = train_energy if name == "train" else reports[name]["_energy"]
        shift = element_counts(part.frames.z, part.n_atoms, elements) @ delta
        fit[name] = {"before": _energy_errors(energy, part),
                     "after": _energy_errors(energy + shift, part)}
    if fit["applied"]:  # forces alone leave the energy offsets free: the fit sets them
        (workdir / ENERGY_FIT_FILE).write_text(json.dumps(fit, indent=1) + "\n")
        for name, part in parts.items():
            shift = element_counts(part.frames.z, part.n_atoms, elements) @ delta
            reports[name]["_energy"] = reports[name]["_energy"] + shift
            reports[name] |= _energy_errors(reports[name]["_energy"], part)
        log("post-hoc energy fit (forces-only run): test energy MAE "
            f"{fit['test']['before']['energy_mae_mev_per_atom']:.2f} -> "
            f"{fit['test']['after']['energy_mae_mev_per_atom']:.2f} meV/atom")
    test = reports["test"]
    plot_parity(test["_forces"].ravel() * 1000, data.test.forces.ravel() * 1000,
                workdir / "force_parity.png", unit="meV/Å", quantity="force component")
    plot_parity(test["_energy"], data.test.energy, workdir / "energy_parity.png", unit="eV",
                offset=data.test.baseline, quantity="energy - Σ n_e E_e")
    if unseen is not None:
        u = reports["test_unseen"]
        plot_parity(u["_forces"].ravel() * 1000, unseen.forces.ravel() * 1000,
                    workdir / "force_parity_unseen.png", unit="meV/Å",
                    quantity="force component", label="unseen molecules")
    out = {name: {k: v for k, v in r.items() if not k.startswith("_")}
           for name, r in reports.items()}
    for line in summary_table(out):
        log(line)
    return out | {"energy_fit": fit}


def summary_table(reports: dict) -> list[str]:
    """One line per part: energy MAE (meV, meV/atom), force MAE and RMSE (meV/Å)."""
    lines = [f"{'part':<12} {'frames':>6} {'E MAE meV':>10} {'meV/atom':>9} {'F MAE':>8} "
             f"{'F RMSE':>8}  worst molecules (force MAE)"]
    for name, r in reports.items():
        worst = ", ".join(f"{m} {r['per_molecule'][m]['force_mae_mev_ang']:.0f}"
                          for m in r.get("worst_molecules", [])[:3])
        lines.append(f"{name:<12} {r['n_structures']:>6} {r['energy_mae_mev']:>10.2f} "
                     f"{r['energy_mae_mev_per_atom']:>9.3f} {r['force_mae_mev_ang']:>8.2f} "
                     f"{r['force_rmse_mev_ang']:>8.2f}  {worst}")
    return lines
