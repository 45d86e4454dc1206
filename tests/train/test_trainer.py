"""The one trainer end to end on real QM9 slices and the bundled ethanol set: its config's
checks, outputs, compile count, resume after SIGKILL, divergence handling, one trainer for
both tasks, reading runs back (the train step itself: test_train_step.py)."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from mpattn.train import (
    Denoising,
    Dipole,
    EnergyForceTask,
    PropertyTask,
    TrainConfig,
    Trainer,
    TrainingDiverged,
)
from mpattn.train.report import read_predictions
from tests.train.trainer_helpers import (
    ROOT,
    SIZES,
    TASK,
    TINY,
    _config,
    _data,
    _run,
    _trained,
    quiet,
)

# ---------------------------------------------------------------------- the config


def test_train_config_defaults_are_the_cpu_presets_settings_and_check_passes():
    from experiments.configs.qm9 import PRESETS

    config = TrainConfig()
    assert config.check() is config
    assert (config.model, config.loss, config.schedule, config.batch_size, config.ema_decay,
            config.epochs, config.lr) == ("attention", "l1", "cosine", 16, 0.999, 24, 1e-3)
    cpu = PRESETS["cpu"].train
    assert dataclasses.replace(cpu, time_budget_min=None, checkpoint_every_s=0.0) == config
    assert TrainConfig(ema_decay=None, clip_norm=None, time_budget_min=5.0, num_devices=1,
                       schedule="step", loss="huber", model="mhmp").check()


@pytest.mark.parametrize(("change", "message"), [
    ({"lr": -1}, "--lr -1: the learning rate must be a positive number"),
    ({"lr": 0}, "--lr 0: the learning rate must be a positive number"),
    ({"lr": float("nan")}, "--lr nan: the learning rate must be a positive number"),
    ({"batch_size": 0}, "--batch-size 0: must be at least 1"),
    ({"eval_batch_size": 0}, "--eval-batch-size 0: must be at least 1"),
    ({"epochs": 0}, "--epochs 0: must be at least 1"),
    ({"steps_per_call": 0}, "--steps-per-call 0: must be at least 1"),
    ({"keep_checkpoints": 0}, "--keep-checkpoints 0: must be at least 1"),
    ({"num_devices": 0}, "--num-devices 0: must be at least 1"),
    ({"ema_decay": 1.5}, "--ema-decay 1.5: must be in [0, 1) (or None: no EMA)"),
    ({"ema_decay": 1.0}, "--ema-decay 1.0: must be in [0, 1)"),
    ({"loss": "l3"}, "--loss 'l3': choose one of "),
    ({"schedule": "linear"}, "--schedule 'linear': choose one of "),
    ({"model": "nope"}, "--model 'nope': unknown model; choose from attention, "),
    ({"model": "attention_potential"}, "--model 'attention_potential': unknown model"),
    ({"clip_norm": 0.0}, "--clip-norm 0.0: must be positive (or None: no clipping)"),
    ({"weight_decay": -1.0}, "--weight-decay -1.0: must be >= 0"),
    ({"time_budget_min": 0.0}, "--time-budget-min 0.0: must be positive"),
    ({"checkpoint_every_s": -1.0}, "--checkpoint-every-s -1.0: must be >= 0"),
])
def test_train_config_check_names_the_option_as_on_the_command_line(change, message):
    config = TrainConfig(**change)  # building one never raises: check() does
    with pytest.raises(ValueError) as err:
        config.check()
    assert str(err.value).startswith(message), str(err.value)
    assert "\n" not in str(err.value)


def test_trainer_checks_its_config_and_workdir_before_writing_anything(qm9_molset, tmp_path):
    cfg = _config(epochs=1)
    data = _data(qm9_molset, cfg)
    work = tmp_path / "run"
    with pytest.raises(ValueError, match=r"^--steps-per-call 0: must be at least 1"):
        Trainer(_config(steps_per_call=0), TASK, data, work, log=quiet)
    with pytest.raises(ValueError, match=r"^--lr 0: "):
        Trainer(_config(lr=0), TASK, data, work, log=quiet)
    with pytest.raises(ValueError, match=r"^--weighting 'freq': choose one of "):
        Trainer(cfg, PropertyTask(weighting="freq"), data, work, log=quiet)
    assert not jax.config.jax_enable_x64
    with pytest.raises(ValueError, match=r"x64=True needs "
                                         r"jax.config.update\('jax_enable_x64', True\) first"):
        Trainer(_config(x64=True), TASK, data, work, log=quiet)
    from mpattn.models import default_config

    with pytest.raises(ValueError, match=r"^model_config is a AttentionConfig, but --model "
                                         r"'schnet' takes a SchNetConfig"):
        Trainer(cfg, TASK, data, work, model_config=default_config("attention"), log=quiet)
    assert not work.exists()
    # a workdir that is an existing file
    work.write_text("not a folder\n")
    with pytest.raises(ValueError, match=rf"^--workdir {work}: exists and is not a folder"):
        Trainer(cfg, TASK, data, work, log=quiet)
    assert work.read_text() == "not a folder\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # nothing written beside it


# ---------------------------------------------------------------------- whole runs


def test_tiny_run_writes_every_output_and_its_loss_falls(cache_file, tmp_path):
    results = _run(cache_file, tmp_path / "run", epochs=4)
    run = tmp_path / "run"
    for name in ("results.json", "metrics.csv", "curves.png", "parity.png", "per_size.png",
                 "split.json", "checkpoints"):
        assert (run / name).exists(), name
    on_disk = json.loads((run / "results.json").read_text())
    assert on_disk["test"]["mae_mev"] == pytest.approx(results["test"]["mae_mev"])
    assert on_disk["split_sizes"] == list(SIZES) and on_disk["params"] > 0
    assert set(on_disk["test"]) >= {"mae_mev", "rmse_mev", "mae_kcal_mol", "per_size",
                                    "per_element"}
    assert not any(k.startswith("_") for k in on_disk["test"])  # no predictions in it
    assert on_disk["format"] == 2 and on_disk["task"] == TASK.to_dict()
    assert on_disk["run_info"] == {"planned": False, "preset": None}
    assert on_disk["config"] == dataclasses.asdict(_config(epochs=4))
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    assert list(rows[0]) == ["epoch", "step", "train_loss", "train_loss_low5",
                             "train_loss_high5", "val_mae", "lr", "seconds", "train_mol_per_s"]
    losses = [float(r["train_loss"]) for r in rows]
    assert losses[-1] < losses[0]
    split = json.loads((run / "split.json").read_text())
    assert len(split["train"]) == SIZES[0] and not set(split["train"]) & set(split["test"])
    preds = read_predictions(run / "predictions.csv")
    assert set(preds) == {"val", "test"} and len(preds["test"]["id"]) == SIZES[2]
    assert sorted(preds["test"]["id"].tolist()) == sorted(split["test"])
    test = preds["test"]
    mae = 1000 * np.mean(np.abs(test["pred"] - test["true"]))  # written at 1e-6 eV
    assert mae == pytest.approx(results["test"]["mae_mev"], abs=2e-3)
    assert test["n_atoms"].min() >= 3


def test_no_recompilation_across_batches_of_one_budget(qm9_molset, tmp_path):
    trainer = _trained(qm9_molset, tmp_path)
    shapes = {(b.nodes["z"].shape[0], b.senders.shape[0]) for e in range(2)
              for b in trainer.loader.epoch(e)}
    assert trainer.train_step._cache_size() == len(shapes) <= len(trainer.loader.budgets)


def test_changing_the_run_length_compiles_nothing(qm9_molset, tmp_path):
    """``set_epochs`` (what a time budget's re-planner calls) writes the cosine's length into
    the optimizer state without changing the train step's signature: epoch 0 replayed after
    it meets only compiled steps. (It used to commit the two new scalars to a device, which
    recompiled the train step twice and the predict step once: ~25 s on one CPU core for the
    ethanol potential, in the third epoch of every budgeted run.)"""
    from mpattn.train.schedules import CosineState

    trainer = _trained(qm9_molset, tmp_path, epochs=1)
    compiled = trainer.train_step._cache_size(), trainer.predict_step._cache_size()

    def cosine(t):
        (state,) = [x for x in jax.tree.leaves(t.carry["opt"],
                                               is_leaf=lambda x: isinstance(x, CosineState))
                    if isinstance(x, CosineState)]
        return state

    before = cosine(trainer)
    assert trainer.set_epochs(7)
    after = cosine(trainer)
    assert int(after.total_steps) == 7 * trainer.steps_per_epoch
    for old, new in ((before.total_steps, after.total_steps),
                     (before.warmup_steps, after.warmup_steps)):
        assert (new.dtype, new.committed) == (old.dtype, old.committed)
    jax.block_until_ready(trainer._run_epoch(0))
    trainer.report("val")
    assert (trainer.train_step._cache_size(), trainer.predict_step._cache_size()) == compiled


def test_resume_after_sigkill_gives_the_same_final_metrics(cache_file, tmp_path):
    epochs = 6
    # the command line's --preset cpu evaluates with EMA weights (decay 0.999): so does this
    reference = _run(cache_file, tmp_path / "straight", epochs=epochs, ema_decay=0.999)
    work = tmp_path / "killed"
    cmd = [sys.executable, "-m", "experiments.qm9_u0", "--model", "schnet",
           "--dataset-cache", str(cache_file), "--workdir", str(work), "--epochs", str(epochs),
           "--train-size", str(SIZES[0]), "--val-size", str(SIZES[1]), "--test-size",
           str(SIZES[2]), "--batch-size", "32", "--lr", "1e-3", "--schedule", "cosine",
           "--seed", "1", "--preset", "cpu", "--model-config", json.dumps(TINY),
           "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=os.environ | {"JAX_PLATFORMS": "cpu"})
    ckpts = work / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if ckpts.is_dir() and any(p.name.isdigit() for p in ckpts.iterdir()):  # epoch 1 saved
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (work / "results.json").exists(), "the run finished before it was killed"
    resumed = _run(cache_file, work, epochs=epochs, resume=True, ema_decay=0.999)
    assert resumed["epochs"] == epochs
    np.testing.assert_allclose(resumed["test"]["mae_mev"], reference["test"]["mae_mev"],
                               rtol=1e-6)
    a = [float(r["val_mae"]) for r in csv.DictReader((work / "metrics.csv").open())]
    b = [float(r["val_mae"]) for r in csv.DictReader((tmp_path / "straight/metrics.csv").open())]
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_resume_keeps_the_runs_settings_and_refuses_other_ones(cache_file, tmp_path, capsys):
    """A model of the same parameters but another config (here SchNet's cutoff) would restore
    without complaint: ``--resume`` takes the run's settings from its checkpoint, and settings
    given again that differ are refused, named, before any data is read."""
    from experiments.qm9_u0 import main, run
    from mpattn.models import default_config

    work = tmp_path / "run"
    _run(cache_file, work, epochs=1)
    other = TINY | {"cutoff": 4.0}
    with pytest.raises(ValueError, match=r"--resume: the run in .* was started with other "
                                         r"settings \(loss: 'l1' -> 'mse'; cutoff: 5\.0 -> 4\.0\)"):
        run(_config(epochs=2, loss="mse"), workdir=work, sizes=SIZES, resume=True,
            dataset_cache=tmp_path / "absent.npz",
            model_config=default_config("schnet", **other), progress=False, log=quiet)
    # the task is one of the run's settings too
    with pytest.raises(ValueError, match=r"other settings \(target: 'U0' -> 'gap'\)"):
        run(_config(epochs=2), PropertyTask(target="gap"), workdir=work, sizes=SIZES,
            resume=True, dataset_cache=tmp_path / "absent.npz",
            model_config=default_config("schnet", **TINY), progress=False, log=quiet)
    # what may change on resume: length, budget, checkpointing
    assert main(["--resume", "--workdir", str(work), "--dataset-cache", str(cache_file),
                 "--model-config", '{"cutoff": 4.0}', "--no-progress"]) == 2
    assert "cutoff: 5.0 -> 4.0" in capsys.readouterr().err
    # nothing but the workdir and the new length: the run's model, config and settings
    assert main(["--resume", "--workdir", str(work), "--dataset-cache", str(cache_file),
                 "--epochs", "2", "--checkpoint-every-s", "5", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "model 'schnet': the run's" in out and "resumed at epoch 1" in out
    results = json.loads((work / "results.json").read_text())
    assert results["epochs"] == 2 and results["config"]["batch_size"] == 32
    assert results["config"]["seed"] == 1 and results["config"]["schedule"] == "cosine"
    assert results["config"]["ema_decay"] is None  # the run's, not the cpu preset's 0.999
    assert results["config"]["checkpoint_every_s"] == 5
    assert {k: results["model_config"][k] for k in TINY} == TINY


def test_resume_settings_give_unrecorded_fields_their_old_meaning():
    """A checkpoint of a run from before ``attention_weights`` existed resumes with the
    softmax weights it was trained with, not the silu weights the presets now choose; the
    training settings it did not record take the old TrainConfig's defaults."""
    from experiments.configs.qm9 import PRESETS
    from experiments.qm9_u0 import resume_conflicts
    from mpattn.models import default_config
    from mpattn.train.runs import run_settings

    old = {"dim": 64, "vector_features": True}  # recorded before the newer fields
    meta = {"config": {"model": "attention_potential", "loss": "l1", "epochs": 150},
            "model_config": old, "transform": {}}
    config, task, model, run_info = run_settings(meta)
    assert config.model == "attention" and config.epochs == 150
    assert (config.schedule, config.batch_size, config.ema_decay) == ("step", 32, None)
    assert task == PropertyTask() and run_info == {"planned": False}
    assert model.attention_weights == "softmax" and model.vector_messages == "attention"
    assert model.vector_features and model.dim == 64
    assert PRESETS["cpu"].model_config("attention").attention_weights == "silu"
    assert PRESETS["standard"].model_config("attention").attention_weights == "silu"
    preset_silu = default_config("attention", vector_features=True, attention_weights="silu")
    assert resume_conflicts(meta, dataclasses.replace(config, epochs=3), task,
                            preset_silu) == ["attention_weights: 'softmax' -> 'silu'"]
    assert resume_conflicts(meta, config, task, model) == []


def test_nan_loss_stops_naming_the_step_and_keeps_the_good_checkpoint(qm9_molset, tmp_path):
    trainer = _trained(qm9_molset, tmp_path)
    good_step = trainer.checkpoints.latest_step()
    trainer.data.train.graphs.globals["y"][:] = np.nan  # a broken target from now on
    trainer.config = _config(epochs=4)
    with pytest.raises(TrainingDiverged, match=rf"loss is nan at step {good_step + 1} \(epoch 3\)"
                                               rf".*checkpoint \(step {good_step}\) is kept"):
        trainer.fit(progress=False)
    assert trainer.checkpoints.latest_step() == good_step
    state, meta = trainer.checkpoints.restore(trainer.carry, which="best")
    assert meta["epoch"] == 2
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state["params"]))


