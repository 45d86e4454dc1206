"""mpattn.models.potential: forces = -dE/dR, invariances, smooth cutoff, padding, loss, fits."""

from __future__ import annotations

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import jraph
import numpy as np
import orbax.checkpoint as ocp
import pytest
from ase.build import bulk, molecule
from flax import nnx

from mpattn.featurize import radius_edges
from mpattn.graph import edge_pairs, graph_mask
from mpattn.models.potential import (
    COULOMB_SCALE_INIT,
    DEBYE,
    SUM_NEIGHBOURS,
    AttentionPotential,
    AttentionPotentialConfig,
    Potential,
    Reference,
    ReferenceState,
    coulomb_energy,
    dipole_moment,
    energy_and_forces,
    energy_force_loss,
    fit_reference,
    force_metrics,
    neutral_charges,
    smooth_graph_attention,
)
from mpattn.models.schnet import SchNet, SchNetConfig
from mpattn.testing import random_rotation

CFG = AttentionPotentialConfig(dim=16, num_heads=2, head_dim=8, steps=2, ff_dim=32, num_rbf=8,
                               cutoff=4.0)
SCHNET = SchNetConfig(dim=16, num_filters=16, interactions=2, num_rbf=8, cutoff=4.0)
REF = Reference((1, 6, 8), np.array([-13.6, -1029.5, -2042.6]), scale=0.7)
# One padding budget per kind of batch: every call of a potential compiles once per dtype.
MOL = (48, 384, 16)  # (n_node, n_edge, n_graph) of molecular batches
PBC = (16, 320, 3)  # of periodic ones



@pytest.fixture(scope="module")
def pots():
    """Small potentials, built once: attention (smooth and plain softmax) and SchNet."""
    attn = AttentionPotential(CFG, rngs=nnx.Rngs(0))
    return {
        "attention": Potential(attn, reference=REF),
        "schnet": Potential(SchNet(SCHNET, rngs=nnx.Rngs(0)), reference=REF),
        "vector": Potential(AttentionPotential(dataclasses.replace(CFG, vector_features=True),
                                               rngs=nnx.Rngs(0)), reference=REF),
        "vector_sum": Potential(AttentionPotential(dataclasses.replace(
            CFG, vector_features=True, vector_messages="sum"), rngs=nnx.Rngs(0)), reference=REF),
        "silu": Potential(AttentionPotential(dataclasses.replace(
            CFG, vector_features=True, vector_messages="sum", attention_weights="silu"),
            rngs=nnx.Rngs(0)), reference=REF),
        "coulomb": Potential(AttentionPotential(dataclasses.replace(
            CFG, vector_features=True, vector_messages="sum", attention_weights="silu",
            electrostatics=True), rngs=nnx.Rngs(0)), reference=REF),
        # the attention within 2.5 Å, the Coulomb term over the graph's 4 Å
        "coulomb_long": Potential(AttentionPotential(dataclasses.replace(
            CFG, vector_features=True, vector_messages="sum", attention_weights="silu",
            electrostatics=True, cutoff=2.5, coulomb_cutoff=CFG.cutoff), rngs=nnx.Rngs(0)),
            reference=REF),
        "plain": Potential(AttentionPotential(dataclasses.replace(CFG, smooth=False, steps=1),
                                              rngs=nnx.Rngs(0)), reference=REF),
        "crystal": Potential(attn, elements=("Si", "Cu")),
    }


def radius_graph(z, pos, cutoff, cell=None, pbc=None) -> jraph.GraphsTuple:
    """A graph as the frame readers build it: Z, positions, width-0 features, radius edges."""
    s, r, shift = radius_edges(pos, cutoff, cell, pbc)
    edges = {"bond": np.full(len(s), 4, np.int32)}
    if pbc is not None:  # integer image shifts times the cell, in float64
        cell = np.asarray(cell, np.float64)
        edges["shift"] = np.rint(shift @ np.linalg.inv(cell)) @ cell
    return jraph.GraphsTuple(
        nodes={"z": np.asarray(z, np.int32), "positions": np.asarray(pos, np.float64),
               "features": np.zeros((len(z), 0), np.float32)},
        edges=edges, senders=s, receivers=r, n_node=np.array([len(z)], np.int32),
        n_edge=np.array([len(s)], np.int32), globals={})


def pad(graphs, budget=MOL, dtype=np.float32):
    g = jraph.pad_with_graphs(jraph.batch_np(list(graphs)), *budget)
    nodes = {**g.nodes, "positions": g.nodes["positions"].astype(dtype)}
    edges = {k: (v.astype(dtype) if k == "shift" else v) for k, v in g.edges.items()}
    return g._replace(nodes=nodes, edges=edges)


@functools.partial(jax.jit, static_argnums=0)
def _energy_and_forces(graphdef, state, graph):
    return energy_and_forces(nnx.merge(graphdef, state), graph)


