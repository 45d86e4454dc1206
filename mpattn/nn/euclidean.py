"""The layers of SO3krates' Euclidean transformer: attention that updates invariant features
and spherical-harmonic coordinates, and the per-degree mixing of the two.

Every atom carries invariant features ``f_i`` [F] and spherical-harmonic coordinates
``x_i`` [C, (L+1)² - 1] (degrees ``1..L`` in ``C`` channels; SO3krates has one:
:mod:`mpattn.nn.spherical`). On the edge ``j -> i`` (sender ``j``, receiver ``i``, vector
``r_ij = pos_j - pos_i``) a filter is built from invariants only, the radial basis of
``r_ij`` and the per-degree norms ``⊕_{c,l} |x_j^{cl} - x_i^{cl}|``::

    w_ij = Dense(act(Dense([rbf(r_ij), ⊕_{c,l} |x_j^{cl} - x_i^{cl}|])))    [F + C·L·d]

and gives two kinds of attention weights, unnormalised (no softmax) and faded out by the
envelope ``u(r_ij)`` so that everything is smooth when an atom crosses the cutoff::

    α_ij^h = u(r_ij) <q_i^h, w_ij^h ⊙ k_j^h> / sqrt(F / H)             per head h
    β_ij^cl = u(r_ij) <p_i^cl, w_ij^cl ⊙ s_j^cl> / sqrt(d)         per channel c, degree l
    f_i  += Dense(⊕_h Σ_j α_ij^h v_j^h) / N̄              (v_j^h ⊙ w'_ij^h with a value filter)
    x_i^cl += Σ_j β_ij^cl Y_l(r̂_ij) / N̄

(``q, k, v, p, s`` linear maps of ``f``; ``N̄`` = :data:`~mpattn.nn.attention.SUM_NEIGHBOURS`
keeps sums over neighbours at the size of means). Then the interaction block mixes the two
through per-degree invariants: ``y_i^{cl} = Σ_c' W^l_{cc'} x_i^{c'l}`` (with more than one
channel, a learned mixing of the channels within each degree, ``W^l`` starting at the
identity; one channel: ``y = x``), ``(a_i, b_i) = MLP([f_i, ⊕_{c,l} |y_i^{cl}|])``, ``f_i +=
a_i``, ``x_i^{cl} += b_i^{cl} y_i^{cl}``. ``f`` only ever sees ``x`` through norms, so it
stays invariant and ``x`` stays equivariant. The cost is ``O(num_edges · (F + C·L²))``: no
Clebsch-Gordan products.

Reference: Frank, Unke & Müller, NeurIPS 2022 (SO3krates, eqs. 6-11); Frank, Unke, Müller &
Chmiela, Nat. Commun. 15, 6539 (2024) (the Euclidean transformer).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int

from mpattn.nn.attention import SUM_NEIGHBOURS
from mpattn.nn.spherical import degree_blocks, degree_norms, expand_degrees
from mpattn.ops import pair_mean, segment_sum

__all__ = ["DegreeMixing", "EuclideanAttention"]


class EuclideanAttention(nnx.Module):
    """Invariant (multi-head) and Euclidean (one head per degree) attention of one block.

    Args:
        dim: ``F``, the width of the invariant features.
        num_heads: ``H`` heads of the invariant attention (``dim % num_heads == 0``).
        max_degree: ``L``.
        num_rbf: width of the radial basis the filter reads.
        degree_dim: ``d``, the query/key width of each degree's head.
        activation: the filter network's activation.
        value_filter: the filter network also gives ``F`` more outputs ``w'_ij`` that scale
            the values channel by channel (SchNet's continuous filter, as in our attention
            model): the invariant messages then carry radial shape per channel, not only
            one weight per head.
        channels: ``C``, channels of the coordinates; each (channel, degree) has its own
            head.
    """

    def __init__(self, dim: int, num_heads: int, max_degree: int, num_rbf: int, *,
                 degree_dim: int = 16, activation: Callable = jax.nn.silu,
                 value_filter: bool = False, channels: int = 1, rngs: nnx.Rngs):
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be a multiple of num_heads={num_heads}")
        self.dim, self.num_heads, self.max_degree = dim, num_heads, max_degree
        self.degree_dim, self.value_filter, self.channels = degree_dim, value_filter, channels
        self.activation = activation
        heads = channels * max_degree  # one Euclidean head per (channel, degree)
        self.query = nnx.Linear(dim, dim, use_bias=False, rngs=rngs)
        self.key = nnx.Linear(dim, dim, use_bias=False, rngs=rngs)
        self.value = nnx.Linear(dim, dim, use_bias=False, rngs=rngs)
        self.out = nnx.Linear(dim, dim, rngs=rngs)
        self.degree_query = nnx.Linear(dim, heads * degree_dim, use_bias=False, rngs=rngs)
        self.degree_key = nnx.Linear(dim, heads * degree_dim, use_bias=False, rngs=rngs)
        self.filter_in = nnx.Linear(num_rbf + heads, dim, rngs=rngs)
        self.filter_out = nnx.Linear(dim, dim * (2 if value_filter else 1) + heads * degree_dim,
                                     rngs=rngs)

    def __call__(
        self,
        f: Float[Array, "num_nodes features"],
        x: Float[Array, "num_nodes channels components"],
        *,
        senders: Int[Array, " num_edges"],
        receivers: Int[Array, " num_edges"],
        envelope: Float[Array, " num_edges"],
        rbf: Float[Array, "num_pairs num_rbf"],
        harmonics: Float[Array, "num_edges components"],
        pair: Int[Array, " num_edges"] | None = None,
    ) -> tuple[Float[Array, "num_nodes features"],
               Float[Array, "num_nodes channels components"]]:
        """The updates ``(Δf, Δx)`` of every atom.

        Args:
            f: layer-normalised invariant features.
            x: spherical-harmonic coordinates.
            senders, receivers: the edges.
            envelope: ``u(r)`` per edge (0 beyond the cutoff).
            rbf: radial basis per edge, or per pair slot when ``pair`` is given (the filter
                is symmetric, so it is computed once per unordered pair).
            harmonics: ``Y(r̂)`` per edge, degrees ``1..L``.
            pair: the pair slot of each edge (``edges["pair"]``) or None.
        """
        n, e = f.shape[0], senders.shape[0]
        h, hd, big_l, d = self.num_heads, self.dim // self.num_heads, self.max_degree, \
            self.degree_dim
        c = self.channels
        # [E, C·L], symmetric in i, j
        spread = degree_norms(x[senders] - x[receivers], big_l).reshape(e, c * big_l)
        if pair is not None:
            spread = pair_mean(spread, pair)
        w = self.filter_out(self.activation(self.filter_in(jnp.concatenate([rbf, spread], -1))))
        if pair is not None:
            w = w[pair]
        # filter columns: [attention (F) | value filter (F, if on) | degrees (C·L·d)]
        nv = self.dim if self.value_filter else 0
        w_f = w[:, :self.dim].reshape(e, h, hd)
        w_x = w[:, self.dim + nv:].reshape(e, c, big_l, d)
        q = self.query(f)[receivers].reshape(e, h, hd)
        k = self.key(f)[senders].reshape(e, h, hd)
        alpha = envelope[:, None] * jnp.sum(q * w_f * k, -1) * (1.0 / math.sqrt(hd))  # [E, H]
        v = self.value(f)[senders].reshape(e, h, hd)
        if nv:
            v = v * w[:, self.dim:self.dim + nv].reshape(e, h, hd)
        msg = segment_sum(alpha[..., None] * v, receivers, num_segments=n).reshape(n, self.dim)
        df = self.out(msg * (1.0 / SUM_NEIGHBOURS))
        p = self.degree_query(f)[receivers].reshape(e, c, big_l, d)
        s = self.degree_key(f)[senders].reshape(e, c, big_l, d)
        beta = envelope[:, None, None] * jnp.sum(p * w_x * s, -1) * (1.0 / math.sqrt(d))
        dx = segment_sum(expand_degrees(beta, big_l) * harmonics[:, None, :], receivers,
                         num_segments=n)  # [N, C, components]
        return df, dx * (1.0 / SUM_NEIGHBOURS)


class DegreeMixing(nnx.Module):
    """SO3krates' interaction block: ``(a, b) = MLP([f, ⊕_{c,l} |(W x)^{cl}|])``, returns
    ``(a, b ⊙ W x)`` (``W^l`` mixes the channels of degree ``l`` with the same weights for
    all its components, ``b^{cl}`` scales a whole degree block: both keep ``x``
    equivariant; no ``W`` with one channel. The norms are the mixed channels', so ``W``
    reaches ``f`` in every block, the last included).

    Args:
        dim: ``F``.
        max_degree: ``L``.
        hidden: width of the MLP's hidden layer.
        activation: its activation.
        channels: ``C``, channels of the coordinates.
    """

    def __init__(self, dim: int, max_degree: int, hidden: int, *,
                 activation: Callable = jax.nn.silu, channels: int = 1, rngs: nnx.Rngs):
        self.dim, self.max_degree, self.activation = dim, max_degree, activation
        self.channels = channels
        self.inner = nnx.Linear(dim + channels * max_degree, hidden, rngs=rngs)
        self.outer = nnx.Linear(hidden, dim + channels * max_degree, rngs=rngs)
        self.channel_mix = nnx.Param(jnp.tile(jnp.eye(channels), (max_degree, 1, 1))) \
            if channels > 1 else None

    def __call__(self, f: Float[Array, "num_nodes features"],
                 x: Float[Array, "num_nodes channels components"]
                 ) -> tuple[Float[Array, "num_nodes features"],
                            Float[Array, "num_nodes channels components"]]:
        n, big_l = f.shape[0], self.max_degree
        if self.channel_mix is not None:  # W^l repeated over degree l's 2l + 1 components
            w = self.channel_mix[...][np.argmax(degree_blocks(big_l), axis=1)]  # [S, C, C]
            x = jnp.einsum("scd,nds->ncs", w, x)
        norms = degree_norms(x, big_l).reshape(n, self.channels * big_l)
        out = self.outer(self.activation(self.inner(jnp.concatenate([f, norms], -1))))
        a, b = out[:, :self.dim], out[:, self.dim:].reshape(n, self.channels, big_l)
        return a, expand_degrees(b, big_l) * x
