"""Reading structures with reference energies, forces and stress, and splitting them.

Readers return a :class:`~mpattn.data.frameset.FrameSet` (re-exported here):
:func:`read_extxyz` (anything ``ase.io`` reads: extended XYZ, ASE databases, trajectories;
compressed ``.gz``/``.bz2``/``.xz`` included), :func:`read_rmd17` (the revised MD17 ``.npz``,
kcal/mol converted to eV with ``ase.units``) and :func:`read_frames`, which picks one by suffix
and converts units (:data:`ENERGY_UNITS`, :data:`LENGTH_UNITS`). Splits:
:func:`split_frames` (seeded, by frame; the rMD17 protocol is 950 / 50 / the rest) and
:func:`split_molecules` (whole molecules held out, for errors on unseen molecules).
Bundled sets: :func:`ethanol_xtb_path`, :func:`spice_like_xtb_path`.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from mpattn.data.frameset import FrameSet

__all__ = [
    "ENERGY_UNITS",
    "LENGTH_UNITS",
    "FrameSet",
    "covalent_bonds",
    "ethanol_xtb_path",
    "read_extxyz",
    "read_frames",
    "read_rmd17",
    "spice_like_xtb_path",
    "split_frames",
    "split_molecules",
]

ETHANOL_XTB = "ethanol_xtb.extxyz.gz"
SPICE_LIKE_XTB = "spice_like_xtb.extxyz.gz"
RMD17_KEYS = ("nuclear_charges", "coords", "energies", "forces")
_COMPRESSED = (".gz", ".bz2", ".xz")


def _units():
    from ase import units

    energy = {"eV": 1.0, "meV": 1e-3, "Hartree": units.Hartree, "kcal/mol": units.kcal / units.mol,
              "kJ/mol": units.kJ / units.mol}
    return energy, {"Ang": 1.0, "Bohr": units.Bohr, "nm": 10.0}


#: energy unit name -> eV (CODATA values of ``ase.units``)
ENERGY_UNITS: dict[str, float] = _units()[0]
#: length unit name -> Å
LENGTH_UNITS: dict[str, float] = _units()[1]


def _bundled(name: str) -> Path:
    from importlib import resources

    return Path(str(resources.files("mpattn.data").joinpath("files", name)))


def ethanol_xtb_path() -> Path:
    """The bundled GFN2-xTB ethanol set: 2000 frames of Langevin MD at 500 K (0.5 fs steps,
    one frame every 50 steps: 25 fs apart over 50 ps), energies in eV, forces in eV/Å, made by
    ``python -m experiments.make_xtb_dataset --molecule ethanol --frames 2000
    --temperature 500``. Read it with :func:`read_frames`.
    """
    return _bundled(ETHANOL_XTB)


def spice_like_xtb_path() -> Path:
    """The bundled SPICE-like GFN2-xTB set: Langevin MD at 500 K of drug-like fragments with
    C, H, N, O and S, about 100 frames per molecule, each frame labelled with its
    ``molecule``, ``smiles`` and ``group`` (``sulfur`` or ``qm9``); made by
    ``python -m experiments.make_xtb_dataset --set spice_like`` (its docstring has the exact
    command). Read it with :func:`read_frames`.
    """
    return _bundled(SPICE_LIKE_XTB)


def _check_file(path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    return path


def _frame_value(atoms, key: str | None, store: dict, getter, default_key: str):
    """A frame's energy, forces or stress: ``store[key]`` (info/arrays) or the calculator's
    result; ``(value or None, whether the key was found)``."""
    from ase.calculators.calculator import PropertyNotImplementedError

    if key is not None:
        if key in store:
            return store[key], True
        # ase's extxyz reader moves keys such as energy/forces into a SinglePointCalculator
        value = None if atoms.calc is None else atoms.calc.results.get(key)
        return value, value is not None
    if atoms.calc is None or default_key not in atoms.calc.results:
        return None, False
    try:
        return getter(), True
    except (PropertyNotImplementedError, RuntimeError):
        return None, False


def _keys_of(atoms) -> str:
    calc = sorted(atoms.calc.results) if atoms.calc is not None else []
    return (f"info keys {sorted(atoms.info)}, array keys {sorted(atoms.arrays)}, calculator "
            f"results {calc}")


def _warn_rejected(source: str, rejected: list[tuple[int, str]], total: int) -> None:
    if not rejected:
        return
    shown = "; ".join(f"frame {i}: {why}" for i, why in rejected[:5])
    more = f"; ... ({len(rejected) - 5} more)" if len(rejected) > 5 else ""
    warnings.warn(f"{source}: {len(rejected)} of {total} frame(s) rejected: {shown}{more}",
                  stacklevel=4)


def read_extxyz(path, *, energy_key: str | None = None, forces_key: str | None = None,
                stress_key: str | None = None, molecule_key: str = "molecule",
                format: str = "extxyz") -> FrameSet:
    """Reads frames with energies (forces, stress) from a file through ``ase.io``.

    Energies/forces/stress come from each frame's SinglePointCalculator (which ase fills from
    the keys ``energy``/``forces``/``stress``) or, when keys are given, from
    ``atoms.info[energy_key]`` / ``atoms.arrays[forces_key]`` / ``atoms.info[stress_key]``
    (e.g. ``REF_energy``/``REF_forces``). Stress may be Voigt (6) or full (9 or 3×3), eV/Å³,
    ASE's sign (positive under tension); frames without one get NaN. ``info[molecule_key]``
    labels each frame's molecule (default: its formula). Compressed files (``.gz``, ``.bz2``,
    ``.xz``) are read transparently.

    A frame without a finite energy, or without finite forces of shape [n, 3] while other
    frames have forces, is not loaded: it is listed in ``FrameSet.rejected`` and one warning
    names the file, the frame indices and the problems.

    Args:
        path: The file.
        energy_key: ``info`` key of the energy in eV (default: the calculator's energy).
        forces_key: per-atom array key of the forces in eV/Å (default: the calculator's).
        stress_key: ``info`` key of the stress (default: the calculator's, if any).
        molecule_key: ``info`` key of the molecule label.
        format: ``ase.io`` format name (``extxyz``; :func:`read_frames` passes others).

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If no frame of the file is usable, or a key given is in no frame (the
            message names the file and the keys the first frame has).
    """
    path = _check_file(path)
    source = str(path)
    keys = {"energy": energy_key, "forces": forces_key, "stress": stress_key,
            "molecule": molecule_key}
    with _seekable(path) as fh:
        return _read_ase(fh, source, format, keys)


@contextmanager
def _seekable(path: Path):
    """The file name, or for .gz/.bz2/.xz its text decompressed once into a temporary file.

    ase's extxyz reader seeks back to the start of every frame; on a compressed stream each
    backward seek decompresses from the beginning again (quadratic: 18 s for 2000 frames of
    9 atoms, 0.5 s after decompressing once).
    """
    opener = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}.get(path.suffix.lower())
    if opener is None:  # ase opens it (in binary mode for binary formats)
        yield str(path)
        return
    with opener(path, "rt") as src, tempfile.TemporaryFile("w+") as tmp:
        shutil.copyfileobj(src, tmp)
        tmp.seek(0)
        yield tmp


def _stress_3x3(value) -> np.ndarray:
    from ase.stress import voigt_6_to_full_3x3_stress

    v = np.asarray(value, np.float64).ravel()
    if v.size == 6:
        return voigt_6_to_full_3x3_stress(v)
    if v.size == 9:
        return v.reshape(3, 3)
    raise ValueError(f"stress of {v.size} values (expected 6 Voigt or 9)")


def _read_ase(fh, source: str, format: str, keys: dict) -> FrameSet:
    import ase.io

    kept, energies, forces, stresses, labels, rejected = [], [], [], [], [], []
    found = {"energy": False, "forces": False, "stress": False}
    total, first = 0, None
    for i, atoms in enumerate(ase.io.iread(fh, format=format, index=":")):
        total += 1
        first = atoms if first is None else first
        e, ok = _frame_value(atoms, keys["energy"], atoms.info, atoms.get_potential_energy,
                             "energy")
        found["energy"] |= ok
        if e is None:
            rejected.append((i, f"no energy ({keys['energy'] or 'energy'})"))
            continue
        try:
            e = float(e)
        except (TypeError, ValueError):
            rejected.append((i, f"energy is not a number: {e!r}"))
            continue
        if not np.isfinite(e):
            rejected.append((i, f"non-finite energy ({e})"))
            continue
        f, ok = _frame_value(atoms, keys["forces"], atoms.arrays, atoms.get_forces, "forces")
        found["forces"] |= ok
        if f is not None:
            f = np.asarray(f, dtype=np.float64)
            if f.shape != (len(atoms), 3):
                rejected.append((i, f"forces of shape {f.shape} for {len(atoms)} atoms"))
                continue
            if not np.all(np.isfinite(f)):
                rejected.append((i, "non-finite forces"))
                continue
        st, ok = _frame_value(atoms, keys["stress"], atoms.info, atoms.get_stress, "stress")
        found["stress"] |= ok
        if st is not None:
            try:
                st = _stress_3x3(st)
            except (TypeError, ValueError) as err:
                rejected.append((i, f"{keys['stress'] or 'stress'}: {err}"))
                continue
            if not np.all(np.isfinite(st)):
                rejected.append((i, "non-finite stress"))
                continue
        kept.append((i, atoms))
        energies.append(e)
        forces.append(f)
        stresses.append(np.full((3, 3), np.nan) if st is None else st)
        label = atoms.info.get(keys["molecule"])
        labels.append(None if label is None else str(label))
    for name in ("energy", "forces", "stress"):
        if keys[name] is not None and not found[name] and first is not None:
            raise ValueError(f"{source}: no frame has the {name} key {keys[name]!r}; frame 0 "
                             f"has {_keys_of(first)}")
    has_forces = [f is not None for f in forces]
    if any(has_forces) and not all(has_forces):  # forces are all or nothing
        keep = []
        for (i, atoms), e, f, st, lab in zip(kept, energies, forces, stresses, labels,
                                             strict=True):
            if f is None:
                rejected.append((i, f"no forces ({keys['forces'] or 'forces'}) while others "
                                 "have"))
            else:
                keep.append(((i, atoms), e, f, st, lab))
        kept, energies, forces, stresses, labels = (list(t) for t in zip(*keep, strict=True))
        rejected.sort()
    _warn_rejected(source, rejected, total)
    if not kept:
        why = f"; first problem: frame {rejected[0][0]}: {rejected[0][1]}" if rejected else ""
        raise ValueError(f"{source}: no usable frame with an energy ({total} frame(s) read){why}")
    z = [a.get_atomic_numbers() for _, a in kept]
    if any(lab is None for lab in labels):
        from mpattn.data.frameset import hill_formula

        labels = [hill_formula(zi) if lab is None else lab
                  for zi, lab in zip(z, labels, strict=True)]
    stress = np.stack(stresses)
    return FrameSet(
        n_atoms=[len(a) for _, a in kept],
        z=np.concatenate(z),
        positions=np.concatenate([a.get_positions() for _, a in kept]),
        energy=np.asarray(energies),
        forces=np.concatenate(forces) if forces[0] is not None else None,
        stress=stress if np.isfinite(stress).any() else None,
        cell=np.stack([np.asarray(a.get_cell()) for _, a in kept]),
        pbc=np.stack([a.get_pbc() for _, a in kept]),
        ids=[i for i, _ in kept],
        source=source,
        molecules=labels,
        rejected=rejected,
    )


def read_rmd17(path) -> FrameSet:
    """Reads a revised MD17 ``.npz`` file (Christensen & von Lilienfeld 2020).

    Keys: ``nuclear_charges`` int[n], ``coords`` [F, n, 3] Å, ``energies`` [F] kcal/mol and
    ``forces`` [F, n, 3] kcal/mol/Å; energies and forces are converted to eV and eV/Å with
    ``ase.units.kcal / ase.units.mol``. Frame ids are the row indices of the file.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If keys are missing or shapes disagree (the message names the file).
    """
    from ase import units

    path = _check_file(path)
    with np.load(path) as data:
        missing = [k for k in RMD17_KEYS if k not in data.files]
        if missing:
            raise ValueError(f"{path}: not a revised MD17 file: missing key(s) "
                             f"{', '.join(missing)} (has {', '.join(sorted(data.files))})")
        z = np.asarray(data["nuclear_charges"]).reshape(-1)
        coords = np.asarray(data["coords"], dtype=np.float64)
        energies = np.asarray(data["energies"], dtype=np.float64)
        forces = np.asarray(data["forces"], dtype=np.float64)
    n = z.shape[0]
    f = coords.shape[0] if coords.ndim == 3 else -1
    if coords.shape != (f, n, 3) or forces.shape != (f, n, 3) or energies.size != f:
        raise ValueError(f"{path}: inconsistent shapes: nuclear_charges {z.shape}, coords "
                         f"{coords.shape}, energies {energies.shape}, forces {forces.shape}")
    if f == 0:
        raise ValueError(f"{path}: no frames")
    kcal_mol = units.kcal / units.mol
    return FrameSet(
        n_atoms=np.full(f, n),
        z=np.tile(z, f),
        positions=coords.reshape(-1, 3),
        energy=energies.reshape(-1) * kcal_mol,
        forces=forces.reshape(-1, 3) * kcal_mol,
        source=str(path),
    )


def read_frames(path, *, energy_unit: str = "eV", length_unit: str = "Ang",
                **kwargs) -> FrameSet:
    """Reads frames with energies and forces, choosing the reader by the file's suffix, and
    converts them to eV and Å.

    ``.npz``: :func:`read_rmd17` (its units are fixed: kcal/mol and Å);
    ``.xyz``/``.extxyz`` (optionally ``.gz``/``.bz2``/``.xz``): :func:`read_extxyz`; any other
    format ``ase.io`` recognises (``.traj``, ``.db``, ...): :func:`read_extxyz` with that
    format. Keyword arguments go to :func:`read_extxyz`.

    Args:
        path: The file.
        energy_unit: unit of the file's energies, a key of :data:`ENERGY_UNITS` (forces are
            in energy_unit / length_unit, stress in energy_unit / length_unit³).
        length_unit: unit of the file's positions and cells, a key of :data:`LENGTH_UNITS`.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If the format or a unit is not recognised.
    """
    path = _check_file(path)
    if energy_unit not in ENERGY_UNITS:
        raise ValueError(f"--energy-unit {energy_unit!r}: choose one of "
                         f"{', '.join(ENERGY_UNITS)}")
    if length_unit not in LENGTH_UNITS:
        raise ValueError(f"--length-unit {length_unit!r}: choose one of "
                         f"{', '.join(LENGTH_UNITS)}")
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in _COMPRESSED:
        suffixes = suffixes[:-1]
    last = suffixes[-1] if suffixes else ""
    if last == ".npz":
        if kwargs or (energy_unit, length_unit) != ("eV", "Ang"):
            raise ValueError(f"{path}: a revised MD17 .npz has fixed keys and units (kcal/mol, "
                             "Å): leave out the key and unit options")
        return read_rmd17(path)
    if last in (".xyz", ".extxyz"):
        frames = read_extxyz(path, **kwargs)
    else:
        from ase.io.formats import UnknownFileTypeError, filetype

        try:
            fmt = filetype(str(path), guess=False)
        except (UnknownFileTypeError, OSError) as exc:
            raise ValueError(f"{path}: unknown format ({exc}); expected a revised MD17 .npz or "
                             "a file ase.io reads with energies (.extxyz, .xyz, .traj, .db, "
                             "...)") from exc
        frames = read_extxyz(path, format=fmt, **kwargs)
    return frames.scaled(ENERGY_UNITS[energy_unit], LENGTH_UNITS[length_unit])


def split_frames(n: int, n_train: int, n_val: int, seed: int, *,
                 n_test: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A seeded random split of ``n`` frames (rMD17 protocol: 950 / 50 / the rest).

    Args:
        n: Number of frames.
        n_train: Training frames.
        n_val: Validation frames.
        seed: Seed of ``np.random.default_rng``.
        n_test: Test frames (default: all the others).

    Returns:
        Sorted, disjoint int64 index arrays ``(train, val, test)``.
    """
    n_test = n - n_train - n_val if n_test is None else n_test
    if min(n_train, n_val, n_test) < 0 or n_train + n_val + n_test > n:
        raise ValueError(f"cannot split {n} frames into {n_train} training, {n_val} validation "
                         f"and {n_test} test frames")
    perm = np.random.default_rng(seed).permutation(n)
    cuts = np.cumsum([n_train, n_val, n_test])
    return (np.sort(perm[: cuts[0]]), np.sort(perm[cuts[0]: cuts[1]]),
            np.sort(perm[cuts[1]: cuts[2]]))


def split_molecules(molecules, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Whole molecules held out: ``(seen, unseen)`` sorted frame indices, the unseen part all
    frames of ``round(fraction · M)`` of the ``M`` distinct labels (at least one if
    ``fraction > 0``), drawn with ``np.random.default_rng(seed)``.

    Args:
        molecules: str [F], the molecule label of each frame.
        fraction: share of the molecules to hold out, in [0, 1).
        seed: the draw's seed.
    """
    molecules = np.asarray(molecules, dtype=str)
    names = np.unique(molecules)
    if not 0 <= fraction < 1:
        raise ValueError(f"--unseen-molecules {fraction}: the share of molecules held out must "
                         "be in [0, 1)")
    k = 0 if fraction == 0 else max(1, int(round(fraction * len(names))))
    if k >= len(names):
        raise ValueError(f"--unseen-molecules {fraction}: holding out {k} of {len(names)} "
                         "molecule(s) leaves none to train on")
    held = np.random.default_rng(seed).permutation(names)[:k]
    unseen = np.isin(molecules, held)
    return np.flatnonzero(~unseen), np.flatnonzero(unseen)


def covalent_bonds(z, positions, *, scale: float = 1.25) -> np.ndarray:
    """bool[n, n]: pairs closer than ``scale`` times the sum of their covalent radii (ASE's).

    Compare the matrices of two frames to check that a molecule stayed intact in MD.
    """
    from ase.data import covalent_radii

    z = np.asarray(z, dtype=np.int64)
    pos = np.asarray(positions, dtype=np.float64)
    d = np.linalg.norm(pos[:, None] - pos[None], axis=-1)
    r = covalent_radii[z]
    bonded = d < scale * (r[:, None] + r[None])
    np.fill_diagonal(bonded, False)
    return bonded
