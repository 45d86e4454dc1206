"""The training engine end to end on real QM9 slices: outputs, compile count, resume after
SIGKILL, divergence handling and the command line's errors."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from mpattn.data.cache import save_molset
from mpattn.data.qm9 import make_split
from mpattn.train.loop import TrainConfig, Trainer, TrainingDiverged, prepare
from mpattn.train.report import read_predictions

ROOT = Path(__file__).resolve().parents[2]
TINY = {"interactions": 2, "dim": 32, "num_filters": 32, "num_rbf": 16, "cutoff": 5.0}
SIZES = (300, 60, 100)  # seed 1 puts the slice's only F molecule in train


@pytest.fixture(scope="module")
def cache_file(qm9_molset, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cache") / "qm9-slice.npz"
    save_molset(qm9_molset, path)
    return path


def _config(**kw) -> TrainConfig:
    base = dict(model="schnet", epochs=3, batch_size=32, lr=1e-3, schedule="cosine", seed=1)
    return TrainConfig(**(base | kw))


def _trained(molset, workdir, epochs: int = 2) -> Trainer:
    """A tiny SchNet trained for ``epochs`` in-process (seed 1: QM9 id 184, the slice's only
    F molecule, lands in the training split)."""
    from mpattn.models import default_config

    split = make_split(molset.ids, sizes=SIZES, seed=1)
    cfg = _config(epochs=epochs)
    trainer = Trainer(cfg, prepare(molset, split, cfg), workdir,
                      model_config=default_config("schnet", **TINY), log=lambda *_: None)
    trainer.fit(progress=False)
    return trainer


def _run(cache_file, workdir, epochs=3, resume=False, plan_epochs=False, model_overrides=TINY,
         **kw):
    from mpattn.train.experiment import run_qm9

    return run_qm9(_config(epochs=epochs, **kw), workdir=workdir, sizes=SIZES, resume=resume,
                   dataset_cache=cache_file, model_overrides=model_overrides, progress=False,
                   plan_epochs=plan_epochs,
                   log=lambda *_: None)


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
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    assert {"train_loss_low5", "train_loss_high5", "val_mae", "lr", "seconds"} <= set(rows[0])
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
    from experiments.qm9_u0 import main
    from mpattn.train.experiment import run_qm9

    work = tmp_path / "run"
    _run(cache_file, work, epochs=1)
    other = TINY | {"cutoff": 4.0}
    with pytest.raises(ValueError, match=r"--resume: the run in .* was started with other "
                                         r"settings \(loss: 'l1' -> 'mse'; cutoff: 5\.0 -> 4\.0\)"):
        run_qm9(_config(epochs=2, loss="mse"), workdir=work, sizes=SIZES, resume=True,
                dataset_cache=tmp_path / "absent.npz", model_overrides=other,
                progress=False, log=lambda *_: None)
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
    assert {k: results["model_config"][k] for k in TINY} == TINY


def test_resume_settings_give_unrecorded_fields_their_old_meaning():
    """A checkpoint of a run from before ``attention_weights`` existed resumes with the
    softmax weights it was trained with, not the silu weights the presets now choose."""
    from mpattn.models import default_config
    from mpattn.train.experiment import PRESETS, resume_conflicts
    from mpattn.train.loop import run_settings

    old = {"dim": 64, "vector_features": True}  # recorded before the newer fields
    meta = {"config": {"model": "attention_potential", "loss": "l1", "epochs": 150},
            "model_config": old}
    config, model = run_settings(meta)
    assert config.model == "attention_potential" and config.epochs == 150
    assert model.attention_weights == "softmax" and model.vector_messages == "attention"
    assert PRESETS["cpu"].models["attention_potential"] == {"attention_weights": "silu"}
    assert PRESETS["standard"].models["attention_potential"]["attention_weights"] == "silu"
    preset_silu = default_config("attention_potential", vector_features=True,
                                 attention_weights="silu")
    assert resume_conflicts(meta, dataclasses.replace(config, epochs=3), preset_silu) == [
        "attention_weights: 'softmax' -> 'silu'"]
    assert resume_conflicts(meta, config, model) == []


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
    import jax

    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state["params"]))


def test_standard_preset_trains_the_attention_potential_with_vector_channels_and_denoising(
        monkeypatch, tmp_path, capsys):
    """The accelerator's preset gives its default model the settings of the best CPU run
    (vector channels, summed messages, silu weights, denoising 0.02 Å, EMA); other models and
    the command line's options are not bound by them."""
    import experiments.qm9_u0 as cli
    from mpattn.models import default_config
    from mpattn.train.experiment import PRESETS
    from mpattn.train.loop import with_training_heads

    seen = []
    monkeypatch.setattr(cli, "run_qm9", lambda config, **kw: seen.append((config, kw)) or {
        "test": {"mae_mev": 1.0}})
    work = ["--workdir", str(tmp_path), "--no-progress", "--preset", "standard"]
    assert cli.main(work) == 0
    assert cli.main(work + ["--model", "schnet"]) == 0
    assert cli.main(work + ["--denoise-sigma", "0", "--ema-decay", "0"]) == 0
    (best, kw), (schnet, _), (plain, _) = seen
    assert (best.model, best.denoise_sigma, best.denoise_weight, best.ema_decay,
            best.batch_size) == ("attention_potential", 0.02, 0.1, 0.999, 64)
    assert kw["preset"] == "standard" and best.time_budget_min is None and best.epochs == 300
    model = with_training_heads(best, default_config(
        best.model, **PRESETS["standard"].models[best.model], **kw["model_overrides"]))
    assert (model.vector_features, model.vector_messages, model.attention_weights,
            model.denoise) == (True, "sum", "silu", True)
    assert (schnet.model, schnet.denoise_sigma, schnet.ema_decay) == ("schnet", 0.0, 0.999)
    assert (plain.denoise_sigma, plain.ema_decay) == (0.0, 0.0)
    assert PRESETS["cpu"].config_for("attention_potential").denoise_sigma == 0.0
    # switching the vector channels off under this preset needs denoising off too: said early
    monkeypatch.undo()
    capsys.readouterr()
    assert cli.main(work + ["--model-config", '{"vector_features": false}', "--dataset-cache",
                            str(tmp_path / "absent.npz")]) == 2
    assert "--denoise-sigma 0 turns denoising off" in capsys.readouterr().err