# ---------------------------------------------------------------------- one trainer, two tasks


@pytest.fixture(scope="module")
def ethanol():
    from mpattn.data.frames import ethanol_xtb_path, read_frames

    return read_frames(ethanol_xtb_path()).subset(np.arange(200))


@pytest.fixture(scope="module")
def property_run(qm9_molset, tmp_path_factory) -> Trainer:
    """A tiny attention model on U0 with both auxiliary terms, 1 epoch, non-default settings
    throughout (recorded in its checkpoint)."""
    from mpattn.models import default_config

    cfg = _config(model="attention", epochs=1, lr=2e-3, ema_decay=0.99, weight_decay=1e-4,
                  clip_norm=5.0, keep_checkpoints=2, seed=3)
    task = PropertyTask(weighting="size", weight_r=2.0,
                        aux=(Denoising(0.03, 0.2), Dipole(0.05)))
    mc = default_config("attention", dim=16, num_heads=2, head_dim=8, steps=1, ff_dim=32,
                        num_rbf=8, vector_features=True, electrostatics=True)
    trainer = Trainer(cfg, task, _data(qm9_molset, cfg, task),
                      tmp_path_factory.mktemp("property"), model_config=mc, log=quiet,
                      run_info={"planned": False, "note": "tiny"})
    trainer.fit(progress=False)
    return trainer


