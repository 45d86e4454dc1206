"""GraphsTuple helpers: static padding budgets, vectorised batch assembly and padding masks.

A batch of molecules is one ``jraph.GraphsTuple`` padded to a fixed
:class:`Budget` ``(n_node, n_edge, n_graph)`` so that a jit-compiled train step sees only a
few distinct shapes (DESIGN.md, "Static shapes"). Padding follows ``jraph.pad_with_graphs``
exactly: after the real graphs comes one padding graph that holds every padding node and
padding edge (padding edges point at the first padding node), then empty graphs; all padded
rows are zero. Masks come from jraph's ``get_*_padding_mask`` (never use
``jraph.zero_out_padding``: it calls removed JAX APIs).
"""

from __future__ import annotations

from dataclasses import dataclass

import jraph
import numpy as np

from mpattn.data.graphset import GraphSet, _ranges

__all__ = ["Budget", "edge_mask", "graph_mask", "node_mask", "pad_batch", "round_up"]


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

    Works on numpy and jax arrays and inside ``jax.jit`` (the size comes from the static shape
    of the first node field); returns a jax array.
    """
    return jraph.get_node_padding_mask(graph)


def edge_mask(graph: jraph.GraphsTuple):
    """bool[num_edges]: True for real edges of a padded graph (size from ``senders.shape``)."""
    return jraph.get_edge_padding_mask(graph)


def graph_mask(graph: jraph.GraphsTuple):
    """bool[num_graphs]: True for real graphs, False for the padding graph and empty graphs."""
    return jraph.get_graph_padding_mask(graph)
