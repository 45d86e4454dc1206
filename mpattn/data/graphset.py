"""Many molecular graphs stored as concatenated numpy arrays (the loader's input).

A :class:`GraphSet` holds ``G`` graphs with ``N`` nodes and ``E`` edges in total, laid out
graph after graph. ``senders``/``receivers`` are *local* indices (0-based within their own
graph) so that any subset of graphs can be gathered and re-offset cheaply when a batch is
assembled. Node/edge/global fields follow the graph contract of docs/design.md:

- ``nodes``: ``{"z": int32[N], "positions": float32[N, 3], "features": float32[N, F]}``
- ``edges``: ``{"bond": int32[E]}`` (0 single, 1 double, 2 triple, 3 aromatic, 4 not bonded)
- ``globals``: ``{name: float64[G]}`` targets in library units (eV, Å, ...); float64 on the
  host because total energies (QM9 U0 ≈ -11,000 eV) lose meV in float32: subtract references
  before casting for the device.
- ``ids``: int64[G], the dataset's own identifiers (QM9 index for QM9).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["GraphSet"]


@dataclass
class GraphSet:
    """Concatenated storage of many graphs; see the module docstring for the layout."""

    n_node: np.ndarray  # int32[G]
    n_edge: np.ndarray  # int32[G]
    nodes: dict[str, np.ndarray]  # each [N, ...]
    edges: dict[str, np.ndarray]  # each [E, ...]
    senders: np.ndarray  # int32[E], local to its graph
    receivers: np.ndarray  # int32[E], local to its graph
    globals: dict[str, np.ndarray] = field(default_factory=dict)  # each [G, ...]
    ids: np.ndarray | None = None  # int64[G]

    def __post_init__(self) -> None:
        self.n_node = np.asarray(self.n_node, dtype=np.int32)
        self.n_edge = np.asarray(self.n_edge, dtype=np.int32)
        self.senders = np.asarray(self.senders, dtype=np.int32)
        self.receivers = np.asarray(self.receivers, dtype=np.int32)
        g = self.n_node.shape[0]
        if self.ids is None:
            self.ids = np.arange(g, dtype=np.int64)
        n, e = int(self.n_node.sum()), int(self.n_edge.sum())
        for name, arr in self.nodes.items():
            if arr.shape[0] != n:
                raise ValueError(f"nodes[{name!r}] has {arr.shape[0]} rows, n_node sums to {n}")
        for name, arr in self.edges.items():
            if arr.shape[0] != e:
                raise ValueError(f"edges[{name!r}] has {arr.shape[0]} rows, n_edge sums to {e}")
        if self.senders.shape[0] != e or self.receivers.shape[0] != e:
            raise ValueError("senders/receivers length differs from the sum of n_edge")
        for name, arr in self.globals.items():
            if arr.shape[0] != g:
                raise ValueError(f"globals[{name!r}] has {arr.shape[0]} rows for {g} graphs")
        self.node_offsets = np.concatenate([[0], np.cumsum(self.n_node, dtype=np.int64)])
        self.edge_offsets = np.concatenate([[0], np.cumsum(self.n_edge, dtype=np.int64)])

    def __len__(self) -> int:
        return int(self.n_node.shape[0])

    def subset(self, index: np.ndarray) -> GraphSet:
        """The graphs at ``index`` (in that order) as a new GraphSet."""
        index = np.asarray(index, dtype=np.int64)
        nidx = _ranges(self.node_offsets[index], self.n_node[index])
        eidx = _ranges(self.edge_offsets[index], self.n_edge[index])
        return GraphSet(
            n_node=self.n_node[index],
            n_edge=self.n_edge[index],
            nodes={k: v[nidx] for k, v in self.nodes.items()},
            edges={k: v[eidx] for k, v in self.edges.items()},
            senders=self.senders[eidx],
            receivers=self.receivers[eidx],
            globals={k: v[index] for k, v in self.globals.items()},
            ids=self.ids[index],
        )

    def graph(self, i: int):
        """Graph ``i`` alone as a ``jraph.GraphsTuple`` of numpy arrays (global indices)."""
        import jraph

        s = self.subset(np.array([i]))
        return jraph.GraphsTuple(
            nodes=s.nodes,
            edges=s.edges,
            senders=s.senders,
            receivers=s.receivers,
            n_node=s.n_node,
            n_edge=s.n_edge,
            globals=s.globals,
        )


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, s + l)`` for each (s, l), vectorised."""
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    ends = np.cumsum(lengths)
    out = np.ones(total, dtype=np.int64)
    out[0] = starts[0] if len(starts) else 0
    nz = lengths > 0
    s, l, e = np.asarray(starts, dtype=np.int64)[nz], lengths[nz], ends[nz]
    # at each segment start, jump from the previous segment's last value to this start
    out[0] = s[0]
    if len(s) > 1:
        out[e[:-1]] = s[1:] - (s[:-1] + l[:-1] - 1)
    return np.cumsum(out)
