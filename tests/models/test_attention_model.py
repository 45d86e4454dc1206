"""mpattn.models.attention: the attention model's config errors, its smoothness at the cutoff,
vector channels, the denoising head and the electrostatics (charges, Coulomb term), and which
outputs each build returns.

Forces, invariances and padding of the model inside a Potential: tests/test_potential.py.
"""

from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase.build import molecule
from flax import nnx

from mpattn.models.attention import AttentionConfig, AttentionModel
from mpattn.nn.electrostatics import CHARGE_INIT, COULOMB_SCALE_INIT
from mpattn.testing import random_rotation
from tests.potential_helpers import (
    CFG,
    ethanol,
    pad,
    potentials,
    radius_graph,
    run,
    share_weights,
)


@pytest.fixture(scope="module")
def pots():
    """Small potentials, built once (tests/potential_helpers.py)."""
    return potentials()


# ------------------------------------------------------------------ config


def test_config_errors():
    with pytest.raises(ValueError, match=r"activation must be a smooth one of .* got 'relu'"):
        AttentionConfig(activation="relu")
    with pytest.raises(ValueError, match=r"vector_features needs num_heads \* head_dim == dim"):
        AttentionConfig(dim=32, num_heads=2, head_dim=8, vector_features=True)
    with pytest.raises(ValueError, match="smooth=False"):  # (silu weights need smooth too)
        AttentionConfig(dim=16, num_heads=2, head_dim=8, vector_features=True, smooth=False,
                        attention_weights="softmax")
    with pytest.raises(ValueError, match="vector_messages must be 'attention' or 'sum', got 'max'"):
        AttentionConfig(vector_messages="max")
    with pytest.raises(ValueError, match="attention_weights must be 'softmax' or 'silu'"):
        AttentionConfig(attention_weights="sigmoid")
    with pytest.raises(ValueError, match="attention_weights='silu' needs smooth=True"):
        AttentionConfig(attention_weights="silu", smooth=False)
    with pytest.raises(ValueError, match="attention_weights='silu' needs smooth=True"):
        AttentionConfig(smooth=False)  # silu is the class default
    with pytest.raises(ValueError, match="coulomb_cutoff=10.0 needs electrostatics=True"):
        AttentionConfig(coulomb_cutoff=10.0)
    with pytest.raises(ValueError, match="coulomb_cutoff=0.0 needs .* a positive value"):
        AttentionConfig(electrostatics=True, coulomb_cutoff=0.0)
    with pytest.raises(ValueError, match="denoise needs vector_features=True"):
        dataclasses.replace(CFG, denoise=True)
    assert AttentionConfig(electrostatics=True, coulomb_cutoff=30.0).graph_cutoff == 30
    assert AttentionConfig(cutoff=6.0).graph_cutoff == 6.0
    assert AttentionConfig().attention_weights == "silu"
    model = AttentionModel(CFG, rngs=nnx.Rngs(0))
    a = molecule("CH3CH2OH")
    graph = pad([radius_graph(a.numbers, a.positions, 5.0)])
    model.check(graph)
    with pytest.raises(ValueError, match="attention: atomic number 108 above max_z=100"):
        model.check(graph._replace(nodes={**graph.nodes, "z": graph.nodes["z"] + 100}))


# ------------------------------------------------------------------ outputs and heads


def _heads(denoise: bool, electrostatics: bool) -> AttentionConfig:
    return dataclasses.replace(CFG, vector_features=True, denoise=denoise,
                               electrostatics=electrostatics)


def test_both_heads_at_once_equal_the_separate_heads(x64):
    """The outputs hold "charges" exactly when the model is built with electrostatics and
    "noise" exactly with the denoising head. With the same weights a head changes nothing
    else: the denoising head leaves the energy as it is, the charges are the same with or
    without it, the noise the same with or without electrostatics; and the energy of an
    electrostatics model whose charges are zero is the energy of the model without them."""
    full = AttentionModel(_heads(True, True), rngs=nnx.Rngs(2))
    a = ethanol()
    graph = pad([radius_graph(a.numbers, a.positions, 5.0)], dtype=np.float64)
    out = {}
    for denoise, electrostatics in itertools.product((False, True), repeat=2):
        model = AttentionModel(_heads(denoise, electrostatics), rngs=nnx.Rngs(7))
        share_weights(full, model)
        got = model(graph)
        assert set(got) == ({"energy", "per_atom"} | ({"noise"} if denoise else set())
                            | ({"charges"} if electrostatics else set()))
        assert got["energy"].shape == (16,) and got["per_atom"].shape == (48,)
        out[denoise, electrostatics] = {k: np.asarray(v) for k, v in got.items()}
        if electrostatics and not denoise:
            model.charge_head.kernel[...] = jnp.zeros_like(model.charge_head.kernel[...])
            out["zero charges"] = np.asarray(model(graph)["energy"])
    for key in ("energy", "per_atom"):
        np.testing.assert_allclose(out[True, False][key], out[False, False][key], rtol=1e-12)
        np.testing.assert_allclose(out[True, True][key], out[False, True][key], rtol=1e-12)
    np.testing.assert_allclose(out[True, True]["noise"], out[True, False]["noise"], rtol=1e-12)
    np.testing.assert_allclose(out[True, True]["charges"], out[False, True]["charges"],
                               rtol=1e-12)
    np.testing.assert_allclose(out["zero charges"], out[False, False]["energy"], rtol=1e-12)
    # the heads are used: noise and charges are not zero, the Coulomb term changes the energy
    assert np.abs(out[True, True]["noise"][:9]).max() > 1e-3
    assert np.abs(out[True, True]["charges"][:9]).max() > 1e-3
    assert abs(out[False, True]["energy"][0] - out[False, False]["energy"][0]) > 1e-9