def run(pot, graph):
    """Jitted energies [num_graphs] and forces [num_nodes, 3] as numpy arrays."""
    return tuple(np.asarray(a) for a in _energy_and_forces(*nnx.split(pot), graph))


def fd_forces(pot, graph, h=1e-4):
    """Minus the central finite-difference gradient of the real-graph energy (float64)."""
    n_real = int(graph.n_node[np.asarray(graph_mask(graph))].sum())
    pos0 = np.asarray(graph.nodes["positions"], np.float64)
    fd = np.zeros((n_real, 3))
    for i in range(n_real):
        for k in range(3):
            e = []
            for step in (h, -h):
                pos = pos0.copy()
                pos[i, k] += step
                e.append(run(pot, graph._replace(nodes={**graph.nodes, "positions": pos}))[0])
            fd[i, k] = -(e[0] - e[1]).sum() / (2 * h)
    return fd


def ethanol(seed=0):
    a = molecule("CH3CH2OH")
    a.rattle(0.05, seed=seed)
    return a


# ------------------------------------------------------------------ forces and invariances


@pytest.mark.parametrize("kind", ["attention", "schnet", "vector", "vector_sum", "silu",
                                  "coulomb"])
def test_forces_equal_finite_differences(x64, pots, kind):
    """Potential(AttentionPotential) and Potential(SchNet) on width-0 features, float64."""
    a = ethanol()
    graph = pad([radius_graph(a.numbers, a.positions, 5.0)], dtype=np.float64)
    energy, forces = run(pots[kind], graph)
    assert energy.dtype == forces.dtype == np.float64
    fd = fd_forces(pots[kind], graph)
    np.testing.assert_allclose(forces[:9], fd, rtol=1e-6, atol=1e-6 * np.abs(fd).max())
    np.testing.assert_array_equal(forces[9:], 0.0)
    np.testing.assert_array_less(1e-3, np.abs(fd).max())  # not trivially zero


def _crystals():
    si = bulk("Si", "diamond", a=5.43, cubic=True)
    si.rattle(0.1, seed=1)
    cu = bulk("Cu", "fcc", a=3.61, cubic=True)
    cu.rattle(0.1, seed=2)
    return si, cu


def test_forces_equal_finite_differences_periodic(x64, pots):
    """Rattled bulk Si: edges through periodic images (constant shifts), float64."""
    si, _ = _crystals()
    g = radius_graph(si.numbers, si.positions, CFG.cutoff, np.asarray(si.cell), si.pbc)
    np.testing.assert_array_less(1.0, np.abs(g.edges["shift"]).max())  # image edges exist
    graph = pad([g], PBC, dtype=np.float64)
    _, forces = run(pots["crystal"], graph)
    fd = fd_forces(pots["crystal"], graph)
    np.testing.assert_allclose(forces[:8], fd, rtol=1e-6, atol=1e-6 * np.abs(fd).max())


def test_periodic_supercell_is_extensive(x64, pots):
    """A 2x1x1 supercell of rattled fcc Cu: twice the energy, the same forces per image."""
    _, cu = _crystals()
    graph = pad([radius_graph(x.numbers, x.positions, CFG.cutoff, np.asarray(x.cell), x.pbc)
                 for x in (cu, cu.repeat((2, 1, 1)))], PBC, dtype=np.float64)
    energy, forces = run(pots["crystal"], graph)
    np.testing.assert_allclose(energy[1], 2 * energy[0], rtol=1e-12)
    np.testing.assert_allclose(forces[4:12], np.tile(forces[:4], (2, 1)), atol=1e-12)


@pytest.mark.parametrize("kind", ["attention", "schnet", "vector", "vector_sum", "silu",
                                  "coulomb"])
def test_rotation_translation_permutation(x64, pots, kind):
    """Energy invariant, forces rotate with the structure and follow atom permutations."""
    rng = np.random.default_rng(0)
    a = ethanol()
    n = len(a)
    rot = random_rotation(rng)
    perm = rng.permutation(n)
    z, pos = a.numbers, a.positions
    variants = [pos, pos @ rot.T, pos + np.array([3.0, -7.0, 11.0])]
    graph = pad([radius_graph(z, p, 5.0) for p in variants]
                + [radius_graph(z[perm], pos[perm], 5.0)], dtype=np.float64)
    energy, forces = run(pots[kind], graph)
    f = forces[:4 * n].reshape(4, n, 3)
    np.testing.assert_allclose(energy[1:4], np.full(3, energy[0]), rtol=1e-12)
    np.testing.assert_allclose(f[1], f[0] @ rot.T, atol=1e-10)
    np.testing.assert_allclose(f[2], f[0], atol=1e-10)
    np.testing.assert_allclose(f[3], f[0][perm], atol=1e-10)


