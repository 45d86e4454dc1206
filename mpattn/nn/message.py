"""Message functions: Gilmer's edge network (NNConv) and SchNet's continuous-filter convolution.

Edge network (Gilmer et al., "Neural Message Passing for Quantum Chemistry", ICML 2017):
``m_v = AGG_{w in N(v)} A(e_vw) h_w`` with ``A(e)`` a d x d matrix computed by an MLP from the
edge features ``e_vw`` (one-hot bond category ⊕ radial basis of the distance). The MLP is
written ``u_e = relu(W e + b) ∈ R^K`` followed by a Linear ``K -> d*d`` whose kernel and bias
are reshaped to ``M [K, d, d]`` and ``B [d, d]``: ``A(e) = Σ_k u_e[k] M_k + B``. Matrices act on
row vectors, ``message = h_w @ A(e)`` (``M[k, i, o]``: input feature ``i``, output ``o``), the
transpose of the paper's column-vector notation.

Two exact layouts of the same function:

- :func:`edge_network_plain` materialises ``A`` per edge ([E, d, d]): the reference.
- :func:`edge_network_dense` never forms ``A``: per molecule it scatters ``u`` into a dense
  ``[G, n_max, n_max, K]`` tensor and contracts it with the node states by batched matmuls,
  either summing first (``S_v = Σ_w u_vw ⊗ h_w``, then ``m_v = S_v.reshape(K d) @
  M.reshape(K d, d)``) or projecting first (``P_w = h_w M_k`` for all k, then
  ``m_v = Σ_{w,k} u_vw[k] P_w[k]``); the B-term ``(Σ_w h_w) @ B`` is added from a flat
  segment sum. It is the default of :class:`EdgeNetwork`.

``benchmarks/edge_network.py`` times the three: the dense project-first layout is the
fastest on a CPU and on a GPU, the plain one several times slower (docs/results.md).

Continuous-filter convolution (Schütt et al., "SchNet: A continuous-filter convolutional
neural network for modeling quantum interactions", NeurIPS 2017): ``x'_v = Σ_w x_w ⊙ W(r_vw)``
(:func:`cfconv`, :class:`CFConv`) and SchNet's :class:`Interaction` block.

Edges run ``senders -> receivers``: the message of edge ``e`` is computed from
``h[senders[e]]`` and aggregated at ``receivers[e]``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from mpattn.nn.radial import cosine_cutoff, gaussian_basis
from mpattn.ops import graph_index, segment_count, segment_max, segment_sum

__all__ = [
    "CFConv",
    "EdgeNetwork",
    "Interaction",
    "cfconv",
    "dense_layout",
    "edge_network_dense",
    "edge_network_plain",
    "shifted_softplus",
]

AGGREGATIONS = ("sum", "mean")
ORDERS = ("sum_first", "project_first")


def shifted_softplus(x: Float[Array, "*shape"]) -> Float[Array, "*shape"]:
    """SchNet's ``ssp(x) = softplus(x) - log 2`` (so that ``ssp(0) = 0``)."""
    return jax.nn.softplus(x) - math.log(2.0)


def _check_aggregation(aggregation: str) -> None:
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")


def _mean_divisor(receivers, num_segments, edge_mask, dtype):
    count = segment_count(receivers, num_segments=num_segments, mask=edge_mask, dtype=dtype)
    return jnp.maximum(count, 1)[:, None]


