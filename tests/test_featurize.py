"""Featurization: RDKit bond perception paths, node features, edge sets, bad input."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from ase import Atoms
from ase.build import molecule

from mpattn.featurize import (
    FeaturizeOptions,
    feature_names,
    featurize,
    from_atoms,
    from_rdkit,
    perceive,
)
from mpattn.neighbors import radius_edges


def _bond_dict(g):
    """{(i, j): category} over the graph's edges with i < j and a real bond."""
    out = {}
    for s, r, b in zip(g.senders, g.receivers, g.edges["bond"], strict=True):
        if b != 4 and s < r:
            out[(int(s), int(r))] = int(b)
    return out


def test_ethanol_single_bonds_and_atom_order():
    a = molecule("CH3CH2OH")
    g = from_atoms(a, smiles="CCO")
    np.testing.assert_array_equal(g.nodes["z"], a.get_atomic_numbers())
    np.testing.assert_allclose(g.nodes["positions"], a.positions, atol=1e-6)
    bonds = _bond_dict(g)
    assert len(bonds) == 8 and set(bonds.values()) == {0}
    # in ase's ethanol, atom 0 (C) - 1 (C) and 1 (C) - 2 (O)
    assert (0, 1) in bonds and (1, 2) in bonds
    assert perceive(a.numbers, a.positions, "CCO").path == "template"
    assert perceive(a.numbers, a.positions).path == "geometry"


def test_ethanol_node_features_hand_checked():
    a = molecule("CH3CH2OH")  # C C O H...
    g = from_atoms(a)
    names = feature_names()
    row = dict(zip(names, g.nodes["features"][2], strict=True))  # the oxygen
    assert row["is_O"] == 1 and row["is_C"] == 0 and row["atomic_number"] == 8
    assert row["aromatic"] == 0 and row["hybridization_sp3"] == 1 and row["num_h"] == 1
    carbon_h = g.nodes["features"][:2, names.index("num_h")]
    np.testing.assert_array_equal(np.sort(carbon_h), [2, 3])
    assert g.nodes["features"].dtype == np.float32 and g.nodes["features"].shape == (9, 12)


def test_benzene_aromatic():
    a = molecule("C6H6")
    for smiles in ("c1ccccc1", None):
        p = perceive(a.numbers, a.positions, smiles)
        cc = p.bond_type[(a.numbers[p.bonds[:, 0]] == 6) & (a.numbers[p.bonds[:, 1]] == 6)]
        np.testing.assert_array_equal(cc, [3] * 6)
        np.testing.assert_array_equal(p.aromatic, [1] * 6 + [0] * 6)
        np.testing.assert_array_equal(p.hybridization[:6], [1] * 6)  # sp2


def test_co2_double_and_hcn_triple():
    co2 = molecule("CO2")
    p = perceive(co2.numbers, co2.positions, "O=C=O")
    np.testing.assert_array_equal(p.bond_type, [1, 1])
    assert p.hybridization[list(co2.numbers).index(6)] == 0  # sp carbon
    hcn = molecule("HCN")
    p = perceive(hcn.numbers, hcn.positions)
    types = {tuple(sorted(hcn.numbers[b])): t for b, t in zip(p.bonds, p.bond_type, strict=True)}
    assert types == {(6, 7): 2, (1, 6): 0}


def test_edge_counts_per_edge_set():
    a = molecule("CH3CH2OH")
    n = len(a)
    g = from_atoms(a, options=FeaturizeOptions(edge_set="complete"))
    assert g.n_edge[0] == n * (n - 1) == len(g.senders)
    assert not np.any(g.senders == g.receivers)
    g = from_atoms(a, options=FeaturizeOptions(edge_set="bonds"))
    assert g.n_edge[0] == 16 and np.all(g.edges["bond"] == 0)
    g = from_atoms(a, options=FeaturizeOptions(edge_set="radius", cutoff=1.2))
    d = np.linalg.norm(a.positions[g.senders] - a.positions[g.receivers], axis=1)
    assert np.all(d < 1.2) and g.n_edge[0] == 2 * 6  # the six C-H/O-H bonds only


def _brute_radius(pos, cutoff, cell=None):
    """O(N^2) reference (with explicit periodic images): set of (s, r, shift)."""
    out = set()
    images = [np.zeros(3)]
    if cell is not None:
        reach = [int(np.ceil(cutoff / h)) + 1 for h in np.abs(np.diag(cell))]
        images = [np.array(s, float) for s in itertools.product(*[range(-k, k + 1) for k in reach])]
    for s, r in itertools.product(range(len(pos)), repeat=2):
        for img in images:
            shift = img @ cell if cell is not None else np.zeros(3)
            if s == r and not np.any(img):
                continue
            if np.linalg.norm(pos[s] - pos[r] + shift) < cutoff:
                out.add((s, r, tuple(np.round(shift, 6))))
    return out


