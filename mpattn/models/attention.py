"""The attention model: multi-head attention over the atom pairs within a cutoff, with
distance filters, a smooth envelope and a sum readout; registered as ``"attention"``.

It is the model ``python -m experiments.qm9_u0`` trains (class defaults = the ``cpu``
preset's model) and the default potential (``mpattn.Potential`` around it). Options add
PaiNN-style vector channels, a denoising head and a Coulomb term between learned charges.

Reference: Vaswani et al., NeurIPS 2017 (attention); Schütt et al., NeurIPS 2017 (SchNet's
continuous filters); Schütt, Unke & Gastegger, ICML 2021 (PaiNN's vector channels); Godwin
et al., ICLR 2022 (noisy nodes); Unke & Meuwly, JCTC 2019 (PhysNet's electrostatics).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import jraph
from flax import nnx

from mpattn.graph import node_mask
from mpattn.models.common import check_max_z, check_smooth_activation, graph_inputs
from mpattn.nn.attention import ATTENTION_WEIGHTS, SUM_NEIGHBOURS, MultiHeadGraphAttention
from mpattn.nn.electrostatics import (
    CHARGE_INIT,
    COULOMB_SCALE_INIT,
    coulomb_energy,
    neutral_charges,
)
from mpattn.nn.embed import AtomEmbedding
from mpattn.nn.radial import GaussianRBF, polynomial_cutoff
from mpattn.nn.readout import SumReadout, sum_readout
from mpattn.nn.update import ACTIVATIONS
from mpattn.ops import pair_mean, safe_norm, segment_sum, unit_vectors

__all__ = ["AttentionConfig", "AttentionModel"]


@dataclass(frozen=True)
class AttentionConfig:
    """Sizes and options of :class:`AttentionModel`; the defaults are the model the main job
    trains (the ``cpu`` preset of ``experiments.qm9_u0``).

    Attributes:
        dim, num_heads, head_dim, steps, ff_dim: widths and the number of attention blocks.
        num_rbf: Gaussians of the distance filters and bias.
        cutoff: radius (Å) of the attention's envelope.
        max_z: largest embeddable atomic number.
        activation: a smooth activation of :data:`~mpattn.nn.update.ACTIVATIONS`.
        smooth: envelope attention (``False``: the plain softmax of
            :class:`~mpattn.nn.attention.MultiHeadGraphAttention`, no value filter; the energy
            then jumps when an atom crosses the cutoff; kept for ablations).
        value_filter: per-edge radial filter on the values (SchNet-style).
        attention_weights: ``"silu"`` (unnormalised, summed messages) or ``"softmax"`` (the
            smooth normalised weights), see :func:`~mpattn.nn.attention.smooth_graph_attention`.
        vector_features: PaiNN-style equivariant vector channels (needs
            ``num_heads * head_dim == dim`` and ``smooth``).
        vector_messages: weigh vector messages by the attention (``"attention"``) or sum them
            with the envelope as PaiNN does (``"sum"``, divided by ``SUM_NEIGHBOURS``).
        denoise: an equivariant head that reads a 3-vector per atom off the vector channels,
            output ``"noise"`` (needs ``vector_features``; the denoising loss term uses it).
        electrostatics: a Coulomb term between learned, per-molecule neutral charges over
            every edge within ``coulomb_cutoff`` (default ``cutoff``), output ``"charges"``;
            needs a graph holding those pairs (a radius graph at :attr:`graph_cutoff`).
        coulomb_cutoff: the Coulomb term's own envelope radius (Å).
    """

    dim: int = 64
    num_heads: int = 4
    head_dim: int = 16
    steps: int = 3
    ff_dim: int = 128
    num_rbf: int = 32
    cutoff: float = 5.0
    max_z: int = 100
    activation: str = "silu"
    smooth: bool = True
    value_filter: bool = True
    vector_features: bool = False
    vector_messages: str = "attention"
    attention_weights: str = "silu"
    denoise: bool = False
    electrostatics: bool = False
    coulomb_cutoff: float | None = None

    @property
    def graph_cutoff(self) -> float:
        """The radius (Å) a radius graph needs for this model: the largest of its cutoffs."""
        return max(self.cutoff, self.coulomb_cutoff or 0.0)

    def __post_init__(self) -> None:
        if self.denoise and not self.vector_features:
            raise ValueError("denoise needs vector_features=True (the noise is read off the "
                             "vector channels)")
        if self.attention_weights not in ATTENTION_WEIGHTS:
            raise ValueError(f"attention_weights must be 'softmax' or 'silu', got "
                             f"{self.attention_weights!r}")
        if self.attention_weights == "silu" and not self.smooth:
            raise ValueError("attention_weights='silu' needs smooth=True (it replaces the "
                             "smooth attention's weights)")
        if self.vector_messages not in ("attention", "sum"):
            raise ValueError(f"vector_messages must be 'attention' or 'sum', got "
                             f"{self.vector_messages!r}")
        if self.vector_features and (self.num_heads * self.head_dim != self.dim
                                     or not self.smooth):
            raise ValueError("vector_features needs num_heads * head_dim == dim and smooth "
                             f"attention, got {self.num_heads} x {self.head_dim} heads, dim "
                             f"{self.dim}, smooth={self.smooth}")
        check_smooth_activation(self.activation)
        if self.steps < 1 or not self.cutoff > 0:
            raise ValueError(f"need steps >= 1 and cutoff > 0, got {self.steps}, {self.cutoff}")
        if self.coulomb_cutoff is not None and not (self.electrostatics
                                                    and self.coulomb_cutoff > 0):
            raise ValueError(f"coulomb_cutoff={self.coulomb_cutoff} needs electrostatics=True "
                             "and a positive value (Å)")


class AttentionModel(nnx.Module):
    """Invariant attention over a radius (or complete) graph; ``model(graph)`` returns the
    output mapping ``{"energy": [G], "per_atom": [N]}`` (plus ``"noise"`` [N, 3] with the
    denoising head, ``"charges"`` [N] with electrostatics); docs/design.md.

    ``h⁰ = Embed(Z)`` (atomic number only: no RDKit features or bond categories, since MD can
    break bonds), then ``steps`` pre-LN blocks, each with its own weights (``x = LN(h)``)::

        h = h + MultiHeadGraphAttention(x, envelope = polynomial_cutoff(r, p=6),
                bias = Linear(RBF(r)) · cos_cutoff(r),          # per head
                value_filter = Dense(act(Dense(RBF(r)))))       # SchNet-style, per channel
        h = h + Dense(act(Dense(LN(h))))

    then ``E_i = Dense(act(Dense(LN(h_i))))`` summed per graph. The envelope makes the energy
    C² in the positions at the cutoff; SiLU keeps forces smooth. The value filter gives every
    channel its own radial dependence (without it geometry enters only through one attention
    weight per head).

    With ``vector_features`` every atom also carries ``dim`` vector channels ``V_i`` [3, dim]
    (zero at the start) that see directions, not only distances: after each attention block,
    ``V_i += Σ_e alpha_e ⊙ [a_e r̂_e + b_e ⊙ V_{s_e}]`` and the gated update
    ``V += g_vv ⊙ U V``, ``h += g_sv ⊙ <U V, W V> + g_ss`` (:meth:`_vector_block`). The energy
    stays invariant (``h`` sees ``V`` only through norms and dot products) and smooth.

    With ``electrostatics`` a linear head reads a charge off each final atom state, made
    neutral per molecule (:func:`~mpattn.nn.electrostatics.neutral_charges`), and the energy
    gains ``s Σ_pairs q_i q_j f(r) / sqrt(r² + 1 Å²)`` with a learned scale ``s``.
    """

    def __init__(self, config: AttentionConfig | None = None, *, rngs: nnx.Rngs):
        c = self.config = config or AttentionConfig()
        self.embed = AtomEmbedding(c.dim, max_z=c.max_z, rngs=rngs)
        self.rbf = GaussianRBF(c.num_rbf, c.cutoff)  # no parameters
        self.attn_norms = nnx.List([nnx.LayerNorm(c.dim, rngs=rngs) for _ in range(c.steps)])
        self.attentions = nnx.List([
            MultiHeadGraphAttention(c.dim, c.num_heads, c.head_dim, edge_bias="distance",
                                    num_rbf=c.num_rbf, cutoff=c.cutoff, rngs=rngs)
            for _ in range(c.steps)
        ])
        self.ff_norms = nnx.List([nnx.LayerNorm(c.dim, rngs=rngs) for _ in range(c.steps)])
        self.ff_in = nnx.List([nnx.Linear(c.dim, c.ff_dim, rngs=rngs) for _ in range(c.steps)])
        self.ff_out = nnx.List([nnx.Linear(c.ff_dim, c.dim, rngs=rngs) for _ in range(c.steps)])
        width = c.num_heads * c.head_dim
        self.filters = nnx.List([
            nnx.List([nnx.Linear(c.num_rbf, width, rngs=rngs), nnx.Linear(width, width,
                                                                           rngs=rngs)])
            for _ in range(c.steps)
        ]) if c.value_filter else None
        if c.vector_features:
            def per_step(make):
                return nnx.List([make() for _ in range(c.steps)])

            # message: sender features and a radial filter give the weights of r̂ and of V_j
            self.vec_sender = per_step(lambda: nnx.Linear(c.dim, 2 * c.dim, rngs=rngs))
            self.vec_radial = per_step(lambda: nnx.Linear(c.num_rbf, 2 * c.dim, rngs=rngs))
            # update: channel mixes U, W of V (no bias: equivariant) and the gates
            self.vec_u = per_step(lambda: nnx.Linear(c.dim, c.dim, use_bias=False, rngs=rngs))
            self.vec_w = per_step(lambda: nnx.Linear(c.dim, c.dim, use_bias=False, rngs=rngs))
            self.vec_gate_in = per_step(lambda: nnx.Linear(2 * c.dim, c.dim, rngs=rngs))
            self.vec_gate_out = per_step(lambda: nnx.Linear(c.dim, 3 * c.dim, rngs=rngs))
        # equivariant channel mix V [3, dim] -> [3]: no bias
        self.denoise_head = nnx.Linear(c.dim, 1, use_bias=False, rngs=rngs) if c.denoise \
            else None
        # per-atom charges (made neutral per molecule, so no bias), starting small
        self.charge_head = nnx.Linear(
            c.dim, 1, use_bias=False, rngs=rngs,
            kernel_init=jax.nn.initializers.normal(CHARGE_INIT / math.sqrt(c.dim))
        ) if c.electrostatics else None
        self.coulomb_scale = nnx.Param(jnp.asarray(COULOMB_SCALE_INIT, jnp.float32)) \
            if c.electrostatics else None
        self.final_norm = nnx.LayerNorm(c.dim, rngs=rngs)
        self.readout = SumReadout(c.dim, 1, hidden=c.dim // 2,
                                  activation=ACTIVATIONS[c.activation], rngs=rngs)

    def check(self, graph: jraph.GraphsTuple) -> None:
        """Eager check: every atomic number is embeddable (``<= max_z``)."""
        check_max_z(graph, self.config.max_z, "attention")

    def _attend(self, t: int, x, g, envelope, d, rbf):
        """Attention block ``t``: its output [N, dim] and its weights [E, H] (None when not
        smooth)."""
        attn = self.attentions[t]
        if not self.config.smooth:
            return attn(x, senders=g.senders, receivers=g.receivers, distances=g.distances), None
        filt = None
        if self.filters is not None:
            act = ACTIVATIONS[self.config.activation]
            inner, outer = self.filters[t]
            filt = _per_edge(outer(act(inner(rbf))), g).reshape(
                (-1, attn.num_heads, attn.head_dim))
        return attn(x, senders=g.senders, receivers=g.receivers, distances=d, pair=g.pair,
                    envelope=envelope, value_filter=filt,
                    weights=self.config.attention_weights, return_weights=True)

    def _vector_block(self, t: int, x, h, vec, alpha, envelope, unit, g, rbf):
        """PaiNN-style vector message (weighted by the attention) and update of block ``t``.

        ``V_i += Σ_e alpha_e ⊙ [a_e r̂_e + b_e ⊙ V_{s_e}]`` with ``(a_e, b_e) = φ(x_{s_e}) ⊙
        W(r_e)`` per channel (``alpha`` of the channel's head; with ``vector_messages="sum"``
        the envelope ``f(r_e) / SUM_NEIGHBOURS`` for every channel); then with ``U V``, ``W V``
        (channel mixes): ``V += g_vv ⊙ U V`` and ``h += g_sv ⊙ <U V, W V> + g_ss`` where
        ``(g_vv, g_sv, g_ss) = MLP([x, |W V|])``.
        """
        act = ACTIVATIONS[self.config.activation]
        n, dim = h.shape
        if self.config.vector_messages == "sum":
            a_ch = (envelope / SUM_NEIGHBOURS)[:, None]  # [E, 1]: PaiNN's sum, scaled
        else:
            a_ch = jnp.repeat(alpha, dim // alpha.shape[1], axis=1)  # [E, dim]: its head's
        phi = self.vec_sender[t](x)[g.senders] * _per_edge(self.vec_radial[t](rbf), g)
        along, keep = phi[:, :dim], phi[:, dim:]
        msg = along[:, None, :] * unit[:, :, None] + keep[:, None, :] * vec[g.senders]
        vec = vec + segment_sum(a_ch[:, None, :] * msg, g.receivers, num_segments=n)
        uv, wv = self.vec_u[t](vec), self.vec_w[t](vec)  # [N, 3, dim]
        gate = self.vec_gate_out[t](act(self.vec_gate_in[t](
            jnp.concatenate([x, safe_norm(wv, axis=1)], axis=-1))))
        g_vv, g_sv, g_ss = gate[:, :dim], gate[:, dim:2 * dim], gate[:, 2 * dim:]
        vec = vec + g_vv[:, None, :] * uv
        h = h + g_sv * jnp.sum(uv * wv, axis=1) + g_ss
        return h, vec

    def __call__(self, graph: jraph.GraphsTuple) -> dict[str, jax.Array]:
        """The output mapping of a padded batch (padding graphs and nodes give 0)."""
        c = self.config
        act = ACTIVATIONS[c.activation]
        g = graph_inputs(graph)
        # symmetric edges (edges["pair"]): the radial networks run once per unordered pair
        d = g.distances if g.pair is None else pair_mean(g.distances, g.pair)
        envelope = _per_edge(polynomial_cutoff(d, c.cutoff), g)
        rbf = self.rbf(d) if c.smooth else None
        h = self.embed(graph.nodes)
        vec = unit = None
        if c.vector_features:
            vec = jnp.zeros((h.shape[0], 3, c.dim), h.dtype)
            unit = unit_vectors(g.vectors, g.distances)
        for t in range(c.steps):
            x = self.attn_norms[t](h)
            out, alpha = self._attend(t, x, g, envelope, d, rbf)
            h = h + out
            if c.vector_features:
                h, vec = self._vector_block(t, x, h, vec, alpha, envelope, unit, g, rbf)
            h = h + self.ff_out[t](act(self.ff_in[t](self.ff_norms[t](h))))
        x = self.final_norm(h)
        mask = node_mask(graph)
        energy, per_atom = self.readout(x, g.n_node, mask=mask, per_atom=True)
        out = {}
        if self.charge_head is not None:
            q = neutral_charges(self.charge_head(x)[:, 0], g.n_node, mask)
            env_q = envelope
            if c.coulomb_cutoff is not None:
                env_q = _per_edge(polynomial_cutoff(d, c.coulomb_cutoff), g)
            e_coul = self.coulomb_scale[...] * coulomb_energy(
                q, _per_edge(d, g), env_q, senders=g.senders, receivers=g.receivers)
            energy = energy + sum_readout(e_coul, g.n_node, mask=mask)
            per_atom = per_atom + e_coul
            out["charges"] = q
        if self.denoise_head is not None:
            out["noise"] = self.denoise_head(vec)[..., 0]
        return {"energy": energy, "per_atom": per_atom, **out}


def _per_edge(v, g):
    """Radial terms are computed once per pair slot when the edges come in pairs."""
    return v if g.pair is None else v[g.pair]
