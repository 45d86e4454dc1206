"""Generate an energy/force dataset by Langevin MD with GFN2-xTB (tblite), written as extxyz.

    python -m experiments.make_xtb_dataset --molecule ethanol --frames 2000 --temperature 500
    python -m experiments.make_xtb_dataset --molecule CH3OH --frames 100 --output methanol.xyz

The start geometry is ``ase.build.molecule(name)`` (G2 names such as ``CH3CH2OH``, or a common
name from ``ALIASES``). Velocities are drawn from a Maxwell-Boltzmann distribution at the
temperature, the system is equilibrated with a Langevin thermostat, then every ``--interval``
steps one frame is kept with its GFN2-xTB energy (eV) and forces (eV/Å). Every frame's
comment line records the settings (method, temperature, timestep, interval, friction, seed,
tblite and ase versions) and its MD step. An output ending in ``.gz`` is gzip-compressed
(reproducibly: no time stamp in the header). Needs the ``xtb`` extra: ``pip install -e ".[xtb]"``.
"""

from __future__ import annotations

import argparse
import gzip
import io
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np

__all__ = ["ALIASES", "generate", "main", "start_geometry", "write_frames"]

DEFAULT_OUTPUT = "mpattn/data/files/{molecule}_xtb.extxyz.gz"
# Common names -> ase.build.molecule names (the G2 set uses formulas).
ALIASES = {
    "ethanol": "CH3CH2OH",
    "methanol": "CH3OH",
    "water": "H2O",
    "ammonia": "NH3",
    "methane": "CH4",
    "ethane": "C2H6",
    "ethylene": "C2H4",
    "acetylene": "C2H2",
    "formaldehyde": "H2CO",
    "formic_acid": "HCOOH",
    "acetic_acid": "CH3COOH",
    "acetaldehyde": "CH3CHO",
    "benzene": "C6H6",
    "dimethyl_ether": "CH3OCH3",
}


def start_geometry(name: str):
    """``ase.build.molecule`` for a G2 name or an alias of ``ALIASES``.

    Raises:
        ValueError: For a name ASE does not know (the message lists a few that it does).
    """
    from ase.build import molecule
    from ase.collections import g2

    try:
        return molecule(ALIASES.get(name.lower(), name))
    except KeyError:
        few = ", ".join(list(ALIASES) + sorted(g2.names)[:10])
        raise ValueError(f"unknown molecule {name!r}: use a name of ase.build.molecule (the G2 "
                         f"set, {len(g2.names)} names) or an alias, e.g. {few}, ...") from None


def _tblite_calculator():
    try:
        from tblite.ase import TBLite
    except ImportError as exc:
        raise ImportError(
            "the GFN2-xTB generator needs the tblite package: pip install -e \".[xtb]\" "
            "(or pip install tblite)"
        ) from exc
    return TBLite(method="GFN2-xTB", verbosity=0)


def generate(name: str, frames: int, temperature: float, *, interval: int = 10,
             timestep: float = 0.5, friction: float = 0.01, equilibration: int = 500,
             seed: int = 0, progress: bool = True) -> list:
    """Langevin MD with GFN2-xTB; returns ``frames`` ``ase.Atoms`` with energies and forces.

    Args:
        name: Molecule (see :func:`start_geometry`).
        frames: Frames to keep.
        temperature: Thermostat and initial temperature in K.
        interval: MD steps between kept frames.
        timestep: MD time step in fs.
        friction: Langevin friction in 1/fs.
        equilibration: MD steps run before the first kept frame.
        seed: Seed of the velocities and of the thermostat noise.
        progress: Show a tqdm progress bar.

    Returns:
        Frames (``ase.Atoms`` without momenta) with a SinglePointCalculator holding ``energy``
        (eV) and ``forces`` (eV/Å), and ``info`` holding the settings and the MD step.
    """
    from ase import Atoms, units
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.constraints import FixCom
    from ase.md import velocitydistribution as vd
    from ase.md.langevin import Langevin
    from tqdm import tqdm

    if frames < 1 or interval < 1 or equilibration < 0:
        raise ValueError("need frames >= 1, interval >= 1 and equilibration >= 0")
    atoms = start_geometry(name)
    atoms.calc = _tblite_calculator()
    rng = np.random.default_rng(seed)
    if hasattr(vd, "thermalize_momenta"):  # ase >= 3.29
        vd.thermalize_momenta(atoms, temperature, rng=rng)
    else:
        vd.MaxwellBoltzmannDistribution(atoms, temperature_K=temperature, rng=rng)
    vd.Stationary(atoms)
    atoms.set_constraint(FixCom())  # instead of Langevin's deprecated fixcm=True
    dyn = Langevin(atoms, timestep=timestep * units.fs, temperature_K=temperature,
                   friction=friction / units.fs, fixcm=False, rng=rng)
    settings = {
        "method": "GFN2-xTB",
        "molecule": name,
        "temperature_K": float(temperature),
        "timestep_fs": float(timestep),
        "interval": int(interval),
        "friction_per_fs": float(friction),
        "equilibration": int(equilibration),
        "seed": int(seed),
        "tblite_version": metadata.version("tblite"),
        "ase_version": metadata.version("ase"),
    }
    out = []
    with tqdm(total=equilibration + frames * interval, unit="step", disable=not progress,
              desc=f"{name} GFN2-xTB {temperature:g} K") as bar:
        if equilibration:
            dyn.run(equilibration)
            bar.update(equilibration)
        step = equilibration
        for _ in range(frames):
            dyn.run(interval)
            step += interval
            bar.update(interval)
            frame = Atoms(numbers=atoms.numbers, positions=atoms.positions)
            frame.info.update(settings, step=step)
            # raw forces: FixCom would project them (mass-weighted sum zero) otherwise
            forces = atoms.get_forces(apply_constraint=False).copy()
            frame.calc = SinglePointCalculator(frame, energy=atoms.get_potential_energy(),
                                               forces=forces)
            out.append(frame)
    return out


