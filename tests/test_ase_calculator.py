"""mpattn.neighbors, mpattn.ase.Calculator and mpattn.md: radius graphs vs brute force,
budgets that grow once, no recompilation in MD, forces vs finite differences, NVE drift."""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging

import jax
import jraph
import numpy as np
import pytest
from ase import Atoms, units
from ase.build import bulk, molecule
from ase.calculators.morse import MorsePotential
from ase.md.verlet import VelocityVerlet
from flax import nnx

from mpattn.ase import Calculator
from mpattn.data.frames import FrameSet, ethanol_xtb_path, read_frames
from mpattn.graph import Budget, pad_batch
from mpattn.md import energy_drift, plot_energy, run_nve
from mpattn.models.attention import AttentionConfig, AttentionModel
from mpattn.neighbors import BudgetPolicy, neighbor_graph, radius_edges
from mpattn.potential import Potential, energy_and_forces, fit_reference

# (softmax: the attention model's default weights when these tests were written)
TINY = {"dim": 16, "num_heads": 2, "head_dim": 8, "steps": 1, "ff_dim": 32, "num_rbf": 8,
        "cutoff": 4.0, "attention_weights": "softmax"}
CFG = AttentionConfig(**TINY)



@pytest.fixture(scope="module")
def frames() -> FrameSet:
    return read_frames(ethanol_xtb_path()).subset(np.arange(20))


@pytest.fixture(scope="module")
def pot(frames) -> Potential:
    """An untrained tiny attention potential with a reference fitted on 20 xTB frames."""
    zs = [frames.z[frames.atom_index(i)] for i in range(len(frames))]
    ref = fit_reference(zs, frames.energy, ("H", "C", "O"), forces=frames.forces)
    return Potential(AttentionModel(CFG, rngs=nnx.Rngs(0)), reference=ref)


def brute_force_edges(pos, cutoff, cell=None):
    """Sorted (sender, receiver, image) triples with |pos[s] - pos[r] + image @ cell| < cutoff."""
    pos = np.asarray(pos, np.float64)
    if cell is None:
        images = [np.zeros(3)]
    else:
        cell = np.asarray(cell, np.float64)
        # enough images: the distance between lattice planes bounds each range
        heights = 1.0 / np.linalg.norm(np.linalg.inv(cell), axis=0)
        k = np.ceil(cutoff / heights).astype(int) + 1
        images = [np.array(n, float) for n in itertools.product(*(range(-m, m + 1) for m in k))]
    out = []
    for n in images:
        shift = n @ cell if cell is not None else n
        for s in range(len(pos)):
            for r in range(len(pos)):
                d = np.linalg.norm(pos[s] - pos[r] + shift)
                if 0 < d < cutoff:
                    out.append((s, r, *np.rint(n).astype(int)))
    return sorted(out)


def graph_triples(graph, cell=None):
    e = int(graph.n_edge[0])
    s, r = graph.senders[:e], graph.receivers[:e]
    shift = np.asarray(graph.edges["shift"][:e], np.float64)
    images = np.zeros_like(shift) if cell is None else shift @ np.linalg.inv(cell)
    np.testing.assert_allclose(images, np.rint(images), atol=1e-5)
    images = np.rint(images).astype(int)
    return sorted((int(a), int(b), *i) for a, b, i in zip(s, r, images, strict=True))


def hand_graph(atoms, cutoff, budget=(64, 1024, 3), dtype=np.float32) -> jraph.GraphsTuple:
    """The same structure as tests/potential_helpers.py builds it, padded by jraph to another
    budget."""
    periodic = bool(atoms.pbc.any())
    cell = np.asarray(atoms.cell) if periodic else None
    s, r, shift = radius_edges(atoms.positions, cutoff, cell, atoms.pbc if periodic else None)
    if periodic:
        shift = np.rint(shift @ np.linalg.inv(cell)) @ cell
    g = jraph.GraphsTuple(
        nodes={"z": atoms.numbers.astype(np.int32), "positions": atoms.positions.astype(dtype),
               "features": np.zeros((len(atoms), 0), np.float32)},
        edges={"bond": np.full(len(s), 4, np.int32), "shift": shift.astype(dtype)},
        senders=s, receivers=r, n_node=np.array([len(atoms)], np.int32),
        n_edge=np.array([len(s)], np.int32), globals={})
    return jraph.pad_with_graphs(g, *budget)


