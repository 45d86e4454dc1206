"""The invariance helpers accept invariant functions and catch non-invariant ones."""

from __future__ import annotations

import numpy as np
import pytest

from mpattn import testing
from mpattn.graph import Budget, pad_batch


def _per_graph(graph, values_per_edge):
    seg = np.repeat(np.arange(len(graph.n_edge)), graph.n_edge)
    return np.bincount(seg, weights=values_per_edge, minlength=len(graph.n_edge))


def invariant(graph):
    """Sum over edges of squared distance times bond category: E(3) and permutation invariant."""
    pos = graph.nodes["positions"].astype(np.float64)
    d2 = np.sum((pos[graph.senders] - pos[graph.receivers]) ** 2, axis=1)
    return _per_graph(graph, d2 * (1 + graph.edges["bond"]))


def order_dependent(graph):
    """Weights atoms by their index inside the molecule: not permutation invariant."""
    g = np.repeat(np.arange(len(graph.n_node)), graph.n_node)
    first = np.concatenate([[0], np.cumsum(graph.n_node)])[g]
    idx = np.arange(len(g)) - first
    return np.bincount(g, weights=idx * graph.nodes["z"], minlength=len(graph.n_node))


def absolute_x(graph):
    g = np.repeat(np.arange(len(graph.n_node)), graph.n_node)
    return np.bincount(g, weights=graph.nodes["positions"][:, 0], minlength=len(graph.n_node))


@pytest.fixture(scope="module")
def batch(qm9_graphset):
    return pad_batch(qm9_graphset, np.arange(40, 50), Budget(256, 4096, 12))


def test_invariant_function_passes_all(batch, qm9_graphset):
    testing.assert_permutation_invariant(invariant, batch)
    testing.assert_rotation_invariant(invariant, batch)
    testing.assert_translation_invariant(invariant, batch)
    testing.assert_padding_invariant(invariant, qm9_graphset, np.arange(40, 50),
                                     [Budget(256, 4096, 12), Budget(512, 8192, 40)])
    testing.assert_composition_invariant(invariant, qm9_graphset, np.arange(40, 45),
                                         np.arange(100, 110), Budget(512, 8192, 40))


def test_non_invariant_functions_are_caught(batch):
    with pytest.raises(AssertionError, match="not permutation invariant"):
        testing.assert_permutation_invariant(order_dependent, batch)
    with pytest.raises(AssertionError, match="not rotation invariant"):
        testing.assert_rotation_invariant(absolute_x, batch)
    with pytest.raises(AssertionError, match="not translation invariant"):
        testing.assert_translation_invariant(absolute_x, batch)


def test_transforms_keep_padding_and_geometry(batch):
    k = 10  # real graphs
    p = testing.permute_atoms(batch, seed=1)
    n_real = int(batch.n_node[:k].sum())
    np.testing.assert_array_equal(p.nodes["z"][n_real:], batch.nodes["z"][n_real:])
    real_z = batch.nodes["z"][:n_real]
    np.testing.assert_array_equal(np.sort(p.nodes["z"][:n_real]), np.sort(real_z))
    r = testing.rotate(batch, seed=2)
    d = np.linalg.norm(batch.nodes["positions"][:5] - batch.nodes["positions"][0], axis=1)
    dr = np.linalg.norm(r.nodes["positions"][:5] - r.nodes["positions"][0], axis=1)
    np.testing.assert_allclose(dr, d, rtol=1e-5, atol=1e-5)
    rot = testing.random_rotation(np.random.default_rng(0))
    np.testing.assert_allclose(rot @ rot.T, np.eye(3), atol=1e-12)
    assert np.isclose(np.linalg.det(rot), 1.0)
