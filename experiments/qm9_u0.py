"""Train a model on QM9 (U0 by default) and report the test MAE in meV.

    python -m experiments.qm9_u0                       # preset by hardware (see --preset)
    python -m experiments.qm9_u0 --model mhmp          # the thesis' model under that preset
    python -m experiments.qm9_u0 --preset thesis --model mhmp_pe
    python -m experiments.qm9_u0 --workdir runs/x --resume
    python -m experiments.qm9_u0 --distributed         # one process per host (SLURM, MPI...)

Writes into --workdir: results.json, metrics.csv, predictions.csv, curves.png, parity.png,
per_size.png, split.json and checkpoints/ (orbax). The presets are in
``experiments/configs/qm9.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

from experiments.config_file import CONFIG_NAME, parse_with_config, write_config
from experiments.configs.qm9 import PRESETS
from experiments.planning import Replan, plan_epochs
from mpattn.data.qm9 import TARGETS
from mpattn.models import model_names
from mpattn.train import PropertyTask, TrainConfig, Trainer
from mpattn.train.checkpoint import CHECKPOINT_FORMAT
from mpattn.train.distributed import initialize, is_primary
from mpattn.train.losses import LOSSES, WEIGHTINGS
from mpattn.train.report import (
    environment,
    plot_curves,
    plot_parity,
    plot_per_size,
    write_json,
    write_predictions,
)
from mpattn.train.runs import run_settings
from mpattn.train.schedules import SCHEDULES
from mpattn.train.terms import Denoising, Dipole

__all__ = ["RESUME_MAY_CHANGE", "main", "parse", "resume_conflicts", "run"]

#: TrainConfig fields a resumed run may change: its length, budget, checkpointing and how the
#: steps are laid out on the devices (the same arithmetic); any other setting must stay the run's
RESUME_MAY_CHANGE = ("epochs", "time_budget_min", "checkpoint_every_s", "keep_checkpoints",
                     "num_devices", "steps_per_call", "eval_batch_size")


def resume_conflicts(meta: dict, config: TrainConfig, task, model_config) -> list[str]:
    """What ``config``, ``task`` and ``model_config`` change of the run whose checkpoint
    metadata is ``meta``, as ``"name: run's value -> this one"`` lines (training fields in
    :data:`RESUME_MAY_CHANGE` are not compared)."""
    stored, stored_task, stored_model, _ = run_settings(meta)
    out = [f"{f.name}: {getattr(stored, f.name)!r} -> {getattr(config, f.name)!r}"
           for f in dataclasses.fields(TrainConfig)
           if f.name not in RESUME_MAY_CHANGE
           and getattr(stored, f.name) != getattr(config, f.name)]
    out += [f"{f.name}: {getattr(stored_task, f.name)!r} -> {getattr(task, f.name)!r}"
            for f in dataclasses.fields(task)
            if getattr(stored_task, f.name, None) != getattr(task, f.name)]
    if stored.model == config.model:
        out += [f"{k}: {v!r} -> {getattr(model_config, k, None)!r}"
                for k, v in dataclasses.asdict(stored_model).items()
                if getattr(model_config, k, None) != v]
    return out


def _planned(config, task, data, model_config, *, resumed, log):
    """``config`` with the epochs that fit its time budget, and the trial trainer that timed
    them (its compiled steps are reused), or the resumed run's plan."""
    import jax

    if resumed is not None:  # the schedule must stay the one the run started with
        epochs = int(resumed["config"]["epochs"])
        log(f"resuming the run's plan of {epochs} epochs")
        return dataclasses.replace(config, epochs=epochs), None
    if jax.process_count() > 1:  # a throwaway trainer per process would need a shared folder
        log(f"{config.epochs} epochs (not planned from the budget in a multi-process run)")
        return config, None
    log(f"timing an epoch to plan the epochs of the {config.time_budget_min:g} min budget")
    plan = plan_epochs(lambda c, folder: Trainer(c, task, data, folder, model_config=model_config,
                                                 log=lambda _msg: None),
                       config, config.time_budget_min, epochs=1, reuse_trial=True)
    log(f"{plan.epochs} epochs fit the {config.time_budget_min:g} min budget (the "
        f"{config.schedule} schedule spans them; the run reuses the compiled steps)")
    return dataclasses.replace(config, epochs=plan.epochs), plan.trial