@functools.partial(jax.jit, static_argnums=0)
def _energy_and_forces(graphdef, state, graph):
    return energy_and_forces(nnx.merge(graphdef, state), graph)


def by_hand(pot, atoms):
    """Jitted energy (float) and forces [n, 3] of a structure padded by jraph, as numpy."""
    e, f = _energy_and_forces(*nnx.split(pot), hand_graph(atoms, CFG.cutoff))
    return float(e[0]), np.asarray(f)[:len(atoms)]


@contextlib.contextmanager
def compile_log():
    """Collects JAX's "Compiling ..." log lines (as jax.log_compiles writes them)."""
    lines: list[str] = []

    class Handler(logging.Handler):
        def emit(self, record):
            msg = record.getMessage()
            if msg.startswith("Compiling "):
                lines.append(msg)

    handler, log = Handler(), logging.getLogger("jax")
    log.addHandler(handler)
    try:
        with jax.log_compiles():
            yield lines
    finally:
        log.removeHandler(handler)


# ------------------------------------------------------------------ neighbour lists


@pytest.mark.parametrize("cutoff", [1.2, 2.5, 4.0])
def test_molecule_radius_graph_equals_brute_force(cutoff):
    atoms = molecule("CH3CH2OH")
    graph, budget = neighbor_graph(atoms, cutoff)
    assert graph_triples(graph) == brute_force_edges(atoms.positions, cutoff)
    np.testing.assert_array_equal(graph.edges["shift"], 0)


@pytest.mark.parametrize("name, kw, cutoff", [
    ("Cu", {"crystalstructure": "fcc", "a": 3.6}, 4.0),  # 1 atom, cell vectors 2.5 Å < cutoff
    ("Si", {"crystalstructure": "diamond", "a": 5.43}, 3.0),
    ("NaCl", {"crystalstructure": "rocksalt", "a": 5.64, "cubic": True}, 3.5),
])
def test_periodic_radius_graph_equals_brute_force(name, kw, cutoff):
    atoms = bulk(name, **kw)
    atoms.rattle(0.05, seed=1)
    cell = np.asarray(atoms.cell)
    graph, _ = neighbor_graph(atoms, cutoff, dtype=np.float64)
    expected = brute_force_edges(atoms.positions, cutoff, cell)
    assert graph_triples(graph, cell) == expected
    # several images of the same pair when the cell is smaller than twice the cutoff
    pairs = [t[:2] for t in expected]
    assert max(pairs.count(p) for p in set(pairs)) > 1


@pytest.mark.parametrize("cutoff", [1.2, 4.0])
def test_radius_edges_in_receiver_order_are_vesins_full_list(cutoff):
    """order="receivers" (the default): vesin's full neighbour list (its pair (i, j) is the
    edge j -> i) sorted by (receiver, sender), zero float64 shifts for a molecule."""
    from vesin import NeighborList

    pos = molecule("CH3CH2OH").positions
    s, r, shift = radius_edges(pos, cutoff, order="receivers")
    i, j = NeighborList(cutoff=cutoff, full_list=True).compute(
        points=pos, box=np.zeros((3, 3)), periodic=False, quantities="ij")
    order = np.lexsort((j, i))
    assert s.dtype == r.dtype == np.int32 and shift.dtype == np.float64
    np.testing.assert_array_equal(r, i[order])
    np.testing.assert_array_equal(s, j[order])
    np.testing.assert_array_equal(shift, np.zeros((len(s), 3)))
    for a, b in zip(radius_edges(pos, cutoff), (s, r, shift), strict=True):
        np.testing.assert_array_equal(a, b)  # the default order
    assert len(s) > 0 and np.all(np.diff(r) >= 0)


