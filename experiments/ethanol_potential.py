"""An ethanol potential trained on energies and forces, then NVE MD with it.

    python -m experiments.ethanol_potential [--data PATH] [--model attention|schnet]
        [--train 950 --val 50] [--time-budget-min M] [--epochs N] [--batch-size B] [--lr LR]
        [--beta B] [--seed S] [--workdir runs/ethanol] [--md-ps 10] [--no-md]
        [--no-progress] [--model-config JSON]

rMD17 protocol: 950 training frames, 50 validation frames, the rest test (seeded split saved
as ``split.json``). ``--data`` takes a revised MD17 ``.npz`` or an extxyz file; the default
is the bundled GFN2-xTB ethanol set (2000 frames at 500 K). Without ``--epochs`` the number
of epochs is sized from a timing of the compiled train step so that training fills
``--time-budget-min`` (default 10 min: with the test evaluation and 10 ps of MD the whole
experiment takes about 15 minutes on 2 CPU cores); the cosine schedule then spans the run.

Outputs in the workdir: ``results.json`` (test/val metrics, epochs, timings, configs, split
sizes, MD summary), ``metrics.csv``, ``curves.png``, ``force_parity.png``, ``split.json``,
``checkpoints/`` (load with :func:`mpattn.load_run` or ``mpattn.ase.Calculator(workdir)``)
and, with MD, ``energy.png``. The preset is in ``experiments/configs/ethanol.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

from experiments.configs import ethanol as preset

__all__ = ["main", "run"]


def run(args: argparse.Namespace, *, log=print) -> dict:
    """The experiment for parsed command-line ``args``; returns (and writes) the results."""
    from experiments.planning import Replan, plan_epochs
    from mpattn.data.frames import ethanol_xtb_path, read_frames, split_frames
    from mpattn.models import default_config
    from mpattn.train import Trainer
    from mpattn.train.report import environment, plot_curves, plot_parity, write_json

    overrides = preset.MODELS.get(args.model, {}) | json.loads(args.model_config or "{}")
    task = dataclasses.replace(preset.TASK, beta=args.beta,
                               cutoff=float(overrides.pop("cutoff", preset.TASK.cutoff)))
    config = dataclasses.replace(preset.TRAIN, model=args.model, lr=args.lr,
                                 weight_decay=args.weight_decay,
                                 checkpoint_every_s=args.checkpoint_every_s,
                                 epochs=args.epochs or 1, batch_size=args.batch_size,
                                 seed=args.seed, time_budget_min=args.time_budget_min).check()
    task.check()
    model_config = task.model_config(default_config(args.model, cutoff=task.cutoff,
                                                    **overrides))
    workdir = Path(args.workdir)
    if workdir.exists() and not workdir.is_dir():
        raise ValueError(f"--workdir {workdir}: exists and is not a folder")
    workdir.mkdir(parents=True, exist_ok=True)
    data = Path(args.data) if args.data else ethanol_xtb_path()
    frames = read_frames(data)
    log(f"{data}: {len(frames)} frames" + (f", {len(frames.rejected)} rejected: " + "; ".join(
        f"frame {i}: {why}" for i, why in frames.rejected[:5]) if frames.rejected else ""))
    train, val, test = split_frames(len(frames), args.train, args.val, args.seed)
    (workdir / "split.json").write_text(json.dumps({
        "source": str(data), "seed": args.seed,
        **{k: frames.ids[v].tolist() for k, v in (("train", train), ("val", val),
                                                   ("test", test))}}) + "\n")
    prepared = task.prepare(frames, (train, val, test), config)
    trial = None  # the trainer that timed the plan: the run reuses its compiled steps
    if args.epochs is None:
        plan = plan_epochs(
            lambda c, folder: Trainer(c, task, prepared, folder, model_config=model_config,
                                      log=lambda _msg: None),
            config, args.time_budget_min, reuse_trial=True)
        log(f"{plan.epochs} epochs fit the {args.time_budget_min} min budget")
        config = dataclasses.replace(config, epochs=plan.epochs)
        trial = plan.trial
    trainer = Trainer(config, task, prepared, workdir, model_config=model_config, log=log,
                      compiled_from=trial, run_info={"planned": args.epochs is None})
    del trial
    log(f"{args.model}: {trainer.num_params} parameters, {len(train)}/{len(val)}/{len(test)} "
        f"frames, {config.epochs} epochs of {trainer.steps_per_epoch} steps")
    t0 = time.perf_counter()
    history = trainer.fit(progress=not args.no_progress,
                          after_epoch=Replan(log) if args.epochs is None else None)
    train_s = time.perf_counter() - t0
    trainer.restore("best")  # evaluate the checkpoint with the lowest val force MAE
    reports = {name: trainer.report(name) for name in ("val", "test")}
    metrics = {k: {m: v for m, v in r.items() if not m.startswith("_")}
               for k, r in reports.items()}
    t = metrics["test"]
    log(f"test: energy MAE {t['energy_mae_mev']:.2f} meV ({t['energy_mae_mev_per_atom']:.3f} "
        f"meV/atom), force MAE {t['force_mae_mev_ang']:.2f} meV/Å (RMSE "
        f"{t['force_rmse_mev_ang']:.2f})")
    plot_curves(history, workdir / "curves.png", unit="meV/Å", key=task.score_key)
    plot_parity(reports["test"]["_forces"].ravel() * 1000, prepared.test.forces.ravel() * 1000,
                workdir / "force_parity.png", unit="meV/Å", quantity="force component")
    md = _md(args, workdir, prepared.test.frames, log) if not args.no_md else {
        "skipped": "--no-md"}
    results = {
        "data": str(data), "model": args.model, "test": t, "val": metrics["val"],
        "epochs": len(history), "best_epoch": trainer.epoch, "train_seconds": train_s,
        "frames_per_s": float(np.median([r["frames_per_s"] for r in history])),
        "params": trainer.num_params, **environment(), "config": dataclasses.asdict(config),
        "task": task.to_dict(), "model_config": dataclasses.asdict(trainer.model_config),
        "reference": prepared.reference.to_dict(),
        "split_sizes": [len(train), len(val), len(test)],
        "rejected_frames": len(frames.rejected), "md": md,
    }
    write_json(workdir / "results.json", results)
    return results


def _md(args, workdir: Path, test_frames, log) -> dict:
    try:
        from mpattn.md import plot_energy, run_nve
    except ImportError as err:
        log(f"MD skipped: mpattn.md is not available ({err})")
        return {"skipped": f"mpattn.md unavailable: {err}"}
    atoms = test_frames.atoms(0)
    atoms.calc = None
    steps = int(round(args.md_ps * 1000 / 0.5))
    result = run_nve(workdir, atoms, timestep_fs=0.5, steps=steps,
                     temperature_K=args.md_temperature, seed=args.seed,
                     log_every=max(1, steps // 1000), progress=not args.no_progress)
    plot_energy(result, workdir / "energy.png")
    summary = {k: result[k] for k in ("drift_meV_per_atom_per_ps", "max_deviation_meV_per_atom",
                                      "intact", "recompiles", "budget_growths", "seconds",
                                      "steps_per_s") if k in result}
    summary |= {"ps": args.md_ps, "timestep_fs": 0.5, "temperature_K": args.md_temperature,
                "start_frame": int(test_frames.ids[0])}
    log(f"NVE {args.md_ps} ps: drift {summary.get('drift_meV_per_atom_per_ps')} meV/atom/ps, "
        f"intact {summary.get('intact')}")
    return summary


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.ethanol_potential",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="rMD17 .npz or extxyz (default: the bundled xTB ethanol set)")
    p.add_argument("--model", default="attention", choices=sorted(preset.MODELS))
    p.add_argument("--train", type=int, default=950)
    p.add_argument("--val", type=int, default=50)
    p.add_argument("--time-budget-min", type=float, default=10.0,
                   help="training time (the epochs are sized to fill it without --epochs)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=preset.TRAIN.lr)
    p.add_argument("--beta", type=float, default=preset.TASK.beta,
                   help="force weight of the loss (0-1; 1: forces only)")
    p.add_argument("--checkpoint-every-s", type=float, default=30.0,
                   help="checkpoint after the epochs that end this long after the previous "
                        "save (and after the first and last); 0: every epoch (default 30: a "
                        "save costs about as much as one epoch here)")
    p.add_argument("--weight-decay", type=float, default=0.0,
                   help="AdamW decoupled weight decay of the weight matrices (default 0: Adam)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default="runs/ethanol")
    p.add_argument("--md-ps", type=float, default=10.0)
    p.add_argument("--md-temperature", type=float, default=300.0,
                   help="temperature of the initial Maxwell-Boltzmann velocities (K)")
    p.add_argument("--no-md", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--model-config", help='JSON model overrides, e.g. \'{"dim": 32}\'')
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.data and not Path(args.data).is_file():
        p.error(f"--data {args.data}: no such file")
    if args.model_config:
        try:
            if not isinstance(json.loads(args.model_config), dict):
                raise ValueError("not a JSON object")
        except ValueError as err:
            p.error(f"--model-config {args.model_config!r}: {err}")
    try:
        run(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    from mpattn.runtime import restart_with_hugepages

    restart_with_hugepages()  # before any work: huge pages for XLA's CPU buffers
    sys.exit(main())