def edge_network_plain(h: Float[Array, "num_nodes features"], u: Float[Array, "num_edges K"],
                       M: Float[Array, "K features features"], B: Float[Array, "features features"],
                       *, senders: Int[Array, " num_edges"], receivers: Int[Array, " num_edges"],
                       num_segments: int, aggregation: str = "sum",
                       edge_mask: Bool[Array, " num_edges"] | None = None
                       ) -> Float[Array, "num_nodes features"]:
    """Edge-network messages with ``A`` materialised per edge (the reference layout).

    ``A_e = Σ_k u[e, k] M[k] + B`` ([E, d, d]), ``msg_e = h[senders[e]] @ A_e``, aggregated at
    ``receivers``. Memory and time grow as ``E d² K``: use :func:`edge_network_dense` for speed.

    Args:
        h: [N, d] node states.
        u: [E, K] hidden units of the edge network.
        M: [K, d, d] final-layer kernel reshaped (``M[k, i, o]``).
        B: [d, d] final-layer bias reshaped.
        senders: int [E].
        receivers: int [E].
        num_segments: Static number of nodes N.
        aggregation: ``"sum"`` or ``"mean"`` (mean over the node's unmasked incoming edges;
            0 for a node without any).
        edge_mask: Optional bool [E]; False edges send nothing (and do not count for the mean).

    Returns:
        [N, d] aggregated messages ``m``.

    Reference: Gilmer et al., ICML 2017, section 5.1 ("edge network").
    """
    _check_aggregation(aggregation)
    A = jnp.einsum("ek,kio->eio", u, M) + B
    msg = jnp.einsum("ei,eio->eo", h[senders], A)
    if edge_mask is not None:
        msg = jnp.where(edge_mask[:, None], msg, 0)
    out = segment_sum(msg, receivers, num_segments=num_segments)
    if aggregation == "mean":
        out = out / _mean_divisor(receivers, num_segments, edge_mask, out.dtype)
    return out


def dense_layout(n_node: Int[Array, " num_graphs"], num_nodes: int, max_nodes: int
                 ) -> tuple[Int[Array, " num_nodes"], Int[Array, " num_nodes"]]:
    """Position of every node in a per-molecule dense layout ``[num_graphs, max_nodes]``.

    Static shapes only (``num_nodes`` from an array shape), so it runs under ``jax.jit``.

    Args:
        n_node: int [G] nodes per graph.
        num_nodes: Static total number of nodes N.
        max_nodes: Static size of the dense per-graph axis.

    Returns:
        ``(node_graph, node_slot)``, int32 [N] each: the graph of each node and its index within
        that graph, except that a node whose index is ``>= max_nodes`` gets ``max_nodes`` (one
        past the end: it lies outside the dense tensor and dense scatters drop it). With jraph
        padding this is the case for the padding graph's surplus padding nodes.
    """
    n_node = jnp.asarray(n_node, dtype=jnp.int32)
    node_graph = graph_index(n_node, num_nodes)
    first = jnp.cumsum(n_node) - n_node
    slot = jnp.arange(num_nodes, dtype=jnp.int32) - first[node_graph]
    return node_graph, jnp.minimum(slot, max_nodes).astype(jnp.int32)