def test_radius_edges_in_pair_order_list_both_directions_together():
    """order="pairs": edges 2k and 2k+1 are one pair's two directions (swapped ends, opposite
    image shifts) in a periodic cell smaller than twice the cutoff; the same edges as
    order="receivers" and as brute force."""
    atoms = bulk("Si", "diamond", a=5.43)  # 2 atoms, cell vectors 3.84 Å
    atoms.rattle(0.05, seed=3)
    cell, cutoff = np.asarray(atoms.cell), 4.0
    s, r, shift = radius_edges(atoms.positions, cutoff, cell, atoms.pbc, order="pairs")
    assert len(s) % 2 == 0 and shift.dtype == np.float64
    np.testing.assert_array_equal(s[0::2], r[1::2])
    np.testing.assert_array_equal(r[0::2], s[1::2])
    np.testing.assert_array_equal(shift[0::2], -shift[1::2])
    assert np.abs(shift).max() > 1.0  # edges to periodic images
    d = np.linalg.norm(atoms.positions[s] - atoms.positions[r] + shift, axis=1)
    assert np.all((d > 0) & (d < cutoff))
    np.testing.assert_allclose(d[0::2], d[1::2], rtol=1e-12)

    def triples(s, r, shift):
        images = np.rint(shift @ np.linalg.inv(cell)).astype(int)
        np.testing.assert_allclose(images @ cell, shift, atol=1e-9)
        return sorted((int(a), int(b), *n) for a, b, n in zip(s, r, images, strict=True))

    expected = brute_force_edges(atoms.positions, cutoff, cell)
    assert triples(s, r, shift) == expected
    assert triples(*radius_edges(atoms.positions, cutoff, cell, atoms.pbc)) == expected
    pairs = [t[:2] for t in expected]
    assert max(pairs.count(p) for p in set(pairs)) > 1  # several images of one pair
    with pytest.raises(ValueError, match="order must be 'receivers' or 'pairs', got 'sender'"):
        radius_edges(atoms.positions, cutoff, order="sender")


def _edge_rows(g):
    """Real edges as sorted (sender, receiver, shift in mÅ, bond) rows, and pair partners."""
    e = int(g.n_edge[0])
    rows = np.column_stack([g.senders[:e], g.receivers[:e],
                            np.rint(np.asarray(g.edges["shift"][:e], np.float64) * 1e3),
                            g.edges["bond"][:e]]).astype(np.int64)
    pair = np.asarray(g.edges["pair"][:e])
    partner = np.empty(e, np.int64)  # the other edge of each edge's pair slot
    for slot in np.unique(pair):
        a, b = np.flatnonzero(pair == slot)
        partner[a], partner[b] = b, a
    order = np.lexsort(rows.T[::-1])
    rank = np.empty(e, np.int64)
    rank[order] = np.arange(e)
    return rows[order], rank[partner[order]]


def test_layout_equals_frameset_to_graphset(frames):
    # The calculator lists each pair's two edges together (vesin's half list); training
    # batches keep radius_edges' order. Same nodes, same padding, the same edges with the
    # same shifts and bonds, and the same pairs (each edge paired with its reverse).
    gs = frames.to_graphset(4.0, targets=False)
    atoms = frames.atoms(3)
    graph, budget = neighbor_graph(atoms, 4.0)
    ref = pad_batch(gs, np.array([3]), budget)
    assert jax.tree.structure(graph) == jax.tree.structure(ref)
    for name in ("n_node", "n_edge"):
        np.testing.assert_array_equal(getattr(graph, name), getattr(ref, name))
    for name in graph.nodes:
        assert graph.nodes[name].dtype == ref.nodes[name].dtype
        np.testing.assert_array_equal(graph.nodes[name], ref.nodes[name])
    for name in graph.edges:
        assert graph.edges[name].dtype == ref.edges[name].dtype, name
    e = int(graph.n_edge[0])
    np.testing.assert_array_equal(graph.senders[e:], ref.senders[e:])  # padding edges
    rows, partners = _edge_rows(graph)
    ref_rows, ref_partners = _edge_rows(ref)
    np.testing.assert_array_equal(rows, ref_rows)
    np.testing.assert_array_equal(partners, ref_partners)
    # reverse edges: swapped ends, opposite shifts
    np.testing.assert_array_equal(rows[partners][:, [1, 0]], rows[:, [0, 1]])
    np.testing.assert_array_equal(rows[partners][:, 2:5], -rows[:, 2:5])


