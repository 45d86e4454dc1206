"""Training runs side by side, epoch by epoch: validation curves, a table at matched epochs and
the final test errors, for runs finished or still going.

    python -m benchmarks.compare_runs runs/a runs/b                    # table + figure
    python -m benchmarks.compare_runs runs/a runs/b --labels dim64 dim128 --at 10 25 50 100
    python -m benchmarks.compare_runs runs/* --x hours --out compare.png --no-save

Every argument is a workdir of ``experiments.qm9_u0`` or ``experiments.ethanol_potential``
(or anything else that writes the trainers' ``metrics.csv``). A run still training counts
too: its ``metrics.csv`` holds the epochs done, and its planned epochs come from its latest
checkpoint's config when ``results.json`` is not there yet. Validation MAEs at the same epoch
compare runs with the same planned epochs (the same cosine schedule at that epoch); the table
shows each run's plan so that a reader can tell.

When two or more of the runs have finished (their ``predictions.csv`` holds val and test
predictions per molecule) and share a split, the table adds the MAE of their ensemble (the
mean prediction) on val and test; runs of another split are left out of it, named.

Prints the table and writes ``benchmarks/results/compare-<device>-<date>.json`` (the table's
numbers) and ``.png`` (validation MAE per epoch, or per hour of training with ``--x hours``,
log scale) unless ``--no-save``; ``--out`` names the figure instead.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import save_result_and_figure

__all__ = ["Run", "METRICS", "compare", "ensemble_of", "main", "plot", "read_run", "table"]

#: the validation column of each trainer's metrics.csv and the matching test entry, in order
#: of preference (QM9 runs, then potentials)
METRICS = (("val_mae", "mae_mev", "meV"),
           ("val_force_mae_mev_ang", "force_mae_mev_ang", "meV/Å"))


@dataclass
class Run:
    """One run folder: its per-epoch rows and what it reported.

    Attributes:
        label: name in the table and the legend.
        path: the workdir.
        rows: ``metrics.csv`` rows, numbers as floats (``epoch`` as int).
        metric: the validation column compared (see :data:`METRICS`).
        unit: its unit.
        planned: the epochs the run planned (None if unknown).
        test: the test value of the same metric from ``results.json`` (None while training).
        params: parameter count from ``results.json`` (None while training).
    """

    label: str
    path: Path
    rows: list[dict]
    metric: str
    unit: str
    planned: int | None = None
    test: float | None = None
    params: int | None = None

    def at(self, epoch: int) -> float | None:
        """The validation value after ``epoch`` (None if the run has not got there)."""
        for r in self.rows:
            if r["epoch"] == epoch:
                return r[self.metric]
        return None

    @property
    def best(self) -> tuple[float, int]:
        """The lowest validation value so far and its epoch."""
        r = min(self.rows, key=lambda r: r[self.metric])
        return r[self.metric], r["epoch"]


def _read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        raise ValueError(f"{path.parent}: no metrics.csv (not the workdir of a training run, "
                         "or no epoch finished yet)")
    rows = []
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        for line, raw in enumerate(reader, start=2):
            try:
                row = {k: float(v) for k, v in raw.items()}
                row["epoch"] = int(row["epoch"])
            except (TypeError, ValueError, KeyError) as err:
                raise ValueError(f"{path}, line {line}: not a row of numbers with an 'epoch' "
                                 f"column ({type(err).__name__}: {err})") from err
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no epochs in it")
    return rows


def _planned_from_checkpoint(workdir: Path) -> int | None:
    """The ``epochs`` of the latest checkpoint's config (a run still training)."""
    folder = workdir / "checkpoints"
    if not folder.is_dir():
        return None
    from mpattn.train.checkpoint import latest_meta

    try:
        return int(latest_meta(folder)["config"]["epochs"])
    except (ValueError, KeyError, TypeError):
        return None