# ------------------------------------------------------------------ vector channels


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
    grads = jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p, rest)(graph)["energy"]))(params)
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
    input rotates it; the energy beside it equals that of the model without the head (same
    weights), which has no "noise" output."""
    model = AttentionModel(dataclasses.replace(CFG, vector_features=True, denoise=True),
                           rngs=nnx.Rngs(1))
    a = ethanol()
    rot = random_rotation(np.random.default_rng(3))
    graph = pad([radius_graph(a.numbers, p, 5.0)
                 for p in (a.positions, a.positions @ rot.T + 1.5)], dtype=np.float64)
    out = model(graph)
    energy, noise = out["energy"], np.asarray(out["noise"])
    assert noise.shape == (48, 3)
    headless = AttentionModel(dataclasses.replace(CFG, vector_features=True), rngs=nnx.Rngs(1))
    share_weights(model, headless)
    plain = headless(graph)
    np.testing.assert_allclose(energy, plain["energy"], rtol=1e-12)
    np.testing.assert_allclose(noise[9:18], noise[:9] @ rot.T, atol=1e-10)
    assert np.abs(noise[:9]).max() > 1e-3
    assert "noise" not in plain  # only a model built with denoise=True predicts noise
    with pytest.raises(ValueError, match="denoise needs vector_features=True"):
        dataclasses.replace(CFG, denoise=True)


# ------------------------------------------------------------------ electrostatics


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
    out = model(graph)
    energy, q = (np.asarray(out[k]) for k in ("energy", "charges"))
    sizes = [len(m) for m in mols]
    np.testing.assert_allclose([q[:9].sum(), q[9:17].sum()], 0.0, atol=1e-12)
    np.testing.assert_array_equal(q[17:], 0.0)
    assert np.abs(q[:17]).max() > 1e-3
    zeroed = AttentionModel(model.config, rngs=nnx.Rngs(0))  # the fixture's weights
    np.testing.assert_allclose(zeroed(graph)["energy"], energy, rtol=1e-12)
    assert zeroed.charge_head.bias is None  # a constant is removed by neutrality anyway
    zeroed.charge_head.kernel[...] = jnp.zeros_like(zeroed.charge_head.kernel[...])
    short = np.asarray(zeroed(graph)["energy"])
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
    np.testing.assert_allclose(np.asarray(out["per_atom"])[:9].sum(), energy[0], rtol=1e-12)
    # only a model built with electrostatics=True has charges
    assert "charges" not in pots["silu"].model(graph)


def test_electrostatics_starts_small(qm9_graphset):
    """At init (CHARGE_INIT) the Coulomb term of real QM9 molecules (complete graphs, 10 Å) is
    a hundredth of the unit spread of the targets the model learns, not a random energy."""
    from mpattn.graph import Budget, pad_batch

    assert CHARGE_INIT == 0.03
    gs = qm9_graphset
    index = np.arange(len(gs))
    batch = pad_batch(gs, index, Budget(int(gs.n_node.sum()) + 1, int(gs.n_edge.sum()),
                                        len(gs) + 1))
    cfg = AttentionConfig(vector_features=True, vector_messages="sum",
                          attention_weights="silu", cutoff=10.0, electrostatics=True)
    model = AttentionModel(cfg, rngs=nnx.Rngs(0))
    out = model(batch)
    energy, q = out["energy"], out["charges"]
    model.charge_head.kernel[...] = jnp.zeros_like(model.charge_head.kernel[...])
    coulomb = np.asarray(energy - model(batch)["energy"])[: len(gs)]
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
