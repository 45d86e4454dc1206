"""Real spherical harmonics and per-degree operations on spherical-harmonic coordinates.

Equivariant features here are *spherical-harmonic coordinates* (SO3krates' "Euclidean
variables"): one real number per ``(l, m)`` for the degrees ``l = 1..L``, flattened to
``[..., (L + 1)**2 - 1]`` with the ``2l + 1`` components of degree ``l`` at
``[l**2 - 1, (l + 1)**2 - 1)``. Degree 0 is left out: it is invariant, and the invariant
features carry that information. Under a rotation ``R`` each degree block transforms by its
own Wigner D-matrix, so every function of the per-degree norms is invariant.

The harmonics come from ``e3x.so3.spherical_harmonics`` (Unke & Maennel, 2024) with Racah's
normalisation (``Σ_m Y_l^m(r̂)² = 1`` for every degree, so no degree dominates) and e3x's
Cartesian order (degree 1 is ``(x, y, z)``); the Wigner D-matrices that rotate them are
``e3x.so3.wigner_d`` (the tests use it).

Reference: Frank, Unke & Müller, "So3krates: Equivariant attention for interactions on
arbitrary length-scales in molecular systems", NeurIPS 2022; Frank, Unke, Müller &
Chmiela, "A Euclidean transformer for fast and stable machine learned force fields",
Nat. Commun. 15, 6539 (2024).
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

__all__ = [
    "NORM_EPS",
    "degree_blocks",
    "degree_norms",
    "expand_degrees",
    "num_components",
    "spherical_harmonics",
]

NORM_EPS = 0.1
"""``ε`` of the smooth per-degree norm ``sqrt(|x_l|² + ε²) - ε``: the plain norm has a kink
(hence jumping forces) where ``x_l`` passes through 0; this one is smooth everywhere, 0 at 0
and within ``ε`` of the norm."""


def num_components(max_degree: int) -> int:
    """Number of spherical-harmonic coordinates of degrees ``1..max_degree``: ``(L+1)² - 1``."""
    if max_degree < 1:
        raise ValueError(f"max_degree must be at least 1, got {max_degree}")
    return (max_degree + 1) ** 2 - 1


@functools.cache
def degree_blocks(max_degree: int) -> np.ndarray:
    """One-hot ``[(L+1)² - 1, L]`` matrix: component ``c`` belongs to degree ``l`` (column
    ``l - 1``). ``x**2 @ P`` sums squares per degree; ``s @ P.T`` repeats a per-degree value
    over its ``2l + 1`` components."""
    degree = np.concatenate([np.full(2 * l + 1, l) for l in range(1, max_degree + 1)])
    return (degree[:, None] == np.arange(1, max_degree + 1)[None, :]).astype(np.float32)


def spherical_harmonics(unit: Float[Array, "... 3"], max_degree: int
                        ) -> Float[Array, "... components"]:
    """Real spherical harmonics of the degrees ``1..max_degree`` at unit vectors.

    Args:
        unit: ``[..., 3]`` unit vectors (:func:`mpattn.ops.unit_vectors`; its zero vectors
            of padding edges give finite values and gradients, never used).
        max_degree: ``L >= 1``.

    Returns:
        ``[..., (L+1)² - 1]`` in Racah's normalisation and e3x's Cartesian order.
    """
    from e3x.so3 import spherical_harmonics as e3x_harmonics  # imports sympy: only when used

    y = e3x_harmonics(unit, max_degree=max_degree, r_is_normalized=True,
                      cartesian_order=True, normalization="racah")
    return y[..., 1:]


def degree_norms(x: Float[Array, "... components"], max_degree: int, *,
                 eps: float = NORM_EPS) -> Float[Array, "... degrees"]:
    """Smooth norm of each degree block, ``sqrt(|x_l|² + ε²) - ε`` (see :data:`NORM_EPS`).

    Invariant under rotations (each block rotates by an orthogonal Wigner D-matrix).
    """
    blocks = jnp.asarray(degree_blocks(max_degree), x.dtype)
    sq = (x * x) @ blocks
    return jnp.sqrt(sq + eps * eps) - eps


def expand_degrees(values: Float[Array, "... degrees"], max_degree: int
                   ) -> Float[Array, "... components"]:
    """Repeat one value per degree over that degree's ``2l + 1`` components."""
    return values @ jnp.asarray(degree_blocks(max_degree), values.dtype).T
