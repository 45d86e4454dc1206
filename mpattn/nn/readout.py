"""Readouts: node states [N, d] -> one vector per graph [G, d_out].

Every readout groups nodes by the node-to-graph index ``mpattn.ops.graph_index(n_node, N)``
with the static ``num_graphs = n_node.shape[0]``. A jraph-padded batch keeps its padding
nodes in the trailing padding graph, which therefore gets its own segment: real graphs'
outputs never see padding rows, whatever those rows hold. Every readout also accepts an
optional node ``mask`` (``mpattn.graph.node_mask(graph)``); masked rows are dropped as well, so
the padding graph's own output no longer depends on padding junk either (it is 0 for the sum,
mean and attention readouts; Set2Set gives its LSTM query with an empty attention part).

- :func:`sum_readout`, :func:`mean_readout` and :class:`SumReadout` (per-atom contributions
  summed, for extensive targets such as energies; SchNet, Schütt et al. 2018).
- :class:`Set2Set`: Vinyals et al. 2015 (ICLR 2016), "Order Matters: Sequence to sequence for
  sets", as used by the MPNN of Gilmer et al. 2017.
- :class:`AttentionReadout` / :func:`graph_cross_attention`: the MH-MP thesis' self-attention
  decoder (cross-attention readout): learned queries attend to the atoms of each molecule.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from mpattn.ops import graph_index, segment_count, segment_softmax, segment_sum

__all__ = [
    "AttentionReadout",
    "Set2Set",
    "SumReadout",
    "graph_cross_attention",
    "mean_readout",
    "sum_readout",
]


def _masked(h: Array, mask: Bool[Array, " num_nodes"] | None) -> Array:
    if mask is None:
        return h
    return jnp.where(mask.reshape((-1,) + (1,) * (h.ndim - 1)), h, 0)


def sum_readout(h: Float[Array, "num_nodes ..."], n_node: Int[Array, " num_graphs"], *,
                mask: Bool[Array, " num_nodes"] | None = None
                ) -> Float[Array, "num_graphs ..."]:
    """Sum of each graph's node rows.

    Args:
        h: [N, ...] node states (or per-atom contributions).
        n_node: int [G] nodes per graph; G is static.
        mask: Optional bool [N]; False rows (padding nodes) are left out.

    Returns:
        [G, ...] per-graph sums (0 for empty graphs).
    """
    seg = graph_index(n_node, h.shape[0])
    return segment_sum(_masked(h, mask), seg, num_segments=n_node.shape[0])


def mean_readout(h: Float[Array, "num_nodes ..."], n_node: Int[Array, " num_graphs"], *,
                 mask: Bool[Array, " num_nodes"] | None = None
                 ) -> Float[Array, "num_graphs ..."]:
    """Mean of each graph's (unmasked) node rows.

    Args:
        h: [N, ...] node states.
        n_node: int [G] nodes per graph; G is static.
        mask: Optional bool [N]; False rows are left out of both sum and count.

    Returns:
        [G, ...] per-graph means (0, not NaN, for graphs without unmasked nodes).
    """
    num_graphs = n_node.shape[0]
    seg = graph_index(n_node, h.shape[0])
    total = segment_sum(_masked(h, mask), seg, num_segments=num_graphs)
    count = segment_count(seg, num_segments=num_graphs, mask=mask, dtype=h.dtype)
    return total / jnp.maximum(count, 1).reshape((-1,) + (1,) * (h.ndim - 1))


class SumReadout(nnx.Module):
    """Per-atom contributions from an MLP, summed per graph (for extensive targets).

    ``y_g = Σ_{i∈g} MLP(h_i)``, as SchNet's atom-wise energy readout (Schütt et al. 2018):
    ``hidden=None`` gives one Linear map ``dim -> out``; ``hidden=k`` gives
    ``Linear(dim, k) -> activation -> Linear(k, out)``.

    Args:
        dim: Width of the node states.
        out: Number of outputs per atom (1 for a scalar target).
        hidden: Hidden width of the MLP, or None for a single Linear map.
        activation: Hidden activation (default SiLU).
        rngs: Flax NNX random streams.
    """

    def __init__(self, dim: int, out: int = 1, hidden: int | None = None, *,
                 activation: Callable[[Array], Array] = jax.nn.silu, rngs: nnx.Rngs):
        self.out = out
        self.activation = activation
        if hidden is None:
            self.hidden = None
            self.final = nnx.Linear(dim, out, rngs=rngs)
        else:
            self.hidden = nnx.Linear(dim, hidden, rngs=rngs)
            self.final = nnx.Linear(hidden, out, rngs=rngs)

    def __call__(self, h: Float[Array, "num_nodes features"], n_node: Int[Array, " num_graphs"],
                 *, mask: Bool[Array, " num_nodes"] | None = None, per_atom: bool = False):
        """Sums the per-atom contributions of each graph.

        Args:
            h: [N, dim] node states.
            n_node: int [G] nodes per graph (static G).
            mask: Optional bool [N]; False rows contribute 0 (and report 0 per atom).
            per_atom: Also return the per-atom contributions.

        Returns:
            [G] per-graph values (``[G, out]`` when ``out > 1``); with ``per_atom=True`` the
            tuple ``([G], [N])`` (``([G, out], [N, out])`` when ``out > 1``).
        """
        x = h if self.hidden is None else self.activation(self.hidden(h))
        atom = _masked(self.final(x), mask)
        if self.out == 1:
            atom = atom[:, 0]
        total = sum_readout(atom, n_node)
        return (total, atom) if per_atom else total


class Set2Set(nnx.Module):
    """Set2Set readout (Vinyals et al. 2015), the readout of Gilmer et al. 2017's MPNN.

    With ``q*_0 = 0`` [G, 2d], for ``t = 1..steps``::

        q_t          = LSTM(q*_{t-1})                     # [G, d]
        e_i          = <h_i, q_t[graph(i)]>               # [N]
        a_i          = softmax of e over graph(i)'s nodes  (segment softmax)
        r_t          = Σ_{i∈g} a_i h_i                     # [G, d]
        q*_t         = [q_t, r_t]                          # [G, 2d]

    and the output is ``q*_steps`` [G, 2d]. The LSTM is ``nnx.LSTMCell(2d, d)`` with zero
    initial carry.

    Args:
        dim: Width d of the node states.
        steps: Number of processing steps (Gilmer et al. use 3 to 12; default 3).
        rngs: Flax NNX random streams.
    """

    def __init__(self, dim: int, steps: int = 3, *, rngs: nnx.Rngs):
        if steps < 1:
            raise ValueError(f"Set2Set needs steps >= 1, got {steps}")
        self.dim = dim
        self.steps = steps
        self.lstm = nnx.LSTMCell(2 * dim, dim, rngs=rngs)

    def __call__(self, h: Float[Array, "num_nodes features"], n_node: Int[Array, " num_graphs"],
                 *, mask: Bool[Array, " num_nodes"] | None = None
                 ) -> Float[Array, "num_graphs features"]:
        """Reads out every graph.

        Args:
            h: [N, dim] node states.
            n_node: int [G] nodes per graph (static G).
            mask: Optional bool [N]; False rows get no attention.

        Returns:
            [G, 2 * dim] per-graph vectors ``[q, r]``.
        """
        num_graphs = n_node.shape[0]
        seg = graph_index(n_node, h.shape[0])
        h = _masked(h, mask)
        zeros = jnp.zeros((num_graphs, self.dim), h.dtype)
        carry = (zeros, zeros)  # (c, h) of the LSTM
        q_star = jnp.zeros((num_graphs, 2 * self.dim), h.dtype)
        for _ in range(self.steps):
            carry, q = self.lstm(carry, q_star)
            logits = jnp.sum(h * q[seg], axis=-1)
            att = segment_softmax(logits, seg, num_segments=num_graphs, mask=mask)
            r = segment_sum(att[:, None] * h, seg, num_segments=num_graphs)
            q_star = jnp.concatenate([q, r], axis=-1)
        return q_star


def graph_cross_attention(queries: Float[Array, "... num_heads head_dim"],
                          keys: Float[Array, "num_nodes num_heads head_dim"],
                          values: Float[Array, "num_nodes num_heads features"], *,
                          node_graph: Int[Array, " num_nodes"], num_graphs: int,
                          mask: Bool[Array, " num_nodes"] | None = None
                          ) -> Float[Array, "num_graphs num_queries num_heads features"]:
    """Multi-head cross-attention of per-graph queries over the nodes of each graph.

    For graph g, query q and head k: ``out[g, q, k] = Σ_{i∈g} a_{iqk} v_{ik}`` with
    ``a_{·qk} = softmax_{i∈g}(<Q_{qk}, K_{ik}> / sqrt(head_dim))`` (scaled dot-product
    attention, Vaswani et al. 2017), the softmax running over the node→graph index
    (:func:`mpattn.ops.segment_softmax`).

    Args:
        queries: [Q, H, dh] shared by every graph (learned queries) or [G, Q, H, dh] per graph.
        keys: [N, H, dh] node keys.
        values: [N, H, dv] node values.
        node_graph: int [N] graph of each node (``mpattn.ops.graph_index``).
        num_graphs: Static number of graphs G.
        mask: Optional bool [N]; False rows get no attention.

    Returns:
        [G, Q, H, dv]; 0 for graphs without (unmasked) nodes.
    """
    scale = 1.0 / jnp.sqrt(jnp.asarray(keys.shape[-1], keys.dtype))
    if queries.ndim == 3:
        logits = jnp.einsum("qhd,nhd->nqh", queries, keys)
    elif queries.ndim == 4:
        logits = jnp.einsum("nqhd,nhd->nqh", queries[node_graph], keys)
    else:
        raise ValueError(
            f"queries must be [Q, H, dh] or [G, Q, H, dh], got shape {queries.shape}"
        )
    att = segment_softmax(logits * scale, node_graph, num_segments=num_graphs, mask=mask)
    msg = att[..., None] * values[:, None]  # [N, Q, H, dv]
    return segment_sum(msg, node_graph, num_segments=num_graphs)


class AttentionReadout(nnx.Module):
    """Cross-attention readout (the MH-MP thesis' self-attention decoder).

    ``num_queries`` learned query vectors per head attend to each molecule's atom states:
    keys ``K = h W_K`` and values ``V = h W_V + b_V`` ([N, H, dh]), then
    :func:`graph_cross_attention`; the [G, Q, H, dh] result is flattened to
    [G, Q * H * dh] and, if ``out_dim`` is given, mapped by a Linear layer to [G, out_dim].
    Keys have no bias (it would add a per-query constant to every logit of a graph, which the
    softmax ignores).

    Args:
        dim: Width of the node states.
        num_heads: Number of attention heads H.
        head_dim: Width of each head dh.
        num_queries: Number of learned queries Q.
        out_dim: Optional width of a final Linear projection.
        rngs: Flax NNX random streams.
    """

    def __init__(self, dim: int, num_heads: int, head_dim: int, num_queries: int = 1, *,
                 out_dim: int | None = None, rngs: nnx.Rngs):
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.num_queries = num_queries
        self.queries = nnx.Param(
            jax.random.normal(rngs.params(), (num_queries, num_heads, head_dim), jnp.float32)
        )
        self.key = nnx.Linear(dim, num_heads * head_dim, use_bias=False, rngs=rngs)
        self.value = nnx.Linear(dim, num_heads * head_dim, rngs=rngs)
        self.out = None if out_dim is None else nnx.Linear(
            num_queries * num_heads * head_dim, out_dim, rngs=rngs)

    def __call__(self, h: Float[Array, "num_nodes features"], n_node: Int[Array, " num_graphs"],
                 *, mask: Bool[Array, " num_nodes"] | None = None
                 ) -> Float[Array, "num_graphs features"]:
        """Reads out every graph.

        Args:
            h: [N, dim] node states.
            n_node: int [G] nodes per graph (static G).
            mask: Optional bool [N]; False rows get no attention.

        Returns:
            [G, num_queries * num_heads * head_dim], or [G, out_dim] with a projection.
        """
        num_graphs = n_node.shape[0]
        n = h.shape[0]
        seg = graph_index(n_node, n)
        h = _masked(h, mask)
        keys = self.key(h).reshape(n, self.num_heads, self.head_dim)
        values = self.value(h).reshape(n, self.num_heads, self.head_dim)
        queries = self.queries[...].astype(keys.dtype)
        out = graph_cross_attention(queries, keys, values, node_graph=seg,
                                    num_graphs=num_graphs, mask=mask)
        out = out.reshape(num_graphs, -1)
        return out if self.out is None else self.out(out)
