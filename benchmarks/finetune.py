"""Fine-tuning on the SPICE-like set: pretrain on its QM9-like molecules (no sulfur), then
learn the sulfur molecules from 10 % of their frames, fine-tuned against from scratch.

    python -m benchmarks.finetune [--pretrain-min 10] [--minutes 5] [--share 0.1]
        [--model so3krates] [--workdir runs/finetune] [--readout-only]

Both sulfur runs see the same frames (one seeded split of the sulfur half: ``--share`` of it
for training, 5 % for validation, the rest test) for the same minutes
(``--time-budget-min``), with the same model config; the fine-tuned one starts from the
pretrained run (``--init-from``; sulfur gets a fresh embedding and its reference energy is
fitted on the sulfur frames, as for any run). Prints and saves
``benchmarks/results/finetune-<device>-<date>.json`` with both test errors.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

import ase.io
import numpy as np

from benchmarks.common import RESULTS, device_name, machine_info

__all__ = ["halves", "main"]


def halves(frames) -> tuple[np.ndarray, np.ndarray]:
    """Frame indices of the molecules without sulfur and of those with it."""
    frame_of_atom = np.repeat(np.arange(len(frames)), frames.n_atoms)
    has_s = np.zeros(len(frames), bool)
    has_s[frame_of_atom[frames.z == 16]] = True
    return np.flatnonzero(~has_s), np.flatnonzero(has_s)


def _write(frames, index, path: Path) -> Path:
    out = []
    for i in index:
        atoms = frames.atoms(int(i))
        out.append(atoms)
    ase.io.write(path, out, format="extxyz")
    return path


def main(argv=None) -> int:
    from experiments import potential
    from experiments.configs.potential import MODEL
    from mpattn.data.frames import read_frames, spice_like_xtb_path
    from mpattn.models import model_names

    p = argparse.ArgumentParser(prog="python -m benchmarks.finetune",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--pretrain-min", type=float, default=10.0)
    p.add_argument("--minutes", type=float, default=5.0, help="each sulfur run's budget")
    p.add_argument("--share", type=float, default=0.1, help="training share of the sulfur half")
    p.add_argument("--model", default=MODEL, choices=model_names(),
                   help=f"every run's model (default {MODEL}, experiments.potential's)")
    p.add_argument("--workdir", default="runs/finetune")
    p.add_argument("--readout-only", action="store_true",
                   help="also fine-tune the readout alone (the rest frozen)")
    args = p.parse_args(argv)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    frames = read_frames(spice_like_xtb_path())
    plain, sulfur = halves(frames)
    qm9_file = _write(frames, plain, work / "qm9_like.extxyz")
    s_file = _write(frames, sulfur, work / "sulfur.extxyz")
    common = ["--model", args.model, "--no-md", "--no-progress", "--unseen-molecules", "0"]
    runs = {"pretrain": ["--data", str(qm9_file), "--time-budget-min", str(args.pretrain_min),
                         "--train-size", "0.9", "--val-size", "0.05"]}
    sulfur_split = ["--data", str(s_file), "--time-budget-min", str(args.minutes),
                    "--train-size", str(args.share), "--val-size", "0.05"]
    runs["scratch"] = sulfur_split
    runs["finetuned"] = sulfur_split + ["--init-from", str(work / "pretrain")]
    if args.readout_only:
        runs["readout_only"] = runs["finetuned"] + ["--train-only-readout"]
    results = {}
    for name, options in runs.items():
        print(f"== {name}: python -m experiments.potential {' '.join(options + common)}")
        code = potential.main(options + common + ["--workdir", str(work / name)])
        if code:
            return code
        r = json.loads((work / name / "results.json").read_text())
        results[name] = {"test": {k: r["test"][k] for k in (
            "energy_mae_mev", "energy_mae_mev_per_atom", "force_mae_mev_ang",
            "force_rmse_mev_ang", "n_structures")}, "epochs": r["epochs"],
            "train_seconds": r["train_seconds"], "split_sizes": r["split_sizes"],
            "options": options}
    for name, r in results.items():
        t = r["test"]
        print(f"{name:<13} {t['force_mae_mev_ang']:8.2f} meV/Å  {t['energy_mae_mev_per_atom']:7.3f}"
              f" meV/atom  ({r['epochs']} epochs, {r['train_seconds'] / 60:.1f} min, "
              f"{r['split_sizes']['train']} training frames)")
    out = RESULTS / f"finetune-{device_name()}-{dt.date.today().isoformat()}.json"
    out.write_text(json.dumps({"command": "python -m benchmarks.finetune " + " ".join(
        sys.argv[1:] if argv is None else argv), "machine": machine_info(), "molecules": {
            "qm9_like": sorted(set(frames.molecules[plain])),
            "sulfur": sorted(set(frames.molecules[sulfur]))}, "runs": results}, indent=1) + "\n")
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
