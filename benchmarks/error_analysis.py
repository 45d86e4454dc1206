"""Where a QM9 model's error is: the molecules it gets most wrong, with their SMILES, and the
error of charge-separated molecules (zwitterions) against the rest, for one or more runs.

    python -m benchmarks.error_analysis runs/a                       # test part
    python -m benchmarks.error_analysis runs/a runs/b --top 20 --dataset-cache qm9.npz

Every argument is a workdir of ``experiments.qm9_u0``: a finished run's ``predictions.csv``,
or for a run still training (no ``predictions.csv`` yet) its best checkpoint's predictions
of the split's part (``mpattn.load_predictor``; a line names the epoch). Several runs must
share a split (the same molecules in the part). A molecule's class comes
from its template SMILES in QM9 (``MoleculeSet.smiles``): ``zwitterion`` when it has both a
positive and a negative formal charge (``[NH3+]...C([O-])=O``), ``ion`` when the charges do not
cancel, ``neutral`` otherwise. The table gives each class's count, MAE and share of the total
absolute error per run; the list the worst molecules by their mean absolute error over the
runs. With several runs it also gives the error of their mean prediction and whether their
spread (what ``mpattn.load_ensemble`` reports as an uncertainty) flags the worst molecules.
Writes ``benchmarks/results/errors-<device>-<date>.json`` and ``.png`` (each
molecule's error against its atom count, and the distribution of errors per class) unless
``--no-save``; ``--out`` names the figure.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np

from benchmarks.common import (
    add_dataset_cache_argument,
    align_by_id,
    qm9_molecules,
    save_result_and_figure,
)

__all__ = ["CLASSES", "analyse", "charge_class", "main", "plot", "table"]

CLASSES = ("neutral", "zwitterion", "ion")
_BRACKET = re.compile(r"\[([^\]]*)\]")
_CHARGE = re.compile(r"(\++|-+)(\d*)$")  # "+", "++", "-", "+2" at the end of a bracket atom


def charge_class(smiles: str) -> str:
    """``"zwitterion"``, ``"ion"`` or ``"neutral"`` from the formal charges of a SMILES's
    bracket atoms (``[NH3+]``, ``[O-]``, ``[N+2]``, ``[C--]``); a ``-`` outside brackets is a
    bond."""
    pos = neg = 0
    for atom in _BRACKET.findall(smiles):
        m = _CHARGE.search(atom.split(":")[0])  # an atom-map number follows the charge
        if m is None:
            continue
        signs, digits = m.groups()
        size = int(digits) if digits else len(signs)
        if signs[0] == "+":
            pos += size
        else:
            neg += size
    if pos != neg:
        return "ion"
    return "zwitterion" if pos else "neutral"


def _predict_part(run: Path, part: str, molecules) -> tuple[dict[str, np.ndarray], int]:
    """A run still training: its best checkpoint's predictions of the split's ``part``
    (``mpattn.load_predictor``), and that checkpoint's epoch."""
    from mpattn.predict import load_predictor

    split = run / "split.json"
    if not split.is_file():
        raise ValueError(f"{run}: neither predictions.csv nor split.json (is it a run of "
                         "experiments.qm9_u0?)")
    ids = np.asarray(json.loads(split.read_text()).get(part, []), np.int64)
    if not ids.size:
        raise ValueError(f"{split}: no '{part}' molecules")
    predictor = load_predictor(run)
    if predictor.unit != "eV":
        raise ValueError(f"{run}: its target is not an energy (errors here are in meV)")
    index = molecules.index_of(ids)
    pred = predictor(molecules.to_atoms(index), batch_size=128, progress=True)
    return ({"id": ids, "n_atoms": molecules.n_atoms[index].astype(np.int64),
             "true": molecules.targets[predictor.target][index], "pred": pred}, predictor.epoch)


def _read(run: Path, part: str, molecules=None) -> tuple[dict[str, np.ndarray], str]:
    """``run``'s predictions of ``part`` and where they come from: its predictions.csv, or for
    a run still training (no predictions.csv yet) its best checkpoint's, when ``molecules``
    (QM9) are given."""
    from mpattn.train.report import read_predictions

    path = run / "predictions.csv"
    if not path.is_file():
        if molecules is not None and (run / "checkpoints").is_dir():
            preds, epoch = _predict_part(run, part, molecules)
            source = f"still training, its best checkpoint (epoch {epoch})"
            print(f"{run}: {source}", flush=True)
            return preds, source
        raise ValueError(f"{run}: no predictions.csv (is the run finished?)")
    results = run / "results.json"
    if results.is_file() and "mae_mev" not in json.loads(results.read_text()).get("test", {}):
        raise ValueError(f"{run}: its target is not an energy (errors here are in meV)")
    parts = read_predictions(path)
    if part not in parts:
        raise ValueError(f"{path}: no '{part}' rows (parts: {sorted(parts)})")
    return parts[part], "predictions.csv"


