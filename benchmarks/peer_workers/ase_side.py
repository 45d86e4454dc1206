"""What every library is measured through: its ASE calculator. Needs only ase and numpy, so
that the peers' own virtual environments run it (``benchmarks/peers_potentials.py`` runs the
workers there) and ours imports the same code.

- :func:`predict`: energy and forces of every frame of a file, one calculator call each;
- :func:`md_speed`: velocity-Verlet NVE steps/s through the calculator after a warm-up;
- :func:`write_report`: the worker's report, ``report.json`` + ``predictions.npz``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

__all__ = ["md_speed", "predict", "write_report"]


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