def run(config: TrainConfig, task: PropertyTask | None = None, *, workdir, sizes=None,
        split_file=None, resume: bool = False, dataset_cache=None, model_config=None,
        preset: str | None = None, plan: bool = False, progress: bool = True,
        log=print, options: dict | None = None) -> dict:
    """Train and evaluate on QM9; writes results.json, metrics.csv, predictions.csv (val and
    test, per molecule), plots, checkpoints, split.

    Args:
        config: training settings; task: the target and its loss (default ``PropertyTask()``,
            U0).
        workdir: output folder; with ``resume`` it must hold a previous run's checkpoints.
        sizes: (train, val, test) split sizes (test None: the rest).
        split_file: a split file of QM9 ids (overrides ``sizes``).
        resume: continue the run in ``workdir`` exactly where it stopped; the settings must be
            the run's but for :data:`RESUME_MAY_CHANGE` (ValueError listing what differs).
        dataset_cache: a featurized-QM9 cache file to load instead of qm9pack (no RDKit).
        model_config: the model's typed config (default: its class defaults).
        preset: the preset's name, recorded in results.json.
        plan: with a time budget, replace ``config.epochs`` by the epochs that fit it (timed
            on a trial trainer whose compiled steps the run reuses) and re-fit the plan to the
            run's pace during its first half (``experiments/planning.py``); with ``resume``,
            the epochs the run planned.
        options: the command-line options as run, written to ``WORKDIR/config.toml`` (not
            on ``resume``) once the settings are checked.

    Raises:
        ValueError: a setting that cannot work (before any data is read or file written),
            a workdir that is a file or holds no run to resume, a resume with other settings.
    """
    from mpattn.data.cache import load_molset
    from mpattn.data.qm9 import load_qm9, load_split, make_split, save_split
    from mpattn.models import default_config

    t_start = time.perf_counter()
    task = (task or PropertyTask()).check()
    config.check()
    workdir = Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise ValueError(f"--workdir {workdir}: exists and is not a folder")
    if sizes is not None and split_file is None:
        _check_sizes(sizes)
    primary = is_primary()  # in a multi-process run only process 0 writes files and logs
    if not primary:
        log = lambda _msg: None  # noqa: E731
    model_config = task.model_config(model_config or default_config(config.model))
    resumed = None  # the checkpoint metadata of the run being resumed
    if resume:
        from mpattn.train.checkpoint import latest_meta

        if not (workdir / "checkpoints").is_dir():
            raise ValueError(f"--resume: {workdir} holds no checkpoints/ folder (nothing to "
                             "resume); run without --resume to start")
        split_file = split_file or workdir / "split.json"
        resumed = latest_meta(workdir / "checkpoints")
        if "format" not in resumed:
            raise ValueError(f"--resume: the run in {workdir} was written by mpattn before "
                             "the one-engine change and cannot be continued (mpattn.load_run "
                             "still reads it)")
        conflicts = resume_conflicts(resumed, config, task, model_config)
        if conflicts:
            raise ValueError(f"--resume: the run in {workdir} was started with other "
                             f"settings ({'; '.join(conflicts)}); resume with the run's own "
                             "(leave those options out) or start a new --workdir")
        plan = plan and bool(resumed.get("run_info", {}).get("planned"))
    workdir.mkdir(parents=True, exist_ok=True)
    if options is not None and primary and not resume:
        write_config(workdir / CONFIG_NAME, options,
                     header=f"python -m experiments.qm9_u0 --config {workdir / CONFIG_NAME}")
    ms = load_molset(Path(dataset_cache)) if dataset_cache else load_qm9(progress=progress,
                                                                          log=log)
    if split_file is not None:
        split = load_split(split_file, available=ms.ids)
    else:
        split = make_split(ms.ids, sizes=sizes, seed=config.seed)
    if primary:
        save_split(split, workdir / "split.json")
    log(f"split: {len(split.train):,} train / {len(split.val):,} val / {len(split.test):,} test")
    data = task.prepare(ms, split, config)
    trial, planned = None, plan and config.time_budget_min is not None
    if planned:
        config, trial = _planned(config, task, data, model_config, resumed=resumed, log=log)
    trainer = Trainer(config, task, data, workdir, model_config=model_config, log=log,
                      compiled_from=trial, run_info={"planned": planned, "preset": preset})
    del trial
    if resume:
        trainer.restore("latest")
        log(f"resumed at epoch {trainer.epoch} (step {int(trainer.carry['step'])})")
    log(f"model {config.model}: {trainer.num_params:,} parameters; "
        f"{trainer.steps_per_epoch} batches per epoch; device {environment()['device']}")
    history = trainer.fit(progress=progress, after_epoch=Replan(log) if planned else None)
    config = trainer.config  # with the epochs re-planned during the run
    if trainer.checkpoints.best_step() is not None:
        trainer.restore("best")
    val, test = trainer.report(data.val), trainer.report(data.test)
    key = "mae_mev" if "mae_mev" in test else "mae"
    log(f"test MAE {test[key]:.2f} {'meV' if key == 'mae_mev' else ''} "
        f"(val {val[key]:.2f}); best epoch {trainer.epoch}")
    results = {
        "format": CHECKPOINT_FORMAT,  # its settings read back as a checkpoint's (run_settings)
        "target": task.target,
        "preset": preset,
        "test": {k: v for k, v in test.items() if not k.startswith("_")},
        "val": {k: v for k, v in val.items() if not k.startswith("_")},
        "epochs": len(history),
        "best_epoch": trainer.epoch,
        "train_seconds": sum(r["seconds"] for r in history),
        "wall_seconds": time.perf_counter() - t_start,
        "train_mol_per_s": float(np.median([r["train_mol_per_s"] for r in history]))
        if history else None,
        "params": trainer.num_params,
        **environment(),
        "config": dataclasses.asdict(config),
        "task": task.to_dict(),
        "model_config": dataclasses.asdict(trainer.model_config),
        "split_sizes": [len(split.train), len(split.val), len(split.test)],
        "run_info": trainer.run_info,
    }
    if primary:
        _write_outputs(workdir, results, history, data, task, val, test)
    return results


