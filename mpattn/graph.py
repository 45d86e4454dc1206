"""GraphsTuple helpers: static padding budgets, vectorised batch assembly and padding masks.

A batch of molecules is one ``jraph.GraphsTuple`` padded to a fixed
:class:`Budget` ``(n_node, n_edge, n_graph)`` so that a jit-compiled train step sees only a
few distinct shapes (docs/design.md, "Static shapes"). Padding follows ``jraph.pad_with_graphs``
exactly: after the real graphs comes one padding graph that holds every padding node and
padding edge (padding edges point at the first padding node), then empty graphs; all padded
rows are zero. Masks come from jraph's ``get_*_padding_mask`` (never use
``jraph.zero_out_padding``: it calls removed JAX APIs).

Edge pairs: where every edge ``s -> r`` (periodic shift ``t``) of a batch has its reverse
``r -> s`` (shift ``-t``) — the complete, bond and radius edge sets all do — the batch carries
``edges["pair"]``: int32 [n_edge], the slot in ``[0, ceil(n_edge / 2))`` of each edge's
unordered pair (:func:`edge_pairs`; padding edges fill the slots after the real pairs, two per
slot). A quantity that depends on the distance only (SchNet's filters, radial bases) is then
computed once per pair instead of once per edge: half the work (:func:`mpattn.ops.pair_mean`).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp
import jraph
import numpy as np

from mpattn.data.graphset import GraphSet, _ranges

__all__ = ["Budget", "edge_mask", "edge_pairs", "graph_mask", "node_mask", "pad_batch",
           "round_up"]


@dataclass(frozen=True, order=True)
class Budget:
    """A static padding budget for one batch (ordered as the tuple ``(n_node, n_edge, n_graph)``).

    Attributes:
        n_node: Total nodes of the padded batch, including at least one padding node (jraph's
            padding graph needs one), so a budget holds at most ``n_node - 1`` real nodes.
        n_edge: Total edges of the padded batch (real + padding).
        n_graph: Total graphs, counting the padding graph, so at most ``n_graph - 1`` real graphs.
    """

    n_node: int
    n_edge: int
    n_graph: int

    def __post_init__(self) -> None:
        if self.n_node < 1 or self.n_edge < 0 or self.n_graph < 2:
            raise ValueError(
                f"invalid budget {self}: need n_node >= 1 (padding node), n_edge >= 0 and "
                "n_graph >= 2 (one real graph plus the padding graph)"
            )

    def fits(self, n_node: int, n_edge: int, n_graph: int) -> bool:
        """Whether ``n_graph`` real graphs with ``n_node`` nodes and ``n_edge`` edges fit."""
        return n_node < self.n_node and n_edge <= self.n_edge and n_graph < self.n_graph


def round_up(x: int, multiple: int = 64) -> int:
    """Smallest multiple of ``multiple`` that is ``>= x`` (``round_up(0) == 0``)."""
    if multiple < 1:
        raise ValueError(f"multiple must be positive, got {multiple}")
    return -(-int(x) // multiple) * multiple


def edge_pairs(senders, receivers, shift=None, *, num_edges: int | None = None
               ) -> np.ndarray | None:
    """The unordered pair of each edge of a symmetric edge list, or ``None`` if it is not one.

    Edge ``s -> r`` with shift ``t`` and its reverse ``r -> s`` with shift ``-t`` share one pair
    slot. Slots of real edges are ``0 .. len(senders) / 2 - 1``; with ``num_edges`` (a padded
    edge count), the padding edges after them take the next slots, two per slot, so the
    result has ``num_edges`` entries in ``[0, ceil(num_edges / 2))``.

    Args:
        senders: int[e] sender of each real edge.
        receivers: int[e] receiver of each real edge.
        shift: float[e, 3] periodic shifts in Å (``None``: all zero); compared to 1e-3 Å.
        num_edges: pad the result to this length (default ``e``).

    Returns:
        int32[num_edges] pair slots, or ``None`` when some edge lacks its reverse, appears
        twice, or is a self-loop without shift (its own reverse).
    """
    s = np.asarray(senders, np.int64).reshape(-1)
    r = np.asarray(receivers, np.int64).reshape(-1)
    e = s.shape[0]
    total = e if num_edges is None else int(num_edges)
    if e % 2 or total < e:
        return None
    lo, hi = np.minimum(s, r), np.maximum(s, r)
    if shift is None or e == 0:
        if np.any(s == r):
            return None
        slot = _pairs_by_table(lo, hi, s < r)
        if slot is None:
            return None
    else:
        t = np.rint(np.asarray(shift, np.float64).reshape(e, 3) * 1e3).astype(np.int64)
        first = t[np.arange(e), np.argmax(t != 0, axis=1)]  # first nonzero component (or 0)
        if np.any((s == r) & (first == 0)):
            return None
        forward = (s < r) | ((s == r) & (first > 0))
        canon = np.where(forward[:, None], t, -t)
        # one int64 key per (lo, hi, canonical shift): each shift component ranked on its own
        key = lo * (int(hi.max()) + 1) + hi
        for k in range(3):
            values, rank = np.unique(canon[:, k], return_inverse=True)
            if key.max() >= np.iinfo(np.int64).max // max(1, values.size):
                raise ValueError("edge_pairs: too many distinct periodic shifts to key")
            key = key * values.size + rank.reshape(-1)
        slot = _pairs_by_sort(key, forward)
        if slot is None:
            return None
    out = np.empty(total, np.int32)
    out[:e] = slot
    out[e:] = e // 2 + np.arange(total - e) // 2
    return out


def _pairs_by_sort(key: np.ndarray, forward: np.ndarray) -> np.ndarray | None:
    """Pair slots from one int64 key per unordered pair (``np.unique``); None unless every
    key occurs exactly twice, once per direction."""
    _, slot, count = np.unique(key, return_inverse=True, return_counts=True)
    slot = slot.reshape(-1)
    if count.size != key.size // 2 or np.any(count != 2) or np.any(
            np.bincount(slot, weights=forward, minlength=count.size) != 1):
        return None
    return slot


def _pairs_by_table(lo: np.ndarray, hi: np.ndarray, forward: np.ndarray) -> np.ndarray | None:
    """Pair slots without sorting: forward edges number the pairs, reverses look them up.

    ``key = lo * span + (hi - lo)`` indexes a table of ``(max lo + 1) x span`` entries: small
    for batches of molecules (an edge never spans more than one molecule's atoms), so this is
    O(edges) where ``np.unique`` would sort (5-10 ms for the 40k edges of a QM9 batch of 128).
    Large spans (one big structure) fall back to sorting.
    """
    e = lo.shape[0]
    if e == 0:
        return np.zeros(0, np.int64)
    span = int((hi - lo).max()) + 1
    size = (int(lo.max()) + 1) * span
    key = lo * span + (hi - lo)
    if size > 8 * e + 4096:
        return _pairs_by_sort(key, forward)
    fwd_key, rev_key = key[forward], key[~forward]
    if fwd_key.size != rev_key.size:
        return None
    table = np.full(size, -1, np.int64)
    table[fwd_key] = np.arange(fwd_key.size)
    if np.any(table[fwd_key] != np.arange(fwd_key.size)):  # a forward edge listed twice
        return None
    slot = np.empty(e, np.int64)
    slot[forward] = table[fwd_key]
    slot[~forward] = table[rev_key]
    # every reverse edge finds its forward edge, and no two reverses share one
    if np.any(slot[~forward] < 0) or np.any(np.bincount(slot[~forward],
                                                         minlength=fwd_key.size) != 1):
        return None
    return slot


def pad_batch(gs: GraphSet, index: np.ndarray, budget: Budget) -> jraph.GraphsTuple:
    """Gathers graphs of a GraphSet into one GraphsTuple padded to ``budget``.

    The result equals ``jraph.pad_with_graphs(jraph.batch_np([gs.graph(i) for i in index]),
    budget.n_node, budget.n_edge, budget.n_graph)`` field by field, but is built with one
    vectorised gather per field instead of per-graph GraphsTuples. Index arrays stay int32 and
    every other field keeps the GraphSet's dtype.

    Args:
        gs: Source graphs (``senders``/``receivers`` local to each graph).
        index: int[k] positions of the graphs to gather, in batch order (``k`` may be 0).
        budget: Padded sizes; must hold ``sum(n_node) + 1`` nodes, ``sum(n_edge)`` edges and
            ``k + 1`` graphs.

    Returns:
        A ``jraph.GraphsTuple`` of numpy arrays with
        ``nodes[name]``: [budget.n_node, ...], ``edges[name]``: [budget.n_edge, ...],
        ``senders``/``receivers``: int32[budget.n_edge] (global node indices; padding edges
        point at the first padding node ``sum(n_node)``), ``n_node``/``n_edge``:
        int32[budget.n_graph] and ``globals[name]``: [budget.n_graph, ...]. Padded rows are zero.
        Where the edges are symmetric, ``edges["pair"]`` (:func:`edge_pairs`) is added.

    Raises:
        ValueError: If the graphs do not fit the budget (the message gives the numbers).
    """
    index = np.asarray(index, dtype=np.int64).reshape(-1)
    k = index.shape[0]
    nn = gs.n_node[index]
    ne = gs.n_edge[index]
    tot_n = int(nn.sum())
    tot_e = int(ne.sum())
    if not budget.fits(tot_n, tot_e, k):
        raise ValueError(
            f"{k} graphs with {tot_n} nodes and {tot_e} edges do not fit {budget}: it holds at "
            f"most {budget.n_graph - 1} graphs, {budget.n_node - 1} nodes (one is the padding "
            f"node) and {budget.n_edge} edges"
        )
    nidx = _ranges(gs.node_offsets[index], nn)
    eidx = _ranges(gs.edge_offsets[index], ne)

    def gather(arr: np.ndarray, idx: np.ndarray, size: int) -> np.ndarray:
        out = np.zeros((size,) + arr.shape[1:], dtype=arr.dtype)
        np.take(arr, idx, axis=0, out=out[: idx.shape[0]])
        return out

    nodes = {name: gather(v, nidx, budget.n_node) for name, v in gs.nodes.items()}
    edges = {name: gather(v, eidx, budget.n_edge) for name, v in gs.edges.items()}
    glob = {name: gather(v, index, budget.n_graph) for name, v in gs.globals.items()}

    # Offset of each edge's graph inside the batch: local index -> global batch index.
    first_node = np.cumsum(nn, dtype=np.int32) - nn
    shift = np.repeat(first_node, ne)
    senders = np.full(budget.n_edge, tot_n, dtype=np.int32)
    receivers = np.full(budget.n_edge, tot_n, dtype=np.int32)
    np.add(gs.senders[eidx], shift, out=senders[:tot_e])
    np.add(gs.receivers[eidx], shift, out=receivers[:tot_e])
    images = edges["shift"][:tot_e] if "shift" in edges else None
    pair = edge_pairs(senders[:tot_e], receivers[:tot_e], images, num_edges=budget.n_edge)
    if pair is not None:
        edges["pair"] = pair

    n_node = np.zeros(budget.n_graph, dtype=np.int32)
    n_edge = np.zeros(budget.n_graph, dtype=np.int32)
    n_node[:k] = nn
    n_edge[:k] = ne
    n_node[k] = budget.n_node - tot_n
    n_edge[k] = budget.n_edge - tot_e
    return jraph.GraphsTuple(
        nodes=nodes,
        edges=edges,
        senders=senders,
        receivers=receivers,
        n_node=n_node,
        n_edge=n_edge,
        globals=glob,
    )


def node_mask(graph: jraph.GraphsTuple):
    """bool[num_nodes]: True for real nodes of a graph padded as by ``pad_with_graphs``.

    Works on numpy and jax arrays and inside ``jax.jit``, also on a numpy graph closed over
    there (the size comes from the static shape of the first node field); returns a jax array.
    """
    return jraph.get_node_padding_mask(_jax_counts(graph))


def edge_mask(graph: jraph.GraphsTuple):
    """bool[num_edges]: True for real edges of a padded graph (size from ``senders.shape``)."""
    return jraph.get_edge_padding_mask(_jax_counts(graph))


def graph_mask(graph: jraph.GraphsTuple):
    """bool[num_graphs]: True for real graphs, False for the padding graph and empty graphs."""
    return jraph.get_graph_padding_mask(_jax_counts(graph))


def _jax_counts(graph: jraph.GraphsTuple) -> jraph.GraphsTuple:
    """``n_node``/``n_edge`` as jax arrays: jraph indexes them with a jax index, which a
    numpy array refuses inside ``jax.jit``."""
    return graph._replace(n_node=jnp.asarray(graph.n_node), n_edge=jnp.asarray(graph.n_edge))
