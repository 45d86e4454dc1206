r"""Generate an energy/force dataset by Langevin MD with GFN2-xTB (tblite), written as extxyz.

    python -m experiments.make_xtb_dataset --molecule ethanol --frames 2000 --temperature 500
    python -m experiments.make_xtb_dataset --molecule CH3OH --frames 100 --output methanol.xyz
    python -m experiments.make_xtb_dataset --set spice_like --molecules thiophene,urea

The start geometry is ``ase.build.molecule(name)`` (G2 names such as ``CH3CH2OH``, or a common
name from ``ALIASES``). Velocities are drawn from a Maxwell-Boltzmann distribution at the
temperature, the system is equilibrated with a Langevin thermostat, then every ``--interval``
steps one frame is kept with its GFN2-xTB energy (eV) and forces (eV/Å). Every frame's
comment line records the settings (method, temperature, timestep, interval, friction, seed,
tblite and ase versions) and its MD step. An output ending in ``.gz`` is gzip-compressed
(reproducibly: no time stamp in the header). Needs the ``xtb`` extra: ``pip install -e ".[xtb]"``.

``--set spice_like`` runs the same MD for each molecule of ``SPICE_LIKE``
(``experiments/spice_like_molecules.py``: name -> SMILES and group, "sulfur" or "qm9"), one
molecule after another into one file, ``--frames-per-molecule`` frames each (``--molecules
a,b`` for a subset). Start geometries come from RDKit: hydrogens added, ETKDG embedding with
seed ``EMBED_SEED``, MMFF optimisation. Frames also carry ``smiles``, ``group``,
``embed_seed`` and ``rdkit_version``; every molecule uses the same ``--seed``.

An xTB failure (e.g. SCF not converged) is never skipped or retried: it raises a RuntimeError
naming the molecule and the MD step, and nothing is written.

The set ``mpattn/data/files/spice_like_xtb.extxyz.gz`` (44 molecules x 100 frames) was
written by, from the repository root::

    OMP_NUM_THREADS=1 nice -n 10 python -m experiments.make_xtb_dataset --set spice_like \
        --frames-per-molecule 100 --interval 50 --equilibration 500 --temperature 500 \
        --seed 0 --output mpattn/data/files/spice_like_xtb.extxyz.gz

It took 12 min 56 s wall (773 s of MD; 673 s user CPU) on the 2-core AMD EPYC development
machine, one thread (OMP_NUM_THREADS=1), with other tests sharing the cores; 4,400 frames, 6 to
23 atoms per molecule, 1.7 MB, no frame with changed covalent bonds. One GFN2-xTB force call
takes about 10 ms for the 20-atom methionine (1 ms for 6 atoms); --interval 50 (25 fs between
frames, the most allowed) already leaves the set below the 30-40 min budget.
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

from experiments.spice_like_molecules import GROUPS, SPICE_LIKE

__all__ = ["ALIASES", "GROUPS", "SPICE_LIKE", "generate", "generate_set", "main",
           "smiles_geometry", "start_geometry", "write_frames"]

DEFAULT_OUTPUT = "mpattn/data/files/{molecule}_xtb.extxyz.gz"
SETS = {"spice_like": SPICE_LIKE}
EMBED_SEED = 42  # ETKDG seed of the SMILES start geometries
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


def smiles_geometry(name: str, smiles: str, seed: int | None = None):
    """``ase.Atoms`` from a SMILES: RDKit with hydrogens, ETKDG embedding, MMFF optimisation.

    Args:
        name: Molecule name (only for error messages).
        smiles: SMILES string.
        seed: ETKDG random seed (default ``EMBED_SEED``), so the geometry is reproducible.

    Raises:
        ValueError: Naming the molecule and the SMILES, when RDKit cannot parse it, embed it
            or find MMFF parameters for it.
    """
    from ase import Atoms
    from rdkit import Chem
    from rdkit.Chem import AllChem

    mol = Chem.MolFromSmiles(smiles)
    if mol is None:
        raise ValueError(f"molecule {name!r}: RDKit cannot parse SMILES {smiles!r}")
    mol = Chem.AddHs(mol)
    params = AllChem.ETKDGv3()
    params.randomSeed = EMBED_SEED if seed is None else int(seed)
    if AllChem.EmbedMolecule(mol, params) != 0:
        raise ValueError(f"molecule {name!r}: ETKDG embedding of SMILES {smiles!r} failed")
    if not AllChem.MMFFHasAllMoleculeParams(mol):
        raise ValueError(f"molecule {name!r}: no MMFF parameters for SMILES {smiles!r}")
    AllChem.MMFFOptimizeMolecule(mol, maxIters=2000)
    return Atoms(numbers=[a.GetAtomicNum() for a in mol.GetAtoms()],
                 positions=mol.GetConformer().GetPositions())


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
             seed: int = 0, progress: bool = True, atoms=None, info: dict | None = None,
             leave: bool = True) -> list:
    """Langevin MD with GFN2-xTB; returns ``frames`` ``ase.Atoms`` with energies and forces.

    Args:
        name: Molecule: its start geometry is :func:`start_geometry` unless ``atoms`` is given.
        frames: Frames to keep.
        temperature: Thermostat and initial temperature in K.
        interval: MD steps between kept frames.
        timestep: MD time step in fs.
        friction: Langevin friction in 1/fs.
        equilibration: MD steps run before the first kept frame.
        seed: Seed of the velocities and of the thermostat noise.
        progress: Show a tqdm progress bar.
        atoms: Start geometry (``ase.Atoms``, copied; e.g. :func:`smiles_geometry`).
        info: Extra entries for every frame's ``info`` (e.g. ``smiles``, ``group``).
        leave: Keep the progress bar on the screen when done.

    Returns:
        Frames (``ase.Atoms`` without momenta) with a SinglePointCalculator holding ``energy``
        (eV) and ``forces`` (eV/Å), and ``info`` holding the settings and the MD step.

    Raises:
        RuntimeError: When the xTB calculation of an MD step fails (e.g. SCF not converged)
            or gives a non-finite energy or force; the message names the molecule and the step.
            Nothing is retried or skipped.
    """
    from ase import Atoms, units
    from ase.calculators.calculator import CalculationFailed
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.constraints import FixCom
    from ase.md import velocitydistribution as vd
    from ase.md.langevin import Langevin
    from tqdm import tqdm

    if frames < 1 or interval < 1 or equilibration < 0:
        raise ValueError("need frames >= 1, interval >= 1 and equilibration >= 0")
    atoms = start_geometry(name) if atoms is None else atoms.copy()
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
        **(info or {}),
    }

    def run(steps):
        try:
            dyn.run(steps)
        except CalculationFailed as exc:
            raise RuntimeError(f"GFN2-xTB failed for molecule {name!r} at MD step "
                               f"{dyn.nsteps + 1}: {exc}") from exc

    out = []
    with tqdm(total=equilibration + frames * interval, unit="step", disable=not progress,
              desc=f"{name} GFN2-xTB {temperature:g} K", leave=leave) as bar:
        if equilibration:
            run(equilibration)
            bar.update(equilibration)
        step = equilibration
        for _ in range(frames):
            run(interval)
            step += interval
            bar.update(interval)
            frame = Atoms(numbers=atoms.numbers, positions=atoms.positions)
            frame.info.update(settings, step=step)
            # raw forces: FixCom would project them (mass-weighted sum zero) otherwise
            forces = atoms.get_forces(apply_constraint=False).copy()
            energy = atoms.get_potential_energy()
            if not (np.isfinite(energy) and np.isfinite(forces).all()):
                raise RuntimeError(f"GFN2-xTB gave a non-finite energy or force for molecule "
                                   f"{name!r} at MD step {step}")
            frame.calc = SinglePointCalculator(frame, energy=energy, forces=forces)
            out.append(frame)
    return out


def generate_set(names=None, frames_per_molecule: int = 100, temperature: float = 500.0, *,
                 molecules: dict | None = None, progress: bool = True, **md) -> list:
    """:func:`generate` for each molecule of a SMILES list, frames one molecule after another.

    Args:
        names: Molecules to run, in this order (default: all of ``molecules``).
        frames_per_molecule: Frames kept per molecule.
        temperature: K.
        molecules: ``name -> (smiles, group)`` (default :data:`SPICE_LIKE`).
        progress: tqdm bars over the molecules and over each molecule's MD steps.
        **md: ``interval``, ``timestep``, ``friction``, ``equilibration``, ``seed`` of
            :func:`generate` (the same seed for every molecule, so a molecule's frames do
            not depend on which others are run).

    Every frame's ``info`` has ``molecule``, ``smiles`` and ``group`` besides the settings.
    All start geometries are built (and checked) before the first MD step.

    Raises:
        ValueError: For a name not in ``molecules`` or a SMILES RDKit cannot embed.
        RuntimeError: When xTB fails on an MD step (see :func:`generate`).
    """
    from tqdm import tqdm

    molecules = SPICE_LIKE if molecules is None else molecules
    names = list(molecules) if names is None else list(names)
    unknown = [n for n in names if n not in molecules]
    if unknown:
        raise ValueError(f"unknown molecule(s) {', '.join(map(repr, unknown))}; the set has "
                         f"{', '.join(molecules)}")
    starts = {n: smiles_geometry(n, molecules[n][0]) for n in names}
    out = []
    for name in tqdm(names, unit="mol", disable=not progress, desc="molecules"):
        smiles, group = molecules[name]
        out += generate(name, frames_per_molecule, temperature, atoms=starts[name],
                        info={"smiles": smiles, "group": group,
                              "embed_seed": EMBED_SEED,
                              "rdkit_version": metadata.version("rdkit")},
                        progress=progress, leave=False, **md)
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
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--molecule", help="ase.build.molecule name or alias (default ethanol)")
    which.add_argument("--set", choices=sorted(SETS),
                       help="a SMILES set instead of one molecule (spice_like: "
                            f"{len(SPICE_LIKE)} molecules, groups {', '.join(GROUPS)})")
    ap.add_argument("--molecules", help="with --set: only these, comma-separated names")
    ap.add_argument("--frames", type=int, default=2000, help="frames (--molecule)")
    ap.add_argument("--frames-per-molecule", type=int, default=100, help="frames per molecule "
                    "(--set)")
    ap.add_argument("--temperature", type=float, default=500.0, help="K")
    ap.add_argument("--interval", type=int, default=50,
                    help="MD steps between frames (50 x 0.5 fs: 25 fs apart)")
    ap.add_argument("--timestep", type=float, default=0.5, help="fs")
    ap.add_argument("--friction", type=float, default=0.01, help="Langevin friction, 1/fs")
    ap.add_argument("--equilibration", type=int, default=500, help="MD steps before frame 1")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", help=f"extxyz file (default {DEFAULT_OUTPUT}, {{molecule}} "
                    "the molecule or set name)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.molecules and not args.set:
        ap.error("--molecules needs --set")
    if not args.set and args.molecule is None:
        args.molecule = "ethanol"
    return args


def _print_summary(path, frames, wall) -> None:
    s = summarize(frames)
    print(f"wrote {len(frames)} frames to {path} ({path.stat().st_size / 1024:.0f} kB) in "
          f"{wall:.1f} s; energy {s['energy_min_eV']:.3f} .. {s['energy_max_eV']:.3f} eV "
          f"(std {s['energy_std_eV'] * 1000:.0f} meV), max |F| {s['max_abs_force_eV_A']:.2f} "
          f"eV/Å, {len(s['frames_with_changed_bonds'])} frame(s) with changed bonds")


def _main_set(args) -> int:
    molecules = SETS[args.set]
    names = [n.strip() for n in args.molecules.split(",") if n.strip()] if args.molecules \
        else None
    output = args.output or DEFAULT_OUTPUT.format(molecule=args.set)
    md = {"interval": args.interval, "timestep": args.timestep, "friction": args.friction,
          "equilibration": args.equilibration, "seed": args.seed}
    t0 = time.perf_counter()
    try:
        frames = generate_set(names, args.frames_per_molecule, args.temperature,
                              molecules=molecules, progress=not args.no_progress, **md)
    except (ImportError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    wall = time.perf_counter() - t0
    path = write_frames(output, frames)
    by_name: dict[str, list] = {}
    for f in frames:
        by_name.setdefault(f.info["molecule"], []).append(f)
    for name, fs in by_name.items():
        s = summarize(fs)
        print(f"{name:30s} {fs[0].info['group']:6s} {len(fs[0]):3d} atoms {len(fs):4d} frames "
              f"E std {s['energy_std_eV'] * 1000:5.0f} meV max|F| "
              f"{s['max_abs_force_eV_A']:5.2f} eV/Å changed bonds in "
              f"{len(s['frames_with_changed_bonds'])} frame(s)")
    sizes = [len(fs[0]) for fs in by_name.values()]
    print(f"wrote {len(frames)} frames of {len(by_name)} molecules ({min(sizes)}-{max(sizes)} "
          f"atoms) to {path} ({path.stat().st_size / 1024:.0f} kB) in {wall:.1f} s")
    return 0


def main(argv=None) -> int:
    args = parse(argv)
    if args.set:
        return _main_set(args)
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
    _print_summary(path, frames, wall)
    return 0


if __name__ == "__main__":
    sys.exit(main())