def test_command_line_errors(capsys, tmp_path):
    from experiments.qm9_u0 import main

    with pytest.raises(SystemExit):
        main(["--model", "gpt"])
    err = capsys.readouterr().err.replace("'", "")  # argparse quotes names on newer Pythons
    assert "invalid choice: gpt (choose from mhmp, mhmp_pe, mpnn, schnet, attention_potential)" \
        in err
    with pytest.raises(SystemExit):
        main(["--preset", "huge"])
    assert "choose from" in capsys.readouterr().err
    assert main(["--resume", "--workdir", str(tmp_path / "none"), "--preset", "cpu"]) == 2
    out = capsys.readouterr()
    assert "holds no checkpoints/ folder" in out.err
    assert "model 'attention_potential': the preset's default" in out.out
    assert main(["--resume", "--workdir", str(tmp_path / "none"), "--preset", "thesis"]) == 2
    assert "model 'mhmp': the preset's default" in capsys.readouterr().out  # the thesis' model
    assert main(["--resume", "--workdir", str(tmp_path / "none"), "--model", "schnet"]) == 2
    assert "the preset's default" not in capsys.readouterr().out
    # a hand-set multi-process run needs all three of coordinator, processes and index
    assert main(["--coordinator", "127.0.0.1:1", "--num-processes", "2"]) == 2
    assert "give all of coordinator, num_processes and process_id" in capsys.readouterr().err
    # denoising needs the vector channels: refused before any data is read
    assert main(["--denoise-sigma", "0.02", "--workdir", str(tmp_path / "dn"),
                 "--dataset-cache", str(tmp_path / "absent.npz")]) == 2
    assert "needs a model with a denoising head" in capsys.readouterr().err


def test_size_sampling_options_apply_to_training_only(qm9_molset):
    split = make_split(qm9_molset.ids, sizes=SIZES, seed=1)
    data = prepare(qm9_molset, split, _config(min_atoms=10, max_atoms=16, cap_per_size=20))
    n = data.train.n_atoms
    assert n.min() >= 10 and n.max() <= 16
    assert np.bincount(n).max() <= 20
    assert len(data.test.graphs) == SIZES[2] and len(data.val.graphs) == SIZES[1]
    with pytest.raises(ValueError, match="no training molecules left"):
        prepare(qm9_molset, split, _config(min_atoms=40))