def test_vector_features_mirror_image_and_use(x64, pots):
    """Vector channels: the mirror image has the same energy and mirrored forces; every
    vector parameter gets a gradient (the channels feed the energy)."""
    a = ethanol()
    mirror = np.diag([-1.0, 1.0, 1.0])
    graph = pad([radius_graph(a.numbers, p, 5.0) for p in (a.positions, a.positions @ mirror)],
                dtype=np.float64)
    energy, forces = run(pots["vector"], graph)
    np.testing.assert_allclose(energy[1], energy[0], rtol=1e-12)
    np.testing.assert_allclose(forces[9:18], forces[:9] @ mirror, atol=1e-10)
    # the same weights with PaiNN's summed messages give another energy (the option is used)
    assert abs(run(pots["vector_sum"], graph)[0][0] - energy[0]) > 1e-6
    assert abs(run(pots["silu"], graph)[0][0] - run(pots["vector_sum"], graph)[0][0]) > 1e-6
    graphdef, params, rest = nnx.split(pots["vector"], nnx.Param, ...)
    grads = jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p, rest)(graph)))(params)
    names = ("vec_sender", "vec_radial", "vec_u", "vec_w", "vec_gate_in", "vec_gate_out")
    for name in names:
        leaves = jax.tree.leaves(grads["model"][name])
        assert leaves and all(np.abs(np.asarray(g)).max() > 0 for g in leaves), name
    plain = sum(x.size for x in jax.tree.leaves(nnx.state(pots["attention"], nnx.Param)))
    vec = sum(x.size for x in jax.tree.leaves(params))
    d, r, t = CFG.dim, CFG.num_rbf, CFG.steps  # the vector modules' parameter count
    assert vec - plain == t * ((d + 1) * 2 * d + (r + 1) * 2 * d + 2 * d * d
                               + (2 * d + 1) * d + (d + 1) * 3 * d)


def test_denoising_head_rotates_with_the_molecule(x64):
    """The denoising head's 3-vector per atom is equivariant: rotating (and translating) the
    input rotates it; the energy beside it equals the plain call's."""
    model = AttentionPotential(dataclasses.replace(CFG, vector_features=True, denoise=True),
                               rngs=nnx.Rngs(1))
    a = ethanol()
    rot = random_rotation(np.random.default_rng(3))
    graph = pad([radius_graph(a.numbers, p, 5.0)
                 for p in (a.positions, a.positions @ rot.T + 1.5)], dtype=np.float64)
    energy, noise = model(graph, denoise=True)
    noise = np.asarray(noise)
    np.testing.assert_allclose(energy, model(graph), rtol=1e-12)
    np.testing.assert_allclose(noise[9:18], noise[:9] @ rot.T, atol=1e-10)
    assert np.abs(noise[:9]).max() > 1e-3
    with pytest.raises(ValueError, match="denoise=True needs a model built with denoise"):
        pots_model = AttentionPotential(dataclasses.replace(CFG, vector_features=True),
                                        rngs=nnx.Rngs(1))
        pots_model(graph, denoise=True)
    with pytest.raises(ValueError, match="denoise needs vector_features=True"):
        dataclasses.replace(CFG, denoise=True)


# ------------------------------------------------------------------ electrostatics


def test_neutral_charges_and_coulomb_energy_by_hand():
    """Two molecules (3 and 2 atoms) and a padding node: charges shifted to sum 0 per
    molecule; the Coulomb shares against a double loop over the pairs."""
    raw = np.array([0.3, -0.1, 0.4, 1.0, 0.2, 9.0])
    n_node = np.array([3, 2, 1], np.int32)
    mask = np.array([True] * 5 + [False])
    q = np.asarray(neutral_charges(jnp.asarray(raw), jnp.asarray(n_node), jnp.asarray(mask)))
    np.testing.assert_allclose(q, [0.3 - 0.2, -0.1 - 0.2, 0.4 - 0.2, 0.4, -0.4, 0.0],
                               atol=1e-7)
    # directed edges of both molecules (every pair both ways) and one padding edge
    pairs = [(0, 1, 1.2), (0, 2, 3.0), (1, 2, 4.5), (3, 4, 2.0)]
    env = {1.2: 0.9, 3.0: 0.5, 4.5: 0.1, 2.0: 0.7}  # any envelope values: passed through
    snd = [i for i, j, _ in pairs] + [j for i, j, _ in pairs] + [5]
    rcv = [j for i, j, _ in pairs] + [i for i, j, _ in pairs] + [5]
    dist = [r for *_, r in pairs] * 2 + [0.0]
    e = np.asarray(coulomb_energy(jnp.asarray(q), jnp.asarray(dist),
                                  jnp.asarray([env[r] for r in dist[:-1]] + [1.0]),
                                  senders=jnp.asarray(snd), receivers=jnp.asarray(rcv)))
    expected = np.zeros(6)
    for i, j, r in pairs:
        pair = q[i] * q[j] * env[r] / np.sqrt(r * r + 1.0)
        expected[i] += pair / 2
        expected[j] += pair / 2
    np.testing.assert_allclose(e, expected, atol=1e-7)
    assert e[:3].sum() == pytest.approx(sum(q[i] * q[j] * env[r] / np.sqrt(r * r + 1)
                                            for i, j, r in pairs[:3]), abs=1e-7)