def analyse(runs: dict[str, dict[str, np.ndarray]], smiles_of, *, top: int = 15) -> dict:
    """Classes and worst molecules of ``runs`` (label -> predictions of one part, in eV).

    Args:
        runs: label -> ``{"id", "n_atoms", "true", "pred"}`` of the same molecules.
        smiles_of: QM9 id -> template SMILES.
        top: how many of the worst molecules to list.

    Returns:
        ``{"n", "classes": {class: {"n", "mae_mev": {label: ..}, "share": {label: ..}}},
        "mae_mev": {label: ..}, "worst": [{"id", "n_atoms", "smiles", "class",
        "error_mev": {label: ..}}]}``; errors are prediction minus truth.
    """
    labels = list(runs)
    first = runs[labels[0]]
    ids, orders = align_by_id(runs)
    order = orders[labels[0]]
    errors = {label: (p["pred"][orders[label]] - p["true"][orders[label]]) * 1000.0
              for label, p in runs.items()}
    smiles = [smiles_of(int(i)) for i in ids]
    classes = np.array([charge_class(s) for s in smiles])
    out = {"n": len(ids), "classes": {},
           "mae_mev": {k: float(np.abs(e).mean()) for k, e in errors.items()}}
    for c in CLASSES:
        mask = classes == c
        if not mask.any():
            continue
        out["classes"][c] = {
            "n": int(mask.sum()),
            "mae_mev": {k: float(np.abs(e[mask]).mean()) for k, e in errors.items()},
            "share": {k: float(np.abs(e[mask]).sum() / np.abs(e).sum())
                      for k, e in errors.items()}}
    mean_abs = np.mean([np.abs(e) for e in errors.values()], axis=0)
    n_atoms = first["n_atoms"][order]
    out["worst"] = [{"id": int(ids[i]), "n_atoms": int(n_atoms[i]), "smiles": smiles[i],
                     "class": str(classes[i]),
                     "error_mev": {k: float(e[i]) for k, e in errors.items()}}
                    for i in np.argsort(-mean_abs, kind="stable")[:top]]
    if len(errors) > 1:
        out["ensemble"] = _ensemble(np.stack(list(errors.values())), classes)
    # per molecule, for the figure (not saved)
    out["_molecules"] = {"n_atoms": n_atoms, "class": classes, "mean_abs_mev": mean_abs}
    return out


def _ensemble(errors: np.ndarray, classes: np.ndarray, *, widest: float = 0.05) -> dict:
    """The mean prediction of the runs and whether their spread flags its errors.

    ``errors`` [runs, molecules] (prediction minus truth, meV): the mean prediction's error is
    their mean, the runs' spread (standard deviation of the predictions) their std. Returns
    its MAE, per class its MAE and mean spread, the Spearman correlation of the spread with
    the absolute error, and the MAE of the ``widest`` fraction of molecules by spread against
    the rest (with their share of the total absolute error).
    """
    from scipy.stats import spearmanr

    err, spread = np.abs(errors.mean(axis=0)), errors.std(axis=0)
    k = max(1, int(round(widest * err.size)))
    top = np.zeros(err.size, bool)
    top[np.argsort(-spread, kind="stable")[:k]] = True
    ranks = spearmanr(spread, err).statistic if err.size > 2 else float("nan")
    return {
        "runs": int(errors.shape[0]), "mae_mev": float(err.mean()),
        "spread_mev": float(spread.mean()), "spearman_spread_error": float(ranks),
        "classes": {c: {"mae_mev": float(err[classes == c].mean()),
                        "spread_mev": float(spread[classes == c].mean())}
                    for c in CLASSES if (classes == c).any()},
        "widest": {"fraction": widest, "n": k, "mae_mev": float(err[top].mean()),
                   "rest_mae_mev": float(err[~top].mean()) if (~top).any() else float("nan"),
                   "share": float(err[top].sum() / err.sum()) if err.sum() else 0.0,
                   "zwitterions": int((classes[top] == "zwitterion").sum())}}


