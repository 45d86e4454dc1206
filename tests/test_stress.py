"""Stress as the strain derivative of the energy: mpattn.potential.energy_forces_stress
against central differences of the energy under symmetric strain (float64), invariances
(translation, permutation, rotation), batches with molecules and padding, the ASE calculator
against ASE's numerical stress, a FIRE cell relaxation and a liquid-water box."""

from __future__ import annotations

import functools
import itertools

import jax
import jraph
import numpy as np
import pytest
from ase import Atoms
from ase.build import molecule
from ase.calculators.calculator import PropertyNotImplementedError
from ase.calculators.fd import calculate_numerical_stress
from ase.filters import FrechetCellFilter
from ase.optimize import FIRE
from ase.stress import full_3x3_to_voigt_6_stress
from flax import nnx
from scipy.spatial.transform import Rotation

from mpattn.ase import Calculator
from mpattn.graph import Budget
from mpattn.models import create_model
from mpattn.neighbors import neighbor_graph, radius_edges
from mpattn.potential import Potential, Reference, energy_and_forces, energy_forces_stress

CUTOFF = 3.5
BUDGET = Budget(16, 1024, 2)  # every strained copy of the small box fits: one compile
SMALL = {
    "attention": {"dim": 16, "num_heads": 2, "head_dim": 8, "steps": 2, "ff_dim": 32,
                  "num_rbf": 8, "cutoff": CUTOFF, "vector_features": True},
    "schnet": {"dim": 16, "num_filters": 16, "interactions": 2, "num_rbf": 8,
               "cutoff": CUTOFF},
    "so3krates": {"dim": 16, "num_heads": 2, "degree_dim": 4, "steps": 2, "mix_dim": 16,
                  "num_rbf": 8, "cutoff": CUTOFF},
}
# a triclinic cell whose lattice-plane spacings (~4.3 Å) are below twice the cutoff: edges to
# several images of one atom, and to the atom's own images
CELL = np.array([[4.6, 0.0, 0.0], [0.5, 4.4, 0.0], [0.3, -0.4, 4.8]])


def potential(kind: str = "attention", seed: int = 0, reference: Reference | None = None
              ) -> Potential:
    """An untrained small potential for H and O (random weights)."""
    model = create_model(kind, rngs=nnx.Rngs(seed), **SMALL[kind])
    if reference is None:
        return Potential(model, elements=("H", "O"))
    return Potential(model, reference=reference)


def waters(centres, seed: int) -> Atoms:
    """Water molecules at ``centres`` [n, 3] Å in random (seeded) orientations."""
    h2o = molecule("H2O")
    local = h2o.positions - h2o.get_center_of_mass()
    rot = Rotation.random(len(centres), random_state=seed).as_matrix()
    pos = np.concatenate([local @ r.T + c for r, c in zip(rot, centres, strict=True)])
    return Atoms("H2O" * len(centres), positions=pos)


def small_box(seed: int = 0) -> Atoms:
    """Four rattled water molecules (12 atoms) in the triclinic cell ``CELL``, periodic."""
    frac = np.array([[0.25, 0.25, 0.25], [0.75, 0.75, 0.25], [0.75, 0.25, 0.75],
                     [0.25, 0.75, 0.75]])
    atoms = waters(frac @ CELL, seed)
    atoms.set_cell(CELL)
    atoms.pbc = True
    atoms.rattle(0.05, seed=seed)
    return atoms


def water_box(n_side: int = 4, seed: int = 0) -> Atoms:
    """``n_side**3`` water molecules on a cubic grid at 1 g/cm³, random orientations."""
    n = n_side**3
    mass = n * sum(molecule("H2O").get_masses()) / 6.02214076e23  # g
    length = (mass / 1.0) ** (1 / 3) * 1e8  # Å
    grid = (np.array(list(itertools.product(range(n_side), repeat=3))) + 0.5) / n_side
    atoms = waters(grid * length, seed)
    atoms.set_cell(np.eye(3) * length)
    atoms.pbc = True
    return atoms


