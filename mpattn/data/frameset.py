"""Structures with reference energies, forces and stress (the data of potentials).

A :class:`FrameSet` holds ``F`` frames with ``N`` atoms in total, laid out frame after frame
as a :class:`~mpattn.data.graphset.GraphSet` is (``n_atoms`` per frame, offsets from it):

- ``z``: int32[N] atomic numbers; ``positions``: float64[N, 3] Å
- ``energy``: float64[F] eV; ``forces``: float64[N, 3] eV/Å, or ``None`` when the data has none
- ``stress``: float64[F, 3, 3] eV/Å³ (NaN for frames without one, e.g. molecules), or ``None``
- ``cell``: float64[F, 3, 3] Å (zeros for molecules); ``pbc``: bool[F, 3]
- ``ids``: int64[F], the index of each frame in its file; ``source``: the file name
- ``molecules``: str[F], the molecule (or system) of each frame: a label of the file
  (``info["molecule"]``) or, without one, the frame's chemical formula (Hill order)
- ``rejected``: ``(frame index, problem)`` for every frame of the file that was not loaded

The readers are in :mod:`mpattn.data.frames`; :meth:`FrameSet.to_graphset` builds the radius
graphs a potential trains on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mpattn.data.graphset import GraphSet, _ranges

__all__ = ["FrameSet", "hill_formula"]


def hill_formula(z) -> str:
    """The chemical formula of atomic numbers ``z`` in Hill order (C, H, then alphabetical)."""
    from ase.formula import Formula
    from ase.symbols import Symbols

    return Formula(str(Symbols(np.asarray(z, np.int64)).get_chemical_formula())).format("hill")

@dataclass
class FrameSet:
    """Concatenated frames with energies and forces; see the module docstring for the layout."""

    n_atoms: np.ndarray  # int32[F]
    z: np.ndarray  # int32[N]
    positions: np.ndarray  # float64[N, 3]
    energy: np.ndarray  # float64[F]
    forces: np.ndarray | None = None  # float64[N, 3]
    stress: np.ndarray | None = None  # float64[F, 3, 3], NaN where a frame has none
    cell: np.ndarray | None = None  # float64[F, 3, 3]
    pbc: np.ndarray | None = None  # bool[F, 3]
    ids: np.ndarray | None = None  # int64[F]
    source: str = ""
    molecules: np.ndarray | None = None  # str[F]
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
        if self.stress is not None:
            self.stress = np.asarray(self.stress, dtype=np.float64).reshape(f, 3, 3)
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
        if self.molecules is None:
            self.molecules = np.asarray([hill_formula(self.z[self.atom_index(i)])
                                         for i in range(f)], dtype=str)
        self.molecules = np.asarray(self.molecules, dtype=str).reshape(-1)
        if self.molecules.shape[0] != f:
            raise ValueError(f"molecules has {self.molecules.shape[0]} entries for {f} frames")

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
            stress=None if self.stress is None else self.stress[index],
            cell=self.cell[index],
            pbc=self.pbc[index],
            ids=self.ids[index],
            source=self.source,
            molecules=self.molecules[index],
            rejected=list(self.rejected),
        )

    def has_stress(self) -> np.ndarray:
        """bool[F]: frames with a reference stress (periodic frames of data that has it)."""
        if self.stress is None:
            return np.zeros(len(self), bool)
        return np.all(np.isfinite(self.stress.reshape(len(self), 9)), axis=1)

    def scaled(self, energy: float = 1.0, length: float = 1.0) -> FrameSet:
        """The frames in other units: energies × ``energy``, lengths × ``length`` (forces ×
        ``energy / length``, stress × ``energy / length³``); e.g. Hartree and Bohr to eV and
        Å with ``ase.units.Hartree`` and ``ase.units.Bohr``."""
        if energy == 1.0 and length == 1.0:
            return self
        return FrameSet(
            n_atoms=self.n_atoms, z=self.z, positions=self.positions * length,
            energy=self.energy * energy,
            forces=None if self.forces is None else self.forces * (energy / length),
            stress=None if self.stress is None else self.stress * (energy / length**3),
            cell=self.cell * length, pbc=self.pbc, ids=self.ids, source=self.source,
            molecules=self.molecules, rejected=list(self.rejected))

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
        if self.has_stress()[i]:
            from ase.stress import full_3x3_to_voigt_6_stress

            results["stress"] = full_3x3_to_voigt_6_stress(self.stress[i])
        atoms.info["molecule"] = str(self.molecules[i])
        atoms.calc = SinglePointCalculator(atoms, **results)
        return atoms

    def to_graphset(self, cutoff: float, *, targets: bool = True) -> GraphSet:
        """Radius graphs of all frames, for potentials.

        Edges are the directed pairs closer than ``cutoff`` Å from
        :func:`mpattn.neighbors.radius_edges` (vesin; periodic images for periodic cells).

        Args:
            cutoff: Radius of the neighbour graph in Å.
            targets: Add ``globals["energy"]``, ``nodes["forces"]`` (when present) and
                ``globals["stress"]`` (when present; NaN rows for frames without one).

        Returns:
            A GraphSet with ``nodes``: ``z`` int32[N], ``positions`` float32[N, 3], ``features``
            float32[N, 0] (potentials embed Z only) and, with targets, ``forces``
            float32[N, 3] eV/Å; ``edges``: ``bond`` int32[E] (all 4, not bonded) and
            ``shift`` float32[E, 3] Å (the edge vector is ``positions[s] - positions[r] +
            shift``; zeros for molecules); ``globals["energy"]`` float64[F] eV; ``ids`` the
            frame ids; ``globals["cell"]`` float32[F, 3, 3] Å always (zeros for molecules:
            the volume a stress needs).
        """
        from mpattn.data.radius_graphs import build_edges

        if not cutoff > 0:
            raise ValueError(f"cutoff must be positive, got {cutoff}")
        senders, receivers, bond, shift, n_edge = build_edges(
            self.positions, self.offsets, self.cell, self.pbc, cutoff, np.arange(len(self)),
            ids=self.ids, source=self.source)
        nodes = {
            "z": self.z.copy(),
            "positions": self.positions.astype(np.float32),
            "features": np.zeros((self.z.shape[0], 0), np.float32),
        }
        glob = {"cell": self.cell.astype(np.float32)}
        if targets:
            glob["energy"] = self.energy.copy()
            if self.forces is not None:
                nodes["forces"] = self.forces.astype(np.float32)
            if self.stress is not None:
                glob["stress"] = self.stress.copy()
        return GraphSet(
            n_node=self.n_atoms.copy(),
            n_edge=n_edge,
            nodes=nodes,
            edges={"bond": bond, "shift": shift},
            senders=senders,
            receivers=receivers,
            globals=glob,
            ids=self.ids.copy(),
        )


