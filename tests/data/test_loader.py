"""Tests for mpattn.data.loader: budgets, packing, epochs, prefetch thread lifecycle."""

from __future__ import annotations

import gc
import threading
import time

import jax
import numpy as np
import pytest

import mpattn.data.loader as loader_mod
from mpattn.data.graphset import GraphSet
from mpattn.data.loader import BatchLoader, derive_budgets, pack
from mpattn.graph import Budget, edge_mask, graph_mask, node_mask


def _ids(batch) -> np.ndarray:
    ids = batch.globals["id"]
    real = np.asarray(graph_mask(batch))
    np.testing.assert_array_equal(ids[~real], -1)
    return ids[real]


def _wait_for_threads(baseline: int, timeout: float = 5.0) -> int:
    deadline = time.monotonic() + timeout
    while threading.active_count() > baseline and time.monotonic() < deadline:
        time.sleep(0.01)
    return threading.active_count()


@pytest.mark.parametrize("batch_size", [1, 7, 32, 128, 1000])
@pytest.mark.parametrize("prefetch", [0, 2])
def test_every_graph_once_per_epoch(qm9_graphset, batch_size, prefetch):
    gs = qm9_graphset
    loader = BatchLoader(gs, batch_size, prefetch=prefetch, seed=3)
    shapes = {(b.n_node, b.n_edge, b.n_graph) for b in loader.budgets}
    for _ in range(3):
        n_expected = len(loader)
        batches = list(loader)
        assert len(batches) == n_expected
        ids = np.concatenate([_ids(b) for b in batches])
        assert ids.shape[0] == len(gs)
        np.testing.assert_array_equal(np.sort(ids), np.sort(gs.ids))
        for b in batches:
            assert (b.nodes["z"].shape[0], b.senders.shape[0], b.n_node.shape[0]) in shapes
            assert int(np.asarray(graph_mask(b)).sum()) <= batch_size
        if batch_size >= len(gs):
            assert len(batches) == 1
        if batch_size == 1:
            assert len(batches) == len(gs)


def test_shuffle_differs_between_epochs_and_is_reproducible(qm9_graphset):
    def order(loader, e):
        return np.concatenate([_ids(b) for b in loader.epoch(e)])

    a = BatchLoader(qm9_graphset, 32, seed=1)
    b = BatchLoader(qm9_graphset, 32, seed=1)
    c = BatchLoader(qm9_graphset, 32, seed=2)
    o0, o1 = order(a, 0), order(a, 1)
    assert not np.array_equal(o0, o1)
    np.testing.assert_array_equal(o0, order(b, 0))
    np.testing.assert_array_equal(o1, order(b, 1))
    assert not np.array_equal(o0, order(c, 0))
    # __iter__ advances epochs: first iteration is epoch 0, second epoch 1
    np.testing.assert_array_equal(np.concatenate([_ids(x) for x in b]), o0)
    np.testing.assert_array_equal(np.concatenate([_ids(x) for x in b]), o1)


def test_no_shuffle_is_dataset_order(qm9_graphset):
    loader = BatchLoader(qm9_graphset, 50, shuffle=False, prefetch=0)
    for e in (0, 5):
        ids = np.concatenate([_ids(b) for b in loader.epoch(e)])
        np.testing.assert_array_equal(ids, qm9_graphset.ids)


def test_batch_contents_equal_source_graphs(qm9_graphset):
    gs = qm9_graphset
    pos_of_id = {int(i): p for p, i in enumerate(gs.ids)}
    loader = BatchLoader(gs, 64, seed=0)
    for batch in loader.epoch(0):
        ids = _ids(batch)
        starts = np.concatenate([[0], np.cumsum(batch.n_node)])
        estarts = np.concatenate([[0], np.cumsum(batch.n_edge)])
        for j, gid in enumerate(ids):
            src = gs.graph(pos_of_id[int(gid)])
            sl = slice(starts[j], starts[j + 1])
            for name in ("z", "positions", "features"):
                np.testing.assert_array_equal(batch.nodes[name][sl], src.nodes[name])
            esl = slice(estarts[j], estarts[j + 1])
            np.testing.assert_array_equal(batch.senders[esl] - starts[j], src.senders)
            np.testing.assert_array_equal(batch.receivers[esl] - starts[j], src.receivers)
            np.testing.assert_array_equal(batch.globals["U0"][j], src.globals["U0"][0])
        assert batch.globals["id"].dtype == np.int64
        nm, em = np.asarray(node_mask(batch)), np.asarray(edge_mask(batch))
        assert not np.any(nm[batch.senders[~em]])


