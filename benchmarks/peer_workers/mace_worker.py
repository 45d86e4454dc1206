"""MACE (``mace-torch``) trained on our split for a wall-clock budget, run in MACE's own venv
by ``benchmarks/peers_potentials.py``; writes ``report.json`` + ``predictions.npz``.

    python benchmarks/peer_workers/mace_worker.py --parts DIR --minutes 10 --out OUT

Training is MACE's own command, ``mace_run_train``, with the settings of MACE's documentation
for revised-MD17 molecules (E0s "average", 2 interactions, correlation 3, r_max 5 Å, forces
weight 1000 / energy weight 10, batch 5, amsgrad Adam lr 0.01 with ReduceLROnPlateau
(patience 5), EMA 0.99, stage two (SWA) over the last fifth of the epochs), sized for a
2-core CPU: 32 channels with max_L 1 (``32x0e + 32x1o``) instead of 256 channels, which a
2-core machine trains only a handful of epochs of in 10 minutes, and float32 as ours.

Equal time: MACE has no wall-clock limit, and its plateau schedule does not depend on the
number of epochs, so a calibration run of 3 epochs gives the seconds per epoch (validation
included) and the start-up seconds, from the timestamps of MACE's own log; the run then gets
as many epochs as fit ``--minutes``. The validation curve (force MAE against seconds since
the first epoch began) is read from the same log.
"""

from __future__ import annotations

import datetime as dt
import math
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ase_side import measure, worker_arguments, write_report  # noqa: E402

CHANNELS, MAX_L = 32, 1
LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)\.?\d* INFO: (Initial|Epoch (\d+)): "
                  r".*MAE_F=\s*([0-9.]+) meV")


def settings(parts: Path, epochs: int, seed: int) -> list[str]:
    """The ``mace_run_train`` options (see the module docstring)."""
    return [
        "--name", "mace", "--seed", str(seed), "--device", "cpu", "--default_dtype", "float32",
        "--train_file", str(parts / "train.extxyz"), "--valid_file", str(parts / "val.extxyz"),
        "--energy_key", "REF_energy", "--forces_key", "REF_forces", "--E0s", "average",
        "--model", "MACE", "--num_interactions", "2", "--num_channels", str(CHANNELS),
        "--max_L", str(MAX_L), "--correlation", "3", "--r_max", "5.0",
        "--forces_weight", "1000", "--energy_weight", "10", "--batch_size", "5",
        "--valid_batch_size", "10", "--lr", "0.01", "--scheduler_patience", "5",
        "--patience", "1000000", "--eval_interval", "1", "--ema", "--ema_decay", "0.99",
        "--swa", "--start_swa", str(max(1, math.floor(0.8 * epochs))),
        "--max_num_epochs", str(epochs), "--error_table", "TotalMAE",
    ]


def read_log(path: Path) -> list[tuple[float, int, float]]:
    """``(unix time, epoch (-1: before training), validation force MAE meV/Å)`` per line."""
    rows = []
    for line in path.read_text().splitlines():
        m = LINE.match(line)
        if m:
            t = dt.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S").timestamp()
            rows.append((t, -1 if m.group(3) is None else int(m.group(3)), float(m.group(4))))
    return rows


def train(parts: Path, out: Path, epochs: int, seed: int) -> tuple[Path, list, float]:
    """One ``mace_run_train`` in ``out``; ``(model file, log rows, wall seconds, start)``."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    exe = Path(sys.executable).with_name("mace_run_train")
    t0 = time.time()
    with open(out / "stdout.txt", "w") as fh:
        done = subprocess.run([str(exe), *settings(parts, epochs, seed), "--work_dir", str(out)],
                              stdout=fh, stderr=subprocess.STDOUT, cwd=out)
    wall = time.time() - t0
    if done.returncode:
        raise SystemExit(f"mace_run_train failed ({done.returncode}); see {out / 'stdout.txt'}")
    logs = sorted(p for p in (out / "logs").glob("*.log") if not p.stem.endswith("_debug"))
    rows = read_log(logs[-1]) if logs else []
    models = [out / "mace_stagetwo.model", out / "mace.model"]
    model = next((m for m in models if m.is_file()), None)
    if model is None or not rows:
        raise SystemExit(f"mace_run_train wrote no model or no epochs in {out}")
    return model, rows, wall, t0


def main(argv=None) -> int:
    args = worker_arguments(__doc__, argv)
    import ase
    import mace
    import torch

    # calibration: 3 epochs give the start-up and per-epoch seconds
    _, rows, wall, t0 = train(args.parts, args.out / "calibration", 3, args.seed)
    ends = [t for t, e, _ in rows if e >= 0]
    start = [t for t, e, _ in rows if e < 0][0]  # the initial validation, just before epoch 0
    epoch_s = max((ends[-1] - start) / len(ends), 1e-3)
    startup_s = start - t0
    epochs = max(1, math.floor((args.minutes * 60.0) / epoch_s))
    print(f"mace: {epoch_s:.1f} s per epoch, start-up {startup_s:.0f} s -> {epochs} epochs",
          flush=True)
    model, rows, wall, t0 = train(args.parts, args.out / "run", epochs, args.seed)
    start = [t for t, e, _ in rows if e < 0][0]
    curve = [[t - start, f] for t, e, f in rows if e >= 0]
    from mace.calculators import MACECalculator

    calc = MACECalculator(model_paths=str(model), device="cpu", default_dtype="float32")
    n_params = sum(p.numel() for p in torch.load(model, weights_only=False).parameters())
    predictions, md = measure(calc, args.parts, args.md, args.md_steps)
    n_train = sum(1 for line in (args.parts / "train.extxyz").read_text().splitlines()
                  if line.strip().isdigit())
    train_s = curve[-1][0]
    report = {
        "library": "mace", "versions": {"mace-torch": mace.__version__,
                                        "torch": torch.__version__, "ase": ase.__version__},
        "model": f"MACE {CHANNELS}x0e+{CHANNELS}x1o, 2 interactions, correlation 3",
        "params": int(n_params), "settings": settings(args.parts, epochs, args.seed),
        "calibration": {"epoch_seconds": epoch_s, "startup_seconds": startup_s},
        "minutes": args.minutes, "epochs": len(curve), "train_seconds": train_s,
        "wall_seconds": wall,
        "train_frames_per_s": n_train * len(curve) / train_s if train_s > 0 else None,
        "curve": curve, "curve_unit": "meV/Å", "md": md, "model_file": str(model),
        "threads": torch.get_num_threads(),
    }
    print(f"wrote {write_report(args.out, report, predictions)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