@pytest.mark.slow
def test_thesis_comparison_writes_table_and_figure(cache_file, tmp_path):
    from experiments.thesis_comparison import main

    out = tmp_path / "cmp"
    assert main(["--workdir", str(out), "--epochs", "1", "--train-size", "300",
                 "--val-size", "60", "--test-size", "100", "--dataset-cache", str(cache_file),
                 "--models", "MH-MP", "MH-MP+PE", "--no-progress", "--seed", "1",
                 "--model-config", '{"dim": 16, "head_dim": 8, "readout_head_dim": 8, '
                 '"edge_hidden": 16, "steps": 1}']) == 0
    rows = json.loads((out / "comparison.json").read_text())["rows"]
    assert [r["model"] for r in rows] == ["mhmp", "mhmp_pe"]
    assert all(np.isfinite(r["test_mae_mev"]) for r in rows)
    split_a = json.loads((out / "mhmp" / "split.json").read_text())
    split_b = json.loads((out / "mhmp_pe" / "split.json").read_text())
    assert split_a["test"] == split_b["test"]  # the same split for every model
    assert (out / "comparison.png").stat().st_size > 1000
    assert "| MH-MP+PE |" in (out / "comparison.md").read_text()
    # --resume: finished models are read back, not trained again (their checkpoints and
    # results stay as they were), and the table is the same
    args = ["--workdir", str(out), "--epochs", "1", "--train-size", "300", "--val-size", "60",
            "--test-size", "100", "--dataset-cache", str(cache_file), "--models", "MH-MP",
            "MH-MP+PE", "--no-progress", "--seed", "1", "--resume"]
    tiny = '{"dim": 16, "head_dim": 8, "readout_head_dim": 8, "edge_hidden": 16, "steps": 1}'
    stamp = (out / "mhmp" / "results.json").stat().st_mtime_ns
    assert main([*args, "--model-config", tiny]) == 0
    assert (out / "mhmp" / "results.json").stat().st_mtime_ns == stamp
    assert json.loads((out / "comparison.json").read_text())["rows"] == rows
    # a finished model of other settings is refused, naming the setting
    with pytest.raises(SystemExit, match=r"other settings \(.*dim: 16 -> 24"):
        main([*args, "--model-config", tiny.replace('"dim": 16', '"dim": 24')])
    # so is one trained with other training settings (checked as a resumed run's are)
    with pytest.raises(SystemExit, match=r"other settings \(seed: 1 -> 2"):
        main([*args, "--model-config", tiny, "--seed", "2"])


def test_thesis_comparison_sets_our_variant_as_the_standard_preset_does():
    from experiments.thesis_comparison import VARIANTS
    from mpattn.models import default_config
    from mpattn.train.experiment import PRESETS
    from mpattn.train.loop import with_training_heads

    (model, overrides, train), = [v for name, v in VARIANTS.items() if "ours" in name]
    standard = PRESETS["standard"].config_for(model)
    config = dataclasses.replace(PRESETS["thesis"].train, model=model, **train)
    assert (config.denoise_sigma, config.ema_decay, config.loss) == (
        standard.denoise_sigma, standard.ema_decay, standard.loss)
    assert (config.batch_size, config.schedule) == (8, "step")  # the thesis' own
    built = with_training_heads(config, default_config(model, **overrides))
    assert built == with_training_heads(standard, default_config(
        model, **PRESETS["standard"].models[model]))