@pytest.mark.parametrize("batch_size", [1, 16, 128, 600])
def test_derived_budgets(qm9_graphset, batch_size):
    gs = qm9_graphset
    budgets = derive_budgets(gs, batch_size)
    assert 1 <= len(budgets) <= 3
    assert budgets == sorted(budgets)
    assert len(set(budgets)) == len(budgets)
    for b in budgets:
        assert b.n_node % 64 == 0 and b.n_edge % 64 == 0
        assert b.n_graph == batch_size + 1
    big = budgets[-1]
    assert big.n_node - 1 >= gs.n_node.max()
    assert big.n_edge >= gs.n_edge.max()
    # the largest budget holds any batch_size graphs of typical size; smaller ones are smaller
    for small in budgets[:-1]:
        assert small.n_node <= big.n_node and small.n_edge <= big.n_edge
    assert derive_budgets(gs, batch_size) == budgets  # deterministic
    assert len(derive_budgets(gs, batch_size, num_budgets=1)) == 1


def _uniform_graphset(g: int, n: int, e: int) -> GraphSet:
    """``g`` identical graphs of ``n`` nodes and ``e`` edges (a ring walked repeatedly)."""
    local = np.arange(e) % n
    return GraphSet(
        n_node=np.full(g, n),
        n_edge=np.full(g, e),
        nodes={"z": np.ones(g * n, np.int32)},
        edges={"bond": np.zeros(g * e, np.int32)},
        senders=np.tile(local, g),
        receivers=np.tile((local + 1) % n, g),
    )


def test_derived_budgets_golden():
    # 10 graphs of 5 nodes / 20 edges, batches of 4: every full batch has 20 nodes, 80 edges
    # (the partial last batch of 2 is left out of the quantiles). Quantile budgets: 20 + 1
    # padding node, 80 edges. Largest: max batch + largest graph = 25 + 1 nodes, 100 edges.
    gs = _uniform_graphset(10, 5, 20)
    assert derive_budgets(gs, 4, multiple=1) == [Budget(21, 80, 5), Budget(26, 100, 5)]
    assert derive_budgets(gs, 4, multiple=8) == [Budget(24, 80, 5), Budget(32, 104, 5)]
    assert derive_budgets(gs, 4, multiple=1, num_budgets=1) == [Budget(26, 100, 5)]
    # batches of 8 and 2 alternate: the partial ones must not pull the quantiles down
    assert derive_budgets(gs, 8, multiple=1) == [Budget(41, 160, 9), Budget(46, 180, 9)]
    # batch larger than the set: one batch of all 10 graphs
    assert derive_budgets(gs, 16, multiple=1) == [Budget(51, 200, 17), Budget(56, 220, 17)]


@pytest.mark.parametrize("batch_size", [16, 64])
def test_derived_budgets_leave_headroom(qm9_graphset, batch_size):
    # the largest derived budget has room for a full batch plus the largest graph, so greedy
    # packing of new shuffles practically never closes a batch before batch_size graphs
    loader = BatchLoader(qm9_graphset, batch_size, seed=11, prefetch=0)
    for e in range(20):
        sizes = [len(b) for b in loader._plan(e)[0]]
        assert all(n == batch_size for n in sizes[:-1]), (e, sizes)


def test_batches_use_smallest_fitting_budget(qm9_graphset):
    gs = qm9_graphset
    loader = BatchLoader(gs, 32, seed=0)
    assert len(loader.budgets) > 1
    seen = set()
    for batch in loader.epoch(0):
        n = int(np.asarray(node_mask(batch)).sum())
        e = int(np.asarray(edge_mask(batch)).sum())
        g = int(np.asarray(graph_mask(batch)).sum())
        shape = Budget(batch.nodes["z"].shape[0], batch.senders.shape[0], batch.n_node.shape[0])
        first_fit = next(b for b in loader.budgets if b.fits(n, e, g))
        assert shape == first_fit
        seen.add(shape)
    assert len(seen) > 1  # the quantile budgets are actually used


def test_pack_greedy_respects_largest_budget(qm9_graphset):
    gs = qm9_graphset
    budget = Budget(n_node=129, n_edge=1600, n_graph=100)
    order = np.random.default_rng(0).permutation(len(gs))
    batches = pack(gs, order, [budget], batch_size=50)
    np.testing.assert_array_equal(np.concatenate(batches), order)
    for i, b in enumerate(batches):
        n, e = int(gs.n_node[b].sum()), int(gs.n_edge[b].sum())
        assert n <= 128 and e <= 1600 and len(b) <= 50
        if i + 1 < len(batches):  # closed only because the next graph did not fit
            nxt = batches[i + 1][0]
            assert n + gs.n_node[nxt] > 128 or e + gs.n_edge[nxt] > 1600 or len(b) == 50
    # n_graph of the budget caps the count too
    assert max(len(b) for b in pack(gs, order, [Budget(10_000, 100_000, 4)], 50)) == 3


def test_graph_too_big_raises_naming_it(qm9_graphset):
    gs = qm9_graphset
    big = int(np.argmax(gs.n_node))
    budget = Budget(n_node=int(gs.n_node[big]), n_edge=100_000, n_graph=9)  # one node short
    msg = rf"graph id {gs.ids[big]} .* has {gs.n_node[big]} nodes"
    with pytest.raises(ValueError, match=msg):
        pack(gs, np.arange(len(gs)), [budget], 8)
    with pytest.raises(ValueError, match=msg):
        BatchLoader(gs, 8, budgets=[budget])
    # fits with one more node: nothing dropped
    ok = BatchLoader(gs, 8, budgets=[Budget(int(gs.n_node[big]) + 1, 100_000, 9)], prefetch=0)
    assert sum(len(_ids(b)) for b in ok) == len(gs)


