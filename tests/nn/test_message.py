"""Tests for mpattn.nn.message: edge network layouts, CFConv and SchNet's interaction block."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mpattn.graph import Budget, pad_batch
from mpattn.nn.message import (
    CFConv,
    EdgeNetwork,
    Interaction,
    cfconv,
    dense_layout,
    edge_network_dense,
    edge_network_plain,
    shifted_softplus,
)
from mpattn.nn.radial import edge_distances

MOLS = np.array([0, 7, 42, 117, 250, 333, 499])  # real QM9 molecules of different sizes

# Jitted once per shape: far fewer compilations than running op by op.
plain_fn = jax.jit(edge_network_plain, static_argnames=("num_segments", "aggregation"))
dense_fn = jax.jit(edge_network_dense,
                   static_argnames=("num_graphs", "max_nodes", "aggregation", "order"))
layout_fn = jax.jit(dense_layout, static_argnums=(1, 2))



def _budgets(gs, index):
    """A tight budget and a loose one (surplus padding nodes/edges and two empty graphs)."""
    n, e, k = int(gs.n_node[index].sum()), int(gs.n_edge[index].sum()), len(index)
    return Budget(n + 1, e, k + 1), Budget(n + 45, e + 70, k + 3)


@pytest.fixture(scope="module")
def batches(qm9_graphset):
    b1, b2 = _budgets(qm9_graphset, MOLS)
    return pad_batch(qm9_graphset, MOLS, b1), pad_batch(qm9_graphset, MOLS, b2)


def _inputs(batch, d, K, seed=0):
    rng = np.random.default_rng(seed)
    n, e = batch.n_node.sum(), batch.senders.shape[0]
    return (rng.normal(size=(n, d)), rng.normal(size=(e, K)), rng.normal(size=(K, d, d)),
            rng.normal(size=(d, d)))


def _distances(batch):
    return edge_distances(jnp.asarray(batch.nodes["positions"]), senders=batch.senders,
                          receivers=batch.receivers)[1]


def _eager(net, batch, h):
    return net(h, senders=batch.senders, receivers=batch.receivers, bond=batch.edges["bond"],
               distances=_distances(batch), n_node=batch.n_node)


_jitted = nnx.jit(lambda net, batch, h: _eager(net, batch, h))


def _call(net, batch, h):
    return _jitted(net, batch, jnp.asarray(h))


# ----------------------------------------------------------------------------- edge network


@pytest.mark.parametrize(("aggregation", "edges", "order"), [
    ("sum", "complete", "sum_first"), ("mean", "complete", "project_first"),
    ("sum", "bonded", "project_first"), ("mean", "bonded", "sum_first")])
def test_dense_equals_plain_on_padded_qm9(x64, batches, qm9_graphset, aggregation, edges, order):
    batch = batches[1]  # loose budget: surplus padding nodes beyond max_nodes, empty graphs
    h, u, M, B = _inputs(batch, d=5, K=7)
    s, r = batch.senders, batch.receivers
    n, g = h.shape[0], batch.n_node.shape[0]
    max_nodes = int(qm9_graphset.n_node[MOLS].max())
    mask = None if edges == "complete" else batch.edges["bond"] != 4
    keep = np.ones(s.shape[0], bool) if mask is None else mask
    # reference: the plain layout on the actual subset of edges
    ref = plain_fn(h, u[keep], M, B, senders=s[keep], receivers=r[keep],
                   num_segments=n, aggregation=aggregation)
    node_graph, node_slot = layout_fn(batch.n_node, n, max_nodes)
    dense = dense_fn(h, u, M, B, senders=s, receivers=r, node_graph=node_graph,
                     node_slot=node_slot, num_graphs=g, max_nodes=max_nodes,
                     aggregation=aggregation, edge_mask=mask, order=order)
    plain = plain_fn(h, u, M, B, senders=s, receivers=r, num_segments=n,
                     aggregation=aggregation, edge_mask=mask)
    assert dense.dtype == jnp.float64
    scale = float(np.abs(ref).max())
    np.testing.assert_allclose(dense, ref, rtol=1e-10, atol=1e-10 * scale)  # padding rows too
    np.testing.assert_allclose(plain, ref, rtol=1e-10, atol=1e-10 * scale)
    outside = np.asarray(node_slot) >= max_nodes  # surplus padding nodes of the padding graph
    assert outside.sum() > 0
    np.testing.assert_array_equal(np.asarray(dense)[outside], 0.0)


def test_dense_layout_slots():
    node_graph, node_slot = layout_fn(jnp.array([2, 3, 5, 0]), 10, 4)
    np.testing.assert_array_equal(node_graph, [0, 0, 1, 1, 1, 2, 2, 2, 2, 2])
    np.testing.assert_array_equal(node_slot, [0, 1, 0, 1, 2, 0, 1, 2, 3, 4])  # 4: outside


# Hand-computed: 3 nodes, d = 2, K = 1, edges 0->1, 2->1, 1->0; message = h_w @ (u M + B).
H3 = np.array([[1.0, 2.0], [0.0, 1.0], [3.0, -1.0]])
U3 = np.array([[2.0], [-1.0], [0.5]])
M3 = np.array([[[1.0, 0.0], [1.0, 2.0]]])
B3 = np.array([[0.0, 1.0], [0.0, 0.0]])
S3, R3 = np.array([0, 2, 1]), np.array([1, 1, 0])
# 0->1: A = [[2, 1], [2, 4]],     h0 @ A = [6, 9]
# 2->1: A = [[-1, 1], [-1, -2]],  h2 @ A = [-2, 5]
# 1->0: A = [[0.5, 1], [0.5, 1]], h1 @ A = [0.5, 1]
GOLDEN = {"sum": [[0.5, 1.0], [4.0, 14.0], [0.0, 0.0]],
          "mean": [[0.5, 1.0], [2.0, 7.0], [0.0, 0.0]]}


@pytest.mark.parametrize(("aggregation", "order"), [("sum", "sum_first"),
                                                  ("mean", "project_first")])
def test_edge_network_golden(aggregation, order):
    plain = plain_fn(H3, U3, M3, B3, senders=S3, receivers=R3, num_segments=3,
                     aggregation=aggregation)
    node_graph, node_slot = layout_fn(jnp.array([3]), 3, 3)
    dense = dense_fn(H3, U3, M3, B3, senders=S3, receivers=R3, node_graph=node_graph,
                     node_slot=node_slot, num_graphs=1, max_nodes=3,
                     aggregation=aggregation, order=order)
    np.testing.assert_allclose(plain, GOLDEN[aggregation], rtol=1e-6)
    np.testing.assert_allclose(dense, GOLDEN[aggregation], rtol=1e-6)


def test_dense_poisons_nodes_that_do_not_fit():
    # Two graphs of 3 nodes; max_nodes = 2 leaves node 2 of each outside the dense tensor.
    s = np.concatenate([S3, S3 + 3])
    r = np.concatenate([R3, R3 + 3])
    node_graph, node_slot = layout_fn(jnp.array([3, 3]), 6, 2)
    out = dense_fn(np.tile(H3, (2, 1)), np.tile(U3, (2, 1)), M3, B3, senders=s,
                   receivers=r, node_graph=node_graph, node_slot=node_slot,
                   num_graphs=2, max_nodes=2)
    # node 1 (and 4) lost the message of node 2 (5): NaN, never a silently wrong number
    np.testing.assert_array_equal(np.isnan(out).all(1), [False, True, False] * 2)
    np.testing.assert_allclose(np.asarray(out)[[0, 2, 3, 5]], np.array(GOLDEN["sum"])[[0, 2, 0, 2]])


def test_module_dense_equals_plain_jit_equals_eager(batches, qm9_graphset):
    batch = batches[1]
    h = jnp.asarray(np.random.default_rng(1).normal(size=(batch.n_node.sum(), 8)), jnp.float32)
    max_nodes = int(qm9_graphset.n_node[MOLS].max())
    dense = EdgeNetwork(8, hidden=16, max_nodes=max_nodes, rngs=nnx.Rngs(0))
    plain = EdgeNetwork(8, hidden=16, layout="plain", rngs=nnx.Rngs(0))
    eager = EdgeNetwork(8, hidden=16, rngs=nnx.Rngs(0))  # max_nodes found from the edges
    want = _call(plain, batch, h)
    np.testing.assert_allclose(_call(dense, batch, h), want, rtol=1e-5, atol=1e-5)
    # no jit: op by op, max_nodes found from the edges; equals the jitted results
    np.testing.assert_allclose(_eager(eager, batch, h), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"needs a static max_nodes under jax.jit"):
        _call(eager, batch, h)
    with pytest.raises(ValueError, match=r"layout must be 'dense' or 'plain', got 'sparse'"):
        EdgeNetwork(8, layout="sparse", rngs=nnx.Rngs(0))


def _permute_nodes(batch, h, seed=0):
    """Relabel the nodes of every real graph (and shuffle the edge order); returns perm too."""
    rng = np.random.default_rng(seed)
    n = int(batch.n_node.sum())
    off = np.concatenate([[0], np.cumsum(batch.n_node)])
    new_of_old = np.arange(n)
    for g in range(len(MOLS)):
        new_of_old[off[g]:off[g + 1]] = off[g] + rng.permutation(off[g + 1] - off[g])
    old_of_new = np.argsort(new_of_old)
    eorder = rng.permutation(batch.senders.shape[0])
    nodes = {k: v[old_of_new] for k, v in batch.nodes.items()}
    edges = {k: v[eorder] for k, v in batch.edges.items()}
    perm = batch._replace(nodes=nodes, edges=edges,
                          senders=new_of_old[batch.senders][eorder].astype(np.int32),
                          receivers=new_of_old[batch.receivers][eorder].astype(np.int32))
    return perm, h[old_of_new], old_of_new


@pytest.mark.parametrize("layout", ["dense", "plain"])
def test_edge_network_permutation_equivariant(batches, layout):
    batch = batches[0]
    h = jnp.asarray(np.random.default_rng(2).normal(size=(batch.n_node.sum(), 8)), jnp.float32)
    net = EdgeNetwork(8, hidden=16, layout=layout, max_nodes=29, rngs=nnx.Rngs(0))
    out = np.asarray(_call(net, batch, h))
    pbatch, ph, old_of_new = _permute_nodes(batch, np.asarray(h))
    pout = np.asarray(_call(net, pbatch, jnp.asarray(ph)))
    np.testing.assert_allclose(pout, out[old_of_new], rtol=1e-5, atol=1e-5)
    assert not np.allclose(out[old_of_new], out, atol=1e-3)  # the permutation moved rows


def test_edge_network_ignores_padding(batches, qm9_graphset):
    tight, loose = batches
    n_real = int(qm9_graphset.n_node[MOLS].sum())
    rng = np.random.default_rng(3)
    h_real = rng.normal(size=(n_real, 8))
    outs = []
    for batch in (tight, loose):
        junk = 30.0 * rng.normal(size=(batch.n_node.sum() - n_real, 8))  # padding-node junk
        h = jnp.asarray(np.concatenate([h_real, junk]), jnp.float32)
        for layout in ("dense", "plain"):
            net = EdgeNetwork(8, hidden=16, layout=layout, max_nodes=29, rngs=nnx.Rngs(0))
            outs.append(np.asarray(_call(net, batch, h))[:n_real])
    for o in outs[1:]:
        np.testing.assert_allclose(o, outs[0], rtol=1e-5, atol=1e-5)


def test_edge_network_init_keeps_three_steps_bounded(batches):
    batch = batches[0]
    n_real = int(batch.n_node[: len(MOLS)].sum())
    embed = nnx.Linear(batch.nodes["features"].shape[1], 8, rngs=nnx.Rngs(1))
    h = embed(jnp.asarray(batch.nodes["features"]))
    std0 = float(h[:n_real].std())
    net = EdgeNetwork(8, hidden=16, max_nodes=29, rngs=nnx.Rngs(0))
    for _ in range(3):  # residual steps, no normalisation: the harshest use
        h = h + _call(net, batch, h)
    assert np.isfinite(np.asarray(h)).all()
    # ×1.4 here; the LeCun scale without the 1/4 of sum aggregation gives ×9
    assert 1.05 < float(h[:n_real].std()) / std0 < 4.0


# ----------------------------------------------------------------------------- SchNet


def test_cfconv_golden():
    x = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    W = np.array([[0.5, -1.0], [2.0, 0.0], [1.0, 3.0]])
    out = cfconv(x, W, senders=S3, receivers=R3, num_segments=3)
    # node 0 <- x1 * W[2] = [3, 12];  node 1 <- x0 * W[0] + x2 * W[1] = [0.5 + 10, -2 + 0]
    np.testing.assert_allclose(out, [[3.0, 12.0], [10.5, -2.0], [0.0, 0.0]])


def test_shifted_softplus():
    np.testing.assert_allclose(shifted_softplus(jnp.array([0.0, 2.0])),
                               [0.0, np.log1p(np.exp(2.0)) - np.log(2.0)], rtol=1e-6)


def _complete(n):
    s, r = np.nonzero(~np.eye(n, dtype=bool))
    return s.astype(np.int32), r.astype(np.int32)


def test_cfconv_ignores_atoms_beyond_cutoff():
    conv = CFConv(8, 16, 16, 5.0, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(4).normal(size=(3, 8)), jnp.float32)
    s, r = _complete(3)

    @nnx.jit
    def apply(conv, pos):
        _, dist = edge_distances(pos, senders=s, receivers=r)
        return conv(x, senders=s, receivers=r, distances=dist)

    def run(pos):
        return np.asarray(apply(conv, jnp.asarray(pos, jnp.float32)))

    pos = np.array([[0.0, 0.0, 0.0], [1.1, 0.0, 0.0], [0.0, 9.0, 0.0]])
    base = run(pos)
    far = pos.copy()
    far[2] = [4.0, 7.0, -3.0]  # still > 5 Å from both others
    np.testing.assert_array_equal(run(far), base)
    np.testing.assert_array_equal(base[2], 0.0)  # nothing within its cutoff
    near = pos.copy()
    near[2] = [0.0, 3.0, 0.0]  # now inside the cutoff of atom 0: the output must change
    assert not np.allclose(run(near)[0], base[0], atol=1e-6)
    np.testing.assert_array_equal(nnx.jit(CFConv.filters)(conv, jnp.array([5.0, 7.5])), 0.0)


def test_interaction_equivariant_padding_and_jit(batches):
    tight, loose = batches
    n_real = int(tight.n_node[: len(MOLS)].sum())
    block = Interaction(8, 16, 16, 5.0, rngs=nnx.Rngs(0))
    h_real = np.random.default_rng(5).normal(size=(n_real, 8))

    def eager(blk, h, b):
        return blk(h, senders=b.senders, receivers=b.receivers, distances=_distances(b))

    jitted = nnx.jit(eager)

    def run(batch, h, f=jitted):
        return np.asarray(f(block, jnp.asarray(h, jnp.float32), batch))

    h_t = np.concatenate([h_real, np.zeros((1, 8))])
    h_l = np.concatenate([h_real, np.full((loose.n_node.sum() - n_real, 8), 9.0)])
    out = run(tight, h_t)
    assert out.shape == (tight.n_node.sum(), 8)
    np.testing.assert_allclose(run(tight, h_t, eager), out, rtol=1e-5, atol=1e-6)  # no jit
    np.testing.assert_allclose(run(loose, h_l)[:n_real], out[:n_real], rtol=1e-5, atol=1e-6)
    pbatch, ph, old_of_new = _permute_nodes(tight, h_t)
    np.testing.assert_allclose(run(pbatch, ph), out[old_of_new], rtol=1e-5, atol=1e-6)
    assert not np.allclose(out[old_of_new], out, atol=1e-3)