@pytest.mark.parametrize("kind", ["coulomb", "coulomb_long"])
def test_electrostatics_adds_the_coulomb_sum_of_its_charges(x64, pots, kind):
    """The model's energy is its short-range energy (the same weights with zero charges)
    plus the Coulomb sum of the charges it reports, computed here over every pair within
    the Coulomb cutoff (``coulomb_long``: beyond the attention's cutoff)."""
    model = pots[kind].model
    rc = model.config.coulomb_cutoff or model.config.cutoff
    assert model.config.graph_cutoff == CFG.cutoff
    mols = [ethanol(), molecule("CH3COOH")]
    graph = pad([radius_graph(m.numbers, m.positions, CFG.cutoff) for m in mols],
                dtype=np.float64)
    energy, q = (np.asarray(a) for a in model(graph, charges=True))
    sizes = [len(m) for m in mols]
    np.testing.assert_allclose([q[:9].sum(), q[9:17].sum()], 0.0, atol=1e-12)
    np.testing.assert_array_equal(q[17:], 0.0)
    assert np.abs(q[:17]).max() > 1e-3
    zeroed = AttentionPotential(model.config, rngs=nnx.Rngs(0))  # the fixture's weights
    np.testing.assert_allclose(zeroed(graph), energy, rtol=1e-12)
    assert zeroed.charge_head.bias is None  # a constant is removed by neutrality anyway
    zeroed.charge_head.kernel[...] = jnp.zeros_like(zeroed.charge_head.kernel[...])
    short = np.asarray(zeroed(graph))
    start = 0
    for k, (m, n) in enumerate(zip(mols, sizes, strict=True)):
        pos, qm, e_c = m.positions, q[start:start + n], 0.0
        for i in range(n):
            for j in range(i + 1, n):
                r = np.linalg.norm(pos[i] - pos[j])
                if r < rc:
                    x = r / rc  # the polynomial envelope, p = 6
                    env = 1 - 28 * x**6 + 48 * x**7 - 21 * x**8
                    e_c += qm[i] * qm[j] * env / np.sqrt(r * r + 1)
        np.testing.assert_allclose(energy[k] - short[k], COULOMB_SCALE_INIT * e_c, rtol=1e-6,
                                   atol=1e-12)  # the scale is a float32 parameter
        start += n
    per_graph, per_atom = model(graph, per_atom=True)
    np.testing.assert_allclose(np.asarray(per_atom)[:9].sum(), energy[0], rtol=1e-12)
    with pytest.raises(ValueError, match="charges=True needs a model built with "
                                         "electrostatics=True"):
        pots["silu"].model(graph, charges=True)


def test_dipole_moment_by_hand_and_both_heads_at_once(x64):
    """μ = Σ q_i r_i per graph (origin-free for neutral charges); a model with denoising and
    electrostatics returns energies, noise and charges together, as the separate calls do."""
    q = np.array([0.5, -0.25, -0.25, 0.3, -0.3, 0.0])
    pos = np.array([[0.0, 0, 0], [1, 0, 0], [0, 2, 0], [0, 0, 1], [0, 0, 3], [7, 7, 7]])
    n_node = np.array([3, 2, 1], np.int32)
    mu = np.asarray(dipole_moment(jnp.asarray(q), jnp.asarray(pos), jnp.asarray(n_node)))
    np.testing.assert_allclose(mu, [[-0.25, -0.5, 0.0], [0.0, 0.0, -0.6], [0, 0, 0]])
    shifted = np.asarray(dipole_moment(jnp.asarray(q), jnp.asarray(pos + [4.0, -2.0, 1.0]),
                                       jnp.asarray(n_node)))
    np.testing.assert_allclose(shifted[:2], mu[:2], atol=1e-12)
    assert DEBYE == pytest.approx(0.2082, abs=1e-4)  # e Å
    model = AttentionPotential(dataclasses.replace(
        CFG, vector_features=True, denoise=True, electrostatics=True), rngs=nnx.Rngs(2))
    a = ethanol()
    graph = pad([radius_graph(a.numbers, a.positions, 5.0)], dtype=np.float64)
    energy, noise, charges = model(graph, denoise=True, charges=True)
    np.testing.assert_allclose(energy, model(graph), rtol=1e-12)
    np.testing.assert_allclose(noise, model(graph, denoise=True)[1], rtol=1e-12)
    np.testing.assert_allclose(charges, model(graph, charges=True)[1], rtol=1e-12)


