"""Tests for mpattn.nn.update: the GRU update against a numpy formula, the transformer encoder."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mpattn.graph import Budget, pad_batch
from mpattn.nn.radial import edge_distances
from mpattn.nn.update import GRUUpdate, TransformerEncoderUpdate

MOLS = np.array([3, 10, 42, 117, 250])
DIM = 8


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _gru_numpy(h, m, Wi, bi, Wh):
    """One GRU step written out (r, z, n gates in this order, as flax.nnx.GRUCell)."""
    d = h.shape[1]
    xi, hh = m @ Wi + bi, h @ Wh
    r = _sigmoid(xi[:, :d] + hh[:, :d])
    z = _sigmoid(xi[:, d:2 * d] + hh[:, d:2 * d])
    n = np.tanh(xi[:, 2 * d:] + r * hh[:, 2 * d:])
    return (1 - z) * n + z * h


def test_gru_update_equals_numpy_formula():
    gru = GRUUpdate(DIM, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    cell = gru.cell
    cell.dense_i.bias[...] = jnp.asarray(rng.normal(size=3 * DIM), jnp.float32)  # not zero
    h = rng.normal(size=(7, DIM)).astype(np.float32)
    m = rng.normal(size=(7, DIM)).astype(np.float32)
    out = gru(jnp.asarray(h), jnp.asarray(m))
    assert out.shape == (7, DIM) and out.dtype == jnp.float32
    want = _gru_numpy(h.astype(np.float64), m.astype(np.float64),
                      np.asarray(cell.dense_i.kernel[...], np.float64),
                      np.asarray(cell.dense_i.bias[...], np.float64),
                      np.asarray(cell.dense_h.kernel[...], np.float64))
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(nnx.jit(lambda g, h, m: g(h, m))(gru, h, m), out, rtol=1e-6,
                               atol=1e-6)


def test_gru_update_closed_update_gate_keeps_state():
    # A large update-gate bias makes z = 1: a zero message leaves h unchanged (as documented).
    gru = GRUUpdate(DIM, rngs=nnx.Rngs(1))
    bias = np.zeros(3 * DIM, np.float32)
    bias[DIM:2 * DIM] = 40.0
    gru.cell.dense_i.bias[...] = jnp.asarray(bias)
    h = np.random.default_rng(2).normal(size=(5, DIM)).astype(np.float32) * 0.3
    np.testing.assert_allclose(gru(jnp.asarray(h), jnp.zeros_like(h)), h, rtol=1e-6, atol=1e-7)
    # while z = 0 (bias -40) replaces it by n = tanh(r * (h W_hn)) for a zero message
    bias[DIM:2 * DIM] = -40.0
    gru.cell.dense_i.bias[...] = jnp.asarray(bias)
    Wh = np.asarray(gru.cell.dense_h.kernel[...], np.float64)
    hh = h @ Wh
    want = np.tanh(_sigmoid(hh[:, :DIM]) * hh[:, 2 * DIM:])
    np.testing.assert_allclose(gru(jnp.asarray(h), jnp.zeros_like(h)), want, rtol=1e-5,
                               atol=1e-6)


# ----------------------------------------------------------------------------- transformer


@pytest.fixture(scope="module")
def batches(qm9_graphset):
    n, e = int(qm9_graphset.n_node[MOLS].sum()), int(qm9_graphset.n_edge[MOLS].sum())
    k = len(MOLS)
    return (pad_batch(qm9_graphset, MOLS, Budget(n + 1, e, k + 1)),
            pad_batch(qm9_graphset, MOLS, Budget(n + 23, e + 50, k + 3)))


def _encoder(**kw):
    return TransformerEncoderUpdate(DIM, 2, 4, 16, edge_bias="bond+distance", rngs=nnx.Rngs(0),
                                    **kw)


def _eager(enc, batch, h, m):
    _, dist = edge_distances(jnp.asarray(batch.nodes["positions"]), senders=batch.senders,
                             receivers=batch.receivers)
    return enc(h, m, senders=batch.senders, receivers=batch.receivers, bond=batch.edges["bond"],
               distances=dist)


_jitted = nnx.jit(_eager)


def _states(batch, n_real, seed=0):
    rng = np.random.default_rng(seed)
    n = int(batch.n_node.sum())
    h, m = rng.normal(size=(2, n, DIM)).astype(np.float32)
    h[n_real:] = 40.0 * rng.normal(size=(n - n_real, DIM))  # padding junk
    return h, m


def test_encoder_ignores_padding_and_jit_equals_eager(batches, qm9_graphset):
    tight, loose = batches
    n_real = int(qm9_graphset.n_node[MOLS].sum())
    enc = _encoder()
    h_t, m_t = _states(tight, n_real)
    h_l, m_l = _states(loose, n_real, seed=1)
    h_l[:n_real], m_l[:n_real] = h_t[:n_real], m_t[:n_real]
    out = np.asarray(_jitted(enc, tight, h_t, m_t))
    assert out.shape == (tight.n_node.sum(), DIM) and np.isfinite(out).all()
    np.testing.assert_allclose(_eager(enc, tight, h_t, m_t), out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(_jitted(enc, loose, h_l, m_l))[:n_real], out[:n_real],
                               rtol=1e-5, atol=1e-5)
    # post-LN: every output row is normalised (LayerNorm scale 1, bias 0 at init)
    np.testing.assert_allclose(out.mean(1), 0.0, atol=1e-5)
    # the encoder acts on h + m
    np.testing.assert_allclose(_jitted(enc, tight, h_t + m_t, np.zeros_like(m_t)), out,
                               rtol=1e-5, atol=1e-5)


def test_encoder_permutation_equivariant(batches):
    batch = batches[0]
    n = int(batch.n_node.sum())
    rng = np.random.default_rng(3)
    h, m = rng.normal(size=(2, n, DIM)).astype(np.float32)
    enc = _encoder()
    out = np.asarray(_jitted(enc, batch, h, m))
    off = np.concatenate([[0], np.cumsum(batch.n_node)])
    new_of_old = np.arange(n)
    for g in range(len(MOLS)):
        new_of_old[off[g]:off[g + 1]] = off[g] + rng.permutation(off[g + 1] - off[g])
    old_of_new = np.argsort(new_of_old)
    eorder = rng.permutation(batch.senders.shape[0])
    perm = batch._replace(
        nodes={k: v[old_of_new] for k, v in batch.nodes.items()},
        edges={k: v[eorder] for k, v in batch.edges.items()},
        senders=new_of_old[batch.senders][eorder].astype(np.int32),
        receivers=new_of_old[batch.receivers][eorder].astype(np.int32))
    pout = np.asarray(_jitted(enc, perm, h[old_of_new], m[old_of_new]))
    np.testing.assert_allclose(pout, out[old_of_new], rtol=1e-5, atol=1e-5)
    assert not np.allclose(out[old_of_new], out, atol=1e-3)


def test_encoder_dropout_only_in_train_mode(batches):
    batch = batches[0]
    n = int(batch.n_node.sum())
    h, m = np.random.default_rng(4).normal(size=(2, n, DIM)).astype(np.float32)
    enc = TransformerEncoderUpdate(DIM, 2, 4, 16, dropout=0.5, rngs=nnx.Rngs(0, dropout=1))
    a = np.asarray(_jitted(enc, batch, h, m))
    b = np.asarray(_jitted(enc, batch, h, m))
    assert not np.allclose(a, b, atol=1e-3)  # fresh dropout masks each call
    enc.eval()
    np.testing.assert_allclose(_jitted(enc, batch, h, m), _jitted(enc, batch, h, m))
    plain = TransformerEncoderUpdate(DIM, 2, 4, 16, rngs=nnx.Rngs(0))  # same parameters
    np.testing.assert_allclose(_jitted(enc, batch, h, m), _jitted(plain, batch, h, m),
                               rtol=1e-6, atol=1e-6)


def test_encoder_rejects_bad_settings():
    with pytest.raises(ValueError, match=r"activation must be one of \['gelu', 'relu', 'silu', "
                                         r"'tanh'\], got 'swish'"):
        TransformerEncoderUpdate(DIM, 2, 4, 16, activation="swish", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\), got 1.0"):
        TransformerEncoderUpdate(DIM, 2, 4, 16, dropout=1.0, rngs=nnx.Rngs(0))
