"""mpattn.models.so3krates: config errors, the spherical-harmonic coordinates rotate by their
Wigner D-matrices (the invariant features do not move), mirror images, every parameter is
used, smoothness at the cutoff, and training as a potential through the one trainer.

Forces against finite differences, invariances, padding and pair slots of the model inside a
Potential: tests/test_potential.py (kind "so3krates"); stress: tests/test_stress.py; as a
QM9 property model: tests/models/test_models.py.
"""

from __future__ import annotations

import dataclasses

import e3x
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mpattn.models.so3krates import So3krates, So3kratesConfig
from mpattn.nn.spherical import degree_norms
from mpattn.testing import random_rotation
from tests.potential_helpers import SO3, ethanol, pad, potentials, radius_graph, run


@pytest.fixture(scope="module")
def pots():
    return potentials()


def test_config_errors_and_check():
    with pytest.raises(ValueError, match="max_degree must be at least 1, got 0"):
        So3kratesConfig(max_degree=0)
    with pytest.raises(ValueError, match="dim=30 must be a multiple of num_heads=4"):
        So3kratesConfig(dim=30)
    with pytest.raises(ValueError, match=r"activation must be a smooth one of .* got 'relu'"):
        So3kratesConfig(activation="relu")
    with pytest.raises(ValueError, match="need steps >= 1 and cutoff > 0, got 0, 5.0"):
        So3kratesConfig(steps=0)
    assert So3kratesConfig(cutoff=6.0).graph_cutoff == 6.0
    model = So3krates(SO3, rngs=nnx.Rngs(0))
    a = ethanol()
    graph = pad([radius_graph(a.numbers, a.positions, SO3.cutoff)])
    model.check(graph)
    with pytest.raises(ValueError, match="so3krates: atomic number 108 above max_z=100"):
        model.check(graph._replace(nodes={**graph.nodes, "z": graph.nodes["z"] + 100}))


@pytest.mark.parametrize(("value_filter", "channels"), [(False, 1), (True, 1), (False, 3)])
def test_coordinates_rotate_by_wigner_matrices_and_features_are_invariant(x64, value_filter,
                                                                          channels):
    """Rotating and translating the molecule maps every atom's spherical-harmonic
    coordinates ``x`` to ``x D(R)`` (e3x's Wigner D-matrices, degrees 1..3) and leaves the
    invariant features and the per-degree norms where they were; a mirror image has the same
    features (the energy is E(3) invariant). With and without the value filter, and with 3
    channels mixed by random matrices (not the identity they start at)."""
    model = So3krates(dataclasses.replace(SO3, value_filter=value_filter, channels=channels),
                      rngs=nnx.Rngs(1))
    rng = np.random.default_rng(7)
    for mixing in model.mixings:
        if channels > 1:
            mixing.channel_mix[...] = jnp.asarray(rng.normal(size=(3, channels, channels)))
    a = ethanol()
    rot = random_rotation(np.random.default_rng(4))
    mirror = np.diag([1.0, -1.0, 1.0])
    graph = pad([radius_graph(a.numbers, p, SO3.cutoff)
                 for p in (a.positions, a.positions @ rot + 2.0, a.positions @ mirror)],
                dtype=np.float64)
    f, x = (np.asarray(v) for v in model.features(graph))
    assert x.shape == (48, channels, 15) and f.shape == (48, SO3.dim)
    d = np.asarray(e3x.so3.wigner_d(jnp.asarray(rot), max_degree=3))[1:, 1:]
    np.testing.assert_allclose(x[9:18], x[:9] @ d, atol=1e-10)
    np.testing.assert_allclose(f[9:18], f[:9], atol=1e-10)
    np.testing.assert_allclose(f[18:27], f[:9], atol=1e-10)
    norms = np.asarray(degree_norms(jnp.asarray(x), 3))
    np.testing.assert_allclose(norms[9:18], norms[:9], atol=1e-10)
    # every degree is populated (not trivially equivariant because zero)
    np.testing.assert_array_less(1e-3, norms[:9].max(axis=0))


def test_every_parameter_gets_a_gradient(x64, pots):
    """All weights feed the energy, the degree queries and keys included (through ``x``)."""
    pot = pots["so3krates"]
    a = ethanol()
    graph = pad([radius_graph(a.numbers, a.positions, SO3.cutoff)], dtype=np.float64)
    graphdef, params, rest = nnx.split(pot, nnx.Param, ...)
    grads = jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p, rest)(graph)["energy"]))(params)
    flat = nnx.to_flat_state(grads["model"])
    assert len(flat) > 20
    for path, g in flat:
        value = np.asarray(g[...] if hasattr(g, "__getitem__") else g)
        assert np.abs(value).max() > 0, path