def test_budget_policy_headroom_and_growth(caplog):
    policy = BudgetPolicy()
    assert policy.fit(9, 72) == Budget(16, 96, 2)  # 9+1 -> 16 nodes, 72*1.25=90 -> 96 edges
    assert policy.fit(6, 30) == Budget(16, 96, 2) and policy.growths == 0
    with caplog.at_level(logging.INFO, logger="mpattn"):
        assert policy.fit(12, 100) == Budget(16, 160, 2)  # edges only: 96*1.5=144 -> 160
        assert policy.fit(18, 400) == Budget(24, 512, 2)  # 24 nodes; 400*1.25 -> 512 > 240
    assert policy.growths == 2
    assert [r.name for r in caplog.records] == ["mpattn", "mpattn"]
    assert "from (16 nodes, 96 edges) to (16 nodes, 160 edges)" in caplog.records[0].message


# ------------------------------------------------------------------ calculator


def test_calculator_equals_energy_and_forces_by_hand(pot, frames):
    calc = Calculator.from_potential(pot)
    atoms = frames.atoms(5)
    atoms.calc = calc
    energy, forces = atoms.get_potential_energy(), atoms.get_forces()
    e_ref, f_ref = by_hand(pot, atoms)
    np.testing.assert_allclose(energy, e_ref, rtol=1e-6)
    np.testing.assert_allclose(forces, f_ref, rtol=1e-4, atol=1e-5)
    assert atoms.get_potential_energy(force_consistent=True) == energy
    assert forces.dtype == np.float64 and isinstance(energy, float)
    assert np.abs(forces).max() > 1e-3  # not trivially zero


def test_no_recompilation_over_100_md_steps(pot):
    atoms = molecule("CH3CH2OH")
    calc = Calculator.from_potential(pot)
    atoms.calc = calc
    dyn = VelocityVerlet(atoms, timestep=0.5 * units.fs)
    atoms.set_momenta(np.random.default_rng(0).normal(0, 0.3, (len(atoms), 3)))
    with compile_log() as lines:
        dyn.run(100)
    ours = [m for m in lines if "mpattn_energy_forces" in m]
    assert len(ours) == 1 and len(lines) <= 1, lines
    assert calc.compiles == 1 and calc.budget_growths == 0
    assert not np.allclose(atoms.positions, molecule("CH3CH2OH").positions)


def test_unknown_element_names_it_before_any_jax_call(pot):
    calc = Calculator.from_potential(pot)
    atoms = molecule("CH3Cl")
    atoms.calc = calc
    with pytest.raises(ValueError, match=r"element\(s\) \['Cl'\] unknown to this potential, "
                                         r"which knows \['H', 'C', 'O'\]"):
        atoms.get_potential_energy()
    assert calc.compiles == 0


def test_budget_grows_once_for_a_bigger_structure(pot, caplog):
    calc = Calculator.from_potential(pot)
    ethanol = molecule("CH3CH2OH")
    calc.get_forces(ethanol)
    calc.get_forces(molecule("CH3OH"))  # another size inside the budget: no recompile
    assert (calc.compiles, calc.budget_growths) == (1, 0)
    other = ethanol.copy()
    other.translate((0.0, 0.0, 3.5))
    dimer = ethanol + other  # 18 atoms, more edges than the budget of ethanol
    with caplog.at_level(logging.INFO, logger="mpattn"):
        forces = calc.get_forces(dimer)
        energy = calc.get_potential_energy(dimer)
    assert (calc.compiles, calc.budget_growths) == (2, 1)
    assert len([r for r in caplog.records if "budget grown" in r.message]) == 1
    e_ref, f_ref = by_hand(pot, dimer)
    np.testing.assert_allclose(energy, e_ref, rtol=1e-6)
    np.testing.assert_allclose(forces, f_ref, rtol=1e-4, atol=1e-5)
    calc.get_forces(ethanol)  # back to small: the grown budget holds it
    assert (calc.compiles, calc.budget_growths) == (2, 1)


