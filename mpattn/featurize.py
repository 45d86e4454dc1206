"""Molecules and ``ase.Atoms`` into the graphs of docs/design.md (RDKit bonds, edge sets).

Two stages:

1. **Perception** (:func:`perceive`): RDKit assigns bonds and atom properties, atom order kept.
   With a SMILES (QM9 ships one per molecule) the SMILES is the bond-order *template* laid
   onto the geometry's connectivity (``template``); without one, or when the template does
   not fit, RDKit's geometry-based perception (xyz2mol, ``geometry``); if that fails too,
   connectivity alone with every bond single (``connectivity``). The path taken is recorded.
   The result is compact (bond list + per-atom integers) so that all of QM9 caches small.
2. **Graph building** (:func:`node_features`, :func:`complete_edges`, :func:`bond_edges`,
   :func:`mpattn.neighbors.radius_edges`): node features and one of the edge sets
   ``complete``, ``bonds``, ``radius`` (vesin's neighbour list, periodic cells included).

Node features (float32, in this order): one-hot element over ``options.elements``, atomic
number, aromatic flag, hybridization one-hot (sp, sp2, sp3, other), number of attached H.
Edge feature ``bond``: 0 single, 1 double, 2 triple, 3 aromatic, 4 not bonded.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from ase.data import atomic_numbers, chemical_symbols, covalent_radii

from mpattn.elements import QM9_ELEMENTS
from mpattn.neighbors import radius_edges

__all__ = [
    "BOND_NAMES",
    "EDGE_SETS",
    "HYBRIDIZATIONS",
    "PATHS",
    "FeaturizeOptions",
    "Perception",
    "bond_edges",
    "complete_edges",
    "feature_names",
    "featurize",
    "from_atoms",
    "from_rdkit",
    "node_features",
    "perceive",
    "validate_atoms",
]

BOND_NAMES = ("single", "double", "triple", "aromatic", "not bonded")
NOT_BONDED = 4
HYBRIDIZATIONS = ("sp", "sp2", "sp3", "other")
PATHS = ("template", "geometry", "connectivity", "rdkit", "none")
EDGE_SETS = ("complete", "bonds", "radius")


@dataclass(frozen=True)
class FeaturizeOptions:
    """How molecules become graphs.

    Attributes:
        elements: element symbols of the one-hot encoding (default QM9's H C N O F). An atom
            of another element is an error, not a silent zero row.
        edge_set: ``"complete"`` (all ordered pairs within a molecule), ``"bonds"`` (both
            directions of each perceived bond) or ``"radius"`` (pairs closer than ``cutoff``).
        cutoff: radius-graph cutoff in Å (required for ``"radius"``).
        perceive_bonds: run RDKit bond perception. Switch off for large or periodic systems
            where bonds carry no meaning; every edge is then ``not bonded``.
    """

    elements: tuple[str, ...] = tuple(chemical_symbols[z] for z in QM9_ELEMENTS)
    edge_set: str = "complete"
    cutoff: float | None = None
    perceive_bonds: bool = True

    def __post_init__(self) -> None:
        if self.edge_set not in EDGE_SETS:
            raise ValueError(f"edge_set must be one of {EDGE_SETS}, got {self.edge_set!r}")
        if self.edge_set == "radius" and (self.cutoff is None or not self.cutoff > 0):
            raise ValueError(f"edge_set 'radius' needs a positive cutoff in Å, got {self.cutoff}")
        for s in self.elements:
            if s not in atomic_numbers:
                raise ValueError(f"unknown element symbol {s!r} in FeaturizeOptions.elements")
        object.__setattr__(self, "elements", tuple(self.elements))

    @property
    def element_z(self) -> np.ndarray:
        return np.array([atomic_numbers[s] for s in self.elements], dtype=np.int32)


def feature_names(options: FeaturizeOptions = FeaturizeOptions()) -> list[str]:
    """Names of the node-feature columns, in order."""
    return (
        [f"is_{s}" for s in options.elements]
        + ["atomic_number", "aromatic"]
        + [f"hybridization_{h}" for h in HYBRIDIZATIONS]
        + ["num_h"]
    )


@dataclass
class Perception:
    """Bonds and atom properties of one molecule, in the molecule's own atom order.

    Attributes:
        bonds: int32 [num_bonds, 2], atom index pairs with i < j.
        bond_type: int8 [num_bonds], 0 single, 1 double, 2 triple, 3 aromatic.
        aromatic: int8 [num_atoms], 1 for aromatic atoms.
        hybridization: int8 [num_atoms], index into ``HYBRIDIZATIONS``.
        path: which perception path succeeded (one of ``PATHS``).
    """

    bonds: np.ndarray
    bond_type: np.ndarray
    aromatic: np.ndarray
    hybridization: np.ndarray
    path: str


def validate_atoms(z, positions, name: str = "molecule") -> tuple[np.ndarray, np.ndarray]:
    """Checked ``(z int32[N], positions float64[N, 3])``; ``z`` may hold element symbols.

    Raises:
        ValueError: naming ``name`` and the problem (no atoms, unknown element, length
            mismatch, positions not [N, 3], NaN or infinite coordinates).
    """
    z = np.asarray(z)
    if z.ndim != 1:
        raise ValueError(f"{name}: atomic numbers must be a 1-d sequence, got shape {z.shape}")
    if z.shape[0] == 0:
        raise ValueError(f"{name}: molecule has zero atoms")
    if z.dtype.kind in "US":
        unknown = sorted({str(s) for s in z if str(s) not in atomic_numbers})
        if unknown:
            raise ValueError(f"{name}: unknown element symbol(s) {unknown}")
        z = np.array([atomic_numbers[str(s)] for s in z], dtype=np.int32)
    elif z.dtype.kind not in "iu":
        raise ValueError(f"{name}: atomic numbers must be integers or symbols, got {z.dtype}")
    z = z.astype(np.int32)
    bad = z[(z < 1) | (z >= len(chemical_symbols))]
    if bad.size:
        raise ValueError(f"{name}: invalid atomic number(s) {sorted(set(bad.tolist()))}")
    try:
        pos = np.asarray(positions, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name}: positions are not numeric: {err}") from None
    if pos.ndim != 2 or pos.shape[1] != 3:
        raise ValueError(f"{name}: positions must have shape [num_atoms, 3], got {pos.shape}")
    if pos.shape[0] != z.shape[0]:
        raise ValueError(
            f"{name}: {z.shape[0]} atomic numbers but {pos.shape[0]} positions (lengths differ)"
        )
    if not np.all(np.isfinite(pos)):
        rows = np.nonzero(~np.all(np.isfinite(pos), axis=1))[0]
        raise ValueError(f"{name}: NaN or infinite coordinates at atom(s) {rows.tolist()}")
    return z, pos


# --------------------------------------------------------------------------- perception


def perceive(z, positions, smiles: str | None = None, *, charge: int = 0,
             name: str = "molecule") -> Perception:
    """Bond perception with RDKit; see the module docstring for the three paths.

    Args:
        z: int [num_atoms] atomic numbers (or symbols).
        positions: float [num_atoms, 3] in Å.
        smiles: optional bond-order template (hydrogens implicit or explicit).
        charge: total charge, used by geometry-based perception.
        name: molecule name for error messages.

    Returns:
        A :class:`Perception` in the input atom order.
    """
    from rdkit import RDLogger
    from rdkit.Chem import rdDetermineBonds

    RDLogger.DisableLog("rdApp.*")
    z, pos = validate_atoms(z, positions, name)
    if smiles:
        mol = _connectivity_mol(z, pos)
        if _apply_template(mol, smiles, pos):
            return _from_mol(mol, "template")
    mol = _bare_mol(z, pos)
    try:
        rdDetermineBonds.DetermineBonds(mol, charge=charge)
        return _from_mol(mol, "geometry")
    except Exception:  # noqa: BLE001 - RDKit raises several types; fall back to connectivity
        pass
    mol = _connectivity_mol(z, pos)  # DetermineConnectivity leaves every bond single
    mol.UpdatePropertyCache(strict=False)
    return _from_mol(mol, "connectivity", sanitized=False)


def _bare_mol(z: np.ndarray, pos: np.ndarray):
    from rdkit import Chem
    from rdkit.Geometry import Point3D

    mol = Chem.RWMol()
    conf = Chem.Conformer(len(z))
    for i, (zi, p) in enumerate(zip(z.tolist(), pos.tolist(), strict=True)):
        atom = Chem.Atom(zi)
        atom.SetNoImplicit(True)
        mol.AddAtom(atom)
        conf.SetAtomPosition(i, Point3D(*p))
    mol.AddConformer(conf, assignId=True)
    return mol


def _connectivity_mol(z: np.ndarray, pos: np.ndarray):
    from rdkit.Chem import rdDetermineBonds

    mol = _bare_mol(z, pos)
    rdDetermineBonds.DetermineConnectivity(mol)
    return mol


def _all_single(mol):
    """A copy with every bond single and no aromaticity or charge (graph-only matching)."""
    from rdkit import Chem

    m = Chem.RWMol(mol)
    for k in range(m.GetNumAtoms()):
        a = m.GetAtomWithIdx(k)
        a.SetIsAromatic(False)
        a.SetFormalCharge(0)
        a.SetNoImplicit(True)
        a.SetNumExplicitHs(0)
    single = Chem.BondType.SINGLE
    for k in range(m.GetNumBonds()):
        b = m.GetBondWithIdx(k)
        b.SetBondType(single)
        b.SetIsAromatic(False)
    return m


def _apply_template(mol, smiles: str, pos: np.ndarray) -> bool:
    """Lay the SMILES' bond orders and charges onto ``mol``'s connectivity, in place.

    Strained cages (bicyclobutanes, [1.1.1] bridges) can get one spurious long bond from
    connect-the-dots; when the geometry has more bonds than the template, the bonds longest
    relative to their covalent radii are dropped first. The template must then match the
    whole graph (isomorphism), so a wrong drop cannot pass.
    """
    from rdkit import Chem

    tmpl = Chem.MolFromSmiles(smiles)
    if tmpl is None:
        return False
    tmpl = Chem.AddHs(tmpl)
    if tmpl.GetNumAtoms() != mol.GetNumAtoms():
        return False
    extra = mol.GetNumBonds() - tmpl.GetNumBonds()
    if extra > 0:
        ij = np.array([_ends(mol.GetBondWithIdx(k)) for k in range(mol.GetNumBonds())])
        zz = np.array([mol.GetAtomWithIdx(k).GetAtomicNum() for k in range(mol.GetNumAtoms())])
        ratio = np.linalg.norm(pos[ij[:, 0]] - pos[ij[:, 1]], axis=1)
        ratio /= covalent_radii[zz[ij[:, 0]]] + covalent_radii[zz[ij[:, 1]]]
        for k in np.argsort(ratio)[-extra:]:
            mol.RemoveBond(int(ij[k, 0]), int(ij[k, 1]))
    if mol.GetNumBonds() != tmpl.GetNumBonds():
        return False
    Chem.Kekulize(tmpl, clearAromaticFlags=True)
    # the geometry's mol is already all-single, uncharged and non-aromatic
    match = mol.GetSubstructMatch(_all_single(tmpl))
    if not match:
        return False
    for k in range(tmpl.GetNumBonds()):
        b = tmpl.GetBondWithIdx(k)
        mb = mol.GetBondBetweenAtoms(match[b.GetBeginAtomIdx()], match[b.GetEndAtomIdx()])
        mb.SetBondType(b.GetBondType())
    for k in range(tmpl.GetNumAtoms()):
        charge = tmpl.GetAtomWithIdx(k).GetFormalCharge()
        if charge:
            mol.GetAtomWithIdx(match[k]).SetFormalCharge(charge)
    try:
        Chem.SanitizeMol(mol)
    except Exception:  # noqa: BLE001
        return False
    return True


_BOND_INDEX: dict = {}
_HYB_INDEX: dict = {}


def _ends(bond) -> tuple[int, int]:
    return bond.GetBeginAtomIdx(), bond.GetEndAtomIdx()


def _rdkit_tables():
    from rdkit import Chem

    bt, hy = Chem.BondType, Chem.HybridizationType
    return (
        {bt.SINGLE: 0, bt.DOUBLE: 1, bt.TRIPLE: 2, bt.AROMATIC: 3},
        {hy.SP: 0, hy.SP2: 1, hy.SP3: 2},
    )


def _from_mol(mol, path: str, sanitized: bool = True) -> Perception:
    global _BOND_INDEX, _HYB_INDEX
    if not _BOND_INDEX:
        _BOND_INDEX, _HYB_INDEX = _rdkit_tables()

    bonds, types = [], []
    for k in range(mol.GetNumBonds()):
        b = mol.GetBondWithIdx(k)
        bonds.append(sorted(_ends(b)))
        types.append(3 if b.GetIsAromatic() else _BOND_INDEX.get(b.GetBondType(), 0))
    n = mol.GetNumAtoms()
    atoms = [mol.GetAtomWithIdx(k) for k in range(n)]
    aromatic = np.array([a.GetIsAromatic() for a in atoms], dtype=np.int8)
    if sanitized:
        hyb = [_HYB_INDEX.get(a.GetHybridization(), 3) for a in atoms]
    else:
        hyb = [3] * n
    return Perception(
        bonds=np.array(bonds, dtype=np.int32).reshape(-1, 2),
        bond_type=np.array(types, dtype=np.int8),
        aromatic=aromatic,
        hybridization=np.array(hyb, dtype=np.int8),
        path=path,
    )


def _no_bonds(n: int) -> Perception:
    return Perception(
        bonds=np.zeros((0, 2), np.int32),
        bond_type=np.zeros(0, np.int8),
        aromatic=np.zeros(n, np.int8),
        hybridization=np.full(n, 3, np.int8),
        path="none",
    )


# --------------------------------------------------------------------------- graph parts


def node_features(z, aromatic, hybridization, num_h, options: FeaturizeOptions,
                  name: str = "molecule") -> np.ndarray:
    """float32 [N, F] node features (see :func:`feature_names`); works on many molecules."""
    z = np.asarray(z, dtype=np.int32)
    onehot = z[:, None] == options.element_z[None, :]
    missing = ~onehot.any(axis=1)
    if missing.any():
        bad = sorted({chemical_symbols[int(v)] for v in z[missing]})
        raise ValueError(
            f"{name}: element(s) {bad} not in the featurization's element list "
            f"{list(options.elements)} (set FeaturizeOptions(elements=...))"
        )
    hyb = np.asarray(hybridization)[:, None] == np.arange(len(HYBRIDIZATIONS))[None, :]
    return np.concatenate(
        [
            onehot,
            z[:, None],
            np.asarray(aromatic)[:, None],
            hyb,
            np.asarray(num_h)[:, None],
        ],
        axis=1,
        dtype=np.float32,
    )


def count_h(z: np.ndarray, bonds: np.ndarray) -> np.ndarray:
    """int32 [N]: number of hydrogen neighbours of each atom, from an i<j bond list."""
    z = np.asarray(z)
    out = np.zeros(z.shape[0], dtype=np.int32)
    if len(bonds):
        i, j = bonds[:, 0], bonds[:, 1]
        np.add.at(out, i, (z[j] == 1).astype(np.int32))
        np.add.at(out, j, (z[i] == 1).astype(np.int32))
    return out


def bond_lookup(n: int, bonds: np.ndarray, bond_type: np.ndarray, senders, receivers):
    """int32 [E] bond category of each (sender, receiver) pair; 4 where not bonded."""
    dense = np.full((n, n), NOT_BONDED, dtype=np.int32)
    if len(bonds):
        dense[bonds[:, 0], bonds[:, 1]] = bond_type
        dense[bonds[:, 1], bonds[:, 0]] = bond_type
    return dense[senders, receivers]


def complete_edges(n: int) -> tuple[np.ndarray, np.ndarray]:
    """All ordered pairs (s != r) of an n-atom molecule: int32 senders, receivers [n(n-1)]."""
    s, r = np.nonzero(~np.eye(n, dtype=bool))
    return s.astype(np.int32), r.astype(np.int32)


def bond_edges(bonds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both directions of each bond (i<j list): int32 senders, receivers [2 * num_bonds]."""
    bonds = np.asarray(bonds, dtype=np.int32).reshape(-1, 2)
    s = np.stack([bonds[:, 0], bonds[:, 1]], axis=1).reshape(-1)
    r = np.stack([bonds[:, 1], bonds[:, 0]], axis=1).reshape(-1)
    return s, r


# --------------------------------------------------------------------------- single graphs


def _build_graph(z, pos, p: Perception, options: FeaturizeOptions, cell, pbc, name: str):
    import jraph

    n = len(z)
    feats = node_features(z, p.aromatic, p.hybridization, count_h(z, p.bonds), options, name)
    edges = {}
    if options.edge_set == "complete":
        s, r = complete_edges(n)
    elif options.edge_set == "bonds":
        s, r = bond_edges(p.bonds)
    else:
        s, r, shift = radius_edges(pos, options.cutoff, cell, pbc)
        shift = shift.astype(np.float32)
        if pbc is not None and np.any(pbc):
            edges["shift"] = shift
    edges = {"bond": bond_lookup(n, p.bonds, p.bond_type, s, r), **edges}
    return jraph.GraphsTuple(
        nodes={
            "z": z.astype(np.int32),
            "positions": pos.astype(np.float32),
            "features": feats,
        },
        edges=edges,
        senders=s,
        receivers=r,
        n_node=np.array([n], np.int32),
        n_edge=np.array([len(s)], np.int32),
        globals={},
    )


def featurize(z, positions, *, smiles: str | None = None,
              options: FeaturizeOptions = FeaturizeOptions(), cell=None, pbc=None,
              charge: int = 0, name: str = "molecule"):
    """One molecule (atomic numbers or symbols, positions in Å) as a ``jraph.GraphsTuple``.

    Atom order is preserved. Returns numpy arrays; see the module docstring for features.
    """
    z, pos = validate_atoms(z, positions, name)
    if options.perceive_bonds:
        p = perceive(z, pos, smiles, charge=charge, name=name)
    else:
        p = _no_bonds(len(z))
    return _build_graph(z, pos, p, options, cell, pbc, name)


def from_atoms(atoms, *, smiles: str | None = None,
               options: FeaturizeOptions = FeaturizeOptions(), charge: int = 0,
               name: str | None = None):
    """An ``ase.Atoms`` (cell and pbc honoured for radius graphs) as a GraphsTuple."""
    name = name or f"Atoms({atoms.get_chemical_formula()})"
    pbc = atoms.get_pbc() if np.any(atoms.get_pbc()) else None
    return featurize(atoms.get_atomic_numbers(), atoms.get_positions(), smiles=smiles,
                     options=options, cell=np.asarray(atoms.get_cell()), pbc=pbc,
                     charge=charge, name=name)


def from_rdkit(mol, *, options: FeaturizeOptions = FeaturizeOptions(), conf_id: int = -1,
               name: str | None = None):
    """An RDKit Mol with a 3-D conformer, using the Mol's own bonds, as a GraphsTuple.

    Hydrogens must be explicit atoms (``Chem.AddHs(mol, addCoords=True)``), since every
    atom becomes a node.
    """
    from rdkit import Chem

    name = name or (mol.GetProp("_Name") if mol.HasProp("_Name") else Chem.MolToSmiles(mol))
    if mol.GetNumConformers() == 0:
        raise ValueError(f"{name}: RDKit Mol has no conformer (embed or read 3-D coordinates)")
    if any(a.GetNumImplicitHs() for a in mol.GetAtoms()):
        raise ValueError(f"{name}: RDKit Mol has implicit hydrogens; use Chem.AddHs(mol, "
                         "addCoords=True) so that every atom is a node")
    z = np.array([a.GetAtomicNum() for a in mol.GetAtoms()], np.int32)
    z, pos = validate_atoms(z, mol.GetConformer(conf_id).GetPositions(), name)
    p = _from_mol(mol, "rdkit") if options.perceive_bonds else _no_bonds(len(z))
    return _build_graph(z, pos, p, options, None, None, name)
