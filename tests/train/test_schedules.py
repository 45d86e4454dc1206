"""Schedules against hand-computed values; the optimiser on a quadratic; clipping; EMA."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax import tree_utils as otu

from mpattn.train.schedules import (
    SCHEDULES,
    current_lr,
    ema_init,
    ema_update,
    make_optimizer,
    step_decay,
    warmup_cosine,
    warmup_cosine_value,
)

SPE = 10


def test_step_decay_hand_computed():
    s = step_decay(1e-3, steps_per_epoch=SPE)
    steps = [0, 5 * SPE - 1, 5 * SPE, 10 * SPE - 1, 10 * SPE, 60 * SPE, 65 * SPE, 10**6]
    # x0.7 every 5 epochs: 1e-3 * 0.7^12 = 1.384e-5; 0.7^13 = 9.69e-6 < floor 1e-5
    want = [1e-3, 1e-3, 7e-4, 7e-4, 4.9e-4, 1e-3 * 0.7**12, 1e-5, 1e-5]
    np.testing.assert_allclose([float(s(t)) for t in steps], want, rtol=1e-6)
    s2 = step_decay(0.1, steps_per_epoch=3, factor=0.5, every_epochs=2, floor=0.02)
    np.testing.assert_allclose([float(s2(t)) for t in (0, 5, 6, 11, 12, 18, 100)],
                               [0.1, 0.1, 0.05, 0.05, 0.025, 0.02, 0.02], rtol=1e-6)


def test_warmup_cosine_hand_computed():
    lr, final = 1e-3, 1e-6
    s = warmup_cosine(lr, steps_per_epoch=SPE, epochs=20, warmup_epochs=1, final_lr=final)
    mid = SPE + (20 * SPE - SPE) // 2  # halfway through the cosine: 95 of its 190 steps
    frac = (mid - SPE) / (20 * SPE - SPE)
    want = [0.0, lr / 2, lr, final + (lr - final) * 0.5 * (1 + math.cos(math.pi * frac)),
            final, final]
    got = [float(s(t)) for t in (0, SPE // 2, SPE, mid, 20 * SPE, 10**5)]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize(("spe", "epochs", "warmup_epochs"), [(SPE, 20, 1), (7, 3, 0.5),
                                                                (4, 1, 1), (3, 2, 0)])
def test_cosine_with_its_numbers_as_arguments_equals_optax(spe, epochs, warmup_epochs):
    lr, final = 2e-3, 1e-6
    s = warmup_cosine(lr, steps_per_epoch=spe, epochs=epochs, warmup_epochs=warmup_epochs,
                      final_lr=final)
    total = spe * epochs
    warm = min(round(warmup_epochs * spe), total // 2)
    counts = sorted({0, 1, max(warm - 1, 0), warm, warm + 1, total // 2, total - 1, total,
                     total + 9})
    got = [float(warmup_cosine_value(c, total, warm, lr, final)) for c in counts]
    np.testing.assert_allclose(got, [float(s(c)) for c in counts], rtol=2e-6, atol=1e-12)


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_cosine_optimizer_equals_optax_adam_with_the_schedule(weight_decay):
    """The cosine schedule's numbers moved into the state: bit for bit the updates of optax's
    Adam/AdamW with the schedule. (Under inject_hyperparams, as before, Adam's b1, b2, eps
    are float32 arrays and the losses differ from these by ~5e-6 after 25 steps.)"""
    f, p0 = _quadratic()
    p0 = {"w": p0["w"], "m": jnp.array([[0.5, -1.0], [2.0, 0.1]])}
    loss = lambda p: f({"w": p["w"]}) + jnp.sum(p["m"] ** 2)  # noqa: E731
    sched = warmup_cosine(0.05, steps_per_epoch=4, epochs=5, warmup_epochs=1)
    mask = lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)  # noqa: E731
    ref = optax.chain(optax.clip_by_global_norm(10.0), optax.adamw(
        learning_rate=sched, weight_decay=weight_decay, mask=mask) if weight_decay else
        optax.adam(learning_rate=sched))
    ours = make_optimizer(0.05, schedule="cosine", steps_per_epoch=4, epochs=5,
                          weight_decay=weight_decay)
    p_ref, _, l_ref = _run(ref, loss, p0, 25)
    p_ours, state, l_ours = _run(ours, loss, p0, 25)
    np.testing.assert_array_equal(l_ours, l_ref)
    for k in p0:
        np.testing.assert_array_equal(p_ours[k], p_ref[k])
    assert current_lr(state) == pytest.approx(float(sched(24)), rel=1e-6)  # the 25th update's


def test_one_compiled_cosine_update_serves_every_run_length():
    """A trial trainer's compiled step is reused by the run it planned (other epochs)."""
    params = {"w": jnp.ones(3)}
    g = {"w": jnp.full(3, 0.5)}
    update = jax.jit(lambda s: make_optimizer(1e-2, schedule="cosine", steps_per_epoch=10,
                                              epochs=1).update(g, s, params))
    rates = []
    for epochs in (2, 7):
        state = make_optimizer(1e-2, schedule="cosine", steps_per_epoch=10,
                               epochs=epochs).init(params)
        for _ in range(16):  # 10 warmup steps, then 6 of the cosine
            _, state = update(state)
        rates.append(current_lr(state))
    assert update._cache_size() == 1
    want = [float(warmup_cosine(1e-2, steps_per_epoch=10, epochs=e)(15)) for e in (2, 7)]
    np.testing.assert_allclose(rates, want, rtol=1e-6)
    assert rates[0] < rates[1]  # the shorter run's cosine has fallen further


