"""Training potentials on the bundled GFN2-xTB ethanol set: learning, load_potential round
trip, compile count, divergence handling and the experiment's command line."""

from __future__ import annotations

import csv
import dataclasses
import json
import time

import jax
import numpy as np
import pytest
from flax import nnx

from mpattn.data.frames import ethanol_xtb_path, read_frames, split_frames
from mpattn.models import default_config
from mpattn.models.potential import energy_and_forces
from mpattn.train.loop import TrainingDiverged
from mpattn.train.potential import (
    PotentialConfig,
    PotentialTrainer,
    load_potential,
    prepare_frames,
)

TINY = {"dim": 32, "num_heads": 2, "head_dim": 8, "steps": 1, "ff_dim": 32, "num_rbf": 16}


@pytest.fixture(scope="module")
def frames():
    return read_frames(ethanol_xtb_path()).subset(np.arange(400))


def _trainer(frames, workdir, sizes=(200, 40, 60), **kw) -> PotentialTrainer:
    config = PotentialConfig(**({"epochs": 6, "batch_size": 8, "lr": 3e-3} | kw))
    split = split_frames(len(frames), sizes[0], sizes[1], 0, n_test=sizes[2])
    return PotentialTrainer(config, prepare_frames(frames, split, config), workdir,
                            model_config=default_config("attention_potential", **TINY),
                            log=lambda *_: None)


@pytest.fixture(scope="module")
def trained(frames, tmp_path_factory) -> PotentialTrainer:
    trainer = _trainer(frames, tmp_path_factory.mktemp("potential"))
    trainer.fit(progress=False)
    return trainer


