"""A whole dataset of perceived molecules in compact form, and its conversion to graphs.

:class:`MoleculeSet` is what the cache stores (int8 elements, float32 positions, the bond
list, per-atom integers, float64 targets): small, and independent of the edge set, which
:meth:`MoleculeSet.to_graphset` builds afterwards, vectorised over all molecules.
"""

from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from ase.data import chemical_symbols

from mpattn.data.graphset import GraphSet, _ranges
from mpattn.data.records import BadRecord, RawMolecule
from mpattn.featurize import (
    NOT_BONDED,
    PATHS,
    FeaturizeOptions,
    count_h,
    node_features,
    perceive,
)
from mpattn.neighbors import radius_edges

__all__ = ["MoleculeSet", "perceive_many"]


@dataclass
class MoleculeSet:
    """Perceived molecules, concatenated (see module docstring).

    Attributes:
        ids: int64 [G] dataset identifiers.
        n_atoms: int32 [G]; z: int8 [N]; positions: float32 [N, 3] Å.
        aromatic, hybridization: int8 [N] (see ``mpattn.featurize``).
        n_bonds: int32 [G]; bonds: int16 [B, 2] local atom indices (i < j);
        bond_type: int8 [B] (0 single, 1 double, 2 triple, 3 aromatic).
        path: int8 [G], index into ``mpattn.featurize.PATHS``.
        targets: name -> float64 [G], in library units (eV for energies).
        smiles: the template SMILES of each molecule ("" when none).
        rejected: records left out, each with its reason (reported, never silent).
        excluded: molecules left out on purpose (QM9's uncharacterized list), by count.
    """

    ids: np.ndarray
    n_atoms: np.ndarray
    z: np.ndarray
    positions: np.ndarray
    aromatic: np.ndarray
    hybridization: np.ndarray
    n_bonds: np.ndarray
    bonds: np.ndarray
    bond_type: np.ndarray
    path: np.ndarray
    targets: dict[str, np.ndarray] = field(default_factory=dict)
    smiles: list[str] = field(default_factory=list)
    rejected: list[BadRecord] = field(default_factory=list)
    excluded: int = 0

    def __post_init__(self) -> None:
        self.atom_offsets = np.concatenate([[0], np.cumsum(self.n_atoms, dtype=np.int64)])
        self.bond_offsets = np.concatenate([[0], np.cumsum(self.n_bonds, dtype=np.int64)])
        g = len(self.ids)
        if not (len(self.n_atoms) == len(self.n_bonds) == len(self.path) == g):
            raise ValueError("MoleculeSet: per-molecule arrays differ in length")
        if self.atom_offsets[-1] != len(self.z) or len(self.positions) != len(self.z):
            raise ValueError("MoleculeSet: atom arrays do not match n_atoms")
        if self.bond_offsets[-1] != len(self.bonds) or len(self.bond_type) != len(self.bonds):
            raise ValueError("MoleculeSet: bond arrays do not match n_bonds")
        for k, v in self.targets.items():
            if len(v) != g:
                raise ValueError(f"MoleculeSet: target {k!r} has {len(v)} values for {g}")

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def from_perceptions(cls, mols: list[RawMolecule], perceptions: list, *,
                         rejected=(), excluded: int = 0) -> MoleculeSet:
        """Assemble from raw records and their :class:`~mpattn.featurize.Perception`."""
        names = sorted({k for m in mols for k in m.properties})
        path_index = {p: i for i, p in enumerate(PATHS)}
        cat = np.concatenate
        return cls(
            ids=np.array([m.id for m in mols], np.int64),
            n_atoms=np.array([len(m.z) for m in mols], np.int32),
            z=cat([m.z for m in mols]).astype(np.int8) if mols else np.zeros(0, np.int8),
            positions=(cat([m.positions for m in mols]).astype(np.float32) if mols
                       else np.zeros((0, 3), np.float32)),
            aromatic=cat([p.aromatic for p in perceptions] or [np.zeros(0, np.int8)]),
            hybridization=cat([p.hybridization for p in perceptions] or [np.zeros(0, np.int8)]),
            n_bonds=np.array([len(p.bonds) for p in perceptions], np.int32),
            bonds=cat([p.bonds for p in perceptions] or [np.zeros((0, 2))]).astype(np.int16),
            bond_type=cat([p.bond_type for p in perceptions] or [np.zeros(0, np.int8)]),
            path=np.array([path_index[p.path] for p in perceptions], np.int8),
            targets={k: np.array([m.properties.get(k, np.nan) for m in mols], np.float64)
                     for k in names},
            smiles=[m.smiles or "" for m in mols],
            rejected=list(rejected),
            excluded=excluded,
        )

    # ------------------------------------------------------------------ selection

    def subset(self, index) -> MoleculeSet:
        """The molecules at ``index`` (positions, not ids), in that order."""
        index = np.asarray(index, dtype=np.int64)
        a = _ranges(self.atom_offsets[index], self.n_atoms[index])
        b = _ranges(self.bond_offsets[index], self.n_bonds[index])
        return MoleculeSet(
            ids=self.ids[index], n_atoms=self.n_atoms[index], z=self.z[a],
            positions=self.positions[a], aromatic=self.aromatic[a],
            hybridization=self.hybridization[a], n_bonds=self.n_bonds[index],
            bonds=self.bonds[b], bond_type=self.bond_type[b], path=self.path[index],
            targets={k: v[index] for k, v in self.targets.items()},
            smiles=[self.smiles[i] for i in index] if self.smiles else [],
        )

    def index_of(self, ids) -> np.ndarray:
        """Positions of the given ids; ValueError naming ids that are not in the set."""
        ids = np.asarray(ids, dtype=np.int64)
        order = np.argsort(self.ids)
        pos = np.searchsorted(self.ids, ids, sorter=order)
        pos = np.minimum(pos, len(order) - 1)
        found = self.ids[order[pos]] == ids
        if not found.all():
            missing = ids[~found]
            raise ValueError(
                f"{missing.size} id(s) not in this dataset, e.g. {missing[:5].tolist()}")
        return order[pos]

    def to_atoms(self, index=None) -> list:
        """The molecules at ``index`` (positions, not ids; default all) as ``ase.Atoms``
        (elements and positions; what a predictor takes)."""
        from ase import Atoms

        off = self.atom_offsets
        index = range(len(self)) if index is None else np.asarray(index, dtype=np.int64)
        return [Atoms(numbers=self.z[off[i]:off[i + 1]].astype(int),
                      positions=self.positions[off[i]:off[i + 1]]) for i in index]

    # ------------------------------------------------------------------ reporting

    def summary(self) -> dict:
        """Counts: molecules, perception paths, elements (atoms and molecules), sizes."""
        mol_of_atom = np.repeat(np.arange(len(self)), self.n_atoms)
        elements = {}
        for zv in np.unique(self.z):
            sel = self.z == zv
            elements[chemical_symbols[int(zv)]] = {
                "atoms": int(sel.sum()),
                "molecules": int(np.unique(mol_of_atom[sel]).size),
            }
        sizes = Counter(self.n_atoms.tolist())
        return {
            "molecules": len(self),
            "atoms": int(self.n_atoms.sum()),
            "bonds": int(self.n_bonds.sum()),
            "paths": {PATHS[i]: int(c) for i, c in enumerate(np.bincount(self.path,
                                                                          minlength=len(PATHS)))
                      if c},
            "elements": elements,
            "atoms_per_molecule": {int(k): int(sizes[k]) for k in sorted(sizes)},
            "rejected": len(self.rejected),
            "excluded": self.excluded,
        }

    def format_summary(self) -> str:
        """The summary as a few readable lines, with a text histogram of sizes."""
        s = self.summary()
        lines = [f"molecules: {s['molecules']:,}  atoms: {s['atoms']:,}  bonds: {s['bonds']:,}"]
        lines.append("bond perception: " + ", ".join(f"{k} {v:,}" for k, v in s["paths"].items()))
        lines.append("elements (atoms / molecules containing): " + ", ".join(
            f"{k} {v['atoms']:,} / {v['molecules']:,}" for k, v in s["elements"].items()))
        lines.append(f"rejected records: {s['rejected']}  excluded on purpose: {s['excluded']}")
        for r in self.rejected[:20]:
            lines.append(f"  rejected {r.source} (id {r.id}): {r.reason}")
        if len(self.rejected) > 20:
            lines.append(f"  ... and {len(self.rejected) - 20} more")
        lines.append("atoms per molecule:")
        hist = s["atoms_per_molecule"]
        top = max(hist.values()) if hist else 1
        for k, v in hist.items():
            lines.append(f"  {k:3d} {v:7,d} " + "#" * max(1, round(50 * v / top)))
        return "\n".join(lines)

    # ------------------------------------------------------------------ graphs

    def to_graphset(self, options: FeaturizeOptions | None = None,
                    targets: list[str] | None = None) -> GraphSet:
        """Graphs with node features and the edge set of ``options`` (vectorised).

        Args:
            options: element list, edge set and cutoff.
            targets: target names to carry as ``globals`` (default: all), float64.
        """
        options = options or FeaturizeOptions()
        n = self.n_atoms.astype(np.int64)
        g_of_bond = np.repeat(np.arange(len(self)), self.n_bonds)
        gbonds = self.bonds.astype(np.int64) + self.atom_offsets[g_of_bond][:, None]
        z = self.z.astype(np.int32)
        feats = node_features(z, self.aromatic, self.hybridization, count_h(z, gbonds), options,
                              name="dataset")
        if options.edge_set == "complete":
            n_edge = n * (n - 1)
            snd, rcv = _complete_local(n, n_edge)
        elif options.edge_set == "bonds":
            n_edge = 2 * self.n_bonds.astype(np.int64)
            # both directions of each bond, interleaved as featurize.bond_edges; bonds are
            # stored graph after graph, so the edges are too
            b = self.bonds.astype(np.int32)
            snd = b.reshape(-1)
            rcv = b[:, ::-1].reshape(-1)
        else:
            snd_l, rcv_l = [], []
            for i in range(len(self)):
                lo, hi = self.atom_offsets[i], self.atom_offsets[i + 1]
                s, r, _ = radius_edges(self.positions[lo:hi], options.cutoff)
                snd_l.append(s)
                rcv_l.append(r)
            n_edge = np.array([len(s) for s in snd_l], np.int64)
            snd = np.concatenate(snd_l) if snd_l else np.zeros(0, np.int32)
            rcv = np.concatenate(rcv_l) if rcv_l else np.zeros(0, np.int32)
        bond = self._bond_category(n, n_edge, snd, rcv, g_of_bond)
        names = list(self.targets) if targets is None else list(targets)
        for t in names:
            if t not in self.targets:
                raise ValueError(f"unknown target {t!r}; available: {sorted(self.targets)}")
        return GraphSet(
            n_node=self.n_atoms,
            n_edge=n_edge.astype(np.int32),
            nodes={"z": z, "positions": self.positions.astype(np.float32), "features": feats},
            edges={"bond": bond},
            senders=snd,
            receivers=rcv,
            globals={t: self.targets[t] for t in names},
            ids=self.ids,
        )

    def _bond_category(self, n, n_edge, snd, rcv, g_of_bond) -> np.ndarray:
        """int32 [E]: bond category of each edge via one dense n x n table per molecule."""
        sq_off = np.concatenate([[0], np.cumsum(n * n)])
        dense = np.full(int(sq_off[-1]), NOT_BONDED, dtype=np.int8)
        b = self.bonds.astype(np.int64)
        base, nb = sq_off[g_of_bond], n[g_of_bond]
        dense[base + b[:, 0] * nb + b[:, 1]] = self.bond_type
        dense[base + b[:, 1] * nb + b[:, 0]] = self.bond_type
        g_of_edge = np.repeat(np.arange(len(self)), n_edge)
        return dense[sq_off[g_of_edge] + snd.astype(np.int64) * n[g_of_edge] + rcv].astype(
            np.int32)