def test_drop_last(qm9_graphset):
    loader = BatchLoader(qm9_graphset, 64, budgets=[Budget(4096, 65536, 65)], drop_last=True)
    ids = np.concatenate([_ids(b) for b in loader.epoch(0)])
    assert ids.shape[0] == 448  # 7 full batches of 64, the last 52 dropped
    assert len(np.unique(ids)) == 448


@pytest.mark.parametrize("how", ["break", "close", "del"])
def test_prefetch_thread_stops_when_consumer_stops(qm9_graphset, monkeypatch, how):
    built = []
    real = loader_mod.pad_batch

    def counting(gs, index, budget):
        built.append(1)
        return real(gs, index, budget)

    monkeypatch.setattr(loader_mod, "pad_batch", counting)
    baseline = threading.active_count()
    loader = BatchLoader(qm9_graphset, 4, prefetch=2)
    assert len(loader) == 125
    it = iter(loader)
    assert threading.active_count() == baseline  # no thread before the first batch
    if how == "break":
        for i, _ in enumerate(it):
            if i == 3:
                assert threading.active_count() == baseline + 1
                break
        del it
    else:
        next(it)
        assert threading.active_count() == baseline + 1
        if how == "close":
            it.close()
        else:
            del it
            gc.collect()
    assert _wait_for_threads(baseline) == baseline
    # the producer stopped: it built at most what was consumed plus the queue and one in hand
    assert len(built) <= 4 + 2 + 1


def test_prefetch_thread_ends_after_full_epoch(qm9_graphset):
    baseline = threading.active_count()
    loader = BatchLoader(qm9_graphset, 128, prefetch=3)
    n = len(loader)
    assert len(list(loader)) == n
    assert _wait_for_threads(baseline) == baseline


@pytest.mark.parametrize("prefetch", [0, 2])
def test_producer_exception_propagates(qm9_graphset, monkeypatch, prefetch):
    calls = []
    real = loader_mod.pad_batch

    def failing(gs, index, budget):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom in batch 3")
        return real(gs, index, budget)

    monkeypatch.setattr(loader_mod, "pad_batch", failing)
    baseline = threading.active_count()
    loader = BatchLoader(qm9_graphset, 16, prefetch=prefetch)
    got = []
    with pytest.raises(RuntimeError, match="boom in batch 3"):
        for b in loader:
            got.append(b)
    assert len(got) == 2
    assert _wait_for_threads(baseline) == baseline


def test_invalid_arguments(qm9_graphset):
    with pytest.raises(ValueError):
        BatchLoader(qm9_graphset, 0)
    with pytest.raises(ValueError):
        BatchLoader(qm9_graphset, 8, prefetch=-1)
    with pytest.raises(ValueError):
        BatchLoader(qm9_graphset, 8, budgets=[])


@pytest.mark.parametrize("prefetch", [0, 2])
def test_keep_assembles_only_the_kept_batches(qm9_graphset, prefetch, monkeypatch):
    loader = BatchLoader(qm9_graphset, 16, seed=5, prefetch=prefetch)
    full = list(loader.epoch(2))
    built = []
    real_batch = loader._batch
    monkeypatch.setattr(loader, "_batch", lambda idx, b: built.append(1) or real_batch(idx, b))
    part = list(loader.epoch(2, keep=lambda i: i % 3 == 1))
    assert len(part) == len(full) and len(built) == len(full[1::3])
    for i, (a, b) in enumerate(zip(part, full, strict=True)):
        if i % 3 != 1:
            assert a is None
        else:
            np.testing.assert_array_equal(a.globals["id"], b.globals["id"])
            np.testing.assert_array_equal(a.nodes["z"], b.nodes["z"])


def test_empty_batch_is_padding_only(qm9_graphset):
    budget = derive_budgets(qm9_graphset, 8, num_budgets=1)[0]
    loader = BatchLoader(qm9_graphset, 8, budgets=[budget], prefetch=0)
    empty, real = loader.empty_batch(), next(iter(loader))
    assert not np.asarray(graph_mask(empty)).any()
    assert not np.asarray(node_mask(empty)).any() and not np.asarray(edge_mask(empty)).any()
    np.testing.assert_array_equal(empty.globals["id"], -1)
    assert empty.n_node.sum() == budget.n_node and empty.n_edge.sum() == budget.n_edge
    same = [(a.shape, a.dtype) for a in jax.tree.leaves(real)]
    assert [(a.shape, a.dtype) for a in jax.tree.leaves(empty)] == same
    with pytest.raises(ValueError, match="2 budgets: name one"):
        BatchLoader(qm9_graphset, 8, budgets=[budget, Budget(budget.n_node * 2,
                                                             budget.n_edge * 2, 9)]).empty_batch()