def test_periodic_forces_are_minus_finite_difference_gradient(x64):
    pot = Potential(AttentionModel(CFG, rngs=nnx.Rngs(1)), elements=("Si",))
    calc = Calculator.from_potential(pot, dtype="float64")
    atoms = bulk("Si", "diamond", a=5.43)  # cell vectors 3.84 Å < 2 * cutoff
    atoms.rattle(0.1, seed=0)
    atoms.calc = calc
    forces = atoms.get_forces()
    h = 1e-4
    fd = np.zeros_like(forces)
    for i, k in itertools.product(range(len(atoms)), range(3)):
        e = []
        for sign in (1, -1):
            a = atoms.copy()
            a.positions[i, k] += sign * h
            e.append(calc.get_potential_energy(a))
        fd[i, k] = -(e[0] - e[1]) / (2 * h)
    assert np.abs(forces).max() > 1e-3
    np.testing.assert_allclose(forces, fd, rtol=1e-6, atol=1e-9)
    # a 2x1x1 supercell: twice the energy, the same forces on both copies
    energy = atoms.get_potential_energy()
    big = atoms.repeat((2, 1, 1))
    np.testing.assert_allclose(calc.get_potential_energy(big), 2 * energy, rtol=1e-10)
    np.testing.assert_allclose(calc.get_forces(big), np.tile(forces, (2, 1)), atol=1e-10)


def test_calculator_from_a_training_workdir(frames, tmp_path):
    import mpattn
    from mpattn.models import default_config
    from mpattn.predict import load_predictor
    from mpattn.train import EnergyForceTask, TrainConfig, Trainer

    config = TrainConfig(model="attention", epochs=1, batch_size=4)
    task = EnergyForceTask(cutoff=TINY["cutoff"])
    split = (np.arange(8), np.arange(8, 10), np.arange(10, 12))
    trainer = Trainer(config, task, task.prepare(frames, split, config), tmp_path,
                      model_config=default_config("attention", **TINY), log=lambda *_: None)
    trainer.save(1.0)  # an untrained checkpoint is enough for the loading path
    calc = Calculator(tmp_path)
    assert (calc.cutoff, calc.elements) == (4.0, (1, 6, 8))
    assert calc.potential.model.config == CFG
    atoms = frames.atoms(11)
    atoms.calc = calc
    loaded = mpattn.load_run(tmp_path)
    assert isinstance(loaded, Potential)
    with pytest.raises(ValueError, match="is a potential's run, not a property model's"):
        load_predictor(tmp_path)  # property runs only
    e_ref, f_ref = by_hand(loaded, atoms)
    np.testing.assert_allclose(atoms.get_potential_energy(), e_ref, rtol=1e-6)
    np.testing.assert_allclose(atoms.get_forces(), f_ref, rtol=1e-4, atol=1e-5)
    for workdir in (tmp_path / "missing", str(tmp_path / "missing")):
        with pytest.raises(ValueError, match="no such workdir"):
            Calculator(workdir)
        with pytest.raises(ValueError, match="no such workdir"):  # run_nve takes a workdir
            run_nve(workdir, atoms, steps=1, progress=False)
    res = run_nve(calc, atoms, steps=10, log_every=5, progress=False)
    assert (res["compiles"], res["recompiles"]) == (0, 0)  # compiled above, not again
    np.testing.assert_allclose(res["potential_energy_eV"][0], e_ref, rtol=1e-6)


def test_calculator_builds_graphs_as_wide_as_the_coulomb_cutoff(pot):
    """A model whose Coulomb term reaches past its attention gets neighbour lists of the
    Coulomb cutoff (pairs beyond the list would make its energy jump as they leave it)."""
    config = AttentionConfig(**{**TINY, "cutoff": 3.0}, electrostatics=True, coulomb_cutoff=6.0)
    wide = Potential(AttentionModel(config, rngs=nnx.Rngs(0)), reference=pot.reference)
    assert Calculator.from_potential(wide).cutoff == 6.0
    assert Calculator.from_potential(pot).cutoff == TINY["cutoff"]


