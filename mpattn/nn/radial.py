"""Radial bases, smooth cutoffs and NaN-safe edge distances.

Pure functions that map interatomic distances ``r`` (Å) to features, plus thin NNX modules that
hold their settings. Bases return ``r.shape + (num,)``; cutoff functions return ``r.shape``.

The bases themselves are *not* cut off (as in SchNetPack, DimeNet and MACE): a Gaussian is not
zero at the cutoff and ``sin(n pi r / c) / r`` oscillates beyond it. Multiply a basis by
:func:`cosine_cutoff` (value and first derivative vanish at ``c``) or :func:`polynomial_cutoff`
(value, first and second derivative vanish at ``c``) to make features that go smoothly to zero
at the cutoff, e.g. ``bessel_basis(r, ...) * polynomial_cutoff(r, c)[..., None]``.

Everything is differentiable with finite gradients everywhere, including ``r = 0`` (two atoms
at the same position: :func:`edge_distances` uses :func:`mpattn.ops.safe_norm`, and
:func:`bessel_basis` switches to its Taylor series near 0 with the double-``where`` trick) and
``r = cutoff`` exactly. All functions keep the dtype of ``r`` (float32 or float64).

References:
    Schütt et al., "SchNet: A continuous-filter convolutional neural network for modeling
    quantum interactions", NeurIPS 2017 (Gaussian basis, cosine cutoff of Behler 2011).
    Gasteiger, Groß & Günnemann, "Directional Message Passing for Molecular Graphs",
    ICLR 2020 (DimeNet: Bessel basis, polynomial envelope).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from mpattn.ops import edge_vectors, safe_norm

__all__ = [
    "BesselRBF",
    "GaussianRBF",
    "bessel_basis",
    "cosine_cutoff",
    "edge_distances",
    "gaussian_basis",
    "polynomial_cutoff",
]

# Below |y| = |f_n r / c| < _TAYLOR_Y, sin(y)/y is evaluated by its Taylor series
# 1 - y^2/6 + y^4/120 - y^6/5040 (truncation error y^8/9! < 3e-14 relative at y = 0.1), which
# keeps both value and gradient accurate and finite down to r = 0.
_TAYLOR_Y = 0.1


def gaussian_basis(r: Float[Array, "*shape"], *, num: int, cutoff: float, start: float = 0.0
                   ) -> Float[Array, "*shape num"]:
    """SchNet's Gaussian radial basis.

    ``g_k(r) = exp(-gamma (r - mu_k)^2)`` with ``num`` centres ``mu_k = linspace(start, cutoff,
    num)``, spacing ``delta = (cutoff - start) / (num - 1)`` and ``gamma = 1 / (2 delta^2)``
    (width = spacing, SchNetPack's default). Not cut off: multiply by a cutoff function.

    Args:
        r: Distances, any shape.
        num: Number of Gaussians (>= 2).
        cutoff: Last centre (Å).
        start: First centre (Å).

    Returns:
        ``r.shape + (num,)`` features in ``(0, 1]``.

    Reference: Schütt et al., NeurIPS 2017.
    """
    if num < 2:
        raise ValueError(f"gaussian_basis needs num >= 2, got {num}")
    if not cutoff > start:
        raise ValueError(f"gaussian_basis needs cutoff > start, got {cutoff} <= {start}")
    r = jnp.asarray(r)
    mu = jnp.linspace(start, cutoff, num, dtype=r.dtype)
    delta = (cutoff - start) / (num - 1)
    gamma = 0.5 / delta**2
    return jnp.exp(-gamma * (r[..., None] - mu) ** 2)


def bessel_basis(r: Float[Array, "*shape"], *, num: int, cutoff: float,
                 frequencies: Float[Array, " num"] | None = None) -> Float[Array, "*shape num"]:
    """DimeNet's spherical Bessel (order 0) radial basis.

    ``e_n(r) = sqrt(2 / c) sin(f_n r / c) / r`` with ``f_n = n pi`` (``n = 1..num``) unless
    trainable ``frequencies`` are given. At ``r -> 0`` the limit is ``sqrt(2 / c) f_n / c``; near 0
    the Taylor series of ``sin(y)/y`` is used behind a double ``where`` so that value and gradient
    are exact and finite at ``r = 0``. Zero at ``r = c`` for the default frequencies, but not cut
    off beyond ``c``: multiply by :func:`polynomial_cutoff`.

    Args:
        r: Distances (>= 0), any shape.
        num: Number of basis functions.
        cutoff: ``c`` (Å).
        frequencies: Optional ``[num]`` frequencies ``f_n`` (default ``n pi``).

    Returns:
        ``r.shape + (num,)`` features.

    Reference: Gasteiger et al., ICLR 2020, eq. 7.
    """
    if num < 1:
        raise ValueError(f"bessel_basis needs num >= 1, got {num}")
    r = jnp.asarray(r)
    if frequencies is None:
        freq = jnp.arange(1, num + 1, dtype=r.dtype) * math.pi
    else:
        freq = jnp.asarray(frequencies, dtype=r.dtype)
        if freq.shape != (num,):
            raise ValueError(f"frequencies must have shape ({num},), got {freq.shape}")
    a = freq / cutoff  # [num]
    rb = r[..., None]
    y = a * rb
    small = jnp.abs(y) < _TAYLOR_Y
    safe_r = jnp.where(small, 1.0, rb)  # the inner where: no 0 ever reaches sin(.)/r
    exact = jnp.sin(a * safe_r) / safe_r
    y2 = y * y
    taylor = a * (1.0 - y2 / 6.0 * (1.0 - y2 / 20.0 * (1.0 - y2 / 42.0)))
    return math.sqrt(2.0 / cutoff) * jnp.where(small, taylor, exact)


def cosine_cutoff(r: Float[Array, "*shape"], cutoff: float) -> Float[Array, "*shape"]:
    """Behler's cosine cutoff ``0.5 (cos(pi r / c) + 1)`` for ``r < c``, else 0.

    Value and first derivative are continuous (both 0) at ``r = c``.

    Reference: Behler, J. Chem. Phys. 134, 074106 (2011); used by SchNet.
    """
    r = jnp.asarray(r)
    inside = r < cutoff
    # clamp before cos: no gradient ever flows from the discarded branch beyond the cutoff
    rc = jnp.where(inside, r, cutoff)
    return jnp.where(inside, 0.5 * (jnp.cos(math.pi * rc / cutoff) + 1.0), 0.0)


def polynomial_cutoff(r: Float[Array, "*shape"], cutoff: float, p: int = 6
                      ) -> Float[Array, "*shape"]:
    """DimeNet's polynomial envelope, 0 for ``r >= c``.

    ``u(d) = 1 - (p+1)(p+2)/2 d^p + p(p+2) d^(p+1) - p(p+1)/2 d^(p+2)`` with ``d = r / c``:
    ``u(0) = 1`` and ``u``, ``u'`` and ``u''`` vanish at ``d = 1``.

    Args:
        r: Distances (>= 0), any shape.
        cutoff: ``c`` (Å).
        p: Integer exponent (DimeNet uses 6, i.e. ``envelope_exponent=5`` in its code).

    Reference: Gasteiger et al., ICLR 2020, eq. 8.
    """
    if int(p) != p or p < 1:
        raise ValueError(f"polynomial_cutoff needs an integer p >= 1, got {p}")
    p = int(p)
    r = jnp.asarray(r)
    inside = r < cutoff
    d = jnp.where(inside, r, cutoff) / cutoff
    dp = d**p
    u = (1.0 - 0.5 * (p + 1) * (p + 2) * dp + p * (p + 2) * dp * d
         - 0.5 * p * (p + 1) * dp * d * d)
    return jnp.where(inside, u, 0.0)


def edge_distances(positions: Float[Array, "num_nodes 3"], *, senders: Int[Array, " num_edges"],
                   receivers: Int[Array, " num_edges"],
                   shift: Float[Array, "num_edges 3"] | None = None
                   ) -> tuple[Float[Array, "num_edges 3"], Float[Array, " num_edges"]]:
    """Edge vectors and lengths, ``positions[senders] - positions[receivers] (+ shift)``.

    The norm is :func:`mpattn.ops.safe_norm`: two atoms at the same position (e.g. padding
    nodes, all at the origin) give distance 0 with a finite (zero) gradient instead of NaN.

    Args:
        positions: [num_nodes, 3] Cartesian coordinates (Å).
        senders: int [num_edges].
        receivers: int [num_edges].
        shift: Optional [num_edges, 3] periodic image shifts (``edges["shift"]``).

    Returns:
        ``(vectors [num_edges, 3], distances [num_edges])``.
    """
    vec = edge_vectors(positions, senders=senders, receivers=receivers, shift=shift)
    return vec, safe_norm(vec)


class GaussianRBF(nnx.Module):
    """:func:`gaussian_basis` as a module (no parameters).

    Args:
        num: Number of Gaussians.
        cutoff: Last centre (Å).
        start: First centre (Å).
    """

    def __init__(self, num: int, cutoff: float, start: float = 0.0):
        if num < 2 or not cutoff > start:
            raise ValueError(f"GaussianRBF needs num >= 2 and cutoff > start, got num={num}, "
                             f"cutoff={cutoff}, start={start}")
        self.num = int(num)
        self.cutoff = float(cutoff)
        self.start = float(start)

    def __call__(self, r: Float[Array, "*shape"]) -> Float[Array, "*shape num"]:
        return gaussian_basis(r, num=self.num, cutoff=self.cutoff, start=self.start)


class BesselRBF(nnx.Module):
    """:func:`bessel_basis` as a module, optionally with trainable frequencies (DimeNet).

    Args:
        num: Number of basis functions.
        cutoff: ``c`` (Å).
        trainable: If True the frequencies ``f_n`` (initialised to ``n pi``) are an
            ``nnx.Param``; otherwise they are the fixed ``n pi`` and the module has no state.
        param_dtype: dtype of the trainable frequencies.
    """

    def __init__(self, num: int, cutoff: float, trainable: bool = False, *,
                 param_dtype=jnp.float32):
        if num < 1:
            raise ValueError(f"BesselRBF needs num >= 1, got {num}")
        self.num = int(num)
        self.cutoff = float(cutoff)
        self.trainable = bool(trainable)
        self.frequencies = (
            nnx.Param(jnp.arange(1, num + 1, dtype=param_dtype) * math.pi) if trainable else None
        )

    def __call__(self, r: Float[Array, "*shape"]) -> Float[Array, "*shape num"]:
        freq = None if self.frequencies is None else self.frequencies[...]
        return bessel_basis(r, num=self.num, cutoff=self.cutoff, frequencies=freq)