def _quadratic():
    a = jnp.array([1.0, 4.0, 0.25])
    c = jnp.array([1.0, -2.0, 3.0])
    return (lambda p: 0.5 * jnp.sum(a * (p["w"] - c) ** 2)), {"w": jnp.zeros(3)}


def _run(tx, f, params, n, grad=None):
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        loss, g = jax.value_and_grad(f)(params)
        updates, state = tx.update(g, state, params, value=loss)
        return optax.apply_updates(params, updates), state, loss

    losses = []
    for _ in range(n):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    return params, state, losses


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_optimizer_decreases_quadratic(schedule):
    f, p0 = _quadratic()
    tx = make_optimizer(0.1, schedule=schedule, steps_per_epoch=5, epochs=10, warmup_epochs=1)
    params, _, losses = _run(tx, f, p0, 50)
    assert float(f(params)) < 0.2 * losses[0]


def test_current_lr_reads_the_state():
    f, p0 = _quadratic()
    tx = make_optimizer(0.1, schedule="step", steps_per_epoch=1, factor=0.5, every_epochs=1,
                        floor=1e-4)
    assert current_lr(tx.init(p0)) == pytest.approx(0.1)
    _, state, _ = _run(tx, f, p0, 3)
    # the third update (step 2) used 0.1 * 0.5^2
    assert current_lr(state) == pytest.approx(0.025)
    assert current_lr(step_decay(0.1, steps_per_epoch=1, every_epochs=1, factor=0.5), 3) == \
        pytest.approx(0.0125)
    with pytest.raises(ValueError, match="a schedule needs a step"):
        current_lr(optax.constant_schedule(0.1))


def test_plateau_reduces_once_per_epoch_of_stagnation():
    # a constant loss: epoch 1 sets the best, epochs 2 and 3 do not improve -> patience 2 hit
    tx = make_optimizer(0.1, schedule="plateau", steps_per_epoch=2, plateau_patience=2,
                        plateau_factor=0.5)
    params = {"w": jnp.zeros(2)}
    state = tx.init(params)
    g = {"w": jnp.ones(2)}
    update = jax.jit(tx.update)
    lrs = []
    for _ in range(8):
        _, state = update(g, state, params, value=jnp.float32(1.0))
        lrs.append(current_lr(state))
    np.testing.assert_allclose(lrs, [0.1] * 5 + [0.05] * 3, rtol=1e-6)


def test_clipping_caps_the_gradient_adam_sees():
    params = {"w": jnp.zeros(3), "b": jnp.zeros(2)}
    huge = {"w": jnp.full(3, 1e6), "b": jnp.full(2, -1e6)}
    for clip, want in ((10.0, 10.0), (None, 1e6 * math.sqrt(5))):
        tx = make_optimizer(1e-3, schedule="constant", steps_per_epoch=1, clip_norm=clip)
        updates, state = jax.jit(tx.update)(huge, tx.init(params), params, value=0.0)
        mu = otu.tree_get(state, "mu")
        # Adam's first moment after one step is (1 - b1) * gradient
        np.testing.assert_allclose(float(otu.tree_norm(mu)) / 0.1, want, rtol=1e-5)
        assert np.isfinite(float(otu.tree_norm(updates)))


