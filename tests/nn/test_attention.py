"""Multi-head graph attention (mpattn.nn.attention) against hand values and dense attention;
its smooth mode (smooth_graph_attention: softmax and silu weights, envelope, value filter)."""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mpattn.graph import Budget, edge_mask, graph_mask, pad_batch
from mpattn.nn.attention import (
    ATTENTION_WEIGHTS,
    SUM_NEIGHBOURS,
    MultiHeadGraphAttention,
    smooth_graph_attention,
)
from mpattn.nn.attention import graph_attention as _graph_attention
from mpattn.nn.radial import edge_distances, polynomial_cutoff
from mpattn.ops import segment_softmax as _segment_softmax

# jit-compiled once per shape: eager op-by-op dispatch compiles every primitive separately
graph_attention = jax.jit(_graph_attention, static_argnames=("num_segments", "return_weights"))
segment_softmax = jax.jit(_segment_softmax, static_argnames=("num_segments",))

# ------------------------------------------------------------------------- golden: softmax


def test_segment_softmax_golden():
    logits = jnp.array([1.0, 2.0, 3.0, 0.5])
    seg = jnp.array([0, 0, 0, 1])
    # segment 0: e + e^2 + e^3 = 2.71828183 + 7.38905610 + 20.08553692 = 30.19287485
    #   -> [2.71828183, 7.38905610, 20.08553692] / 30.19287485 = [0.09003057, 0.24472847,
    #      0.66524096]; segment 1 holds one row: exp(0.5) / exp(0.5) = 1
    np.testing.assert_allclose(segment_softmax(logits, seg, num_segments=2),
                               [0.09003057, 0.24472847, 0.66524096, 1.0], rtol=1e-6)
    # masking the 3: e / (e + e^2) = 1 / (1 + e) = 0.26894142, e^2 / (e + e^2) = 0.73105858
    mask = jnp.array([True, True, False, True])
    np.testing.assert_allclose(segment_softmax(logits, seg, num_segments=2, mask=mask),
                               [0.26894142, 0.73105858, 0.0, 1.0], rtol=1e-6)
    # segment 1 entirely masked: zeros, not NaN (and an empty third segment changes nothing)
    mask = jnp.array([True, True, True, False])
    out = segment_softmax(logits, seg, num_segments=3, mask=mask)
    np.testing.assert_allclose(out, [0.09003057, 0.24472847, 0.66524096, 0.0], rtol=1e-6)
    # trailing (head) axes are independent: equal logits give 1/3 each
    two_heads = jnp.stack([logits[:3], jnp.zeros(3)], axis=1)
    np.testing.assert_allclose(
        segment_softmax(two_heads, seg[:3], num_segments=1),
        [[0.09003057, 1 / 3], [0.24472847, 1 / 3], [0.66524096, 1 / 3]], rtol=1e-6)


# ----------------------------------------------------------------- golden: one head, 3 atoms

Q3 = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]
K3 = [[1.0, 1.0], [2.0, 0.0], [0.0, 1.0]]
V3 = [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]
S3 = [1, 2, 0, 2, 0, 1]  # complete graph on 3 atoms: 6 ordered pairs (sender -> receiver)
R3 = [0, 0, 1, 1, 2, 2]


def _python_attention(q, k, v, senders, receivers, bias=None, mask=None):
    """One head of graph attention with explicit loops over plain Python floats."""
    n, dh = len(q), len(q[0])
    out = []
    for node in range(n):
        edges = [e for e in range(len(senders)) if receivers[e] == node
                 and (mask is None or mask[e])]
        logits = []
        for e in edges:
            dot = sum(q[node][i] * k[senders[e]][i] for i in range(dh)) / math.sqrt(dh)
            logits.append(dot + (0.0 if bias is None else bias[e]))
        ex = [math.exp(x) for x in logits]
        total = sum(ex)
        row = [0.0] * len(v[0])
        for e, x in zip(edges, ex, strict=True):
            for i in range(len(row)):
                row[i] += x / total * v[senders[e]][i]
        out.append(row)
    return out


