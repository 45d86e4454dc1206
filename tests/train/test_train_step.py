"""The jit-compiled train step the trainer runs: K scanned steps equal K single ones, several
steps per call train as one per call, and the carry travels as flat leaves."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from mpattn.data.qm9 import make_split
from mpattn.train import Trainer
from tests.train.trainer_helpers import SIZES, TASK, TINY, _config, _data, _trained, quiet


def test_scanned_steps_equal_single_steps(qm9_molset):
    """``make_train_step(scan=True)`` on K stacked steps gives the losses and the state of K
    calls of the plain step (EMA and clipping included)."""
    from mpattn.data.loader import BatchLoader, derive_budgets
    from mpattn.models import default_config
    from mpattn.train.steps import make_train_step, stack_batches, stack_steps
    from mpattn.train.trainer import build_state

    cfg = _config(ema_decay=0.9, clip_norm=1.0)
    data = _data(qm9_molset, cfg)
    gs = data.train.graphs
    loader = BatchLoader(gs, 32, budgets=derive_budgets(gs, 32, num_budgets=1), prefetch=0)
    batches = list(loader.epoch(0))[:3]
    mcfg = default_config("schnet", **TINY)

    def fresh():
        _, graphdef, rest, opt, carry = build_state(cfg, TASK, data, mcfg, steps_per_epoch=10)
        return graphdef, rest, opt, carry

    graphdef, rest, opt, carry = fresh()
    assert set(carry) == {"params", "opt", "step", "ema"}
    step = make_train_step(graphdef, opt, cfg, TASK)
    single = []
    for b in batches:
        carry, loss = step(carry, rest, stack_batches([b]))
        single.append(float(loss))
    graphdef, rest, opt, scanned = fresh()
    steps = make_train_step(graphdef, opt, cfg, TASK, scan=True)
    scanned, losses = steps(scanned, rest, stack_steps([[b] for b in batches]))
    assert losses.shape == (3,) and int(scanned["step"]) == int(carry["step"]) == 3
    np.testing.assert_allclose(np.asarray(losses), single, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 scanned["params"], carry["params"])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 scanned["ema"], carry["ema"])


def test_several_steps_per_call_train_as_one_step_per_call(qm9_molset, tmp_path):
    """A Trainer with ``steps_per_call=3`` runs every step of each epoch (the last
    ``steps % 3`` through the plain step), compiles each step function once, and its
    metrics match one step per call (the same batches: only the padding differs)."""
    from mpattn.data.loader import BatchLoader, derive_budgets
    from mpattn.models import default_config

    split = make_split(qm9_molset.ids, sizes=SIZES, seed=1)
    mcfg = default_config("schnet", **TINY)
    runs = {}
    for k in (1, 3):
        cfg = _config(epochs=2, steps_per_call=k)
        trainer = Trainer(cfg, TASK, TASK.prepare(qm9_molset, split, cfg), tmp_path / f"k{k}",
                          model_config=mcfg, log=quiet)
        runs[k] = trainer
        if k == 1:  # the batches of the K run: the same molecules, one padding budget
            gs = trainer.data.train.graphs
            trainer.loader = BatchLoader(gs, 32, budgets=derive_budgets(gs, 32, num_budgets=1),
                                         seed=cfg.seed)
        trainer.fit(progress=False)
    one, three = runs[1], runs[3]
    assert len(three.loader.budgets) == 1
    steps = [len(list(three.loader.epoch(e))) for e in range(2)]
    assert int(three.carry["step"]) == sum(steps) == int(one.carry["step"])
    assert three.train_steps._cache_size() == 1
    assert three.train_step._cache_size() == (1 if any(s % 3 for s in steps) else 0)
    for key in ("train_loss", "train_loss_high5", "val_mae", "lr"):
        np.testing.assert_allclose([r[key] for r in three.history],
                                   [r[key] for r in one.history], rtol=1e-4, err_msg=key)


def test_steps_per_call_must_be_positive(qm9_molset, tmp_path):
    cfg = _config(steps_per_call=0)
    data = _data(qm9_molset, _config())
    with pytest.raises(ValueError, match="^--steps-per-call 0: must be at least 1$"):
        Trainer(cfg, TASK, data, tmp_path / "run", log=quiet)
    assert not (tmp_path / "run").exists()


def test_jit_carry_passes_the_carry_as_leaves_and_keeps_its_structure():
    import jax.numpy as jnp

    from mpattn.train.steps import jit_carry

    carry = {"a": jnp.ones(3), "b": {"c": jnp.zeros(2)}}
    treedef = jax.tree.structure(carry)

    def add(c, x):
        return {**c, "a": c["a"] + x}, jnp.sum(c["a"])

    step = jit_carry(add, treedef)
    leaves, out = step(jax.tree.leaves(carry), 2.0)
    assert isinstance(leaves, list) and float(out) == 3.0
    np.testing.assert_array_equal(jax.tree.unflatten(treedef, leaves)["a"], [3.0, 3.0, 3.0])
    with pytest.raises((RuntimeError, ValueError), match="deleted"):  # donated
        step(jax.tree.leaves(carry), 1.0)
    bad = jit_carry(lambda c, x: ({"a": c["a"]}, x), treedef)
    with pytest.raises(ValueError, match="<lambda> changed the carry's structure"):
        bad(leaves, 1.0)


def test_trainer_steps_take_the_carry_as_flat_leaves(qm9_molset, tmp_path):
    """The Trainer hands its jit-compiled step a list of arrays (no per-call flattening of
    nnx State through Python); ``carry`` rebuilds the dict from them. The module's
    non-trainable state travels apart (``rest``), never in the carry."""
    trainer = _trained(qm9_molset, tmp_path, epochs=1)
    assert isinstance(trainer.leaves, list) and len(trainer.leaves) > 10
    assert all(isinstance(x, jax.Array) for x in trainer.leaves)
    carry = trainer.carry
    assert set(carry) == {"params", "opt", "step"}  # no EMA in this run, no "rest"
    assert int(carry["step"]) == trainer.steps_per_epoch
    assert jax.tree.structure(carry) == trainer.carry_def
    assert trainer.rest is not None and "rest" not in carry


