"""Train an interatomic potential on any data: energies, forces (and stress) of many molecules
or periodic cells, then a short NVE run with it.

    python -m experiments.potential                         # the bundled xTB ethanol set
    python -m experiments.potential --data spice_like_xtb   # the bundled SPICE-like xTB set
    python -m experiments.potential --data my.extxyz --energy-key REF_energy \\
        --forces-key REF_forces --energy-unit kcal/mol --time-budget-min 30
    python -m experiments.potential --config runs/ethanol_xtb/config.toml   # repeat a run

``--data`` takes a bundled set's name or any file ``ase.io`` reads (extxyz, ASE db,
trajectory; compressed too) or a revised MD17 ``.npz``. Frames may mix molecule sizes and
elements (padding budgets come from the data). Splits: ``--unseen-molecules`` holds whole
molecules out (errors on unseen chemistry, ``test_unseen``), the other molecules' frames are
split by a seeded draw (``--train-size``/``--val-size``/``--test-size``: counts, or shares
below 1) unless ``--val``/``--test`` files are given. Bundled sets have their protocol
(``experiments/configs/potential.py``): ethanol 950 / 50 / 1000 (rMD17); the SPICE-like set
a fifth of the molecules unseen, then 80 % / 5 % / 15 %.

Without ``--epochs`` the epochs are sized from a timing of the compiled train step so that
training fills ``--time-budget-min``. ``--beta 1`` trains on forces alone and then fits
per-element energies to the training energies (seed 004's post-hoc fit): the results show
the energy errors before and after it, and the run's potential carries the fit
(``energy_fit.json``). ``--stress-weight`` trains on the stress of periodic frames.

Outputs in the workdir (default ``runs/<data name>``): ``results.json`` (metrics per part:
energy MAE/RMSE in meV and meV/atom, force MAE/RMSE in meV/Å, per element, per molecule with
the worst ten named; the energy fit; frames read, used and refused; timings, configs, MD),
``config.toml`` (the resolved options: ``--config`` repeats the run), ``metrics.csv``,
``curves.png``, ``force_parity.png``, ``energy_parity.png``, ``split.json``, ``checkpoints/``
(``mpattn.load_run(workdir)`` or ``mpattn.ase.Calculator(workdir)``) and, with MD,
``energy.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

from experiments import potential_data
from experiments.config_file import CONFIG_NAME, parse_with_config, write_config
from experiments.configs import potential as preset

__all__ = ["main", "parser", "run", "settings"]

TRAIN_OPTIONS = ("epochs", "time_budget_min", "batch_size", "eval_batch_size", "lr", "loss",
                 "schedule",
                 "weight_decay", "ema_decay", "clip_norm", "checkpoint_every_s",
                 "keep_checkpoints", "num_devices", "steps_per_call", "seed")
SIZE_OPTIONS = ("train_size", "val_size", "test_size", "unseen_molecules")


def settings(args):
    """``(TrainConfig, EnergyForceTask, model config, model overrides, sizes)`` from the
    options on top of the preset; raises ValueError naming an option that cannot work."""
    from mpattn.models import default_config

    overrides = dict(preset.MODELS.get(args.model, {}))
    user = json.loads(args.model_config or "{}")
    if not isinstance(user, dict):
        raise ValueError(f"--model-config {args.model_config!r}: not a JSON object")
    overrides |= user
    cutoff = args.cutoff if args.cutoff is not None else float(
        overrides.pop("cutoff", preset.TASK.cutoff))
    overrides.pop("cutoff", None)
    task = dataclasses.replace(preset.TASK, cutoff=cutoff, **{
        k: getattr(args, k) for k in ("beta", "stress_weight") if getattr(args, k) is not None})
    config = dataclasses.replace(preset.TRAIN, model=args.model, **{
        k: getattr(args, k) for k in TRAIN_OPTIONS if getattr(args, k) is not None})
    if args.epochs is None:
        config = dataclasses.replace(config, epochs=1)  # planned from the budget
    if args.train_only_readout:
        config = dataclasses.replace(config, trainable="readout")
    if args.x64:
        import jax

        jax.config.update("jax_enable_x64", True)
        config = dataclasses.replace(config, x64=True)
    config.check()
    task.check()
    model_config = task.model_config(default_config(args.model, cutoff=task.cutoff,
                                                    **overrides))
    return config, task, model_config, overrides, config.time_budget_min


def _sizes(args, protocol: dict) -> dict:
    """The split sizes: the options, else the data's protocol; a ``--val`` file replaces the
    validation share, a ``--test`` file the test part (training then takes the rest)."""
    sizes = {k: getattr(args, k) for k in SIZE_OPTIONS}
    fill = {"unseen_molecules": True, "val_size": args.val is None,
            "train_size": args.test is None, "test_size": args.test is None}
    for k in SIZE_OPTIONS:
        if sizes[k] is None and fill[k]:
            sizes[k] = protocol.get(k)
    return sizes


def run(args: argparse.Namespace, *, log=print) -> dict:
    """The experiment for parsed options ``args``; returns (and writes) the results."""
    from experiments.planning import Replan, plan_epochs
    from mpattn.train import Trainer
    from mpattn.train.report import environment, plot_curves, write_json

    config, task, model_config, overrides, _ = settings(args)
    path, protocol, name = potential_data.resolve_data(args.data)
    workdir = Path(args.workdir or f"runs/{name}")
    if workdir.exists() and not workdir.is_dir():
        raise ValueError(f"--workdir {workdir}: exists and is not a folder")
    frames, counts = potential_data.read_checked(path, args, "data", log)
    sizes = _sizes(args, protocol)
    parts = potential_data.split(frames, sizes, config.seed, val_file=args.val is not None,
                                 test_file=args.test is not None)
    extra = {}
    for role in ("val", "test"):
        if getattr(args, role) is not None:
            extra[role], counts[role] = potential_data.read_checked(
                Path(getattr(args, role)), args, role, log)
    workdir.mkdir(parents=True, exist_ok=True)
    write_config(workdir / CONFIG_NAME, _resolved(args, config, task, overrides, sizes)
                 | {"data": args.data or name, "workdir": str(workdir)},
                 header=f"python -m experiments.potential --config {workdir / CONFIG_NAME}")
    (workdir / "split.json").write_text(json.dumps({
        "source": str(path), "seed": config.seed,
        **{k: frames.ids[v].tolist() for k, v in parts.items()},
        **{f"{k}_file": str(getattr(args, k)) for k in extra}}) + "\n")
    prepared = task.prepare(frames, (parts["train"], parts["val"], parts["test"]), config)
    for role, fs in extra.items():
        setattr(prepared, role, prepared.part(fs, role))
    unseen = (prepared.part(frames.subset(parts["test_unseen"]), "test_unseen")
              if len(parts["test_unseen"]) else None)
    init = None
    if args.init_from:
        from experiments.finetune import initial_params

        init = initial_params(args.init_from, model_config, prepared, log)
    trial = None  # the trainer that timed the plan: the run reuses its compiled steps
    if args.epochs is None:
        plan = plan_epochs(
            lambda c, folder: Trainer(c, task, prepared, folder, model_config=model_config,
                                      log=lambda _msg: None, init_params=init),
            config, config.time_budget_min, reuse_trial=True)
        log(f"{plan.epochs} epochs fit the {config.time_budget_min} min budget")
        config = dataclasses.replace(config, epochs=plan.epochs)
        trial = plan.trial
    trainer = Trainer(config, task, prepared, workdir, model_config=model_config, log=log,
                      compiled_from=trial, init_params=init,
                      run_info={"planned": args.epochs is None, "data": str(path),
                                "init_from": args.init_from})
    del trial
    sizes_used = {k: len(getattr(prepared, k).graphs) for k in ("train", "val", "test")}
    sizes_used["test_unseen"] = 0 if unseen is None else len(unseen.graphs)
    log(f"{config.model}: {trainer.num_params} parameters; frames " + ", ".join(
        f"{k} {v}" for k, v in sizes_used.items()) + f"; {config.epochs} epochs of "
        f"{trainer.steps_per_epoch} steps")
    t0 = time.perf_counter()
    history = trainer.fit(progress=not args.no_progress,
                          after_epoch=Replan(log) if args.epochs is None else None)
    train_s = time.perf_counter() - t0
    trainer.restore("best")  # evaluate the checkpoint with the lowest val force MAE
    from experiments.potential_report import evaluate

    evaluation = evaluate(trainer, prepared, unseen, task, workdir, log)
    plot_curves(history, workdir / "curves.png", unit="meV/Å", key=task.score_key)
    md = _md(args, workdir, prepared.test.frames, config.seed, log)
    results = {
        "data": str(path), "model": config.model, **evaluation,
        "epochs": len(history), "best_epoch": trainer.epoch, "train_seconds": train_s,
        "frames_per_s": float(np.median([r["frames_per_s"] for r in history])),
        "params": trainer.num_params, **environment(), "config": dataclasses.asdict(config),
        "task": task.to_dict(), "model_config": dataclasses.asdict(trainer.model_config),
        "reference": prepared.reference.to_dict(), "split_sizes": sizes_used,
        "frames": counts, "init_from": args.init_from, "md": md,
    }
    write_json(workdir / "results.json", results)
    return results


def _resolved(args, config, task, overrides, sizes) -> dict:
    """The options as run (preset values filled in) for ``config.toml``."""
    options = dict(vars(args))
    options |= {k: getattr(config, k) for k in TRAIN_OPTIONS}
    options |= {"beta": task.beta, "stress_weight": task.stress_weight, "cutoff": task.cutoff,
                "model": config.model, "model_config": json.dumps(overrides), **sizes}
    if args.epochs is None:
        options["epochs"] = None  # planned from the budget again
    return options


def _md(args, workdir: Path, test_frames, seed: int, log) -> dict:
    if args.no_md:
        return {"skipped": "--no-md"}
    if test_frames.pbc[0].any():
        return {"skipped": "the first test frame is periodic (NVE here is for molecules)"}
    try:
        from mpattn.md import plot_energy, run_nve
    except ImportError as err:
        log(f"MD skipped: mpattn.md is not available ({err})")
        return {"skipped": f"mpattn.md unavailable: {err}"}
    atoms = test_frames.atoms(0)
    atoms.calc = None
    steps = int(round(args.md_ps * 1000 / 0.5))
    result = run_nve(workdir, atoms, timestep_fs=0.5, steps=steps,
                     temperature_K=args.md_temperature, seed=seed,
                     log_every=max(1, steps // 1000), progress=not args.no_progress)
    plot_energy(result, workdir / "energy.png")
    summary = {k: result[k] for k in ("drift_meV_per_atom_per_ps", "max_deviation_meV_per_atom",
                                      "intact", "recompiles", "budget_growths", "seconds",
                                      "steps_per_s") if k in result}
    summary |= {"ps": args.md_ps, "timestep_fs": 0.5, "temperature_K": args.md_temperature,
                "start_frame": int(test_frames.ids[0]),
                "molecule": str(test_frames.molecules[0])}
    log(f"NVE {args.md_ps} ps of {summary['molecule']}: drift "
        f"{summary.get('drift_meV_per_atom_per_ps')} meV/atom/ps, intact {summary.get('intact')}")
    return summary


def _size(text):
    """A part size: a count (``950``) or a share below 1 (``0.8``)."""
    value = float(text)
    return int(value) if value == int(value) and value >= 1 else value


def parser() -> argparse.ArgumentParser:
    from mpattn.data.frames import ENERGY_UNITS, LENGTH_UNITS
    from mpattn.models import model_names
    from mpattn.train.losses import LOSSES
    from mpattn.train.schedules import SCHEDULES

    p = argparse.ArgumentParser(prog="python -m experiments.potential",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="TOML file of these options (the command line wins)")
    d = p.add_argument_group("data")
    d.add_argument("--data", help="a file (extxyz, ASE db, rMD17 .npz, ...) or a bundled set: "
                   f"{', '.join(preset.DATASETS)} (default ethanol_xtb)")
    d.add_argument("--val", help="validation frames from this file instead of --data")
    d.add_argument("--test", help="test frames from this file instead of --data")
    d.add_argument("--energy-key", help="info key of the energy (default: the file's energy)")
    d.add_argument("--forces-key", help="array key of the forces (default: the file's forces)")
    d.add_argument("--stress-key", help="info key of the stress (default: the file's, if any)")
    d.add_argument("--molecule-key", default="molecule",
                   help="info key naming each frame's molecule (default 'molecule'; frames "
                   "without it are grouped by formula)")
    d.add_argument("--energy-unit", default="eV", choices=list(ENERGY_UNITS))
    d.add_argument("--length-unit", default="Ang", choices=list(LENGTH_UNITS))
    d.add_argument("--skip-bad-frames", action="store_true",
                   help="train on the usable frames when some cannot be used (they are "
                   "counted in results.json); default: stop and name them")
    s = p.add_argument_group("split")
    s.add_argument("--train-size", type=_size, help="training frames: a count or a share")
    s.add_argument("--val-size", type=_size)
    s.add_argument("--test-size", type=_size, help="default: the rest")
    s.add_argument("--unseen-molecules", type=float,
                   help="share of the molecules held out as test_unseen")
    s.add_argument("--seed", type=int, help="split, initialisation and batch order (0)")
    m = p.add_argument_group("model and loss")
    m.add_argument("--model", default=preset.MODEL, choices=model_names(),
                   help=f"default {preset.MODEL}")
    m.add_argument("--model-config", help='JSON model overrides, e.g. \'{"dim": 32}\'')
    m.add_argument("--cutoff", type=float, help="radius graph cutoff, Å (default 5)")
    m.add_argument("--beta", type=float, help="force weight of the loss, 0-1 (0.99; 1: forces "
                   "only, then the post-hoc energy fit)")
    m.add_argument("--stress-weight", type=float, help="weight of the stress term (0: off)")
    m.add_argument("--init-from", help="start from a trained run's parameters (fine-tuning)")
    m.add_argument("--train-only-readout", action="store_true",
                   help="with --init-from: train the readout only, freeze the rest")
    t = p.add_argument_group("training (default: experiments/configs/potential.py)")
    t.add_argument("--time-budget-min", type=float, help="training time (10)")
    t.add_argument("--epochs", type=int, help="default: as many as fill the budget")
    t.add_argument("--batch-size", type=int)
    t.add_argument("--eval-batch-size", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--loss", choices=LOSSES)
    t.add_argument("--schedule", choices=SCHEDULES)
    t.add_argument("--weight-decay", type=float)
    t.add_argument("--ema-decay", type=float)
    t.add_argument("--clip-norm", type=float)
    t.add_argument("--checkpoint-every-s", type=float)
    t.add_argument("--keep-checkpoints", type=int)
    t.add_argument("--num-devices", type=int)
    t.add_argument("--steps-per-call", type=int)
    t.add_argument("--x64", action="store_true", help="train in float64")
    r = p.add_argument_group("run")
    r.add_argument("--workdir", help="default runs/<data name>")
    r.add_argument("--md-ps", type=float, default=10.0)
    r.add_argument("--md-temperature", type=float, default=300.0,
                   help="temperature of the initial Maxwell-Boltzmann velocities (K)")
    r.add_argument("--no-md", action="store_true")
    r.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = parse_with_config(p, argv)
    if args.model_config:
        try:
            if not isinstance(json.loads(args.model_config), dict):
                raise ValueError("not a JSON object")
        except ValueError as err:
            p.error(f"--model-config {args.model_config!r}: {err}")
    if args.train_only_readout and not args.init_from:
        p.error("--train-only-readout needs --init-from WORKDIR")
    try:
        run(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    from mpattn.runtime import restart_with_hugepages

    restart_with_hugepages()  # before any work: huge pages for XLA's CPU buffers
    sys.exit(main())
