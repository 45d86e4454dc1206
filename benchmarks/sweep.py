"""QM9 runs side by side on one device: which setting lowers the test MAE with 15,000
training molecules, and what the runs reach as an ensemble.

    python -m benchmarks.sweep --dataset-cache qm9.npz                 # the default variants
    python -m benchmarks.sweep --dataset-cache qm9.npz --variants vec64 vec128 --minutes 20
    python -m benchmarks.sweep --list                                  # what each variant is

Every variant is one ``python -m experiments.qm9_u0`` process on the ``cpu`` preset's split
(15,000 / 1,000 / 5,000 molecules, seed 0), the default model with vector channels, batch 64,
``--steps-per-call`` steps per jit call (8 on an accelerator) and as many epochs as fit
``--minutes`` (planned from a timed epoch, so that each cosine schedule ends with its budget).
They run at the same time (``--concurrency``): on one H100 a step of this small model at
batch 64 is bound by kernel launches and host dispatch, not by the GPU's arithmetic (README,
"Training on QM9"), so several runs share it at little cost each. Equal minutes, not equal
epochs: a wider model gets fewer (``--epochs N`` gives every run the same schedule instead).

On a CPU the runs do not share cores: each gets ``--cores-per-run`` cores of its own (default:
the cores split evenly, at least 1) and as many run at once as the cores hold; a 1-core run
uses one XLA thread. On the 2-core CPU two 1-core runs of the vector model at batch 16
trained 187 + 186 mol/s, one run on both cores 304 mol/s: comparing two settings side by
side does 1.23x the work of running them one after the other. There, pass the cpu preset's
``--batch-size 16`` and ``--epochs`` (equal schedules), e.g.
``python -m benchmarks.sweep --variants vec64 vec64-wd --batch-size 16 --epochs 60``.

Each run keeps its own folder, ``benchmarks/results/qm9_u0-<device>-<date>-sweep-<variant>/``
(results.json, metrics.csv, predictions.csv, plots, log.txt; checkpoints too, which
``gpu_session.sh`` leaves out of its archive). The sweep prints a table (variant, parameters,
epochs, molecules/s, val and test MAE) and the *ensemble* of the finished runs (the mean of
their predictions on the same molecules), and writes it to
``benchmarks/results/sweep-<device>-<date>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.common import (
    RESULTS,
    add_dataset_cache_argument,
    align_by_id,
    device_name,
    write_result,
)

ROOT = Path(__file__).resolve().parent.parent
# Every variant names its attention weights: the model's defaults have changed under these
# runs (the class default was softmax and the cpu preset set silu; since the one-engine
# refactor the class default is silu and the preset sets none), so a variant that left them
# to the defaults would not train the model its results were measured with. Every other field
# a variant leaves out has kept its default (dim 64, 4 heads of 16, 3 blocks, feed-forward 128,
# cutoff 5 Å, vector messages weighted by the attention, no electrostatics).
#: the vector model with the smooth softmax attention weights (the vec64 runs)
VECTOR = {"vector_features": True, "attention_weights": "softmax"}
#: PaiNN's summed vector messages with silu attention weights (the standard preset's model)
SILU = VECTOR | {"vector_messages": "sum", "attention_weights": "silu"}


@dataclass(frozen=True)
class Variant:
    """One run of the sweep: what it changes and the ``qm9_u0`` options that do it."""

    what: str
    model_config: dict
    options: tuple[str, ...] = ()


VARIANTS: dict[str, Variant] = {
    "vec64": Variant("vector channels, dim 64 (best so far: 32.1 meV on 2 CPU cores, 141 "
                     "epochs at batch 16)", VECTOR),
    "vec128": Variant("vector channels, dim 128 (8 heads of 16, feed-forward 256): capacity",
                      VECTOR | {"dim": 128, "num_heads": 8, "ff_dim": 256}),
    "vec64-wd": Variant("vec64 with AdamW weight decay 0.05: the runs to convergence "
                        "overfit", VECTOR, ("--weight-decay", "0.05")),
    "vec64-b32": Variant("vec64 at batch 32: twice the updates per epoch", VECTOR,
                         ("--batch-size", "32")),
    "vec64-4blocks": Variant("vector channels, 4 attention blocks instead of 3",
                             VECTOR | {"steps": 4}),
    "vec64-cut6": Variant("vector channels, cutoff 6 Å instead of 5",
                          VECTOR | {"cutoff": 6.0}),
    "vec64-ema4": Variant("vec64 evaluated with EMA decay 0.9999 instead of 0.999: weights "
                          "averaged over ~10 epochs at batch 16 rather than ~1",
                          VECTOR, ("--ema-decay", "0.9999")),
    "vec64-sum": Variant("vec64 with PaiNN's summed vector messages instead of attention-"
                         "weighted ones", VECTOR | {"vector_messages": "sum"}),
    "vec64-silu": Variant("vec64-sum with unnormalised silu attention weights: scalar "
                          "messages summed too (TorchMD-Net ET style)",
                          SILU),
    "vec128-silu": Variant("vec64-silu at dim 128 (8 heads of 16, feed-forward 256)",
                           SILU | {"dim": 128, "num_heads": 8, "ff_dim": 256}),
    "vec64-silu-dn": Variant("vec64-silu with the denoising regulariser (0.02 Å, weight 0.1)",
                             SILU, ("--denoise-sigma", "0.02")),
    "vec128-silu-dn": Variant("vec128-silu with the denoising regulariser (0.02 Å, weight 0.1)",
                              SILU | {"dim": 128, "num_heads": 8, "ff_dim": 256},
                              ("--denoise-sigma", "0.02")),
    "vec64-silu-dn-cut10": Variant(
        "vec64-silu-dn with a 10 Å cutoff (all of a QM9 molecule's pairs: the test "
        "zwitterions' charges sit 7-9 Å apart and carry 6-8 % of the error)",
        SILU | {"cutoff": 10.0},
        ("--denoise-sigma", "0.02")),
    "vec64-silu-dn-cut10-es": Variant(
        "vec64-silu-dn-cut10 with a Coulomb term between learned neutral atomic charges "
        "(electrostatics): the 1/r of the zwitterions' separated charges, explicitly",
        SILU | {"cutoff": 10.0, "electrostatics": True},
        ("--denoise-sigma", "0.02")),
    "vec64-silu-dn-cut10-es-dip": Variant(
        "vec64-silu-dn-cut10-es with its charges taught by QM9's dipole moments (dipole loss "
        "weight 1; learned from energies alone they stayed near 0)",
        SILU | {"cutoff": 10.0, "electrostatics": True},
        ("--denoise-sigma", "0.02", "--dipole-weight", "1.0")),
    "vec64-silu-dn-es30-dip": Variant(
        "vec64-silu-dn (attention within 5 Å) with the dipole-taught Coulomb term over every "
        "pair of the molecule (coulomb_cutoff 30 Å: the 10 Å envelope left 21-39 % of the "
        "zwitterions' N...O Coulomb at 7-8 Å)",
        SILU | {"electrostatics": True, "coulomb_cutoff": 30.0},
        ("--denoise-sigma", "0.02", "--dipole-weight", "1.0")),
    "vec64-silu-dn-es30-dip0.1": Variant(
        "vec64-silu-dn-es30-dip with the dipole loss at weight 0.1 (at 1.0 it slowed the "
        "energies' learning on the CPU: val 59 meV at epoch 27 against 44 without it)",
        SILU | {"electrostatics": True, "coulomb_cutoff": 30.0},
        ("--denoise-sigma", "0.02", "--dipole-weight", "0.1")),
}
# on one CPU core each, 150-epoch cosine at batch 16 on the cpu split: vec64 32.1 meV test,
# vec64-silu 29.5, vec64-silu-dn 25.7 (README, "Toward 25 meV on the CPU"); vec128 led vec64
# by 5 % at epoch 30; benchmarks.error_analysis of those runs for the 10 Å cutoff and the
# Coulomb term (a 10 Å run at epoch 37 still had 485 meV MAE on the test zwitterions, and
# with the Coulomb term 488: its charges, learned from energies alone, stayed near 0, |q| <= 0.02);
# with the Coulomb term over all pairs (coulomb_cutoff 30) and the dipole loss at weight 0.1 the
# same epochs gave 385 meV on them and 38.6 meV test, at 1.0 514 and 45.6 (README)
DEFAULT_VARIANTS = ("vec64-silu-dn", "vec64-silu-dn-es30-dip0.1", "vec64-silu-dn-es30-dip",
                    "vec128-silu-dn")


def command(name: str, args, workdir: Path) -> list[str]:
    """The ``experiments.qm9_u0`` command line of variant ``name`` (later options win)."""
    v = VARIANTS[name]
    cmd = [args.python, "-m", "experiments.qm9_u0", "--preset", "cpu",
           "--batch-size", str(args.batch_size), "--steps-per-call", str(args.steps_per_call),
           "--model-config", json.dumps(v.model_config), "--workdir", str(workdir),
           "--no-progress"]
    cmd += ["--epochs", str(args.epochs)] if args.epochs else []
    cmd += ["--time-budget-min", f"{args.minutes:g}"]
    if args.dataset_cache:
        cmd += ["--dataset-cache", str(args.dataset_cache)]
    for flag in ("train_size", "val_size", "test_size"):
        if getattr(args, flag) is not None:
            cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    return cmd + list(v.options) + list(args.extra)


#: XLA flags of a run pinned to one CPU core: one thread for its ops (measured on the 2-core
#: CPU, vector model at batch 16: two such runs at once trained 187 + 186 mol/s, one run on
#: both cores 304 mol/s, so two 1-core runs do 1.23x the work of one 2-core run)
ONE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


def run_env(cores: tuple[int, ...] | None = None) -> dict:
    """Environment of each run: JAX allocates GPU memory as it goes, so that concurrent
    processes share the device (by default the first would take 75% of it); a run pinned to
    one CPU core (``cores``) runs its XLA ops on one thread."""
    env = os.environ | {"XLA_PYTHON_CLIENT_PREALLOCATE": "false", "PYTHONUNBUFFERED": "1"}
    if cores is not None and len(cores) == 1:
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {ONE_THREAD}".strip()
    return env


def available_cores() -> list[int]:
    """The CPU cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def core_slots(args, device: str, cores: list[int]) -> list[tuple[int, ...]] | None:
    """Resolve ``args.concurrency`` (in place) and the cores of each concurrent run.

    On an accelerator (or an OS without CPU affinity) every run shares the device and no run
    is pinned: ``None`` (default concurrency: all runs at once). On a CPU, each of
    ``args.concurrency`` runs at once gets ``args.cores_per_run`` cores of its own (default:
    the cores shared evenly by the runs, at least 1; default concurrency: as many runs as the
    cores hold), so runs do not compete for cores. Raises ValueError if the runs at once
    need more cores than there are.
    """
    n = len(args.variants)
    if not device.startswith("cpu") or not hasattr(os, "sched_setaffinity"):
        args.concurrency = args.concurrency or n  # (no pinning where the OS has no affinity)
        return None
    per = args.cores_per_run or max(1, len(cores) // n)
    args.cores_per_run = per
    args.concurrency = args.concurrency or max(1, min(n, len(cores) // per))
    if per * args.concurrency > len(cores):
        raise ValueError(f"{args.concurrency} runs at once of {per} cores each need "
                         f"{per * args.concurrency} cores; this process has {len(cores)} "
                         f"({cores})")
    return [tuple(cores[i * per:(i + 1) * per]) for i in range(args.concurrency)]


def launch(names, args, workdirs: dict[str, Path], log=print,
           slots: list[tuple[int, ...]] | None = None) -> dict[str, int]:
    """Run the variants, at most ``args.concurrency`` at once; exit status per variant.

    Each run's output goes to ``<workdir>/log.txt``. With ``slots`` (see :func:`core_slots`)
    each running variant holds one slot's CPU cores (its affinity, and one XLA thread on a
    single core) until it ends. On Ctrl-C (or ``timeout --signal=INT``) the running
    processes get SIGINT, then SIGKILL 30 s later; the status of a run that did not finish
    is its signal's negative number.
    """
    pending, running, status = list(names), {}, {}
    free = list(slots) if slots is not None else [None] * args.concurrency
    try:
        while pending or running:
            while pending and free:
                name, cores = pending.pop(0), free.pop(0)
                workdirs[name].mkdir(parents=True, exist_ok=True)
                out = (workdirs[name] / "log.txt").open("w")
                cmd = command(name, args, workdirs[name])
                out.write("+ " + " ".join(cmd) + "\n")
                out.flush()
                proc = subprocess.Popen(cmd, cwd=ROOT, env=run_env(cores), stdout=out,
                                        stderr=subprocess.STDOUT)
                if cores is not None:  # before the interpreter has started a thread (no
                    os.sched_setaffinity(proc.pid, cores)  # preexec_fn: fork with JAX)
                running[name] = (proc, out, time.time(), cores)
                where = "" if cores is None else f" on core(s) {', '.join(map(str, cores))}"
                log(f"started {name}{where}: {VARIANTS[name].what}")
            for name, (proc, out, t0, cores) in list(running.items()):
                if proc.poll() is not None:
                    out.close()
                    status[name] = proc.returncode
                    free.append(cores)
                    del running[name]
                    log(f"{name} ended with status {proc.returncode} after "
                        f"{time.time() - t0:.0f} s")
            time.sleep(0.5)
    except KeyboardInterrupt:
        log(f"interrupted: stopping {', '.join(running) or 'nothing'}")
        for proc, *_ in running.values():
            proc.send_signal(signal.SIGINT)
        for name, (proc, out, *_) in running.items():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            out.close()
            status[name] = proc.returncode
    return status


def _errors_mev(pred: np.ndarray, true: np.ndarray) -> dict:
    d = 1000.0 * (pred - true)
    return {"mae_mev": float(np.mean(np.abs(d))), "rmse_mev": float(np.sqrt(np.mean(d * d)))}


def ensemble(predictions: dict[str, dict]) -> dict:
    """MAE/RMSE (meV) of the mean prediction of several runs, per part (``val``, ``test``).

    Args:
        predictions: run name -> :func:`mpattn.train.report.read_predictions` output (eV).
            Every run must hold the same molecules in each part (the same split): the rows
            are matched by QM9 id, and a run whose ids differ raises ``ValueError``.
    """
    names = list(predictions)
    if len(names) < 2:
        raise ValueError(f"an ensemble needs at least 2 runs, got {names}")
    out = {"members": names}
    for part in ("val", "test"):
        runs = {name: predictions[name][part] for name in names}
        _, orders = align_by_id(runs, f"{part} molecules")
        preds = [runs[name]["pred"][orders[name]] for name in names]
        out[part] = _errors_mev(np.mean(preds, axis=0), runs[names[0]]["true"][orders[names[0]]])
    return out


def summarise(names, workdirs: dict[str, Path], status: dict[str, int]) -> dict:
    """Rows of the finished runs (from their results.json) and their ensemble."""
    from mpattn.train.report import read_predictions

    rows, preds = [], {}
    for name in names:
        row = {"variant": name, "what": VARIANTS[name].what, "status": status.get(name),
               "workdir": str(workdirs[name])}
        res = workdirs[name] / "results.json"
        if res.exists():
            r = json.loads(res.read_text())
            planned = r["config"]["epochs"]
            row |= {"params": r["params"], "epochs": r["epochs"], "planned_epochs": planned,
                    "best_epoch": r["best_epoch"], "train_mol_per_s": r["train_mol_per_s"],
                    "train_seconds": r["train_seconds"], "batch_size": r["config"]["batch_size"],
                    "val_mae_mev": r["val"]["mae_mev"], "test_mae_mev": r["test"]["mae_mev"],
                    "test_rmse_mev": r["test"]["rmse_mev"]}
            if (workdirs[name] / "predictions.csv").exists():
                preds[name] = read_predictions(workdirs[name] / "predictions.csv")
        rows.append(row)
    return {"runs": rows, "ensemble": ensemble(preds) if len(preds) >= 2 else None}


def table(summary: dict) -> str:
    """A markdown table of the runs and the ensemble."""
    lines = ["| variant | parameters | epochs (planned) | train mol/s | val MAE | test MAE |",
             "|---|---|---|---|---|---|"]
    for r in summary["runs"]:
        if "test_mae_mev" not in r:
            lines.append(f"| {r['variant']} | did not finish (status {r['status']}) | | | | |")
            continue
        lines.append(f"| {r['variant']} | {r['params']:,} | {r['epochs']} ({r['planned_epochs']})"
                     f" | {r['train_mol_per_s']:,.0f} | {r['val_mae_mev']:.1f} meV | "
                     f"{r['test_mae_mev']:.1f} meV |")
    ens = summary["ensemble"]
    if ens:
        lines.append(f"| ensemble of {len(ens['members'])} (mean prediction) | | | | "
                     f"{ens['val']['mae_mev']:.1f} meV | {ens['test']['mae_mev']:.1f} meV |")
    return "\n".join(lines)


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS),
                    choices=list(VARIANTS), metavar="NAME",
                    help=f"which runs (default {' '.join(DEFAULT_VARIANTS)}); --list says "
                         f"what each is; choices: {', '.join(VARIANTS)}")
    ap.add_argument("--list", action="store_true", help="print the variants and exit")
    ap.add_argument("--minutes", type=float, default=6.5,
                    help="training budget of each run (epochs planned to fill it)")
    ap.add_argument("--epochs", type=int, help="a fixed number of epochs instead of planning")
    ap.add_argument("--concurrency", type=int,
                    help="runs at once (default: all on an accelerator; on a CPU as many as "
                         "its cores hold at --cores-per-run)")
    ap.add_argument("--cores-per-run", type=int,
                    help="CPU only: pin each run to this many cores of its own (default: the "
                         "cores shared evenly by the runs, at least 1; a 1-core run uses one "
                         "XLA thread)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps-per-call", type=int,
                    help="train steps per jit call (default 8 on an accelerator, 1 on a CPU)")
    ap.add_argument("--train-size", type=int, help="default: the cpu preset's 15,000")
    ap.add_argument("--val-size", type=int)
    ap.add_argument("--test-size", type=int)
    ap.add_argument("--tag", help="appended to the run folders' names")
    ap.add_argument("--results-dir", type=Path, default=RESULTS)
    ap.add_argument("--python", default=sys.executable, help="interpreter of the runs")
    ap.add_argument("--no-save", action="store_true", help="do not write the sweep's JSON")
    ap.add_argument("extra", nargs="*", help="after --: more qm9_u0 options for every run")
    add_dataset_cache_argument(ap)
    args = ap.parse_args(argv)
    if len(set(args.variants)) != len(args.variants):
        ap.error(f"--variants names a run twice: {args.variants}")
    if ((args.concurrency is not None and args.concurrency < 1)
            or (args.cores_per_run is not None and args.cores_per_run < 1)
            or not args.minutes > 0):
        ap.error("--concurrency and --cores-per-run must be >= 1 and --minutes > 0")
    return args


def main(argv=None) -> int:
    args = parse(argv)
    if args.list:
        for name, v in VARIANTS.items():
            print(f"{name:14s} {v.what}\n{'':14s} --model-config '{json.dumps(v.model_config)}'"
                  f" {' '.join(v.options)}")
        return 0
    device = device_name()
    if args.steps_per_call is None:
        args.steps_per_call = 1 if device.startswith("cpu") else 8
    day = time.strftime("%Y-%m-%d", time.gmtime())
    suffix = f"-{args.tag}" if args.tag else ""
    workdirs = {n: args.results_dir / f"qm9_u0-{device}-{day}-sweep-{n}{suffix}"
                for n in args.variants}
    taken = [str(w) for w in workdirs.values() if (w / "results.json").exists()]
    if taken:
        print(f"error: these run folders hold results already (pass --tag): {taken}",
              file=sys.stderr)
        return 2
    try:
        slots = core_slots(args, device, available_cores())
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    length = f"{args.epochs} epochs" if args.epochs else f"{args.minutes:g} min"
    pinned = "" if slots is None else f" ({args.cores_per_run} core(s) each)"
    print(f"sweep on {device}: {len(args.variants)} runs, {args.concurrency} at once{pinned}, "
          f"{length} each, batch {args.batch_size}, {args.steps_per_call} steps per call")
    t0 = time.time()
    status = launch(args.variants, args, workdirs, slots=slots)
    summary = summarise(args.variants, workdirs, status)
    print(table(summary))
    if not args.no_save:
        cfg = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
               if k not in ("list", "no_save")}
        path = write_result("sweep", {"config": cfg, "wall_seconds": time.time() - t0,
                                      "variants": {n: VARIANTS[n].__dict__ for n in
                                                   args.variants}, **summary},
                            args.results_dir)
        print(f"wrote {path}")
    return 0 if all(s == 0 for s in status.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
