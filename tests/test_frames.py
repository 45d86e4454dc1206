"""Tests of the energy/force readers, radius graphs and the committed GFN2-xTB ethanol set."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import ase.io
import numpy as np
import pytest
from ase import Atoms, units
from ase.build import bulk, molecule
from ase.calculators.singlepoint import SinglePointCalculator

from mpattn.data.frames import (
    FrameSet,
    covalent_bonds,
    ethanol_xtb_path,
    read_extxyz,
    read_frames,
    read_rmd17,
    split_frames,
)
from mpattn.data.loader import BatchLoader
from mpattn.graph import Budget, pad_batch

ETHANOL = Path(__file__).resolve().parents[1] / "mpattn/data/files/ethanol_xtb.extxyz.gz"
ETHANOL_Z = [6, 6, 8, 1, 1, 1, 1, 1, 1]  # ase.build.molecule("CH3CH2OH") order
KCAL_MOL = units.kcal / units.mol


@pytest.fixture(scope="module")
def ethanol() -> FrameSet:
    return read_frames(ETHANOL)


def _frame(atoms: Atoms, energy=None, forces=None, **info) -> Atoms:
    a = atoms.copy()
    a.info.update(info)
    if energy is not None or forces is not None:
        results = {} if energy is None else {"energy": energy}
        if forces is not None:
            results["forces"] = forces
        a.calc = SinglePointCalculator(a, **results)
    return a


# --------------------------------------------------------------------------- committed data


def test_committed_ethanol(ethanol):
    assert ethanol_xtb_path() == ETHANOL and ethanol.source == str(ETHANOL)
    assert len(ethanol) == 2000 and not ethanol.rejected
    np.testing.assert_array_equal(ethanol.n_atoms, np.full(2000, 9))
    np.testing.assert_array_equal(ethanol.z, np.tile(ETHANOL_Z, 2000))
    np.testing.assert_array_equal(ethanol.ids, np.arange(2000))
    assert ethanol.positions.shape == (18000, 3) and ethanol.forces.shape == (18000, 3)
    assert ethanol.energy.dtype == np.float64 and ethanol.forces.dtype == np.float64
    assert np.all(np.isfinite(ethanol.energy)) and np.all(np.isfinite(ethanol.forces))
    assert not ethanol.pbc.any() and not ethanol.cell.any()
    # GFN2-xTB ethanol is about -11.39 Hartree = -310 eV (not Hartree, not kcal/mol)
    assert np.all((ethanol.energy > -311.0) & (ethanol.energy < -308.0))
    # equipartition at 500 K: std(E_pot) ~ sqrt((3N - 6) / 2) kT = 139 meV for 9 atoms
    expected = np.sqrt(21 / 2) * units.kB * 500
    np.testing.assert_allclose(ethanol.energy.std(), expected, rtol=0.3)
    # raw forces of an isolated molecule sum to zero (no constraint projection was stored)
    np.testing.assert_allclose(ethanol.forces.reshape(2000, 9, 3).sum(1), 0.0, atol=1e-6)


def test_committed_ethanol_stays_intact(ethanol):
    ref = covalent_bonds(ETHANOL_Z, molecule("CH3CH2OH").positions)
    assert ref.sum() == 2 * 8  # C-C, C-O, O-H and 5 C-H
    for i in range(len(ethanol)):
        np.testing.assert_array_equal(
            covalent_bonds(ETHANOL_Z, ethanol.positions[ethanol.atom_index(i)]), ref
        )


def test_committed_forces_are_xtb_forces(ethanol):
    """Stored forces = tblite's at the stored positions = -dE/dR by central differences."""
    pytest.importorskip("tblite")
    from tblite.ase import TBLite

    atoms = ethanol.atoms(123)
    energy, forces = atoms.get_potential_energy(), atoms.get_forces()
    atoms.calc = TBLite(method="GFN2-xTB", verbosity=0)
    np.testing.assert_allclose(atoms.get_potential_energy(), energy, atol=1e-6)
    np.testing.assert_allclose(atoms.get_forces(), forces, atol=1e-3)
    h = 1e-3
    fd = np.zeros_like(forces)
    pos = atoms.positions.copy()
    for i, k in itertools.product(range(len(atoms)), range(3)):
        e = []
        for step in (h, -h):
            p = pos.copy()
            p[i, k] += step
            atoms.positions = p
            e.append(atoms.get_potential_energy())
        fd[i, k] = -(e[0] - e[1]) / (2 * h)
    np.testing.assert_allclose(fd, forces, atol=1e-3)  # measured: 1.1e-4 eV/Å


