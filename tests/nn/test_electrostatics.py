"""mpattn.nn.electrostatics: neutral charges, the damped Coulomb energy and the dipole moment
against hand computations."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from mpattn.nn.electrostatics import DEBYE, coulomb_energy, dipole_moment, neutral_charges


def test_neutral_charges_and_coulomb_energy_by_hand():
    """Two molecules (3 and 2 atoms) and a padding node: charges shifted to sum 0 per
    molecule; the Coulomb shares against a double loop over the pairs."""
    raw = np.array([0.3, -0.1, 0.4, 1.0, 0.2, 9.0])
    n_node = np.array([3, 2, 1], np.int32)
    mask = np.array([True] * 5 + [False])
    q = np.asarray(neutral_charges(jnp.asarray(raw), jnp.asarray(n_node), jnp.asarray(mask)))
    np.testing.assert_allclose(q, [0.3 - 0.2, -0.1 - 0.2, 0.4 - 0.2, 0.4, -0.4, 0.0],
                               atol=1e-7)
    # directed edges of both molecules (every pair both ways) and one padding edge
    pairs = [(0, 1, 1.2), (0, 2, 3.0), (1, 2, 4.5), (3, 4, 2.0)]
    env = {1.2: 0.9, 3.0: 0.5, 4.5: 0.1, 2.0: 0.7}  # any envelope values: passed through
    snd = [i for i, j, _ in pairs] + [j for i, j, _ in pairs] + [5]
    rcv = [j for i, j, _ in pairs] + [i for i, j, _ in pairs] + [5]
    dist = [r for *_, r in pairs] * 2 + [0.0]
    e = np.asarray(coulomb_energy(jnp.asarray(q), jnp.asarray(dist),
                                  jnp.asarray([env[r] for r in dist[:-1]] + [1.0]),
                                  senders=jnp.asarray(snd), receivers=jnp.asarray(rcv)))
    expected = np.zeros(6)
    for i, j, r in pairs:
        pair = q[i] * q[j] * env[r] / np.sqrt(r * r + 1.0)
        expected[i] += pair / 2
        expected[j] += pair / 2
    np.testing.assert_allclose(e, expected, atol=1e-7)
    assert e[:3].sum() == pytest.approx(sum(q[i] * q[j] * env[r] / np.sqrt(r * r + 1)
                                            for i, j, r in pairs[:3]), abs=1e-7)


def test_dipole_moment_by_hand(x64):
    """μ = Σ q_i r_i per graph (origin-free for neutral charges). (The attention model with
    both heads at once: tests/models/test_attention_model.py.)"""
    q = np.array([0.5, -0.25, -0.25, 0.3, -0.3, 0.0])
    pos = np.array([[0.0, 0, 0], [1, 0, 0], [0, 2, 0], [0, 0, 1], [0, 0, 3], [7, 7, 7]])
    n_node = np.array([3, 2, 1], np.int32)
    mu = np.asarray(dipole_moment(jnp.asarray(q), jnp.asarray(pos), jnp.asarray(n_node)))
    np.testing.assert_allclose(mu, [[-0.25, -0.5, 0.0], [0.0, 0.0, -0.6], [0, 0, 0]])
    shifted = np.asarray(dipole_moment(jnp.asarray(q), jnp.asarray(pos + [4.0, -2.0, 1.0]),
                                       jnp.asarray(n_node)))
    np.testing.assert_allclose(shifted[:2], mu[:2], atol=1e-12)
    assert DEBYE == pytest.approx(0.2082, abs=1e-4)  # e Å
