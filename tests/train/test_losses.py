"""Masked per-graph losses, size weightings (hand-computed), size sampling, and the energy and
force terms of potentials."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import jraph
import numpy as np
import pytest

from mpattn.train.losses import (
    LOSSES,
    WEIGHT_FLOOR,
    cap_per_size,
    energy_force_loss,
    energy_term,
    force_term,
    graph_weights,
    loss_value,
    size_range,
)

SIZES = np.array([5, 9, 18, 29])
F = WEIGHT_FLOOR


@pytest.mark.parametrize(("r", "expected"), [
    # (s - 7)^r / 10^(r+1) + 1
    (1, [1 - 2 / 100, 1 + 2 / 100, 1 + 11 / 100, 1 + 22 / 100]),
    (2, [1 + 4 / 1000, 1 + 4 / 1000, 1 + 121 / 1000, 1 + 484 / 1000]),
])
def test_size_weights_hand_computed(r, expected):
    np.testing.assert_allclose(graph_weights("size", SIZES, r=r), expected, rtol=1e-6)


@pytest.mark.parametrize(("r", "expected"), [
    # log(s^r / 10^(r+1) - r/4.5): s=5: log(0.05 - 0.222) undefined, ..., s=29: log(0.0678) < 0
    (1, [F, F, F, F]),
    # s=29: log(0.841 - 0.444) = -0.925 < 0 -> floor
    (2, [F, F, F, F]),
    # s=29: log(2.4389 - 0.6667) = 0.572; s=18: 0.5832 - 0.6667 < 0
    (3, [F, F, F, math.log(24389 / 1e4 - 3 / 4.5)]),
    # s=18: log(1.04976 - 0.8889) = -1.83 -> floor; s=29: log(7.07281 - 0.8889) = 1.822
    (4, [F, F, F, math.log(707281 / 1e5 - 4 / 4.5)]),
])
def test_size_freq_weights_hand_computed(r, expected):
    v = graph_weights("size_freq", SIZES, r=r)
    np.testing.assert_allclose(v, expected, rtol=1e-5)
    assert np.isfinite(jax.grad(lambda x: graph_weights("size_freq", x, r=r).sum())(
        jnp.asarray(SIZES, jnp.float32))).all()


def test_weights_none_and_fractional_r():
    np.testing.assert_array_equal(graph_weights("none", SIZES), 1.0)
    # non-integer r: odd extension below 7 atoms
    v = graph_weights("size", np.array([3, 11]), r=1.5)
    np.testing.assert_allclose(v, [1 - 4**1.5 / 10**2.5, 1 + 4**1.5 / 10**2.5], rtol=1e-6)


def _numpy_loss(name, pred, target, mask, v, delta=1.0):
    total = norm = 0.0
    for p, t, m, w in zip(pred, target, mask, v, strict=True):
        if not m:
            continue
        d = np.atleast_1d(p - t).astype(np.float64)
        if name == "mse":
            e = d**2
        elif name == "l1":
            e = np.abs(d)
        else:
            e = np.where(np.abs(d) <= delta, 0.5 * d**2, delta * (np.abs(d) - 0.5 * delta))
        total += w * e.mean()
        norm += w
    return total / norm


@pytest.fixture
def batch():
    rng = np.random.default_rng(0)
    pred = rng.normal(size=6).astype(np.float32) * 2
    target = rng.normal(size=6).astype(np.float32)
    mask = np.array([True, True, True, True, False, False])
    n_atoms = np.array([5, 9, 18, 29, 0, 0])
    return pred, target, mask, n_atoms


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize(("weighting", "r"), [("none", 1), ("size", 1), ("size", 2),
                                              ("size_freq", 4)])
def test_loss_against_numpy(batch, name, weighting, r):
    pred, target, mask, n_atoms = batch
    v = np.asarray(graph_weights(weighting, n_atoms, r=r))
    got = loss_value(name, pred, target, mask, n_atoms, weighting=weighting, r=r,
                     huber_delta=0.7)
    want = _numpy_loss(name, pred, target, mask, v, delta=0.7)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    jitted = jax.jit(loss_value, static_argnames=("name", "weighting", "r", "huber_delta"))
    np.testing.assert_allclose(
        jitted(name, pred, target, mask, n_atoms, weighting=weighting, r=r, huber_delta=0.7),
        got, rtol=1e-6)


def test_unweighted_mse_is_plain_mean(batch):
    pred, target, mask, n_atoms = batch
    want = np.mean((pred[:4] - target[:4]).astype(np.float64) ** 2)
    np.testing.assert_allclose(loss_value("mse", pred, target, mask, n_atoms), want, rtol=1e-6)


def test_vector_targets_average_trailing_axes():
    pred = np.array([[1.0, 3.0], [0.0, 0.0], [9.0, 9.0]], np.float32)
    target = np.zeros((3, 2), np.float32)
    mask = np.array([True, True, False])
    # graph 0: (1 + 9) / 2 = 5, graph 1: 0 -> mean 2.5
    np.testing.assert_allclose(loss_value("mse", pred, target, mask, np.array([3, 4, 0])), 2.5)


@pytest.mark.parametrize("name", LOSSES)
def test_padding_graphs_change_nothing(batch, name):
    pred, target, mask, n_atoms = batch

    def f(p, t):
        return loss_value(name, p, t, mask, n_atoms, weighting="size", r=2)

    loss, (gp, gt) = jax.value_and_grad(f, argnums=(0, 1))(pred, target)
    junk_p, junk_t = pred.copy(), target.copy()
    junk_p[~mask] = [3e38, -3e38]  # their differences overflow float32 to inf
    junk_t[~mask] = [-3e38, 3e38]
    loss2, (gp2, gt2) = jax.value_and_grad(f, argnums=(0, 1))(junk_p, junk_t)
    np.testing.assert_array_equal(loss2, loss)
    np.testing.assert_array_equal(gp2, gp)
    np.testing.assert_array_equal(gt2, gt)
    np.testing.assert_array_equal(gp2[~mask], 0.0)
    # padding sizes do not matter either (their weights are masked out)
    n2 = n_atoms.copy()
    n2[~mask] = [1000, 3]
    np.testing.assert_array_equal(
        loss_value(name, pred, target, mask, n2, weighting="size", r=2), loss)


def test_no_real_graph_gives_zero(batch):
    pred, target, _, n_atoms = batch
    out = loss_value("l1", pred, target, np.zeros(6, bool), n_atoms)
    np.testing.assert_array_equal(out, 0.0)


def test_unknown_names():
    x = np.zeros(2, np.float32)
    m, n = np.ones(2, bool), np.array([3, 4])
    with pytest.raises(ValueError, match="unknown loss 'mae'; choose one of mse, l1, huber"):
        loss_value("mae", x, x, m, n)
    with pytest.raises(ValueError,
                       match="unknown weighting 'freq'; choose one of none, size, size_freq"):
        loss_value("mse", x, x, m, n, weighting="freq")
    with pytest.raises(ValueError, match="r must be positive, got -1.0"):
        graph_weights("size", n, r=-1)
    with pytest.raises(ValueError, match=r"pred \(2, 1\), target \(2,\) and mask \(2,\)"):
        loss_value("mse", x[:, None], x, m, n)


def test_cap_per_size():
    n_atoms = np.array([3] * 5 + [9] * 50 + [18] * 2 + [29] * 11)
    idx = cap_per_size(n_atoms, 10, seed=1)
    sizes, counts = np.unique(n_atoms[idx], return_counts=True)
    np.testing.assert_array_equal(sizes, [3, 9, 18, 29])
    np.testing.assert_array_equal(counts, [5, 10, 2, 10])
    np.testing.assert_array_equal(idx, np.unique(idx))  # sorted, no repeats
    np.testing.assert_array_equal(cap_per_size(n_atoms, 10, seed=1), idx)
    assert not np.array_equal(cap_per_size(n_atoms, 10, seed=2), idx)
    np.testing.assert_array_equal(cap_per_size(n_atoms, 100), np.arange(len(n_atoms)))
    with pytest.raises(ValueError, match="cap must be at least 1, got 0"):
        cap_per_size(n_atoms, 0)


def test_size_range():
    n_atoms = np.array([3, 9, 18, 29, 12, 9])
    np.testing.assert_array_equal(size_range(n_atoms, 9, 18), [1, 2, 4, 5])
    np.testing.assert_array_equal(size_range(n_atoms, min_atoms=18), [2, 3])
    np.testing.assert_array_equal(size_range(n_atoms, max_atoms=9), [0, 1, 5])
    np.testing.assert_array_equal(size_range(n_atoms), np.arange(6))
    with pytest.raises(ValueError, match="min_atoms 20 > max_atoms 10"):
        size_range(n_atoms, 20, 10)


def _padded_graph():
    """Two real graphs (2 atoms, 1 atom) and a padding graph of 1 atom, as jraph pads."""
    import jraph

    return jraph.GraphsTuple(nodes={"z": np.array([6, 1, 8, 0])}, edges={},
                             senders=np.zeros(0, np.int32),
                             receivers=np.zeros(0, np.int32), globals={},
                             n_node=np.array([2, 1, 1]), n_edge=np.array([0, 0, 0]))


@pytest.mark.parametrize("name", LOSSES)
def test_energy_and_force_terms_hand_computed(name):
    """``energy_term``: mean over the real graphs of ℓ(E - Ê); ``force_term``: mean over the
    real graphs of Σ_i Σ_k ℓ(F_ik - F̂_ik) / (3 N_g); padding (even NaN) changes neither the
    values nor their gradients; ``energy_force_loss`` is (1-β) one + β the other."""
    from mpattn.train.losses import elementwise_loss, energy_force_loss, energy_term, force_term

    graph = _padded_graph()
    pe, te = np.array([1.0, -2.0, np.nan], np.float32), np.array([0.5, 0.0, 7.0], np.float32)
    pf = np.array([[1.0, 0.0, -1.0], [2.0, 2.0, 0.0], [0.5, 0.0, 0.0], [np.nan, 1.0, 1.0]],
                  np.float32)
    tf = np.array([[0.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 3.0, 0.0], [5.0, 5.0, 5.0]],
                  np.float32)

    def ell(d):
        return np.asarray(elementwise_loss(name, jnp.asarray(d, jnp.float32), 0.0), np.float64)

    want_e = (ell(0.5) + ell(-2.0)) / 2
    per_node = [ell(pf[i] - tf[i]).sum() for i in range(3)]
    want_f = ((per_node[0] + per_node[1]) / 6 + per_node[2] / 3) / 2
    e = energy_term(pe, te, graph, loss=name)
    f = force_term(pf, tf, graph, loss=name)
    np.testing.assert_allclose([float(e), float(f)], [want_e, want_f], rtol=1e-6)
    ge = jax.grad(lambda p: energy_term(p, te, graph, loss=name))(jnp.asarray(pe))
    gf = jax.grad(lambda p: force_term(p, tf, graph, loss=name))(jnp.asarray(pf))
    assert np.isfinite(ge).all() and np.isfinite(gf).all()
    assert float(ge[2]) == 0.0 and not np.asarray(gf[3]).any()
    total, terms = energy_force_loss(pe, pf, te, tf, graph, beta=0.9, loss=name,
                                     return_terms=True)
    np.testing.assert_allclose(float(total), 0.1 * want_e + 0.9 * want_f, rtol=1e-6)
    np.testing.assert_allclose([float(terms["energy"]), float(terms["forces"])],
                               [want_e, want_f], rtol=1e-6)
    with pytest.raises(ValueError, match=r"energy_term: shapes differ or are not 1-d"):
        energy_term(pe[:2], te, graph)
    with pytest.raises(ValueError, match=r"force_term: shapes differ or are not 2-d"):
        force_term(pf[:, :2], tf, graph)


# ------------------------------------------------------------------ the energy + force loss


def _loss_case():
    rng = np.random.default_rng(3)
    n_node = np.array([3, 2, 4, 0], np.int32)  # two real graphs, the padding graph, one empty
    graph = jraph.GraphsTuple(nodes={"z": np.zeros(9, np.int32)}, edges={},
                              senders=np.zeros(0, np.int32), receivers=np.zeros(0, np.int32),
                              n_node=n_node, n_edge=np.zeros(4, np.int32), globals={})
    pe, te = rng.normal(size=4), rng.normal(size=4)
    pf, tf = rng.normal(size=(9, 3)), rng.normal(size=(9, 3))
    pe[2:], pf[5:] = np.nan, 1e6  # padding junk must not count
    return graph, pe, te, pf, tf


@pytest.mark.parametrize("loss", ["mse", "l1", "huber"])
@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_energy_force_loss_by_hand(loss, beta):
    graph, pe, te, pf, tf = _loss_case()

    def ell(d):
        if loss == "mse":
            return d * d
        if loss == "l1":
            return abs(d)
        return 0.5 * d * d if abs(d) <= 0.5 else 0.5 * (abs(d) - 0.25)

    e_term = (ell(pe[0] - te[0]) + ell(pe[1] - te[1])) / 2
    f_terms = []
    for lo, n in ((0, 3), (3, 2)):
        s = sum(ell(pf[i, k] - tf[i, k]) for i in range(lo, lo + n) for k in range(3))
        f_terms.append(s / (3 * n))
    expected = (1 - beta) * e_term + beta * np.mean(f_terms)
    (got, terms), grads = _loss_and_grad(*(jnp.asarray(x, jnp.float32) for x in
                                           (pe, pf, te, tf)), graph, beta, loss)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    np.testing.assert_allclose([terms["energy"], terms["forces"]], [e_term, np.mean(f_terms)],
                               rtol=1e-5)
    np.testing.assert_array_equal(grads[0][2:], 0.0)  # no NaN leaks from padding
    np.testing.assert_array_equal(grads[1][5:], 0.0)
    assert all(np.isfinite(g).all() for g in grads)


@functools.partial(jax.jit, static_argnums=6)
def _loss_and_grad(pe, pf, te, tf, graph, beta, loss):
    def f(pe, pf):
        total, terms = energy_force_loss(pe, pf, te, tf, graph, beta=beta, loss=loss,
                                         huber_delta=0.5, return_terms=True)
        return total, terms

    return jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(pe, pf)


def test_energy_force_loss_errors():
    graph, pe, te, pf, tf = _loss_case()
    with pytest.raises(ValueError, match=r"beta must be in \[0, 1\], got 1.5"):
        energy_force_loss(pe, pf, te, tf, graph, beta=1.5)
    with pytest.raises(ValueError, match="unknown loss 'l2'; choose one of mse, l1, huber"):
        energy_force_loss(pe, pf, te, tf, graph, beta=0.5, loss="l2")
    with pytest.raises(ValueError, match=r"energy_force_loss: shapes differ: pred_e \(3,\), "
                                         r"true_e \(4,\), pred_f \(9, 3\), true_f \(9, 3\)"):
        energy_force_loss(pe[:3], pf, te, tf, graph, beta=0.5)
    with pytest.raises(ValueError, match=r"energy_force_loss: shapes differ: .* pred_f "
                                         r"\(8, 3\), true_f \(9, 3\)"):
        energy_force_loss(pe, pf[:8], te, tf, graph, beta=0.5)
    # each term checks its own pair of arrays
    with pytest.raises(ValueError, match=r"energy_term: shapes differ or are not 1-d: "
                                         r"pred \(3,\), true \(4,\)"):
        energy_term(pe[:3], te, graph)
    with pytest.raises(ValueError, match=r"force_term: shapes differ or are not 2-d: "
                                         r"pred \(8, 3\), true \(9, 3\)"):
        force_term(pf[:8], tf, graph)
