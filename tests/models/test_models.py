"""Every registered model: the output mapping, invariances, padding, jit, per-atom outputs,
registry errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mpattn import testing
from mpattn.elements import QM9_ELEMENTS
from mpattn.graph import Budget, pad_batch
from mpattn.models import create_model, default_config, model_names
from mpattn.potential import Potential

INDEX = np.arange(100, 112)  # 12 real QM9 molecules (5-9 heavy atoms)
BUDGET = Budget(384, 6144, 16)
TOL = dict(rtol=2e-4, atol=2e-4)


@pytest.fixture(scope="module")
def models():
    return {name: create_model(name, rngs=nnx.Rngs(0)) for name in model_names()}


@pytest.fixture(scope="module")
def batch(qm9_graphset):
    return pad_batch(qm9_graphset, INDEX, BUDGET)


def _jitted(model):
    """The model's output mapping, jitted."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def f(state, graph):
        return nnx.merge(graphdef, state)(graph)

    return lambda graph: f(state, graph)


def _energy(fn):
    """``fn(graph)["energy"]``: the per-graph predictions the invariance helpers compare."""
    return lambda graph: fn(graph)["energy"]


def _is_sum_readout(model) -> bool:
    return getattr(model.config, "readout", "sum") == "sum"


def test_registry_names_and_errors():
    assert model_names() == ["attention", "mhmp", "mhmp_pe", "mpnn", "schnet", "so3krates"]
    with pytest.raises(ValueError, match=r"unknown model 'gat'; choose from \['attention', 'mhmp', "
                                         r"'mhmp_pe'"):
        default_config("gat")
    with pytest.raises(ValueError, match=r"mpnn: unknown config field\(s\) \['heads'\]"):
        create_model("mpnn", rngs=nnx.Rngs(0), heads=4)
    assert default_config("mhmp_pe").positional_encoding
    assert create_model("schnet", rngs=nnx.Rngs(0), interactions=2).config.interactions == 2


def test_old_name_of_the_attention_model_is_an_error():
    for make in (lambda: create_model("attention_potential", rngs=nnx.Rngs(0)),
                 lambda: default_config("attention_potential", dim=16)):
        with pytest.raises(ValueError, match=r"unknown model 'attention_potential' "
                                             r"\(renamed 'attention'\); choose from"):
            make()


@pytest.mark.parametrize(("name", "overrides"),
                         [(name, {}) for name in model_names()]
                         + [("mhmp", {"readout": "sum"}), ("mpnn", {"readout": "sum"})])
