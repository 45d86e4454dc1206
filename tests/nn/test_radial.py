"""Radial bases, cutoffs and NaN-safe edge distances (mpattn.nn.radial)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mpattn.nn import radial
from mpattn.nn.radial import BesselRBF, GaussianRBF, edge_distances

# The tests call jit-compiled versions (one compilation per shape instead of one per primitive
# in eager mode, which keeps the suite fast); test_modules_match_functions runs eagerly.
gaussian_basis = jax.jit(radial.gaussian_basis, static_argnames=("num", "cutoff", "start"))
bessel_basis = jax.jit(radial.bessel_basis, static_argnames=("num", "cutoff"))
cosine_cutoff = jax.jit(radial.cosine_cutoff, static_argnames=("cutoff",))
polynomial_cutoff = jax.jit(radial.polynomial_cutoff, static_argnames=("cutoff", "p"))



# ----------------------------------------------------------------------------- hand values


def test_gaussian_basis_hand_values():
    # centres linspace(0, 2, 3) = [0, 1, 2], spacing 1, gamma = 1 / (2 * 1^2) = 0.5
    # r = 1:   exp(-0.5 * [1, 0, 1])         = [0.60653066, 1, 0.60653066]
    # r = 0.5: exp(-0.5 * [0.25, 0.25, 2.25]) = [0.88249690, 0.88249690, 0.32465247]
    out = gaussian_basis(jnp.array([1.0, 0.5]), num=3, cutoff=2.0)
    np.testing.assert_allclose(
        out, [[0.60653066, 1.0, 0.60653066], [0.88249690, 0.88249690, 0.32465247]], rtol=1e-6
    )
    # start shifts the centres: linspace(1, 3, 3) = [1, 2, 3] -> r = 2 sits on the middle one
    np.testing.assert_allclose(gaussian_basis(jnp.array(2.0), num=3, cutoff=3.0, start=1.0),
                               [0.60653066, 1.0, 0.60653066], rtol=1e-6)


def test_basis_shapes_and_dtype():
    r = jnp.ones((2, 5), jnp.float32)
    assert gaussian_basis(r, num=7, cutoff=5.0).shape == (2, 5, 7)
    assert bessel_basis(r, num=4, cutoff=5.0).shape == (2, 5, 4)
    assert cosine_cutoff(r, 5.0).shape == (2, 5)
    assert polynomial_cutoff(r, 5.0).shape == (2, 5)
    assert bessel_basis(r, num=4, cutoff=5.0).dtype == jnp.float32


def test_bessel_basis_hand_values():
    # c = 2: sqrt(2/c) = 1, e_n(r) = sin(n pi r / 2) / r
    # r = 1:   [sin(pi/2), sin(pi), sin(3 pi/2)] / 1 = [1, 0, -1]
    # r = 0.5: [sin(pi/4), sin(pi/2), sin(3 pi/4)] / 0.5 = [1.41421356, 2, 1.41421356]
    # r = 0:   limit n pi / c = [pi/2, pi, 3 pi/2]
    out = bessel_basis(jnp.array([1.0, 0.5, 0.0]), num=3, cutoff=2.0)
    np.testing.assert_allclose(
        out,
        [[1.0, 0.0, -1.0], [1.41421356, 2.0, 1.41421356], [math.pi / 2, math.pi, 1.5 * math.pi]],
        rtol=1e-6, atol=1e-6,
    )
    # at the cutoff itself every default-frequency function is sin(n pi) / c = 0
    np.testing.assert_allclose(bessel_basis(jnp.array(2.0), num=3, cutoff=2.0), 0.0, atol=1e-6)


def test_cutoff_hand_values():
    r = jnp.array([0.0, 0.5, 1.0, 2.0, 3.0])
    # cosine, c = 2: 0.5 (cos(pi r / 2) + 1) = [1, 0.85355339, 0.5, 0, 0 (beyond)]
    np.testing.assert_allclose(cosine_cutoff(r, 2.0), [1.0, 0.85355339, 0.5, 0.0, 0.0],
                               rtol=1e-6, atol=1e-7)
    # polynomial p = 6, d = r / 2: u(d) = 1 - 28 d^6 + 48 d^7 - 21 d^8
    # d = 0.25: 1 - 28/4096 + 48/16384 - 21/65536 = 0.9957733154296875
    # d = 0.5:  1 - 28/64 + 48/128 - 21/256      = 0.85546875
    np.testing.assert_allclose(polynomial_cutoff(r, 2.0),
                               [1.0, 0.9957733154296875, 0.85546875, 0.0, 0.0], rtol=1e-6)


def test_invalid_arguments():
    with pytest.raises(ValueError, match="gaussian_basis needs num >= 2, got 1"):
        gaussian_basis(jnp.ones(3), num=1, cutoff=5.0)
    with pytest.raises(ValueError, match="gaussian_basis needs cutoff > start"):
        gaussian_basis(jnp.ones(3), num=4, cutoff=1.0, start=2.0)
    with pytest.raises(ValueError, match="polynomial_cutoff needs an integer p >= 1, got 2.5"):
        polynomial_cutoff(jnp.ones(3), 5.0, p=2.5)
    with pytest.raises(ValueError, match=r"frequencies must have shape \(3,\), got \(2,\)"):
        bessel_basis(jnp.ones(3), num=3, cutoff=5.0, frequencies=jnp.ones(2))


# ------------------------------------------------------------------- smoothness at the cutoff

C = 5.0
EPS = 1e-3


@pytest.mark.parametrize(
    "fn",
    [
        lambda r: cosine_cutoff(r, C),
        lambda r: polynomial_cutoff(r, C),
        lambda r: jnp.sum(bessel_basis(r, num=8, cutoff=C) * polynomial_cutoff(r, C)),
        lambda r: jnp.sum(gaussian_basis(r, num=8, cutoff=C) * cosine_cutoff(r, C)),
    ],
    ids=["cosine", "polynomial", "bessel*polynomial", "gaussian*cosine"],
)
def test_zero_and_smooth_at_cutoff(fn):
    grad_fn = jax.jit(jax.grad(fn))
    fn = jax.jit(fn)
    at_and_beyond = [C, C + EPS, C + 1.0, 100.0]
    np.testing.assert_allclose([fn(jnp.float32(r)) for r in at_and_beyond], 0.0, atol=0)
    # value continuous: just inside the cutoff it is already ~0 ...
    np.testing.assert_allclose(fn(jnp.float32(C - EPS)), 0.0, atol=1e-4)
    # ... and so is the derivative, from both sides and exactly at the cutoff
    grads = [grad_fn(jnp.float32(r)) for r in (C - EPS, C, C + EPS)]
    assert np.all(np.isfinite(grads))
    np.testing.assert_allclose(grads, 0.0, atol=2e-3)
    # whereas well inside it is not (the test can fail)
    assert abs(float(grad_fn(jnp.float32(C / 2)))) > 1e-2


def test_cosine_cutoff_derivative_matches_analytic():
    r = jnp.array([0.5, 2.5, 4.9])
    g = jax.vmap(jax.grad(lambda x: cosine_cutoff(x, C)))(r)
    np.testing.assert_allclose(g, -0.5 * np.pi / C * np.sin(np.pi * np.asarray(r) / C),
                               rtol=1e-5)


def test_polynomial_cutoff_second_derivative_vanishes_at_cutoff(x64):
    f = lambda x: polynomial_cutoff(x, C)  # noqa: E731
    d2 = jax.grad(jax.grad(f))
    np.testing.assert_allclose([d2(C - 1e-6), d2(C), d2(C + 1e-6)], 0.0, atol=1e-4)


# ---------------------------------------------------------------------------- r -> 0 (Bessel)


def test_bessel_small_r_matches_exact_formula_and_derivative(x64):
    # both sides of the Taylor switch (y = n pi r / c = 0.1) and down to r = 0
    num, c = 6, 3.0
    r = np.concatenate([[0.0, 1e-12, 1e-6], np.geomspace(1e-4, 0.2, 40), [1.0, 2.9]])
    n = np.arange(1, num + 1)
    a = n * np.pi / c
    rr = r[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        exact = np.where(rr > 0, np.sin(a * rr) / rr, a) * np.sqrt(2 / c)
        dexact = np.where(rr > 0, (a * rr * np.cos(a * rr) - np.sin(a * rr)) / rr**2, 0.0)
    dexact = np.sum(dexact, axis=1) * np.sqrt(2 / c)
    # the analytic derivative itself cancels badly at tiny r; compare where it is reliable
    reliable = r > 1e-3
    out = bessel_basis(jnp.asarray(r), num=num, cutoff=c)
    assert out.dtype == jnp.float64
    np.testing.assert_allclose(out, exact, rtol=1e-12, atol=1e-12)
    grad = jax.jit(jax.vmap(jax.grad(lambda x: jnp.sum(bessel_basis(x, num=num, cutoff=c)))))(
        jnp.asarray(r))
    np.testing.assert_allclose(grad[reliable], dexact[reliable], rtol=1e-7, atol=1e-9)
    # the derivative of the even function sin(a r)/r is -a^3 r / 3 + a^5 r^3 / 30 + O(r^5)
    small = r < 1e-3
    rs = r[small, None]
    series = np.sum(-(a**3) * rs / 3 + a**5 * rs**3 / 30, axis=1) * np.sqrt(2 / c)
    np.testing.assert_allclose(grad[small], series, rtol=1e-9, atol=1e-15)


def test_bessel_gradient_finite_at_zero_float32():
    f = jax.jit(jax.grad(lambda x: jnp.sum(bessel_basis(x, num=16, cutoff=5.0))))
    a = np.arange(1, 17) * np.pi / 5.0
    for r in (0.0, 1e-30, 1e-20, 1e-8, 1e-3):
        g = f(jnp.float32(r))
        assert np.isfinite(g), r
        # leading term of the derivative near 0: -sum(a^3) r / 3 * sqrt(2 / c)
        np.testing.assert_allclose(g, -np.sum(a**3) * r / 3 * np.sqrt(2 / 5.0), rtol=1e-3,
                                   atol=1e-6)


# ------------------------------------------------------------------------------ edge_distances


def test_edge_distances_values_and_shift():
    pos = jnp.array([[0.0, 0.0, 0.0], [3.0, 4.0, 0.0], [0.0, 0.0, 1.0]])
    senders = jnp.array([1, 0, 2])
    receivers = jnp.array([0, 1, 0])
    vec, dist = edge_distances(pos, senders=senders, receivers=receivers)
    np.testing.assert_allclose(vec, [[3, 4, 0], [-3, -4, 0], [0, 0, 1]])
    np.testing.assert_allclose(dist, [5.0, 5.0, 1.0])
    shift = jnp.array([[0.0, 0.0, 12.0], [0.0, 0.0, 0.0], [0.0, 0.0, -1.0]])
    vec, dist = edge_distances(pos, senders=senders, receivers=receivers, shift=shift)
    np.testing.assert_allclose(vec, [[3, 4, 12], [-3, -4, 0], [0, 0, 0]])
    np.testing.assert_allclose(dist, [13.0, 5.0, 0.0])


def _awkward_molecule(dtype):
    # atoms 0 and 1 coincide (r = 0); atom 2 is exactly at the cutoff from both; atom 3 generic
    pos = np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [C, 0.0, 0.0], [1.0, 1.2, -0.3]])
    s, r = np.nonzero(~np.eye(4, dtype=bool))  # complete edge set
    return jnp.asarray(pos, dtype), jnp.asarray(s), jnp.asarray(r)


def _energy(kind):
    w = jnp.linspace(0.5, 1.5, 8)

    def energy(pos, senders, receivers):
        _, d = edge_distances(pos, senders=senders, receivers=receivers)
        if kind == "gaussian*cosine":
            feat = gaussian_basis(d, num=8, cutoff=C) * cosine_cutoff(d, C)[:, None]
        elif kind == "bessel*polynomial":
            feat = bessel_basis(d, num=8, cutoff=C) * polynomial_cutoff(d, C)[:, None]
        else:
            feat = BesselRBF(8, C, trainable=True)(d) * cosine_cutoff(d, C)[:, None]
        return jnp.sum(feat * w)

    return energy


@pytest.mark.parametrize("kind", ["gaussian*cosine", "bessel*polynomial", "trainable-bessel"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_gradients_finite_with_coincident_atoms_and_pair_at_cutoff(kind, dtype, x64):
    pos, s, r = _awkward_molecule(dtype)
    _, d = edge_distances(pos, senders=s, receivers=r)
    assert np.any(np.asarray(d) == 0.0) and np.any(np.asarray(d) == C)
    energy = _energy(kind)
    e, g = jax.jit(jax.value_and_grad(energy))(pos, s, r)
    assert np.isfinite(e)
    assert g.shape == (4, 3) and g.dtype == dtype
    assert np.all(np.isfinite(np.asarray(g))), g
    assert np.any(np.asarray(g) != 0)


def test_gradient_matches_finite_differences_at_zero_and_cutoff(x64):
    # sin(a r)/r is even in r and the polynomial envelope is C^2 at c, so this energy is smooth
    # in the positions even at r = 0 and r = c: the gradient must match central differences.
    pos, s, r = _awkward_molecule(jnp.float64)
    energy = jax.jit(_energy("bessel*polynomial"))
    g = np.asarray(jax.jit(jax.grad(energy))(pos, s, r))
    h = 1e-6
    fd = np.zeros_like(g)
    for i in range(4):
        for j in range(3):
            dp = np.zeros((4, 3))
            dp[i, j] = h
            fd[i, j] = (energy(pos + dp, s, r) - energy(pos - dp, s, r)) / (2 * h)
    np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------ modules


def test_modules_match_functions():
    r = jnp.linspace(0.0, 6.0, 13)
    np.testing.assert_allclose(GaussianRBF(10, 5.0, start=0.5)(r),
                               gaussian_basis(r, num=10, cutoff=5.0, start=0.5))
    fixed = BesselRBF(6, 5.0)
    np.testing.assert_allclose(fixed(r), bessel_basis(r, num=6, cutoff=5.0))
    assert len(jax.tree.leaves(nnx.state(fixed))) == 0
    assert len(jax.tree.leaves(nnx.state(GaussianRBF(4, 5.0)))) == 0


def test_trainable_bessel_has_frequency_params_with_finite_gradients():
    model = BesselRBF(6, 5.0, trainable=True)
    (freq,) = jax.tree.leaves(nnx.state(model, nnx.Param))
    np.testing.assert_allclose(freq, np.arange(1, 7) * np.pi, rtol=1e-6)
    r = jnp.array([0.0, 1.0, 5.0, 7.0])
    np.testing.assert_allclose(model(r), bessel_basis(r, num=6, cutoff=5.0), rtol=1e-6)
    grads = nnx.jit(nnx.grad(lambda m: jnp.sum(m(r))))(model)
    g = jax.tree.leaves(grads)[0]
    assert g.shape == (6,) and np.all(np.isfinite(np.asarray(g)))
    assert np.any(np.asarray(g) != 0)
