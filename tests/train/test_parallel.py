"""Data parallelism: one step on 2 devices equals one step on 1 device on the same global
batch (run in a subprocess with 2 host CPU devices)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent('''
    import jax, numpy as np
    assert jax.device_count() == 2, jax.devices()
    from mpattn.data.qm9 import build_qm9, read_qm9pack, make_split
    from mpattn.data.loader import derive_budgets
    from mpattn.graph import Budget, pad_batch
    from mpattn.models import default_config
    from mpattn.train import PropertyTask, TrainConfig
    from mpattn.train.steps import data_mesh, make_train_step, stack_batches
    from mpattn.train.trainer import build_state

    raw, _ = read_qm9pack(nrows=200)
    ms = build_qm9(raw, workers=1, progress=False)
    cfg = TrainConfig(model="schnet", loss="l1", batch_size=8, lr=1e-3, schedule="constant",
                      seed=1, ema_decay=None)
    task = PropertyTask()
    split = make_split(ms.ids, sizes=(150, 20, 30), seed=1)
    data = task.prepare(ms, split, cfg)
    gs = data.train.graphs
    mcfg = default_config("schnet", interactions=2, dim=32, num_filters=32, num_rbf=16)
    budget = derive_budgets(gs, 8, num_budgets=1)[0]
    idx1, idx2 = np.arange(0, 8), np.arange(8, 16)
    b1, b2 = pad_batch(gs, idx1, budget), pad_batch(gs, idx2, budget)
    union = pad_batch(gs, np.concatenate([idx1, idx2]),
                      Budget(2 * budget.n_node, 2 * budget.n_edge, 17))

    def one_step(graphs):
        _, graphdef, rest, opt, carry = build_state(cfg, task, data, mcfg, steps_per_epoch=10)
        assert set(carry) == {"params", "opt", "step"}
        step = make_train_step(graphdef, opt, cfg, task)
        carry, loss = step(carry, rest, graphs)
        return float(loss), jax.tree.map(np.asarray, carry["params"])

    l2, p2 = one_step(stack_batches([b1, b2], data_mesh(2)))     # two devices
    l1, p1 = one_step(stack_batches([b1, b2]))                   # same stack, one device
    lu, pu = one_step(stack_batches([union]))                    # one batch holding both
    sharded = stack_batches([b1, b2], data_mesh(2))
    assert len(sharded.nodes["z"].sharding.device_set) == 2
    for a, b in ((l2, l1), (l2, lu)):
        np.testing.assert_allclose(a, b, rtol=1e-5)
    for other in (p1, pu):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                     p2, other)
    print("EQUAL", l2, l1, lu)
''')


def test_two_devices_equal_one_device_on_the_same_global_batch():
    env = os.environ | {"XLA_FLAGS": "--xla_force_host_platform_device_count=2",
                        "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "EQUAL" in out.stdout