# --------------------------------------------------------------------------- readers


def test_rmd17_round_trip(ethanol, tmp_path):
    sub = ethanol.subset(np.arange(0, 2000, 97))
    f = len(sub)
    path = tmp_path / "rmd17_ethanol.npz"
    np.savez(path, nuclear_charges=np.array(ETHANOL_Z), coords=sub.positions.reshape(f, 9, 3),
             energies=sub.energy / KCAL_MOL, forces=sub.forces.reshape(f, 9, 3) / KCAL_MOL,
             old_indices=np.arange(f))
    back = read_frames(path)
    assert len(back) == f and back.source == str(path)
    np.testing.assert_array_equal(back.z, sub.z)
    np.testing.assert_array_equal(back.ids, np.arange(f))
    np.testing.assert_array_equal(back.positions, sub.positions)
    np.testing.assert_allclose(back.energy, sub.energy, rtol=1e-14)
    np.testing.assert_allclose(back.forces, sub.forces, rtol=1e-14, atol=1e-14)
    # a kcal/mol value is 0.0434 eV
    np.testing.assert_allclose(KCAL_MOL, 0.0433641, rtol=1e-5)


def test_rmd17_missing_keys(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, nuclear_charges=np.array([1, 1]), coords=np.zeros((3, 2, 3)))
    with pytest.raises(ValueError, match=re.escape(f"{path}: not a revised MD17 file: "
                                                   "missing key(s) energies, forces")):
        read_rmd17(path)
    np.savez(path, nuclear_charges=np.array([1, 1]), coords=np.zeros((3, 2, 3)),
             energies=np.zeros(3), forces=np.zeros((3, 3, 3)))
    with pytest.raises(ValueError, match="inconsistent shapes"):
        read_rmd17(path)


@pytest.mark.parametrize("suffix", [".extxyz", ".xyz.bz2", ".extxyz.xz"])
def test_frame_without_energy_is_reported(tmp_path, suffix):
    base = molecule("H2O")
    rng = np.random.default_rng(0)
    forces = [rng.normal(size=(3, 3)) for _ in range(4)]
    frames = [_frame(base, energy=-float(i), forces=forces[i]) for i in range(4)]
    frames[2] = _frame(base)  # no calculator: no energy, no forces
    path = tmp_path / f"water{suffix}"
    ase.io.write(path, frames, format="extxyz")
    with pytest.warns(UserWarning, match=re.escape(f"{path}: 1 of 4 frame(s) rejected: "
                                                   "frame 2: no energy (energy)")):
        fs = read_frames(path)
    assert fs.rejected == [(2, "no energy (energy)")]
    np.testing.assert_array_equal(fs.ids, [0, 1, 3])
    np.testing.assert_allclose(fs.energy, [0.0, -1.0, -3.0])
    np.testing.assert_allclose(fs.forces, np.concatenate([forces[0], forces[1], forces[3]]))


def test_frames_without_forces_when_others_have_them(tmp_path):
    base = molecule("H2O")
    frames = [_frame(base, energy=-1.0, forces=np.ones((3, 3))), _frame(base, energy=-2.0)]
    path = tmp_path / "mixed.extxyz"
    ase.io.write(path, frames, format="extxyz")
    with pytest.warns(UserWarning, match="frame 1: no forces"):
        fs = read_extxyz(path)
    np.testing.assert_array_equal(fs.ids, [0])
    # no frame with forces at all: forces is None, nothing rejected
    ase.io.write(path, [frames[1], frames[1]], format="extxyz")
    fs = read_extxyz(path)
    assert fs.forces is None and len(fs) == 2 and not fs.rejected


def test_energy_and_forces_keys(tmp_path):
    base = molecule("H2O")
    a = base.copy()
    a.info["REF_energy"] = -7.5
    a.arrays["REF_forces"] = np.arange(9.0).reshape(3, 3)
    path = tmp_path / "ref.extxyz"
    ase.io.write(path, [a, a], format="extxyz")
    fs = read_extxyz(path, energy_key="REF_energy", forces_key="REF_forces")
    np.testing.assert_allclose(fs.energy, [-7.5, -7.5])
    np.testing.assert_allclose(fs.forces, np.tile(np.arange(9.0).reshape(3, 3), (2, 1)))


