"""Static-shape batching: padding budgets derived from the data, greedy packing, prefetching.

A training run compiles its train step once per padding budget (docs/design.md, "Static
shapes"), so batches are packed into a few fixed :class:`~mpattn.graph.Budget` s:

1. :func:`derive_budgets` picks ``num_budgets`` budgets from simulated shuffled batches.
2. :func:`pack` cuts an epoch's order greedily into batches that fit the largest budget.
3. :class:`BatchLoader` pads each batch to the smallest budget it fits (one vectorised
   gather per field, :func:`mpattn.graph.pad_batch`) and yields ``jraph.GraphsTuple`` s of
   numpy arrays, optionally assembled ahead in a background thread (where a
   :class:`~mpattn.data.radius_graphs.RadiusGraphSet` also builds the batch's edges).

Every yielded batch carries ``globals["id"]``: int64[n_graph], the GraphSet ids of its graphs
and -1 for padding graphs. Masks come from :func:`mpattn.graph.node_mask` and friends.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Callable, Iterator, Sequence

import jraph
import numpy as np

from mpattn.data.graphset import GraphSet
from mpattn.graph import Budget, pad_batch, round_up

__all__ = ["BatchLoader", "derive_budgets", "pack"]

_MIN_SIMULATED_BATCHES = 2000  # batches simulated by derive_budgets (at least 3 epochs)


def _level_quantiles(nodes: np.ndarray, edges: np.ndarray, p: float) -> tuple[int, int]:
    """Node and edge totals such that at least a fraction ``p`` of the batches fit both.

    Each batch gets the larger of its two empirical CDF ranks (nodes, edges); the p-quantile of
    that joint rank is the level at which both per-field quantiles are taken.
    """
    n = nodes.shape[0]
    rank_n = np.searchsorted(np.sort(nodes), nodes, side="right")
    rank_e = np.searchsorted(np.sort(edges), edges, side="right")
    level = np.sort(np.maximum(rank_n, rank_e))[max(math.ceil(p * n) - 1, 0)]
    return int(np.sort(nodes)[level - 1]), int(np.sort(edges)[level - 1])


def derive_budgets(
    gs: GraphSet, batch_size: int, num_budgets: int = 3, multiple: int = 64, seed: int = 0
) -> list[Budget]:
    """A few padding budgets fitted to the sizes of the graphs in ``gs``.

    Heuristic: shuffled epochs are simulated (``np.random.default_rng(seed)``, at least 3
    epochs and about 2000 batches of ``batch_size`` graphs) and the node and edge totals of
    every batch recorded. The largest budget holds the maximum simulated batch plus the largest
    single graph of the set (headroom, so greedy packing rarely has to close a batch early, and
    the largest graph always fits). The ``num_budgets - 1`` smaller ones are joint quantiles at
    ``p = 1 - 0.5 * 5**-i`` (50 %, 90 %, 98 %, ...): at least a fraction ``p`` of the simulated
    batches fit both their node and edge totals. Every budget gets one padding node, is rounded
    up to a multiple of ``multiple`` (at least ``multiple``) and has ``n_graph = batch_size + 1``.

    Args:
        gs: The graphs to batch (must not be empty).
        batch_size: Graphs per batch.
        num_budgets: How many budgets at most (duplicates after rounding are merged).
        multiple: Budgets are rounded up to multiples of this.
        seed: Seed of the simulated shuffles.

    Returns:
        Budgets sorted ascending (``n_node``, then ``n_edge``) and deduplicated.
    """
    if batch_size < 1 or num_budgets < 1:
        raise ValueError(
            f"batch_size and num_budgets must be >= 1, got {batch_size}, {num_budgets}"
        )
    g = len(gs)
    if g == 0:
        raise ValueError("cannot derive budgets for an empty GraphSet")
    per_epoch = math.ceil(g / batch_size)
    epochs = max(3, math.ceil(_MIN_SIMULATED_BATCHES / per_epoch))
    rng = np.random.default_rng(seed)
    starts = np.arange(0, g, batch_size)
    nodes, edges = [], []
    for _ in range(epochs):
        perm = rng.permutation(g)
        nodes.append(np.add.reduceat(gs.n_node[perm].astype(np.int64), starts))
        edges.append(np.add.reduceat(gs.n_edge[perm].astype(np.int64), starts))
    nodes, edges = np.concatenate(nodes), np.concatenate(edges)
    full = np.ones(nodes.shape[0], dtype=bool)
    if g % batch_size and g > batch_size:  # quantiles over full batches only
        full = np.tile(np.arange(per_epoch) < per_epoch - 1, epochs)

    def budget(n: int, e: int) -> Budget:
        return Budget(
            n_node=max(round_up(n + 1, multiple), multiple),
            n_edge=max(round_up(e, multiple), multiple),
            n_graph=batch_size + 1,
        )

    out = {budget(int(nodes.max()) + int(gs.n_node.max()), int(edges.max()) + int(gs.n_edge.max()))}
    for i in range(num_budgets - 1):
        out.add(budget(*_level_quantiles(nodes[full], edges[full], 1.0 - 0.5 * 5.0**-i)))
    return sorted(out)


def pack(
    gs: GraphSet, order: np.ndarray, budgets: Sequence[Budget], batch_size: int
) -> list[np.ndarray]:
    """Cuts ``order`` greedily into batches that fit the largest budget.

    Graphs are added to the current batch, in order, while it has fewer than ``batch_size``
    graphs (and fewer than the largest budget's ``n_graph - 1``) and its node and edge totals
    still fit the largest budget (keeping its padding node); otherwise the batch is closed.
    No graph is dropped or truncated. "Largest" is the last budget in sorted order.

    Args:
        gs: The graphs.
        order: int[k] graph positions in the order they are to be batched.
        budgets: Padding budgets (any order).
        batch_size: Most graphs per batch.

    Returns:
        int64 arrays of graph positions, one per batch, concatenating to ``order``.

    Raises:
        ValueError: If a graph alone exceeds the largest budget (names the graph's id and size).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not budgets:
        raise ValueError("no budgets given")
    big = max(budgets)
    cap_n, cap_e, cap_g = big.n_node - 1, big.n_edge, min(batch_size, big.n_graph - 1)
    order = np.asarray(order, dtype=np.int64).reshape(-1)
    nn = gs.n_node[order].astype(np.int64)
    ne = gs.n_edge[order].astype(np.int64)
    bad = np.flatnonzero((nn > cap_n) | (ne > cap_e))
    if bad.size:
        i = order[bad[0]]
        raise ValueError(
            f"graph id {gs.ids[i]} (position {i}) has {gs.n_node[i]} nodes and {gs.n_edge[i]} "
            f"edges; the largest budget {big} holds {cap_n} nodes and {cap_e} edges "
            f"({bad.size} graph(s) too big)"
        )
    cum_n = np.concatenate([[0], np.cumsum(nn)])
    cum_e = np.concatenate([[0], np.cumsum(ne)])
    k = order.shape[0]
    bounds = [0]
    start = 0
    while start < k:  # one iteration per batch, binary searches for its end
        end_n = np.searchsorted(cum_n, cum_n[start] + cap_n, side="right") - 1
        end_e = np.searchsorted(cum_e, cum_e[start] + cap_e, side="right") - 1
        start = int(min(start + cap_g, end_n, end_e, k))
        bounds.append(start)
    return [order[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def _smallest_budgets(gs: GraphSet, batches: list[np.ndarray], budgets: list[Budget]) -> np.ndarray:
    """int[num_batches]: index into sorted ``budgets`` of the smallest one each batch fits."""
    if not batches:
        return np.zeros(0, dtype=np.int64)
    lengths = np.array([b.shape[0] for b in batches])
    flat = np.concatenate(batches)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    # reduceat on an empty segment returns the element at its start; batches are never empty
    tot_n = np.add.reduceat(gs.n_node[flat].astype(np.int64), starts)
    tot_e = np.add.reduceat(gs.n_edge[flat].astype(np.int64), starts)
    cap = np.array([(b.n_node - 1, b.n_edge, b.n_graph - 1) for b in budgets])
    fits = (
        (tot_n[:, None] <= cap[None, :, 0])
        & (tot_e[:, None] <= cap[None, :, 1])
        & (lengths[:, None] <= cap[None, :, 2])
    )
    return np.argmax(fits, axis=1)


class _Raised:
    """Carries an exception from the producer thread to the consumer."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


_DONE = object()


class BatchLoader:
    """Iterates over a GraphSet in padded, static-shape ``jraph.GraphsTuple`` batches.

    Args:
        gs: The graphs.
        batch_size: Most graphs per batch (fewer when a batch would exceed the largest budget).
        budgets: Padding budgets; ``None`` derives them with :func:`derive_budgets`.
        shuffle: Shuffle each epoch with ``np.random.default_rng([seed, epoch])``; otherwise
            use the dataset order.
        seed: Seed of the shuffles (and of the budget derivation).
        prefetch: Batches assembled ahead in a background thread; 0 is synchronous.
        drop_last: Drop an epoch's last batch when it has fewer than ``batch_size`` graphs.

    Attributes:
        budgets: The padding budgets, sorted ascending; every batch has one of these shapes.

    Each batch is a ``jraph.GraphsTuple`` of numpy arrays laid out as by
    :func:`mpattn.graph.pad_batch`, with ``globals["id"]``: int64[n_graph] the ids of its graphs
    (-1 for padding graphs). Iterating the loader (``for batch in loader``) runs the next epoch
    (0, 1, 2, ...); :meth:`epoch` runs a given one. Stopping early (``break``, closing or
    dropping the iterator) stops the background thread.
    """

    def __init__(
        self,
        gs: GraphSet,
        batch_size: int,
        *,
        budgets: Sequence[Budget] | None = None,
        shuffle: bool = True,
        seed: int = 0,
        prefetch: int = 2,
        drop_last: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if prefetch < 0:
            raise ValueError(f"prefetch must be >= 0, got {prefetch}")
        if "id" in gs.globals:
            raise ValueError("globals['id'] is reserved for the graph ids the loader adds")
        self.gs = gs
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.prefetch = prefetch
        self.drop_last = drop_last
        if budgets is None:
            budgets = derive_budgets(gs, batch_size, seed=seed)
        self.budgets: list[Budget] = sorted(set(budgets))
        if not self.budgets:
            raise ValueError("no budgets given")
        pack(gs, np.arange(len(gs)), self.budgets, batch_size)  # raises if a graph cannot fit
        self._next_epoch = 0
        self._plan_cache: tuple[int, list[np.ndarray], np.ndarray] | None = None

    def _plan(self, e: int) -> tuple[list[np.ndarray], np.ndarray]:
        """Batches (graph positions) of epoch ``e`` and the budget index of each."""
        if self._plan_cache is not None and self._plan_cache[0] == e:
            return self._plan_cache[1], self._plan_cache[2]
        g = len(self.gs)
        if self.shuffle:
            order = np.random.default_rng([self.seed, e]).permutation(g)
        else:
            order = np.arange(g)
        batches = pack(self.gs, order, self.budgets, self.batch_size)
        if self.drop_last and batches and batches[-1].shape[0] < self.batch_size:
            batches = batches[:-1]
        which = _smallest_budgets(self.gs, batches, self.budgets)
        self._plan_cache = (e, batches, which)
        return batches, which

    def __len__(self) -> int:
        """Batches in the next epoch that iterating the loader runs."""
        return len(self._plan(self._next_epoch)[0])

    def __iter__(self) -> Iterator[jraph.GraphsTuple]:
        e = self._next_epoch
        self._next_epoch += 1
        return self.epoch(e)

    def _batch(self, index: np.ndarray, budget: Budget) -> jraph.GraphsTuple:
        if hasattr(self.gs, "materialize"):  # edges built now (RadiusGraphSet)
            graph = pad_batch(self.gs.materialize(index), np.arange(len(index)), budget)
        else:
            graph = pad_batch(self.gs, index, budget)
        ids = np.full(budget.n_graph, -1, dtype=np.int64)
        ids[: index.shape[0]] = self.gs.ids[index]
        return graph._replace(globals={**graph.globals, "id": ids})

    def empty_batch(self, budget: Budget | None = None) -> jraph.GraphsTuple:
        """A batch of padding only (no real graph; ids all -1) shaped as ``budget`` (default:
        the loader's only budget), e.g. to fill the last step of a data-parallel epoch."""
        if budget is None:
            if len(self.budgets) != 1:
                raise ValueError(f"the loader has {len(self.budgets)} budgets: name one")
            budget = self.budgets[0]
        return self._batch(np.zeros(0, np.int64), budget)

    def _batches(
        self, batches: list[np.ndarray], which: np.ndarray, stop: threading.Event | None = None,
        keep: Callable[[int], bool] | None = None,
    ) -> Iterator[jraph.GraphsTuple | None]:
        for i, (index, b) in enumerate(zip(batches, which, strict=True)):
            if stop is not None and stop.is_set():
                return
            yield self._batch(index, self.budgets[b]) if keep is None or keep(i) else None

    def epoch(self, e: int, keep: Callable[[int], bool] | None = None
              ) -> Iterator[jraph.GraphsTuple | None]:
        """Batches of epoch ``e`` (shuffled from ``(seed, e)``), prefetched if configured.

        ``keep(i)`` False: the ``i``-th batch is not assembled and ``None`` stands in its place
        (a process of a multi-process run builds only its own devices' batches).
        """
        if self.prefetch == 0:
            return self._batches(*self._plan(e), keep=keep)
        return self._prefetched(e, keep)

    def _prefetched(self, e: int, keep: Callable[[int], bool] | None = None
                    ) -> Iterator[jraph.GraphsTuple | None]:
        # The thread starts on the first next(): a generator that never ran has no finally to
        # run, so it must own no thread.
        batches, which = self._plan(e)
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.05)
                    return True
                except queue.Full:
                    continue
            return False

        def produce() -> None:
            try:
                for batch in self._batches(batches, which, stop, keep):
                    if not put(batch):
                        return
                put(_DONE)
            except BaseException as exc:  # re-raised in the consumer
                put(_Raised(exc))

        thread = threading.Thread(target=produce, name=f"BatchLoader-epoch{e}", daemon=True)
        thread.start()
        try:
            while True:
                try:
                    item = q.get(timeout=0.1)
                except queue.Empty:
                    if thread.is_alive() or not q.empty():
                        continue
                    raise RuntimeError(f"{thread.name} ended without finishing the epoch") from None
                if item is _DONE:
                    return
                if isinstance(item, _Raised):
                    raise item.exc
                yield item
        finally:
            stop.set()
            while thread.is_alive():  # unblock a producer waiting on a full queue
                try:
                    q.get_nowait()
                except queue.Empty:
                    pass
                thread.join(timeout=0.01)
