"""mpattn.md.force_field and mpattn.md.dynamics: JAX-MD forces equal the ASE calculator's, NVE
follows ASE's velocity Verlet and conserves energy, neighbour-list growth keeps the trajectory
exact, replicas, thermostats, explosions and ensemble spreads stop the run."""

from __future__ import annotations

import dataclasses

import ase
import ase.io
import numpy as np
import pytest
from ase import units
from ase.md.verlet import VelocityVerlet
from flax import nnx

from mpattn.ase import Calculator
from mpattn.data.frames import ethanol_xtb_path, read_frames
from mpattn.md import ForceField, run_md
from mpattn.md.dynamics import initial_momenta
from mpattn.models.attention import AttentionConfig, AttentionModel
from mpattn.potential import Potential, fit_reference

CFG = AttentionConfig(dim=16, num_heads=2, head_dim=8, steps=2, ff_dim=32, num_rbf=8,
                      cutoff=4.0, vector_features=True)
QUIET = {"progress": False}


@pytest.fixture(scope="module")
def frames():
    return read_frames(ethanol_xtb_path()).subset(np.arange(20))


def make_potential(frames, seed=0, **changes) -> Potential:
    zs = [frames.z[frames.atom_index(i)] for i in range(len(frames))]
    ref = fit_reference(zs, frames.energy, ("H", "C", "O"), forces=frames.forces)
    return Potential(AttentionModel(dataclasses.replace(CFG, **changes), rngs=nnx.Rngs(seed)),
                     reference=ref)


@pytest.fixture(scope="module")
def pot(frames) -> Potential:
    """An untrained tiny attention potential (vector channels) with a fitted reference."""
    return make_potential(frames)


@pytest.fixture(scope="module")
def ethanol(frames):
    return frames.atoms(0)