def edge_network_dense(h: Float[Array, "num_nodes features"], u: Float[Array, "num_edges K"],
                       M: Float[Array, "K features features"], B: Float[Array, "features features"],
                       *, senders: Int[Array, " num_edges"], receivers: Int[Array, " num_edges"],
                       node_graph: Int[Array, " num_nodes"], node_slot: Int[Array, " num_nodes"],
                       num_graphs: int, max_nodes: int, aggregation: str = "sum",
                       edge_mask: Bool[Array, " num_edges"] | None = None,
                       order: str = "project_first") -> Float[Array, "num_nodes features"]:
    """Edge-network messages via per-molecule dense batched matmuls (never forms ``A``).

    With ``G = num_graphs`` and ``n = max_nodes``: ``U[g, v, w, :] = Σ u_e`` over the edges
    ``w -> v`` of graph ``g`` ([G, n, n, K], zero where no edge) and ``H[g, w] = h_w``
    ([G, n, d]). ``order="sum_first"``: ``S = einsum('gvwk,gwd->gvkd', U, H)`` and
    ``m = S.reshape(G, n, K d) @ M.reshape(K d, d)``;
    ``order="project_first"``: ``P = einsum('gwi,kio->gwko', H, M)`` and
    ``m = U.reshape(G, n, n K) @ P.reshape(G, n K, d)`` (faster on CPU and GPU). Then
    ``+ (Σ_w h_w) @ B`` (a flat segment sum), scattered back to [N, d]. Equal to
    :func:`edge_network_plain` up to rounding.

    Nodes outside the dense tensor (``node_slot >= max_nodes``) receive 0, which is right for
    nodes without incoming or outgoing edges such as jraph's surplus padding nodes (all padding
    edges sit on the first padding node, slot 0). If an unmasked edge touches such a node the
    result would be silently wrong, so its receiver's output is set to NaN instead: make
    ``max_nodes`` at least the largest real graph.

    Args:
        h: [N, d] node states.
        u: [E, K] hidden units of the edge network.
        M: [K, d, d] final-layer kernel reshaped (``M[k, i, o]``).
        B: [d, d] final-layer bias reshaped.
        senders: int [E].
        receivers: int [E].
        node_graph: int [N] graph of each node (:func:`dense_layout`).
        node_slot: int [N] index of each node within its graph (:func:`dense_layout`).
        num_graphs: Static number of graphs G.
        max_nodes: Static size of the per-graph dense axis.
        aggregation: ``"sum"`` or ``"mean"``.
        edge_mask: Optional bool [E]; False edges send nothing (and do not count for the mean).
        order: ``"project_first"`` (default) or ``"sum_first"`` (same result, different speed).

    Returns:
        [N, d] aggregated messages ``m``.

    Reference: Gilmer et al., ICML 2017, section 5.1; the layout is ours (see module docstring).
    """
    _check_aggregation(aggregation)
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    n, d = h.shape
    K = u.shape[-1]
    dtype = jnp.result_type(h, u, M, B)
    g_e, v_e, w_e = node_graph[receivers], node_slot[receivers], node_slot[senders]
    if edge_mask is not None:  # masked edges are routed out of range and dropped
        v_e = jnp.where(edge_mask, v_e, max_nodes)
    U = jnp.zeros((num_graphs, max_nodes, max_nodes, K), dtype)
    U = U.at[g_e, v_e, w_e].add(u.astype(dtype), mode="drop")
    H = jnp.zeros((num_graphs, max_nodes, d), dtype)
    H = H.at[node_graph, node_slot].set(h.astype(dtype), mode="drop")
    M = M.astype(dtype)
    if order == "sum_first":
        S = jnp.einsum("gvwk,gwd->gvkd", U, H)
        m = S.reshape(num_graphs, max_nodes, K * d) @ M.reshape(K * d, d)
    else:
        P = H.reshape(num_graphs * max_nodes, d) @ M.transpose(1, 0, 2).reshape(d, K * d)
        m = (U.reshape(num_graphs, max_nodes, max_nodes * K)
             @ P.reshape(num_graphs, max_nodes * K, d))
    out = m.at[node_graph, node_slot].get(mode="fill", fill_value=0)

    hw = h[senders] if edge_mask is None else jnp.where(edge_mask[:, None], h[senders], 0)
    out = out + segment_sum(hw, receivers, num_segments=n).astype(dtype) @ B.astype(dtype)
    if aggregation == "mean":
        out = out / _mean_divisor(receivers, n, edge_mask, dtype)
    # An unmasked edge with an endpoint outside the dense tensor lost its message: poison.
    lost = (node_slot[senders] >= max_nodes) | (node_slot[receivers] >= max_nodes)
    if edge_mask is not None:
        lost = lost & edge_mask
    bad = segment_max(lost.astype(jnp.int32), receivers, num_segments=n) > 0
    return jnp.where(bad[:, None], jnp.nan, out)


def _needed_max_nodes(n_node, senders, receivers, edge_mask) -> int:
    """Smallest dense size that holds every node touched by an unmasked edge (eager only)."""
    try:
        n_node, senders, receivers = (np.asarray(a) for a in (n_node, senders, receivers))
        mask = None if edge_mask is None else np.asarray(edge_mask)
    except jax.errors.TracerArrayConversionError:
        raise ValueError(
            "EdgeNetwork(layout='dense') needs a static max_nodes under jax.jit (the most "
            "atoms of one molecule, e.g. 29 for QM9); pass max_nodes=... or layout='plain'"
        ) from None
    first = np.cumsum(n_node) - n_node
    slot = np.arange(int(n_node.sum())) - np.repeat(first, n_node)
    touched = np.concatenate([senders, receivers] if mask is None
                             else [senders[mask], receivers[mask]])
    return int(slot[touched].max()) + 1 if touched.size else 1


