"""MoleculeSet: vectorised graphs equal the single-molecule path; selection; summary; perception."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest

import mpattn.data.molecules as molecules
from mpattn.data.molecules import MoleculeSet, perceive_many
from mpattn.data.records import BadRecord, RawMolecule
from mpattn.featurize import NOT_BONDED, PATHS, FeaturizeOptions, featurize, perceive

# 20 molecules spread over the first 500 (sizes 5 to 19 atoms, rings, aromatics, F)
SAMPLE = np.linspace(0, 499, 20).astype(int)
OPTIONS = {
    "complete": FeaturizeOptions(edge_set="complete"),
    "bonds": FeaturizeOptions(edge_set="bonds"),
    "radius": FeaturizeOptions(edge_set="radius", cutoff=3.0),
}


@pytest.mark.parametrize("edge_set", list(OPTIONS))
def test_to_graphset_equals_single_molecule_featurize(qm9_raw, qm9_molset, edge_set):
    options = OPTIONS[edge_set]
    gs = qm9_molset.to_graphset(options)
    assert len(gs) == len(qm9_molset)
    np.testing.assert_array_equal(gs.ids, qm9_molset.ids)
    n_bonded = 0
    for i in SAMPLE:
        raw = qm9_raw[i]
        ref = featurize(raw.z, raw.positions, smiles=raw.smiles, options=options,
                        name=f"id {raw.id}")
        g = gs.graph(int(i))
        np.testing.assert_array_equal(g.n_node, ref.n_node)
        np.testing.assert_array_equal(g.n_edge, ref.n_edge)
        np.testing.assert_array_equal(g.nodes["z"], ref.nodes["z"])
        assert g.nodes["z"].dtype == np.int32 and g.nodes["positions"].dtype == np.float32
        np.testing.assert_allclose(g.nodes["positions"], ref.nodes["positions"], rtol=0,
                                   atol=1e-6)
        np.testing.assert_array_equal(g.nodes["features"], ref.nodes["features"])
        np.testing.assert_array_equal(g.senders, ref.senders, err_msg=f"id {raw.id}")
        np.testing.assert_array_equal(g.receivers, ref.receivers, err_msg=f"id {raw.id}")
        np.testing.assert_array_equal(g.edges["bond"], ref.edges["bond"], err_msg=f"id {raw.id}")
        assert set(g.edges) == {"bond"} and set(ref.edges) == {"bond"}
        n_bonded += int((g.edges["bond"] != NOT_BONDED).sum())
        for name in qm9_molset.targets:
            np.testing.assert_array_equal(g.globals[name], qm9_molset.targets[name][[i]])
    assert n_bonded > 0


def test_edge_counts_and_radius_edges(qm9_molset):
    ms = qm9_molset
    n = ms.n_atoms.astype(np.int64)
    complete = ms.to_graphset(OPTIONS["complete"])
    np.testing.assert_array_equal(complete.n_edge, n * (n - 1))
    assert (complete.senders != complete.receivers).all()
    bonds = ms.to_graphset(OPTIONS["bonds"])
    np.testing.assert_array_equal(bonds.n_edge, 2 * ms.n_bonds)
    assert (bonds.edges["bond"] != NOT_BONDED).all()
    np.testing.assert_array_equal(np.bincount(bonds.edges["bond"], minlength=4)[:4] // 2,
                                  np.bincount(ms.bond_type, minlength=4))
    # radius: exactly the ordered pairs closer than the cutoff, checked by brute force
    radius = ms.to_graphset(OPTIONS["radius"])
    for i in range(0, len(ms), 25):
        g = radius.graph(i)
        pos = g.nodes["positions"].astype(np.float64)
        d = np.linalg.norm(pos[:, None] - pos[None], axis=-1)
        s, r = np.nonzero((d < 3.0) & ~np.eye(len(pos), dtype=bool))
        got = sorted(zip(g.senders.tolist(), g.receivers.tolist(), strict=True))
        assert got == sorted(zip(s.tolist(), r.tolist(), strict=True)), i
    assert radius.n_edge.sum() < complete.n_edge.sum()
    # the bond categories of bonded pairs agree between edge sets
    for i in (0, 100, 499):
        full = complete.graph(i)
        pairs = zip(full.senders.tolist(), full.receivers.tolist(), strict=True)
        table = dict(zip(pairs, full.edges["bond"].tolist(), strict=True))
        g = bonds.graph(i)
        for s, r, b in zip(g.senders.tolist(), g.receivers.tolist(), g.edges["bond"].tolist(),
                           strict=True):
            assert table[(s, r)] == b


def test_to_graphset_targets(qm9_molset):
    gs = qm9_molset.to_graphset(targets=["U0", "gap"])
    assert list(gs.globals) == ["U0", "gap"]
    np.testing.assert_array_equal(gs.globals["U0"], qm9_molset.targets["U0"])
    assert gs.globals["U0"].dtype == np.float64
    assert list(qm9_molset.to_graphset(targets=[]).globals) == []
    with pytest.raises(ValueError, match=re.escape("unknown target 'u0'; available: ['A', ")):
        qm9_molset.to_graphset(targets=["u0"])


def test_to_graphset_unknown_element(qm9_molset):
    with pytest.raises(ValueError, match=re.escape("dataset: element(s) ['F'] not in the "
                                                   "featurization's element list")):
        qm9_molset.to_graphset(FeaturizeOptions(elements=("H", "C", "N", "O")))


def test_to_atoms_gives_each_molecule_as_ase_atoms(qm9_raw, qm9_molset):
    index = [499, 3, 17]
    atoms = qm9_molset.to_atoms(index)
    assert len(atoms) == 3 and len(qm9_molset.to_atoms()) == len(qm9_molset)
    for a, i in zip(atoms, index, strict=True):
        np.testing.assert_array_equal(a.numbers, qm9_raw[i].z)
        np.testing.assert_allclose(a.positions, qm9_raw[i].positions, atol=1e-5)  # float32
        assert not a.pbc.any()


def test_subset_and_index_of(qm9_raw, qm9_molset):
    ms = qm9_molset
    index = np.array([17, 3, 499, 3, 250])
    sub = ms.subset(index)
    assert len(sub) == 5
    np.testing.assert_array_equal(sub.ids, ms.ids[index])
    for k, i in enumerate(index):
        raw = qm9_raw[i]
        assert sub.ids[k] == raw.id and sub.smiles[k] == raw.smiles
        lo, hi = sub.atom_offsets[k], sub.atom_offsets[k + 1]
        np.testing.assert_array_equal(sub.z[lo:hi], raw.z)
        np.testing.assert_array_equal(sub.positions[lo:hi], raw.positions.astype(np.float32))
        b0, b1 = sub.bond_offsets[k], sub.bond_offsets[k + 1]
        c0, c1 = ms.bond_offsets[i], ms.bond_offsets[i + 1]
        np.testing.assert_array_equal(sub.bonds[b0:b1], ms.bonds[c0:c1])
        np.testing.assert_array_equal(sub.bond_type[b0:b1], ms.bond_type[c0:c1])
        np.testing.assert_array_equal(sub.aromatic[lo:hi],
                                      ms.aromatic[ms.atom_offsets[i]:ms.atom_offsets[i + 1]])
        assert sub.path[k] == ms.path[i]
        for name in ms.targets:
            assert sub.targets[name][k] == ms.targets[name][i]
    # a subset's graphs are the same graphs
    g_sub, g_all = sub.to_graphset().graph(2), ms.to_graphset().graph(499)
    np.testing.assert_array_equal(g_sub.nodes["features"], g_all.nodes["features"])
    np.testing.assert_array_equal(g_sub.edges["bond"], g_all.edges["bond"])

    assert ms.ids[-1] == 509  # ids skip QM9's uncharacterized molecules (58, 61, ...)
    np.testing.assert_array_equal(ms.index_of([1, 509, 2]), [0, 499, 1])
    np.testing.assert_array_equal(ms.index_of(ms.ids[index]), [17, 3, 499, 3, 250])
    shuffled = ms.subset(np.random.default_rng(0).permutation(len(ms)))
    np.testing.assert_array_equal(shuffled.ids[shuffled.index_of([5, 77, 509])], [5, 77, 509])
    assert ms.index_of([]).size == 0
    with pytest.raises(ValueError, match=re.escape("2 id(s) not in this dataset, e.g. "
                                                   "[100000, 0]")):
        ms.index_of([3, 100000, 0])
    with pytest.raises(ValueError, match=re.escape("1 id(s) not in this dataset, e.g. [58]")):
        ms.index_of([57, 58, 59])


def test_summary_counts_are_consistent(qm9_molset):
    ms = dataclasses.replace(qm9_molset, rejected=[BadRecord("f.csv row 3", 2, "bad")],
                             excluded=4)
    s = ms.summary()
    assert (s["molecules"], s["atoms"], s["bonds"]) == (500, len(ms.z), len(ms.bonds))
    assert sum(s["paths"].values()) == 500
    assert set(s["paths"]) <= set(PATHS) and s["paths"]["template"] > 400
    assert sum(e["atoms"] for e in s["elements"].values()) == s["atoms"]
    assert list(s["elements"]) == ["H", "C", "N", "O", "F"]
    # all but ammonia (id 2), water (3) and the oxatetrazole O1N=NN=N1 (177)
    assert s["elements"]["C"]["molecules"] == 500 - 3
    for symbol, e in s["elements"].items():
        z = {"H": 1, "C": 6, "N": 7, "O": 8, "F": 9}[symbol]
        per_mol = np.add.reduceat((ms.z == z).astype(int), ms.atom_offsets[:-1])
        assert e == {"atoms": int(per_mol.sum()), "molecules": int((per_mol > 0).sum())}
    hist = s["atoms_per_molecule"]
    assert sum(hist.values()) == 500
    assert sum(k * v for k, v in hist.items()) == s["atoms"]
    assert list(hist) == sorted(hist) and min(hist) == 3  # water
    assert (s["rejected"], s["excluded"]) == (1, 4)

    text = ms.format_summary()
    assert text.splitlines()[0] == (f"molecules: 500  atoms: {s['atoms']:,}  "
                                    f"bonds: {s['bonds']:,}")
    paths = ", ".join(f"{k} {v:,}" for k, v in s["paths"].items())
    assert f"bond perception: {paths}\n" in text
    assert "rejected records: 1  excluded on purpose: 4" in text
    assert "  rejected f.csv row 3 (id 2): bad" in text
    assert f"    3 {hist[3]:7,d} #" in text


def _bad_raw(good: RawMolecule) -> RawMolecule:
    pos = good.positions.copy()
    pos[1, 2] = np.nan
    return dataclasses.replace(good, id=900001, positions=pos, source="made-up.xyz")


def _assert_same_perception(p, q) -> None:
    assert p.path == q.path
    for k in ("bonds", "bond_type", "aromatic", "hybridization"):
        np.testing.assert_array_equal(getattr(p, k), getattr(q, k), err_msg=k)


def test_perceive_many_reports_a_bad_record(qm9_raw):
    good = qm9_raw[:8]
    records = [*good[:3], _bad_raw(good[3]), *good[3:]]
    kept, percs, bad = perceive_many(records, workers=1, progress=False)
    assert [m.id for m in kept] == [m.id for m in good]
    assert bad == [BadRecord(
        source="made-up.xyz", id=900001,
        reason="ValueError: made-up.xyz (id 900001): NaN or infinite coordinates at atom(s) [1]")]
    for m, p in zip(kept, percs, strict=True):
        _assert_same_perception(p, perceive(m.z, m.positions, m.smiles))
    ms = MoleculeSet.from_perceptions(kept, percs, rejected=bad)
    assert len(ms) == 8 and ms.rejected == bad


def test_perceive_many_in_spawned_workers_matches_serial(qm9_raw, monkeypatch):
    pools = []

    class Pool(molecules.ProcessPoolExecutor):
        def __init__(self, workers, **kwargs):
            pools.append((workers, kwargs["mp_context"].get_start_method()))
            super().__init__(workers, **kwargs)

    monkeypatch.setattr(molecules, "ProcessPoolExecutor", Pool)
    records = list(qm9_raw[:60])
    records.insert(30, _bad_raw(records[5]))
    serial = perceive_many(records, workers=1, progress=False)
    assert pools == []
    parallel = perceive_many(records, workers=2, progress=False, chunk_size=16)
    assert pools == [(2, "spawn")]
    assert [m.id for m in parallel[0]] == [m.id for m in serial[0]] == [m.id for m in qm9_raw[:60]]
    assert parallel[2] == serial[2] and [b.id for b in parallel[2]] == [900001]
    assert len(parallel[1]) == 60
    for p, q in zip(parallel[1], serial[1], strict=True):
        _assert_same_perception(p, q)
