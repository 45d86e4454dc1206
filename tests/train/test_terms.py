"""The auxiliary loss terms in whole runs: denoising (noisy nodes) and the dipole term."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from mpattn.train import (
    Denoising,
    Dipole,
    PropertyTask,
)
from tests.train.trainer_helpers import (
    TINY,
    _config,
    _data,
    _run,
)

# ---------------------------------------------------------------------- auxiliary terms

SMALL_ATTENTION = {"dim": 16, "num_heads": 2, "head_dim": 8, "steps": 2, "ff_dim": 32,
                   "num_rbf": 8, "attention_weights": "softmax"}


def test_denoised_run_records_its_head_and_resumes(cache_file, tmp_path):
    """A run with the denoising term records the denoising head in results.json's model
    config (the model it trained has one) and the term in its task, and resumes from its
    checkpoint with the same settings."""
    small = SMALL_ATTENTION | {"vector_features": True}
    work = tmp_path / "dn"
    task = PropertyTask(aux=(Denoising(sigma=0.05),))
    kw = dict(model="attention", task=task, model_overrides=small)
    first = _run(cache_file, work, epochs=1, **kw)
    assert first["model_config"]["denoise"] is True
    assert first["task"]["aux"] == [{"name": "denoise", "sigma": 0.05, "weight": 0.1}]
    again = _run(cache_file, work, epochs=2, resume=True, **kw)
    assert again["epochs"] == 2 and again["model_config"]["denoise"] is True
    assert json.loads((work / "results.json").read_text())["model_config"]["denoise"] is True
    # resuming without the term is resuming another run
    with pytest.raises(ValueError, match=r"other settings \(aux: "):
        _run(cache_file, work, epochs=3, resume=True, model="attention",
             model_overrides=small)


SMALL_SO3KRATES = {"dim": 16, "num_heads": 2, "degree_dim": 8, "mix_dim": 32, "num_rbf": 8}


@pytest.mark.parametrize("model, small", [
    ("attention", SMALL_ATTENTION | {"vector_features": True}),
    ("so3krates", SMALL_SO3KRATES)])
def test_denoising_learns_to_predict_the_noise(qm9_molset, model, small):
    """``Denoising``: the batch's real atoms get noise from a key (the same key, the same
    noise: the train step keys it by (seed, step), so resuming repeats it), padding atoms
    none; the train step trains the head; Adam steps on the denoising loss alone teach it to
    predict part of noise it has never seen; bad settings are refused."""
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from mpattn.data.loader import BatchLoader
    from mpattn.graph import node_mask
    from mpattn.models import default_config
    from mpattn.train.steps import make_train_step, stack_batches
    from mpattn.train.terms import add_position_noise, masked_node_mean
    from mpattn.train.trainer import build_state

    small = default_config(model, **small)
    cfg = _config(model=model, epochs=1)
    task = PropertyTask(aux=(Denoising(sigma=0.05),))
    data = _data(qm9_molset, cfg, task)
    batch = next(iter(BatchLoader(data.train.graphs, 32, prefetch=0, shuffle=False)))
    noisy, noise = add_position_noise(batch, jax.random.key(7), 0.05)
    moved = np.asarray(noisy.nodes["positions"]) - np.asarray(batch.nodes["positions"])
    real = np.asarray(node_mask(batch))
    assert not moved[~real].any() and np.all(moved[real] != 0)
    assert np.std(moved[real]) == pytest.approx(0.05, rel=0.1)
    np.testing.assert_allclose(moved[real], 0.05 * np.asarray(noise)[real], rtol=1e-4,
                               atol=1e-7)
    again, _ = add_position_noise(batch, jax.random.key(7), 0.05)
    np.testing.assert_array_equal(again.nodes["positions"], noisy.nodes["positions"])

    # the train step: the task turns the head on, the auxiliary loss reaches it
    built = task.model_config(small)
    assert built.denoise and not small.denoise
    _, graphdef, rest, optimizer, carry = build_state(cfg, task, data, built,
                                                      steps_per_epoch=1)
    head = np.asarray(carry["params"]["denoise_head"]["kernel"][...])
    train_step = make_train_step(graphdef, optimizer, cfg, task)
    trained, loss = train_step(jax.tree.map(jnp.copy, carry), rest, stack_batches([batch]))
    assert np.isfinite(float(loss))
    assert np.abs(trained["params"]["denoise_head"]["kernel"][...] - head).min() > 0

    opt = optax.adam(3e-3)

    def error(params, key):  # mean squared error per component, in units of sigma
        g, eps = add_position_noise(batch, key, 0.05)
        guess = nnx.merge(graphdef, params, rest)(g)["noise"]
        return masked_node_mean(jnp.square(guess - eps), g) / 3

    @jax.jit
    def step(params, state, key):
        grads = jax.grad(error)(params, key)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    params, state = carry["params"], opt.init(carry["params"])
    before = float(error(params, jax.random.key(-1)))
    for i in range(150):
        params, state = step(params, state, jax.random.key(i))
    after = float(np.mean([error(params, jax.random.key(-k)) for k in range(1, 4)]))
    assert after < 0.9 < before  # 1: the error of predicting no noise

    with pytest.raises(ValueError, match=r"^--denoise-sigma 0.02: denoising needs a model "
                                         "with a denoising head"):
        PropertyTask(aux=(Denoising(0.02),)).model_config(default_config("schnet", **TINY))
    with pytest.raises(ValueError, match=r"denoising needs sigma > 0 and weight >= 0, got "
                                         r"-0.1, 0.1"):
        Denoising(sigma=-0.1)
    with pytest.raises(ValueError, match=r"got 0.02, -1.0"):
        Denoising(sigma=0.02, weight=-1.0)


def test_dipole_loss_teaches_the_charges(qm9_molset, cache_file, tmp_path):
    """``Dipole``: batches carry QM9's mu; the loss is the mean |length of Σ q r - mu| in
    Debye (by hand at the start, where the charges are near 0); train steps lower it; a run
    records the term; bad settings are refused."""
    import jax.numpy as jnp
    from flax import nnx

    from mpattn.data.loader import BatchLoader
    from mpattn.graph import graph_mask
    from mpattn.models import default_config
    from mpattn.nn.electrostatics import DEBYE, dipole_moment
    from mpattn.train.steps import make_train_step, stack_batches
    from mpattn.train.terms import dipole_error
    from mpattn.train.trainer import build_state

    small = default_config("attention", **SMALL_ATTENTION, electrostatics=True)
    cfg = _config(model="attention", epochs=1, lr=3e-3)
    task = PropertyTask(aux=(Dipole(1.0),))
    data = _data(qm9_molset, cfg, task)
    assert "mu" not in _data(qm9_molset, cfg).train.graphs.globals  # only when a term asks
    batch = next(iter(BatchLoader(data.train.graphs, 32, prefetch=0, shuffle=False)))
    real = np.asarray(graph_mask(batch))
    mu = np.asarray(batch.globals["mu"])[real]
    ids = np.asarray(batch.globals["id"])[real]
    np.testing.assert_allclose(mu, qm9_molset.targets["mu"][qm9_molset.index_of(ids)],
                               rtol=1e-6)
    # the cosine schedule spans epochs x steps_per_epoch steps: the 120 below, at lr 3e-3
    model, graphdef, rest, optimizer, carry = build_state(
        cfg, task, data, task.model_config(small), steps_per_epoch=120)
    q = model(batch)["charges"]
    length = np.linalg.norm(np.asarray(dipole_moment(q, batch.nodes["positions"],
                                                     batch.n_node)), axis=1)[real] / DEBYE
    before = float(dipole_error(q, batch))
    assert before == pytest.approx(np.mean(np.abs(length - mu)), rel=1e-5)
    train_step = make_train_step(graphdef, optimizer, cfg, task)
    for _ in range(120):
        carry, loss = train_step(carry, rest, stack_batches([batch]))
    trained = nnx.merge(graphdef, carry["params"], rest)
    after = float(dipole_error(trained(batch)["charges"], batch))
    assert np.isfinite(float(loss)) and after < 0.5 * before, (before, after)
    assert float(jnp.abs(carry["params"]["coulomb_scale"][...])) > 0

    result = _run(cache_file, tmp_path / "dip", epochs=1, model="attention",
                  task=PropertyTask(aux=(Dipole(0.5),)),
                  model_overrides={"dim": 16, "num_heads": 2, "head_dim": 8, "steps": 2,
                                   "attention_weights": "softmax", "electrostatics": True})
    assert result["task"]["aux"] == [{"name": "dipole", "weight": 0.5}]
    assert result["model_config"]["electrostatics"] is True
    with pytest.raises(ValueError, match=r"^--dipole-weight 0.1: the dipole loss needs a "
                                         "model with atomic charges"):
        PropertyTask(aux=(Dipole(0.1),)).model_config(default_config("attention"))
    with pytest.raises(ValueError, match=r"^--dipole-weight -1.0: must be >= 0"):
        Dipole(-1.0)
