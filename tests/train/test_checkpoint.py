"""Tests of mpattn.train.checkpoint: orbax checkpoints, latest N + best, faults."""

from __future__ import annotations

import functools
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mpattn.train.checkpoint import Checkpointer

REPO = Path(__file__).resolve().parents[2]


class MLP(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs):
        self.l1 = nnx.Linear(3, 8, rngs=rngs)
        self.l2 = nnx.Linear(8, 1, rngs=rngs)

    def __call__(self, x):
        return self.l2(jax.nn.relu(self.l1(x)))


TX = optax.adam(1e-2)


@functools.partial(jax.jit, static_argnums=0)
def adam_step(graphdef, params, opt):
    x = jnp.linspace(-1.0, 1.0, 12).reshape(4, 3)
    grads = jax.grad(lambda p: jnp.mean(nnx.merge(graphdef, p)(x) ** 2))(params)
    upd, opt = TX.update(grads, opt, params)
    return optax.apply_updates(params, upd), opt


def train_state(seed: int, *, updates: int = 1):
    """A real nnx model + optax.adam state (after `updates` steps) + PRNG keys."""
    model = MLP(rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(model)
    opt = TX.init(params)
    for _ in range(updates):
        params, opt = adam_step(graphdef, params, opt)
    nnx.update(model, params)
    state = {
        "model": nnx.state(model),
        "opt": opt,
        "rng": jax.random.key(seed),
        "legacy_rng": jax.random.PRNGKey(seed + 1),
        "epoch": seed + 3,
    }
    return model, state


def small(step: int):
    return {"w": jnp.full((4,), float(step)), "n": jnp.asarray(step, jnp.int32)}


def assert_trees_equal(a, b):
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb
    for x, y in zip(la, lb, strict=True):
        if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            assert jax.random.key_impl(x) == jax.random.key_impl(y)
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_nnx_optax_key_meta(tmp_path):
    model, state = train_state(0, updates=2)
    fresh_model, template = train_state(7, updates=0)
    meta = {"epoch": 3, "position": 128, "norm": {"mean": np.float32(-1.5), "std": [2.0]},
            "split": "split.npz", "config": {"model": "mhmp", "lr": 1e-3}}
    ckpt = Checkpointer(tmp_path / "ck")
    assert ckpt.save(10, state, meta=meta, val_mae=0.25) == {"latest": True, "best": True}

    restored, rmeta = Checkpointer(tmp_path / "ck").restore(template)
    assert_trees_equal(restored, state)
    assert isinstance(restored["opt"][0], optax.ScaleByAdamState)
    assert int(restored["opt"][0].count) == 2
    assert rmeta == {"epoch": 3, "position": 128, "norm": {"mean": -1.5, "std": [2.0]},
                     "split": "split.npz", "config": {"model": "mhmp", "lr": 1e-3},
                     "checkpoint": {"step": 10, "val_mae": 0.25}}
    # the restored state drives a model as the original one
    nnx.update(fresh_model, restored["model"])
    x = jnp.ones((2, 3))
    np.testing.assert_array_equal(np.asarray(fresh_model(x)), np.asarray(model(x)))
    # the key continues the same random stream
    np.testing.assert_array_equal(
        np.asarray(jax.random.normal(restored["rng"], (3,))),
        np.asarray(jax.random.normal(state["rng"], (3,))),
    )


def test_latest_n_and_best_kept_although_older(tmp_path):
    ckpt = Checkpointer(tmp_path, max_to_keep=2)
    maes = {1: 3.0, 2: 1.0, 3: 2.0, 4: 4.0, 5: 5.0}
    done = {s: ckpt.save(s, small(s), meta={"epoch": s}, val_mae=v) for s, v in maes.items()}
    assert [s for s, d in done.items() if d["best"]] == [1, 2]
    for c in (ckpt, Checkpointer(tmp_path, max_to_keep=2)):  # in memory and from disk
        assert c.steps() == [2, 4, 5]
        assert sorted(int(p.name) for p in tmp_path.iterdir()) == [2, 4, 5]
        assert (c.latest_step(), c.best_step(), c.best_val_mae()) == (5, 2, 1.0)
        state, meta = c.restore(small(0), which="best")
        assert_trees_equal(state, small(2))
        assert meta["epoch"] == 2
        state, meta = c.restore(small(0))
        assert_trees_equal(state, small(5))
        assert meta == {"epoch": 5, "checkpoint": {"step": 5, "val_mae": 5.0}}


def test_best_only_replaced_by_strictly_lower_finite_mae(tmp_path):
    ckpt = Checkpointer(tmp_path, max_to_keep=2)
    assert ckpt.save(1, small(1), meta={}, val_mae=1.0)["best"]
    assert not ckpt.save(2, small(2), meta={}, val_mae=1.0)["best"]  # a tie is no better
    for step, bad in [(3, math.nan), (4, math.inf)]:
        with pytest.warns(UserWarning, match=f"step {step}: val_mae={bad} is not finite"):
            assert ckpt.save(step, small(step), meta={}, val_mae=bad) == {
                "latest": True, "best": False}
    assert not ckpt.save(5, small(5), meta={}, val_mae=None)["best"]
    assert not ckpt.save(6, small(6), meta={}, val_mae=2.0)["best"]
    assert ckpt.steps() == [1, 5, 6]
    assert (ckpt.best_step(), ckpt.best_val_mae()) == (1, 1.0)
    state, _ = ckpt.restore(small(0), which="best")
    assert_trees_equal(state, small(1))
    assert ckpt.save(7, small(7), meta={}, val_mae=0.5)["best"]
    assert ckpt.steps() == [6, 7]
    assert (ckpt.best_step(), ckpt.best_val_mae()) == (7, 0.5)


@pytest.mark.parametrize(
    ("where", "path"),
    [("model", "model/l2/kernel/value"), ("opt", "opt/0/mu/l1/bias/value")],
)
def test_non_finite_state_refused(tmp_path, where, path):
    _, good = train_state(0)
    ckpt = Checkpointer(tmp_path)
    ckpt.save(1, good, meta={"epoch": 1}, val_mae=1.0)
    _, bad = train_state(0)
    if where == "model":
        bad["model"]["l2"]["kernel"][0, 0] = jnp.nan
    else:
        bad["opt"][0].mu["l1"]["bias"][1] = jnp.inf
    with pytest.raises(ValueError, match=f"refusing to save step 2 in .*: state leaf '{path}' "
                                         "holds NaN or inf"):
        ckpt.save(2, bad, meta={"epoch": 2}, val_mae=0.1)
    assert ckpt.steps() == [1] and sorted(p.name for p in tmp_path.iterdir()) == ["1"]
    assert (ckpt.best_step(), ckpt.best_val_mae()) == (1, 1.0)
    _, template = train_state(5, updates=0)
    state, meta = ckpt.restore(template)
    assert_trees_equal(state, good)


def test_bad_arguments(tmp_path):
    ckpt = Checkpointer(tmp_path)
    ckpt.save(3, small(3), meta={})
    with pytest.raises(ValueError, match="cannot save step 3 in .*: step 3 is already saved"):
        ckpt.save(3, small(3), meta={})
    with pytest.raises(ValueError, match="cannot save step 2 .*steps must increase"):
        ckpt.save(2, small(2), meta={})
    with pytest.raises(ValueError, match="meta of step 4 is not JSON-serialisable"):
        ckpt.save(4, small(4), meta={"f": object()})
    with pytest.raises(ValueError, match="which must be 'latest' or 'best', got 'last'"):
        ckpt.restore(small(0), which="last")
    with pytest.raises(ValueError, match=r"has no step 5 \(saved steps: \[3\]\)"):
        ckpt.restore(small(0), step=5)
    with pytest.raises(ValueError, match="has no checkpoint with a validation MAE"):
        ckpt.restore(small(0), which="best")
    with pytest.raises(ValueError, match="step 3 does not match the template: ValueError: "
                                         "Requested shape: \\(5,\\)"):
        ckpt.restore({"w": jnp.zeros(5), "n": jnp.asarray(0, jnp.int32)})
    with pytest.raises(ValueError, match="step 3 does not match the template"):
        ckpt.restore({"w": jnp.zeros(4)})
    ckpt.save(4, small(4), meta={})  # a template mismatch never deletes a good checkpoint
    assert ckpt.steps() == [3, 4]


def test_restore_from_missing_or_empty_directory(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ValueError, match=f"checkpoint directory {missing} does not exist"):
        Checkpointer(missing).restore(small(0))
    assert not missing.exists()  # reading never creates it
    assert (Checkpointer(missing).steps(), Checkpointer(missing).latest_step()) == ([], None)
    with pytest.raises(ValueError, match=f"checkpoint directory {tmp_path} holds no checkpoint "
                                         r"\(it is empty\)"):
        Checkpointer(tmp_path).restore(small(0))
    (tmp_path / "2.orbax-checkpoint-tmp").mkdir()
    with pytest.raises(ValueError, match=r"holds no checkpoint \(only an unfinished save\)"):
        Checkpointer(tmp_path).restore(small(0))


def damage(directory: Path, step: int, how: str) -> None:
    # array data: the ocdbt data files (small arrays are inlined in the root b-tree nodes)
    files = list((directory / str(step) / "state").glob("**/d/*"))
    assert files
    for f in files:
        if how == "truncate":
            with open(f, "r+b") as fh:
                fh.truncate(7)
        else:
            f.unlink()


@pytest.mark.parametrize("how", ["truncate", "delete"])
def test_damaged_latest_falls_back_to_intact(tmp_path, how):
    ckpt = Checkpointer(tmp_path)
    for s in (1, 2, 3):
        ckpt.save(s, small(s), meta={"epoch": s}, val_mae=float(s))
    damage(tmp_path, 3, how)
    resumed = Checkpointer(tmp_path)
    with pytest.warns(UserWarning, match=f"checkpoint directory {tmp_path}: damaged "
                                         r"checkpoint\(s\) skipped \(step 3: .*\); restored "
                                         "step 2 instead"):
        state, meta = resumed.restore(small(0))
    assert_trees_equal(state, small(2))
    assert meta["epoch"] == 2
    with pytest.raises(ValueError, match="damaged checkpoint, nothing restored: step 3: "):
        resumed.restore(small(0), step=3)
    # the resumed run re-saves step 3: the damaged one is removed, not kept beside it
    with pytest.warns(UserWarning, match=f"deleting damaged checkpoint step 3 in {tmp_path}"):
        resumed.save(3, small(3), meta={"epoch": 3}, val_mae=3.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        state, _ = Checkpointer(tmp_path).restore(small(0))
    assert_trees_equal(state, small(3))


def test_all_damaged_raises(tmp_path):
    ckpt = Checkpointer(tmp_path)
    ckpt.save(1, small(1), meta={}, val_mae=1.0)
    ckpt.save(2, small(2), meta={}, val_mae=2.0)
    damage(tmp_path, 1, "delete")
    damage(tmp_path, 2, "truncate")
    with pytest.raises(ValueError, match=f"checkpoint directory {tmp_path}: damaged checkpoint, "
                                         "nothing restored: step 2: .*; step 1: "):
        Checkpointer(tmp_path).restore(small(0))
    with pytest.raises(ValueError, match="damaged checkpoint, nothing restored: step 1: "):
        Checkpointer(tmp_path).restore(small(0), which="best")


CHILD = textwrap.dedent(
    """
    import sys
    import numpy as np
    from mpattn.train.checkpoint import Checkpointer
    step = int(sys.argv[2])
    state = {f"w{i}": np.full(2_000_000, float(i), np.float32) for i in range(8)}  # 64 MB
    ckpt = Checkpointer(sys.argv[1])
    print("ready", flush=True)
    ckpt.save(step, state, meta={"step": step})
    print("done", flush=True)
    import time
    time.sleep(120)  # alive until killed: a save that ends before the kill is not an exit
    """
)


def test_sigkill_during_save_keeps_previous_checkpoint(tmp_path):
    Checkpointer(tmp_path).save(1, small(1), meta={"epoch": 1}, val_mae=1.0)
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    partial = []
    for step, delay in [(2, 0.0), (3, 0.1), (4, 0.3)]:
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path), str(step)],
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
                                 text=True)
        assert child.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 20.0
        while not list(tmp_path.glob(f"{step}.orbax-checkpoint-tmp*")):
            assert time.monotonic() < deadline and child.poll() is None, "no write started"
            time.sleep(0.001)
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
        assert child.returncode == -signal.SIGKILL
        if list(tmp_path.glob(f"{step}.orbax-checkpoint-tmp*")):
            partial.append(step)
        reader = Checkpointer(tmp_path)
        assert not set(partial) & set(reader.steps())  # partial saves are ignored
        assert reader.steps()[0] == 1 and reader.best_step() == 1
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            state, meta = reader.restore(small(0), step=1)
        assert_trees_equal(state, small(1))
        assert meta["epoch"] == 1
    assert partial, "no kill landed during a write"
    # the next writer removes the partial folders and saves normally
    Checkpointer(tmp_path).save(5, small(5), meta={"epoch": 5})
    assert not list(tmp_path.glob("*.orbax-checkpoint-tmp*"))
    assert Checkpointer(tmp_path).latest_step() == 5


