"""Tests of benchmarks/peers_accuracy.py: the epochs each side plans, the cosine the PyG loop
follows, the table and the plot (without torch); with PyG installed the equal-time training
loop; and the comparison's settings, split and data, with the training faked."""

from __future__ import annotations

import math

import numpy as np
import pytest

from benchmarks.peers_accuracy import (
    ACCURACY_HEADER,
    format_accuracy_row,
    lr_values,
    planned_epochs,
)
from tests.test_benchmarks_peers import SMALL


@pytest.mark.parametrize(("minutes", "mol_s", "n_train", "expected"), [
    (10, 163.0, 15_000, 6),     # 97,800 molecules: 6.52 epochs
    (10, 250.0, 15_000, 10),    # exactly 10
    (1, 250.0, 15_000, 1),      # exactly 1
    (0.1, 250.0, 1_500, 1),     # 0.1 * 60 is 6.000000000000001: still 1
    (0.7, 100.0, 1_400, 3),     # 4,200 / 1,400 = 3 exactly (0.7 * 60 rounds below 42)
    (10, 20.0, 15_000, 1),      # 0.8 epochs: the floor of 1
    (0.2, 26.0, 15_000, 1),     # 0.02 epochs
])
def test_planned_epochs_hand_values(minutes, mol_s, n_train, expected):
    assert planned_epochs(minutes, mol_s, n_train) == expected


