"""Multi-process (multi-host) data parallelism: two processes of one CPU device each, joined
by ``jax.distributed`` (gloo), train exactly as one process with two devices does.

Each process builds only its own device's batches; only process 0 writes metrics and logs;
the time budget is agreed on; orbax checkpoints written by both processes restore in both;
several steps per call (``steps_per_call``) follow the same trajectory.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]

WORKER = textwrap.dedent('''
    import dataclasses, json, sys
    pid, nproc, port, workdir, out = (int(sys.argv[1]), int(sys.argv[2]), sys.argv[3],
                                      sys.argv[4], sys.argv[5])
    import jax
    if nproc > 1:
        from mpattn.train.distributed import initialize
        initialize(f"127.0.0.1:{port}", nproc, pid)
    import numpy as np
    from mpattn.data.qm9 import build_qm9, make_split, read_qm9pack
    from mpattn.models import default_config
    from mpattn.train.distributed import agree, process_positions
    from mpattn.train import PropertyTask, TrainConfig, Trainer
    from mpattn.train.steps import stack_batches

    assert jax.device_count() == 2 and jax.process_count() == nproc, jax.devices()
    raw, _ = read_qm9pack(nrows=200)
    ms = build_qm9(raw, workers=1, progress=False)
    cfg = TrainConfig(model="schnet", loss="l1", batch_size=8, lr=1e-3, schedule="constant",
                      seed=1, epochs=2, ema_decay=0.99)
    task = PropertyTask()
    data = task.prepare(ms, make_split(ms.ids, sizes=(150, 20, 30), seed=1), cfg)
    mcfg = default_config("schnet", interactions=2, dim=32, num_filters=32, num_rbf=16)
    logs = []
    tr = Trainer(cfg, task, data, workdir, model_config=mcfg, log=logs.append)
    res = {"positions": process_positions(tr.mesh), "batches": len(tr.loader)}

    # the global batch: this process's part holds its own position's batch, nothing more
    b = list(tr.loader.epoch(0, keep=lambda i: i in (0, 1)))[:2]
    g = stack_batches(b, tr.mesh)
    res["global_shape"] = list(g.nodes["z"].shape)
    mine = res["positions"][0]
    shard = g.nodes["z"].addressable_shards[0]
    res["shard_ok"] = bool(np.array_equal(np.asarray(shard.data)[0], b[mine].nodes["z"])
                           and shard.index[0] == slice(mine, mine + 1))
    res["agree"] = [agree(pid == nproc - 1), agree(False)]

    hist = tr.fit(progress=False)
    res["val_mae"] = [r["val_mae"] for r in hist]
    res["train_loss"] = [r["train_loss"] for r in hist]
    res["logs"] = logs
    params = [np.asarray(x) for x in jax.tree.leaves(tr.carry["params"])]
    np.savez(out + ".npz", *params)

    again = Trainer(cfg, task, data, workdir, model_config=mcfg, log=logs.append)
    again.restore("latest")
    res["restored_epoch"] = again.epoch
    res["restored_equal"] = all(
        np.array_equal(np.asarray(a), p)
        for a, p in zip(jax.tree.leaves(again.carry["params"]), params))
    budget = Trainer(dataclasses.replace(cfg, time_budget_min=1e-9), task, data,
                     workdir + "-budget", model_config=mcfg, log=logs.append)
    res["budget_epochs"] = len(budget.fit(progress=False))
    res["logs_after_budget"] = logs
    # three steps per call: scanned steps of globally sharded [3, 2, ...] stacks
    k3 = Trainer(dataclasses.replace(cfg, steps_per_call=3), task, data, workdir + "-k3",
                 model_config=mcfg, log=lambda _m: None)
    res["k3_calls"] = [k for k, _ in k3._calls(0)]
    res["k3_train_loss"] = [r["train_loss"] for r in k3.fit(progress=False)]
    json.dump(res, open(out + ".json", "w"))
''')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(tmp_path: Path, nproc: int) -> list[dict]:
    env = os.environ | {"JAX_PLATFORMS": "cpu", "MPATTN_HUGEPAGES": "0"}
    if nproc == 1:
        env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    else:
        env.pop("XLA_FLAGS", None)
    port, workdir = str(_free_port()), tmp_path / f"run{nproc}"
    procs = [subprocess.Popen(
        [sys.executable, "-c", WORKER, str(pid), str(nproc), port, str(workdir),
         str(tmp_path / f"out{nproc}-{pid}")],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for pid in range(nproc)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    outs = []
    for pid in range(nproc):
        res = json.loads((tmp_path / f"out{nproc}-{pid}.json").read_text())
        res["params"] = list(np.load(tmp_path / f"out{nproc}-{pid}.npz").values())
        outs.append(res)
    return outs


def test_two_processes_train_as_one_process_with_two_devices(tmp_path):
    one = _run(tmp_path, 1)[0]
    two = _run(tmp_path, 2)

    assert one["positions"] == [0, 1]
    assert [r["positions"] for r in two] == [[0], [1]]
    for r in two:
        assert r["global_shape"][0] == 2 and r["shard_ok"]
        assert r["agree"] == [True, False]  # True on one process -> True on both
        assert r["batches"] == one["batches"] == 19  # odd: the last step pads process 1
        # both processes follow one trajectory, and it is the 2-device process's
        np.testing.assert_allclose(r["val_mae"], one["val_mae"], rtol=1e-5)
        np.testing.assert_allclose(r["train_loss"], one["train_loss"], rtol=1e-5)
        for a, b in zip(r["params"], one["params"], strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
        assert r["restored_epoch"] == 2 and r["restored_equal"]
        assert r["budget_epochs"] == 1
        assert r["k3_calls"] == [3, 3, 3, 1]  # 10 steps of 2 batches: 3 calls of 3, then 1
        np.testing.assert_allclose(r["k3_train_loss"], one["train_loss"], rtol=1e-5)
    assert one["k3_calls"] == [3, 3, 3, 1]
    np.testing.assert_allclose(one["k3_train_loss"], one["train_loss"], rtol=1e-5)
    assert one["val_mae"][1] < one["val_mae"][0] or one["train_loss"][1] < one["train_loss"][0]
    # only process 0 logs (and writes metrics.csv)
    assert any("time budget" in m for m in two[0]["logs_after_budget"])
    assert two[1]["logs_after_budget"] == []
    rows = (tmp_path / "run2" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[0].startswith("epoch,")