def float64(pot: Potential) -> Potential:
    """A copy of ``pot`` with float64 parameters (as ``Calculator(dtype="float64")`` casts)."""
    graphdef, state = nnx.split(pot)
    return nnx.merge(graphdef, jax.tree.map(
        lambda x: x.astype(np.float64) if np.issubdtype(x.dtype, np.floating) else x, state))


@functools.partial(jax.jit, static_argnums=0)
def _efs(graphdef, state, graph):
    return energy_forces_stress(nnx.merge(graphdef, state), graph)


@functools.partial(jax.jit, static_argnums=0)
def _ef(graphdef, state, graph):
    return energy_and_forces(nnx.merge(graphdef, state), graph)


def efs(pot, atoms, budget=BUDGET):
    """Energy (float), forces [n, 3] and stress [3, 3] of one structure, float64 numpy."""
    graph, _ = neighbor_graph(atoms, CUTOFF, budget, dtype=np.float64)
    e, f, s = _efs(*nnx.split(pot), graph)
    return float(e[0]), np.asarray(f)[:len(atoms)], np.asarray(s)[0]


def strained(atoms, eps) -> Atoms:
    """``atoms`` under the strain ``r -> r (I + eps)`` (cell and positions alike)."""
    a = atoms.copy()
    a.set_cell(np.asarray(atoms.cell) @ (np.eye(3) + eps), scale_atoms=True)
    return a


# ------------------------------------------------------------------ strain derivative


@pytest.mark.parametrize("kind", ["attention", "schnet", "so3krates"])
def test_stress_equals_central_differences_under_symmetric_strain(x64, kind):
    pot = potential(kind)
    atoms = small_box()
    energy, forces, stress = efs(pot, atoms)
    volume = atoms.get_volume()
    h = 1e-5
    fd = np.zeros((3, 3))
    for i, j in [(0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1)]:
        d = np.zeros((3, 3))
        d[i, j] = d[j, i] = 1.0  # the symmetric direction; off-diagonal it moves ε_ij and ε_ji
        e = [efs(pot, strained(atoms, sign * h * d))[0] for sign in (1, -1)]
        fd[i, j] = fd[j, i] = (e[0] - e[1]) / (2 * h * volume * (1 if i == j else 2))
    rel = np.abs(stress - fd) / np.abs(fd)
    print(f"{kind}: stress (eV/Å³) {full_3x3_to_voigt_6_stress(stress)}, relative error "
          f"of the 6 components {full_3x3_to_voigt_6_stress(rel)}")
    assert np.all(np.abs(fd) > 1e-5)  # every component far from 0: a relative test
    assert np.all(rel < 1e-6), rel
    np.testing.assert_allclose(stress, stress.T, rtol=1e-12, atol=0)
    # the same energy and forces as energy_and_forces
    graph, _ = neighbor_graph(atoms, CUTOFF, BUDGET, dtype=np.float64)
    e_ref, f_ref = _ef(*nnx.split(pot), graph)
    np.testing.assert_allclose(energy, float(e_ref[0]), rtol=1e-14)
    np.testing.assert_allclose(forces, np.asarray(f_ref)[:len(atoms)], rtol=1e-12, atol=1e-14)
    assert np.abs(forces).max() > 1e-3


def test_the_strain_deforms_the_image_shifts(x64):
    """Without the shifts strained (positions only, the cell held) the derivative differs:
    the test above can fail."""
    pot = potential()
    atoms = small_box()
    _, _, stress = efs(pot, atoms)
    h, d = 1e-5, np.diag([1.0, 0.0, 0.0])
    e = []
    for sign in (1, -1):
        a = atoms.copy()
        a.positions = atoms.positions @ (np.eye(3) + sign * h * d)
        e.append(efs(pot, a)[0])
    positions_only = (e[0] - e[1]) / (2 * h * atoms.get_volume())
    assert abs(positions_only - stress[0, 0]) > 1e-3 * abs(stress[0, 0])