def _one_head(x):
    return jnp.asarray(x, jnp.float32)[:, None, :]  # [N, 1, dim]


def test_graph_attention_golden_three_atoms():
    out, alpha = graph_attention(_one_head(Q3), _one_head(K3), _one_head(V3),
                                 senders=jnp.array(S3), receivers=jnp.array(R3),
                                 num_segments=3, return_weights=True)
    assert out.shape == (3, 1, 2) and alpha.shape == (6, 1)
    # node 0 attends to 1 and 2: logits [q0.k1, q0.k2] / sqrt(2) = [2, 0] / sqrt(2);
    # alpha = [1, e^-sqrt2] / (1 + e^-sqrt2) = [0.80442968, 0.19557032]
    # out0 = 0.80442968 * [3, 4] + 0.19557032 * [5, 6] = [3.39114063, 4.39114063]
    np.testing.assert_allclose(alpha[:2, 0], [0.80442968, 0.19557032], rtol=1e-6)
    np.testing.assert_allclose(out[0, 0], [3.39114063, 4.39114063], rtol=1e-6)
    np.testing.assert_allclose(out[:, 0], _python_attention(Q3, K3, V3, S3, R3), rtol=1e-6)
    np.testing.assert_allclose(jax.ops.segment_sum(alpha[:, 0], jnp.array(R3), 3), 1.0,
                               rtol=1e-6)


def test_graph_attention_golden_bias_mask_and_heads():
    bias = [0.5, -1.0, 2.0, 0.0, -0.25, 1.5]
    mask = [True, True, False, True, True, True]  # node 1 only hears node 2
    out = graph_attention(_one_head(Q3), _one_head(K3), _one_head(V3), senders=jnp.array(S3),
                          receivers=jnp.array(R3), num_segments=3,
                          bias=jnp.asarray(bias)[:, None], mask=jnp.asarray(mask))
    expected = _python_attention(Q3, K3, V3, S3, R3, bias=bias, mask=mask)
    np.testing.assert_allclose(out[:, 0], expected, rtol=1e-6)
    np.testing.assert_allclose(out[1, 0], V3[2], rtol=1e-6)  # a single edge gets weight 1
    # two heads = two independent single-head problems (second head: k and v swapped roles)
    q = jnp.concatenate([_one_head(Q3), _one_head(K3)], axis=1)
    k = jnp.concatenate([_one_head(K3), _one_head(Q3)], axis=1)
    v = jnp.concatenate([_one_head(V3), _one_head(V3)[::-1]], axis=1)
    out2 = graph_attention(q, k, v, senders=jnp.array(S3), receivers=jnp.array(R3),
                           num_segments=3)
    np.testing.assert_allclose(out2[:, 0], _python_attention(Q3, K3, V3, S3, R3), rtol=1e-6)
    np.testing.assert_allclose(out2[:, 1], _python_attention(K3, Q3, V3[::-1], S3, R3),
                               rtol=1e-6)


def test_graph_attention_node_without_edges_gets_zeros():
    out = graph_attention(_one_head(Q3), _one_head(K3), _one_head(V3), senders=jnp.array([1]),
                          receivers=jnp.array([0]), num_segments=3)
    np.testing.assert_allclose(out[:, 0], [V3[1], [0.0, 0.0], [0.0, 0.0]])


def test_graph_attention_shape_errors():
    with pytest.raises(ValueError, match="q, k, v must be"):
        graph_attention(jnp.ones((3, 2, 4)), jnp.ones((3, 2, 5)), jnp.ones((3, 2, 4)),
                        senders=jnp.array(S3), receivers=jnp.array(R3), num_segments=3)


# --------------------------------------------------------------------- module on real QM9


# One shared padding budget (plus a larger one for the padding test), so that the jitted
# forward pass compiles once per mask mode instead of once per test.
BUDGET = Budget(96, 900, 10)
BIG_BUDGET = Budget(133, 1010, 13)


