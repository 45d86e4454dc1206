"""Atom embeddings and the sinusoidal positional encoding of the atom index.

- :class:`AtomEmbedding` turns a graph's node fields into initial node states ``h⁰ [N, dim]``,
  either from the node feature vector (``nodes["features"]``, a Linear map, as in Gilmer et
  al. 2017 and the MH-MP thesis' one-hot featurization) or from the atomic number
  (``nodes["z"]``, a learned table, as in SchNet/PaiNN).
- :func:`sinusoidal_encoding` is the positional encoding of Vaswani et al. 2017, "Attention Is
  All You Need", applied by the MH-MP+PE thesis variant to the index of each atom within its
  molecule (:func:`atom_index_in_graph`) before the self-attention encoder. The atom order of
  a molecule is arbitrary, so this *breaks* permutation invariance on purpose — the thesis
  found it scored worse than plain MH-MP; the helpers exist to reproduce that finding.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from mpattn.ops import graph_index

__all__ = [
    "AtomEmbedding",
    "add_positional_encoding",
    "atom_index_in_graph",
    "sinusoidal_encoding",
]


class AtomEmbedding(nnx.Module):
    """Initial node states from node features (Linear) or from atomic numbers (lookup table).

    Exactly one source must be given:

    - ``num_features=F``: ``h = nodes["features"] @ W + b`` with ``W`` [F, dim].
    - ``max_z=Z``: ``h = E[nodes["z"]]`` with a learned table ``E`` [Z + 1, dim] (row ``z`` for
      element ``z``; row 0 is what jraph padding nodes, whose ``z`` is 0, read). Atomic numbers
      above ``max_z`` are out of range: ``jnp.take`` fills those rows with NaN.

    Padding nodes get embeddings too (the bias, or row 0); they live in the padding graph, so
    downstream segment operations keep them away from real graphs.

    Args:
        dim: Size of the node states.
        num_features: Width of ``nodes["features"]`` (embed from features).
        max_z: Largest atomic number to embed (embed from ``nodes["z"]``).
        rngs: Flax NNX random streams for the parameter initialisation.

    Raises:
        ValueError: If neither or both of ``num_features`` and ``max_z`` are given.
    """

    def __init__(self, dim: int, *, num_features: int | None = None, max_z: int | None = None,
                 rngs: nnx.Rngs):
        if (num_features is None) == (max_z is None):
            raise ValueError(
                "AtomEmbedding needs exactly one source: num_features (embed "
                "nodes['features'] with a Linear map) or max_z (embed nodes['z'] with a "
                f"lookup table); got num_features={num_features}, max_z={max_z}"
            )
        self.dim = dim
        self.num_features = num_features
        self.max_z = max_z
        if num_features is not None:
            self.linear = nnx.Linear(num_features, dim, rngs=rngs)
            self.table = None
        else:
            self.linear = None
            self.table = nnx.Embed(max_z + 1, dim, rngs=rngs)

    def __call__(self, nodes: dict[str, Array]) -> Float[Array, "num_nodes features"]:
        """Embeds the nodes of a graph.

        Args:
            nodes: The graph's node dict; reads ``"features"`` float [N, F] or ``"z"`` int [N].

        Returns:
            [N, dim] node states.
        """
        if self.linear is not None:
            return self.linear(nodes["features"])
        return self.table(jnp.asarray(nodes["z"]).astype(jnp.int32))


def atom_index_in_graph(n_node: Int[Array, " num_graphs"], num_nodes: int
                        ) -> Int[Array, " num_nodes"]:
    """Index of every node within its own graph: ``0, 1, ..., n_node[g] - 1`` for each graph.

    Static shapes only (``num_nodes`` is the static total, e.g. ``h.shape[0]``), so it runs
    under ``jax.jit``. Padding nodes are numbered within the padding graph like any other.

    Args:
        n_node: int [G] nodes per graph (summing to ``num_nodes`` for a padded batch).
        num_nodes: Static total number of nodes N.

    Returns:
        int32 [N]; e.g. ``n_node = [2, 3, 1]`` gives ``[0, 1, 0, 1, 2, 0]``.
    """
    n_node = jnp.asarray(n_node, dtype=jnp.int32)
    graph = graph_index(n_node, num_nodes)
    first = jnp.cumsum(n_node) - n_node  # first node of each graph
    return (jnp.arange(num_nodes, dtype=jnp.int32) - first[graph]).astype(jnp.int32)


def sinusoidal_encoding(position: Int[Array, " num_nodes"], dim: int,
                        max_period: float = 10000.0, dtype=jnp.float32
                        ) -> Float[Array, "num_nodes features"]:
    """Sinusoidal positional encoding (Vaswani et al. 2017, section 3.5).

    ``PE[p, 2i] = sin(p / max_period^(2i/dim))`` and ``PE[p, 2i+1] = cos(p /
    max_period^(2i/dim))``: even columns hold sines, odd columns cosines of the same frequency.
    An odd ``dim`` ends with a sine column (its cosine partner is dropped).

    Args:
        position: int or float [N] positions (e.g. :func:`atom_index_in_graph`).
        dim: Encoding width (any positive integer).
        max_period: Longest wavelength scale (10000 in the paper).
        dtype: Floating dtype of the result.

    Returns:
        [N, dim] encodings; position 0 gives ``[0, 1, 0, 1, ...]``.
    """
    if dim < 1:
        raise ValueError(f"sinusoidal_encoding needs dim >= 1, got {dim}")
    col = jnp.arange(dim)
    pair = (col // 2).astype(dtype)  # i of columns 2i and 2i+1
    inv_freq = jnp.exp(-(2.0 * pair / dim) * math.log(max_period)).astype(dtype)
    angle = jnp.asarray(position, dtype=dtype)[:, None] * inv_freq[None, :]
    return jnp.where(col % 2 == 0, jnp.sin(angle), jnp.cos(angle)).astype(dtype)


def add_positional_encoding(h: Float[Array, "num_nodes features"],
                            n_node: Int[Array, " num_graphs"], *,
                            max_period: float = 10000.0) -> Float[Array, "num_nodes features"]:
    """``h + PE(atom index within its molecule)``: the MH-MP+PE input (no parameters).

    Args:
        h: [N, d] node states.
        n_node: int [G] nodes per graph (static G; sums to N for a padded batch).
        max_period: See :func:`sinusoidal_encoding`.

    Returns:
        [N, d] node states with the encoding of each atom's index added.
    """
    position = atom_index_in_graph(n_node, h.shape[0])
    return h + sinusoidal_encoding(position, h.shape[-1], max_period, dtype=h.dtype)
