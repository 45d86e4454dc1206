"""mpattn.nn.spherical: spherical harmonics against closed forms (a hand-checkable golden
value), Racah's normalisation, rotation by Wigner D-matrices, per-degree norms and blocks."""

from __future__ import annotations

import e3x
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mpattn.nn.spherical import (
    NORM_EPS,
    degree_blocks,
    degree_norms,
    expand_degrees,
    num_components,
    spherical_harmonics,
)
from mpattn.ops import safe_norm, unit_vectors
from mpattn.testing import random_rotation

S3 = np.sqrt(3.0)


def test_golden_value_at_a_hand_checkable_direction():
    """r̂ = (0.6, 0, 0.8), Racah's normalisation, e3x's Cartesian order: degree 1 is r̂
    itself; degree 2 is (√3/2 (x² - y²), √3 xy, √3 xz, √3 yz, (3z² - 1)/2); the last
    component of degree 3 is (5z³ - 3z)/2."""
    x, y, z = 0.6, 0.0, 0.8
    got = np.asarray(spherical_harmonics(jnp.array([x, y, z]), 3), np.float64)
    assert got.shape == (15,)
    np.testing.assert_allclose(got[:3], [0.6, 0.0, 0.8], atol=1e-7)
    np.testing.assert_allclose(got[3:8], [S3 / 2 * 0.36, 0.0, S3 * 0.48, 0.0, 0.46], atol=1e-6)
    np.testing.assert_allclose(got[14], 0.08, atol=1e-6)


def test_closed_forms_of_degrees_one_and_two_at_random_directions():
    u = np.random.default_rng(0).normal(size=(50, 3))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    x, y, z = u.T
    got = np.asarray(spherical_harmonics(jnp.asarray(u), 2))
    np.testing.assert_allclose(got[:, :3], u, atol=1e-6)
    want = np.stack([S3 / 2 * (x * x - y * y), S3 * x * y, S3 * x * z, S3 * y * z,
                     (3 * z * z - 1) / 2], axis=1)
    np.testing.assert_allclose(got[:, 3:], want, atol=1e-6)


def test_racah_normalisation_each_degree_has_unit_norm():
    """The addition theorem: Σ_m Y_l^m(r̂)² = 1 for every degree and direction."""
    u = np.random.default_rng(1).normal(size=(40, 3))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    y = np.asarray(spherical_harmonics(jnp.asarray(u), 4), np.float64)
    assert y.shape == (40, num_components(4)) == (40, 24)
    np.testing.assert_allclose((y * y) @ degree_blocks(4), 1.0, rtol=1e-5)


def test_rotating_the_direction_rotates_each_degree_by_its_wigner_matrix():
    """Y(r̂ R) = Y(r̂) D(R) with e3x's D (row vectors), block-diagonal over degrees: no
    component of one degree leaks into another."""
    rng = np.random.default_rng(2)
    u = rng.normal(size=(20, 3))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    rot = random_rotation(rng)
    d = np.asarray(e3x.so3.wigner_d(jnp.asarray(rot, jnp.float32), max_degree=3))[1:, 1:]
    y, y_rot = (np.asarray(spherical_harmonics(jnp.asarray(v, jnp.float32), 3))
                for v in (u, u @ rot))
    np.testing.assert_allclose(y_rot, y @ d, atol=2e-5)
    blocks = degree_blocks(3)
    off_block = (blocks @ blocks.T) == 0
    np.testing.assert_array_equal(d[off_block], 0.0)


def test_degree_norms_are_smooth_invariant_and_near_the_norm():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(6, 8)).astype(np.float32)  # degrees 1 and 2
    norms = np.asarray(degree_norms(jnp.asarray(x), 2))
    plain = np.stack([np.linalg.norm(x[:, :3], axis=1), np.linalg.norm(x[:, 3:], axis=1)], 1)
    np.testing.assert_allclose(norms, np.sqrt(plain**2 + NORM_EPS**2) - NORM_EPS, rtol=1e-6)
    assert np.all((norms <= plain) & (norms >= plain - NORM_EPS))
    rot = random_rotation(rng)
    d = np.asarray(e3x.so3.wigner_d(jnp.asarray(rot, jnp.float32), max_degree=2))[1:, 1:]
    np.testing.assert_allclose(degree_norms(jnp.asarray(x @ d), 2), norms, rtol=1e-5,
                               atol=1e-6)
    # 0 at 0 with gradient 0 (no kink): smooth where a degree block vanishes
    grad = jax.grad(lambda v: jnp.sum(degree_norms(v, 2)))(jnp.zeros(8))
    np.testing.assert_array_equal(np.asarray(grad), 0.0)


def test_expand_degrees_repeats_per_degree_values():
    got = np.asarray(expand_degrees(jnp.array([[1.0, 2.0, 3.0]]), 3))
    np.testing.assert_array_equal(got, [[1.0] * 3 + [2.0] * 5 + [3.0] * 7])
    with pytest.raises(ValueError, match="max_degree must be at least 1, got 0"):
        num_components(0)


def test_harmonics_of_zero_vectors_have_finite_gradients():
    """Padding edges have length 0: their unit vector is 0 and nothing is NaN."""
    vec = jnp.zeros((2, 3))

    def total(v):
        return jnp.sum(spherical_harmonics(unit_vectors(v, safe_norm(v)), 3))

    assert np.isfinite(float(total(vec)))
    assert np.all(np.isfinite(np.asarray(jax.grad(total)(vec))))
