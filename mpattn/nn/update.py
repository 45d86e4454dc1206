"""Update functions ``h_v <- U(h_v, m_v)``: Gilmer's GRU and the MH-MP transformer encoder.

- :class:`GRUUpdate`: the update of Gilmer et al., "Neural Message Passing for Quantum
  Chemistry", ICML 2017 (``h_v^{t+1} = GRU(h_v^t, m_v^{t+1})``), with ``flax.nnx.GRUCell``.
- :class:`TransformerEncoderUpdate`: the MH-MP thesis' replacement of the GRU by a multi-head
  self-attention encoder block (Vaswani et al., "Attention Is All You Need", NeurIPS 2017,
  post-LN), attending along the graph's edges with
  :class:`~mpattn.nn.attention.MultiHeadGraphAttention`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from mpattn.nn.attention import MultiHeadGraphAttention

__all__ = ["ACTIVATIONS", "GRUUpdate", "TransformerEncoderUpdate"]

ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": jax.nn.gelu,
    "silu": jax.nn.silu,
    "tanh": jnp.tanh,
}


class GRUUpdate(nnx.Module):
    """Gilmer's update ``h_v <- GRU(h_v, m_v)``: the node state is the GRU's hidden state and
    the message its input, one GRU step per message-passing step (weights shared across steps).

    With ``x = m`` and ``h`` the state (``flax.nnx.GRUCell``, weights ``W_i* [d, d]`` with
    biases ``b_i*`` on the input, ``W_h* [d, d]`` without biases on the state)::

        r  = sigmoid(x W_ir + b_ir + h W_hr)
        z  = sigmoid(x W_iz + b_iz + h W_hz)
        n  = tanh(x W_in + b_in + r * (h W_hn))
        h' = (1 - z) * n + z * h

    Unlike PyTorch's ``nn.GRU`` there is no separate state bias ``b_h*`` (it is redundant except
    for ``b_hn`` inside the reset gate). ``z -> 1`` keeps ``h`` unchanged; with a zero message and
    zero input biases ``h' = (1 - z) tanh(r * (h W_hn)) + z h``.

    Args:
        dim: Width ``d`` of both the node states and the messages.
        param_dtype: dtype of the parameters.
        rngs: Parameter initialisation.
    """

    def __init__(self, dim: int, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.dim = int(dim)
        self.cell = nnx.GRUCell(dim, dim, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, h: Float[Array, "num_nodes features"], m: Float[Array, "num_nodes features"]
                 ) -> Float[Array, "num_nodes features"]:
        """New node states [N, dim] from states ``h`` and messages ``m`` (both [N, dim])."""
        new_h, _ = self.cell(h, m)
        return new_h


class TransformerEncoderUpdate(nnx.Module):
    """Post-LN transformer encoder block over the graph's edges, taking the messages as input.

    The MH-MP thesis feeds the message-passing output to a Keras-style encoder in place of the
    GRU. We read "the update takes the messages as input" as the encoder acting on
    ``x = h + m`` (the node state plus its aggregated message: a residual message step, so a
    zero message leaves the encoder acting on ``h``)::

        x = h + m
        x = LayerNorm(x + Dropout(MultiHeadGraphAttention(x)))          # along the edges
        x = LayerNorm(x + Dropout(Dense(ff_dim -> dim)(act(Dense(dim -> ff_dim)(x)))))

    Attention runs over the edge set passed in: on QM9's complete graphs that is the
    intra-molecule self-attention of the thesis; padding edges live on the padding graph, so
    padded nodes never reach a real molecule. Dropout (on the attention and feed-forward
    outputs) is active in ``model.train()`` mode and off after ``model.eval()``.

    Thesis settings: ``dim = 64``, ``num_heads = 3``, ``ff_dim = 10``, ReLU; its Keras
    ``MultiHeadAttention`` had ``key_dim = 64``, i.e. ``head_dim = 64``.

    Args:
        dim: Node state width (attention input and output width).
        num_heads: Attention heads.
        head_dim: Width per head of queries, keys and values.
        ff_dim: Hidden width of the feed-forward network.
        edge_bias: Attention logit bias, ``None``, ``"bond"``, ``"distance"`` or
            ``"bond+distance"`` (see :class:`~mpattn.nn.attention.MultiHeadGraphAttention`).
        activation: Feed-forward activation, a key of :data:`ACTIVATIONS`.
        dropout: Dropout rate (0 disables it).
        num_rbf: Gaussians of the distance bias.
        cutoff: Cutoff (Å) of the distance bias.
        param_dtype: dtype of the parameters.
        rngs: Parameter initialisation (and the ``dropout`` stream when ``dropout > 0``).

    Reference: Vaswani et al., NeurIPS 2017 (post-LN encoder layer).
    """

    def __init__(self, dim: int, num_heads: int, head_dim: int, ff_dim: int, *,
                 edge_bias: str | None = None, activation: str = "relu", dropout: float = 0.0,
                 num_rbf: int = 16, cutoff: float = 5.0, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got "
                             f"{activation!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.dim, self.activation = int(dim), activation
        kw = dict(param_dtype=param_dtype, rngs=rngs)
        self.attention = MultiHeadGraphAttention(dim, num_heads, head_dim, dim,
                                                 edge_bias=edge_bias, num_rbf=num_rbf,
                                                 cutoff=cutoff, **kw)
        self.norm1 = nnx.LayerNorm(dim, **kw)
        self.ff_in = nnx.Linear(dim, ff_dim, **kw)
        self.ff_out = nnx.Linear(ff_dim, dim, **kw)
        self.norm2 = nnx.LayerNorm(dim, **kw)
        self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout > 0 else None

    def _drop(self, x):
        return x if self.dropout is None else self.dropout(x)

    def __call__(self, h: Float[Array, "num_nodes features"],
                 m: Float[Array, "num_nodes features"], *,
                 senders: Int[Array, " num_edges"], receivers: Int[Array, " num_edges"],
                 bond: Int[Array, " num_edges"] | None = None,
                 distances: Float[Array, " num_edges"] | None = None,
                 edge_mask: Bool[Array, " num_edges"] | None = None
                 ) -> Float[Array, "num_nodes features"]:
        """New node states [N, dim] from states ``h`` and messages ``m`` (both [N, dim]).

        ``bond``/``distances`` are needed by the matching ``edge_bias``; ``edge_mask`` False
        edges are not attended along.
        """
        x = h + m
        a = self.attention(x, senders=senders, receivers=receivers, bond=bond,
                           distances=distances, edge_mask=edge_mask)
        x = self.norm1(x + self._drop(a))
        f = self.ff_out(ACTIVATIONS[self.activation](self.ff_in(x)))
        return self.norm2(x + self._drop(f))