def test_no_usable_frame(tmp_path):
    path = tmp_path / "empty.extxyz"
    ase.io.write(path, [_frame(molecule("H2O"))] * 2, format="extxyz")
    with pytest.warns(UserWarning), pytest.raises(
            ValueError, match=re.escape(f"{path}: no usable frame with an energy (2 frame(s)")):
        read_extxyz(path)


def test_read_frames_errors_and_other_formats(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file: .*missing.extxyz"):
        read_frames(tmp_path / "missing.extxyz")
    odd = tmp_path / "data.unknownsuffix"
    odd.write_text("nothing\n")
    with pytest.raises(ValueError, match="data.unknownsuffix: unknown format"):
        read_frames(odd)
    traj = tmp_path / "water.traj"
    ase.io.write(traj, [_frame(molecule("H2O"), energy=-3.0, forces=np.ones((3, 3)))])
    fs = read_frames(traj)
    np.testing.assert_allclose(fs.energy, [-3.0])
    np.testing.assert_allclose(fs.forces, np.ones((3, 3)))


def test_subset_and_atoms(ethanol):
    sub = ethanol.subset([5, 2])
    np.testing.assert_array_equal(sub.ids, [5, 2])
    np.testing.assert_array_equal(sub.positions[9:], ethanol.positions[18:27])
    a = sub.atoms(1)
    np.testing.assert_array_equal(a.positions, ethanol.positions[18:27])
    np.testing.assert_allclose(a.get_potential_energy(), ethanol.energy[2])
    np.testing.assert_allclose(a.get_forces(), ethanol.forces[18:27])


def test_split_frames():
    train, val, test = split_frames(2000, 950, 50, seed=3)
    assert (len(train), len(val), len(test)) == (950, 50, 1000)
    np.testing.assert_array_equal(np.sort(np.concatenate([train, val, test])), np.arange(2000))
    again = split_frames(2000, 950, 50, seed=3)
    for a, b in zip((train, val, test), again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(split_frames(2000, 950, 50, seed=4)[0], train)
    assert len(split_frames(2000, 950, 50, 0, n_test=100)[2]) == 100
    with pytest.raises(ValueError, match="cannot split 100 frames into 95 training, 50"):
        split_frames(100, 95, 50, 0)


# --------------------------------------------------------------------------- radius graphs


def _brute_force(pos, cutoff, cell=None):
    """Set of (sender, receiver, shift) with |pos[s] - pos[r] + shift| < cutoff, by loops."""
    if cell is None:
        images = [np.zeros(3)]
    else:  # enough images: ceil(cutoff / plane spacing) + 1 along each cell vector
        spacing = 1.0 / np.linalg.norm(np.linalg.inv(cell).T, axis=1)
        reach = [range(-m, m + 1) for m in (np.ceil(cutoff / spacing).astype(int) + 1)]
        images = [np.array(n) @ cell for n in itertools.product(*reach)]
    out = set()
    for s, r in itertools.product(range(len(pos)), repeat=2):
        for shift in images:
            if (s != r or shift.any()) and np.linalg.norm(pos[s] - pos[r] + shift) < cutoff:
                out.add((s, r, tuple(np.round(shift, 4))))
    return out


def _edges(gs, i):
    e = slice(int(gs.edge_offsets[i]), int(gs.edge_offsets[i + 1]))
    return {(int(s), int(r), tuple(np.round(sh.astype(np.float64), 4))) for s, r, sh in
            zip(gs.senders[e], gs.receivers[e], gs.edges["shift"][e], strict=True)}


def test_radius_graph_molecules(ethanol):
    sub = ethanol.subset([0, 777, 1999])
    for cutoff in (1.5, 2.5):
        gs = sub.to_graphset(cutoff)
        assert gs.edges["bond"].dtype == np.int32 and np.all(gs.edges["bond"] == 4)
        np.testing.assert_array_equal(gs.edges["shift"], 0.0)
        for i in range(3):
            pos = sub.positions[sub.atom_index(i)]
            assert _edges(gs, i) == _brute_force(pos, cutoff)
    # 1.7 Å holds exactly the 8 covalent bonds (16 directed edges) of a thermal ethanol
    # frame; 2.5 Å adds geminal pairs, fewer than all 72
    bonded = covalent_bonds(sub.z[sub.atom_index(0)], sub.positions[sub.atom_index(0)])
    assert bonded.sum() == 16
    assert {(s, r) for s, r, _ in _edges(sub.to_graphset(1.7), 0)} == set(
        zip(*np.nonzero(bonded), strict=True))
    assert 16 < len(_edges(sub.to_graphset(2.5), 0)) < 72


def test_radius_graph_periodic(tmp_path):
    rng = np.random.default_rng(1)
    frames = []
    for cubic in (False, True):  # triclinic primitive cell (2 atoms) and cubic cell (8 atoms)
        si = bulk("Si", "diamond", a=5.43, cubic=cubic)
        si.rattle(0.1, rng=rng)
        frames.append(_frame(si, energy=-10.0, forces=rng.normal(size=(len(si), 3))))
    path = tmp_path / "si.extxyz"
    ase.io.write(path, frames, format="extxyz")
    fs = read_frames(path)
    assert fs.pbc.all()
    np.testing.assert_allclose(fs.cell, [np.asarray(f.cell) for f in frames])
    for cutoff in (3.0, 4.5):
        gs = fs.to_graphset(cutoff)
        for i in range(2):
            pos = fs.positions[fs.atom_index(i)]
            expected = _brute_force(pos, cutoff, fs.cell[i])
            assert _edges(gs, i) == expected
            shortest = 5.43 / np.sqrt(2) if i == 0 else 5.43  # shortest lattice vector
            assert any(s == r for s, r, _ in expected) == (cutoff > shortest)  # self-images


def test_graphset_fields_and_batches(ethanol):
    sub = ethanol.subset(np.arange(10))
    gs = sub.to_graphset(3.0)
    assert gs.nodes["features"].shape == (90, 0) and gs.nodes["features"].dtype == np.float32
    assert gs.nodes["positions"].dtype == np.float32 and gs.nodes["forces"].dtype == np.float32
    assert gs.globals["energy"].dtype == np.float64
    assert set(sub.to_graphset(3.0, targets=False).nodes) == {"z", "positions", "features"}
    batch = pad_batch(gs, np.array([3, 1]), Budget(32, 256, 4))
    assert batch.nodes["features"].shape == (32, 0)
    np.testing.assert_allclose(batch.nodes["forces"][:18],
                               np.concatenate([sub.forces[27:36], sub.forces[9:18]]), rtol=1e-6)
    np.testing.assert_array_equal(batch.nodes["forces"][18:], 0.0)
    loader = BatchLoader(gs, 4, shuffle=False, prefetch=0)
    seen = []
    for b in loader:
        real = b.globals["id"] >= 0
        k = int(real.sum())
        n = int(b.n_node[:k].sum())
        ids = b.globals["id"][real]
        np.testing.assert_array_equal(b.globals["energy"][real], sub.energy[ids])
        np.testing.assert_array_equal(b.globals["energy"][~real], 0.0)
        np.testing.assert_array_equal(b.nodes["forces"][:n],
                                      sub.forces[9 * ids[0]: 9 * (ids[-1] + 1)].astype(np.float32))
        np.testing.assert_array_equal(b.nodes["forces"][n:], 0.0)
        seen.extend(ids.tolist())
    assert seen == list(range(10))


# --------------------------------------------------------------------------- generator


def test_generator_writes_frames(tmp_path):
    pytest.importorskip("tblite")
    from experiments.make_xtb_dataset import main, start_geometry

    out = tmp_path / "methanol.extxyz.gz"
    rc = main(["--molecule", "methanol", "--frames", "5", "--interval", "2",
               "--equilibration", "10", "--seed", "1", "--output", str(out), "--no-progress"])
    assert rc == 0
    fs = read_frames(out)
    assert len(fs) == 5 and not fs.rejected
    np.testing.assert_array_equal(fs.z, np.tile(molecule("CH3OH").numbers, 5))
    first = next(ase.io.iread(out, format="extxyz", index=":"))
    assert first.info["method"] == "GFN2-xTB" and first.info["interval"] == 2
    assert first.info["step"] == 12 and first.info["seed"] == 1
    assert first.info["temperature_K"] == 500.0 and "tblite_version" in first.info
    with pytest.raises(ValueError, match="unknown molecule 'unobtainium'.*ethanol, methanol"):
        start_geometry("unobtainium")