@pytest.mark.parametrize("periodic", [False, True])
def test_radius_graph_equals_brute_force(periodic):
    rng = np.random.default_rng(3)
    cell = np.diag([4.0, 5.0, 4.5]) if periodic else None
    pos = rng.uniform(0, 4, (25, 3))
    s, r, shift = radius_edges(pos, 2.6, cell=cell, pbc=[True] * 3 if periodic else None)
    got = {(int(a), int(b), tuple(np.round(c.astype(float), 4))) for a, b, c in zip(s, r, shift,
                                                                                     strict=True)}
    ref = {(a, b, tuple(np.round(c, 4))) for a, b, c in _brute_radius(pos, 2.6, cell)}
    assert got == ref and len(got) == len(s)
    if periodic:
        assert any(np.any(c) for *_, c in got)  # some edges do cross the boundary


def test_periodic_atoms_carry_shifts():
    a = Atoms("H2", positions=[[0.1, 0, 0], [2.9, 0, 0]], cell=[3, 3, 3], pbc=True)
    g = from_atoms(a, options=FeaturizeOptions(edge_set="radius", cutoff=0.5,
                                               perceive_bonds=False))
    assert g.n_edge[0] == 2
    vec = (g.nodes["positions"][g.senders] - g.nodes["positions"][g.receivers]
           + g.edges["shift"])
    np.testing.assert_allclose(np.linalg.norm(vec, axis=1), [0.2, 0.2], atol=1e-5)


def test_from_rdkit_uses_the_mols_bonds():
    from rdkit import Chem
    from rdkit.Chem import AllChem

    mol = Chem.AddHs(Chem.MolFromSmiles("Oc1ccccc1C#N"))
    AllChem.EmbedMolecule(mol, randomSeed=7)
    g = from_rdkit(mol, options=FeaturizeOptions(edge_set="bonds"))
    assert g.n_edge[0] == 2 * mol.GetNumBonds()
    assert sorted(_bond_dict(g).values()).count(3) == 6 and 2 in _bond_dict(g).values()
    heavy_only = Chem.MolFromSmiles("CCO")
    with pytest.raises(ValueError, match="CCO: RDKit Mol has no conformer"):
        from_rdkit(heavy_only)
    AllChem.EmbedMolecule(heavy_only, randomSeed=7)
    with pytest.raises(ValueError, match="CCO: RDKit Mol has implicit hydrogens"):
        from_rdkit(heavy_only)


@pytest.mark.parametrize(
    ("z", "pos", "match"),
    [
        (["C", "Xx"], np.zeros((2, 3)), r"water-ish: unknown element symbol\(s\) \['Xx'\]"),
        ([6, 1], [[0, 0, 0], [np.nan, 0, 0]], r"water-ish: NaN or infinite coordinates at atom"),
        ([], np.zeros((0, 3)), "water-ish: molecule has zero atoms"),
        ([6, 1, 1], np.zeros((2, 3)), "water-ish: 3 atomic numbers but 2 positions"),
        ([6, 1], np.zeros((2, 2)), r"water-ish: positions must have shape \[num_atoms, 3\]"),
        ([16, 1], [[0, 0, 0], [1.3, 0, 0]], r"water-ish: element\(s\) \['S'\] not in the"),
    ],
)
def test_bad_input_names_molecule_and_problem(z, pos, match):
    with pytest.raises(ValueError, match=match):
        featurize(np.array(z), pos, name="water-ish")


def test_options_validated():
    with pytest.raises(ValueError, match="needs a positive cutoff"):
        FeaturizeOptions(edge_set="radius")
    with pytest.raises(ValueError, match="edge_set must be one of"):
        FeaturizeOptions(edge_set="knn")
    with pytest.raises(ValueError, match="unknown element symbol 'Q'"):
        FeaturizeOptions(elements=("H", "Q"))


def test_qm9_slice_all_take_template_path(qm9_raw, qm9_molset):
    from rdkit import Chem

    assert set(np.unique(qm9_molset.path)) == {0}  # PATHS[0] == "template"
    for m, nb in zip(qm9_raw[:100], qm9_molset.n_bonds[:100], strict=True):
        assert nb == Chem.AddHs(Chem.MolFromSmiles(m.smiles)).GetNumBonds(), m.id


def test_strained_cage_gets_spurious_bond_removed(qm9_raw):
    """Bicyclo[1.1.1]pentane (QM9 id 105): connect-the-dots bonds the two bridgeheads."""
    m = next(m for m in qm9_raw if m.id == 105)
    p = perceive(m.z, m.positions, m.smiles)
    assert p.path == "template" and len(p.bonds) == 14
    d = np.linalg.norm(m.positions[p.bonds[:, 0]] - m.positions[p.bonds[:, 1]], axis=1)
    assert d.max() < 1.6  # the 1.87 Å bridgehead "bond" is gone