def test_clipping_stops_an_outlier_dominating_the_momentum():
    # one huge gradient the wrong way, then three ordinary ones: unclipped, Adam's momentum
    # still points along the outlier; clipped to norm 1, the ordinary gradients win
    params = {"w": jnp.zeros(1)}
    grads = [{"w": jnp.full(1, -1e8)}] + [{"w": jnp.ones(1)}] * 3
    last = {}
    for clip in (1.0, None):
        tx = make_optimizer(1e-2, schedule="constant", steps_per_epoch=1, clip_norm=clip)
        state, update = tx.init(params), jax.jit(tx.update)
        for g in grads:
            updates, state = update(g, state, params, value=0.0)
        last[clip] = float(updates["w"][0])
    assert last[1.0] < 0 < last[None]  # descent along -grad only with clipping


def test_unknown_schedule():
    with pytest.raises(ValueError,
                       match="unknown schedule 'linear'; choose one of step, cosine, plateau"):
        make_optimizer(1e-3, schedule="linear", steps_per_epoch=1)


def test_ema():
    params = {"w": jnp.array([1.0, 2.0]), "n": jnp.array(3, jnp.int32)}
    ema = ema_init(params)
    np.testing.assert_array_equal(ema["w"], params["w"])
    new = {"w": jnp.array([3.0, -2.0]), "n": jnp.array(4, jnp.int32)}
    out = jax.jit(ema_update)(ema, new, 0.9)
    np.testing.assert_allclose(out["w"], [0.9 * 1 + 0.1 * 3, 0.9 * 2 - 0.1 * 2], rtol=1e-6)
    assert int(out["n"]) == 4  # non-float leaves follow the parameters
    # warm start: d = min(0.999, (1 + 0) / (10 + 0)) = 0.1
    warm = ema_update(ema, new, 0.999, step=0)
    np.testing.assert_allclose(warm["w"], [0.1 * 1 + 0.9 * 3, 0.1 * 2 - 0.9 * 2], rtol=1e-6)
    far = ema_update(ema, new, 0.999, step=10**6)
    np.testing.assert_allclose(far["w"], [0.999 + 0.003, 1.998 - 0.002], rtol=1e-6)


def test_current_lr_with_layernorm_parameters_in_the_state():
    """Adam's moments mirror the parameters; a LayerNorm's 'scale' must not be read as the
    reduce-on-plateau scale."""
    from flax import nnx

    from mpattn.train.schedules import current_lr, make_optimizer

    params = nnx.state(nnx.LayerNorm(4, rngs=nnx.Rngs(0)), nnx.Param)
    for schedule in ("step", "plateau"):
        opt = make_optimizer(1e-3, schedule=schedule, steps_per_epoch=10)
        np.testing.assert_allclose(current_lr(opt.init(params)), 1e-3, rtol=1e-6)


def test_weight_decay_shrinks_weight_matrices_only():
    """AdamW with zero gradients: kernels shrink by lr * wd * p per step (hand-computed), 1-d
    leaves (biases, LayerNorm scales) do not move; wd = 0 is Adam; the learning rate is
    still readable; a negative decay is an error."""
    params = {"kernel": jnp.full((2, 3), 2.0), "bias": jnp.ones(3), "scale": jnp.full(3, 0.5)}
    zero = jax.tree.map(jnp.zeros_like, params)
    tx = make_optimizer(0.1, schedule="constant", steps_per_epoch=1, weight_decay=0.01,
                        clip_norm=None)
    state, p = tx.init(params), params
    for _ in range(2):
        updates, state = tx.update(zero, state, p)
        p = optax.apply_updates(p, updates)
    np.testing.assert_allclose(p["kernel"], 2.0 * (1 - 0.1 * 0.01) ** 2, rtol=1e-6)
    np.testing.assert_array_equal(p["bias"], 1.0)
    np.testing.assert_array_equal(p["scale"], 0.5)
    assert current_lr(state) == pytest.approx(0.1)
    plain = make_optimizer(0.1, schedule="constant", steps_per_epoch=1, clip_norm=None)
    updates, _ = plain.update(zero, plain.init(params), params)
    assert all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree.leaves(updates))
    with pytest.raises(ValueError, match="weight_decay must be >= 0"):
        make_optimizer(0.1, steps_per_epoch=1, weight_decay=-1.0)