@pytest.fixture(scope="module")
def forces_run(ethanol, tmp_path_factory) -> Trainer:
    """A tiny SchNet potential on 64 ethanol frames, 1 epoch."""
    from mpattn.data.frames import split_frames
    from mpattn.models import default_config

    cfg = _config(epochs=1, batch_size=8, loss="mse", eval_batch_size=64, ema_decay=0.99)
    task = EnergyForceTask(cutoff=4.0, beta=0.9)
    data = task.prepare(ethanol, split_frames(len(ethanol), 64, 16, 0, n_test=16), cfg)
    mc = default_config("schnet", dim=16, num_filters=16, interactions=1, num_rbf=8,
                        cutoff=4.0)
    trainer = Trainer(cfg, task, data, tmp_path_factory.mktemp("forces"), model_config=mc,
                      log=quiet)
    trainer.fit(progress=False)
    return trainer


def test_one_trainer_serves_both_tasks(property_run, forces_run):
    """The property task and the energy+forces task run through the same ``Trainer``: rows
    with the task's columns, predictions in the part's order, reports in physical units."""
    from mpattn.potential import Potential

    assert type(property_run) is type(forces_run) is Trainer
    prop, pot = property_run.history[0], forces_run.history[0]
    head = ["epoch", "step", "train_loss", "train_loss_low5", "train_loss_high5"]
    assert list(prop) == head + ["val_mae", "lr", "seconds", "train_mol_per_s"]
    assert list(pot) == head + ["val_energy_mae_mev", "val_force_mae_mev_ang", "lr", "seconds",
                                "frames_per_s"]
    for trainer, row in ((property_run, prop), (forces_run, pot)):
        assert row["epoch"] == 1 and row["step"] == trainer.steps_per_epoch
        assert np.isfinite(row["train_loss"]) and row[trainer.task.score_key] > 0
        assert trainer.checkpoints.best_val_mae() == pytest.approx(row[trainer.task.score_key])
        assert set(trainer.carry) == {"params", "opt", "step", "ema"}
    # the property task: standardised predictions, decoded in the report
    part = property_run.data.val
    raw = property_run.predict("val")
    assert set(raw) == {"energy"} and raw["energy"].shape == (len(part.graphs),)
    assert raw["energy"].dtype == np.float64
    rep = property_run.report("val")
    np.testing.assert_allclose(rep["_pred"], property_run.data.transform.decode(
        raw["energy"], part.counts), rtol=1e-12)
    assert rep["mae_mev"] == pytest.approx(1000 * np.mean(np.abs(rep["_pred"] - part.true)))
    assert rep["mae_mev"] == pytest.approx(prop["val_mae"])
    assert property_run.module.config.denoise  # Denoising switched the head on
    assert property_run.model_config.denoise and property_run.model_config.electrostatics
    # the energy+forces task: residual energies and forces, absolute in the report
    fpart = forces_run.data.val
    raw = forces_run.predict(fpart)
    assert set(raw) == {"energy", "forces"}
    assert raw["energy"].shape == (len(fpart.graphs),)
    assert raw["forces"].shape == (int(fpart.n_atoms.sum()), 3)
    rep = forces_run.report("val")
    np.testing.assert_allclose(rep["_energy"], raw["energy"] + fpart.baseline, rtol=1e-12)
    np.testing.assert_array_equal(rep["_forces"], raw["forces"])
    assert rep["force_mae_mev_ang"] == pytest.approx(
        1000 * np.mean(np.abs(raw["forces"] - fpart.forces)))
    assert rep["force_mae_mev_ang"] == pytest.approx(pot["val_force_mae_mev_ang"])
    assert rep["energy_mae_mev"] == pytest.approx(pot["val_energy_mae_mev"])
    assert isinstance(forces_run.module, Potential)
    assert forces_run.module.elements == (1, 6, 8)