def _check_sizes(sizes) -> None:
    for name, value in zip(("--train-size", "--val-size", "--test-size"), sizes, strict=True):
        if value is not None and value < 1:
            raise ValueError(f"{name} {value}: must be at least 1")


def _write_outputs(workdir: Path, results: dict, history, data, task, val, test) -> None:
    write_json(workdir / "results.json", results)
    write_predictions(workdir / "predictions.csv", {
        name: (part.ids, part.n_atoms, part.true, rep["_pred"])
        for name, part, rep in (("val", data.val, val), ("test", data.test, test))})
    if history:
        plot_curves(history, workdir / "curves.png")
    energy = "mae_mev" in test
    unit = "eV" if energy else task.target
    offset, quantity = None, task.target
    if task.reference:
        offset = data.transform.reference(data.test.counts)
        quantity = f"{task.target} − Σ n_e E_e"
    plot_parity(test["_pred"], data.test.true, workdir / "parity.png", unit=unit,
                offset=offset, quantity=quantity)
    plot_per_size(test["per_size"], workdir / "per_size.png",
                  key="mae_mev" if energy else "mae", unit="meV" if energy else unit)


def _default_preset() -> tuple[str, str]:
    import jax

    kind = jax.devices()[0].platform
    if kind in ("gpu", "tpu", "cuda", "rocm"):
        return "standard", f"an accelerator ({kind}) is present"
    return "cpu", "no accelerator found (JAX runs on the CPU)"


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m experiments.qm9_u0",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--config", help="TOML file of these options (the command line wins); "
                    "every run writes its own as WORKDIR/config.toml")
    ap.add_argument("--model", default=None, choices=model_names(),
                    help="default: the preset's (attention; mhmp for --preset thesis)")
    ap.add_argument("--preset", default=None, choices=list(PRESETS),
                    help="default: 'standard' with an accelerator, 'cpu' without")
    ap.add_argument("--target", default=None, choices=list(TARGETS))
    ap.add_argument("--epochs", type=int,
                    help="default: with a time budget (the cpu preset's 10 min), as many as fit "
                    "it, timed on one epoch first; else the preset's")
    ap.add_argument("--time-budget-min", type=float)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--loss", choices=LOSSES)
    ap.add_argument("--schedule", choices=SCHEDULES)
    ap.add_argument("--edge-set", choices=["complete", "bonds", "radius"])
    ap.add_argument("--cutoff", type=float, help="Å, for --edge-set radius")
    ap.add_argument("--train-size", type=int)
    ap.add_argument("--val-size", type=int)
    ap.add_argument("--test-size", type=int)
    ap.add_argument("--split-file", help="npz or json with QM9 ids under train/val/test")
    ap.add_argument("--seed", type=int)
    ap.add_argument("--workdir", default="runs/qm9_u0")
    ap.add_argument("--resume", action="store_true",
                    help="continue the run in --workdir with its own settings and model config "
                    "(options given again must agree with them, but for --epochs, "
                    "--time-budget-min, checkpointing, --num-devices and --steps-per-call)")
    ap.add_argument("--dataset-cache", help="featurized QM9 cache file (no RDKit/qm9pack)")
    ap.add_argument("--model-config", default="{}",
                    help='model config overrides as JSON, e.g. \'{"dim": 128}\'')
    ap.add_argument("--weighting", choices=WEIGHTINGS, help="size weighting of the loss")
    ap.add_argument("--weight-r", type=float, help="exponent r of the size weighting")
    ap.add_argument("--ema-decay", type=float, help="evaluate with EMA weights (e.g. 0.999)")
    ap.add_argument("--checkpoint-every-s", type=float,
                    help="checkpoint after epochs ending this long after the previous save "
                    "(and after the first and last); 0: every epoch (default: the preset's, "
                    "30 s)")
    ap.add_argument("--keep-checkpoints", type=int,
                    help="most recent checkpoints kept besides the best (default 3)")
    ap.add_argument("--weight-decay", type=float,
                    help="AdamW decay of the weight matrices (default 0: Adam)")
    ap.add_argument("--denoise-sigma", type=float,
                    help="noisy-nodes regularisation: Gaussian noise of this many Å on the "
                    "training positions and an auxiliary term that predicts it (needs "
                    "so3krates or attention with vector_features; e.g. 0.02; 0: off; "
                    "default: the preset's)")
    ap.add_argument("--denoise-weight", type=float,
                    help="weight of the denoising term (default 0.1)")
    ap.add_argument("--dipole-weight", type=float,
                    help="weight of the dipole term on the charges of the Coulomb term (needs "
                    "\"electrostatics\": true; |Σ q r| against QM9's mu, Debye; default 0)")
    ap.add_argument("--min-atoms", type=int, help="train only on molecules this large or more")
    ap.add_argument("--max-atoms", type=int, help="train only on molecules this large or less")
    ap.add_argument("--cap-per-size", type=int,
                    help="at most this many training molecules per atom count")
    ap.add_argument("--num-devices", type=int,
                    help="data-parallel devices (default: all visible)")
    ap.add_argument("--steps-per-call", type=int,
                    help="train steps per jit call (lax.scan over K batches of one padding "
                    "budget): fewer host round trips where steps are short (GPU); default 1")
    ap.add_argument("--distributed", action="store_true",
                    help="join a multi-process run via jax.distributed.initialize() (detects "
                    "SLURM, Open MPI, Kubernetes, Cloud TPU; else give the next three)")
    ap.add_argument("--coordinator", help="HOST:PORT of process 0 (implies --distributed)")
    ap.add_argument("--num-processes", type=int, help="processes of the run (--coordinator)")
    ap.add_argument("--process-id", type=int, help="this process's index (--coordinator)")
    ap.add_argument("--no-progress", action="store_true")
    return parse_with_config(ap, argv)