def read_run(path: str | Path, label: str | None = None) -> Run:
    """A :class:`Run` from a workdir (raises ValueError naming the file for a bad one)."""
    path = Path(path)
    rows = _read_metrics(path / "metrics.csv")
    found = [m for m in METRICS if m[0] in rows[0]]
    if not found:
        raise ValueError(f"{path / 'metrics.csv'}: none of the validation columns "
                         f"{[m[0] for m in METRICS]} (columns: {list(rows[0])})")
    metric, test_key, unit = found[0]
    run = Run(label or path.name, path, rows, metric, unit)
    results = path / "results.json"
    if results.is_file():
        try:
            r = json.loads(results.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{results}: not JSON ({err})") from err
        run.planned = (r.get("config") or {}).get("epochs")
        run.test = (r.get("test") or {}).get(test_key)
        run.params = r.get("params")
    else:
        run.planned = _planned_from_checkpoint(path)
    return run


def compare(runs: list[Run], at: list[int]) -> dict:
    """The table's numbers: per run its plan, epochs done, validation value at each of ``at``,
    best validation value (and epoch), hours of training and test value."""
    out = []
    for run in runs:
        best, best_epoch = run.best
        out.append({
            "label": run.label, "path": str(run.path), "metric": run.metric, "unit": run.unit,
            "params": run.params, "planned_epochs": run.planned, "epochs": run.rows[-1]["epoch"],
            "hours": sum(r.get("seconds", math.nan) for r in run.rows) / 3600,
            "val_at": {str(e): run.at(e) for e in at},
            "best_val": best, "best_epoch": best_epoch, "test": run.test,
        })
    return {"at_epochs": list(at), "runs": out, "ensemble": ensemble_of(runs)}


def ensemble_of(runs: list[Run]) -> dict | None:
    """MAEs of the mean prediction of the finished runs (those with ``predictions.csv``) that
    share the first one's split; None if fewer than two. ``left_out`` names the others."""
    from benchmarks.sweep import ensemble
    from mpattn.train.report import read_predictions

    preds = {run.label: read_predictions(run.path / "predictions.csv") for run in runs
             if (run.path / "predictions.csv").is_file()}
    if len(preds) < 2:
        return None
    (first, ref), *others = preds.items()
    members, left_out = {first: ref}, []
    for label, p in others:
        try:
            ensemble({first: ref, label: p})  # raises for another split
            members[label] = p
        except ValueError:
            left_out.append(label)
    if len(members) < 2:
        return {"members": list(members), "left_out": left_out}
    return {**ensemble(members), "left_out": left_out}


def table(summary: dict) -> str:
    """A plain-text table of :func:`compare`'s numbers."""
    at = summary["at_epochs"]

    def num(x, fmt="{:.1f}"):
        return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)

    head = (["run", "params", "epochs", "hours"] + [f"val@{e}" for e in at]
            + ["best val (epoch)", "test"])
    lines = [head]
    for r in summary["runs"]:
        lines.append([
            r["label"], num(r["params"], "{:,}"),
            f"{r['epochs']}/{num(r['planned_epochs'], '{}')}", num(r["hours"], "{:.2f}"),
            *[num(r["val_at"][str(e)]) for e in at],
            f"{r['best_val']:.1f} ({r['best_epoch']})", num(r["test"], "{:.2f}")])
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    units = sorted({r["unit"] for r in summary["runs"]})
    text = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in
                      enumerate(zip(row, widths, strict=True))) for row in lines]
    text.insert(1, "-" * len(text[0]))
    ens = summary.get("ensemble")
    if ens and "val" in ens:
        text.append(f"ensemble of {', '.join(ens['members'])} (mean prediction): val "
                    f"{ens['val']['mae_mev']:.2f}, test {ens['test']['mae_mev']:.2f}")
    if ens and ens["left_out"]:
        text.append(f"not in the ensemble (another split): {', '.join(ens['left_out'])}")
    return "\n".join(text + [f"(validation and test MAE in {', '.join(units)}; epochs: done / "
                             "planned; hours: training time summed over epochs)"])


def plot(runs: list[Run], path: str | Path, *, x: str = "epoch") -> Path:
    """Validation value of every run per epoch (or per hour of training), log scale."""
    from mpattn.train.report import _figure

    plt = _figure()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in runs:
        ys = [r[run.metric] for r in run.rows]
        if x == "hours":
            xs, t = [], 0.0
            for r in run.rows:
                t += r.get("seconds", math.nan) / 3600
                xs.append(t)
        else:
            xs = [r["epoch"] for r in run.rows]
        label = run.label + (f" (test {run.test:.1f})" if run.test is not None else "")
        ax.plot(xs, ys, "-", label=label)
    ax.set_xlabel("hours of training" if x == "hours" else "epoch")
    units = sorted({run.unit for run in runs})
    ax.set_ylabel(f"validation MAE ({', '.join(units)})")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.compare_runs",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="run folders (workdirs)")
    ap.add_argument("--labels", nargs="+", help="one name per run (default: folder names)")
    ap.add_argument("--at", nargs="+", type=int, default=[10, 25, 50, 100],
                    help="epochs at which the table shows the validation MAE")
    ap.add_argument("--x", choices=("epoch", "hours"), default="epoch",
                    help="the figure's x axis")
    ap.add_argument("--out", type=Path, help="the figure's file (default: beside the "
                    "JSON, benchmarks/results/compare-<device>-<date>.png)")
    ap.add_argument("--no-save", action="store_true",
                    help="print only (a figure only with --out)")
    args = ap.parse_args(argv)
    if args.labels and len(args.labels) != len(args.runs):
        ap.error(f"--labels: {len(args.labels)} labels for {len(args.runs)} runs")
    if any(e < 1 for e in args.at):
        ap.error("--at: epochs count from 1")
    return args


def main(argv=None) -> int:
    args = parse(argv)
    labels = args.labels or [None] * len(args.runs)
    try:
        runs = [read_run(p, label) for p, label in zip(args.runs, labels, strict=True)]
    except ValueError as err:
        print(f"compare_runs: {err}", file=sys.stderr)
        return 2
    summary = compare(runs, args.at)
    print(table(summary))
    save_result_and_figure("compare", summary, lambda path: plot(runs, path, x=args.x),
                           out=args.out, save=not args.no_save)
    return 0


if __name__ == "__main__":
    sys.exit(main())