@pytest.mark.parametrize(("args", "message"), [
    ((0, 100.0, 10), "planned_epochs: minutes must be positive and finite, got 0"),
    ((1, float("nan"), 10), "planned_epochs: mol_per_s must be positive and finite, got nan"),
    ((1, -3.0, 10), "planned_epochs: mol_per_s must be positive and finite, got -3.0"),
    ((1, 100.0, 0), "planned_epochs: n_train must be a positive integer, got 0"),
    ((1, 100.0, 2.5), "planned_epochs: n_train must be a positive integer, got 2.5"),
])
def test_planned_epochs_rejects_bad_inputs(args, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        planned_epochs(*args)


def test_format_accuracy_row_fields():
    row = {"model": "attention (cpu preset)", "framework": "ours", "epochs": 3.5,
           "planned_epochs": 6,
           "mol_per_s": 151.26, "seconds": 599.6, "val_mae_mev": 40.04, "test_mae_mev": 41.96}
    line = format_accuracy_row(row)
    assert line.split()[3:] == ["ours", "3.5/6", "151.3", "600", "40.0", "42.0"]
    assert line.startswith(f"{'attention (cpu preset)':32s} ours")
    assert len(line) == len(ACCURACY_HEADER)


def test_lr_values_are_our_cosine_schedule_step_by_step():
    from mpattn.train.schedules import make_schedule

    spe, epochs, lr = 7, 3, 1e-3
    got = lr_values(lr, steps_per_epoch=spe, epochs=epochs)
    sched = make_schedule(lr, "cosine", steps_per_epoch=spe, epochs=epochs)
    assert got.shape == (spe * epochs + 1,)
    np.testing.assert_allclose(got, [float(sched(k)) for k in range(spe * epochs + 1)],
                               rtol=1e-5, atol=1e-12)  # float32 schedule arithmetic
    # warm-up from 0 over one epoch to the peak, cosine down to final_lr = 1e-6
    np.testing.assert_allclose(got[[0, spe, spe * epochs]], [0.0, lr, 1e-6], rtol=1e-6, atol=0)


@pytest.fixture(scope="module")
def tiny_prepared(qm9_molset):
    from mpattn.data.qm9 import make_split
    from mpattn.train import PropertyTask, TrainConfig

    split = make_split(qm9_molset.ids, sizes=(40, 16, 16), seed=0)
    return PropertyTask().prepare(qm9_molset, split, TrainConfig(model="mpnn"))


def test_train_pyg_keeps_the_best_validation_weights(tiny_prepared):
    pytest.importorskip("torch_geometric")
    from benchmarks.peers_accuracy import train_pyg
    from mpattn.models import default_config

    out = train_pyg("mpnn", tiny_prepared, minutes=10, epochs=3, batch_size=16,
                    config=default_config("mpnn", **SMALL["mpnn"]), progress=False)
    assert out["steps"] == 9 and out["epochs"] == 3  # ceil(40 / 16) = 3 updates per epoch
    assert len(out["val_history"]) == 3
    np.testing.assert_allclose(out["val_mae_mev"], min(out["val_history"]), rtol=1e-9)
    assert math.isfinite(out["test_mae_mev"]) and out["mol_per_s"] > 0


def test_train_pyg_stops_after_the_batch_that_ends_past_the_budget(tiny_prepared):
    pytest.importorskip("torch_geometric")
    from benchmarks.peers_accuracy import train_pyg
    from mpattn.models import default_config

    out = train_pyg("schnet", tiny_prepared, minutes=1e-9, epochs=5, batch_size=16,
                    config=default_config("schnet", **SMALL["schnet"]), progress=False)
    assert out["steps"] == 1
    np.testing.assert_allclose(out["epochs"], 1 / 3, rtol=1e-12)
    assert len(out["val_history"]) == 1  # validated once, after stopping


def test_accuracy_rows_train_ours_and_the_peer_on_the_same_split_and_data(
        qm9_molset, tmp_path, monkeypatch, capsys):
    """The equal-time comparison without training: each of our runs gets the comparison's
    settings, U0 with the reference and the model's default config; the PyG peer the very
    data of ``PropertyTask().prepare`` on the split file every run reads; the preset row the
    cpu preset's settings, task and model (attention, silu weights), its epochs not planned."""
    import dataclasses
    import json

    import experiments.qm9_u0
    from benchmarks import peers_accuracy as peers
    from experiments.configs.qm9 import PRESETS
    from mpattn.models import default_config
    from mpattn.train import PropertyTask, TrainConfig

    runs, peer_runs = [], []

    def fake_run(config, task=None, **kw):
        runs.append((config, task, kw))
        return {"epochs": config.epochs, "train_mol_per_s": 100.0, "train_seconds": 60.0,
                "val": {"mae_mev": 50.0}, "test": {"mae_mev": 51.0}, "params": 1000}

    def fake_train_pyg(name, prepared, **kw):
        peer_runs.append((name, prepared, kw))
        return {"epochs": 2.0, "steps": 20, "mol_per_s": 90.0, "seconds": 60.0,
                "val_mae_mev": 60.0, "test_mae_mev": 61.0, "val_history": [60.0],
                "params": 1001}

    monkeypatch.setattr(experiments.qm9_u0, "run", fake_run)
    monkeypatch.setattr(peers, "train_pyg", fake_train_pyg)
    monkeypatch.setattr(peers, "qm9_molecules", lambda cache: qm9_molset)
    monkeypatch.setattr(peers, "SIZES", (400, 50, 50))  # F in every part
    speed = {("mpnn", "ours"): 10.0, ("mpnn", "pyg"): 5.0, ("schnet", "ours"): 20.0,
             ("schnet", "pyg"): 15.0}
    rows = peers.accuracy_rows(["mpnn", "schnet"], speed, minutes=2.0, batch_size=16,
                               workdir=tmp_path, progress=False, dataset_cache="qm9.npz")
    assert [(r["model"], r["framework"]) for r in rows] == [
        ("mpnn", "ours"), ("mpnn", "pyg"), ("schnet", "ours"), ("schnet", "pyg"),
        ("attention (cpu preset)", "ours")]
    split = json.loads((tmp_path / "split.json").read_text())
    for (config, task, kw), name in zip(runs, ("mpnn", "schnet"), strict=False):
        plan = peers.planned_epochs(2.0, speed[name, "ours"], 400)
        assert config == TrainConfig(model=name, loss="l1", schedule="cosine", batch_size=16,
                                     ema_decay=None, time_budget_min=2.0, epochs=plan)
        assert task == PropertyTask()
        assert kw["model_config"] == default_config(name) and kw.get("preset") is None
        assert kw["workdir"] == tmp_path / name and kw["split_file"] == tmp_path / "split.json"
        assert kw["dataset_cache"] == "qm9.npz"
    (name, prepared, kw), _ = peer_runs
    assert name == "mpnn" and peer_runs[1][1] is prepared  # one preparation for every peer
    assert kw["epochs"] == peers.planned_epochs(2.0, 5.0, 400) and kw["batch_size"] == 16
    assert (kw["lr"], kw["clip_norm"], kw["seed"]) == (1e-3, 10.0, 0)
    assert sorted(prepared.train.ids) == sorted(split["train"])
    assert sorted(prepared.test.ids) == sorted(split["test"])
    np.testing.assert_allclose(  # U0 with the per-element reference, standardised
        prepared.transform.decode(np.asarray(prepared.val.graphs.globals["y"], np.float64),
                                  prepared.val.counts), prepared.val.true, atol=1e-4)
    config, task, kw = runs[2]
    p = PRESETS["cpu"]
    assert config == dataclasses.replace(p.train, model="attention", time_budget_min=2.0)
    assert config.epochs == 24 and rows[-1]["planned_epochs"] == 24
    assert task == PropertyTask() and kw["preset"] == "cpu"
    assert kw["model_config"] == default_config("attention")
    assert kw["model_config"].attention_weights == "silu"
    assert kw["workdir"] == tmp_path / "attention-cpu-preset"
    assert "attention (cpu preset)" in capsys.readouterr().out


def test_plot_accuracy_writes_a_png(tmp_path):
    from benchmarks.peers_accuracy import plot_accuracy

    rows = [{"model": "mpnn", "framework": "ours", "test_mae_mev": 40.0},
            {"model": "mpnn", "framework": "pyg", "test_mae_mev": 900.0},
            {"model": "mhmp (cpu preset)", "framework": "ours", "test_mae_mev": 35.0}]
    path = tmp_path / "peers.png"
    plot_accuracy(rows, path, minutes=10)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