def test_every_model_returns_the_output_mapping(models, batch, name, overrides):
    """One dict per call: "energy" [num_graphs] always; "per_atom" [num_nodes] exactly for
    sum-readout models, summing per graph to "energy" and 0 on padding (docs/design.md,
    "Output contract"); no head outputs at the class defaults."""
    model = create_model(name, rngs=nnx.Rngs(1), **overrides) if overrides else models[name]
    out = _jitted(model)(batch)
    assert isinstance(out, dict)
    assert set(out) == ({"energy", "per_atom"} if _is_sum_readout(model) else {"energy"})
    assert out["energy"].shape == (BUDGET.n_graph,)
    real = int(batch.n_node[:len(INDEX)].sum())
    assert np.all(np.isfinite(np.asarray(out["energy"])[:len(INDEX)]))
    if not _is_sum_readout(model):
        return
    atoms = np.asarray(out["per_atom"], np.float64)
    assert atoms.shape == (BUDGET.n_node,)
    assert np.all(np.isfinite(atoms[:real])) and np.abs(atoms[:real]).max() > 0
    np.testing.assert_array_equal(atoms[real:], 0.0)  # padding nodes
    np.testing.assert_array_equal(np.asarray(out["energy"])[len(INDEX):], 0.0)  # padding graphs
    seg = np.repeat(np.arange(BUDGET.n_graph), batch.n_node)
    np.testing.assert_allclose(np.bincount(seg, atoms, minlength=BUDGET.n_graph),
                               out["energy"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["mhmp", "mpnn", "schnet", "so3krates"])
def test_permutation_invariant(models, batch, name):
    testing.assert_permutation_invariant(_energy(_jitted(models[name])), batch, **TOL)


def test_mhmp_pe_is_not_permutation_invariant(models, batch):
    """The positional encoding of the atom index is why MH-MP+PE scored worse in the thesis."""
    with pytest.raises(AssertionError, match="not permutation invariant"):
        testing.assert_permutation_invariant(_energy(_jitted(models["mhmp_pe"])), batch, **TOL)


@pytest.mark.parametrize("name", ["mhmp", "mhmp_pe", "mpnn", "schnet", "so3krates"])
def test_rotation_and_translation_invariant(models, batch, name):
    f = _energy(_jitted(models[name]))
    testing.assert_rotation_invariant(f, batch, **TOL)
    testing.assert_translation_invariant(f, batch, **TOL)


@pytest.mark.parametrize("name", ["mhmp", "mhmp_pe", "mpnn", "schnet", "so3krates"])
def test_padding_and_composition_invariant(models, qm9_graphset, name):
    f = _energy(_jitted(models[name]))
    testing.assert_padding_invariant(f, qm9_graphset, INDEX, [BUDGET, Budget(640, 9216, 40)],
                                     rtol=1e-5, atol=1e-5)
    testing.assert_composition_invariant(f, qm9_graphset, INDEX[:6], np.arange(300, 320),
                                         Budget(640, 9216, 40), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["mhmp", "mpnn", "schnet", "so3krates"])
def test_jit_and_no_jit_agree(models, batch, name):
    jitted, eager = _jitted(models[name])(batch), models[name](batch)
    assert set(jitted) == set(eager)
    for key in eager:
        np.testing.assert_allclose(jitted[key], eager[key], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("name", "overrides"), [("schnet", {}), ("mhmp", {"readout": "sum"}),
                                                 ("mpnn", {"readout": "sum"})])
def test_per_atom_outputs_sum_to_the_prediction(batch, name, overrides):
    model = create_model(name, rngs=nnx.Rngs(1), **overrides)
    out = model(batch)
    total, atoms = out["energy"], out["per_atom"]
    assert atoms.shape == (BUDGET.n_node,)
    seg = np.repeat(np.arange(BUDGET.n_graph), batch.n_node)
    np.testing.assert_allclose(np.bincount(seg, atoms, minlength=BUDGET.n_graph), total,
                               rtol=1e-5, atol=1e-5)


def test_per_atom_needs_a_sum_readout(models, batch):
    """Without a sum readout there are no per-atom outputs: no "per_atom" key, and a
    Potential (which sums per-atom energies) refuses the model."""
    assert "per_atom" not in jax.eval_shape(models["mhmp"], batch)
    pot = Potential(models["mhmp"], elements=QM9_ELEMENTS)
    with pytest.raises(ValueError, match=r"a potential needs a model whose outputs hold "
                                         r"'per_atom' \[num_nodes\] \(a sum readout\), got "
                                         r"\['energy'\]"):
        jax.eval_shape(pot, batch)


@pytest.mark.parametrize("name", ["mhmp", "mpnn", "schnet"])
def test_position_gradients_finite_with_coincident_atoms(models, batch, name):
    pos = np.array(batch.nodes["positions"])
    pos[1] = pos[0]  # two atoms of the first molecule at the same place
    graph = batch._replace(nodes={**batch.nodes, "positions": jnp.asarray(pos)})
    model = models[name]

    def energy(p):
        return jnp.sum(model(graph._replace(nodes={**graph.nodes, "positions": p}))["energy"][:12])

    g = jax.grad(energy)(jnp.asarray(pos))
    assert np.all(np.isfinite(g)) and np.any(g != 0)


def test_dense_layout_rejects_too_large_molecules(batch):
    model = create_model("mpnn", rngs=nnx.Rngs(0), max_nodes=8)
    with pytest.raises(ValueError, match="mpnn: a molecule has 1[0-9] atoms, more than "
                                         "max_nodes=8"):
        model.check(batch)


def test_bonded_only_ignores_non_bonded_edges(batch):
    """With ``bonded_only`` a model on the complete edge set gives the same output as on the
    bonded edges alone: non-bonded edges carry nothing."""
    model = create_model("mpnn", rngs=nnx.Rngs(2), bonded_only=True, layout="plain")
    bonded = np.asarray(batch.edges["bond"]) != 4
    keep = bonded | (np.arange(len(bonded)) >= int(batch.n_edge[:12].sum()))
    sub = batch._replace(senders=batch.senders[keep], receivers=batch.receivers[keep],
                         edges={k: v[keep] for k, v in batch.edges.items()},
                         n_edge=np.array([*[int(bonded[s:e].sum()) for s, e in zip(
                             np.cumsum(np.r_[0, batch.n_edge[:-1]])[:12],
                             np.cumsum(batch.n_edge)[:12], strict=True)],
                             *batch.n_edge[12:]], np.int32))
    np.testing.assert_allclose(model(sub)["energy"][:12], model(batch)["energy"][:12],
                               rtol=1e-5, atol=1e-5)


def test_schnet_gradients_finite_at_exactly_the_cutoff(batch):
    model = create_model("schnet", rngs=nnx.Rngs(3), interactions=2, cutoff=1.5)
    pos = np.array(batch.nodes["positions"], np.float32)
    pos[1] = pos[0] + np.array([1.5, 0.0, 0.0], np.float32)  # exactly at the cutoff
    graph = batch._replace(nodes={**batch.nodes, "positions": jnp.asarray(pos)})
    d = np.linalg.norm(pos[1] - pos[0])
    assert d == np.float32(1.5)

    def energy(p):
        return jnp.sum(model(graph._replace(nodes={**graph.nodes, "positions": p}))["energy"][:12])

    g = jax.grad(energy)(jnp.asarray(pos))
    assert np.all(np.isfinite(g))


def test_mhmp_with_distance_aware_attention_is_invariant(batch):
    model = create_model("mhmp", rngs=nnx.Rngs(4), attention_bias="bond+distance")
    f = _energy(_jitted(model))
    testing.assert_permutation_invariant(f, batch, **TOL)
    testing.assert_rotation_invariant(f, batch, **TOL)
    out = f(batch)
    plain = _energy(_jitted(create_model("mhmp", rngs=nnx.Rngs(4))))(batch)
    assert not np.allclose(out[:12], plain[:12])  # the bias does change the model


def _num_params(module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


def test_mhmp_untied_steps_equal_the_tied_model_given_its_weights(batch):
    tied = create_model("mhmp", rngs=nnx.Rngs(5), readout="sum")
    untied = create_model("mhmp", rngs=nnx.Rngs(6), readout="sum", share_weights=False)
    per_step = _num_params(tied.message) + _num_params(tied.update)
    assert _num_params(untied) == _num_params(tied) + 2 * per_step
    testing.assert_permutation_invariant(_energy(_jitted(untied)), batch, **TOL)
    assert not np.allclose(_jitted(untied)(batch)["energy"][:12],
                           _jitted(tied)(batch)["energy"][:12])
    for name in ("embed", "readout"):
        nnx.update(getattr(untied, name), nnx.state(getattr(tied, name)))
    for i in range(3):  # every step gets the tied model's one message and update module
        nnx.update(untied.message[i], nnx.state(tied.message))
        nnx.update(untied.update[i], nnx.state(tied.update))
    got, want = _jitted(untied)(batch), _jitted(tied)(batch)
    for key in ("energy", "per_atom"):
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-5)


def test_register_model_adds_a_named_model_and_guards_builtins():
    from dataclasses import dataclass

    from mpattn.models import MODELS, register_model

    @dataclass(frozen=True)
    class TinyConfig:
        dim: int = 8

    class Tiny(nnx.Module):
        def __init__(self, config, *, rngs):
            self.config = config
            self.lin = nnx.Linear(1, config.dim, rngs=rngs)

    try:
        register_model("tiny_test", Tiny, TinyConfig())
        assert "tiny_test" in model_names()
        model = create_model("tiny_test", rngs=nnx.Rngs(0), dim=4)
        assert isinstance(model, Tiny) and model.config.dim == 4
        with pytest.raises(ValueError, match=r"tiny_test: unknown config field\(s\) \['heads'\]"):
            default_config("tiny_test", heads=2)
    finally:
        MODELS.pop("tiny_test", None)
    with pytest.raises(ValueError, match="'schnet' is a built-in model; choose another name"):
        register_model("schnet", Tiny, TinyConfig())
    with pytest.raises(ValueError, match="config must be a dataclass instance"):
        register_model("tiny_test", Tiny, TinyConfig)


@pytest.mark.parametrize("bonded_only", [False, True])
def test_schnet_filters_per_pair_equal_filters_per_edge(batch, bonded_only):
    # pad_batch marks each edge's unordered pair; SchNet then runs its filter network once per
    # pair. Predictions and forces must equal the per-edge form (the graph without "pair").
    assert "pair" in batch.edges
    model = create_model("schnet", rngs=nnx.Rngs(4), interactions=2, bonded_only=bonded_only)
    per_edge = batch._replace(edges={k: v for k, v in batch.edges.items() if k != "pair"})

    def energy(p, graph):
        return jnp.sum(model(graph._replace(nodes={**graph.nodes, "positions": p}))["energy"][:12])

    pos = jnp.asarray(batch.nodes["positions"])
    paired, unpaired = model(batch), model(per_edge)
    for key in ("energy", "per_atom"):
        np.testing.assert_allclose(paired[key], unpaired[key], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jax.grad(energy)(pos, batch), jax.grad(energy)(pos, per_edge),
                               rtol=1e-4, atol=1e-5)
    # a wrong pairing (each edge's filter taken from another pair) changes the prediction
    wrong = batch._replace(edges={**batch.edges, "pair": np.roll(batch.edges["pair"], 1)})
    assert np.abs(np.asarray(model(wrong)["energy"] - paired["energy"])[:12]).max() > 1e-3