def _batch(gs, index, budget=BUDGET):
    return pad_batch(gs, np.asarray(index), budget)


def _forward(model, h, positions, senders, receivers, bond, mask):
    _, dist = edge_distances(positions, senders=senders, receivers=receivers)
    return model(h, senders=senders, receivers=receivers, bond=bond, distances=dist,
                 edge_mask=mask)


_apply = nnx.jit(_forward)


def _run(model, g, mask=None):
    return np.asarray(_apply(model, jnp.asarray(g.nodes["features"]),
                             jnp.asarray(g.nodes["positions"]), jnp.asarray(g.senders),
                             jnp.asarray(g.receivers), jnp.asarray(g.edges["bond"]), mask))


def _model(in_dim=12, heads=3, head_dim=4, out_dim=5, edge_bias="bond+distance", seed=0):
    return MultiHeadGraphAttention(in_dim, heads, head_dim, out_dim, edge_bias=edge_bias,
                                   num_rbf=8, cutoff=3.0, rngs=nnx.Rngs(seed))


def _dense_reference(model, g, bonded_only=False):
    """Per-molecule dense softmax(Q K^T / sqrt(dh) + B) V in float64 numpy, diagonal excluded."""
    p = lambda x: np.asarray(x[...], np.float64)  # noqa: E731
    heads, dh = model.num_heads, model.head_dim
    h = np.asarray(g.nodes["features"], np.float64)
    pos = np.asarray(g.nodes["positions"], np.float64)
    n_node = g.n_node[np.asarray(graph_mask(g))]  # real graphs
    n_real = int(np.sum(n_node))
    bond = np.full((n_real, n_real), -1)
    real = g.receivers < n_real
    bond[g.receivers[real], g.senders[real]] = g.edges["bond"][real]  # [query i, key j]
    out = np.zeros((n_real, model.out_dim))
    start = 0
    for n in n_node:
        sl = slice(start, start + n)
        start += n

        def proj(lin, x):
            return (x @ p(lin.kernel) + p(lin.bias)).reshape(x.shape[0], heads, dh)

        q, k, v = (proj(lin, h[sl]) for lin in (model.query, model.key, model.value))
        b = bond[sl, sl]
        dist = np.linalg.norm(pos[sl][None, :, :] - pos[sl][:, None, :], axis=-1)  # [i, j]
        mu = np.linspace(0.0, 3.0, 8)
        rbf = np.exp(-((dist[..., None] - mu) ** 2) / (2 * (3.0 / 7) ** 2))
        fcut = np.where(dist < 3.0, 0.5 * (np.cos(np.pi * dist / 3.0) + 1), 0.0)
        bias = (rbf @ p(model.distance_bias.kernel) + p(model.distance_bias.bias)) \
            * fcut[..., None]
        bias = bias + p(model.bond_bias.embedding)[np.where(b >= 0, b, 0)]  # [i, j, H]
        scores = np.einsum("ihd,jhd->hij", q, k) / np.sqrt(dh) + bias.transpose(2, 0, 1)
        allowed = ~np.eye(n, dtype=bool)
        if bonded_only:
            allowed &= b != 4
        scores = np.where(allowed[None], scores, -np.inf)
        w = np.exp(scores - scores.max(axis=-1, keepdims=True))
        w = w / w.sum(axis=-1, keepdims=True)
        o = np.einsum("hij,jhd->ihd", w, v).reshape(n, heads * dh)
        out[sl] = o @ p(model.out.kernel) + p(model.out.bias)
    return out


IDX = [0, 5, 17, 42, 99, 123, 250, 499]


@pytest.fixture(scope="module")
def model():
    """3 heads of width 4 on the 12 QM9 node features, bond + distance bias (cutoff 3 A)."""
    return _model()


