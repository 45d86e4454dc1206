"""Tests for mpattn.nn.readout: golden values, padding and permutation invariance, references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mpattn.graph import Budget, node_mask, pad_batch
from mpattn.nn.readout import (
    AttentionReadout,
    Set2Set,
    SumReadout,
    graph_cross_attention,
    mean_readout,
    sum_readout,
)

DIM = 8
MOLS = np.array([3, 10, 42, 117, 250])  # five real QM9 molecules of different sizes

# Hand-made batch: graphs of 2 and 3 nodes, then the padding graph (1 node), then an empty graph.
H_HAND = np.array([[1, 2], [3, 4], [5, 6], [7, 8], [9, 10], [100, 200]], np.float32)
N_HAND = np.array([2, 3, 1, 0], np.int32)
MASK_HAND = np.array([True] * 5 + [False])


# ----------------------------------------------------------------------------- fixtures


def _budgets(gs, index):
    n, e, k = int(gs.n_node[index].sum()), int(gs.n_edge[index].sum()), len(index)
    return Budget(n + 1, e, k + 1), Budget(n + 13, e + 40, k + 3)


def _states(batch, junk_seed=0):
    """Node states of a padded real QM9 batch, numpy float32 [N, DIM].

    Real rows are a fixed random projection of the real node features (one-hot element,
    hybridization, ...); padding rows hold large nonzero junk that differs with ``junk_seed``.
    """
    feats = np.asarray(batch.nodes["features"], np.float64)
    proj = np.random.default_rng(1234).normal(size=(feats.shape[1], DIM)) / np.sqrt(3.0)
    h = np.tanh(feats @ proj + 0.1).astype(np.float32)
    n_real = _n_real(batch)
    h[n_real:] = 50.0 * np.random.default_rng(junk_seed).normal(size=h[n_real:].shape) + 7.0
    return h, n_real


def _n_real(batch) -> int:
    return int(batch.n_node[: len(MOLS)].sum())


def _mask(batch) -> np.ndarray:
    return np.arange(batch.nodes["z"].shape[0]) < _n_real(batch)


@pytest.fixture(scope="module")
def batches(qm9_graphset):
    """The same five QM9 molecules padded to a tight and to a loose budget."""
    b1, b2 = _budgets(qm9_graphset, MOLS)
    return pad_batch(qm9_graphset, MOLS, b1), pad_batch(qm9_graphset, MOLS, b2)


# Most tests call through jit: one compilation per shape instead of one per eager op (eager
# execution is exercised against these in the jit == no-jit tests).


@nnx.jit
def _call(mod, h, n_node, mask=None):
    return mod(h, n_node, mask=mask)


@nnx.jit
def _call_atoms(mod, h, n_node, mask=None):
    return mod(h, n_node, mask=mask, per_atom=True)


_sum = jax.jit(sum_readout)
_mean = jax.jit(mean_readout)


_FACTORIES = {
    "set2set": lambda: Set2Set(DIM, steps=3, rngs=nnx.Rngs(0)),
    "attention": lambda: AttentionReadout(DIM, num_heads=3, head_dim=4, num_queries=2,
                                          rngs=nnx.Rngs(1)),
    "attention_out": lambda: AttentionReadout(DIM, num_heads=3, head_dim=4, out_dim=5,
                                              rngs=nnx.Rngs(2)),
    "sum": lambda: SumReadout(DIM, out=1, hidden=16, rngs=nnx.Rngs(3)),
}


@pytest.fixture(scope="module", params=list(_FACTORIES))
def readout(request):
    """Each readout module, built once per test module."""
    return _FACTORIES[request.param]()


# ----------------------------------------------------------------------------- sum / mean


def test_sum_readout_golden():
    np.testing.assert_allclose(_sum(H_HAND, N_HAND), [[4, 6], [21, 24], [100, 200], [0, 0]])
    np.testing.assert_allclose(_sum(H_HAND, N_HAND, mask=MASK_HAND),
                               [[4, 6], [21, 24], [0, 0], [0, 0]])


def test_mean_readout_golden():
    np.testing.assert_allclose(_mean(H_HAND, N_HAND), [[2, 3], [7, 8], [100, 200], [0, 0]])
    np.testing.assert_allclose(_mean(H_HAND, N_HAND, mask=MASK_HAND),
                               [[2, 3], [7, 8], [0, 0], [0, 0]])


def test_sum_readout_module_golden_and_per_atom():
    h, n_node = H_HAND, N_HAND
    mod = SumReadout(2, rngs=nnx.Rngs(0))
    w = np.asarray(mod.final.kernel[...])[:, 0]
    b = float(np.asarray(mod.final.bias[...])[0])
    atom_ref = H_HAND.astype(np.float64) @ w + b
    total, atom = _call_atoms(mod, h, n_node)
    assert total.shape == (4,) and atom.shape == (6,)
    np.testing.assert_allclose(atom, atom_ref, rtol=1e-5)
    np.testing.assert_allclose(
        total, [atom_ref[:2].sum(), atom_ref[2:5].sum(), atom_ref[5], 0.0], rtol=1e-5)
    np.testing.assert_allclose(_call(mod, h, n_node), total)
    # Masked atoms contribute nothing and report 0.
    total_m, atom_m = _call_atoms(mod, h, n_node, MASK_HAND)
    np.testing.assert_allclose(atom_m, np.r_[atom_ref[:5], 0.0], rtol=1e-5)
    np.testing.assert_allclose(total_m, np.r_[total[:2], 0.0, 0.0], rtol=1e-5)


def test_sum_readout_module_hidden_and_vector_output():
    h = H_HAND / 100
    mod = SumReadout(2, out=3, hidden=5, activation=jax.nn.relu, rngs=nnx.Rngs(0))
    total, atom = _call_atoms(mod, h, N_HAND)
    assert total.shape == (4, 3) and atom.shape == (6, 3)
    x = np.maximum(np.asarray(h) @ np.asarray(mod.hidden.kernel[...])
                   + np.asarray(mod.hidden.bias[...]), 0)
    atom_ref = x @ np.asarray(mod.final.kernel[...]) + np.asarray(mod.final.bias[...])
    np.testing.assert_allclose(atom, atom_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(total[1], atom_ref[2:5].sum(0), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- padding


def test_readouts_ignore_padding(batches, readout):
    mod = readout
    b1, b2 = batches
    h1, n_real = _states(b1, junk_seed=1)
    h2, _ = _states(b2, junk_seed=2)
    np.testing.assert_array_equal(h1[:n_real], h2[:n_real])
    assert not np.allclose(h2[n_real:], 0)  # junk really is there
    k = len(MOLS)
    out1 = _call(mod, h1, b1.n_node)
    out2 = _call(mod, h2, b2.n_node)
    assert out1.shape[0] == b1.n_node.shape[0] and out2.shape[0] == b2.n_node.shape[0]
    np.testing.assert_allclose(out1[:k], out2[:k], rtol=1e-6, atol=1e-6)
    # With the node mask, even the padding graph's output no longer depends on the junk.
    h3, _ = _states(b2, junk_seed=3)
    m2 = _mask(b2)
    out2m = _call(mod, h2, b2.n_node, m2)
    out3m = _call(mod, h3, b2.n_node, m2)
    np.testing.assert_allclose(out2m, out3m, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out2m[:k], out2[:k], rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- permutation


def test_readouts_permutation_invariant(batches, readout):
    mod = readout
    b = batches[1]
    h, _ = _states(b)
    n_node = np.asarray(b.n_node)
    start = np.concatenate([[0], np.cumsum(n_node)])
    rng = np.random.default_rng(0)
    perm = np.arange(h.shape[0])
    for g in range(len(MOLS)):  # shuffle the atoms of every molecule, within the molecule
        perm[start[g]:start[g + 1]] = rng.permutation(np.arange(start[g], start[g + 1]))
    assert not np.array_equal(perm, np.arange(h.shape[0]))
    out = _call(mod, h, n_node)
    out_p = _call(mod, h[perm], n_node)
    np.testing.assert_allclose(out_p, out, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- references


def _softmax(x, axis=0):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def test_attention_readout_matches_numpy_reference(batches):
    b = batches[1]
    h, n_real = _states(b)
    nh, dh, nq = 3, 4, 2
    mod = AttentionReadout(DIM, num_heads=nh, head_dim=dh, num_queries=nq, rngs=nnx.Rngs(5))
    out = np.asarray(_call(mod, h, b.n_node, _mask(b)))
    wk = np.asarray(mod.key.kernel[...], np.float64)
    wv = np.asarray(mod.value.kernel[...], np.float64)
    bv = np.asarray(mod.value.bias[...], np.float64)
    qs = np.asarray(mod.queries[...], np.float64)  # [Q, H, dh]
    hn = np.asarray(h, np.float64)
    start = np.concatenate([[0], np.cumsum(b.n_node)])
    ref = np.zeros((b.n_node.shape[0], nq, nh, dh))
    for g in range(len(MOLS)):
        hg = hn[start[g]:start[g + 1]]
        keys = (hg @ wk).reshape(-1, nh, dh)
        vals = (hg @ wv + bv).reshape(-1, nh, dh)
        for q in range(nq):
            for k in range(nh):
                a = _softmax(keys[:, k] @ qs[q, k] / np.sqrt(dh))
                ref[g, q, k] = a @ vals[:, k]
    np.testing.assert_allclose(out, ref.reshape(ref.shape[0], -1), rtol=1e-5, atol=1e-6)


def test_graph_cross_attention_per_graph_queries():
    rng = np.random.default_rng(0)
    n_node = np.array([2, 3, 1], np.int32)
    keys = rng.normal(size=(6, 2, 3))
    vals = rng.normal(size=(6, 2, 4))
    queries = rng.normal(size=(3, 1, 2, 3))  # [G, Q, H, dh]
    seg = np.repeat(np.arange(3), n_node)
    attend = jax.jit(graph_cross_attention, static_argnames="num_graphs")
    out = attend(queries, keys, vals, node_graph=seg, num_graphs=3)
    assert out.shape == (3, 1, 2, 4)
    for g in range(3):
        rows = seg == g
        for k in range(2):
            a = _softmax(keys[rows, k] @ queries[g, 0, k] / np.sqrt(3))
            np.testing.assert_allclose(out[g, 0, k], a @ vals[rows, k], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"queries must be \[Q, H, dh\] or \[G, Q, H, dh\]"):
        graph_cross_attention(jnp.zeros((3,)), jnp.asarray(keys), jnp.asarray(vals),
                              node_graph=jnp.asarray(seg), num_graphs=3)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _set2set_reference(mod: Set2Set, h: np.ndarray) -> np.ndarray:
    """Set2Set of one graph's nodes [n, d] in float64 numpy, with the module's LSTM weights."""
    p = {name: (np.asarray(getattr(mod.lstm, name).kernel[...], np.float64),
                None if getattr(mod.lstm, name).bias is None
                else np.asarray(getattr(mod.lstm, name).bias[...], np.float64))
         for name in ["ii", "if_", "ig", "io", "hi", "hf", "hg", "ho"]}

    def lin(name, x):
        w, b = p[name]
        return x @ w + (0 if b is None else b)

    d = h.shape[1]
    c, hid = np.zeros(d), np.zeros(d)
    q_star = np.zeros(2 * d)
    for _ in range(mod.steps):
        i = _sigmoid(lin("ii", q_star) + lin("hi", hid))
        f = _sigmoid(lin("if_", q_star) + lin("hf", hid))
        g = np.tanh(lin("ig", q_star) + lin("hg", hid))
        o = _sigmoid(lin("io", q_star) + lin("ho", hid))
        c = f * c + i * g
        hid = o * np.tanh(c)
        a = _softmax(h @ hid)
        q_star = np.concatenate([hid, a @ h])
    return q_star


def test_set2set_matches_numpy_reference(batches):
    b = batches[1]
    h, _ = _states(b)
    mod = Set2Set(DIM, steps=4, rngs=nnx.Rngs(11))
    out = np.asarray(_call(mod, h, b.n_node))
    assert out.shape == (b.n_node.shape[0], 2 * DIM)
    start = np.concatenate([[0], np.cumsum(b.n_node)])
    hn = np.asarray(h, np.float64)
    for g in range(len(MOLS)):
        ref = _set2set_reference(mod, hn[start[g]:start[g + 1]])
        np.testing.assert_allclose(out[g], ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("readout", ["set2set", "attention"], indirect=True)
def test_per_graph_calls_match_batched_call(batches, readout):
    mod = readout
    b = batches[1]
    h, _ = _states(b)
    out = _call(mod, h, b.n_node)
    start = np.concatenate([[0], np.cumsum(b.n_node)])
    for g in range(3):  # one compilation per molecule size: three are enough
        one = _call(mod, h[start[g]:start[g + 1]], b.n_node[g:g + 1])
        np.testing.assert_allclose(one[0], out[g], rtol=1e-5, atol=1e-6)


def test_set2set_rejects_zero_steps():
    with pytest.raises(ValueError, match="Set2Set needs steps >= 1, got 0"):
        Set2Set(4, steps=0, rngs=nnx.Rngs(0))


# ----------------------------------------------------------------------------- jit


@pytest.mark.parametrize("readout", ["set2set", "attention_out", "sum"], indirect=True)
def test_jit_matches_eager(batches, readout):
    mod = readout
    b = batches[1]
    h, _ = _states(b)
    n_node, mask = jnp.asarray(b.n_node), node_mask(b)  # jraph's mask, as a model would use
    np.testing.assert_array_equal(mask, _mask(b))
    np.testing.assert_allclose(_call(mod, h, n_node, mask), mod(h, n_node, mask=mask),
                               rtol=1e-5, atol=1e-6)
    if isinstance(mod, SumReadout):
        tot, atom = _call_atoms(mod, h, n_node)
        tot_e, atom_e = mod(h, n_node, per_atom=True)
        np.testing.assert_allclose(tot, tot_e, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(atom, atom_e, rtol=1e-5, atol=1e-6)


def test_pure_readouts_jit_matches_eager():
    h, n_node, mask = jnp.asarray(H_HAND), jnp.asarray(N_HAND), jnp.asarray(MASK_HAND)
    np.testing.assert_allclose(_sum(h, n_node, mask=mask), sum_readout(h, n_node, mask=mask))
    np.testing.assert_allclose(_mean(h, n_node, mask=mask), mean_readout(h, n_node, mask=mask))
