"""SO3krates: equivariant attention with spherical-harmonic coordinates up to degree L (the
Euclidean transformer of Frank et al.); registered as ``"so3krates"``.

Reference: Frank, Unke & Müller, "So3krates: Equivariant attention for interactions on
arbitrary length-scales in molecular systems", NeurIPS 2022; Frank, Unke, Müller & Chmiela,
"A Euclidean transformer for fast and stable machine learned force fields", Nat. Commun. 15,
6539 (2024).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import jraph
from flax import nnx

from mpattn.graph import node_mask
from mpattn.models.common import check_max_z, check_smooth_activation, graph_inputs
from mpattn.nn.attention import SUM_NEIGHBOURS
from mpattn.nn.embed import AtomEmbedding
from mpattn.nn.euclidean import DegreeMixing, EuclideanAttention
from mpattn.nn.radial import bessel_basis, polynomial_cutoff
from mpattn.nn.readout import SumReadout
from mpattn.nn.spherical import expand_degrees, spherical_harmonics
from mpattn.nn.update import ACTIVATIONS
from mpattn.ops import pair_mean, segment_sum, unit_vectors

__all__ = ["So3krates", "So3kratesConfig"]


@dataclass(frozen=True)
class So3kratesConfig:
    """Sizes of :class:`So3krates`; the defaults are the model we train.

    Attributes:
        dim: ``F``, width of the invariant features.
        max_degree: ``L``, the highest degree of the spherical-harmonic coordinates.
        num_heads: heads of the invariant attention (``dim % num_heads == 0``).
        degree_dim: query/key width of each degree's attention head.
        steps: Euclidean-transformer blocks (each with its own weights).
        mix_dim: hidden width of each block's interaction (degree-mixing) MLP.
        num_rbf: Bessel functions of the radial basis.
        cutoff: radius (Å) of the envelope; every message fades to 0 there.
        max_z: largest embeddable atomic number.
        activation: a smooth activation of :data:`~mpattn.nn.update.ACTIVATIONS`.
        value_filter: a per-channel radial filter on the invariant attention's values
            (:class:`~mpattn.nn.euclidean.EuclideanAttention`).
        channels: channels of the spherical-harmonic coordinates (SO3krates: 1), each with
            its own attention head per degree, mixed within a degree by
            :class:`~mpattn.nn.euclidean.DegreeMixing`.
        denoise: a denoising head, output ``"noise"`` [N, 3]: the degree-1 coordinates
            scaled by a linear map of ``f`` (equivariant; the denoising loss term switches
            it on).
    """

    dim: int = 64
    max_degree: int = 3
    num_heads: int = 4
    degree_dim: int = 16
    steps: int = 2
    mix_dim: int = 128
    num_rbf: int = 32
    cutoff: float = 5.0
    max_z: int = 100
    activation: str = "silu"
    value_filter: bool = False
    channels: int = 1
    denoise: bool = False

    @property
    def graph_cutoff(self) -> float:
        """The radius (Å) a radius graph needs for this model."""
        return self.cutoff

    def __post_init__(self) -> None:
        if self.max_degree < 1:
            raise ValueError(f"max_degree must be at least 1, got {self.max_degree}")
        if self.dim % self.num_heads:
            raise ValueError(f"dim={self.dim} must be a multiple of num_heads={self.num_heads}")
        if self.channels < 1:
            raise ValueError(f"channels must be at least 1, got {self.channels}")
        if self.steps < 1 or not self.cutoff > 0:
            raise ValueError(f"need steps >= 1 and cutoff > 0, got {self.steps}, {self.cutoff}")
        check_smooth_activation(self.activation)


class So3krates(nnx.Module):
    """Invariant features ``f`` and spherical-harmonic coordinates ``x`` (degrees 1..L) per
    atom; ``model(graph)`` returns ``{"energy": [G], "per_atom": [N]}`` (docs/design.md).

    ``f⁰ = Embed(Z)``; ``x⁰_i = Σ_j u(r_ij) ⊕_l c_l(r_ij) Y_l(r̂_ij) / N̄`` with learned
    radial weights ``c_l`` (``c_{cl}`` per channel ``c``). Then ``steps`` blocks of
    :class:`~mpattn.nn.euclidean.EuclideanAttention` and
    :class:`~mpattn.nn.euclidean.DegreeMixing`, pre-LN on ``f``::

        Δf, Δx = EuclideanAttention(LN(f), x);  f += Δf;  x += Δx
        a, b x = DegreeMixing(LN(f), x);         f += a;   x += b x

    and ``E_i = Dense(act(Dense(LN(f_i))))`` summed per graph. The radial basis is DimeNet's
    Bessel functions, the envelope the polynomial cutoff (``p = 6``): the energy is C² in
    the positions at the cutoff. Works on any edge set (radius or complete graphs; only
    pairs within ``cutoff`` contribute).
    """

    def __init__(self, config: So3kratesConfig | None = None, *, rngs: nnx.Rngs):
        c = self.config = config or So3kratesConfig()
        act = ACTIVATIONS[c.activation]
        self.embed = AtomEmbedding(c.dim, max_z=c.max_z, rngs=rngs)
        self.x_radial = nnx.Linear(c.num_rbf, c.channels * c.max_degree, rngs=rngs)
        self.attn_norms = nnx.List([nnx.LayerNorm(c.dim, rngs=rngs) for _ in range(c.steps)])
        self.attentions = nnx.List([
            EuclideanAttention(c.dim, c.num_heads, c.max_degree, c.num_rbf,
                               degree_dim=c.degree_dim, activation=act,
                               value_filter=c.value_filter, channels=c.channels, rngs=rngs)
            for _ in range(c.steps)])
        self.mix_norms = nnx.List([nnx.LayerNorm(c.dim, rngs=rngs) for _ in range(c.steps)])
        self.mixings = nnx.List([
            DegreeMixing(c.dim, c.max_degree, c.mix_dim, activation=act, channels=c.channels,
                         rngs=rngs)
            for _ in range(c.steps)])
        self.final_norm = nnx.LayerNorm(c.dim, rngs=rngs)
        self.readout = SumReadout(c.dim, 1, hidden=c.dim // 2, activation=act, rngs=rngs)
        self.denoise_head = nnx.Linear(c.dim, 1, rngs=rngs) if c.denoise else None

    def check(self, graph: jraph.GraphsTuple) -> None:
        """Eager check: every atomic number is embeddable (``<= max_z``)."""
        check_max_z(graph, self.config.max_z, "so3krates")

    def features(self, graph: jraph.GraphsTuple) -> tuple[jax.Array, jax.Array]:
        """The last block's invariant features ``f`` [N, dim] and spherical-harmonic
        coordinates ``x`` [N, channels, (L+1)² - 1] (degree ``l`` at ``[l² - 1, (l+1)² -
        1)``, e3x's Cartesian order: rotating the molecule by ``R`` maps ``x`` to
        ``x D(R)``)."""
        c = self.config
        g = graph_inputs(graph)
        n = graph.nodes["z"].shape[0]
        # the radial terms are symmetric: once per unordered pair when edges come in pairs
        d = g.distances if g.pair is None else pair_mean(g.distances, g.pair)
        u = polynomial_cutoff(d, c.cutoff)
        rbf = bessel_basis(d, num=c.num_rbf, cutoff=c.cutoff) * u[:, None]
        envelope = u if g.pair is None else u[g.pair]
        harmonics = spherical_harmonics(unit_vectors(g.vectors, g.distances), c.max_degree)
        weights = self.x_radial(rbf)
        weights = weights if g.pair is None else weights[g.pair]
        weights = (envelope[:, None] * weights).reshape(-1, c.channels, c.max_degree)
        x = segment_sum(expand_degrees(weights, c.max_degree) * harmonics[:, None, :],
                        g.receivers, num_segments=n) * (1.0 / SUM_NEIGHBOURS)
        f = self.embed(graph.nodes)
        for t in range(c.steps):
            df, dx = self.attentions[t](self.attn_norms[t](f), x, senders=g.senders,
                                        receivers=g.receivers, envelope=envelope, rbf=rbf,
                                        harmonics=harmonics, pair=g.pair)
            f, x = f + df, x + dx
            a, bx = self.mixings[t](self.mix_norms[t](f), x)
            f, x = f + a, x + bx
        return f, x

    def __call__(self, graph: jraph.GraphsTuple) -> dict[str, jax.Array]:
        """The output mapping of a padded batch (padding graphs and nodes give 0)."""
        f, x = self.features(graph)
        f = self.final_norm(f)
        energy, per_atom = self.readout(f, jnp.asarray(graph.n_node), mask=node_mask(graph),
                                        per_atom=True)
        out = {"energy": energy, "per_atom": per_atom}
        if self.denoise_head is not None:  # degree 1 is (x, y, z): a vector per atom
            out["noise"] = self.denoise_head(f) * x[:, 0, :3]
        return out
