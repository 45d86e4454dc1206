"""Pure segment operations on flat (concatenated) graph arrays.

Every function takes arrays and index vectors and returns arrays; graph index arguments are
keyword-only and ``num_segments`` is always static (``nodes.shape[0]``, never
``jnp.sum(n_node)``), so everything jit-compiles to fixed shapes (docs/design.md).

Padding: jraph-style padded batches put padding edges on the padding graph's nodes, so they
never mix with real segments. Where padding could still matter (a softmax over a segment that
holds only padding, an empty segment), the functions here return zeros rather than NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

__all__ = [
    "edge_vectors",
    "graph_index",
    "masked_mean",
    "masked_sum",
    "num_pairs",
    "pair_mean",
    "safe_norm",
    "segment_count",
    "segment_max",
    "segment_mean",
    "segment_softmax",
    "segment_sum",
    "unit_vectors",
]


def segment_sum(data: Float[Array, "n ..."], segment_ids: Int[Array, " n"], *,
                num_segments: int) -> Float[Array, "segments ..."]:
    """Sum of ``data`` rows per segment (empty segments give 0)."""
    return jax.ops.segment_sum(data, segment_ids, num_segments=num_segments)


def num_pairs(pair: Int[Array, " n"]) -> int:
    """Static number of pair slots of an ``edges["pair"]`` array: ``ceil(len / 2)``."""
    return (pair.shape[0] + 1) // 2


def pair_mean(data: Float[Array, "n ..."], pair: Int[Array, " n"]
              ) -> Float[Array, "pairs ..."]:
    """Mean of ``data`` over the two edges of each pair slot (``mpattn.graph.edge_pairs``).

    For a quantity equal on both directions of a pair (a distance) this is that value, with
    gradients shared by both edges; ``[pairs]`` = :func:`num_pairs`. Gather back per edge with
    ``values[pair]``.
    """
    return segment_sum(data, pair, num_segments=num_pairs(pair)) * 0.5


def segment_count(segment_ids: Int[Array, " n"], *, num_segments: int,
                  mask: Bool[Array, " n"] | None = None, dtype=jnp.float32
                  ) -> Float[Array, " segments"]:
    """Number of (unmasked) rows per segment."""
    ones = jnp.ones(segment_ids.shape[0], dtype) if mask is None else mask.astype(dtype)
    return jax.ops.segment_sum(ones, segment_ids, num_segments=num_segments)


def segment_mean(data: Float[Array, "n ..."], segment_ids: Int[Array, " n"], *,
                 num_segments: int) -> Float[Array, "segments ..."]:
    """Mean of ``data`` rows per segment (empty segments give 0, not NaN)."""
    total = jax.ops.segment_sum(data, segment_ids, num_segments=num_segments)
    count = segment_count(segment_ids, num_segments=num_segments, dtype=data.dtype)
    count = count.reshape((-1,) + (1,) * (data.ndim - 1))
    return total / jnp.maximum(count, 1)


def segment_max(data: Float[Array, "n ..."], segment_ids: Int[Array, " n"], *,
                num_segments: int) -> Float[Array, "segments ..."]:
    """Maximum of ``data`` rows per segment (empty segments give 0, not -inf)."""
    out = jax.ops.segment_max(data, segment_ids, num_segments=num_segments)
    return jnp.where(jnp.isfinite(out), out, 0)


def segment_softmax(logits: Float[Array, "n ..."], segment_ids: Int[Array, " n"], *,
                    num_segments: int, mask: Bool[Array, " n"] | None = None
                    ) -> Float[Array, "n ..."]:
    """Softmax of ``logits`` over the rows that share a segment id (numerically stable).

    The per-segment maximum is subtracted first (held constant for the gradient, which is
    exact since softmax is shift invariant). Masked rows get weight 0 and do not count in
    the normaliser; a segment whose rows are all masked gives zeros, never NaN.

    Args:
        logits: [n, ...] scores (trailing axes, e.g. heads, are independent).
        segment_ids: int [n], the segment of each row (e.g. ``receivers`` for attention).
        num_segments: static number of segments.
        mask: optional bool [n]; False rows are excluded.

    Returns:
        [n, ...] weights summing to 1 over each segment's unmasked rows.
    """
    if mask is not None:
        m = mask.reshape((-1,) + (1,) * (logits.ndim - 1))
        logits = jnp.where(m, logits, -jnp.inf)
    seg_max = jax.ops.segment_max(logits, segment_ids, num_segments=num_segments)
    seg_max = jax.lax.stop_gradient(jnp.where(jnp.isfinite(seg_max), seg_max, 0))
    shifted = logits - seg_max[segment_ids]
    ex = jnp.exp(shifted)  # exp(-inf) = 0 for masked rows
    denom = jax.ops.segment_sum(ex, segment_ids, num_segments=num_segments)[segment_ids]
    return ex / jnp.where(denom > 0, denom, 1)


def masked_sum(data: Float[Array, "n ..."], mask: Bool[Array, " n"], axis: int = 0):
    """Sum over ``axis`` of the rows where ``mask`` is True."""
    m = mask.reshape(mask.shape + (1,) * (data.ndim - mask.ndim))
    return jnp.sum(jnp.where(m, data, 0), axis=axis)


def masked_mean(data: Float[Array, "n ..."], mask: Bool[Array, " n"], axis: int = 0):
    """Mean over ``axis`` of the rows where ``mask`` is True (0 if none are)."""
    count = jnp.maximum(jnp.sum(mask), 1).astype(data.dtype)
    return masked_sum(data, mask, axis) / count


def graph_index(n_node: Int[Array, " graphs"], num_nodes: int) -> Int[Array, " nodes"]:
    """int32 [num_nodes]: the graph of each node, from ``n_node`` (static total)."""
    return jnp.repeat(jnp.arange(n_node.shape[0], dtype=jnp.int32), n_node,
                      total_repeat_length=num_nodes)


def safe_norm(x: Float[Array, "... 3"], axis: int = -1, eps: float = 1e-12
              ) -> Float[Array, " ..."]:
    """Euclidean norm with a finite gradient at 0 (the double-``where`` trick)."""
    sq = jnp.sum(x * x, axis=axis)
    zero = sq <= eps
    return jnp.where(zero, 0.0, jnp.sqrt(jnp.where(zero, 1.0, sq)))


def edge_vectors(positions: Float[Array, "nodes 3"], *, senders: Int[Array, " edges"],
                 receivers: Int[Array, " edges"], shift: Float[Array, "edges 3"] | None = None
                 ) -> Float[Array, "edges 3"]:
    """``positions[senders] - positions[receivers] (+ shift)``: the convention of docs/design.md.

    Distances are never stored in graphs; compute them here so that forces flow through
    positions. ``shift`` is the periodic image shift of radius graphs (``edges["shift"]``).
    """
    vec = positions[senders] - positions[receivers]
    return vec if shift is None else vec + shift


def unit_vectors(vectors: Float[Array, "edges 3"], distances: Float[Array, " edges"]
                 ) -> Float[Array, "edges 3"]:
    """``vectors / distances`` with 0 (and finite gradients) where the distance is 0 (the
    double-``where`` trick; padding edges join padding nodes at the origin)."""
    r = distances[:, None]
    return jnp.where(r > 0, vectors / jnp.where(r > 0, r, 1.0), 0.0)
