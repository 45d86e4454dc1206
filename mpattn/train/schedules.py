"""Optimisers and learning-rate schedules (optax), and EMA weights.

:func:`make_optimizer` builds ``clip_by_global_norm → Adam(schedule) [→ reduce_on_plateau]``.
The returned transformation always supports optax's extra arguments, and the train step calls
it the same way for every schedule::

    updates, opt_state = tx.update(grads, opt_state, params, value=loss)

``value`` (the training loss of the batch, a scalar) is ignored by every schedule but
``"plateau"``: there ``optax.contrib.reduce_on_plateau`` averages it over
``steps_per_epoch`` updates (``accumulation_size``), i.e. it sees one number per epoch — the
epoch's mean training loss — and multiplies the learning rate by ``plateau_factor`` after
``plateau_patience`` epochs without relative improvement ``plateau_rtol``. Feeding the
training loss keeps the whole optimiser inside the jitted, pure train step and its state in
``opt_state`` (so it is checkpointed and resumes exactly); the validation MAE drives the
choice of the best checkpoint instead.

With the ``"cosine"`` schedule the schedule's numbers (length, warmup, peak and final rate)
live in ``opt_state`` (:func:`scale_by_warmup_cosine`), not in the compiled code: a train step
compiled for one run length serves any other, which lets a run plan its epochs on a trial
trainer and reuse the trial's compiled steps. The other schedules run Adam under
``optax.inject_hyperparams``, so the learning rate of the latest update lives in ``opt_state``;
:func:`current_lr` reads either (times the plateau scale) for logging.

EMA: :func:`ema_init` / :func:`ema_update` keep an exponential moving average of the
parameters (``optax.ema`` averages *updates* and is meant to sit inside a chain, not to hold
a copy of the weights; the loop evaluates with the EMA copy when asked to).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax import tree_utils as otu
from optax.contrib import ReduceLROnPlateauState

__all__ = [
    "SCHEDULES",
    "CosineState",
    "current_lr",
    "ema_init",
    "ema_update",
    "make_optimizer",
    "make_schedule",
    "scale_by_warmup_cosine",
    "step_decay",
    "warmup_cosine",
    "warmup_cosine_value",
]

SCHEDULES: tuple[str, ...] = ("step", "cosine", "plateau", "constant")


def _positive(name: str, value) -> int:
    if int(value) < 1:
        raise ValueError(f"{name} must be at least 1, got {value}")
    return int(value)


def step_decay(lr: float, *, steps_per_epoch: int, factor: float = 0.7, every_epochs: int = 5,
               floor: float = 1e-5) -> optax.Schedule:
    """The thesis' staircase decay: ``lr · factor^⌊epoch / every_epochs⌋``, never below ``floor``.

    ``epoch = ⌊step / steps_per_epoch⌋``; with the defaults, ×0.7 every 5 epochs down to 1e-5.
    A ``floor`` above ``lr`` is lowered to ``lr`` (the schedule never rises).
    """
    spe = _positive("steps_per_epoch", steps_per_epoch)
    every = _positive("every_epochs", every_epochs)
    if not 0 < factor <= 1:
        raise ValueError(f"factor must be in (0, 1], got {factor}")
    return optax.exponential_decay(init_value=lr, transition_steps=every * spe,
                                   decay_rate=factor, staircase=True,
                                   end_value=min(floor, lr))


def warmup_cosine(lr: float, *, steps_per_epoch: int, epochs: int, warmup_epochs: float = 1,
                  final_lr: float = 1e-6) -> optax.Schedule:
    """Linear warmup from 0 to ``lr`` over ``warmup_epochs``, then cosine to ``final_lr``.

    The cosine ends at step ``epochs · steps_per_epoch`` and stays at ``final_lr`` after it.
    The warmup is shortened to at most half the run when the run is short.
    """
    total, warmup = _warmup_steps(steps_per_epoch, epochs, warmup_epochs)
    return optax.warmup_cosine_decay_schedule(init_value=0.0, peak_value=lr, warmup_steps=warmup,
                                              decay_steps=total, end_value=final_lr)


def _warmup_steps(steps_per_epoch: int, epochs: int, warmup_epochs: float) -> tuple[int, int]:
    spe = _positive("steps_per_epoch", steps_per_epoch)
    total = _positive("epochs", epochs) * spe
    return total, min(int(round(warmup_epochs * spe)), total // 2)


def warmup_cosine_value(count, total_steps, warmup_steps, peak, final):
    """:func:`warmup_cosine`'s rate at update ``count`` with every number an argument (jnp;
    any of them may be traced): ``peak · count / W`` during the warmup, then
    ``peak · [(1 - a) · ½(1 + cos(π · min(count - W, T - W) / (T - W))) + a]``, ``a = final /
    peak``, ``T = total_steps``, ``W = warmup_steps`` (``W <= T // 2``), as optax's
    ``warmup_cosine_decay_schedule``."""
    count = jnp.asarray(count, jnp.float32)
    total = jnp.asarray(total_steps, jnp.float32)
    warm = jnp.asarray(warmup_steps, jnp.float32)
    peak = jnp.asarray(peak, jnp.float32)
    alpha = jnp.where(peak == 0, 0.0, jnp.asarray(final, jnp.float32) / peak)
    span = jnp.maximum(total - warm, 1.0)
    t = jnp.clip(count - warm, 0.0, span)
    cosine = peak * ((1 - alpha) * 0.5 * (1 + jnp.cos(jnp.pi * t / span)) + alpha)
    # the warmup as optax's linear_schedule computes it, from 0 to peak: bit for bit the same
    linear = -peak * (1 - jnp.minimum(count, warm) / jnp.maximum(warm, 1.0)) + peak
    return jnp.where(count < warm, linear, cosine)


class CosineState(NamedTuple):
    """State of :func:`scale_by_warmup_cosine`: the update count and the schedule's numbers,
    held as arrays so that they are inputs of a compiled step, not constants in it."""

    count: jax.Array  # int32 updates so far
    total_steps: jax.Array  # int32
    warmup_steps: jax.Array  # int32
    peak: jax.Array  # float32
    final: jax.Array  # float32

    def rate(self, count=None):
        """The learning rate of update ``count`` (default: the latest, or the first)."""
        c = jnp.maximum(self.count - 1, 0) if count is None else count
        return warmup_cosine_value(c, self.total_steps, self.warmup_steps, self.peak, self.final)


def scale_by_warmup_cosine(lr: float, *, total_steps: int, warmup_steps: int,
                           final_lr: float = 1e-6) -> optax.GradientTransformation:
    """``updates · -rate(count)`` with the rate of :func:`warmup_cosine`, its numbers in the
    state (:class:`CosineState`): ``optax.scale_by_learning_rate`` of a schedule whose length
    can change without recompiling the step that applies it."""
    if not 0 <= warmup_steps <= total_steps // 2 or total_steps < 1:
        raise ValueError(f"need 0 <= warmup_steps <= total_steps // 2 and total_steps >= 1, "
                         f"got {warmup_steps}, {total_steps}")

    def init(params):
        del params
        return CosineState(jnp.zeros([], jnp.int32), jnp.asarray(total_steps, jnp.int32),
                           jnp.asarray(warmup_steps, jnp.int32), jnp.asarray(lr, jnp.float32),
                           jnp.asarray(final_lr, jnp.float32))

    def update(updates, state, params=None):
        del params
        rate = state.rate(state.count)
        updates = jax.tree.map(lambda u: (-rate).astype(u.dtype) * u, updates)
        return updates, state._replace(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init, update)


def make_schedule(lr: float, schedule: str, *, steps_per_epoch: int, epochs: int = 1,
                  factor: float = 0.7, every_epochs: int = 5, floor: float = 1e-5,
                  warmup_epochs: float = 1, final_lr: float = 1e-6) -> optax.Schedule:
    """The step-indexed schedule of ``schedule`` (``"plateau"`` and ``"constant"``: constant)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if schedule == "step":
        return step_decay(lr, steps_per_epoch=steps_per_epoch, factor=factor,
                          every_epochs=every_epochs, floor=floor)
    if schedule == "cosine":
        return warmup_cosine(lr, steps_per_epoch=steps_per_epoch, epochs=epochs,
                             warmup_epochs=warmup_epochs, final_lr=final_lr)
    return optax.constant_schedule(lr)


def make_optimizer(lr: float, *, schedule: str = "step", steps_per_epoch: int, epochs: int = 1,
                   clip_norm: float | None = 10.0, b1: float = 0.9, b2: float = 0.999,
                   eps: float = 1e-8, factor: float = 0.7, every_epochs: int = 5,
                   floor: float = 1e-5, warmup_epochs: float = 1, final_lr: float = 1e-6,
                   plateau_patience: int = 10, plateau_factor: float = 0.5,
                   plateau_rtol: float = 1e-4, plateau_cooldown: int = 0,
                   plateau_min_lr: float = 1e-6, weight_decay: float = 0.0
                   ) -> optax.GradientTransformationExtraArgs:
    """Adam (AdamW with ``weight_decay``) with a learning-rate schedule and gradient clipping
    by global norm.

    Args:
        lr: peak (initial) learning rate.
        schedule: one of :data:`SCHEDULES`: ``"step"`` (:func:`step_decay` with ``factor``,
            ``every_epochs``, ``floor``), ``"cosine"`` (:func:`warmup_cosine` with
            ``warmup_epochs``, ``final_lr``), ``"plateau"`` (constant ``lr`` scaled by
            reduce-on-plateau on the epoch-mean training loss, see the module docstring;
            ``plateau_patience`` and ``plateau_cooldown`` count epochs, the scale never
            goes below ``plateau_min_lr / lr``), ``"constant"``.
        steps_per_epoch: optimizer updates per epoch.
        epochs: length of the run (for the cosine schedule).
        clip_norm: global gradient norm cap applied before Adam (None: no clipping).
        b1, b2, eps: Adam's parameters.
        weight_decay: decoupled weight decay (AdamW: ``p -= lr * weight_decay * p`` besides
            the Adam step) of the weight matrices and kernels (leaves with ``ndim >= 2``);
            biases, LayerNorm scales and offsets are not decayed. 0: plain Adam.

    Returns:
        A transformation whose ``update`` accepts (and, but for ``"plateau"``, ignores)
        ``value=`` the batch loss.
    """
    parts = []
    if clip_norm is not None:
        if not clip_norm > 0:
            raise ValueError(f"clip_norm must be positive or None, got {clip_norm}")
        parts.append(optax.clip_by_global_norm(clip_norm))
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    decay_mask = lambda params: jax.tree.map(lambda x: jnp.ndim(x) >= 2, params)  # noqa: E731
    if schedule == "cosine":  # the schedule's numbers in the state (see the module docstring)
        total, warmup = _warmup_steps(steps_per_epoch, epochs, warmup_epochs)
        parts += [optax.scale_by_adam(b1=b1, b2=b2, eps=eps)]
        if weight_decay:  # optax.adamw's order: decay after Adam's scaling, before the rate
            parts += [optax.add_decayed_weights(weight_decay, mask=decay_mask)]
        parts += [scale_by_warmup_cosine(lr, total_steps=total, warmup_steps=warmup,
                                         final_lr=final_lr)]
    else:  # the other schedules are step-indexed functions (constants of the compiled step)
        sched = make_schedule(lr, schedule, steps_per_epoch=steps_per_epoch, epochs=epochs,
                              factor=factor, every_epochs=every_epochs, floor=floor,
                              warmup_epochs=warmup_epochs, final_lr=final_lr)
        if weight_decay:
            # static: inject_hyperparams would call a callable mask as a schedule of the step
            parts.append(optax.inject_hyperparams(optax.adamw, static_args=("mask",))(
                learning_rate=sched, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                mask=decay_mask))
        else:
            parts.append(optax.inject_hyperparams(optax.adam)(learning_rate=sched, b1=b1,
                                                              b2=b2, eps=eps))
    if schedule == "plateau":
        parts.append(optax.contrib.reduce_on_plateau(
            factor=plateau_factor, patience=_positive("plateau_patience", plateau_patience),
            rtol=plateau_rtol, cooldown=plateau_cooldown,
            accumulation_size=_positive("steps_per_epoch", steps_per_epoch),
            min_scale=min(plateau_min_lr / lr, 1.0)))
    return optax.chain(*parts)


def current_lr(opt_state_or_schedule: Any, step: int | None = None) -> float:
    """The learning rate, for logging.

    Args:
        opt_state_or_schedule: a schedule (then ``step`` is required), or the state of a
            :func:`make_optimizer` transformation: then the learning rate its latest update
            used (before any update: the first one's), times the reduce-on-plateau scale.
        step: the step at which to evaluate a schedule.
    """
    if callable(opt_state_or_schedule):
        if step is None:
            raise ValueError("current_lr: a schedule needs a step")
        return float(opt_state_or_schedule(step))
    cosine = [s for s in jax.tree.leaves(
        opt_state_or_schedule, is_leaf=lambda x: isinstance(x, CosineState))
        if isinstance(s, CosineState)]
    found = [s.rate() for s in cosine] or [
        v for _, v in otu.tree_get_all_with_path(opt_state_or_schedule, "learning_rate")
        if hasattr(v, "dtype")]
    if len(found) != 1:
        raise ValueError("current_lr: no single injected learning_rate or cosine schedule in "
                         "this optimizer state")
    # the plateau scale; a key search for "scale" would also hit LayerNorm parameters held
    # in Adam's moments, so look for the reduce-on-plateau state itself
    plateau = [s for s in jax.tree.leaves(
        opt_state_or_schedule, is_leaf=lambda x: isinstance(x, ReduceLROnPlateauState))
        if isinstance(s, ReduceLROnPlateauState)]
    scale = plateau[0].scale if plateau else 1.0
    return float(found[0]) * float(scale)


def _is_float(x) -> bool:
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)


def ema_init(params: Any) -> Any:
    """A copy of ``params`` (any pytree) to start the moving average from."""
    return jax.tree.map(lambda p: jnp.array(p, copy=True) if _is_float(p) else p, params)


def ema_update(ema: Any, params: Any, decay: float, *, step=None) -> Any:
    """``ema ← d·ema + (1 - d)·params`` on every floating-point leaf (others: ``params``).

    Args:
        ema, params: pytrees of the same structure (e.g. ``nnx.State`` of the parameters).
        decay: the decay ``d`` (e.g. 0.999); jit-friendly (may be traced).
        step: optional update count; then ``d = min(decay, (1 + step) / (10 + step))``, the
            warm start of TensorFlow's ``ExponentialMovingAverage`` (early averages are not
            dominated by the random initialisation).
    """
    d = jnp.asarray(decay, jnp.float32)
    if step is not None:
        step = jnp.asarray(step, jnp.float32)
        d = jnp.minimum(d, (1.0 + step) / (10.0 + step))

    def one(e, p):
        if not _is_float(p):
            return p
        return (d.astype(e.dtype) * e + (1 - d).astype(e.dtype) * p.astype(e.dtype))

    return jax.tree.map(one, ema, params)

