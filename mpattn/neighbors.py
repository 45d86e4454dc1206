"""Radius neighbour graphs of single structures, padded to budgets that grow with headroom.

MD and relaxations evaluate a potential on one structure per step. Their graph changes size
from step to step (atoms move in and out of each other's cutoff), but a jit-compiled function
compiles once per *shape*. :class:`BudgetPolicy` pads every step to one static
:class:`~mpattn.graph.Budget` with headroom (nodes ``n + 1`` rounded up to a multiple of 8,
edges ``1.25 E`` rounded up to a multiple of 32, 2 graphs); only when a step overflows it is
the budget grown (by 1.5, or more if needed), which costs exactly one recompilation. Growths
are counted and each is logged once (Python ``logging``, logger ``"mpattn"``, level INFO).

:func:`neighbor_graph` builds the graph with :func:`radius_edges` (vesin's
neighbour list; periodic cells with image shifts, several images when the cell is smaller than
twice the cutoff) in exactly the layout of :meth:`mpattn.data.frames.FrameSet.to_graphset`
padded by :func:`mpattn.graph.pad_batch`, so a potential sees in MD what it saw in training:
``nodes`` ``z`` int32[N], ``positions`` [N, 3], ``features`` float32[N, 0]; ``edges``
``bond`` int32[E] (all 4, not bonded) and ``shift`` [E, 3] Å (the edge vector is
``positions[s] - positions[r] + shift``; zeros for molecules); ``globals``
``cell`` [G, 3, 3] Å (zeros for molecules: the volume of a stress).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import jraph
import numpy as np

from mpattn.graph import Budget, edge_pairs, round_up

__all__ = ["BudgetPolicy", "dense_radius_graph", "neighbor_graph", "pad_structure",
           "radius_edges", "structure_arrays"]

logger = logging.getLogger("mpattn")


@dataclass
class BudgetPolicy:
    """Padding budgets with headroom for a stream of single structures (MD, relaxations).

    Stateful: holds the current :attr:`budget` and the number of :attr:`growths`. One policy
    per compiled function (a calculator owns one).

    Attributes:
        node_multiple: the node budget is ``n + 1`` (one jraph padding node) rounded up to
            a multiple of this.
        edge_factor: headroom on edges: the edge budget is ``edge_factor * E`` ...
        edge_multiple: ... rounded up to a multiple of this (at least one multiple).
        growth: factor by which an overflowing dimension grows (at least to what the
            overflowing structure needs with headroom).
        n_graph: graphs per batch (one structure plus jraph's padding graph).
        budget: the current budget (``None`` before the first structure).
        growths: how many times the budget grew (each growth recompiles once).
    """

    node_multiple: int = 8
    edge_factor: float = 1.25
    edge_multiple: int = 32
    growth: float = 1.5
    n_graph: int = 2
    budget: Budget | None = None
    growths: int = field(default=0)

    def __post_init__(self) -> None:
        if self.node_multiple < 1 or self.edge_multiple < 1 or self.edge_factor < 1 \
                or self.growth <= 1 or self.n_graph < 2:
            raise ValueError(f"invalid BudgetPolicy: need node_multiple, edge_multiple >= 1, "
                             f"edge_factor >= 1, growth > 1 and n_graph >= 2; got {self}")

    def initial(self, n_node: int, n_edge: int) -> Budget:
        """The budget with headroom for one structure of ``n_node`` atoms and ``n_edge`` edges."""
        nodes = round_up(n_node + 1, self.node_multiple)
        edges = max(round_up(math.ceil(self.edge_factor * n_edge), self.edge_multiple),
                    self.edge_multiple)
        return Budget(nodes, edges, self.n_graph)

    def fit(self, n_node: int, n_edge: int) -> Budget:
        """The budget for a structure: the current one if it fits, else a new or grown one.

        A grown dimension becomes ``max(growth * old, what the structure needs with
        headroom)``; a dimension that still fits keeps its size. Each growth increments
        :attr:`growths` and logs one INFO line on the ``"mpattn"`` logger.
        """
        need = self.initial(n_node, n_edge)
        old = self.budget
        if old is None:
            self.budget = need
            return need
        if old.fits(n_node, n_edge, 1):
            return old
        nodes, edges = old.n_node, old.n_edge
        if n_node >= old.n_node:
            nodes = max(round_up(math.ceil(self.growth * old.n_node), self.node_multiple),
                        need.n_node)
        if n_edge > old.n_edge:
            edges = max(round_up(math.ceil(self.growth * old.n_edge), self.edge_multiple),
                        need.n_edge)
        self.budget = Budget(nodes, edges, self.n_graph)
        self.growths += 1
        logger.info("neighbour-list budget grown from (%d nodes, %d edges) to (%d nodes, "
                    "%d edges) for a structure of %d atoms and %d edges (growth %d; the "
                    "energy function recompiles once)", old.n_node, old.n_edge, nodes, edges,
                    n_node, n_edge, self.growths)
        return self.budget


def structure_arrays(system):
    """``(z int32[n], positions float64[n, 3], cell float64[3, 3] | None, pbc | None)``.

    Args:
        system: an ``ase.Atoms`` or a tuple ``(z, positions)`` or
            ``(z, positions, cell, pbc)``. Cell and pbc are ``None`` unless some direction
            is periodic (a molecule in a box is a molecule).
    """
    if hasattr(system, "get_atomic_numbers"):
        z, pos = system.get_atomic_numbers(), system.get_positions()
        cell, pbc = np.asarray(system.get_cell()), system.get_pbc()
    else:
        if len(system) not in (2, 4):
            raise ValueError(f"expected ase.Atoms, (z, positions) or (z, positions, cell, pbc),"
                             f" got a sequence of {len(system)}")
        z, pos = system[0], system[1]
        cell, pbc = (system[2], system[3]) if len(system) == 4 else (None, None)
    z = np.asarray(z, np.int32).reshape(-1)
    pos = np.asarray(pos, np.float64)
    if pos.shape != (len(z), 3):
        raise ValueError(f"{len(z)} atomic numbers for positions of shape {pos.shape}")
    if pbc is None or not np.any(pbc):
        return z, pos, None, None
    return z, pos, np.asarray(cell, np.float64).reshape(3, 3), np.broadcast_to(
        np.asarray(pbc, bool), (3,))


def pad_structure(z, positions, senders, receivers, shift, budget: Budget, *,
                  dtype=np.float32, pair=None) -> jraph.GraphsTuple:
    """One structure padded to ``budget`` as :func:`mpattn.graph.pad_batch` pads a batch.

    Padded rows are zero (``z = 0``, ``bond = 0``), padding edges point at the first
    padding node, the padding graph holds them all; positions and shifts are cast to
    ``dtype``. Symmetric edge lists (every radius graph) get ``edges["pair"]``: ``pair``
    (int[e], the unordered pair of each real edge) where the caller knows it, else
    :func:`mpattn.graph.edge_pairs` finds it.
    """
    n, e = len(z), len(senders)
    if not budget.fits(n, e, 1):
        raise ValueError(f"a structure of {n} atoms and {e} edges does not fit {budget}")
    nb, eb = budget.n_node, budget.n_edge
    zz = np.zeros(nb, np.int32)
    zz[:n] = z
    pos = np.zeros((nb, 3), dtype)
    pos[:n] = positions
    sh = np.zeros((eb, 3), dtype)
    sh[:e] = shift
    snd = np.full(eb, n, np.int32)
    rcv = np.full(eb, n, np.int32)
    snd[:e] = senders
    rcv[:e] = receivers
    n_node = np.zeros(budget.n_graph, np.int32)
    n_edge = np.zeros(budget.n_graph, np.int32)
    n_node[:2] = n, nb - n
    n_edge[:2] = e, eb - e
    bond = np.zeros(eb, np.int32)
    bond[:e] = 4  # not bonded; padded rows are zero, as pad_batch leaves them
    edges = {"bond": bond, "shift": sh}
    if pair is None:
        pair = edge_pairs(senders, receivers, shift, num_edges=eb)
    else:
        pair = np.concatenate([np.asarray(pair, np.int32).reshape(e),
                               e // 2 + np.arange(eb - e, dtype=np.int32) // 2])
    if pair is not None:
        edges["pair"] = pair
    return jraph.GraphsTuple(
        nodes={"z": zz, "positions": pos, "features": np.zeros((nb, 0), np.float32)},
        edges=edges,
        senders=snd, receivers=rcv, n_node=n_node, n_edge=n_edge, globals={})


def radius_edges(positions, cutoff: float, cell=None, pbc=None, *,
                 order: str = "receivers"):
    """Directed edges between every pair (and periodic image) closer than ``cutoff`` Å, both
    directions, from vesin's neighbour list: the library's one radius-graph builder.

    For periodic cells an edge may connect periodic images; its Cartesian image shift is
    returned so that the edge vector is ``positions[s] - positions[r] + shift``.

    Args:
        positions: float [n, 3] Å.
        cutoff: radius in Å.
        cell, pbc: the cell [3, 3] and periodicity [3] (all or none periodic).
        order: ``"receivers"``: vesin's full list sorted by receiver, then sender (the layout
            of the training graphs); ``"pairs"``: from its half list, edges ``2k`` and
            ``2k + 1`` are one pair's two directions, so the unordered pair of edge ``e`` is
            ``e // 2`` without any matching.

    Returns:
        senders int32 [E], receivers int32 [E], shift float64 [E, 3] (zeros without pbc).
    """
    from vesin import NeighborList

    if order not in ("receivers", "pairs"):
        raise ValueError(f"order must be 'receivers' or 'pairs', got {order!r}")
    periodic = pbc is not None and bool(np.any(pbc))
    if periodic and not np.all(pbc):
        raise ValueError("radius_edges: mixed periodicity is not supported; use pbc all or none")
    box = np.asarray(cell, np.float64).reshape(3, 3) if periodic else np.zeros((3, 3))
    nl = NeighborList(cutoff=float(cutoff), full_list=order == "receivers")
    i, j, images = nl.compute(points=np.asarray(positions, np.float64), box=box,
                              periodic=periodic, quantities="ijS")
    # vesin's pair (i, j) has vector pos[j] - pos[i] + S @ box: j sends to receiver i
    by = np.lexsort((j, i))
    i, j = i[by].astype(np.int32), j[by].astype(np.int32)
    shift = images[by] @ box if periodic else np.zeros((len(i), 3))
    if order == "receivers":  # the full list: both directions already, by receiver
        return j, i, shift
    # the half list: i sends to j with the opposite shift
    s, r = np.empty(2 * len(i), np.int32), np.empty(2 * len(i), np.int32)
    sh = np.empty((2 * len(i), 3), np.float64)
    s[0::2], r[0::2], sh[0::2] = j, i, shift
    s[1::2], r[1::2], sh[1::2] = i, j, -shift
    return s, r, sh


def neighbor_graph(system, cutoff: float, budget: Budget | None = None, *,
                   policy: BudgetPolicy | None = None, dtype=np.float32
                   ) -> tuple[jraph.GraphsTuple, Budget]:
    """The padded radius graph of one structure, and the budget it was padded to.

    Args:
        system: ``ase.Atoms``, ``(z, positions)`` or ``(z, positions, cell, pbc)``.
        cutoff: radius in Å; edges join every ordered pair (and periodic image) closer than
            it.
        budget: pad to this budget if the structure fits; if it does not (or is ``None``)
            the budget comes from ``policy``.
        policy: a :class:`BudgetPolicy` (stateful: it keeps and grows its budget); default a
            fresh one, i.e. the budget with headroom for this structure.
        dtype: of positions and shifts (float32, or float64 with ``jax_enable_x64``).

    Returns:
        ``(graph, budget)``: a ``jraph.GraphsTuple`` of numpy arrays with one real graph and
        the padding graph(s) (layout: the module docstring, but ``globals`` holds ``"cell"``
        [budget.n_graph, 3, 3] in ``dtype``: the structure's cell in row 0, zeros for a
        molecule and for the padding graphs, whence
        :func:`mpattn.potential.energy_forces_stress` takes the volume) and the
        :class:`Budget` used.

    Raises:
        ValueError: for a mixed-periodicity cell, or inconsistent arrays.
    """
    if not cutoff > 0:
        raise ValueError(f"cutoff must be positive, got {cutoff}")
    z, pos, cell, pbc = structure_arrays(system)
    s, r, shift = radius_edges(pos, cutoff, cell, pbc, order="pairs")
    if budget is None or not budget.fits(len(z), len(s), 1):
        budget = (policy or BudgetPolicy()).fit(len(z), len(s))
    pair = np.arange(len(s), dtype=np.int32) // 2  # "pairs" lists each pair's edges together
    graph = pad_structure(z, pos, s, r, shift, budget, dtype=dtype, pair=pair)
    cells = np.zeros((budget.n_graph, 3, 3), dtype)
    if cell is not None:
        cells[0] = cell
    return graph._replace(globals={"cell": cells}), budget


def dense_radius_graph(z, positions, cell, cutoff: float):
    """The radius graph of up to ``n`` atoms built inside JAX (jit-able, vmap-able): no host
    code, O(n²) pairs. Used where a whole step must stay on the device (the exported
    potential, batched relaxation of many small structures).

    Every unordered pair of the ``n`` slots is a candidate; it is real iff both atoms are
    real (``z > 0``; padding atoms must come after the real ones) and their distance (minimum
    image if ``cell`` has nonzero volume) is below ``cutoff``. Real edges are moved first by a
    stable argsort, each pair's two directions adjacent, so the layout is
    :func:`pad_structure`'s (padding edges point at the padding node ``n``, ``edges["pair"]``
    holds, the masks come from ``n_node``/``n_edge``).

    Args:
        z: int32 [n] atomic numbers, 0 for absent atoms (after the real ones).
        positions: [n, 3] Å.
        cell: [3, 3] Å (rows the lattice vectors); zeros for a molecule.
        cutoff: radius in Å (a Python float).

    Returns:
        ``(graph, ok_cell)``: the padded ``jraph.GraphsTuple`` (``n + 1`` nodes, two graphs,
        ``globals["cell"]``), and whether the cell allows minimum image (the cutoff below
        half its smallest perpendicular width; always true for a molecule).
    """
    import jax
    import jax.numpy as jnp

    n = z.shape[0]
    a, b = np.triu_indices(n, k=1)  # unordered pairs; edges 2k (b -> a) and 2k + 1 (a -> b)
    senders = np.stack([b, a], 1).reshape(-1).astype(np.int32)
    receivers = np.stack([a, b], 1).reshape(-1).astype(np.int32)
    num_edges = len(senders)
    real = z > 0
    n_real = jnp.sum(real.astype(jnp.int32))
    pos = jnp.where(real[:, None], positions, 0)
    periodic = jnp.abs(jnp.linalg.det(cell)) > 0
    inv = jnp.linalg.inv(jnp.where(periodic, cell, jnp.eye(3, dtype=cell.dtype)))
    heights = 1.0 / jnp.linalg.norm(inv, axis=0)
    ok_cell = ~periodic | (cutoff < 0.5 * jnp.min(heights))
    d = pos[b] - pos[a]  # the edge vector of b -> a, before its image shift
    image = jnp.where(periodic, -jnp.round(d @ inv), 0)
    shift = jax.lax.stop_gradient(image @ cell)
    dist = jnp.linalg.norm(d + shift, axis=-1)
    edge_real = jnp.repeat(real[a] & real[b] & (dist < cutoff), 2)
    shift = jnp.stack([shift, -shift], 1).reshape(num_edges, 3)
    order = jnp.argsort(~edge_real, stable=True)  # real edges first, pairs adjacent
    keep = edge_real[order]
    n_edge = jnp.sum(edge_real.astype(jnp.int32))
    graph = jraph.GraphsTuple(
        nodes={"z": jnp.concatenate([jnp.where(real, z, 0), jnp.zeros(1, jnp.int32)]),
               "positions": jnp.concatenate([pos, jnp.zeros((1, 3), pos.dtype)]),
               "features": jnp.zeros((n + 1, 0), jnp.float32)},
        edges={"bond": jnp.where(keep, 4, 0).astype(jnp.int32),
               "shift": jnp.where(keep[:, None], shift[order], 0),
               "pair": jnp.asarray(np.arange(num_edges, dtype=np.int32) // 2)},
        senders=jnp.where(keep, jnp.asarray(senders)[order], n),
        receivers=jnp.where(keep, jnp.asarray(receivers)[order], n),
        n_node=jnp.stack([n_real, n + 1 - n_real]).astype(jnp.int32),
        n_edge=jnp.stack([n_edge, num_edges - n_edge]).astype(jnp.int32),
        globals={"cell": jnp.stack([cell, jnp.zeros_like(cell)])})
    return graph, ok_cell
