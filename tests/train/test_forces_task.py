"""The energy+forces task through the one Trainer, on the bundled GFN2-xTB ethanol set:
learning, the load_run round trip, compile count, divergence handling, resumption, weight
decay, checkpoint spacing, re-planning and the experiment's command line."""

from __future__ import annotations

import csv
import dataclasses
import json

import jax
import numpy as np
import pytest
from flax import nnx

from mpattn.data.frames import ethanol_xtb_path, read_frames, split_frames
from mpattn.models import default_config
from mpattn.potential import Potential, energy_and_forces
from mpattn.train import EnergyForceTask, TrainConfig, Trainer, TrainingDiverged, load_run

# the old attention_potential's defaults: softmax weights
TINY = {"dim": 32, "num_heads": 2, "head_dim": 8, "steps": 1, "ff_dim": 32, "num_rbf": 16,
        "attention_weights": "softmax"}
#: the old PotentialConfig's defaults, the settings these tests were written for
POTENTIAL = TrainConfig(model="attention", loss="mse", lr=3e-3, schedule="cosine", epochs=100,
                        batch_size=8, eval_batch_size=64, ema_decay=0.99, clip_norm=10.0)
TASK_FIELDS = {f.name for f in dataclasses.fields(EnergyForceTask)}


@pytest.fixture(scope="module")
def frames():
    return read_frames(ethanol_xtb_path()).subset(np.arange(400))


def _settings(**kw) -> tuple[TrainConfig, EnergyForceTask]:
    """The run's TrainConfig and task from one set of keywords (``beta``/``cutoff`` are the
    task's)."""
    task = EnergyForceTask(**{k: v for k, v in kw.items() if k in TASK_FIELDS})
    train = {"epochs": 6, "batch_size": 8, "lr": 3e-3} | {
        k: v for k, v in kw.items() if k not in TASK_FIELDS}
    return dataclasses.replace(POTENTIAL, **train), task


def _trainer(frames, workdir, sizes=(200, 40, 60), **kw) -> Trainer:
    config, task = _settings(**kw)
    split = split_frames(len(frames), sizes[0], sizes[1], 0, n_test=sizes[2])
    return Trainer(config, task, task.prepare(frames, split, config), workdir,
                   model_config=default_config("attention", **TINY), log=lambda *_: None)


@pytest.fixture(scope="module")
def trained(frames, tmp_path_factory) -> Trainer:
    trainer = _trainer(frames, tmp_path_factory.mktemp("potential"))
    trainer.fit(progress=False)
    return trainer


def _absolute(trainer, part):
    """The trainer's absolute energies (eV) and forces (eV/Å) of ``part``."""
    raw = trainer.predict(part)
    return raw["energy"] + part.baseline, raw["forces"]