def test_matches_dense_attention_on_qm9_batch(qm9_graphset, model):
    g = _batch(qm9_graphset, IDX)
    k = len(IDX)
    assert np.all(g.n_edge[:k] == g.n_node[:k] * (g.n_node[:k] - 1))  # complete edge set
    out = _run(model, g, jnp.asarray(edge_mask(g)))
    n_real = int(np.sum(g.n_node[:k]))
    assert out.shape == (g.n_node.sum(), 5)
    np.testing.assert_allclose(out[:n_real], _dense_reference(model, g), rtol=1e-5, atol=1e-5)
    # the biases matter (otherwise this test could not tell them apart from plain attention)
    far = g._replace(nodes={**g.nodes, "positions": g.nodes["positions"] * 100},
                     edges={"bond": np.zeros_like(g.edges["bond"])})
    plain = _run(model, far, jnp.asarray(edge_mask(g)))  # constant bias: plain attention
    assert np.max(np.abs(plain[:n_real] - out[:n_real])) > 1e-3


def test_padding_and_batch_composition_do_not_change_real_outputs(qm9_graphset, model):
    idx = [3, 10, 20]
    a = _batch(qm9_graphset, idx)
    b = _batch(qm9_graphset, idx, BIG_BUDGET)
    n = int(np.sum(qm9_graphset.n_node[idx]))
    for mask_a, mask_b in [(None, None), (edge_mask(a), edge_mask(b))]:
        np.testing.assert_allclose(_run(model, a, mask_a)[:n], _run(model, b, mask_b)[:n],
                                   rtol=0, atol=1e-6)
    # molecule 10 next to different molecules, at a different offset in the batch
    c = _batch(qm9_graphset, [50, 10, 7, 8])
    off_a, off_c = int(qm9_graphset.n_node[3]), int(qm9_graphset.n_node[50])
    m = int(qm9_graphset.n_node[10])
    np.testing.assert_allclose(_run(model, a)[off_a:off_a + m], _run(model, c)[off_c:off_c + m],
                               rtol=0, atol=1e-6)


def test_permutation_equivariance(qm9_graphset, model):
    g = _batch(qm9_graphset, [123])
    n = int(g.n_node[0])
    rng = np.random.default_rng(0)
    perm = np.concatenate([rng.permutation(n), np.arange(n, g.n_node.sum())])  # padding stays
    inv = np.argsort(perm)
    eperm = rng.permutation(g.senders.shape[0])  # edge order is irrelevant too
    gp = g._replace(
        nodes={k: v[perm] for k, v in g.nodes.items()},
        edges={k: v[eperm] for k, v in g.edges.items()},
        senders=inv[g.senders][eperm].astype(np.int32),
        receivers=inv[g.receivers][eperm].astype(np.int32),
    )
    out, out_p = _run(model, g), _run(model, gp)
    np.testing.assert_allclose(out_p, out[perm], rtol=1e-5, atol=1e-6)
    assert np.min(np.abs(out[:n, None, 0] - out[None, :n, 0]) + np.eye(n)) > 1e-6  # rows differ


def test_jit_and_no_jit_agree_with_three_heads_not_dividing_dim(qm9_graphset):
    g = _batch(qm9_graphset, [0, 42, 99])
    model = MultiHeadGraphAttention(64, 3, 10, edge_bias="bond", rngs=nnx.Rngs(1))  # 64 % 3 != 0
    assert model.query.kernel.shape == (64, 30) and model.out.kernel.shape == (30, 64)
    h = jnp.asarray(np.random.default_rng(1).normal(size=(g.n_node.sum(), 64)), jnp.float32)
    kw = dict(senders=jnp.asarray(g.senders), receivers=jnp.asarray(g.receivers),
              bond=jnp.asarray(g.edges["bond"]), edge_mask=jnp.asarray(edge_mask(g)))
    eager, weights = model(h, return_weights=True, **kw)
    jitted = nnx.jit(lambda m, x, kw: m(x, **kw))(model, h, kw)
    assert eager.shape == (g.n_node.sum(), 64) and weights.shape == (g.senders.shape[0], 3)
    np.testing.assert_allclose(jitted, eager, rtol=1e-5, atol=1e-6)
    n_real = int(np.sum(g.n_node[:3]))
    np.testing.assert_allclose(
        jax.ops.segment_sum(weights, kw["receivers"], h.shape[0])[:n_real], 1.0, rtol=1e-5)