def test_training_lowers_the_validation_force_mae(trained):
    rows = list(csv.DictReader((trained.workdir / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == list(range(1, 7))
    assert {"train_loss", "val_energy_mae_mev", "val_force_mae_mev_ang", "lr", "seconds",
            "frames_per_s"} <= set(rows[0])
    force = [float(r["val_force_mae_mev_ang"]) for r in rows]
    assert force[-1] < 0.7 * force[0], force


def test_load_potential_reproduces_the_trainers_predictions(trained):
    potential = load_potential(trained.workdir, which="latest")
    assert potential.elements == (1, 6, 8)
    assert potential.model.config.cutoff == 5.0
    part = trained.data.test
    energy, forces = trained.predict(part)
    loaded_e, loaded_f = np.zeros_like(energy), np.zeros_like(forces)
    offsets = np.concatenate([[0], np.cumsum(part.n_atoms)])
    for b in trained._eval_loader(part):
        e, f = jax.jit(energy_and_forces)(potential, b)
        start = np.concatenate([[0], np.cumsum(b.n_node)])
        for k, i in enumerate(b.globals["id"]):
            if i >= 0:
                p = int(np.nonzero(part.graphs.ids == i)[0][0])
                loaded_e[p] = e[k]
                loaded_f[offsets[p]:offsets[p + 1]] = f[start[k]:start[k + 1]]
    np.testing.assert_allclose(loaded_f, forces, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(loaded_e, energy, rtol=0, atol=2e-4)  # float32 at -309 eV
    # absolute energies (the reference is installed), as accurate as the trained model
    mae = trained.report(part)["energy_mae_mev"] / 1000
    assert mae < 1.0
    np.testing.assert_allclose(loaded_e, part.energy, rtol=0, atol=10 * mae)


def test_load_potential_errors_name_the_path(tmp_path):
    with pytest.raises(ValueError, match=rf"{tmp_path / 'nope'}: no such workdir"):
        load_potential(tmp_path / "nope")
    with pytest.raises(ValueError, match=r"checkpoints: missing checkpoints"):
        load_potential(tmp_path)
    with pytest.raises(ValueError, match="which must be"):
        load_potential(tmp_path, which="first")


def test_train_step_compiles_once_per_batch_shape(trained):
    shapes = {(b.nodes["z"].shape[0], b.senders.shape[0]) for e in range(trained.epoch)
              for b in trained.loader.epoch(e)}
    assert trained.train_step._cache_size() == len(shapes) <= len(trained.loader.budgets)


def test_cutoff_must_match_the_model(frames, tmp_path):
    config = PotentialConfig(cutoff=4.0)
    prepared = prepare_frames(frames, split_frames(len(frames), 20, 5, 0, n_test=5), config)
    with pytest.raises(ValueError, match=r"cutoff 4.0 Å of the PotentialConfig differs from "
                                         r"the model config's 5.0 Å"):
        PotentialTrainer(config, prepared, tmp_path,
                         model_config=default_config("attention_potential", **TINY))


def test_nan_in_the_data_stops_naming_the_step_and_keeps_the_best(frames, tmp_path):
    trainer = _trainer(frames, tmp_path, sizes=(64, 16, 8), epochs=1)
    trainer.fit(progress=False)
    good, best = trainer.checkpoints.latest_step(), trainer.checkpoints.best_step()
    assert good == best == trainer.steps_per_epoch
    trainer.data.train.graphs.globals["energy"][:] = np.nan
    trainer.config = dataclasses.replace(trainer.config, epochs=2)
    with pytest.raises(TrainingDiverged, match=rf"loss is nan at step {good + 1} \(epoch 2\)"
                                               rf".*checkpoint \(step {good}\) is kept"):
        trainer.fit(progress=False)
    assert trainer.checkpoints.latest_step() == good == trainer.checkpoints.best_step()
    params = jax.tree.leaves(nnx.state(load_potential(tmp_path), nnx.Param))
    assert params and all(np.isfinite(np.asarray(x)).all() for x in params)


def test_experiment_command_line(tmp_path, capsys):
    from experiments.ethanol_potential import main

    work = tmp_path / "run"
    assert main(["--epochs", "1", "--no-md", "--train", "100", "--val", "20", "--workdir",
                 str(work), "--no-progress", "--model-config", json.dumps(TINY)]) == 0
    for name in ("results.json", "metrics.csv", "force_parity.png", "curves.png",
                 "split.json"):
        assert (work / name).is_file(), name
    results = json.loads((work / "results.json").read_text())
    assert results["split_sizes"] == [100, 20, 1880] and results["epochs"] == 1
    assert results["md"] == {"skipped": "--no-md"}
    assert results["test"]["force_mae_mev_ang"] > 0 and results["params"] > 0
    split = json.loads((work / "split.json").read_text())
    assert len(split["train"]) == 100 and not set(split["train"]) & set(split["test"])
    missing = tmp_path / "absent.extxyz"
    with pytest.raises(SystemExit):
        main(["--data", str(missing), "--workdir", str(work)])
    assert f"--data {missing}: no such file" in capsys.readouterr().err


def test_restore_latest_continues_exactly(frames, tmp_path):
    """3 epochs, then a fresh trainer restores the latest checkpoint and trains 3 more: the
    same metrics as 6 epochs straight (batch order is a function of (seed, epoch))."""
    straight = _trainer(frames, tmp_path / "straight", sizes=(64, 16, 16), epochs=6)
    straight.fit(progress=False)
    first = _trainer(frames, tmp_path / "split", sizes=(64, 16, 16), epochs=6)
    first.config = dataclasses.replace(first.config, time_budget_min=None)
    first.epoch = 0
    for _ in range(3):  # stop after 3 epochs, as a killed run would
        first.config = dataclasses.replace(first.config, epochs=first.epoch + 1)
        first.fit(progress=False)
    second = _trainer(frames, tmp_path / "split", sizes=(64, 16, 16), epochs=6)
    second.restore("latest")
    assert second.epoch == 3
    second.fit(progress=False)
    a = [r["val_force_mae_mev_ang"] for r in straight.history]
    b = [r["val_force_mae_mev_ang"] for r in second.history]
    np.testing.assert_allclose(b, a, rtol=1e-5)
    np.testing.assert_allclose(second.report("test")["force_mae_mev_ang"],
                               straight.report("test")["force_mae_mev_ang"], rtol=1e-5)


def test_a_potential_run_reuses_its_trials_compiled_steps(frames, trained, tmp_path):
    """``PotentialTrainer(compiled_from=trial)``: a 6-epoch run on the steps of a trial
    compiled for 1 epoch compiles nothing new and trains as the fresh 6-epoch trainer."""
    prepared, mc = trained.data, trained.model_config
    trial = PotentialTrainer(dataclasses.replace(trained.config, epochs=1), prepared,
                             tmp_path / "trial", model_config=mc, log=lambda *_: None)
    trial.fit(progress=False)
    compiled = trial.train_step._cache_size(), trial.eval_step._cache_size()
    run = PotentialTrainer(trained.config, prepared, tmp_path / "run", model_config=mc,
                           log=lambda *_: None, compiled_from=trial)
    assert run.train_step is trial.train_step and run.eval_step is trial.eval_step
    run.fit(progress=False)
    assert (run.train_step._cache_size(), run.eval_step._cache_size()) == compiled
    for a, b in zip(run.history, trained.history, strict=True):
        for key in ("train_loss", "val_force_mae_mev_ang", "lr"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), key
    with pytest.raises(ValueError, match="differs in settings"):
        PotentialTrainer(dataclasses.replace(trained.config, beta=0.5), prepared,
                         tmp_path / "other", model_config=mc, log=lambda *_: None,
                         compiled_from=trial)


def test_calibrate_epochs_times_whole_epochs_in_a_throwaway_folder(tmp_path):
    """The epoch estimate comes from ``fit`` itself (steps, validation, checkpoint), in a
    temporary folder; a synthetic trainer whose epochs and saves take known times pins the
    arithmetic."""
    from mpattn.train import calibrate_epochs

    built = []

    class Sleepy:  # epochs: 0.3 s "compile" once + 0.1 s; a save after each: 0.05 s
        def __init__(self, config, folder):
            self.config, self.folder, self.history = config, folder, []
            built.append(self)

        def fit(self, progress=True):
            assert self.folder.is_dir() and not progress
            assert self.config.checkpoint_every_s == 0  # the trial saves every epoch
            while len(self.history) < self.config.epochs:
                seconds = 0.4 if not self.history else 0.1
                time.sleep(seconds)
                self.history.append({"seconds": seconds})
                time.sleep(0.05)

    # 3 s budget, saving every epoch: (3 - 0.3 - 0.05) / (0.1 + 0.05) = 17.7
    config = PotentialConfig(epochs=500, time_budget_min=0.05)
    plan = calibrate_epochs(Sleepy, config, 0.05)
    assert 16 <= plan.epochs <= 18 and plan.trial is None
    (trial,) = built
    assert len(trial.history) == 4 and trial.config.time_budget_min is None
    assert not trial.folder.exists()  # the throwaway checkpoints are gone
    assert config.epochs == 500  # the caller's config is untouched
    # a save per second of epochs: 2.65 / (0.1 + 0.1 * 0.05) = 25.2
    every = dataclasses.replace(config, checkpoint_every_s=1.0)
    assert 23 <= calibrate_epochs(Sleepy, every, 0.05).epochs <= 25
    # the run reuses the trial's compiled steps: no compile to reserve, (3 - 0.05) / 0.15
    plan = calibrate_epochs(Sleepy, config, 0.05, reuse_trial=True)
    assert 18 <= plan.epochs <= 21 and plan.trial is built[-1]


def test_weight_decay_shrinks_the_potentials_weight_matrices(frames, tmp_path):
    """AdamW through PotentialConfig: after one epoch the weight matrices of a strongly decayed
    run are much smaller than those of plain Adam from the same start; the vectors are not
    decayed (their norm stays of the same size)."""
    def norms(trainer, matrices):
        leaves = jax.tree.leaves(trainer.carry["params"])
        return float(np.sqrt(sum(float(np.sum(np.square(x))) for x in leaves
                                 if (x.ndim >= 2) == matrices)))

    plain = _trainer(frames, tmp_path / "adam", sizes=(64, 16, 8), epochs=1)
    decayed = _trainer(frames, tmp_path / "adamw", sizes=(64, 16, 8), epochs=1,
                       weight_decay=30.0)  # lr 3e-3 x 30: x0.91 per step, 8 steps
    assert norms(plain, True) == pytest.approx(norms(decayed, True))  # same start
    plain.fit(progress=False)
    decayed.fit(progress=False)
    assert norms(decayed, True) < 0.75 * norms(plain, True)
    assert norms(decayed, False) == pytest.approx(norms(plain, False), rel=0.25)
    with pytest.raises(ValueError, match="weight_decay must be >= 0, got -1"):
        PotentialConfig(weight_decay=-1.0)


def test_checkpoint_every_s_saves_the_first_and_last_epochs_only(frames, tmp_path):
    trainer = _trainer(frames, tmp_path, sizes=(32, 16, 8), epochs=4, checkpoint_every_s=1e9)
    trainer.fit(progress=False)
    spe = trainer.steps_per_epoch
    assert trainer.checkpoints.steps() == [spe, 4 * spe]  # epochs 2 and 3 were not saved
    assert len(trainer.history) == 4  # every epoch still has its metrics row
    assert trainer.checkpoints.best_step() in (spe, 4 * spe)
    every = _trainer(frames, tmp_path / "every", sizes=(32, 16, 8), epochs=4)
    every.fit(progress=False)
    assert every.checkpoints.steps()[-3:] == [2 * spe, 3 * spe, 4 * spe]  # the 3 latest
    with pytest.raises(ValueError, match="checkpoint_every_s must be >= 0, got -1"):
        PotentialConfig(checkpoint_every_s=-1.0)


def test_a_planned_potential_run_replans_to_its_pace(frames, tmp_path, monkeypatch):
    """``PotentialConfig.replan``: on a clock of exactly 1 s per epoch, 20 planned epochs in
    a 6-s budget become the 6 that fit, and the cosine's length in the optimizer state (and
    in the re-planning epoch's checkpoint) follows."""
    import jax

    from mpattn.train import loop
    from mpattn.train import potential as potential_training
    from mpattn.train.checkpoint import read_meta
    from mpattn.train.schedules import CosineState

    class Clock:
        now = 0.0

        @staticmethod
        def perf_counter():
            return Clock.now

    monkeypatch.setattr(loop, "time", Clock)
    monkeypatch.setattr(potential_training, "time", Clock)  # the epoch rows' seconds
    trainer = _trainer(frames, tmp_path, sizes=(32, 16, 8), epochs=20, time_budget_min=0.1,
                       replan=True, keep_checkpoints=10)
    run_epoch = trainer._run_epoch

    def one_second(epoch):
        Clock.now += 1.0
        return run_epoch(epoch)

    trainer._run_epoch = one_second
    trainer.fit(progress=False)
    spe = trainer.steps_per_epoch
    assert trainer.config.epochs == 6 and len(trainer.history) == 6
    (state,) = [x for x in jax.tree.leaves(trainer.carry["opt"],
                                           is_leaf=lambda x: isinstance(x, CosineState))
                if isinstance(x, CosineState)]
    assert int(state.total_steps) == 6 * spe
    assert read_meta(trainer.checkpoints.directory, [2 * spe])["config"]["epochs"] == 6
    assert trainer.history[-1]["lr"] < 0.01 * trainer.config.lr  # the cosine ran its course