def test_energy_continuous_across_cutoff(x64, pots):
    """An atom crosses the cutoff as the only neighbour (C...O) or next to a bonded one
    (H-C...O): the energy change and the force on it vanish as ε -> 0."""
    rc, eps = SO3.cutoff, [1e-2, 1e-3, 1e-4]
    base = np.array([[0.0, 0.0, 0.0], [rc, 0.0, 0.0], [-1.1, 0.0, 0.0]])
    graphs, z = [], np.array([6, 8, 1])
    for n in (2, 3):
        for e in eps:
            for sign in (-1, 1):
                graphs.append(radius_graph(z[:n], base[:n] + [[0, 0, 0], [sign * e, 0, 0],
                                                              [0, 0, 0]][:n], rc))
    first = np.cumsum([0] + [len(g.nodes["z"]) for g in graphs])[:-1]
    energy, forces = run(pots["so3krates"], pad(graphs, dtype=np.float64))
    jump = np.abs(energy[1:12:2] - energy[:12:2]).reshape(2, 3)
    f_in = np.abs(forces[first[:12:2] + 1, 0]).reshape(2, 3)
    # decreasing with ε, down to float64's resolution of energies near 3,000 eV
    assert np.all((jump[:, 1:] < jump[:, :-1]) | (jump[:, 1:] < 1e-12)), jump
    np.testing.assert_allclose(jump[:, -1], 0.0, atol=1e-10)
    np.testing.assert_array_less(f_in[:, 1:], f_in[:, :-1])
    np.testing.assert_allclose(f_in[:, -1], 0.0, atol=1e-6)


def test_value_filter_of_ones_is_the_plain_model(x64):
    """The value filter adds ``F`` outputs per block to the filter network and scales the
    values by them: with those outputs' weights 0 and biases 1 the model is the plain one
    (same energy), with its own weights it differs, and its weights get gradients."""
    plain = So3krates(SO3, rngs=nnx.Rngs(2))
    model = So3krates(dataclasses.replace(SO3, value_filter=True), rngs=nnx.Rngs(5))
    count = lambda m: sum(p.size for p in jax.tree.leaves(nnx.state(m, nnx.Param)))  # noqa: E731
    assert count(model) - count(plain) == SO3.steps * (SO3.dim * SO3.dim + SO3.dim)
    a = ethanol()
    graph = pad([radius_graph(a.numbers, a.positions, SO3.cutoff)], dtype=np.float64)
    energy = lambda m: np.asarray(m(graph)["energy"])  # noqa: E731
    assert np.abs(energy(model) - energy(plain)).max() > 1e-4
    grads = nnx.grad(lambda m: jnp.sum(m(graph)["energy"]))(model)
    for t in range(SO3.steps):
        g = grads["attentions"][t]["filter_out"]["kernel"]
        g = np.asarray(g[...] if hasattr(g, "__getitem__") else g)
        np.testing.assert_array_less(1e-8, np.abs(g[:, SO3.dim:2 * SO3.dim]).max())
    dim = SO3.dim
    for ours, theirs in zip(model.attentions, plain.attentions, strict=True):
        for name in ("query", "key", "value", "out", "degree_query", "degree_key",
                     "filter_in"):
            nnx.update(getattr(ours, name), nnx.state(getattr(theirs, name)))
        k, b = np.asarray(theirs.filter_out.kernel[...]), np.asarray(theirs.filter_out.bias[...])
        ours.filter_out.kernel[...] = jnp.asarray(np.concatenate(
            [k[:, :dim], np.zeros((k.shape[0], dim)), k[:, dim:]], 1))
        ours.filter_out.bias[...] = jnp.asarray(np.concatenate(
            [b[:dim], np.ones(dim), b[dim:]]))
    for name in ("embed", "x_radial", "attn_norms", "mix_norms", "mixings", "final_norm",
                 "readout"):
        nnx.update(getattr(model, name), nnx.state(getattr(plain, name)))
    np.testing.assert_allclose(energy(model), energy(plain), rtol=1e-12)


def test_channels_add_heads_and_a_mixing_that_all_learn(x64):
    """``channels=C``: per block C·L Euclidean heads (queries, keys, filter outputs), C·L
    norms into the filter and the mixing MLP, a [L, C, C] channel mixing; the count by hand,
    and every weight (the mixing's included) gets a gradient of the energy."""
    c, big_l, d, f, hidden, rbf = 3, SO3.max_degree, SO3.degree_dim, SO3.dim, SO3.mix_dim, \
        SO3.num_rbf
    plain = So3krates(SO3, rngs=nnx.Rngs(2))
    model = So3krates(dataclasses.replace(SO3, channels=c), rngs=nnx.Rngs(2))
    count = lambda m: sum(p.size for p in jax.tree.leaves(nnx.state(m, nnx.Param)))  # noqa: E731
    more = (c - 1) * big_l  # extra (channel, degree) pairs
    per_block = (2 * f * more * d  # degree queries and keys
                 + more * f  # filter_in reads more norms
                 + (f + 1) * more * d  # filter_out gives more head filters
                 + more * hidden + (hidden + 1) * more  # the mixing MLP in and out
                 + big_l * c * c)  # the channel mixing
    assert count(model) - count(plain) == (rbf + 1) * more + SO3.steps * per_block
    a = ethanol()
    graph = pad([radius_graph(a.numbers, a.positions, SO3.cutoff)], dtype=np.float64)
    grads = nnx.grad(lambda m: jnp.sum(m(graph)["energy"]))(model)
    flat = nnx.to_flat_state(grads)
    assert any("channel_mix" in str(path) for path, _ in flat)
    for path, g in flat:
        value = np.asarray(g[...] if hasattr(g, "__getitem__") else g)
        assert np.abs(value).max() > 0, path
    with pytest.raises(ValueError, match="channels must be at least 1, got 0"):
        So3kratesConfig(channels=0)