def test_batches_with_molecules_and_padding(x64):
    """Two periodic boxes and a molecule in one jraph batch: each box's energy, forces and
    stress as alone, the molecule's and the padding graphs' stress exactly 0, nothing NaN."""
    pot = potential()
    boxes = [small_box(0), small_box(1)]
    boxes[1].set_cell(np.asarray(boxes[1].cell) * 1.05, scale_atoms=True)
    mol = molecule("H2O")
    graphs = []
    for a in [*boxes, mol]:
        periodic = bool(a.pbc.all())
        cell = np.asarray(a.cell) if periodic else None
        s, r, shift = radius_edges(a.positions, CUTOFF, cell, a.pbc if periodic else None)
        graphs.append(jraph.GraphsTuple(
            nodes={"z": a.numbers.astype(np.int32), "positions": a.positions,
                   "features": np.zeros((len(a), 0), np.float32)},
            edges={"bond": np.full(len(s), 4, np.int32), "shift": shift},
            senders=s, receivers=r, n_node=np.array([len(a)], np.int32),
            n_edge=np.array([len(s)], np.int32),
            globals={"cell": (cell if periodic else np.zeros((3, 3)))[None]}))
    batch = jraph.pad_with_graphs(jraph.batch_np(graphs), 48, 2048, 5)
    assert batch.globals["cell"].shape == (5, 3, 3)
    energy, forces, stress = (np.asarray(x) for x in _efs(*nnx.split(pot), batch))
    assert np.all(np.isfinite(stress)) and np.all(np.isfinite(forces))
    start = 0
    for k, a in enumerate(boxes):
        e1, f1, s1 = efs(pot, a)
        np.testing.assert_allclose(energy[k], e1, rtol=1e-12)
        np.testing.assert_allclose(forces[start:start + len(a)], f1, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(stress[k], s1, rtol=1e-10, atol=1e-14)
        start += len(a)
    assert np.abs(stress[0] - stress[1]).max() > 1e-4  # two different boxes
    np.testing.assert_array_equal(stress[2:], 0.0)  # the molecule, the padding graphs
    np.testing.assert_array_equal(energy[3:], 0.0)
    with pytest.raises(ValueError, match=r"needs graph.globals\['cell'\] of shape \(5, 3, 3\)"):
        energy_forces_stress(pot, batch._replace(globals={}))


# ------------------------------------------------------------------ invariances


def test_stress_is_invariant_under_translation_and_permutation_and_rotates(x64):
    pot = potential()
    atoms = small_box()
    e0, f0, s0 = efs(pot, atoms)
    assert np.abs(s0).max() > 1e-3
    moved = atoms.copy()
    moved.translate([1.3, -0.7, 2.9])
    moved.wrap()
    _, _, s = efs(pot, moved)
    np.testing.assert_allclose(s, s0, rtol=1e-9, atol=1e-12)
    perm = np.random.default_rng(0).permutation(len(atoms))
    e, f, s = efs(pot, atoms[perm])
    np.testing.assert_allclose(e, e0, rtol=1e-12)
    np.testing.assert_allclose(f, f0[perm], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(s, s0, rtol=1e-9, atol=1e-12)
    rot = Rotation.random(random_state=3).as_matrix()
    turned = atoms.copy()
    turned.set_cell(np.asarray(atoms.cell) @ rot.T)
    turned.positions = atoms.positions @ rot.T
    e, f, s = efs(pot, turned)
    np.testing.assert_allclose(e, e0, rtol=1e-12)
    np.testing.assert_allclose(f, f0 @ rot.T, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(s, rot @ s0 @ rot.T, rtol=1e-9, atol=1e-11)
    assert np.abs(rot @ s0 @ rot.T - s0).max() > 1e-4  # the rotation changes the tensor


# ------------------------------------------------------------------ ASE calculator


def test_calculator_stress_equals_ase_numerical_stress(x64):
    ref = Reference(("H", "O"), np.array([-13.6, -2042.6]), scale=0.7)
    calc = Calculator.from_potential(potential("attention", reference=ref), dtype="float64")
    assert "stress" in calc.implemented_properties
    atoms = small_box()
    atoms.calc = calc
    stress = atoms.get_stress()
    assert stress.shape == (6,) and stress.dtype == np.float64
    numerical = calculate_numerical_stress(atoms, eps=1e-5)  # what calc.calculate_numerical_
    # stress calls (deprecated in ASE 3.24)
    print(f"calculator stress {stress}\nASE numerical     {numerical}")
    assert np.abs(stress).min() > 1e-5
    np.testing.assert_allclose(stress, numerical, rtol=1e-5)
    # energy and forces of the same call agree with energy_forces_stress by hand
    e, f, s = efs(float64(calc.potential), atoms)
    np.testing.assert_allclose(stress, full_3x3_to_voigt_6_stress(s), rtol=1e-10)
    np.testing.assert_allclose(atoms.get_forces(), f, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(atoms.get_potential_energy(), e, rtol=1e-12)
    assert calc.compiles == 1


def test_calculator_refuses_stress_without_a_periodic_cell():
    calc = Calculator.from_potential(potential("schnet"))
    mol = molecule("H2O")
    mol.calc = calc
    assert np.isfinite(mol.get_potential_energy())  # energy and forces still work
    assert np.all(np.isfinite(mol.get_forces()))
    with pytest.raises(PropertyNotImplementedError, match="stress needs a cell periodic in "
                                                          "all three directions"):
        mol.get_stress()
    slab = small_box()
    slab.pbc = (True, True, False)
    with pytest.raises(PropertyNotImplementedError, match=r"pbc=\[True, True, False\]"):
        calc.get_stress(slab)
    assert calc.compiles == 1


def test_fire_cell_relaxation_lowers_the_energy_and_compiles_once():
    calc = Calculator.from_potential(potential(seed=1))
    atoms = small_box(seed=2)
    atoms.calc = calc
    cell0 = np.asarray(atoms.cell).copy()
    filtered = FrechetCellFilter(atoms)
    energies = []
    opt = FIRE(filtered, logfile=None)
    opt.attach(lambda: energies.append(filtered.get_potential_energy()))
    opt.run(fmax=1e-4, steps=15)
    stress = atoms.get_stress()
    print(f"energies {np.round(energies, 5)}\nstress {stress}\ncell change "
          f"{np.abs(np.asarray(atoms.cell) - cell0).max():.4f} Å, compiles {calc.compiles}")
    assert len(energies) >= 10 and np.all(np.isfinite(energies))
    assert np.all(np.isfinite(stress))
    assert energies[-1] < energies[0] - 1e-4
    assert max(energies) <= energies[0] + 1e-6  # never above the start
    assert np.abs(np.asarray(atoms.cell) - cell0).max() > 1e-3  # the cell relaxed too
    assert calc.compiles <= 2 and calc.budget_growths <= 1


def test_liquid_water_box_stress_is_finite():
    atoms = water_box(4, seed=0)  # 64 molecules, 192 atoms, 12.4 Å cube
    assert len(atoms) == 192
    np.testing.assert_allclose(atoms.get_masses().sum() * 1.66053907e-24
                               / (atoms.get_volume() * 1e-24), 1.0, rtol=1e-6)  # g/cm³
    atoms.calc = Calculator.from_potential(potential("attention", seed=2))
    stress = atoms.get_stress()
    forces = atoms.get_forces()
    print(f"water box stress (eV/Å³) {stress}")
    assert stress.shape == (6,) and np.all(np.isfinite(stress))
    assert np.all(np.isfinite(forces)) and np.isfinite(atoms.get_potential_energy())
    assert np.abs(stress).max() > 0
