"""Tests for mpattn.graph: vectorised padding equals jraph's, masks, budgets."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import jraph
import numpy as np
import pytest

from mpattn.featurize import complete_edges
from mpattn.graph import (
    Budget,
    edge_mask,
    edge_pairs,
    graph_mask,
    node_mask,
    pad_batch,
    round_up,
)


def _jraph_reference(gs, index, budget):
    graphs = [gs.graph(int(i)) for i in index]
    return jraph.pad_with_graphs(
        jraph.batch_np(graphs), budget.n_node, budget.n_edge, budget.n_graph
    )


def _without_pair(g):
    return g._replace(edges={k: v for k, v in g.edges.items() if k != "pair"})


def _assert_graphs_equal(got, want):
    got_leaves = jax.tree_util.tree_leaves_with_path(got)
    want_leaves = jax.tree_util.tree_leaves_with_path(want)
    assert [p for p, _ in got_leaves] == [p for p, _ in want_leaves]
    for (path, a), (_, b) in zip(got_leaves, want_leaves, strict=True):
        assert isinstance(a, np.ndarray), path
        assert a.shape == b.shape, path
        np.testing.assert_array_equal(a, b, err_msg=str(path))


@pytest.mark.parametrize(
    "index, slack",
    [
        ([0], (1, 0, 1)),  # tightest budget: one padding node, no padding edge, one padding graph
        ([3, 1, 4, 1, 5, 9, 2, 6], (64, 128, 5)),  # repeats, unsorted
        (list(range(40, 72)), (7, 0, 1)),
        ([499, 0, 250], (1, 3, 9)),
    ],
)
def test_pad_batch_equals_jraph(qm9_graphset, index, slack):
    gs = qm9_graphset
    index = np.array(index)
    budget = Budget(
        n_node=int(gs.n_node[index].sum()) + slack[0],
        n_edge=int(gs.n_edge[index].sum()) + slack[1],
        n_graph=len(index) + slack[2],
    )
    got = pad_batch(gs, index, budget)
    # jraph knows nothing of edge pairs: compare the rest, check the pairs in their own tests
    assert got.edges["pair"].shape == (budget.n_edge,)
    _assert_graphs_equal(_without_pair(got), _jraph_reference(gs, index, budget))
    # dtypes kept (jraph's own batching promotes indices to int64 under NumPy 2)
    for name in ("senders", "receivers", "n_node", "n_edge"):
        assert getattr(got, name).dtype == np.int32, name
    for field in ("nodes", "edges", "globals"):
        for name, v in getattr(gs, field).items():
            assert getattr(got, field)[name].dtype == v.dtype, (field, name)


def test_pad_batch_empty_index(qm9_graphset):
    got = pad_batch(qm9_graphset, np.array([], dtype=np.int64), Budget(8, 4, 3))
    np.testing.assert_array_equal(got.n_node, [8, 0, 0])
    np.testing.assert_array_equal(got.n_edge, [4, 0, 0])
    np.testing.assert_array_equal(got.senders, [0, 0, 0, 0])
    assert got.nodes["positions"].shape == (8, 3)
    assert not np.any(got.nodes["positions"])


@pytest.mark.parametrize(
    "extra",
    [(0, 0, 1), (1, -1, 1), (1, 0, 0)],  # no padding node / one edge short / no padding graph
    ids=["nodes", "edges", "graphs"],
)
def test_pad_batch_too_small_raises(qm9_graphset, extra):
    index = np.array([0, 1, 2])
    tot_n, tot_e = int(qm9_graphset.n_node[index].sum()), int(qm9_graphset.n_edge[index].sum())
    budget = Budget(n_node=tot_n + extra[0], n_edge=tot_e + extra[1], n_graph=3 + extra[2])
    with pytest.raises(ValueError, match=rf"3 graphs with {tot_n} nodes and {tot_e} edges"):
        pad_batch(qm9_graphset, index, budget)


def test_masks(qm9_graphset):
    gs = qm9_graphset
    index = np.array([10, 20, 30, 40])
    budget = Budget(n_node=192, n_edge=1024, n_graph=9)
    g = pad_batch(gs, index, budget)
    n_real = int(gs.n_node[index].sum())
    e_real = int(gs.n_edge[index].sum())
    for graph in (g, jax.tree.map(jnp.asarray, g)):  # numpy and jax inputs
        nm, em, gm = np.asarray(node_mask(graph)), np.asarray(edge_mask(graph)), graph_mask(graph)
        np.testing.assert_array_equal(nm, np.arange(192) < n_real)
        np.testing.assert_array_equal(em, np.arange(1024) < e_real)
        np.testing.assert_array_equal(np.asarray(gm), np.arange(9) < 4)
    # also under jit, with static sizes
    jm = jax.jit(lambda gr: (node_mask(gr), edge_mask(gr), graph_mask(gr)))(g)
    np.testing.assert_array_equal(np.asarray(jm[0]).sum(), n_real)
    np.testing.assert_array_equal(np.asarray(jm[1]).sum(), e_real)
    np.testing.assert_array_equal(np.asarray(jm[2]).sum(), 4)


def test_padding_edges_point_at_padding_nodes(qm9_graphset):
    gs = qm9_graphset
    index = np.arange(7)
    g = pad_batch(gs, index, Budget(n_node=256, n_edge=2048, n_graph=10))
    em = np.asarray(edge_mask(g))
    nm = np.asarray(node_mask(g))
    assert (~em).sum() > 0
    assert not np.any(nm[g.senders[~em]])
    assert not np.any(nm[g.receivers[~em]])
    # real edges stay inside their own graph
    graph_of_node = np.repeat(np.arange(10), g.n_node)
    graph_of_edge = np.repeat(np.arange(10), g.n_edge)
    np.testing.assert_array_equal(graph_of_node[g.senders[em]], graph_of_edge[em])
    np.testing.assert_array_equal(graph_of_node[g.receivers[em]], graph_of_edge[em])
    # padded rows are zero
    assert not np.any(g.nodes["features"][~nm])
    assert not np.any(g.globals["U0"][7:])


def test_pad_batch_copies_source_fields(qm9_graphset):
    gs = qm9_graphset
    index = np.array([17, 3, 256])
    g = pad_batch(gs, index, Budget(n_node=128, n_edge=1024, n_graph=4))
    starts = np.concatenate([[0], np.cumsum(g.n_node)])
    for j, i in enumerate(index):
        src = gs.graph(int(i))
        sl = slice(starts[j], starts[j + 1])
        for name in gs.nodes:
            np.testing.assert_array_equal(g.nodes[name][sl], src.nodes[name])
        np.testing.assert_array_equal(g.globals["U0"][j], src.globals["U0"][0])


def test_budget_and_round_up():
    assert round_up(0) == 0
    assert round_up(1) == 64
    assert round_up(64) == 64
    assert round_up(65) == 128
    assert round_up(10, multiple=4) == 12
    with pytest.raises(ValueError):
        round_up(3, multiple=0)
    with pytest.raises(ValueError):
        Budget(n_node=10, n_edge=10, n_graph=1)
    with pytest.raises(ValueError):
        Budget(n_node=0, n_edge=10, n_graph=2)
    assert sorted([Budget(128, 64, 3), Budget(64, 640, 3)]) == [
        Budget(64, 640, 3),
        Budget(128, 64, 3),
    ]
    b = Budget(10, 5, 3)
    assert b.fits(9, 5, 2)
    assert not b.fits(10, 5, 2)
    assert not b.fits(9, 6, 2)
    assert not b.fits(9, 5, 3)


def _check_pairs(pair, senders, receivers, shift=None, num_pairs=None):
    """Every slot holds exactly one edge and its reverse (numpy loop, no tricks)."""
    e = len(senders)
    slots = {}
    for k in range(e):
        slots.setdefault(int(pair[k]), []).append(k)
    assert sorted(slots) == list(range(e // 2))
    for a, b in slots.values():
        assert (senders[a], receivers[a]) == (receivers[b], senders[b])
        if shift is not None:
            np.testing.assert_allclose(shift[a], -shift[b])


def test_edge_pairs_of_a_complete_graph():
    s, r = complete_edges(5)
    pair = edge_pairs(s, r)
    assert pair.dtype == np.int32 and pair.shape == (20,)
    _check_pairs(pair, s, r)
    # padded: padding edges take the following slots, two per slot (the last one alone)
    padded = edge_pairs(s, r, num_edges=25)
    np.testing.assert_array_equal(padded[:20], pair)
    np.testing.assert_array_equal(padded[20:], [10, 10, 11, 11, 12])


def test_edge_pairs_rejects_asymmetric_lists():
    assert edge_pairs([0, 1, 1], [1, 0, 2]) is None  # odd: 1 -> 2 has no reverse
    assert edge_pairs([0, 1, 1, 2], [1, 0, 2, 0]) is None  # 1->2 and 2->0 unpaired
    assert edge_pairs([0, 0, 1, 1], [1, 1, 0, 0]) is None  # a pair listed twice
    assert edge_pairs([0, 1, 2, 2], [1, 0, 2, 2]) is None  # self-loop without a shift
    assert edge_pairs([], []).shape == (0,)
    # far-apart indices take the sorting path instead of the table: same answers
    np.testing.assert_array_equal(edge_pairs([0, 9000, 5, 9000], [9000, 0, 9000, 5]),
                                  [0, 0, 1, 1])
    assert edge_pairs([0, 9000, 5, 9000], [9000, 0, 9000, 6]) is None


def test_edge_pairs_with_periodic_shifts():
    # atom 0 sees its own images at +-a, and atom 1 across the cell boundary both ways
    s = np.array([0, 0, 0, 1, 1, 0])
    r = np.array([0, 0, 1, 0, 0, 1])
    t = np.array([[3.0, 0, 0], [-3.0, 0, 0], [0, 0, 2.5], [0, 0, -2.5], [0, 0, 0], [0, 0, 0]])
    pair = edge_pairs(s, r, t)
    _check_pairs(pair, s, r, t)
    # the same edges with a wrong sign on one shift no longer pair up
    bad = t.copy()
    bad[3] *= -1
    assert edge_pairs(s, r, bad) is None


def test_pad_batch_pairs_are_reverse_edges(qm9_graphset):
    gs = qm9_graphset
    index = np.array([7, 3, 100, 42])
    budget = Budget(int(gs.n_node[index].sum()) + 3, int(gs.n_edge[index].sum()) + 6, 6)
    g = pad_batch(gs, index, budget)
    real = int(gs.n_edge[index].sum())
    _check_pairs(g.edges["pair"][:real], g.senders[:real], g.receivers[:real])
    assert g.edges["pair"][real:].min() == real // 2
    assert g.edges["pair"].max() == (budget.n_edge + 1) // 2 - 1