def test_training_lowers_the_validation_force_mae(trained):
    rows = list(csv.DictReader((trained.workdir / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == list(range(1, 7))
    assert {"train_loss", "val_energy_mae_mev", "val_force_mae_mev_ang", "lr", "seconds",
            "frames_per_s"} <= set(rows[0])
    assert "val_mae" not in rows[0] and "train_mol_per_s" not in rows[0]
    force = [float(r["val_force_mae_mev_ang"]) for r in rows]
    assert force[-1] < 0.7 * force[0], force
    # the best checkpoint is ranked by the validation force MAE
    assert trained.task.score_key == "val_force_mae_mev_ang"
    assert trained.checkpoints.best_val_mae() == pytest.approx(min(force))
    assert trained.checkpoints.best_step() == (1 + int(np.argmin(force))) * \
        trained.steps_per_epoch


def test_load_run_reproduces_the_trainers_predictions(trained):
    potential = load_run(trained.workdir, which="latest")
    assert isinstance(potential, Potential)
    assert potential.elements == (1, 6, 8)
    assert potential.model.config.cutoff == 5.0
    assert potential.model.config.attention_weights == "softmax"
    part = trained.data.test
    energy, forces = _absolute(trained, part)
    report = trained.report(part)
    np.testing.assert_array_equal(report["_energy"], energy)
    np.testing.assert_array_equal(report["_forces"], forces)
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
    mae = report["energy_mae_mev"] / 1000
    assert mae < 1.0
    np.testing.assert_allclose(loaded_e, part.energy, rtol=0, atol=10 * mae)


def test_load_run_errors_name_the_path(tmp_path):
    with pytest.raises(ValueError, match=rf"{tmp_path / 'nope'}: no such workdir"):
        load_run(tmp_path / "nope")
    with pytest.raises(ValueError, match=rf"cannot load a run from {tmp_path}: .*checkpoints: "
                                         r"missing checkpoints"):
        load_run(tmp_path)
    with pytest.raises(ValueError, match="which must be 'best' or 'latest', got 'first'"):
        load_run(tmp_path, which="first")


def test_train_step_compiles_once_per_batch_shape(trained):
    shapes = {(b.nodes["z"].shape[0], b.senders.shape[0]) for e in range(trained.epoch)
              for b in trained.loader.epoch(e)}
    assert trained.train_step._cache_size() == len(shapes) <= len(trained.loader.budgets)


def test_cutoff_must_match_the_model(frames, tmp_path):
    config, task = _settings(cutoff=4.0)
    prepared = task.prepare(frames, split_frames(len(frames), 20, 5, 0, n_test=5), config)
    with pytest.raises(ValueError, match=r"cutoff 4.0 Å of the task differs from the model "
                                         r"config's 5.0 Å"):
        Trainer(config, task, prepared, tmp_path / "run",
                model_config=default_config("attention", **TINY))
    with pytest.raises(ValueError, match=r"cutoff 4.0 Å of the task differs from the model "
                                         r"config's 5.0 Å"):
        task.model_config(default_config("attention", **TINY))
    assert task.model_config(default_config("attention", **TINY, cutoff=4.0)).cutoff == 4.0
    assert not (tmp_path / "run").exists()


def test_frames_prepared_with_another_cutoff_are_refused(frames, tmp_path):
    """Graphs of one cutoff under a model and task of another would train silently on the
    wrong neighbours: the trainer refuses data prepared for another cutoff, as the potential
    trainer did ("the frames were prepared with cutoff 4.0 Å, the config asks for 5.0 Å")."""
    config, task = _settings()  # cutoff 5.0, as the model
    other = EnergyForceTask(cutoff=4.0)
    prepared = other.prepare(frames, split_frames(len(frames), 20, 5, 0, n_test=5), config)
    assert prepared.cutoff == 4.0
    with pytest.raises(ValueError, match=r"cutoff 4.0 Å.*5.0 Å"):
        Trainer(config, task, prepared, tmp_path / "run",
                model_config=default_config("attention", **TINY), log=lambda *_: None)


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
    params = jax.tree.leaves(nnx.state(load_run(tmp_path), nnx.Param))
    assert params and all(np.isfinite(np.asarray(x)).all() for x in params)


def test_experiment_command_line(tmp_path, capsys):
    from experiments.ethanol_potential import main

    work = tmp_path / "run"
    assert main(["--epochs", "1", "--no-md", "--train", "100", "--val", "20", "--workdir",
                 str(work), "--no-progress", "--model", "attention",
                 "--model-config", json.dumps(TINY)]) == 0
    for name in ("results.json", "metrics.csv", "force_parity.png", "curves.png",
                 "split.json"):
        assert (work / name).is_file(), name
    results = json.loads((work / "results.json").read_text())
    assert results["split_sizes"] == {"train": 100, "val": 20, "test": 1880, "test_unseen": 0}
    assert results["epochs"] == 1
    assert results["md"] == {"skipped": "--no-md"}
    assert results["test"]["force_mae_mev_ang"] > 0 and results["params"] > 0
    assert results["task"] == {"kind": "energy_forces", "cutoff": 5.0, "beta": 0.99,
                               "stress_weight": 0.0}
    assert results["model"] == "attention" and results["config"]["model"] == "attention"
    split = json.loads((work / "split.json").read_text())
    assert len(split["train"]) == 100 and not set(split["train"]) & set(split["test"])
    missing = tmp_path / "absent.extxyz"
    assert main(["--data", str(missing), "--workdir", str(work)]) == 2
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
    """``Trainer(compiled_from=trial)``: a 6-epoch run on the steps of a trial compiled for
    1 epoch compiles nothing new and trains as the fresh 6-epoch trainer."""
    prepared, mc, task = trained.data, trained.model_config, trained.task
    quiet = lambda *_: None  # noqa: E731
    trial = Trainer(dataclasses.replace(trained.config, epochs=1), task, prepared,
                    tmp_path / "trial", model_config=mc, log=quiet)
    trial.fit(progress=False)
    compiled = trial.train_step._cache_size(), trial.predict_step._cache_size()
    run = Trainer(trained.config, task, prepared, tmp_path / "run", model_config=mc,
                  log=quiet, compiled_from=trial)
    assert run.train_step is trial.train_step and run.predict_step is trial.predict_step
    run.fit(progress=False)
    assert (run.train_step._cache_size(), run.predict_step._cache_size()) == compiled
    for a, b in zip(run.history, trained.history, strict=True):
        for key in ("train_loss", "val_force_mae_mev_ang", "lr"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), key
    with pytest.raises(ValueError, match="differs in task; its compiled steps do not"):
        Trainer(trained.config, dataclasses.replace(task, beta=0.5), prepared,
                tmp_path / "other", model_config=mc, log=quiet, compiled_from=trial)
    with pytest.raises(ValueError, match="differs in settings; its compiled steps do not"):
        Trainer(dataclasses.replace(trained.config, loss="l1"), task, prepared,
                tmp_path / "other", model_config=mc, log=quiet, compiled_from=trial)


def test_weight_decay_shrinks_the_potentials_weight_matrices(frames, tmp_path):
    """AdamW through TrainConfig: after one epoch the weight matrices of a strongly decayed
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
    with pytest.raises(ValueError, match=r"^--weight-decay -1.0: must be >= 0"):
        TrainConfig(weight_decay=-1.0).check()
    with pytest.raises(ValueError, match=r"^--weight-decay -1.0: must be >= 0"):
        _trainer(frames, tmp_path / "bad", sizes=(64, 16, 8), weight_decay=-1.0)


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
    with pytest.raises(ValueError, match=r"^--checkpoint-every-s -1.0: must be >= 0"):
        TrainConfig(checkpoint_every_s=-1.0).check()


def test_a_planned_potential_run_replans_to_its_pace(frames, tmp_path, monkeypatch):
    """``Replan``: on a clock of exactly 1 s per epoch, 20 planned epochs in a 6-s budget
    become the 6 that fit, and the cosine's length in the optimizer state (and in the
    re-planning epoch's checkpoint) follows."""
    import experiments.planning as planning
    import mpattn.train.trainer as trainer_module
    from experiments.planning import Replan
    from mpattn.train.checkpoint import read_meta
    from mpattn.train.schedules import CosineState

    class Clock:
        now = 0.0

        @staticmethod
        def perf_counter():
            return Clock.now

    monkeypatch.setattr(trainer_module, "time", Clock)  # the loop and the epoch rows' seconds
    monkeypatch.setattr(planning, "time", Clock)  # the re-planner's pace
    trainer = _trainer(frames, tmp_path, sizes=(32, 16, 8), epochs=20, time_budget_min=0.1,
                       keep_checkpoints=10)
    run_epoch = trainer._run_epoch

    def one_second(epoch):
        Clock.now += 1.0
        return run_epoch(epoch)

    trainer._run_epoch = one_second
    said = []
    trainer.fit(progress=False, after_epoch=Replan(said.append))
    spe = trainer.steps_per_epoch
    assert trainer.config.epochs == 6 and len(trainer.history) == 6
    assert said == ["re-planned: 6 epochs fit the budget at 1.0 s per epoch (was 20)"]
    (state,) = [x for x in jax.tree.leaves(trainer.carry["opt"],
                                           is_leaf=lambda x: isinstance(x, CosineState))
                if isinstance(x, CosineState)]
    assert int(state.total_steps) == 6 * spe
    assert read_meta(trainer.checkpoints.directory, [2 * spe])["config"]["epochs"] == 6
    assert trainer.history[-1]["lr"] < 0.01 * trainer.config.lr  # the cosine ran its course