def test_recorded_settings_skip_fields_of_newer_versions_and_default_unrecorded_ones():
    """``run_settings`` reads the settings a checkpoint recorded: training and task fields a
    newer version wrote are left out, unrecorded ones take their defaults (today's for a
    format-2 checkpoint, the old trainers' for one written before the one-engine change);
    a model config takes the renamed model's old class defaults; a model field it does not
    know is an error naming it."""
    from mpattn.train import EnergyForceTask, PropertyTask, TrainConfig
    from mpattn.train.runs import OLD_POTENTIAL_DEFAULTS, model_config_of, run_settings

    config, task, model, run_info = run_settings({
        "format": 2, "config": {"model": "schnet", "epochs": 7, "from_2030": 1},
        "task": {"kind": "property", "target": "gap", "from_2030": [1], "cutoff": None},
        "model_config": {"cutoff": 4.0}})
    assert config == TrainConfig(model="schnet", epochs=7)
    assert (config.model, config.epochs, config.lr) == ("schnet", 7, TrainConfig().lr)
    assert task == PropertyTask(target="gap") and run_info == {}
    assert (model.cutoff, model.dim) == (4.0, 128)  # the rest at SchNetConfig's defaults
    # a potential run of the old format: the PotentialConfig's defaults of the time
    pot_config, pot_task, _, _ = run_settings({
        "config": {"model": "schnet", "beta": 0.5, "new": [1]}, "model": "schnet",
        "reference": {"elements": [1, 6], "energies": [-13.0, -1030.0], "scale": 1.0},
        "model_config": {"cutoff": 5.0}})
    assert pot_task == EnergyForceTask(cutoff=5.0, beta=0.5)
    assert (pot_config.loss, pot_config.lr, pot_config.batch_size, pot_config.ema_decay) == (
        OLD_POTENTIAL_DEFAULTS["loss"], 3e-3, 8, 0.99) == ("mse", 3e-3, 8, 0.99)
    model = model_config_of("attention_potential", {"cutoff": 4.0, "vector_features": True})
    assert (type(model).__name__, model.cutoff, model.vector_features,
            model.attention_weights) == ("AttentionConfig", 4.0, True, "softmax")
    assert model_config_of("attention", {"attention_weights": "silu"}).attention_weights == \
        "silu"
    with pytest.raises(ValueError, match=r"schnet: unknown config field\(s\) \['from_2030'\]"):
        model_config_of("schnet", {"from_2030": 1})
    with pytest.raises(ValueError, match="unknown task kind 'md'"):
        run_settings({"format": 2, "config": {}, "task": {"kind": "md"}, "model_config": {}})