def test_electrostatics_starts_small(qm9_graphset):
    """At init (CHARGE_INIT) the Coulomb term of real QM9 molecules (complete graphs, 10 Å) is
    a hundredth of the unit spread of the targets the model learns, not a random energy."""
    from mpattn.graph import Budget, pad_batch

    gs = qm9_graphset
    index = np.arange(len(gs))
    batch = pad_batch(gs, index, Budget(int(gs.n_node.sum()) + 1, int(gs.n_edge.sum()),
                                        len(gs) + 1))
    cfg = AttentionPotentialConfig(vector_features=True, vector_messages="sum",
                                   attention_weights="silu", cutoff=10.0, electrostatics=True)
    model = AttentionPotential(cfg, rngs=nnx.Rngs(0))
    energy, q = model(batch, charges=True)
    model.charge_head.kernel[...] = jnp.zeros_like(model.charge_head.kernel[...])
    coulomb = np.asarray(energy - model(batch))[: len(gs)]
    real = np.asarray(q)[: int(gs.n_node.sum())]
    assert 0.005 < real.std() < 0.05
    assert np.abs(coulomb).max() < 0.05 and np.abs(coulomb).max() > 0


# ------------------------------------------------------------------ smoothness at the cutoff


def test_energy_continuous_across_cutoff(x64, pots):
    """An atom crosses the cutoff, as the only neighbour (C...O) or next to a bonded one
    (H-C...O): energy change and force vanish as ε -> 0; the plain softmax jumps."""
    rc, eps = CFG.cutoff, [1e-2, 1e-3, 1e-4]
    base = np.array([[0.0, 0.0, 0.0], [rc, 0.0, 0.0], [-1.1, 0.0, 0.0]])
    graphs, z = [], np.array([6, 8, 1])
    for n in (2, 3):
        for e in eps:
            for sign in (-1, 1):  # inside, then outside the cutoff
                graphs.append(radius_graph(z[:n], base[:n] + [[0, 0, 0], [sign * e, 0, 0],
                                                              [0, 0, 0]][:n], rc))
    first = np.cumsum([0] + [len(g.nodes["z"]) for g in graphs])[:-1]
    for kind in ("attention", "vector", "vector_sum", "silu", "coulomb", "coulomb_long",
                 "plain"):
        energy, forces = run(pots[kind], pad(graphs, dtype=np.float64))
        jump = np.abs(energy[1:12:2] - energy[:12:2]).reshape(2, 3)
        f_in = np.abs(forces[first[:12:2] + 1, 0]).reshape(2, 3)  # on the crossing O
        if kind == "plain":
            np.testing.assert_array_less(1e-3, jump)
            continue
        # decreasing with ε (coulomb_long: only its small initial charges reach 4 Å, so the
        # jump is 1e-10 at ε = 1e-2 and exactly 0 below)
        assert np.all((jump[:, 1:] < jump[:, :-1]) | (jump[:, 1:] < 1e-14)), (kind, jump)
        np.testing.assert_allclose(jump[:, -1], 0.0, atol=1e-10)
        np.testing.assert_array_less(f_in[:, 1:], f_in[:, :-1])
        np.testing.assert_allclose(f_in[:, -1], 0.0, atol=1e-6)  # O(ε²)


def test_smooth_graph_attention_by_hand():
    """Golden values from numpy loops; an edge with envelope 0 gets weight exactly 0."""
    rng = np.random.default_rng(5)
    q, k, v = rng.normal(size=(3, 3, 2, 4))  # 3 nodes, 2 heads, 4 features
    senders, receivers = np.array([1, 2, 0, 2]), np.array([0, 0, 1, 1])
    env = np.array([0.9, 0.3, 1.0, 0.0])
    bias, filt = rng.normal(size=(4, 2)), rng.normal(size=(4, 2, 4))
    got, alpha = smooth_graph_attention(
        *(jnp.asarray(x, jnp.float32) for x in (q, k, v)), senders=senders,
        receivers=receivers, num_segments=3, envelope=jnp.asarray(env, jnp.float32),
        bias=jnp.asarray(bias, jnp.float32), value_filter=jnp.asarray(filt, jnp.float32),
        return_weights=True)
    want, want_alpha = np.zeros((3, 2, 4)), np.zeros((4, 2))
    for node in range(3):
        for h in range(2):
            es = [e for e in range(4) if receivers[e] == node]
            w = [env[e] * np.exp(q[node, h] @ k[senders[e], h] / 2 + bias[e, h]) for e in es]
            for e, we in zip(es, w, strict=True):
                want[node, h] += we / (1 + sum(w)) * v[senders[e], h] * filt[e, h]
                want_alpha[e, h] = we / (1 + sum(w))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(alpha, want_alpha, rtol=1e-5, atol=1e-7)
    assert alpha[3].tolist() == [0.0, 0.0]  # envelope 0: weight exactly 0
    np.testing.assert_array_equal(got[2], 0.0)  # no neighbours: nothing, not NaN