def test_degree_one_alone_is_a_smaller_model_with_the_same_contract():
    small = So3krates(dataclasses.replace(SO3, max_degree=1), rngs=nnx.Rngs(0))
    full = So3krates(SO3, rngs=nnx.Rngs(0))
    a = ethanol()
    graph = pad([radius_graph(a.numbers, a.positions, SO3.cutoff)])
    out_small, out_full = small(graph), full(graph)
    assert set(out_small) == set(out_full) == {"energy", "per_atom"}
    assert small.features(graph)[1].shape == (48, 1, 3)
    n_small, n_full = (sum(p.size for p in jax.tree.leaves(nnx.state(m, nnx.Param)))
                       for m in (small, full))
    assert n_small < n_full
    assert abs(float(out_small["energy"][0]) - float(out_full["energy"][0])) > 1e-6


def test_denoising_head_rotates_as_a_vector_and_the_term_switches_it_on():
    """The ``"noise"`` output turns with the molecule (``noise(pos R^T) = noise(pos) R^T``),
    ignores translations, is 0 on padding atoms, leaves the energy as it is without the
    head; the denoising term switches the head on (the attention model needs vectors)."""
    from mpattn.models import default_config
    from mpattn.train import Denoising

    config = Denoising(sigma=0.02).model_config(SO3)
    assert config.denoise and not SO3.denoise
    plain, model = (So3krates(c, rngs=nnx.Rngs(0)) for c in (SO3, config))
    a = ethanol()
    rot = np.asarray(random_rotation(np.random.default_rng(3)))
    graph = pad([radius_graph(a.numbers, a.positions, SO3.cutoff)])
    turned = pad([radius_graph(a.numbers, a.positions @ rot.T + 1.5, SO3.cutoff)])
    out, out_turned = model(graph), model(turned)
    n = len(a.numbers)
    noise = np.asarray(out["noise"])
    assert noise.shape == (graph.nodes["z"].shape[0], 3)
    assert np.abs(noise[:n]).max() > 1e-4  # not trivially zero
    np.testing.assert_allclose(np.asarray(out_turned["noise"])[:n], noise[:n] @ rot.T,
                               atol=1e-5)
    np.testing.assert_allclose(noise[n:], 0.0, atol=1e-7)
    np.testing.assert_allclose(out["energy"], plain(graph)["energy"], rtol=1e-6)
    with pytest.raises(ValueError, match="denoising needs a model with a denoising head: "
                                         "so3krates, or attention with vector_features"):
        Denoising(sigma=0.02).model_config(default_config("attention"))


def test_trains_as_a_potential_and_runs_in_ase(tmp_path):
    """The one trainer fits a small SO3krates to 200 frames of the bundled ethanol xTB set
    (the validation force error falls), and the run serves ASE's calculator interface
    (forces without a net force, an xTB-scale energy)."""
    from ase.build import molecule

    from mpattn.ase import Calculator
    from mpattn.data.frames import ethanol_xtb_path, read_frames
    from mpattn.models import create_model, default_config
    from mpattn.train import EnergyForceTask, TrainConfig, Trainer

    frames = read_frames(ethanol_xtb_path())
    config = TrainConfig(model="so3krates", loss="mse", lr=3e-3, schedule="cosine", epochs=6,
                         batch_size=8, checkpoint_every_s=1e9)
    task = EnergyForceTask(cutoff=SO3.cutoff, beta=0.99)
    data = task.prepare(frames, (np.arange(200), np.arange(1000, 1016),
                                 np.arange(1016, 1020)), config)
    model_config = task.model_config(default_config("so3krates",
                                                    **dataclasses.asdict(SO3)))
    init = nnx.state(task.module(create_model("so3krates", rngs=nnx.Rngs(0),
                                              config=model_config), data), nnx.Param)
    trainer = Trainer(config, task, data, tmp_path / "so3", model_config=model_config,
                      log=lambda _msg: None, init_params=init)
    history = trainer.fit(progress=False)
    assert history[-1]["val_force_mae_mev_ang"] < 0.8 * history[0]["val_force_mae_mev_ang"]
    atoms = molecule("CH3CH2OH")
    atoms.calc = Calculator(tmp_path / "so3")
    forces = atoms.get_forces()
    assert forces.shape == (9, 3) and np.abs(forces).max() > 1e-3
    np.testing.assert_allclose(forces.sum(axis=0), 0.0, atol=1e-4)
    assert -312 < atoms.get_potential_energy() < -306