def test_edge_mask_restricts_attention_to_bonded_neighbours(qm9_graphset, model):
    g = _batch(qm9_graphset, [5, 17, 42])
    bonded = jnp.asarray(edge_mask(g)) & (jnp.asarray(g.edges["bond"]) != 4)
    out = _run(model, g, bonded)
    n_real = int(np.sum(g.n_node[:3]))
    ref_bonded = _dense_reference(model, g, bonded_only=True)
    np.testing.assert_allclose(out[:n_real], ref_bonded, rtol=1e-5, atol=1e-5)
    full = _dense_reference(model, g)
    assert np.max(np.abs(full - ref_bonded)) > 1e-3  # the mask does change the result


def test_distance_bias_gives_finite_position_gradients_with_padding(qm9_graphset):
    # padding nodes all sit at the origin and padding edges are self-loops: r = 0 there
    g = _batch(qm9_graphset, [0, 5])
    model = _model(edge_bias="distance")
    h = jnp.asarray(g.nodes["features"])
    args = (jnp.asarray(g.senders), jnp.asarray(g.receivers), jnp.asarray(g.edges["bond"]),
            jnp.asarray(edge_mask(g)))

    graphdef, params = nnx.split(model)

    def energy(params, pos):
        return jnp.sum(_forward(nnx.merge(graphdef, params), h, pos, *args) ** 2)

    grad = jax.jit(jax.grad(energy, argnums=1))(params, jnp.asarray(g.nodes["positions"]))
    assert np.all(np.isfinite(np.asarray(grad)))
    assert np.any(np.asarray(grad)[: g.n_node[0]] != 0)


def test_invalid_configuration_errors():
    with pytest.raises(ValueError, match="edge_bias must be one of .* got 'angle'"):
        MultiHeadGraphAttention(8, 2, 4, edge_bias="angle", rngs=nnx.Rngs(0))
    model = MultiHeadGraphAttention(8, 2, 4, edge_bias="bond+distance", rngs=nnx.Rngs(0))
    kw = dict(senders=jnp.array(S3), receivers=jnp.array(R3))
    with pytest.raises(ValueError, match=r"edge_bias='bond\+distance' needs bond=edges\['bond'\]"):
        model(jnp.ones((3, 8)), distances=jnp.ones(6), **kw)
    with pytest.raises(ValueError, match=r"edge_bias='bond\+distance' needs distances"):
        model(jnp.ones((3, 8)), bond=jnp.zeros(6, jnp.int32), **kw)


# ------------------------------------------------------------------------- smooth mode


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
    assert SUM_NEIGHBOURS == 16.0 and ATTENTION_WEIGHTS == ("softmax", "silu")
    with pytest.raises(ValueError, match=re.escape(
            "weights must be one of ('softmax', 'silu'), got 'relu'")):
        smooth_graph_attention(q, k, v, senders=senders, receivers=receivers, num_segments=3,
                               envelope=env, weights="relu")


def _smooth_case(seed=0):
    """5 nodes, edges listed in pairs (2k, 2k+1 are one pair's two directions), distances up
    to beyond the 3 Å cutoff, a random value filter."""
    rng = np.random.default_rng(seed)
    ends = [(0, 1), (0, 2), (1, 2), (1, 3), (2, 3), (3, 4), (0, 4)]
    senders = np.array([x for a, b in ends for x in (a, b)], np.int32)
    receivers = np.array([x for a, b in ends for x in (b, a)], np.int32)
    pair_d = np.array([1.0, 2.2, 2.9, 0.8, 3.4, 1.7, 2.5], np.float32)
    h = jnp.asarray(rng.normal(size=(5, 8)), jnp.float32)
    filt = jnp.asarray(rng.normal(size=(len(senders), 2, 4)), jnp.float32)
    return h, senders, receivers, pair_d, filt