def plot(result: dict, path: str | Path) -> Path:
    """Two panels: each molecule's absolute error (mean over the runs) against its atom count,
    by class, and the cumulative distribution of those errors per class (log scales)."""
    from mpattn.train.report import _figure

    plt = _figure()
    mol = result["_molecules"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    colours = {"neutral": "tab:blue", "zwitterion": "tab:red", "ion": "tab:orange"}
    jitter = np.random.default_rng(0).uniform(-0.25, 0.25, len(mol["n_atoms"]))
    for c in CLASSES:
        mask = mol["class"] == c
        if not mask.any():
            continue
        err = np.maximum(mol["mean_abs_mev"][mask], 1e-2)
        label = f"{c} ({mask.sum():,}, MAE {mol['mean_abs_mev'][mask].mean():.1f} meV)"
        left.scatter(mol["n_atoms"][mask] + jitter[mask], err, s=4 if c == "neutral" else 14,
                     alpha=0.35 if c == "neutral" else 0.9, color=colours[c], label=label)
        right.plot(np.sort(err), np.arange(1, mask.sum() + 1) / mask.sum(), color=colours[c],
                   label=label)
    left.set(xlabel="atoms", ylabel="|error| (meV, mean over runs)", yscale="log")
    right.set(xlabel="|error| (meV, mean over runs)", ylabel="fraction of molecules",
              xscale="log")
    for ax, where in ((left, "lower left"), (right, "upper left")):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc=where)
    fig.suptitle(f"{result['n']:,} molecules, {len(result['mae_mev'])} run(s): "
                 + ", ".join(f"{k} {v:.1f}" for k, v in result["mae_mev"].items()) + " meV MAE",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def table(result: dict) -> str:
    labels = list(result["mae_mev"])
    lines = [f"{result['n']:,} molecules; MAE in meV (share of the total absolute error)",
             f"{'class':<11}{'n':>6}  " + "  ".join(f"{k:>22}" for k in labels)]
    lines.append(f"{'all':<11}{result['n']:>6}  "
                 + "  ".join(f"{result['mae_mev'][k]:>22.1f}" for k in labels))
    for c, row in result["classes"].items():
        lines.append(f"{c:<11}{row['n']:>6}  " + "  ".join(
            f"{row['mae_mev'][k]:>14.1f} ({row['share'][k]:5.1%})" for k in labels))
    if "ensemble" in result:
        e, w = result["ensemble"], result["ensemble"]["widest"]
        lines += ["", f"the mean prediction of the {e['runs']} runs: MAE {e['mae_mev']:.1f} meV; "
                  f"their spread {e['spread_mev']:.1f} meV on average ("
                  + ", ".join(f"{c} {row['mae_mev']:.1f} MAE, {row['spread_mev']:.1f} spread"
                              for c, row in e["classes"].items()) + ")",
                  f"  spread against |error|: Spearman {e['spearman_spread_error']:.2f}; the "
                  f"{w['fraction']:.0%} widest-spread molecules ({w['n']:,}, "
                  f"{w['zwitterions']} zwitterions): MAE {w['mae_mev']:.1f} meV against "
                  f"{w['rest_mae_mev']:.1f} for the rest, {w['share']:.1%} of the error"]
    lines += ["", "worst molecules (error = prediction - truth, meV):"]
    for w in result["worst"]:
        errs = " ".join(f"{w['error_mev'][k]:+8.0f}" for k in labels)
        lines.append(f"  id {w['id']:>6}  {w['n_atoms']:>2} atoms  {errs}  {w['class']:<10} "
                     f"{w['smiles']}")
    return "\n".join(lines)


def parse(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.error_analysis",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path,
                    help="experiments.qm9_u0 workdirs (finished, or training: best checkpoint)")
    ap.add_argument("--labels", nargs="+", help="one name per run (default: folder names)")
    ap.add_argument("--part", default="test", choices=("test", "val"))
    ap.add_argument("--top", type=int, default=15, help="worst molecules to list")
    ap.add_argument("--out", type=Path, help="the figure's file (default: beside the JSON)")
    ap.add_argument("--no-save", action="store_true", help="print only (a figure only with --out)")
    add_dataset_cache_argument(ap)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    labels = args.labels or [p.name for p in args.runs]
    if len(labels) != len(args.runs) or len(set(labels)) != len(labels):
        print("error_analysis: give one distinct label per run", file=sys.stderr)
        return 2
    try:
        ms = qm9_molecules(args.dataset_cache)
        read = {label: _read(p, args.part, ms)
                for label, p in zip(labels, args.runs, strict=True)}
        runs = {label: preds for label, (preds, _) in read.items()}
        index = {int(i): k for k, i in enumerate(ms.ids)}

        def smiles_of(mol_id: int) -> str:
            if mol_id not in index:
                raise ValueError(f"QM9 id {mol_id} of the predictions is not in the dataset "
                                 "(another dataset or cache?)")
            return ms.smiles[index[mol_id]] if ms.smiles else ""

        result = analyse(runs, smiles_of, top=args.top)
    except ValueError as err:
        print(f"error_analysis: {err}", file=sys.stderr)
        return 2
    print(table(result))
    saved = {"runs": {k: str(p) for k, p in zip(labels, args.runs, strict=True)},
             "sources": {label: source for label, (_, source) in read.items()},
             "part": args.part, **{k: v for k, v in result.items() if not k.startswith("_")}}
    save_result_and_figure("errors", saved, lambda path: plot(result, path), out=args.out,
                           save=not args.no_save)
    return 0


if __name__ == "__main__":
    sys.exit(main())