def test_smooth_graph_attention_silu_by_hand():
    """``weights="silu"``: unnormalised ``silu(l) f(r) / 16``, golden values from numpy."""
    rng = np.random.default_rng(6)
    q, k, v = rng.normal(size=(3, 3, 2, 4))
    senders, receivers = np.array([1, 2, 0, 2]), np.array([0, 0, 1, 1])
    env, bias = np.array([0.9, 0.3, 1.0, 0.0]), rng.normal(size=(4, 2))
    got, alpha = smooth_graph_attention(
        *(jnp.asarray(x, jnp.float32) for x in (q, k, v)), senders=senders,
        receivers=receivers, num_segments=3, envelope=jnp.asarray(env, jnp.float32),
        bias=jnp.asarray(bias, jnp.float32), return_weights=True, weights="silu")
    logit = np.einsum("ehd,ehd->eh", q[receivers], k[senders]) / 2 + bias
    want_alpha = logit / (1 + np.exp(-logit)) * env[:, None] / SUM_NEIGHBOURS
    want = np.zeros((3, 2, 4))
    np.add.at(want, receivers, want_alpha[..., None] * v[senders])
    np.testing.assert_allclose(alpha, want_alpha, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert alpha[3].tolist() == [0.0, 0.0]
    assert abs(want_alpha[:2].sum(0) - 1).min() > 0.05  # not normalised
    with pytest.raises(ValueError, match="weights must be 'softmax' or 'silu', got 'relu'"):
        smooth_graph_attention(q, k, v, senders=senders, receivers=receivers, num_segments=3,
                               envelope=env, weights="relu")


# ------------------------------------------------------------------ padding


@pytest.mark.parametrize("kind", ["attention", "vector", "vector_sum", "silu", "coulomb",
                                  "coulomb_long"])
def test_padding_never_changes_real_graphs(pots, kind):
    """Ethanol + water padded with extra nodes, edges and graphs (junk padding positions)
    equal each molecule padded alone; padding graphs get energy 0, padding nodes force 0."""
    graphs = [radius_graph(m.numbers, m.positions, 5.0) for m in map(molecule, ("CH3CH2OH",
                                                                                "H2O"))]
    batch = pad(graphs)
    batch.nodes["positions"][12:] = np.random.default_rng(0).normal(size=(36, 3)) * 10
    energy, forces = run(pots[kind], batch)
    assert energy.dtype == forces.dtype == np.float32  # the default
    alone = [run(pots[kind], pad([g])) for g in graphs]
    np.testing.assert_allclose(energy[:2], [e[0] for e, _ in alone], rtol=1e-6)
    np.testing.assert_allclose(forces[:12], np.concatenate([f[:n] for (_, f), n in
                                                           zip(alone, (9, 3), strict=True)]),
                               atol=1e-6)
    np.testing.assert_array_equal(forces[12:], 0.0)
    np.testing.assert_array_equal(energy[2:], 0.0)


# ------------------------------------------------------------------ loss and metrics


def _loss_case():
    rng = np.random.default_rng(3)
    n_node = np.array([3, 2, 4, 0], np.int32)  # two real graphs, the padding graph, one empty
    graph = jraph.GraphsTuple(nodes={"z": np.zeros(9, np.int32)}, edges={},
                              senders=np.zeros(0, np.int32), receivers=np.zeros(0, np.int32),
                              n_node=n_node, n_edge=np.zeros(4, np.int32), globals={})
    pe, te = rng.normal(size=4), rng.normal(size=4)
    pf, tf = rng.normal(size=(9, 3)), rng.normal(size=(9, 3))
    pe[2:], pf[5:] = np.nan, 1e6  # padding junk must not count
    return graph, pe, te, pf, tf


@pytest.mark.parametrize("loss", ["mse", "l1", "huber"])
@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_energy_force_loss_by_hand(loss, beta):
    graph, pe, te, pf, tf = _loss_case()

    def ell(d):
        if loss == "mse":
            return d * d
        if loss == "l1":
            return abs(d)
        return 0.5 * d * d if abs(d) <= 0.5 else 0.5 * (abs(d) - 0.25)

    e_term = (ell(pe[0] - te[0]) + ell(pe[1] - te[1])) / 2
    f_terms = []
    for lo, n in ((0, 3), (3, 2)):
        s = sum(ell(pf[i, k] - tf[i, k]) for i in range(lo, lo + n) for k in range(3))
        f_terms.append(s / (3 * n))
    expected = (1 - beta) * e_term + beta * np.mean(f_terms)
    (got, terms), grads = _loss_and_grad(*(jnp.asarray(x, jnp.float32) for x in
                                           (pe, pf, te, tf)), graph, beta, loss)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    np.testing.assert_allclose([terms["energy"], terms["forces"]], [e_term, np.mean(f_terms)],
                               rtol=1e-5)
    np.testing.assert_array_equal(grads[0][2:], 0.0)  # no NaN leaks from padding
    np.testing.assert_array_equal(grads[1][5:], 0.0)
    assert all(np.isfinite(g).all() for g in grads)


@functools.partial(jax.jit, static_argnums=6)
def _loss_and_grad(pe, pf, te, tf, graph, beta, loss):
    def f(pe, pf):
        total, terms = energy_force_loss(pe, pf, te, tf, graph, beta=beta, loss=loss,
                                         huber_delta=0.5, return_terms=True)
        return total, terms

    return jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(pe, pf)


def test_energy_force_loss_errors():
    graph, pe, te, pf, tf = _loss_case()
    with pytest.raises(ValueError, match=r"beta must be in \[0, 1\], got 1.5"):
        energy_force_loss(pe, pf, te, tf, graph, beta=1.5)
    with pytest.raises(ValueError, match="unknown loss 'l2'; choose one of mse, l1, huber"):
        energy_force_loss(pe, pf, te, tf, graph, beta=0.5, loss="l2")
    with pytest.raises(ValueError, match="energy_force_loss: shapes differ"):
        energy_force_loss(pe[:3], pf, te, tf, graph, beta=0.5)


def test_force_metrics_by_hand():
    m = force_metrics(pred_e=[1.0, 2.0], true_e=[1.003, 1.99], n_atoms=[1, 2],
                      pred_f=[[0.0, 0.0, 0.01], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]],
                      true_f=np.zeros((3, 3)))
    # energy errors 3 and 10 meV; per atom 3 and 5; one force component of 10 meV/Å in 9
    np.testing.assert_allclose(
        [m["energy_mae_mev"], m["energy_rmse_mev"], m["energy_mae_mev_per_atom"],
         m["energy_rmse_mev_per_atom"], m["force_mae_mev_ang"], m["force_rmse_mev_ang"]],
        [6.5, np.sqrt(109 / 2), 4.0, np.sqrt(17), 10 / 9, np.sqrt(100 / 9)], rtol=1e-9)
    assert (m["n_structures"], m["n_atoms"]) == (2, 3)
    with pytest.raises(ValueError, match="force_metrics: "):
        force_metrics([1.0], [1.0], np.zeros((2, 3)), np.zeros((2, 3)), [1])