def test_time_budgeted_run_plans_its_epochs_and_resume_keeps_the_plan(cache_file, tmp_path,
                                                                       monkeypatch):
    """``plan_epochs``: the epochs come from timing a throwaway trainer (whole epochs of
    ``fit``, in a temporary folder, not the workdir), the cosine schedule spans them, and a
    resumed run keeps the first run's plan instead of timing again."""
    import mpattn.train.experiment as experiment

    real, calls = experiment.calibrate_epochs, []

    def recorded(make_trainer, config, minutes, **kw):
        calls.append((config, minutes, kw))
        calls.append(real(make_trainer, config, minutes, **kw))
        return calls[-1]

    monkeypatch.setattr(experiment, "calibrate_epochs", recorded)
    work = tmp_path / "run"
    results = _run(cache_file, work, epochs=500, time_budget_min=0.1, plan_epochs=True)
    (config, minutes, kw), (planned, trial) = calls
    assert minutes == 0.1 and kw["epochs"] == 1 and config.epochs == 500
    assert kw["reuse_trial"] and trial is not None  # the run reused its compiled steps
    # the run re-fits the plan to its own pace in its first half (TrainConfig.replan)
    final = results["config"]["epochs"]
    assert 1 <= planned < 500 and 1 <= final < 500 and results["config"]["replan"]
    assert 1 <= results["epochs"] <= final
    rows = list(csv.DictReader((work / "metrics.csv").open()))
    # the schedule spans the (re-)planned epochs: the lr falls as a cosine over them
    from mpattn.train.schedules import make_schedule

    steps = int(rows[-1]["step"])
    sched = make_schedule(1e-3, "cosine", steps_per_epoch=steps // len(rows), epochs=final)
    assert float(rows[-1]["lr"]) == pytest.approx(float(sched(steps - 1)), rel=1e-4)

    def no_timing(*_a, **_k):
        raise AssertionError("a resumed run must not plan again")

    monkeypatch.setattr(experiment, "calibrate_epochs", no_timing)
    resumed = _run(cache_file, work, epochs=500, time_budget_min=0.1, plan_epochs=True,
                   resume=True)
    assert resumed["config"]["epochs"] == final


def test_a_run_reuses_its_trials_compiled_steps_and_trains_as_a_fresh_one(qm9_molset,
                                                                           tmp_path):
    """``Trainer(compiled_from=trial)``: the cosine's length is optimizer state, so a trial
    compiled for 1 epoch serves a 3-epoch run, which compiles nothing and matches a trainer
    built from scratch (losses, validation MAE, learning rate)."""
    from mpattn.models import default_config

    split = make_split(qm9_molset.ids, sizes=SIZES, seed=1)
    cfg = _config(epochs=3)
    data = prepare(qm9_molset, split, cfg)
    mc = default_config("schnet", **TINY)
    quiet = lambda *_: None  # noqa: E731
    trial = Trainer(dataclasses.replace(cfg, epochs=1, time_budget_min=None), data,
                    tmp_path / "trial", model_config=mc, log=quiet)
    trial.fit(progress=False)
    compiled = trial.train_step._cache_size(), trial.predict_step._cache_size()
    run = Trainer(cfg, data, tmp_path / "run", model_config=mc, log=quiet,
                  compiled_from=trial)
    assert run.train_step is trial.train_step and run.epoch == 0
    run.fit(progress=False)
    # only batch shapes the trial's one epoch did not meet compile (a fresh carry would
    # have compiled every shape again)
    shapes = {(b.nodes["z"].shape[0], b.senders.shape[0]) for e in range(3)
              for b in run.loader.epoch(e)}
    seen = {(b.nodes["z"].shape[0], b.senders.shape[0]) for b in trial.loader.epoch(0)}
    assert compiled[0] == len(seen) and seen < shapes  # the run meets a new shape
    assert (run.train_step._cache_size(), run.predict_step._cache_size()) == (
        len(shapes), compiled[1])
    fresh = Trainer(cfg, data, tmp_path / "fresh", model_config=mc, log=quiet)
    fresh.fit(progress=False)
    for a, b in zip(run.history, fresh.history, strict=True):
        for key in ("train_loss", "val_mae", "lr"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), key
    assert run.history[-1]["lr"] < 1e-4  # the 3-epoch cosine has run its course
    with pytest.raises(ValueError, match="differs in settings; its compiled steps do not"):
        Trainer(dataclasses.replace(cfg, lr=5e-4), data, tmp_path / "other", model_config=mc,
                log=quiet, compiled_from=trial)
    # the run holds the trial's compiled steps, not the trial (nor its checkpoint manager)
    import gc
    import weakref

    gone = weakref.ref(trial)
    del trial
    gc.collect()
    assert gone() is None


def test_replan_fits_the_cosine_to_the_pace_the_run_gets(qm9_molset, tmp_path, monkeypatch):
    """``TrainConfig.replan``: on a clock where every epoch takes exactly 1 s, a plan of 20
    epochs in a 6-s budget is re-fitted after the second epoch to the 4 more that fit (and
    the cosine's length in the optimizer state with it); without ``replan`` the plan stays
    and the budget cuts the schedule."""
    from mpattn.models import default_config
    from mpattn.train import loop
    from mpattn.train.schedules import CosineState

    class Clock:  # the loop's time: 1 s per epoch, nothing else counts
        now = 0.0

        @staticmethod
        def perf_counter():
            return Clock.now

    monkeypatch.setattr(loop, "time", Clock)
    split = make_split(qm9_molset.ids, sizes=SIZES, seed=1)
    cfg = _config(epochs=20, time_budget_min=0.1, replan=True, checkpoint_every_s=0,
                  keep_checkpoints=10)
    data = prepare(qm9_molset, split, cfg)
    mc = default_config("schnet", **TINY)
    runs = {}
    for replan in (True, False):
        said = []
        t = Trainer(dataclasses.replace(cfg, replan=replan), data, tmp_path / str(replan),
                    model_config=mc, log=said.append)
        run_epoch = t._run_epoch

        def one_second(epoch, run_epoch=run_epoch):
            Clock.now += 1.0
            return run_epoch(epoch)

        t._run_epoch = one_second
        t.fit(progress=False)
        runs[replan] = t, said
    t, said = runs[True]
    assert t.config.epochs == 6 and len(t.history) == 6
    assert said.count("re-planned: 6 epochs fit the budget at 1.0 s per epoch (was 20)") == 1
    (state,) = [x for x in jax.tree.leaves(t.carry["opt"],
                                           is_leaf=lambda x: isinstance(x, CosineState))
                if isinstance(x, CosineState)]
    assert int(state.total_steps) == 6 * t.steps_per_epoch
    assert t.history[-1]["lr"] < 2e-5  # the 6-epoch cosine ran its course
    # the checkpoint of the epoch that re-planned already holds the new plan (what --resume
    # reads), in its config and in its optimizer state
    from mpattn.train.checkpoint import read_meta

    step2 = 2 * t.steps_per_epoch
    assert step2 in t.checkpoints.steps()
    assert read_meta(t.checkpoints.directory, [step2])["config"]["epochs"] == 6
    carry, _ = t.checkpoints.restore(t.carry, step=step2)
    (saved,) = [x for x in jax.tree.leaves(carry["opt"],
                                           is_leaf=lambda x: isinstance(x, CosineState))
                if isinstance(x, CosineState)]
    assert int(saved.total_steps) == 6 * t.steps_per_epoch
    kept, said = runs[False]
    assert kept.config.epochs == 20 and not any("re-planned" in m for m in said)
    assert len(kept.history) == 6 and kept.history[-1]["lr"] > 5e-4  # cut by the budget
    # a schedule without a length in the state is left alone
    step = Trainer(_config(schedule="step"), data, tmp_path / "step", model_config=mc,
                   log=lambda *_: None)
    assert not step._set_schedule_length(5)


def test_command_line_plans_epochs_only_without_epochs(monkeypatch, tmp_path):
    import experiments.qm9_u0 as cli

    seen = []
    monkeypatch.setattr(cli, "run_qm9", lambda config, **kw: seen.append((config, kw)) or {
        "test": {"mae_mev": 1.0}})
    assert cli.main(["--preset", "cpu", "--workdir", str(tmp_path), "--no-progress"]) == 0
    assert cli.main(["--preset", "cpu", "--epochs", "7", "--workdir", str(tmp_path)]) == 0
    (first, kw1), (second, kw2) = seen
    assert kw1["plan_epochs"] and not kw2["plan_epochs"] and second.epochs == 7
    assert first.time_budget_min == 10.0 and first.checkpoint_every_s == 30.0


def test_scanned_steps_equal_single_steps(qm9_molset):
    """``make_train_step(scan=True)`` on K stacked steps gives the losses and the state of K
    calls of the plain step (EMA and clipping included)."""
    import jax

    from mpattn.data.loader import BatchLoader, derive_budgets
    from mpattn.models import default_config
    from mpattn.train.loop import build_carry, make_train_step, stack_batches, stack_steps

    split = make_split(qm9_molset.ids, sizes=SIZES, seed=1)
    cfg = _config(ema_decay=0.9, clip_norm=1.0)
    gs = prepare(qm9_molset, split, cfg).train.graphs
    loader = BatchLoader(gs, 32, budgets=derive_budgets(gs, 32, num_budgets=1), prefetch=0)
    batches = list(loader.epoch(0))[:3]
    mcfg = default_config("schnet", **TINY)

    def fresh():
        _, graphdef, opt, carry = build_carry(cfg, mcfg, steps_per_epoch=10)
        return graphdef, opt, carry

    graphdef, opt, carry = fresh()
    step = make_train_step(graphdef, opt, cfg)
    single = []
    for b in batches:
        carry, loss = step(carry, stack_batches([b]))
        single.append(float(loss))
    graphdef, opt, scanned = fresh()
    steps = make_train_step(graphdef, opt, cfg, scan=True)
    scanned, losses = steps(scanned, stack_steps([[b] for b in batches]))
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
        trainer = Trainer(cfg, prepare(qm9_molset, split, cfg), tmp_path / f"k{k}",
                          model_config=mcfg, log=lambda *_: None)
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
    split = make_split(qm9_molset.ids, sizes=SIZES, seed=1)
    cfg = _config(steps_per_call=0)
    with pytest.raises(ValueError, match="steps_per_call must be >= 1, got 0"):
        Trainer(cfg, prepare(qm9_molset, split, cfg), tmp_path, log=lambda *_: None)


def test_jit_carry_passes_the_carry_as_leaves_and_keeps_its_structure():
    import jax
    import jax.numpy as jnp

    from mpattn.train.loop import jit_carry

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
    nnx State through Python); ``carry`` rebuilds the dict from them."""
    import jax

    trainer = _trained(qm9_molset, tmp_path, epochs=1)
    assert isinstance(trainer.leaves, list) and len(trainer.leaves) > 10
    assert all(isinstance(x, jax.Array) for x in trainer.leaves)
    carry = trainer.carry
    assert set(carry) == {"params", "rest", "opt", "step"}
    assert int(carry["step"]) == trainer.steps_per_epoch
    assert jax.tree.structure(carry) == trainer.carry_def


def test_denoised_run_records_its_head_and_resumes(cache_file, tmp_path):
    """A run with ``denoise_sigma`` records the denoising head in results.json's model config
    (the model it trained has one) and resumes from its checkpoint with the same settings."""
    small = {"dim": 16, "num_heads": 2, "head_dim": 8, "steps": 2, "ff_dim": 32, "num_rbf": 8,
             "vector_features": True}
    work = tmp_path / "dn"
    kw = dict(model="attention_potential", denoise_sigma=0.05, model_overrides=small)
    first = _run(cache_file, work, epochs=1, **kw)
    assert first["model_config"]["denoise"] is True
    assert first["config"]["denoise_sigma"] == 0.05
    again = _run(cache_file, work, epochs=2, resume=True, **kw)
    assert again["epochs"] == 2 and again["model_config"]["denoise"] is True
    assert json.loads((work / "results.json").read_text())["model_config"]["denoise"] is True


def test_denoising_learns_to_predict_the_noise(qm9_molset):
    """``denoise_sigma``: the batch's real atoms get noise from a key (the same key, the same
    noise: the train step keys it by (seed, step), so resuming repeats it), padding atoms
    none; the train step trains the head; Adam steps on the denoising loss alone teach it to predict
    part of noise it has never seen; bad settings are refused."""
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from mpattn.data.loader import BatchLoader
    from mpattn.graph import node_mask
    from mpattn.models import default_config
    from mpattn.train.loop import (
        add_position_noise,
        build_carry,
        make_train_step,
        masked_node_mean,
        stack_batches,
    )

    small = default_config("attention_potential", dim=16, num_heads=2, head_dim=8, steps=2,
                           ff_dim=32, num_rbf=8, vector_features=True)
    cfg = _config(model="attention_potential", epochs=1, denoise_sigma=0.05)
    data = prepare(qm9_molset, make_split(qm9_molset.ids, sizes=SIZES, seed=1), cfg)
    batch = next(iter(BatchLoader(data.train.graphs, 32, prefetch=0, shuffle=False)))
    noisy, noise = add_position_noise(batch, jax.random.key(7), 0.05)
    moved = np.asarray(noisy.nodes["positions"]) - np.asarray(batch.nodes["positions"])
    real = np.asarray(node_mask(batch))
    assert not moved[~real].any() and np.all(moved[real] != 0)
    assert np.std(moved[real]) == pytest.approx(0.05, rel=0.1)
    again, _ = add_position_noise(batch, jax.random.key(7), 0.05)
    np.testing.assert_array_equal(again.nodes["positions"], noisy.nodes["positions"])

    # the train step: build_carry turns the head on, the auxiliary loss reaches it
    _, graphdef, optimizer, carry = build_carry(cfg, small, steps_per_epoch=1)
    head = np.asarray(carry["params"]["denoise_head"]["kernel"][...])
    train_step = make_train_step(graphdef, optimizer, cfg)
    trained, loss = train_step(jax.tree.map(jnp.copy, carry), stack_batches([batch]))
    assert np.isfinite(float(loss))
    assert np.abs(trained["params"]["denoise_head"]["kernel"][...] - head).min() > 0

    opt = optax.adam(3e-3)

    def error(params, key):  # mean squared error per component, in units of sigma
        g, eps = add_position_noise(batch, key, 0.05)
        _, guess = nnx.merge(graphdef, params, carry["rest"])(g, denoise=True)
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

    with pytest.raises(ValueError, match="needs a model with a denoising head"):
        build_carry(_config(denoise_sigma=0.02), default_config("schnet", **TINY),
                    steps_per_epoch=1)
    with pytest.raises(ValueError, match="must be >= 0"):
        build_carry(_config(model="attention_potential", denoise_sigma=-0.1), small,
                    steps_per_epoch=1)


def test_dipole_loss_teaches_the_charges(qm9_molset, cache_file, tmp_path):
    """``dipole_weight``: batches carry QM9's mu; the loss is the mean |length of Σ q r - mu|
    in Debye (by hand at the start, where the charges are near 0); train steps lower it; a
    run records the setting; bad settings are refused."""
    import jax.numpy as jnp
    from flax import nnx

    from mpattn.data.loader import BatchLoader
    from mpattn.graph import graph_mask
    from mpattn.models import default_config
    from mpattn.models.potential import DEBYE, dipole_moment
    from mpattn.train.loop import build_carry, dipole_error, make_train_step, stack_batches

    small = default_config("attention_potential", dim=16, num_heads=2, head_dim=8, steps=2,
                           ff_dim=32, num_rbf=8, electrostatics=True)
    cfg = _config(model="attention_potential", epochs=1, dipole_weight=1.0, lr=3e-3)
    data = prepare(qm9_molset, make_split(qm9_molset.ids, sizes=SIZES, seed=1), cfg)
    batch = next(iter(BatchLoader(data.train.graphs, 32, prefetch=0, shuffle=False)))
    real = np.asarray(graph_mask(batch))
    mu = np.asarray(batch.globals["mu"])[real]
    ids = np.asarray(batch.globals["id"])[real]
    np.testing.assert_allclose(mu, qm9_molset.targets["mu"][qm9_molset.index_of(ids)],
                               rtol=1e-6)
    # the cosine schedule spans epochs x steps_per_epoch steps: the 120 below, at lr 3e-3
    model, graphdef, optimizer, carry = build_carry(cfg, small, steps_per_epoch=120)
    _, q = model(batch, charges=True)
    length = np.linalg.norm(np.asarray(dipole_moment(q, batch.nodes["positions"],
                                                     batch.n_node)), axis=1)[real] / DEBYE
    before = float(dipole_error(q, batch))
    assert before == pytest.approx(np.mean(np.abs(length - mu)), rel=1e-5)
    train_step = make_train_step(graphdef, optimizer, cfg)
    for _ in range(120):
        carry, loss = train_step(carry, stack_batches([batch]))
    trained = nnx.merge(graphdef, carry["params"], carry["rest"])
    after = float(dipole_error(trained(batch, charges=True)[1], batch))
    assert np.isfinite(float(loss)) and after < 0.5 * before, (before, after)
    assert float(jnp.abs(carry["params"]["coulomb_scale"][...])) > 0

    result = _run(cache_file, tmp_path / "dip", epochs=1, model="attention_potential",
                  dipole_weight=0.5, model_overrides={"dim": 16, "num_heads": 2,
                                                      "head_dim": 8, "steps": 2,
                                                      "electrostatics": True})
    assert result["config"]["dipole_weight"] == 0.5
    assert result["model_config"]["electrostatics"] is True
    with pytest.raises(ValueError, match="needs a model with atomic charges"):
        build_carry(_config(model="attention_potential", dipole_weight=0.1),
                    default_config("attention_potential"), steps_per_epoch=1)
    with pytest.raises(ValueError, match="dipole_weight must be >= 0"):
        build_carry(_config(model="attention_potential", dipole_weight=-1.0), small,
                    steps_per_epoch=1)