def water_box(n: int = 8, side: float = 10.0, seed: int = 0, cell=None) -> ase.Atoms:
    """``n`` rigid waters at random non-overlapping places in a periodic box."""
    rng = np.random.default_rng(seed)
    w = np.array([[0.0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])
    centres: list = []
    while len(centres) < n:
        c = rng.uniform(0, side, 3)
        if all(np.linalg.norm((c - o + side / 2) % side - side / 2) > 2.6 for o in centres):
            centres.append(c)
    atoms = ase.Atoms("OH2" * n, positions=np.concatenate([w + c for c in centres]),
                      cell=cell if cell is not None else [side] * 3, pbc=True)
    atoms.wrap()
    return atoms


# ---------------------------------------------------------------- forces


@pytest.mark.parametrize("system", ["ethanol", "water", "triclinic"])
def test_force_field_matches_the_ase_calculator(pot, ethanol, system):
    atoms = {"ethanol": ethanol, "water": water_box(),
             "triclinic": water_box(cell=[[10.0, 0, 0], [2.0, 10.0, 0], [1.0, 1.5, 10.5]])
             }[system]
    atoms = atoms.copy()
    atoms.calc = Calculator.from_potential(pot)
    e, f = ForceField(pot, atoms).energy_forces(atoms.get_positions())
    assert e == pytest.approx(atoms.get_potential_energy(), abs=2e-4)
    np.testing.assert_allclose(f, atoms.get_forces(), atol=2e-5)
    assert np.abs(f).max() > 1e-3  # not trivially zero


def test_skin_edges_do_not_change_the_energy(pot, ethanol):
    """Pairs within cutoff + skin but beyond the cutoff contribute exactly nothing."""
    atoms = water_box(seed=1, side=12.0)
    e0, f0 = ForceField(pot, atoms, skin=0.0).energy_forces(atoms.get_positions())
    e1, f1 = ForceField(pot, atoms, skin=1.5).energy_forces(atoms.get_positions())
    assert e1 == pytest.approx(e0, abs=1e-5)
    np.testing.assert_allclose(f1, f0, atol=1e-5)


def test_float64(frames, ethanol, x64):
    pot = make_potential(frames)
    atoms = ethanol.copy()
    atoms.calc = Calculator.from_potential(pot, dtype="float64")
    e, f = ForceField(pot, atoms, dtype="float64").energy_forces(atoms.get_positions())
    assert e == pytest.approx(atoms.get_potential_energy(), abs=1e-9)
    np.testing.assert_allclose(f, atoms.get_forces(), atol=1e-10)


# ---------------------------------------------------------------- dynamics


def test_nve_follows_ase_velocity_verlet(pot, ethanol):
    """Same start (ASE's momenta, seed 0), same integrator: the same trajectory."""
    steps = 100
    r = run_md(ForceField(pot, ethanol), ethanol, steps=steps, log_every=50,
               temperature_K=300, seed=0, **QUIET)
    atoms = ethanol.copy()
    atoms.calc = Calculator.from_potential(pot)
    atoms.set_momenta(initial_momenta(ethanol, 300, 0))
    dyn = VelocityVerlet(atoms, timestep=0.5 * units.fs)
    dyn.run(steps)
    assert r["steps_done"] == steps and r["compiles"] == 1
    assert r["potential_energy_eV"][-1][0] == pytest.approx(atoms.get_potential_energy(),
                                                            abs=1e-3)
    e_kin = atoms.get_kinetic_energy()
    assert r["kinetic_energy_eV"][-1][0] == pytest.approx(e_kin, rel=1e-3)
    assert r["potential_energy_eV"][-1][0] != pytest.approx(r["potential_energy_eV"][0][0],
                                                            abs=1e-3)  # it moved


def test_nve_conserves_energy_and_writes_the_trajectory(pot, ethanol, tmp_path):
    out = tmp_path / "traj.extxyz"
    # min_distance 0.3: this untrained potential pulls an H to 0.47 Å of a neighbour
    r = run_md(ForceField(pot, ethanol), ethanol, steps=2000, log_every=100,
               temperature_K=300, trajectory=out, min_distance=0.3, **QUIET)
    assert r["stopped"] is None and r["compiles"] == 1 and r["neighbor_growths"] == 0
    assert abs(r["drift_meV_per_atom_per_ps"][0]) < 0.05
    assert r["max_deviation_meV_per_atom"][0] < 0.5
    frames = ase.io.read(out, ":")
    assert len(frames) == 21 and frames[-1].info["step"] == 2000
    assert frames[-1].get_potential_energy() == pytest.approx(r["potential_energy_eV"][-1][0])
    assert frames[-1].get_forces().shape == (9, 3)
    temps = np.asarray(r["temperature_K"])[:, 0]
    assert 50 < temps.mean() < 600


def two_waters(gap: float = 7.0, speed: float = 0.02) -> ase.Atoms:
    """Two waters ``gap`` Å apart flying at each other at ``speed`` Å/fs each."""
    w = np.array([[0.0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])
    atoms = ase.Atoms("OH2OH2", positions=np.concatenate([w, w + [gap, 0.3, 0.2]]))
    v = np.zeros((6, 3))
    v[:3, 0], v[3:, 0] = speed, -speed
    atoms.set_velocities(v / units.fs)
    return atoms


def test_neighbor_list_overflow_grows_and_the_trajectory_stays_exact(pot):
    atoms = two_waters()
    ff = ForceField(pot, atoms, capacity_multiplier=1.0, skin=0.2)
    small = ff.allocate(atoms.get_positions())  # intramolecular pairs only
    assert small.idx.shape[-1] == 6
    kw = dict(steps=600, log_every=20, temperature_K=None, **QUIET)
    grown = run_md(ff, atoms, neighbor=small, **kw)
    ample = run_md(ff, atoms, neighbor=ff.allocate(atoms.get_positions(), extra_capacity=8),
                   **kw)
    assert grown["neighbor_growths"] >= 1 and ample["neighbor_growths"] == 0
    assert grown["compiles"] == 1 + grown["neighbor_growths"]
    assert grown["neighbor_capacity"] > 6
    np.testing.assert_allclose(grown["potential_energy_eV"], ample["potential_energy_eV"],
                               atol=1e-5)
    np.testing.assert_allclose(grown["kinetic_energy_eV"], ample["kinetic_energy_eV"],
                               rtol=1e-5)
    # the molecules did meet: the energy changed by more than the tolerance
    e = np.asarray(ample["potential_energy_eV"])[:, 0]
    assert np.ptp(e) > 1e-3


def test_replicas_are_independent_trajectories_of_one_compile(pot, ethanol):
    one = run_md(ForceField(pot, ethanol), ethanol, steps=100, log_every=50, seed=3, **QUIET)
    many = run_md(ForceField(pot, ethanol), ethanol, steps=100, log_every=50, seed=3,
                  replicas=3, **QUIET)
    assert many["compiles"] == 1
    e = np.asarray(many["total_energy_eV"])  # [records, replicas]
    np.testing.assert_allclose(e[:, 0], np.asarray(one["total_energy_eV"])[:, 0], atol=1e-5)
    assert abs(e[0, 1] - e[0, 2]) > 1e-4  # other seeds, other momenta
    assert len(many["drift_meV_per_atom_per_ps"]) == 3


@pytest.mark.parametrize("ensemble", ["langevin", "nose-hoover"])
def test_thermostats_hold_the_temperature(pot, ensemble):
    atoms = water_box()
    r = run_md(ForceField(pot, atoms), atoms, ensemble=ensemble, steps=3000, log_every=100,
               temperature_K=600, friction_per_ps=50.0, tau_fs=25.0, seed=1,
               min_distance=0.3, **QUIET)  # the untrained potential has an H-H well at 0.47 Å
    temps = np.asarray(r["temperature_K"])[:, 0]
    assert r["stopped"] is None
    assert 450 < temps[len(temps) // 2:].mean() < 750


def test_a_time_step_that_explodes_is_stopped_and_reported(pot, ethanol, tmp_path):
    out = tmp_path / "boom.extxyz"
    r = run_md(ForceField(pot, ethanol), ethanol, steps=2000, log_every=20,
               timestep_fs=5.0, temperature_K=300, trajectory=out, **QUIET)
    assert r["stopped"] is not None and r["steps_done"] < 2000
    assert r["stopped"]["step"] == r["steps_done"]
    assert "exploded" in r["stopped"]["reason"]
    assert len(ase.io.read(out, ":")) == r["steps_done"] // 20 + 1


def test_ensemble_spread_stops_the_run(frames, ethanol):
    members = [make_potential(frames, seed=s) for s in (0, 1)]
    ff = ForceField(members, ethanol)
    e, f, es, fs = ff.energy_forces(ethanol.get_positions(), members=True)
    singles = [ForceField(p, ethanol).energy_forces(ethanol.get_positions()) for p in members]
    assert e == pytest.approx(np.mean([s[0] for s in singles]), abs=1e-4)
    np.testing.assert_allclose(fs, np.stack([s[1] for s in singles]), atol=1e-5)
    r = run_md(ff, ethanol, steps=100, log_every=20, max_force_std=1e-4, **QUIET)
    assert r["stopped"]["step"] == 20 and "extrapolating" in r["stopped"]["reason"]
    assert r["max_force_std_eV_per_A"][-1][0] > 1e-4
    assert r["energy_std_eV"][0][0] == pytest.approx(np.std(es), rel=1e-3)


# ---------------------------------------------------------------- bad input


def test_bad_input_is_refused(frames, pot, ethanol):
    with pytest.raises(ValueError, match=r"\['S'\] unknown"):
        ForceField(pot, ase.Atoms("CH3SH", positions=np.eye(6, 3) * 1.5))
    squeezed = ethanol.copy()
    squeezed.positions[1] = squeezed.positions[0] + [0.2, 0, 0]
    with pytest.raises(ValueError, match="atoms 0 and 1 overlap: 0.200 Å"):
        ForceField(pot, squeezed)
    with pytest.raises(ValueError, match="cell too small for the cutoff"):
        ForceField(pot, water_box(n=2, side=7.0))
    with pytest.raises(ValueError, match="smooth=False"):
        ForceField(make_potential(frames, smooth=False, attention_weights="softmax"),
                   ethanol)
    ff = ForceField(pot, ethanol)
    with pytest.raises(ValueError, match="ensemble must be one of"):
        run_md(ff, ethanol, ensemble="npt")
    with pytest.raises(ValueError, match="timestep_fs > 0"):
        run_md(ff, ethanol, timestep_fs=-1)
    with pytest.raises(ValueError, match="other atoms"):
        run_md(ff, water_box())
