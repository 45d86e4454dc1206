"""Radius graphs built per batch: memory that grows with atoms, not with edges.

Stored radius graphs cost about 24 bytes per directed edge (senders, receivers, bond,
image shift); a 30-atom molecule within 5 Å has up to 870 of them, 21 kB, against 25 bytes
per atom for the atoms themselves. :class:`RadiusGraphSet` keeps only the atoms (``z`` int8,
positions and forces float32, the cell per frame) and each frame's edge count, and builds a
batch's edges with vesin (:func:`mpattn.neighbors.radius_edges`, the same builder and order
as :meth:`~mpattn.data.frameset.FrameSet.to_graphset`) when the batch is assembled, which
:class:`~mpattn.data.loader.BatchLoader` does in its background thread.

:meth:`RadiusGraphSet.maybe_stored` keeps the edges after all when they are small (built
once, the loader then only gathers them; the default limit is 1 GiB).

It offers what the loader and the trainer read of a :class:`~mpattn.data.graphset.GraphSet`
(``n_node``, ``n_edge``, ``ids``, ``nodes``, ``globals``, ``len``) and
:meth:`RadiusGraphSet.materialize`, a GraphSet of some of its graphs with their edges.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mpattn.data.graphset import GraphSet

__all__ = ["STORED_EDGES_MAX_BYTES", "RadiusGraphSet", "build_edges"]

#: up to this many bytes of edges, building them once and storing them is the faster choice
STORED_EDGES_MAX_BYTES = 1 << 30


def _edges(positions, cutoff: float, cell, pbc, where: str):
    from mpattn.neighbors import radius_edges

    periodic = bool(pbc.any())
    try:
        return radius_edges(np.asarray(positions, np.float64), cutoff,
                            cell if periodic else None, pbc if periodic else None)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from exc


def build_edges(positions, offsets, cell, pbc, cutoff: float, index, *, ids, source: str = ""):
    """The radius edges of the structures at ``index`` (rows ``offsets[i]:offsets[i+1]`` of
    ``positions``): ``(senders, receivers, bond, shift, n_edge)`` laid out as a GraphSet's
    (local indices, all bonds 4 = not bonded, float32 image shifts); errors name the frame."""
    senders, receivers, shifts, n_edge = [], [], [], []
    for i in np.asarray(index, np.int64).reshape(-1):
        a = slice(int(offsets[i]), int(offsets[i + 1]))
        s, r, sh = _edges(positions[a], cutoff, cell[i], pbc[i], f"{source}: frame {ids[i]}")
        senders.append(s)
        receivers.append(r)
        shifts.append(sh.astype(np.float32))
        n_edge.append(len(s))
    e = int(sum(n_edge))
    cat = np.concatenate
    return (cat(senders) if e else np.zeros(0, np.int32),
            cat(receivers) if e else np.zeros(0, np.int32), np.full(e, 4, np.int32),
            cat(shifts) if e else np.zeros((0, 3), np.float32), np.asarray(n_edge, np.int32))


@dataclass
class RadiusGraphSet:
    """Atoms of many structures and their edge counts; edges are built per batch.

    Attributes:
        n_node: int32 [G]; n_edge: int32 [G] (counted once with the same builder).
        nodes: ``z`` int8 [N] (int32 in batches), ``positions`` float32 (float64 for x64)
            [N, 3] Å, optional ``forces`` [N, 3].
        cell: float64 [G, 3, 3] Å; pbc: bool [G, 3]; cutoff: Å.
        globals: per-graph arrays [G, ...]; ids: int64 [G]; source: for error messages.
    """

    n_node: np.ndarray
    nodes: dict[str, np.ndarray]
    cell: np.ndarray
    pbc: np.ndarray
    cutoff: float
    globals: dict[str, np.ndarray] = field(default_factory=dict)
    ids: np.ndarray | None = None
    n_edge: np.ndarray | None = None
    source: str = ""

    def __post_init__(self) -> None:
        self.n_node = np.asarray(self.n_node, np.int32)
        g = len(self.n_node)
        self.ids = np.arange(g, dtype=np.int64) if self.ids is None else np.asarray(
            self.ids, np.int64)
        self.node_offsets = np.concatenate([[0], np.cumsum(self.n_node, dtype=np.int64)])
        if self.n_edge is None:
            self.n_edge = np.asarray([len(self._graph_edges(i)[0]) for i in range(g)],
                                     np.int32)

    def __len__(self) -> int:
        return int(self.n_node.shape[0])

    def _graph_edges(self, i: int):
        a = slice(int(self.node_offsets[i]), int(self.node_offsets[i + 1]))
        return _edges(self.nodes["positions"][a], self.cutoff, self.cell[i], self.pbc[i],
                      f"{self.source}: frame {self.ids[i]}")

    def edge_nbytes(self) -> int:
        """Bytes the edges would take stored (senders, receivers, bond int32; shift 3 float32:
        24 per directed edge)."""
        return 24 * int(self.n_edge.sum())

    def nbytes(self) -> int:
        """Bytes held (the arrays, not the Python objects)."""
        arrays = [self.n_node, self.n_edge, self.ids, self.cell, self.pbc,
                  *self.nodes.values(), *self.globals.values()]
        return int(sum(a.nbytes for a in arrays))

    def materialize(self, index) -> GraphSet:
        """The graphs at ``index`` (in that order) with their radius edges, as a GraphSet
        laid out as :meth:`~mpattn.data.frameset.FrameSet.to_graphset` lays it out."""
        from mpattn.data.graphset import _ranges

        index = np.asarray(index, np.int64).reshape(-1)
        senders, receivers, bond, shift, n_edge = build_edges(
            self.nodes["positions"], self.node_offsets, self.cell, self.pbc, self.cutoff, index,
            ids=self.ids, source=self.source)
        changed = np.flatnonzero(n_edge != self.n_edge[index])
        if changed.size:
            i = index[changed[0]]
            raise RuntimeError(f"{self.source}: frame {self.ids[i]}: {n_edge[changed[0]]} edges "
                               f"now, {self.n_edge[i]} when counted (positions changed?)")
        nidx = _ranges(self.node_offsets[index], self.n_node[index])
        nodes = {k: v[nidx] for k, v in self.nodes.items()}
        nodes["z"] = nodes["z"].astype(np.int32)
        nodes["features"] = np.zeros((len(nidx), 0), np.float32)
        return GraphSet(
            n_node=self.n_node[index], n_edge=n_edge, nodes=nodes,
            edges={"bond": bond, "shift": shift}, senders=senders, receivers=receivers,
            globals={k: v[index] for k, v in self.globals.items()}, ids=self.ids[index])

    def maybe_stored(self, max_bytes: int | None = None):
        """A stored :class:`~mpattn.data.graphset.GraphSet` of all graphs if their edges take
        at most ``max_bytes`` (default :data:`STORED_EDGES_MAX_BYTES`), else ``self``: the
        loader gathers stored edges about four times as fast as vesin builds them (the
        throughput of ``python -m benchmarks.frames_memory``), memory decides past that."""
        limit = STORED_EDGES_MAX_BYTES if max_bytes is None else max_bytes
        return self.materialize(np.arange(len(self))) if self.edge_nbytes() <= limit else self
