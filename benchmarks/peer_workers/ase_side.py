"""What every library is measured through: its ASE calculator. Needs only ase and numpy, so
that the peers' own virtual environments run it (``benchmarks/peers_potentials.py`` runs the
workers there) and ours imports the same code.

- :func:`predict`: energy and forces of every frame of a file, one calculator call each;
- :func:`md_speed`: velocity-Verlet NVE steps/s through the calculator after a warm-up;
- :func:`measure`: both, on the test parts and MD structures a worker was given;
- :func:`write_report`: the worker's report, ``report.json`` + ``predictions.npz``;
- :func:`worker_arguments`: the command line every potential worker takes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

__all__ = ["md_speed", "measure", "predict", "worker_arguments", "write_report"]


def predict(calc, path) -> dict:
    """``{"energy": float64[F] eV, "forces": float64[N, 3] eV/Å, "n_atoms": int[F],
    "seconds"}`` of the frames of ``path`` (any file ``ase.io`` reads), frame by frame."""
    import ase.io

    energy, forces, n_atoms = [], [], []
    t0 = time.perf_counter()
    for atoms in ase.io.read(str(path), index=":"):
        atoms.calc = calc
        energy.append(float(atoms.get_potential_energy()))
        forces.append(np.asarray(atoms.get_forces(), np.float64))
        n_atoms.append(len(atoms))
    return {"energy": np.asarray(energy), "forces": np.concatenate(forces),
            "n_atoms": np.asarray(n_atoms), "seconds": time.perf_counter() - t0}


def md_speed(calc, path, *, steps: int, warmup: int = 5, timestep_fs: float = 0.5,
             temperature_K: float = 300.0, seed: int = 0) -> dict:
    """NVE steps/s of the first structure of ``path`` through ``calc`` (ASE's VelocityVerlet,
    Maxwell-Boltzmann momenta of ``temperature_K`` from ``seed``); ``warmup`` steps first
    (compilation, caches) are not timed."""
    import ase.io
    from ase import units
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
    from ase.md.verlet import VelocityVerlet

    atoms = ase.io.read(str(path), index=0)
    atoms.calc = calc
    MaxwellBoltzmannDistribution(atoms, temperature_K=temperature_K,
                                 rng=np.random.default_rng(seed))
    dyn = VelocityVerlet(atoms, timestep=timestep_fs * units.fs)
    t0 = time.perf_counter()
    dyn.run(warmup)
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    dyn.run(steps)
    seconds = time.perf_counter() - t0
    return {"structure": Path(path).stem, "atoms": len(atoms), "steps": steps,
            "warmup_steps": warmup, "warmup_seconds": warm_s, "seconds": seconds,
            "steps_per_s": steps / seconds, "finite": bool(np.isfinite(
                atoms.get_potential_energy()))}


def write_report(out, report: dict, predictions: dict[str, dict]) -> Path:
    """``out/report.json`` (``report``) and ``out/predictions.npz`` (``<part>_energy``,
    ``<part>_forces``, ``<part>_n_atoms`` for each part predicted)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    arrays = {f"{part}_{k}": v[k] for part, v in predictions.items()
              for k in ("energy", "forces", "n_atoms")}
    np.savez(out / "predictions.npz", **arrays)
    report = dict(report, predict_seconds={p: v["seconds"] for p, v in predictions.items()})
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    return out / "report.json"


def worker_arguments(doc: str, argv=None):
    """The potential workers' options (``--parts``, ``--minutes``, ``--out``, ``--seed``,
    ``--md``, ``--md-steps``), parsed."""
    import argparse

    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--parts", type=Path, required=True, help="train/val/test .extxyz folder")
    ap.add_argument("--minutes", type=float, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--md", type=Path, nargs="*", default=[], help="structures for MD speed")
    ap.add_argument("--md-steps", type=int, default=100)
    return ap.parse_args(argv)


def measure(calc, parts: Path, md: list, md_steps: int) -> tuple[dict, list]:
    """``(predictions of test and test_unseen where written, MD speed rows)`` via ``calc``."""
    predictions = {p: predict(calc, Path(parts) / f"{p}.extxyz")
                   for p in ("test", "test_unseen") if (Path(parts) / f"{p}.extxyz").is_file()}
    return predictions, [md_speed(calc, s, steps=md_steps) for s in md]
