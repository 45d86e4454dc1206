"""apax (the JAX library's GMNN model) trained on our split for a wall-clock budget, run in
apax's own venv by ``benchmarks/peers_potentials.py``; writes ``report.json`` +
``predictions.npz``.

    python benchmarks/peer_workers/apax_worker.py --parts DIR --minutes 10 --out OUT

Settings: apax's own template (``apax template train``: GMNN, 16 Bessel functions,
r_max 5 Å, nn [256, 256], per-element regression shift and force-RMS scale, MSE energy
weight 1 / forces weight 4, Adam with its per-group learning rates and the cyclic cosine
schedule, period 40 epochs), batch 4 as the template; nothing shrunk: GMNN is a small,
fast model, sized well for a 2-core CPU as it is.

Equal time: apax has no wall-clock limit, so a calibration run of 3 epochs gives the first
epoch's seconds (JIT compilation included) and the seconds of a later one from apax's own
``log.csv`` (``epoch_time``); the run gets ``1 + floor((budget - first) / later)`` epochs.
The validation curve (force MAE against the summed epoch times) is read from the same log.
"""

from __future__ import annotations

import csv
import math
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ase_side import measure, worker_arguments, write_report  # noqa: E402


def settings(parts: Path, out: Path, epochs: int, seed: int, n_train: int,
             n_val: int) -> dict:
    """The apax training config (see the module docstring)."""
    return {
        "n_epochs": epochs, "seed": seed, "patience": None, "data_parallel": False,
        "data": {"directory": str(out), "experiment": "apax",
                 "train_data_path": str(parts / "train.extxyz"),
                 "val_data_path": str(parts / "val.extxyz"),
                 "n_train": n_train, "n_valid": n_val, "batch_size": 4,
                 "valid_batch_size": 100,
                 "shift_method": "per_element_regression_shift",
                 "shift_options": {"energy_regularisation": 1.0},
                 "scale_method": "per_element_force_rms_scale",
                 "pos_unit": "Ang", "energy_unit": "eV"},
        "model": {"name": "gmnn", "basis": {"name": "bessel", "n_basis": 16, "r_max": 5.0},
                  "n_radial": 5, "n_contr": 8, "nn": [256, 256], "calc_stress": False},
        "loss": [{"name": "energy", "loss_type": "mse", "weight": 1.0},
                 {"name": "forces", "loss_type": "mse", "weight": 4.0}],
        "metrics": [{"name": "energy", "reductions": ["mae"]},
                    {"name": "forces", "reductions": ["mae"]}],
        "optimizer": {"name": "adam", "emb_lr": 0.001, "nn_lr": 0.001, "scale_lr": 0.0001,
                      "shift_lr": 0.003,
                      "schedule": {"name": "cyclic_cosine", "period": 40,
                                   "decay_factor": 0.93}},
        "callbacks": [{"name": "csv"}],
        "progress_bar": {"disable_epoch_pbar": True, "disable_batch_pbar": True},
    }


def read_log(path: Path) -> list[tuple[float, float]]:
    """``(epoch seconds, validation force MAE meV/Å)`` per epoch of apax's ``log.csv``."""
    with open(path) as fh:
        rows = list(csv.DictReader(fh))
    key = next(k for k in rows[0] if k.startswith("val") and "forces" in k and "mae" in k)
    return [(float(r["epoch_time"]), 1000.0 * float(r[key])) for r in rows]


def count_frames(path: Path) -> int:
    import ase.io

    return len(ase.io.read(str(path), index=":"))


def train(parts: Path, out: Path, epochs: int, seed: int) -> tuple[Path, list, float]:
    """One apax training in ``out``: ``(model folder, log rows, wall seconds)``."""
    from apax.train.run import run

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    config = settings(parts, out, epochs, seed, count_frames(parts / "train.extxyz"),
                      count_frames(parts / "val.extxyz"))
    t0 = time.time()
    run(config)
    wall = time.time() - t0
    return out / "apax", read_log(out / "apax" / "log.csv"), wall


def main(argv=None) -> int:
    args = worker_arguments(__doc__, argv)
    import apax
    import ase
    import jax

    _, rows, _ = train(args.parts, args.out / "calibration", 3, args.seed)
    first, later = rows[0][0], min(r[0] for r in rows[1:])
    epochs = 1 + max(0, math.floor((args.minutes * 60.0 - first) / later))
    print(f"apax: first epoch {first:.1f} s, then {later:.1f} s -> {epochs} epochs", flush=True)
    model_dir, rows, wall = train(args.parts, args.out / "run", epochs, args.seed)
    seconds, curve = 0.0, []
    for epoch_s, mae in rows:
        seconds += epoch_s
        curve.append([seconds, mae])
    from apax.md import ASECalculator

    calc = ASECalculator(model_dir=model_dir)
    predictions, md = measure(calc, args.parts, args.md, args.md_steps)
    n_train = count_frames(args.parts / "train.extxyz")
    params = None
    try:
        params = int(sum(x.size for x in jax.tree_util.tree_leaves(calc.params)))
    except Exception:  # the calculator keeps its parameters privately in some versions
        pass
    train_s = curve[-1][0]
    report = {
        "library": "apax", "versions": {"apax": getattr(apax, "__version__", None),
                                        "jax": jax.__version__, "ase": ase.__version__},
        "model": "GMNN nn [256, 256], 16 Bessel, r_max 5", "params": params,
        "settings": settings(args.parts, args.out / "run", epochs, args.seed, n_train, 0),
        "calibration": {"first_epoch_seconds": first, "epoch_seconds": later},
        "minutes": args.minutes, "epochs": len(curve), "train_seconds": train_s,
        "wall_seconds": wall,
        "train_frames_per_s": n_train * len(curve) / train_s if train_s > 0 else None,
        "curve": curve, "curve_unit": "meV/Å", "md": md, "model_file": str(model_dir),
    }
    print(f"wrote {write_report(args.out, report, predictions)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