@pytest.mark.parametrize("weights", ATTENTION_WEIGHTS)
def test_module_smooth_mode_equals_smooth_graph_attention_on_its_projections(weights):
    """Passing ``envelope`` selects the smooth mode: the module's output and weights are
    :func:`smooth_graph_attention` of its own q, k, v projections and distance bias, through
    its output projection; per pair slot (``pair``) the distance bias is read by both edges."""
    model = MultiHeadGraphAttention(8, 2, 4, edge_bias="distance", num_rbf=8, cutoff=3.0,
                                    rngs=nnx.Rngs(3))
    h, senders, receivers, pair_d, filt = _smooth_case()
    pair = np.arange(len(senders), dtype=np.int32) // 2
    d = jnp.asarray(pair_d[pair])
    env = polynomial_cutoff(d, 3.0)
    assert float(env[8]) == 0.0  # the pair at 3.4 Å is beyond the cutoff
    out, alpha = model(h, senders=senders, receivers=receivers, distances=d, envelope=env,
                       value_filter=filt, weights=weights, return_weights=True)
    shape = (5, 2, 4)
    q, k, v = (lin(h).reshape(shape) for lin in (model.query, model.key, model.value))
    bias = model.edge_logit_bias(distances=d)
    o, want_alpha = smooth_graph_attention(q, k, v, senders=senders, receivers=receivers,
                                           num_segments=5, envelope=env, bias=bias,
                                           value_filter=filt, weights=weights,
                                           return_weights=True)
    np.testing.assert_allclose(out, model.out(o.reshape(5, 8)), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(alpha, want_alpha, rtol=1e-6, atol=1e-8)
    assert out.shape == (5, 8) and np.abs(np.asarray(out)).max() > 1e-3
    np.testing.assert_array_equal(np.asarray(alpha)[8:10], 0.0)  # beyond the cutoff
    # without the value filter the values pass unfiltered (and the output differs)
    unfiltered = model(h, senders=senders, receivers=receivers, distances=d, envelope=env,
                       weights=weights)
    o_plain = smooth_graph_attention(q, k, v, senders=senders, receivers=receivers,
                                     num_segments=5, envelope=env, bias=bias, weights=weights)
    np.testing.assert_allclose(unfiltered, model.out(o_plain.reshape(5, 8)), rtol=1e-6,
                               atol=1e-7)
    assert np.abs(np.asarray(unfiltered - out)).max() > 1e-3
    # distances per pair slot: the same result
    per_pair = model(h, senders=senders, receivers=receivers, distances=jnp.asarray(pair_d),
                     pair=jnp.asarray(pair), envelope=env, value_filter=filt, weights=weights)
    np.testing.assert_allclose(per_pair, out, rtol=1e-6, atol=1e-7)
    # the plain mode (no envelope) is another function
    plain = model(h, senders=senders, receivers=receivers, distances=d)
    assert np.abs(np.asarray(plain - out)).max() > 1e-3


def test_module_smooth_mode_errors():
    model = MultiHeadGraphAttention(8, 2, 4, edge_bias="distance", num_rbf=8, cutoff=3.0,
                                    rngs=nnx.Rngs(3))
    h, senders, receivers, pair_d, filt = _smooth_case()
    d = jnp.asarray(np.repeat(pair_d, 2))
    kw = dict(senders=senders, receivers=receivers, distances=d)
    with pytest.raises(ValueError, match=r"value_filter needs the smooth mode \(an envelope\)"):
        model(h, value_filter=filt, **kw)
    with pytest.raises(ValueError, match="the smooth mode masks edges through the envelope"):
        model(h, envelope=polynomial_cutoff(d, 3.0), edge_mask=jnp.ones(len(d), bool), **kw)
    with pytest.raises(ValueError, match=re.escape(
            "weights must be one of ('softmax', 'silu'), got 'relu'")):
        model(h, envelope=polynomial_cutoff(d, 3.0), weights="relu", **kw)