def _complete_local(n: np.ndarray, n_edge: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Local senders/receivers of the complete edge set of many molecules, graph after graph."""
    total = int(n_edge.sum())
    snd = np.empty(total, np.int32)
    rcv = np.empty(total, np.int32)
    e_off = np.concatenate([[0], np.cumsum(n_edge)])
    for size in np.unique(n):
        if size < 2:
            continue
        graphs = np.nonzero(n == size)[0]
        s, r = np.nonzero(~np.eye(size, dtype=bool))
        where = _ranges(e_off[graphs], n_edge[graphs])
        snd[where] = np.tile(s.astype(np.int32), len(graphs))
        rcv[where] = np.tile(r.astype(np.int32), len(graphs))
    return snd, rcv


# ---------------------------------------------------------------------- parallel perception


def _perceive_chunk(chunk: list[tuple]) -> list:
    out = []
    for mol_id, z, pos, smiles, source in chunk:
        try:
            out.append(perceive(z, pos, smiles, name=f"{source} (id {mol_id})"))
        except Exception as err:  # noqa: BLE001 - one bad record must not stop the load
            out.append(f"{type(err).__name__}: {err}")
    return out


def perceive_many(mols: list[RawMolecule], *, workers: int | None = None,
                  progress: bool = True, chunk_size: int = 1000,
                  desc: str = "bond perception") -> tuple[list[RawMolecule], list, list[BadRecord]]:
    """Perceive bonds of many molecules in worker processes (spawned: safe beside JAX).

    Returns:
        (molecules kept, their perceptions, records rejected with the reason).
    """
    from tqdm.auto import tqdm

    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
            os.cpu_count() or 1)
    items = [(m.id, m.z, m.positions, m.smiles, m.source) for m in mols]
    chunks = [items[i:i + chunk_size] for i in range(0, len(items), chunk_size)]
    bar = tqdm(total=len(items), desc=desc, unit="mol", disable=not progress)
    results: list = []
    if workers <= 1 or len(chunks) <= 1:
        for c in chunks:
            results.extend(_perceive_chunk(c))
            bar.update(len(c))
    else:
        import multiprocessing as mp

        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            for c, res in zip(chunks, pool.map(_perceive_chunk, chunks), strict=True):
                results.extend(res)
                bar.update(len(c))
    bar.close()
    kept, percs, bad = [], [], []
    for m, r in zip(mols, results, strict=True):
        if isinstance(r, str):
            bad.append(BadRecord(source=m.source, id=m.id, reason=r))
        else:
            kept.append(m)
            percs.append(r)
    return kept, percs, bad
