"""Structures with reference energies and forces (for potentials): extended XYZ and rMD17.

A :class:`FrameSet` holds ``F`` frames with ``N`` atoms in total, laid out frame after frame
as a :class:`~mpattn.data.graphset.GraphSet` is (``n_atoms`` per frame, offsets from it):

- ``z``: int32[N] atomic numbers; ``positions``: float64[N, 3] Å
- ``energy``: float64[F] eV; ``forces``: float64[N, 3] eV/Å, or ``None`` when the data has none
- ``cell``: float64[F, 3, 3] Å (zeros for molecules); ``pbc``: bool[F, 3]
- ``ids``: int64[F], the index of each frame in its file; ``source``: the file name
- ``rejected``: ``(frame index, problem)`` for every frame of the file that was not loaded

Readers: :func:`read_extxyz` (anything ``ase.io`` reads, compressed ``.gz``/``.bz2``/``.xz``
included), :func:`read_rmd17` (the revised MD17 ``.npz``, kcal/mol converted to eV with
``ase.units``) and :func:`read_frames`, which picks one by suffix. :meth:`FrameSet.to_graphset`
builds radius graphs for potentials; :func:`split_frames` draws the rMD17-style splits
(950 training, 50 validation, the rest test).
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mpattn.data.graphset import GraphSet, _ranges

__all__ = [
    "FrameSet",
    "covalent_bonds",
    "ethanol_xtb_path",
    "read_extxyz",
    "read_frames",
    "read_rmd17",
    "split_frames",
]

ETHANOL_XTB = "ethanol_xtb.extxyz.gz"
RMD17_KEYS = ("nuclear_charges", "coords", "energies", "forces")
_COMPRESSED = (".gz", ".bz2", ".xz")


@dataclass
class FrameSet:
    """Concatenated frames with energies and forces; see the module docstring for the layout."""

    n_atoms: np.ndarray  # int32[F]
    z: np.ndarray  # int32[N]
    positions: np.ndarray  # float64[N, 3]
    energy: np.ndarray  # float64[F]
    forces: np.ndarray | None = None  # float64[N, 3]
    cell: np.ndarray | None = None  # float64[F, 3, 3]
    pbc: np.ndarray | None = None  # bool[F, 3]
    ids: np.ndarray | None = None  # int64[F]
    source: str = ""
    rejected: list[tuple[int, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.n_atoms = np.asarray(self.n_atoms, dtype=np.int32).reshape(-1)
        f = self.n_atoms.shape[0]
        n = int(self.n_atoms.sum())
        self.z = np.asarray(self.z, dtype=np.int32).reshape(-1)
        self.positions = np.asarray(self.positions, dtype=np.float64).reshape(-1, 3)
        self.energy = np.asarray(self.energy, dtype=np.float64).reshape(-1)
        if self.forces is not None:
            self.forces = np.asarray(self.forces, dtype=np.float64).reshape(-1, 3)
        self.cell = (np.zeros((f, 3, 3)) if self.cell is None
                     else np.asarray(self.cell, dtype=np.float64).reshape(f, 3, 3))
        self.pbc = (np.zeros((f, 3), bool) if self.pbc is None
                    else np.asarray(self.pbc, dtype=bool).reshape(f, 3))
        self.ids = (np.arange(f, dtype=np.int64) if self.ids is None
                    else np.asarray(self.ids, dtype=np.int64).reshape(-1))
        per_atom = {"z": self.z, "positions": self.positions}
        if self.forces is not None:
            per_atom["forces"] = self.forces
        for name, arr in per_atom.items():
            if arr.shape[0] != n:
                raise ValueError(f"{name} has {arr.shape[0]} rows, n_atoms sums to {n}")
        for name, arr in {"energy": self.energy, "ids": self.ids}.items():
            if arr.shape[0] != f:
                raise ValueError(f"{name} has {arr.shape[0]} entries for {f} frames")
        self.offsets = np.concatenate([[0], np.cumsum(self.n_atoms, dtype=np.int64)])

    def __len__(self) -> int:
        return int(self.n_atoms.shape[0])

    def atom_index(self, i: int) -> slice:
        """The rows of frame ``i`` in the per-atom arrays."""
        return slice(int(self.offsets[i]), int(self.offsets[i + 1]))

    def subset(self, index) -> FrameSet:
        """The frames at ``index`` (in that order) as a new FrameSet (``rejected`` is kept)."""
        index = np.asarray(index, dtype=np.int64).reshape(-1)
        aidx = _ranges(self.offsets[index], self.n_atoms[index])
        return FrameSet(
            n_atoms=self.n_atoms[index],
            z=self.z[aidx],
            positions=self.positions[aidx],
            energy=self.energy[index],
            forces=None if self.forces is None else self.forces[aidx],
            cell=self.cell[index],
            pbc=self.pbc[index],
            ids=self.ids[index],
            source=self.source,
            rejected=list(self.rejected),
        )

    def atoms(self, i: int):
        """Frame ``i`` as an ``ase.Atoms`` whose SinglePointCalculator holds its energy/forces."""
        from ase import Atoms
        from ase.calculators.singlepoint import SinglePointCalculator

        a = self.atom_index(i)
        atoms = Atoms(numbers=self.z[a], positions=self.positions[a], cell=self.cell[i],
                      pbc=self.pbc[i])
        results = {"energy": float(self.energy[i])}
        if self.forces is not None:
            results["forces"] = self.forces[a].copy()
        atoms.calc = SinglePointCalculator(atoms, **results)
        return atoms

    def to_graphset(self, cutoff: float, *, targets: bool = True) -> GraphSet:
        """Radius graphs of all frames, for potentials.

        Edges are the directed pairs closer than ``cutoff`` Å from
        :func:`mpattn.neighbors.radius_edges` (vesin; periodic images for periodic cells).

        Args:
            cutoff: Radius of the neighbour graph in Å.
            targets: Add ``globals["energy"]`` and ``nodes["forces"]`` (when present).

        Returns:
            A GraphSet with ``nodes``: ``z`` int32[N], ``positions`` float32[N, 3], ``features``
            float32[N, 0] (potentials embed Z only) and, with targets, ``forces``
            float32[N, 3] eV/Å; ``edges``: ``bond`` int32[E] (all 4, not bonded) and
            ``shift`` float32[E, 3] Å (the edge vector is ``positions[s] - positions[r] +
            shift``; zeros for molecules); ``globals["energy"]`` float64[F] eV; ``ids`` the
            frame ids.
        """
        from mpattn.neighbors import radius_edges

        if not cutoff > 0:
            raise ValueError(f"cutoff must be positive, got {cutoff}")
        senders, receivers, shifts, n_edge = [], [], [], []
        for i in range(len(self)):
            a = self.atom_index(i)
            periodic = bool(self.pbc[i].any())
            try:
                s, r, sh = radius_edges(self.positions[a], cutoff, self.cell[i] if periodic
                                        else None, self.pbc[i] if periodic else None)
            except ValueError as exc:
                raise ValueError(f"{self.source}: frame {self.ids[i]}: {exc}") from exc
            senders.append(s)
            receivers.append(r)
            shifts.append(sh.astype(np.float32))
            n_edge.append(len(s))
        e = int(sum(n_edge))
        cat = np.concatenate
        nodes = {
            "z": self.z.copy(),
            "positions": self.positions.astype(np.float32),
            "features": np.zeros((self.z.shape[0], 0), np.float32),
        }
        glob = {}
        if targets:
            glob["energy"] = self.energy.copy()
            if self.forces is not None:
                nodes["forces"] = self.forces.astype(np.float32)
        return GraphSet(
            n_node=self.n_atoms.copy(),
            n_edge=np.asarray(n_edge, np.int32),
            nodes=nodes,
            edges={
                "bond": np.full(e, 4, np.int32),
                "shift": cat(shifts) if e else np.zeros((0, 3), np.float32),
            },
            senders=cat(senders) if e else np.zeros(0, np.int32),
            receivers=cat(receivers) if e else np.zeros(0, np.int32),
            globals=glob,
            ids=self.ids.copy(),
        )


# --------------------------------------------------------------------------- readers


def ethanol_xtb_path() -> Path:
    """The bundled GFN2-xTB ethanol set: 2000 frames of Langevin MD at 500 K (0.5 fs steps,
    one frame every 50 steps: 25 fs apart over 50 ps), energies in eV, forces in eV/Å, made by
    ``python -m experiments.make_xtb_dataset --molecule ethanol --frames 2000
    --temperature 500``. Read it with :func:`read_frames`.
    """
    from importlib import resources

    return Path(str(resources.files("mpattn.data").joinpath("files", ETHANOL_XTB)))


def _check_file(path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    return path


def _frame_value(atoms, key: str | None, store: dict, getter):
    """A frame's energy or forces: ``store[key]`` (info/arrays) or the calculator's result."""
    from ase.calculators.calculator import PropertyNotImplementedError

    if key is not None:
        if key in store:
            return store[key]
        # ase's extxyz reader moves keys such as energy/forces into a SinglePointCalculator
        return None if atoms.calc is None else atoms.calc.results.get(key)
    if atoms.calc is None:
        return None
    try:
        return getter()
    except (PropertyNotImplementedError, RuntimeError):
        return None


def _warn_rejected(source: str, rejected: list[tuple[int, str]], total: int) -> None:
    if not rejected:
        return
    shown = "; ".join(f"frame {i}: {why}" for i, why in rejected[:5])
    more = f"; ... ({len(rejected) - 5} more)" if len(rejected) > 5 else ""
    warnings.warn(f"{source}: {len(rejected)} of {total} frame(s) rejected: {shown}{more}",
                  stacklevel=4)


def read_extxyz(path, *, energy_key: str | None = None, forces_key: str | None = None,
                format: str = "extxyz") -> FrameSet:
    """Reads frames with energies (and forces) from an extended XYZ file through ``ase.io``.

    Energies/forces come from each frame's SinglePointCalculator (which ase fills from the
    keys ``energy``/``forces``) or, when keys are given, from ``atoms.info[energy_key]`` /
    ``atoms.arrays[forces_key]`` (e.g. ``REF_energy``/``REF_forces``). Compressed files
    (``.gz``, ``.bz2``, ``.xz``) are read transparently.

    A frame without a finite energy, or without finite forces of shape [n, 3] while other
    frames have forces, is not loaded: it is listed in ``FrameSet.rejected`` and one warning
    names the file, the frame indices and the problems.

    Args:
        path: The file.
        energy_key: ``info`` key of the energy in eV (default: the calculator's energy).
        forces_key: per-atom array key of the forces in eV/Å (default: the calculator's).
        format: ``ase.io`` format name (``extxyz``; :func:`read_frames` passes others).

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If no frame of the file is usable (the message names the file).
    """
    path = _check_file(path)
    source = str(path)
    with _seekable(path) as fh:
        return _read_ase(fh, source, format, energy_key, forces_key)


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


def _read_ase(fh, source: str, format: str, energy_key: str | None,
              forces_key: str | None) -> FrameSet:
    import ase.io

    kept, energies, forces, rejected = [], [], [], []
    total = 0
    for i, atoms in enumerate(ase.io.iread(fh, format=format, index=":")):
        total += 1
        e = _frame_value(atoms, energy_key, atoms.info, atoms.get_potential_energy)
        if e is None:
            rejected.append((i, f"no energy ({energy_key or 'energy'})"))
            continue
        try:
            e = float(e)
        except (TypeError, ValueError):
            rejected.append((i, f"energy is not a number: {e!r}"))
            continue
        if not np.isfinite(e):
            rejected.append((i, f"non-finite energy ({e})"))
            continue
        f = _frame_value(atoms, forces_key, atoms.arrays, atoms.get_forces)
        if f is not None:
            f = np.asarray(f, dtype=np.float64)
            if f.shape != (len(atoms), 3):
                rejected.append((i, f"forces of shape {f.shape} for {len(atoms)} atoms"))
                continue
            if not np.all(np.isfinite(f)):
                rejected.append((i, "non-finite forces"))
                continue
        kept.append((i, atoms))
        energies.append(e)
        forces.append(f)
    has_forces = [f is not None for f in forces]
    if any(has_forces) and not all(has_forces):  # forces are all or nothing
        keep = []
        for (i, atoms), e, f in zip(kept, energies, forces, strict=True):
            if f is None:
                rejected.append((i, f"no forces ({forces_key or 'forces'}) while others have"))
            else:
                keep.append(((i, atoms), e, f))
        kept, energies, forces = (list(t) for t in zip(*keep, strict=True))
        rejected.sort()
    _warn_rejected(source, rejected, total)
    if not kept:
        why = f"; first problem: frame {rejected[0][0]}: {rejected[0][1]}" if rejected else ""
        raise ValueError(f"{source}: no usable frame with an energy ({total} frame(s) read){why}")
    return FrameSet(
        n_atoms=[len(a) for _, a in kept],
        z=np.concatenate([a.get_atomic_numbers() for _, a in kept]),
        positions=np.concatenate([a.get_positions() for _, a in kept]),
        energy=np.asarray(energies),
        forces=np.concatenate(forces) if forces[0] is not None else None,
        cell=np.stack([np.asarray(a.get_cell()) for _, a in kept]),
        pbc=np.stack([a.get_pbc() for _, a in kept]),
        ids=[i for i, _ in kept],
        source=source,
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


def read_frames(path, **kwargs) -> FrameSet:
    """Reads frames with energies and forces, choosing the reader by the file's suffix.

    ``.npz``: :func:`read_rmd17`; ``.xyz``/``.extxyz`` (optionally ``.gz``/``.bz2``/``.xz``):
    :func:`read_extxyz`; any other format ``ase.io`` recognises (``.traj``, ``.db``, ...):
    :func:`read_extxyz` with that format. Keyword arguments go to :func:`read_extxyz`.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If the format is not recognised.
    """
    path = _check_file(path)
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in _COMPRESSED:
        suffixes = suffixes[:-1]
    last = suffixes[-1] if suffixes else ""
    if last == ".npz":
        if kwargs:
            raise TypeError(f"read_rmd17 takes no options, got {sorted(kwargs)}")
        return read_rmd17(path)
    if last in (".xyz", ".extxyz"):
        return read_extxyz(path, **kwargs)
    from ase.io.formats import UnknownFileTypeError, filetype

    try:
        fmt = filetype(str(path), guess=False)
    except (UnknownFileTypeError, OSError) as exc:
        raise ValueError(f"{path}: unknown format ({exc}); expected a revised MD17 .npz or a "
                         "file ase.io reads with energies (.extxyz, .xyz, .traj, ...)") from exc
    return read_extxyz(path, format=fmt, **kwargs)


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
