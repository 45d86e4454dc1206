"""Masked losses: per-graph losses with the size weightings of the SchNet size study (and its
sampling), and the energy + force loss of potentials.

:func:`loss_value` is pure and jit-friendly: an elementwise loss (MSE as in the thesis, L1,
Huber) per real graph, multiplied by a per-graph weight ``v`` and normalised by ``Σ mask·v``,
so the loss is a weighted *mean* over real graphs whatever the weighting (with
``weighting="none"`` it is the plain mean over real graphs). Padding graphs (``mask`` False)
are removed with a double ``where`` on both the inputs and the result: whatever they hold, they
change neither the loss nor its gradient.

Size weightings (s = atoms of the molecule, r a positive exponent, natural log):

* ``"size"``: ``v = (s - 7)^r / 10^(r+1) + 1``. For integer r this is the formula as written;
  for non-integer r and s < 7 the power of a negative base is undefined, and we use the odd
  extension ``sign(s-7)·|s-7|^r`` (the term is at most ``6^r/10^(r+1)`` in size there, so the
  weight stays within a few percent of 1).
* ``"size_freq"``: ``v = log(s^r / 10^(r+1) - r/4.5)``. The argument is below 1 (log
  negative) or below 0 (undefined) for small s. Where v is undefined or below
  :data:`WEIGHT_FLOOR` it is clamped to :data:`WEIGHT_FLOOR` (1e-3). Note: for QM9's sizes
  (3 to 29 atoms) and r = 1 or 2 the argument never exceeds 1, so *every* weight is clamped
  and the loss reduces to the unweighted mean; it only discriminates sizes for r ≥ 3.

Both weights are floored at :data:`WEIGHT_FLOOR` so the normalisation never divides by a
non-positive number.

The study also balanced the training set by size: :func:`cap_per_size` keeps at most ``cap``
molecules of each atom count, :func:`size_range` keeps an atom-count range (host-side numpy).

:func:`energy_force_loss` is SO3krates' ``L = (1-β) ℓ(E - Ê) + β/(3N) Σ ℓ(F - F̂)``, its two
means also available apart (:func:`energy_term`, :func:`force_term`) for the trainer's named
loss terms (:mod:`mpattn.train.terms`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import jraph
import numpy as np
import optax
from jaxtyping import Array, Bool, Float, Int

from mpattn.graph import graph_mask, node_mask
from mpattn.ops import graph_index, segment_sum

__all__ = [
    "LOSSES",
    "WEIGHTINGS",
    "WEIGHT_FLOOR",
    "cap_per_size",
    "elementwise_loss",
    "energy_force_loss",
    "energy_term",
    "force_term",
    "graph_weights",
    "loss_value",
    "size_range",
    "stress_term",
]

LOSSES: tuple[str, ...] = ("mse", "l1", "huber")
WEIGHTINGS: tuple[str, ...] = ("none", "size", "size_freq")
#: Smallest per-graph weight (see module docstring).
WEIGHT_FLOOR = 1e-3


def _check(name: str, choices: tuple[str, ...], what: str) -> None:
    if name not in choices:
        raise ValueError(f"unknown {what} {name!r}; choose one of {', '.join(choices)}")


def elementwise_loss(name: str, pred: Float[Array, "num_graphs ..."],
                     target: Float[Array, "num_graphs ..."], *,
                     huber_delta: float = 1.0) -> Float[Array, "num_graphs ..."]:
    """The unreduced loss ``name`` (one of :data:`LOSSES`) between ``pred`` and ``target``."""
    _check(name, LOSSES, "loss")
    diff = pred - target
    if name == "mse":
        return diff * diff
    if name == "l1":
        return jnp.abs(diff)
    return optax.huber_loss(pred, target, delta=huber_delta)


def graph_weights(weighting: str, n_atoms: Int[Array, " num_graphs"], *,
                  r: float = 1.0) -> Float[Array, " num_graphs"]:
    """Per-graph weights ``v`` of a size weighting (one of :data:`WEIGHTINGS`).

    Args:
        weighting: ``"none"`` (all 1), ``"size"`` or ``"size_freq"`` (module docstring).
        n_atoms: atoms per graph (s).
        r: the exponent, a Python number (static).

    Returns:
        float32 weights, at least :data:`WEIGHT_FLOOR`.
    """
    _check(weighting, WEIGHTINGS, "weighting")
    s = jnp.asarray(n_atoms, jnp.float32)
    if weighting == "none":
        return jnp.ones_like(s)
    r = float(r)
    if r <= 0:
        raise ValueError(f"weighting exponent r must be positive, got {r}")
    if weighting == "size":
        d = s - 7.0
        power = d ** int(r) if r.is_integer() else jnp.sign(d) * jnp.abs(d) ** r
        v = power / 10.0 ** (r + 1) + 1.0
    else:
        arg = s**r / 10.0 ** (r + 1) - r / 4.5
        v = jnp.log(jnp.where(arg > 0, arg, 1.0))  # double where: no NaN, even in gradients
        v = jnp.where(arg > 0, v, WEIGHT_FLOOR)
    return jnp.maximum(v, WEIGHT_FLOOR)


def loss_value(name: str, pred: Float[Array, "num_graphs ..."],
               target: Float[Array, "num_graphs ..."], mask: Bool[Array, " num_graphs"],
               n_atoms: Int[Array, " num_graphs"], *, weighting: str = "none", r: float = 1.0,
               huber_delta: float = 1.0) -> Float[Array, ""]:
    """Weighted mean of a per-graph loss over the real graphs of a padded batch.

    ``loss = Σ_g mask_g v_g ℓ_g / Σ_g mask_g v_g`` where ``ℓ_g`` is the elementwise loss,
    averaged over any trailing (per-graph vector) axes, and ``v`` the size weights of
    :func:`graph_weights`. A batch without real graphs gives 0.

    Args:
        name: ``"mse"``, ``"l1"`` or ``"huber"`` (:data:`LOSSES`).
        pred, target: [num_graphs] or [num_graphs, ...], standardised targets.
        mask: True for real graphs (``jraph.get_graph_padding_mask``).
        n_atoms: atoms per graph (``graph.n_node``).
        weighting, r: size weighting (:data:`WEIGHTINGS`) and its exponent.
        huber_delta: the Huber loss' transition point (standardised units).

    Raises:
        ValueError: unknown ``name`` or ``weighting`` (the message lists the choices), or
            shapes that differ (no broadcasting: ``[G, 1]`` against ``[G]`` is an error).
    """
    _check(name, LOSSES, "loss")
    _check(weighting, WEIGHTINGS, "weighting")
    if jnp.shape(pred) != jnp.shape(target) or jnp.shape(mask) != jnp.shape(pred)[:1]:
        raise ValueError(  # a [G, 1] against [G] would silently broadcast to [G, G]
            f"loss_value: pred {jnp.shape(pred)}, target {jnp.shape(target)} and mask "
            f"{jnp.shape(mask)} do not match"
        )
    mask = jnp.asarray(mask, bool)
    bmask = mask.reshape(mask.shape + (1,) * (pred.ndim - 1))
    pred = jnp.where(bmask, pred, 0)
    target = jnp.where(bmask, target, 0).astype(pred.dtype)
    per = elementwise_loss(name, pred, target, huber_delta=huber_delta)
    per = per.reshape(per.shape[0], -1).mean(axis=1)
    v = jnp.where(mask, graph_weights(weighting, n_atoms, r=r).astype(per.dtype), 0)
    total = jnp.sum(jnp.where(mask, v * per, 0))
    norm = jnp.sum(v)
    return total / jnp.maximum(norm, jnp.finfo(per.dtype).tiny)


def cap_per_size(n_atoms, cap: int, seed: int = 0) -> np.ndarray:
    """At most ``cap`` molecules of each atom count, drawn at random (host side).

    Args:
        n_atoms: int [num_molecules] atoms per molecule (of the training split).
        cap: the most molecules kept per atom count (e.g. 2,000).
        seed: seed of ``numpy.random.default_rng``.

    Returns:
        int64 sorted positions into ``n_atoms`` of the kept molecules.
    """
    if int(cap) < 1:
        raise ValueError(f"cap_per_size: cap must be at least 1, got {cap}")
    n_atoms = np.asarray(n_atoms).ravel()
    rng = np.random.default_rng(seed)
    keep = []
    for s in np.unique(n_atoms):
        idx = np.flatnonzero(n_atoms == s)
        keep.append(idx if len(idx) <= cap else rng.choice(idx, int(cap), replace=False))
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, np.int64)


def size_range(n_atoms, min_atoms: int | None = None,
               max_atoms: int | None = None) -> np.ndarray:
    """Positions of the molecules with ``min_atoms <= atoms <= max_atoms`` (None: no bound)."""
    n_atoms = np.asarray(n_atoms).ravel()
    lo = -np.inf if min_atoms is None else min_atoms
    hi = np.inf if max_atoms is None else max_atoms
    if lo > hi:
        raise ValueError(f"size_range: min_atoms {min_atoms} > max_atoms {max_atoms}")
    return np.flatnonzero((n_atoms >= lo) & (n_atoms <= hi)).astype(np.int64)


def _check_pair(pred, true, what: str, ndim: int) -> None:
    if jnp.shape(pred) != jnp.shape(true) or jnp.ndim(pred) != ndim:
        raise ValueError(f"{what}: shapes differ or are not {ndim}-d: pred {jnp.shape(pred)}, "
                         f"true {jnp.shape(true)}")


def energy_term(pred_e: Float[Array, " num_graphs"], true_e: Float[Array, " num_graphs"],
                graph: jraph.GraphsTuple, *, loss: str = "mse",
                huber_delta: float = 1.0) -> Float[Array, ""]:
    """``mean_g ℓ(E_g - Ê_g)`` over the real graphs of a padded batch (per molecule, not per
    atom, as in the SO3krates loss). Padding is removed with a ``where`` on the inputs, so
    whatever it holds (even NaN) changes neither the value nor its gradient."""
    _check(loss, LOSSES, "loss")
    _check_pair(pred_e, true_e, "energy_term", 1)
    gm = graph_mask(graph)
    pred_e, true_e = jnp.asarray(pred_e), jnp.asarray(true_e)
    pe, te = jnp.where(gm, pred_e, 0), jnp.where(gm, true_e, 0).astype(pred_e.dtype)
    per = elementwise_loss(loss, pe, te, huber_delta=huber_delta)
    return jnp.sum(jnp.where(gm, per, 0)) / jnp.maximum(jnp.sum(gm), 1)


def force_term(pred_f: Float[Array, "num_nodes 3"], true_f: Float[Array, "num_nodes 3"],
               graph: jraph.GraphsTuple, *, loss: str = "mse",
               huber_delta: float = 1.0) -> Float[Array, ""]:
    """``mean_g [Σ_{i∈g} Σ_k ℓ(F_ik - F̂_ik) / (3 N_g)]`` over the real graphs (padding removed
    as in :func:`energy_term`)."""
    _check(loss, LOSSES, "loss")
    _check_pair(pred_f, true_f, "force_term", 2)
    gm, nm = graph_mask(graph), node_mask(graph)[:, None]
    pred_f, true_f = jnp.asarray(pred_f), jnp.asarray(true_f)
    pf, tf = jnp.where(nm, pred_f, 0), jnp.where(nm, true_f, 0).astype(pred_f.dtype)
    per_node = jnp.sum(elementwise_loss(loss, pf, tf, huber_delta=huber_delta), axis=1)
    n_node = jnp.asarray(graph.n_node)
    seg = graph_index(n_node, pred_f.shape[0])
    per_graph = segment_sum(per_node, seg, num_segments=n_node.shape[0])
    per_graph = per_graph / jnp.maximum(3 * n_node, 1).astype(per_graph.dtype)
    return jnp.sum(jnp.where(gm, per_graph, 0)) / jnp.maximum(jnp.sum(gm), 1)


def stress_term(pred_s: Float[Array, "num_graphs 3 3"], true_s: Float[Array, "num_graphs 3 3"],
                graph: jraph.GraphsTuple, *, weights: Float[Array, " num_graphs"],
                loss: str = "mse", huber_delta: float = 1.0) -> Float[Array, ""]:
    """``Σ_g w_g Σ_kl ℓ(σ_gkl - σ̂_gkl) / 9 / Σ_g w_g`` over the real graphs with ``w_g > 0``
    (structures that have a reference stress; 0 when none of the batch has one). Padding and
    structures without stress are removed with a ``where`` on the inputs (NaN-safe)."""
    _check(loss, LOSSES, "loss")
    w = jnp.where(graph_mask(graph), jnp.asarray(weights), 0)
    keep = (w > 0)[:, None, None]
    pred_s, true_s = jnp.asarray(pred_s), jnp.asarray(true_s)
    ps, ts = jnp.where(keep, pred_s, 0), jnp.where(keep, true_s, 0).astype(pred_s.dtype)
    per = jnp.sum(elementwise_loss(loss, ps, ts, huber_delta=huber_delta), axis=(1, 2)) / 9
    return jnp.sum(jnp.where(w > 0, w * per, 0)) / jnp.maximum(jnp.sum(w), 1e-12)


def energy_force_loss(pred_e: Float[Array, " num_graphs"], pred_f: Float[Array, "num_nodes 3"],
                      true_e: Float[Array, " num_graphs"], true_f: Float[Array, "num_nodes 3"],
                      graph: jraph.GraphsTuple, *, beta: float, loss: str = "mse",
                      huber_delta: float = 1.0, return_terms: bool = False):
    """``L = (1-β) energy_term + β force_term`` (:func:`energy_term`, :func:`force_term`).

    With ``return_terms`` also returns ``{"energy": ..., "forces": ...}`` (the two means
    before weighting).
    """
    if not isinstance(beta, jax.Array) and not 0.0 <= float(beta) <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if jnp.shape(pred_e) != jnp.shape(true_e) or jnp.shape(pred_f) != jnp.shape(true_f) \
            or jnp.ndim(pred_f) != 2:
        raise ValueError(f"energy_force_loss: shapes differ: pred_e {jnp.shape(pred_e)}, "
                         f"true_e {jnp.shape(true_e)}, pred_f {jnp.shape(pred_f)}, true_f "
                         f"{jnp.shape(true_f)}")
    e = energy_term(pred_e, true_e, graph, loss=loss, huber_delta=huber_delta)
    f = force_term(pred_f, true_f, graph, loss=loss, huber_delta=huber_delta)
    total = (1.0 - beta) * e + beta * f
    return (total, {"energy": e, "forces": f}) if return_terms else total