def test_float64_needs_x64(pot):
    if jax.config.jax_enable_x64:
        pytest.skip("x64 enabled globally")
    with pytest.raises(ValueError, match="dtype float64 needs jax"):
        Calculator.from_potential(pot, dtype="float64")


def test_calculator_needs_a_workdir():
    with pytest.raises(TypeError, match="needs a workdir"):
        Calculator()


# ------------------------------------------------------------------ molecular dynamics


def test_energy_drift_of_a_linear_series():
    t = np.linspace(0.0, 2.0, 41)  # ps
    e = -100.0 + 0.002 * t + 1e-4 * np.sin(7 * t)  # 2 meV/ps on 4 atoms: 0.5 meV/atom/ps
    slope, dev = energy_drift(t, e, 4)
    tc = t - t.mean()
    expected = np.sum(tc * e) / np.sum(tc**2) * 1000 / 4  # the normal equations, by hand
    np.testing.assert_allclose(slope, expected, rtol=1e-9)
    np.testing.assert_allclose(slope, 0.5, atol=0.01)
    np.testing.assert_allclose(dev, np.max(np.abs(e - e[0])) * 1000 / 4, rtol=1e-12)
    np.testing.assert_allclose(energy_drift(t, np.full_like(t, 3.0), 2), (0.0, 0.0), atol=1e-12)


def carbon_cluster() -> Atoms:
    """A C4 tetrahedron at the Morse minimum (1.5 Å): all six pairs covalently bonded."""
    r = 1.5 / np.sqrt(8.0)
    pos = r * np.array([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], float)
    return Atoms("C4", positions=pos)


def morse():
    return MorsePotential(epsilon=1.0, r0=1.5, rho0=6.0, rcut1=1.8, rcut2=2.4)


def test_run_nve_conserves_energy_with_a_smooth_potential(tmp_path):
    res = run_nve(morse(), carbon_cluster(), timestep_fs=0.5, steps=400, temperature_K=300,
                  seed=0, log_every=10, progress=False)
    assert res["intact"] is True
    assert len(res["times_ps"]) == 41 and res["times_ps"][-1] == pytest.approx(0.2)
    np.testing.assert_allclose(res["temperature_K"],
                               2 * np.asarray(res["kinetic_energy_eV"]) / (3 * 4 * units.kB))
    np.testing.assert_allclose(res["drift_meV_per_atom_per_ps"], 0.0, atol=0.2)
    assert res["max_deviation_meV_per_atom"] < 0.5
    np.testing.assert_allclose(np.asarray(res["total_energy_eV"]),
                               np.asarray(res["potential_energy_eV"])
                               + np.asarray(res["kinetic_energy_eV"]), rtol=1e-12)
    assert res["compiles"] is None and res["steps_per_s"] > 0
    # a 15x larger step does not conserve energy: the diagnostic can fail
    bad = run_nve(morse(), carbon_cluster(), timestep_fs=7.5, steps=40, temperature_K=300,
                  seed=0, log_every=1, progress=False)
    assert bad["max_deviation_meV_per_atom"] > 20 * res["max_deviation_meV_per_atom"]
    plot_energy(res, tmp_path / "energy.png")
    assert (tmp_path / "energy.png").stat().st_size > 10_000


def test_run_nve_with_the_calculator_compiles_once(pot):
    calc = Calculator.from_potential(pot)
    atoms = molecule("CH3CH2OH")
    res = run_nve(calc, atoms, steps=200, log_every=20, progress=False)
    assert (res["compiles"], res["recompiles"], res["budget_growths"]) == (1, 0, 0)
    assert calc.compiles == 1 and len(res["times_ps"]) == 11
    assert np.all(np.isfinite(res["total_energy_eV"]))
    np.testing.assert_allclose(atoms.positions, molecule("CH3CH2OH").positions)  # a copy ran