TRAIN_OPTIONS = ("epochs", "time_budget_min", "batch_size", "lr", "loss", "schedule", "seed",
                 "num_devices", "steps_per_call", "ema_decay", "weight_decay",
                 "checkpoint_every_s", "keep_checkpoints")
TASK_OPTIONS = ("target", "edge_set", "cutoff", "weighting", "weight_r", "min_atoms",
                "max_atoms", "cap_per_size")


def _aux(args, aux: tuple) -> tuple:
    """The auxiliary terms: the preset's (or the resumed run's), changed by the options."""
    terms = {t.name: t for t in aux}
    if args.denoise_sigma is not None or args.denoise_weight is not None:
        old = terms.get("denoise", Denoising())
        sigma = old.sigma if args.denoise_sigma is None else args.denoise_sigma
        weight = old.weight if args.denoise_weight is None else args.denoise_weight
        terms.pop("denoise", None)
        if sigma < 0:
            raise ValueError(f"--denoise-sigma {sigma}: must be >= 0 (0: off)")
        if sigma > 0:
            terms["denoise"] = Denoising(sigma, weight)
    if args.dipole_weight is not None:
        terms.pop("dipole", None)
        if args.dipole_weight < 0:
            raise ValueError(f"--dipole-weight {args.dipole_weight}: must be >= 0 (0: off)")
        if args.dipole_weight > 0:
            terms["dipole"] = Dipole(args.dipole_weight)
    return tuple(terms[n] for n in ("denoise", "dipole") if n in terms)