def write_frames(path, frames) -> Path:
    """Writes frames as extxyz; gzip-compressed (mtime 0, reproducible) when ``path`` ends .gz."""
    import ase.io

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    ase.io.write(buf, frames, format="extxyz")
    data = buf.getvalue().encode()
    if path.suffix == ".gz":
        with open(path, "wb") as fh, gzip.GzipFile(filename="", mode="wb", fileobj=fh,
                                                   compresslevel=9, mtime=0) as gz:
            gz.write(data)
    elif path.suffix in (".bz2", ".xz"):
        ase.io.write(path, frames, format="extxyz")
    else:
        path.write_bytes(data)
    return path


def summarize(frames) -> dict:
    """Energy range, largest force and frames whose covalent bonds differ from the first's."""
    from mpattn.data.frames import covalent_bonds

    e = np.array([f.get_potential_energy() for f in frames])
    fmax = max(float(np.abs(f.get_forces()).max()) for f in frames)
    ref = covalent_bonds(frames[0].numbers, frames[0].positions)
    broken = [i for i, f in enumerate(frames)
              if not np.array_equal(covalent_bonds(f.numbers, f.positions), ref)]
    return {"energy_min_eV": float(e.min()), "energy_max_eV": float(e.max()),
            "energy_std_eV": float(e.std()), "max_abs_force_eV_A": fmax,
            "frames_with_changed_bonds": broken}


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m experiments.make_xtb_dataset",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--molecule", default="ethanol", help="ase.build.molecule name or alias")
    ap.add_argument("--frames", type=int, default=2000)
    ap.add_argument("--temperature", type=float, default=500.0, help="K")
    ap.add_argument("--interval", type=int, default=50,
                    help="MD steps between frames (50 x 0.5 fs: 25 fs apart)")
    ap.add_argument("--timestep", type=float, default=0.5, help="fs")
    ap.add_argument("--friction", type=float, default=0.01, help="Langevin friction, 1/fs")
    ap.add_argument("--equilibration", type=int, default=500, help="MD steps before frame 1")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", help=f"extxyz file (default {DEFAULT_OUTPUT})")
    ap.add_argument("--no-progress", action="store_true")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    output = args.output or DEFAULT_OUTPUT.format(molecule=args.molecule.lower())
    try:
        start_geometry(args.molecule)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        frames = generate(args.molecule, args.frames, args.temperature,
                          interval=args.interval, timestep=args.timestep,
                          friction=args.friction, equilibration=args.equilibration,
                          seed=args.seed, progress=not args.no_progress)
    except (ImportError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    wall = time.perf_counter() - t0
    path = write_frames(output, frames)
    s = summarize(frames)
    print(f"wrote {len(frames)} frames to {path} ({path.stat().st_size / 1024:.0f} kB) in "
          f"{wall:.1f} s; energy {s['energy_min_eV']:.3f} .. {s['energy_max_eV']:.3f} eV "
          f"(std {s['energy_std_eV'] * 1000:.0f} meV), max |F| {s['max_abs_force_eV_A']:.2f} "
          f"eV/Å, {len(s['frames_with_changed_bonds'])} frame(s) with changed bonds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