class EdgeNetwork(nnx.Module):
    """Gilmer's edge-network message function (NNConv) as an NNX module.

    Edge features ``e = one_hot(bond, num_bond_types) ⊕ gaussian_basis(distance, num_rbf,
    cutoff)`` (the Gaussians are not cut off: QM9's complete graphs have pairs beyond
    ``cutoff``, which keep their bond category), ``u = relu(Linear(e)) ∈ R^hidden`` and
    ``A(e) = Σ_k u_k M_k + B``; ``m_v = AGG_w h_w @ A(e_vw)``. The same module is meant to be
    reused across message-passing steps (Gilmer ties the weights).

    Initialisation: ``B = 0`` and ``M ~ N(0, s² / (hidden * dim))``: LeCun over the ``K d``
    inputs of the dense layout (the final Linear's LeCun scale divided by ``sqrt(d)``) times
    ``s = 1`` for mean and ``s = 1/4`` for sum aggregation (a QM9 molecule's complete graph has
    about 17 neighbours per atom, and the messages of one molecule are strongly correlated).
    Measured on QM9 complete graphs (d = 64): three residual steps ``h <- h + m`` grow the
    node-state std ×1.8 with sum (×16 with ``s = 1``) and ×1.2 with mean.

    Args:
        dim: Node state width ``d``.
        hidden: Hidden units ``K`` of the edge MLP (Gilmer et al. and the MH-MP thesis: 128).
        num_bond_types: Bond categories (5: single, double, triple, aromatic, not bonded).
        num_rbf: Gaussians of the distance basis.
        cutoff: Last Gaussian centre (Å).
        aggregation: ``"sum"`` (Gilmer) or ``"mean"``.
        layout: ``"dense"`` (:func:`edge_network_dense`, default, faster) or ``"plain"``.
        order: Contraction order of the dense layout, ``"project_first"`` (default, faster
            on CPU and GPU) or ``"sum_first"``.
        max_nodes: Static size of the dense per-molecule axis, at least the most atoms of one
            molecule (29 for QM9). Required under ``jax.jit`` with the dense layout; eagerly,
            ``None`` takes the smallest size that holds every node touched by an edge.
        param_dtype: dtype of the parameters.
        rngs: Parameter initialisation.
    """

    def __init__(self, dim: int, *, hidden: int = 128, num_bond_types: int = 5,
                 num_rbf: int = 16, cutoff: float = 5.0, aggregation: str = "sum",
                 layout: str = "dense", max_nodes: int | None = None,
                 order: str = "project_first",
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        _check_aggregation(aggregation)
        if layout not in ("dense", "plain"):
            raise ValueError(f"layout must be 'dense' or 'plain', got {layout!r}")
        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
        if max_nodes is not None and max_nodes < 1:
            raise ValueError(f"max_nodes must be >= 1, got {max_nodes}")
        self.dim, self.hidden = int(dim), int(hidden)
        self.num_bond_types, self.num_rbf, self.cutoff = num_bond_types, num_rbf, float(cutoff)
        self.aggregation, self.layout, self.max_nodes = aggregation, layout, max_nodes
        self.order = order
        self.edge_mlp = nnx.Linear(num_bond_types + num_rbf, hidden, param_dtype=param_dtype,
                                   rngs=rngs)
        scale = 0.25 if aggregation == "sum" else 1.0
        init = jax.nn.initializers.normal(scale / math.sqrt(hidden * dim))
        self.M = nnx.Param(init(rngs.params(), (hidden, dim, dim), param_dtype))
        self.B = nnx.Param(jnp.zeros((dim, dim), param_dtype))

    def hidden_units(self, bond: Int[Array, " num_edges"], distances: Float[Array, " num_edges"]
                     ) -> Float[Array, "num_edges K"]:
        """``u = relu(Linear(one_hot(bond) ⊕ rbf(distance)))``: [E, hidden]."""
        rbf = gaussian_basis(distances, num=self.num_rbf, cutoff=self.cutoff)
        e = jnp.concatenate([jax.nn.one_hot(bond, self.num_bond_types, dtype=rbf.dtype), rbf],
                            axis=-1)
        return jax.nn.relu(self.edge_mlp(e))

    def __call__(self, h: Float[Array, "num_nodes features"], *,
                 senders: Int[Array, " num_edges"], receivers: Int[Array, " num_edges"],
                 bond: Int[Array, " num_edges"], distances: Float[Array, " num_edges"],
                 n_node: Int[Array, " num_graphs"] | None = None,
                 edge_mask: Bool[Array, " num_edges"] | None = None
                 ) -> Float[Array, "num_nodes features"]:
        """Aggregated messages ``m`` [N, dim] (``n_node`` is needed by the dense layout)."""
        u = self.hidden_units(bond, distances)
        M, B = self.M[...], self.B[...]
        if self.layout == "plain":
            return edge_network_plain(h, u, M, B, senders=senders, receivers=receivers,
                                      num_segments=h.shape[0], aggregation=self.aggregation,
                                      edge_mask=edge_mask)
        if n_node is None:
            raise ValueError("EdgeNetwork(layout='dense') needs n_node (graph.n_node)")
        max_nodes = self.max_nodes
        if max_nodes is None:
            max_nodes = _needed_max_nodes(n_node, senders, receivers, edge_mask)
        node_graph, node_slot = dense_layout(n_node, h.shape[0], max_nodes)
        return edge_network_dense(h, u, M, B, senders=senders, receivers=receivers,
                                  node_graph=node_graph, node_slot=node_slot,
                                  num_graphs=n_node.shape[0], max_nodes=max_nodes,
                                  aggregation=self.aggregation, edge_mask=edge_mask,
                                  order=self.order)


def cfconv(x: Float[Array, "num_nodes features"], W: Float[Array, "rows features"], *,
           senders: Int[Array, " num_edges"], receivers: Int[Array, " num_edges"],
           num_segments: int, pair: Int[Array, " num_edges"] | None = None
           ) -> Float[Array, "num_nodes features"]:
    """Continuous-filter convolution ``x'_v = Σ_{edges w->v} x_w ⊙ W_vw``.

    Args:
        x: [N, F] node features.
        W: [E, F] filter values per edge, or with ``pair`` [P, F] per unordered pair (zero
            beyond the cutoff when made by :class:`CFConv`).
        senders: int [E].
        receivers: int [E].
        num_segments: Static number of nodes N.
        pair: int [E] pair slot of each edge (``edges["pair"]``): the edge's filter is
            ``W[pair]`` (a filter of the distance is the same both ways).

    Returns:
        [N, F].

    Reference: Schütt et al., NeurIPS 2017, eq. 2 (interatomic form).
    """
    if pair is not None:
        W = W[pair]
    return segment_sum(x[senders] * W, receivers, num_segments=num_segments)


class CFConv(nnx.Module):
    """SchNet's continuous-filter convolution with its filter-generating network.

    ``W(r) = Dense(F -> dim)(ssp(Dense(num_rbf -> F)(g(r)))) * cosine_cutoff(r)`` with ``g`` the
    Gaussian basis on ``[0, cutoff]`` (:func:`~mpattn.nn.radial.gaussian_basis`, width = spacing)
    and ``ssp`` the shifted softplus; then :func:`cfconv`. Pairs at or beyond the cutoff get a
    filter of exactly 0, so moving a far atom changes nothing. This is SchNetPack's filter network
    (the NeurIPS paper also applies ssp after the second Dense).

    Published settings: the SchNet paper uses ``dim = F = 64`` and Gaussians every 0.1 Å
    (``γ = 10 Å⁻²``) up to 30 Å; SchNetPack's QM9 defaults are ``dim = F = 128``, 20-25
    Gaussians on [0, 5] Å (about 5 per Å) and a 5 Å cosine cutoff. We suggest ``dim = F = 128``,
    ``num_rbf = 25``, ``cutoff = 5.0``.

    Args:
        dim: Width of the convolved features ``x`` (and of the filters).
        num_filters: Hidden width ``F`` of the filter network.
        num_rbf: Number of Gaussians.
        cutoff: Cutoff radius (Å), also the last Gaussian centre.
        param_dtype: dtype of the parameters.
        rngs: Parameter initialisation.
    """

    def __init__(self, dim: int, num_filters: int, num_rbf: int, cutoff: float, *,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.num_rbf, self.cutoff = int(num_rbf), float(cutoff)
        self.filter_in = nnx.Linear(num_rbf, num_filters, param_dtype=param_dtype, rngs=rngs)
        self.filter_out = nnx.Linear(num_filters, dim, param_dtype=param_dtype, rngs=rngs)

    def filters(self, distances: Float[Array, " num_edges"]) -> Float[Array, "num_edges features"]:
        """Filter values ``W`` [E, dim], exactly 0 for ``distance >= cutoff``."""
        rbf = gaussian_basis(distances, num=self.num_rbf, cutoff=self.cutoff)
        W = self.filter_out(shifted_softplus(self.filter_in(rbf)))
        return W * cosine_cutoff(distances, self.cutoff)[:, None]

    def __call__(self, x: Float[Array, "num_nodes features"], *,
                 senders: Int[Array, " num_edges"], receivers: Int[Array, " num_edges"],
                 distances: Float[Array, " rows"],
                 edge_mask: Bool[Array, " num_edges"] | None = None,
                 pair: Int[Array, " num_edges"] | None = None
                 ) -> Float[Array, "num_nodes features"]:
        """[N, dim] convolved features (``edge_mask`` False edges send nothing).

        With ``pair`` (``edges["pair"]``), ``distances`` are per pair slot ([P], e.g.
        :func:`mpattn.ops.pair_mean` of the edge distances) and the filter network runs once
        per pair: half the work of the per-edge form, same result.
        """
        W = self.filters(distances)
        if pair is not None:
            W, pair = W[pair], None
        if edge_mask is not None:
            W = jnp.where(edge_mask[:, None], W, 0)
        return cfconv(x, W, senders=senders, receivers=receivers, num_segments=x.shape[0])


class Interaction(nnx.Module):
    """SchNet's interaction block: atom-wise Dense, CFConv, Dense, ssp, Dense.

    ``v = Dense(dim -> dim)(ssp(Dense(F -> dim)(CFConv(Dense(dim -> F, no bias)(x)))))``.
    The block returns the update ``v`` **without** the residual: SchNet's step is
    ``x <- x + v``, added by the caller (as in SchNetPack), so models may scale or gate it.

    Args:
        dim: Atom feature width (SchNet paper: 64; SchNetPack QM9: 128).
        num_filters: Filter width ``F`` of the convolution (usually ``dim``).
        num_rbf: Gaussians of the filter network.
        cutoff: Cutoff radius (Å).
        param_dtype: dtype of the parameters.
        rngs: Parameter initialisation.

    Reference: Schütt et al., NeurIPS 2017, Fig. 2; Schütt et al., J. Chem. Phys. 148,
    241722 (2018).
    """

    def __init__(self, dim: int, num_filters: int, num_rbf: int, cutoff: float, *,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(param_dtype=param_dtype, rngs=rngs)
        self.in2f = nnx.Linear(dim, num_filters, use_bias=False, **kw)
        self.conv = CFConv(num_filters, num_filters, num_rbf, cutoff, **kw)
        self.f2out = nnx.Linear(num_filters, dim, **kw)
        self.dense = nnx.Linear(dim, dim, **kw)

    def __call__(self, x: Float[Array, "num_nodes features"], *,
                 senders: Int[Array, " num_edges"], receivers: Int[Array, " num_edges"],
                 distances: Float[Array, " rows"],
                 edge_mask: Bool[Array, " num_edges"] | None = None,
                 pair: Int[Array, " num_edges"] | None = None
                 ) -> Float[Array, "num_nodes features"]:
        """The update ``v`` [N, dim] (add it to ``x`` yourself); ``pair``: see :class:`CFConv`."""
        y = self.conv(self.in2f(x), senders=senders, receivers=receivers, distances=distances,
                      edge_mask=edge_mask, pair=pair)
        return self.dense(shifted_softplus(self.f2out(y)))
