"""Pure segment ops: hand-computed values, empty segments, masks, finite gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mpattn import ops


def test_segment_sum_mean_max_with_an_empty_segment():
    data = jnp.array([[1.0, -2.0], [3.0, 4.0], [5.0, 6.0]])
    seg = jnp.array([0, 0, 2])
    np.testing.assert_allclose(ops.segment_sum(data, seg, num_segments=3),
                               [[4, 2], [0, 0], [5, 6]])
    np.testing.assert_allclose(ops.segment_mean(data, seg, num_segments=3),
                               [[2, 1], [0, 0], [5, 6]])  # empty segment: 0, not NaN
    np.testing.assert_allclose(ops.segment_max(data, seg, num_segments=3),
                               [[3, 4], [0, 0], [5, 6]])  # empty segment: 0, not -inf
    np.testing.assert_allclose(ops.segment_count(seg, num_segments=3), [2, 0, 1])


def test_segment_softmax_stable_for_huge_logits_and_masks():
    logits = jnp.array([1000.0, 1000.0 + np.log(3.0), -5.0])
    seg = jnp.array([0, 0, 1])
    np.testing.assert_allclose(ops.segment_softmax(logits, seg, num_segments=2),
                               [0.25, 0.75, 1.0], rtol=1e-4)  # float32 at 1000
    w = ops.segment_softmax(logits, seg, num_segments=2, mask=jnp.array([True, False, False]))
    np.testing.assert_allclose(w, [1.0, 0.0, 0.0])  # all-masked segment: zeros, not NaN
    heads = ops.segment_softmax(jnp.stack([logits, -logits], 1), seg, num_segments=2)
    np.testing.assert_allclose(heads[:2].sum(0), [1.0, 1.0], rtol=1e-6)


def test_segment_softmax_gradient_finite_with_masked_rows():
    seg = jnp.array([0, 0, 1])
    mask = jnp.array([True, True, False])

    def f(x):
        return jnp.sum(ops.segment_softmax(x, seg, num_segments=2, mask=mask) * jnp.arange(3.0))

    g = jax.grad(f)(jnp.array([0.3, -0.2, 7.0]))
    assert np.all(np.isfinite(g)) and g[2] == 0
    p = jax.nn.softmax(jnp.array([0.3, -0.2]))  # d/dx_i sum_j p_j c_j = p_i (c_i - sum p c)
    np.testing.assert_allclose(g[:2], p * (jnp.arange(2.0) - jnp.dot(p, jnp.arange(2.0))),
                               rtol=1e-5)


def test_masked_reductions():
    x = jnp.array([[1.0], [2.0], [40.0]])
    m = jnp.array([True, True, False])
    np.testing.assert_allclose(ops.masked_sum(x, m), [3.0])
    np.testing.assert_allclose(ops.masked_mean(x, m), [1.5])
    np.testing.assert_allclose(ops.masked_mean(x, jnp.zeros(3, bool)), [0.0])


def test_graph_index_static_total():
    np.testing.assert_array_equal(ops.graph_index(jnp.array([2, 0, 3]), 5), [0, 0, 2, 2, 2])
    f = jax.jit(lambda n: ops.graph_index(n, 6))
    np.testing.assert_array_equal(f(jnp.array([1, 2, 3])), [0, 1, 1, 2, 2, 2])


def test_safe_norm_value_and_gradient_at_zero():
    np.testing.assert_allclose(ops.safe_norm(jnp.array([[3.0, 4.0, 0.0], [0, 0, 0]])), [5, 0])
    g = jax.grad(lambda v: ops.safe_norm(v))(jnp.zeros(3))
    np.testing.assert_array_equal(g, [0.0, 0.0, 0.0])
    g = jax.grad(lambda v: ops.safe_norm(v))(jnp.array([3.0, 4.0, 0.0]))
    np.testing.assert_allclose(g, [0.6, 0.8, 0.0])


def test_edge_vectors_convention_and_shift():
    pos = jnp.array([[0.0, 0, 0], [1.0, 0, 0], [0, 2.0, 0]])
    s, r = jnp.array([1, 2]), jnp.array([0, 1])
    np.testing.assert_allclose(ops.edge_vectors(pos, senders=s, receivers=r),
                               [[1, 0, 0], [-1, 2, 0]])
    shift = jnp.array([[0, 0, 3.0], [0, 0, 0]])
    np.testing.assert_allclose(ops.edge_vectors(pos, senders=s, receivers=r, shift=shift),
                               [[1, 0, 3], [-1, 2, 0]])


@pytest.mark.parametrize("fn", [ops.segment_sum, ops.segment_mean, ops.segment_max])
def test_jit_and_no_jit_agree(fn):
    data = jnp.arange(12.0).reshape(6, 2) - 5
    seg = jnp.array([0, 1, 1, 3, 3, 3])
    np.testing.assert_allclose(jax.jit(lambda d, s: fn(d, s, num_segments=4))(data, seg),
                               fn(data, seg, num_segments=4))