# ------------------------------------------------------------------ reference and state


def test_fit_reference_recovers_synthetic_energies():
    """Linear synthetic data (by nature): exact E_e; nitrogen never occurs and gets 0."""
    rng = np.random.default_rng(4)
    true = {1: -13.6, 6: -1029.5, 8: -2042.6}
    z_list = [rng.choice([1, 6, 8], size=rng.integers(3, 20)) for _ in range(40)]
    energies = [sum(true[int(z)] for z in zs) for zs in z_list]
    forces = rng.normal(size=(sum(len(zs) for zs in z_list), 3)) * 0.5
    ref = fit_reference(z_list, energies, ("H", "C", "N", "O"), forces=forces)
    assert ref.elements == (1, 6, 7, 8)
    np.testing.assert_allclose(ref.energies, [-13.6, -1029.5, 0.0, -2042.6], rtol=1e-10)
    assert ref.energies[2] == 0.0
    np.testing.assert_allclose(ref.scale, np.sqrt(np.mean(forces**2)), rtol=1e-12)
    counts = np.array([[np.sum(zs == e) for e in (1, 6, 7, 8)] for zs in z_list])
    np.testing.assert_allclose(fit_reference(counts, energies, (1, 6, 7, 8)).energies,
                               ref.energies, rtol=1e-10)
    np.testing.assert_allclose(ref.energy(np.concatenate(z_list), [len(z) for z in z_list]),
                               energies, rtol=1e-12)
    back = Reference.from_dict(json.loads(json.dumps(ref.to_dict())))
    np.testing.assert_array_equal(back.energies, ref.energies)
    assert (back.elements, back.scale) == (ref.elements, ref.scale)
    with pytest.raises(ValueError, match=r"structure 1 holds element 9 \(F\), not in elements"):
        fit_reference([np.array([1, 6]), np.array([9, 1])], [1.0, 2.0], (1, 6))
    with pytest.raises(ValueError, match=r"counts must have shape \(1, 2\), got \(1, 3\)"):
        fit_reference(np.ones((1, 3)), [1.0], (1, 6))


def test_potential_reference_state_survives_split_merge_and_checkpoint(tmp_path, pots):
    a = ethanol()
    graph = pad([radius_graph(a.numbers, a.positions, 5.0)])
    pot = pots["attention"]
    energy, _ = run(pot, graph)
    no_ref = Potential(pot.model, reference=Reference((1, 6, 8), np.zeros(3), scale=0.7))
    np.testing.assert_allclose(energy[0] - run(no_ref, graph)[0][0],
                               REF.energy(a.numbers, [9])[0], rtol=1e-6)
    assert "table" not in nnx.state(pot, nnx.Param)  # not trained
    assert set(nnx.state(pot, ReferenceState)) == {"table", "scale"}
    np.testing.assert_array_equal(run(nnx.merge(*nnx.split(pot)), graph)[0], energy)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp_path / "ckpt", nnx.state(pot))
    ckpt.wait_until_finished()
    graphdef, state = nnx.split(pot)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    restored = nnx.merge(graphdef, ckpt.restore(tmp_path / "ckpt", abstract))
    np.testing.assert_array_equal(run(restored, graph)[0], energy)
    np.testing.assert_allclose(restored.reference.energies, REF.energies, rtol=1e-7)
    assert restored.reference.scale == pytest.approx(0.7)