def test_run_settings_read_a_new_checkpoint_back_to_the_runs_settings(qm9_molset,
                                                                        property_run,
                                                                        forces_run):
    """``run_settings`` of a format-2 checkpoint gives the TrainConfig, the task (auxiliary
    terms included) and the model config as built that the run had; ``load_run`` gives a
    predictor or a potential that predicts as the trainer does."""
    from mpattn.potential import Potential, energy_and_forces
    from mpattn.predict import Predictor
    from mpattn.train import load_run
    from mpattn.train.checkpoint import read_meta
    from mpattn.train.runs import run_settings

    for trainer in (property_run, forces_run):
        meta = read_meta(trainer.checkpoints.directory, [trainer.checkpoints.latest_step()])
        assert meta["format"] == 2 and meta["epoch"] == 1
        assert meta["task"] == trainer.task.to_dict()
        config, task, model_config, run_info = run_settings(meta)
        assert config == trainer.config
        assert task == trainer.task and type(task) is type(trainer.task)
        assert model_config == trainer.model_config
        assert run_info == trainer.run_info
    assert property_run.task.aux == (Denoising(0.03, 0.2), Dipole(0.05))
    assert property_run.run_info == {"planned": False, "note": "tiny"}
    assert forces_run.task == EnergyForceTask(cutoff=4.0, beta=0.9)

    predictor = load_run(property_run.workdir, which="latest")
    assert isinstance(predictor, Predictor)
    assert (predictor.task, predictor.config, predictor.model_config) == (
        property_run.task, property_run.config, property_run.model_config)
    part = property_run.data.test
    atoms = qm9_molset.subset(qm9_molset.index_of(part.ids[:12])).to_atoms()
    np.testing.assert_allclose(predictor(atoms), property_run.report(part)["_pred"][:12],
                               rtol=0, atol=1e-4)

    potential = load_run(forces_run.workdir, which="latest")
    assert isinstance(potential, Potential)
    part = forces_run.data.test
    batch = next(iter(forces_run._eval_loader(part)))
    e, f = jax.jit(energy_and_forces)(potential, batch)
    real = np.asarray(batch.globals["id"]) >= 0
    report = forces_run.report(part)
    order = [int(np.nonzero(part.graphs.ids == i)[0][0])
             for i in np.asarray(batch.globals["id"])[real]]
    np.testing.assert_allclose(np.asarray(e)[real], report["_energy"][order], rtol=0,
                               atol=2e-4)
