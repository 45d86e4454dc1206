"""Tests for mpattn.nn.embed: atom embeddings and the sinusoidal positional encoding."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mpattn.graph import Budget, pad_batch
from mpattn.nn.embed import (
    AtomEmbedding,
    add_positional_encoding,
    atom_index_in_graph,
    sinusoidal_encoding,
)
from mpattn.nn.readout import SumReadout

# Golden checks call through jit (one compilation instead of one per eager op); eager
# execution is compared with these in the jit == no-jit checks.
_index = jax.jit(atom_index_in_graph, static_argnums=1)
_encode = jax.jit(sinusoidal_encoding, static_argnames=("dim", "max_period", "dtype"))
_add_pe = jax.jit(add_positional_encoding, static_argnames="max_period")
_embed = nnx.jit(lambda m, nodes: m(nodes))


@pytest.fixture(scope="module")
def batch(qm9_graphset):
    index = np.array([5, 20, 64])
    n, e = int(qm9_graphset.n_node[index].sum()), int(qm9_graphset.n_edge[index].sum())
    return pad_batch(qm9_graphset, index, Budget(n + 5, e + 8, 5))


# ----------------------------------------------------------------------------- AtomEmbedding


def test_atom_embedding_from_features(batch):
    feats = batch.nodes["features"]
    emb = AtomEmbedding(6, num_features=feats.shape[1], rngs=nnx.Rngs(0))
    h = _embed(emb, batch.nodes)
    assert h.shape == (feats.shape[0], 6)
    ref = feats @ np.asarray(emb.linear.kernel[...]) + np.asarray(emb.linear.bias[...])
    np.testing.assert_allclose(h, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(emb(batch.nodes), h, rtol=1e-6, atol=1e-6)  # eager == jit


def test_atom_embedding_from_z(batch):
    emb = AtomEmbedding(5, max_z=9, rngs=nnx.Rngs(0))
    table = np.asarray(emb.table.embedding[...])
    assert table.shape == (10, 5)  # rows 0..9
    z = np.asarray(batch.nodes["z"])
    h = np.asarray(_embed(emb, batch.nodes))
    assert h.shape == (z.shape[0], 5)
    np.testing.assert_array_equal(h, table[z])
    # Same element -> same vector; different elements -> different vectors.
    carbons, hydrogens = np.flatnonzero(z == 6), np.flatnonzero(z == 1)
    np.testing.assert_array_equal(h[carbons[0]], h[carbons[-1]])
    assert not np.allclose(h[carbons[0]], h[hydrogens[0]])
    np.testing.assert_array_equal(emb(batch.nodes), h)  # eager == jit


@pytest.mark.parametrize("kwargs", [{}, {"num_features": 12, "max_z": 9}])
def test_atom_embedding_needs_exactly_one_source(kwargs):
    with pytest.raises(ValueError, match="AtomEmbedding needs exactly one source"):
        AtomEmbedding(4, **kwargs, rngs=nnx.Rngs(0))


# ----------------------------------------------------------------------------- atom index


def test_atom_index_in_graph_golden():
    out = _index(np.array([2, 3, 1]), 6)
    assert out.dtype == jnp.int32
    np.testing.assert_array_equal(out, [0, 1, 0, 1, 2, 0])
    np.testing.assert_array_equal(_index(np.array([0, 2, 0, 3, 0]), 5), [0, 1, 0, 1, 2])
    np.testing.assert_array_equal(atom_index_in_graph(np.array([2, 3, 1]), 6),  # eager
                                  [0, 1, 0, 1, 2, 0])


def test_atom_index_in_graph_real_batch(batch):
    idx = np.asarray(_index(batch.n_node, batch.nodes["z"].shape[0]))
    ref = np.concatenate([np.arange(n) for n in batch.n_node])
    np.testing.assert_array_equal(idx, ref)


# ----------------------------------------------------------------------------- encoding


def test_sinusoidal_encoding_golden_dim4():
    pe = np.asarray(_encode(np.array([0, 1]), 4))
    # column 2i uses frequency 1 / 10000^(2i/4): 1 for i=0, 1/100 for i=1
    ref = [[0.0, 1.0, 0.0, 1.0],
           [math.sin(1.0), math.cos(1.0), math.sin(0.01), math.cos(0.01)]]
    np.testing.assert_allclose(pe, ref, rtol=1e-6, atol=1e-7)
    assert pe.dtype == np.float32
    np.testing.assert_allclose(sinusoidal_encoding(np.array([0, 1]), 4), pe, rtol=1e-6)  # eager


def test_sinusoidal_encoding_odd_dim_and_period():
    pe = np.asarray(_encode(np.array([0, 3]), 5, max_period=100.0))
    f = [1.0, 1.0, 100.0 ** (-2 / 5), 100.0 ** (-2 / 5), 100.0 ** (-4 / 5)]
    ref = [[0, 1, 0, 1, 0],
           [math.sin(3 * f[0]), math.cos(3 * f[1]), math.sin(3 * f[2]), math.cos(3 * f[3]),
            math.sin(3 * f[4])]]
    np.testing.assert_allclose(pe, ref, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="sinusoidal_encoding needs dim >= 1, got 0"):
        sinusoidal_encoding(np.array([0]), 0)


def test_add_positional_encoding_golden():
    h = np.ones((4, 4), np.float32)
    out = np.asarray(_add_pe(h, np.array([1, 3])))
    pe = _encode(np.array([0, 0, 1, 2]), 4)
    np.testing.assert_allclose(out, 1.0 + np.asarray(pe), rtol=1e-6)
    np.testing.assert_allclose(out[0], [1, 2, 1, 2], rtol=1e-6)
    eager = add_positional_encoding(jnp.asarray(h), jnp.array([1, 3]))
    np.testing.assert_allclose(eager, out, rtol=1e-6)


def test_positional_encoding_breaks_permutation_invariance(batch):
    """Swapping two atoms of different elements changes h + PE (the MH-MP+PE finding)."""
    emb = AtomEmbedding(8, max_z=9, rngs=nnx.Rngs(0))
    readout = SumReadout(8, hidden=16, rngs=nnx.Rngs(1))
    run = nnx.jit(lambda m, h, n: m(h, n))
    z = np.asarray(batch.nodes["z"])
    n0 = int(batch.n_node[0])
    i, j = 0, int(np.flatnonzero(z[:n0] != z[0])[0])  # first molecule: two different elements
    perm = np.arange(z.shape[0])
    perm[[i, j]] = [j, i]
    h = np.asarray(_embed(emb, batch.nodes))
    n_node = batch.n_node
    # Without PE, swapping rows just permutes them: per-atom features follow the atoms and
    # every readout is unchanged.
    np.testing.assert_allclose(run(readout, h[perm], n_node), run(readout, h, n_node),
                               rtol=1e-6)
    # With PE, the encoding stays with the position: the swapped atoms' rows change.
    with_pe = np.asarray(_add_pe(h, n_node))
    swapped_pe = np.asarray(_add_pe(h[perm], n_node))
    assert not np.allclose(swapped_pe[[i, j]], with_pe[perm][[i, j]], atol=1e-3)
    np.testing.assert_allclose(np.delete(swapped_pe, [i, j], 0),
                               np.delete(with_pe[perm], [i, j], 0), rtol=1e-6)
    # A linear sum is still invariant, a non-linear readout no longer is.
    np.testing.assert_allclose(swapped_pe[:n0].sum(0), with_pe[:n0].sum(0), rtol=1e-5,
                               atol=1e-5)
    out = run(readout, with_pe, n_node)
    out_swapped = run(readout, swapped_pe, n_node)
    assert abs(float(out[0] - out_swapped[0])) > 1e-4
    np.testing.assert_allclose(out_swapped[1:], out[1:], rtol=1e-6)