def test_errors():
    with pytest.raises(ValueError, match=r"activation must be a smooth one of .* got 'relu'"):
        AttentionPotentialConfig(activation="relu")
    with pytest.raises(ValueError, match=r"vector_features needs num_heads \* head_dim == dim"):
        AttentionPotentialConfig(dim=32, num_heads=2, head_dim=8, vector_features=True)
    with pytest.raises(ValueError, match="smooth=False"):
        AttentionPotentialConfig(dim=16, num_heads=2, head_dim=8, vector_features=True,
                                 smooth=False)
    with pytest.raises(ValueError, match="vector_messages must be 'attention' or 'sum', got 'max'"):
        AttentionPotentialConfig(vector_messages="max")
    with pytest.raises(ValueError, match="attention_weights must be 'softmax' or 'silu'"):
        AttentionPotentialConfig(attention_weights="sigmoid")
    with pytest.raises(ValueError, match="attention_weights='silu' needs smooth=True"):
        AttentionPotentialConfig(attention_weights="silu", smooth=False)
    with pytest.raises(ValueError, match="coulomb_cutoff=10.0 needs electrostatics=True"):
        AttentionPotentialConfig(coulomb_cutoff=10.0)
    with pytest.raises(ValueError, match="coulomb_cutoff=0.0 needs .* a positive value"):
        AttentionPotentialConfig(electrostatics=True, coulomb_cutoff=0.0)
    assert AttentionPotentialConfig(electrostatics=True, coulomb_cutoff=30.0).graph_cutoff == 30
    assert AttentionPotentialConfig(cutoff=6.0).graph_cutoff == 6.0
    model = AttentionPotential(CFG, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="Potential needs elements or a reference"):
        Potential(model)
    pot = Potential(model, elements=("H", "C"))
    with pytest.raises(ValueError, match=r"reference elements \(1, 6, 8\) differ"):
        pot.set_reference(REF)
    a = molecule("CH3CH2OH")
    graph = pad([radius_graph(a.numbers, a.positions, 5.0)])
    with pytest.raises(ValueError, match=r"elements \['O'\] unknown to this potential"):
        pot.check(graph)
    table = np.asarray(pot.table[...])  # unchecked unknown elements give NaN energies
    assert table[0] == table[1] == table[6] == 0.0 and np.isnan(table[[2, 3, 4, 5]]).all()
    with pytest.raises(ValueError, match="attention_potential: atomic number 108 above max_z=100"):
        model.check(graph._replace(nodes={**graph.nodes, "z": graph.nodes["z"] + 100}))


# ------------------------------------------------------------------ radial terms per edge pair


def with_pairs(graph):
    """The graph with ``edges["pair"]`` over its real edges (as pad_batch/pad_structure add)."""
    real = int(graph.n_edge[np.asarray(graph_mask(graph))].sum())
    shift = graph.edges["shift"][:real] if "shift" in graph.edges else None
    pair = edge_pairs(graph.senders[:real], graph.receivers[:real], shift,
                      num_edges=graph.senders.shape[0])
    assert pair is not None
    return graph._replace(edges={**graph.edges, "pair": pair})


@pytest.mark.parametrize("kind", ["attention", "schnet", "crystal", "vector", "coulomb",
                                  "coulomb_long"])
def test_pair_slots_give_the_same_energy_and_exact_forces(x64, pots, kind):
    """Radial networks once per pair: same energies/forces as per edge, forces = -dE/dx (FD)."""
    if kind == "crystal":
        si, _ = _crystals()
        g = radius_graph(si.numbers, si.positions, CFG.cutoff, np.asarray(si.cell), si.pbc)
        graph, n = pad([g], PBC, dtype=np.float64), len(si)
    else:
        a = ethanol()
        graph, n = pad([radius_graph(a.numbers, a.positions, 5.0)], dtype=np.float64), len(a)
    paired = with_pairs(graph)
    energy, forces = run(pots[kind], paired)
    ref_energy, ref_forces = run(pots[kind], graph)
    np.testing.assert_allclose(energy, ref_energy, rtol=1e-12)
    np.testing.assert_allclose(forces, ref_forces, rtol=1e-9, atol=1e-12)
    fd = fd_forces(pots[kind], paired)
    np.testing.assert_allclose(forces[:n], fd, rtol=1e-6, atol=1e-6 * np.abs(fd).max())