def settings(args, say=print):
    """``(TrainConfig, PropertyTask, model config, sizes, plan)`` from the options: the
    preset's (or, with ``--resume``, the run's own) settings with the options on top."""
    from mpattn.models import default_config

    preset = PRESETS[args.preset]
    base, task, model_fields, runs_own = preset.train, preset.task, {}, False
    if args.resume:
        try:
            from mpattn.train.checkpoint import latest_meta

            base, task, stored_model, _ = run_settings(
                latest_meta(Path(args.workdir) / "checkpoints"))
            model_fields = dataclasses.asdict(stored_model)
        except (ValueError, KeyError):
            pass  # run() says what is wrong with the workdir
        else:
            runs_own = True
            say(f"--resume: the settings and model config the run in {args.workdir} started "
                "with")
    if args.model is None:
        args.model = base.model
        say(f"model '{args.model}': " + ("the run's" if runs_own else
                                         "the preset's default (choose another with --model)"))
    if args.model != base.model:
        model_fields = {}
    if not runs_own:  # the preset's settings for this model (e.g. its regulariser)
        base, task = preset.train_for(args.model), preset.task_for(args.model)
    config = dataclasses.replace(base, model=args.model, **{
        k: getattr(args, k) for k in TRAIN_OPTIONS if getattr(args, k) is not None})
    task = dataclasses.replace(task, aux=_aux(args, task.aux), **{
        k: getattr(args, k) for k in TASK_OPTIONS if getattr(args, k) is not None})
    overrides = json.loads(args.model_config)
    if not isinstance(overrides, dict):
        raise ValueError(f"--model-config {args.model_config!r}: not a JSON object")
    if runs_own:
        model_config = default_config(args.model, **{**model_fields, **overrides})
    else:
        model_config = preset.model_config(args.model, overrides)
    sizes = tuple(v if v is not None else p for v, p in zip(
        (args.train_size, args.val_size, args.test_size), preset.sizes, strict=True))
    # a resumed run plans its epochs again only if it was planned (its checkpoint says so)
    plan = args.epochs is None and (preset.plan or runs_own)
    return config, task, model_config, sizes, plan


def _resolved(args, config, task, sizes, plan) -> dict:
    """The options as run (the preset's values filled in), for ``config.toml``."""
    options = dict(vars(args))
    options |= {k: getattr(config, k) for k in TRAIN_OPTIONS}
    options |= {k: getattr(task, k) for k in TASK_OPTIONS}
    terms = {t.name: t for t in task.aux}
    options |= {"denoise_sigma": terms["denoise"].sigma if "denoise" in terms else 0.0,
                "denoise_weight": terms["denoise"].weight if "denoise" in terms else None,
                "dipole_weight": terms["dipole"].weight if "dipole" in terms else 0.0,
                "model": config.model, "train_size": sizes[0], "val_size": sizes[1],
                "test_size": sizes[2], "epochs": None if plan else config.epochs}
    return options


def main(argv=None) -> int:
    args = parse(argv)
    if args.distributed or args.coordinator:  # before anything else touches JAX
        try:
            initialize(args.coordinator, args.num_processes, args.process_id)
        except (ValueError, RuntimeError) as err:
            print(f"error: --distributed: {err}", file=sys.stderr)
            return 2
    say = print if is_primary() else (lambda *_a, **_k: None)
    if args.preset is None:
        args.preset, why = _default_preset()
        say(f"preset '{args.preset}': {why}")
    say(f"preset '{args.preset}': {PRESETS[args.preset].why}")
    try:
        config, task, model_config, sizes, plan = settings(args, say)
        results = run(config, task, workdir=args.workdir, sizes=sizes,
                      split_file=args.split_file, resume=args.resume,
                      dataset_cache=args.dataset_cache, model_config=model_config,
                      preset=args.preset, plan=plan, progress=not args.no_progress,
                      options=_resolved(args, config, task, sizes, plan))
    except (ValueError, json.JSONDecodeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    t = results["test"]
    unit = "meV" if "mae_mev" in t else TARGETS[task.target][0]
    say(f"test MAE {t.get('mae_mev', t.get('mae')):.2f} {unit}; results in "
        f"{args.workdir}/results.json")
    return 0


if __name__ == "__main__":
    from mpattn.runtime import restart_with_hugepages

    restart_with_hugepages()  # before any work: huge pages for XLA's CPU buffers
    raise SystemExit(main())
