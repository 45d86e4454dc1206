"""Train a model on QM9 (U0 by default) and report the test MAE in meV.

    python -m experiments.qm9_u0                       # preset by hardware (see --preset)
    python -m experiments.qm9_u0 --model mhmp          # the thesis' model under that preset
    python -m experiments.qm9_u0 --preset thesis --model mhmp_pe
    python -m experiments.qm9_u0 --workdir runs/x --resume
    python -m experiments.qm9_u0 --distributed         # one process per host (SLURM, MPI...)

Writes into --workdir: results.json, metrics.csv, curves.png, parity.png, per_size.png,
split.json and checkpoints/ (orbax).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from mpattn.data.qm9 import TARGETS
from mpattn.models import model_names
from mpattn.train.distributed import initialize, is_primary
from mpattn.train.experiment import PRESETS, run_qm9
from mpattn.train.losses import LOSSES, WEIGHTINGS
from mpattn.train.schedules import SCHEDULES


def _run_settings(workdir):
    """The TrainConfig and model config fields of the run in ``workdir`` (ValueError if it
    holds no readable checkpoint)."""
    from pathlib import Path

    from mpattn.train.checkpoint import latest_meta
    from mpattn.train.loop import run_settings

    config, model_config = run_settings(latest_meta(Path(workdir) / "checkpoints"))
    return config, dataclasses.asdict(model_config)


def _default_preset() -> tuple[str, str]:
    import jax

    kind = jax.devices()[0].platform
    if kind in ("gpu", "tpu", "cuda", "rocm"):
        return "standard", f"an accelerator ({kind}) is present"
    return "cpu", "no accelerator found (JAX runs on the CPU)"


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m experiments.qm9_u0",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, choices=model_names(),
                    help="default: the preset's (attention_potential; mhmp for --preset thesis)")
    ap.add_argument("--preset", default=None, choices=list(PRESETS),
                    help="default: 'standard' with an accelerator, 'cpu' without")
    ap.add_argument("--target", default="U0", choices=list(TARGETS))
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
                    "training positions and an auxiliary loss that predicts it (needs "
                    "vector_features; e.g. 0.02; default 0: off)")
    ap.add_argument("--denoise-weight", type=float,
                    help="weight of the denoising loss (default 0.1)")
    ap.add_argument("--dipole-weight", type=float,
                    help="weight of the dipole loss on the charges of the Coulomb term (needs "
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
    return ap.parse_args(argv)


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
    preset = PRESETS[args.preset]
    say(f"preset '{args.preset}': {preset.why}")
    base, model_config, runs_own = preset.train, {}, False
    if args.resume:  # the run's own settings, where the command line does not give them
        try:
            base, model_config = _run_settings(args.workdir)
        except ValueError:
            pass  # run_qm9 says what is wrong with the workdir
        else:
            runs_own = True
            say(f"--resume: the settings and model config the run in {args.workdir} started "
                "with")
    if args.model is None:
        args.model = base.model
        say(f"model '{args.model}': " + ("the run's" if runs_own else
                                         "the preset's default (choose another with --model)"))
    if args.model != base.model:
        model_config = {}
    if not runs_own:  # the preset's settings for this model (e.g. its regulariser)
        base = preset.config_for(args.model)
    # a resumed run plans its epochs again only if it was planned (its plan is in its checkpoint)
    planned = args.epochs is None and (not runs_own or base.replan)
    fields = {"model": args.model, "target": args.target, "epochs": args.epochs,
              "time_budget_min": args.time_budget_min, "batch_size": args.batch_size,
              "lr": args.lr, "loss": args.loss, "schedule": args.schedule,
              "edge_set": args.edge_set, "cutoff": args.cutoff, "seed": args.seed,
              "num_devices": args.num_devices, "steps_per_call": args.steps_per_call,
              "weighting": args.weighting,
              "weight_r": args.weight_r, "ema_decay": args.ema_decay,
              "weight_decay": args.weight_decay, "denoise_sigma": args.denoise_sigma,
              "denoise_weight": args.denoise_weight, "dipole_weight": args.dipole_weight,
              "checkpoint_every_s": args.checkpoint_every_s,
              "keep_checkpoints": args.keep_checkpoints,
              "min_atoms": args.min_atoms, "max_atoms": args.max_atoms,
              "cap_per_size": args.cap_per_size}
    config = dataclasses.replace(base, **{k: v for k, v in fields.items() if v is not None})
    sizes = list(preset.sizes)
    for i, v in enumerate((args.train_size, args.val_size, args.test_size)):
        if v is not None:
            sizes[i] = v
    try:
        overrides = model_config | json.loads(args.model_config)
        results = run_qm9(config, workdir=args.workdir, sizes=tuple(sizes),
                          split_file=args.split_file, resume=args.resume,
                          dataset_cache=args.dataset_cache, model_overrides=overrides,
                          preset=args.preset, plan_epochs=planned,
                          progress=not args.no_progress)
    except (ValueError, json.JSONDecodeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    t = results["test"]
    unit = "meV" if "mae_mev" in t else TARGETS[config.target][0]
    say(f"test MAE {t.get('mae_mev', t.get('mae')):.2f} {unit}; results in "
          f"{args.workdir}/results.json")
    return 0


if __name__ == "__main__":
    from mpattn.runtime import restart_with_hugepages

    restart_with_hugepages()  # before any work: huge pages for XLA's CPU buffers
    raise SystemExit(main())
