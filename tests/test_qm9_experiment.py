"""``python -m experiments.qm9_u0`` and ``experiments.thesis_comparison``: presets, the
command line's errors, and planning the epochs of a time budget."""

from __future__ import annotations

import csv
import dataclasses
import json
import time

import jax
import numpy as np
import pytest

from mpattn.data.qm9 import make_split
from mpattn.train import (
    Denoising,
    PropertyTask,
    TrainConfig,
    Trainer,
)
from tests.train.trainer_helpers import (
    SIZES,
    TASK,
    TINY,
    _config,
    _data,
    _run,
    quiet,
)

# ---------------------------------------------------------------------- the command line


def test_standard_preset_trains_the_attention_model_with_vector_channels_and_denoising(
        monkeypatch, tmp_path, capsys):
    """The accelerator's preset gives its default model the settings of the best CPU run
    (vector channels, summed messages, silu weights, denoising 0.02 Å, EMA); other models and
    the command line's options are not bound by them."""
    import experiments.qm9_u0 as cli
    from experiments.configs.qm9 import PRESETS

    seen = []
    monkeypatch.setattr(cli, "run", lambda config, task, **kw: seen.append(
        (config, task, kw)) or {"test": {"mae_mev": 1.0}})
    work = ["--workdir", str(tmp_path), "--no-progress", "--preset", "standard"]
    assert cli.main(work) == 0
    assert cli.main(work + ["--model", "schnet"]) == 0
    assert cli.main(work + ["--denoise-sigma", "0", "--ema-decay", "0"]) == 0
    (best, best_task, kw), (schnet, schnet_task, _), (plain, plain_task, _) = seen
    assert (best.model, best_task.aux, best.ema_decay, best.batch_size) == (
        "attention", (Denoising(sigma=0.02, weight=0.1),), 0.999, 64)
    assert kw["preset"] == "standard" and best.time_budget_min is None and best.epochs == 300
    model = best_task.model_config(kw["model_config"])  # as the run builds it
    assert (model.vector_features, model.vector_messages, model.attention_weights,
            model.denoise) == (True, "sum", "silu", True)
    assert (schnet.model, schnet_task.aux, schnet.ema_decay) == ("schnet", (), 0.999)
    assert (plain_task.aux, plain.ema_decay) == ((), 0.0)
    assert PRESETS["cpu"].task_for("attention").aux == ()
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
    assert ("invalid choice: gpt (choose from attention, mhmp, mhmp_pe, mpnn, schnet, "
            "so3krates)") in err
    with pytest.raises(SystemExit):
        main(["--preset", "huge"])
    assert "choose from" in capsys.readouterr().err
    assert main(["--resume", "--workdir", str(tmp_path / "none"), "--preset", "cpu"]) == 2
    out = capsys.readouterr()
    assert "holds no checkpoints/ folder" in out.err
    assert "model 'attention': the preset's default" in out.out
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
    # so are settings TrainConfig.check refuses, naming the option
    assert main(["--lr", "-1", "--workdir", str(tmp_path / "lr"),
                 "--dataset-cache", str(tmp_path / "absent.npz")]) == 2
    assert "error: --lr -1.0: the learning rate must be a positive number" in \
        capsys.readouterr().err
    assert not (tmp_path / "dn").exists() and not (tmp_path / "lr").exists()


def test_size_sampling_options_apply_to_training_only(qm9_molset):
    split = make_split(qm9_molset.ids, sizes=SIZES, seed=1)
    task = PropertyTask(min_atoms=10, max_atoms=16, cap_per_size=20)
    data = task.prepare(qm9_molset, split, _config())
    n = data.train.n_atoms
    assert n.min() >= 10 and n.max() <= 16
    assert np.bincount(n).max() <= 20
    assert len(data.test.graphs) == SIZES[2] and len(data.val.graphs) == SIZES[1]
    with pytest.raises(ValueError, match="no training molecules left"):
        PropertyTask(min_atoms=40).prepare(qm9_molset, split, _config())


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
    from experiments.configs.qm9 import PRESETS
    from experiments.thesis_comparison import VARIANTS
    from mpattn.models import default_config

    (model, overrides, train, task_overrides), = [
        v for name, v in VARIANTS.items() if "ours" in name]
    standard, standard_task = (PRESETS["standard"].train_for(model),
                               PRESETS["standard"].task_for(model))
    config = dataclasses.replace(PRESETS["thesis"].train, model=model, **train)
    task = dataclasses.replace(PRESETS["thesis"].task, **task_overrides)
    assert (task.aux, task.reference, config.ema_decay, config.loss) == (
        standard_task.aux, standard_task.reference, standard.ema_decay, standard.loss)
    assert task.aux == (Denoising(0.02, 0.1),)
    assert (config.batch_size, config.schedule) == (8, "step")  # the thesis' own
    built = task.model_config(default_config(model, **overrides))
    assert built == standard_task.model_config(PRESETS["standard"].model_config(model))
    assert built.denoise and built.vector_features


def test_command_line_plans_epochs_only_without_epochs(monkeypatch, tmp_path):
    import experiments.qm9_u0 as cli

    seen = []
    monkeypatch.setattr(cli, "run", lambda config, task, **kw: seen.append((config, kw)) or {
        "test": {"mae_mev": 1.0}})
    assert cli.main(["--preset", "cpu", "--workdir", str(tmp_path), "--no-progress"]) == 0
    assert cli.main(["--preset", "cpu", "--epochs", "7", "--workdir", str(tmp_path)]) == 0
    (first, kw1), (second, kw2) = seen
    assert kw1["plan"] and not kw2["plan"] and second.epochs == 7
    assert first.time_budget_min == 10.0 and first.checkpoint_every_s == 30.0


def test_config_toml_repeats_the_settings_and_unknown_keys_are_refused(monkeypatch, tmp_path,
                                                                       capsys):
    """The options a run writes to config.toml give the same settings through --config; a key
    that is no option stops before anything runs, naming the file and the key."""
    import experiments.qm9_u0 as cli
    from experiments.config_file import write_config

    seen = []
    monkeypatch.setattr(cli, "run", lambda config, task, **kw: seen.append(
        (config, task, kw)) or {"test": {"mae_mev": 1.0}})
    argv = ["--preset", "cpu", "--lr", "2e-3", "--denoise-sigma", "0.03", "--model-config",
            '{"vector_features": true, "ff_dim": 48}', "--train-size", "900", "--workdir",
            str(tmp_path / "a"), "--no-progress"]
    assert cli.main(argv) == 0
    config, task, kw = seen[0]
    path = write_config(tmp_path / "config.toml", kw["options"])
    assert "lr = 0.002" in path.read_text() and "[model_config]" in path.read_text()
    assert cli.main(["--config", str(path), "--workdir", str(tmp_path / "b")]) == 0
    config2, task2, kw2 = seen[1]
    assert config2 == config and task2 == task and kw2["model_config"] == kw["model_config"]
    assert kw2["sizes"] == kw["sizes"] and kw["sizes"][0] == 900
    path.write_text("learning_rate = 0.1\n" + path.read_text())
    with pytest.raises(SystemExit):
        cli.main(["--config", str(path)])
    assert "config.toml: unknown key 'learning_rate'" in capsys.readouterr().err


# ---------------------------------------------------------------------- planning the epochs


def test_time_budgeted_run_plans_its_epochs_and_resume_keeps_the_plan(cache_file, tmp_path,
                                                                       monkeypatch):
    """``plan``: the epochs come from timing a throwaway trainer (whole epochs of ``fit``, in
    a temporary folder, not the workdir), the cosine schedule spans them, and a resumed run
    keeps the first run's plan instead of timing again."""
    import experiments.qm9_u0 as experiment

    real, calls = experiment.plan_epochs, []

    def recorded(make_trainer, config, minutes, **kw):
        calls.append((config, minutes, kw))
        calls.append(real(make_trainer, config, minutes, **kw))
        return calls[-1]

    monkeypatch.setattr(experiment, "plan_epochs", recorded)
    work = tmp_path / "run"
    results = _run(cache_file, work, epochs=500, time_budget_min=0.1, plan=True)
    (config, minutes, kw), (planned, trial) = calls
    assert minutes == 0.1 and kw["epochs"] == 1 and config.epochs == 500
    assert kw["reuse_trial"] and trial is not None  # the run reused its compiled steps
    # the run re-fits the plan to its own pace in its first half (planning.Replan)
    final = results["config"]["epochs"]
    assert 1 <= planned < 500 and 1 <= final < 500 and results["run_info"]["planned"]
    assert 1 <= results["epochs"] <= final
    rows = list(csv.DictReader((work / "metrics.csv").open()))
    # the schedule spans the (re-)planned epochs: the lr falls as a cosine over them
    from mpattn.train.schedules import make_schedule

    steps = int(rows[-1]["step"])
    sched = make_schedule(1e-3, "cosine", steps_per_epoch=steps // len(rows), epochs=final)
    assert float(rows[-1]["lr"]) == pytest.approx(float(sched(steps - 1)), rel=1e-4)

    def no_timing(*_a, **_k):
        raise AssertionError("a resumed run must not plan again")

    monkeypatch.setattr(experiment, "plan_epochs", no_timing)
    resumed = _run(cache_file, work, epochs=500, time_budget_min=0.1, plan=True, resume=True)
    assert resumed["config"]["epochs"] == final
    assert resumed["run_info"]["planned"]


def test_plan_epochs_times_whole_epochs_in_a_throwaway_folder(tmp_path):
    """The epoch estimate comes from ``fit`` itself (steps, validation, checkpoint), in a
    temporary folder; a synthetic trainer whose epochs and saves take known times pins the
    arithmetic."""
    from experiments.planning import plan_epochs

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
    config = TrainConfig(epochs=500, time_budget_min=0.05)
    plan = plan_epochs(Sleepy, config, 0.05)
    assert 16 <= plan.epochs <= 18 and plan.trial is None
    (trial,) = built
    assert len(trial.history) == 4 and trial.config.time_budget_min is None
    assert not trial.folder.exists()  # the throwaway checkpoints are gone
    assert config.epochs == 500  # the caller's config is untouched
    # a save per second of epochs: 2.65 / (0.1 + 0.1 * 0.05) = 25.2
    every = dataclasses.replace(config, checkpoint_every_s=1.0)
    assert 23 <= plan_epochs(Sleepy, every, 0.05).epochs <= 25
    # the run reuses the trial's compiled steps: no compile to reserve, (3 - 0.05) / 0.15
    plan = plan_epochs(Sleepy, config, 0.05, reuse_trial=True)
    assert 18 <= plan.epochs <= 21 and plan.trial is built[-1]


def test_a_run_reuses_its_trials_compiled_steps_and_trains_as_a_fresh_one(qm9_molset,
                                                                           tmp_path):
    """``Trainer(compiled_from=trial)``: the cosine's length is optimizer state, so a trial
    compiled for 1 epoch serves a 3-epoch run, which compiles nothing and matches a trainer
    built from scratch (losses, validation MAE, learning rate)."""
    from mpattn.models import default_config

    cfg = _config(epochs=3)
    data = _data(qm9_molset, cfg)
    mc = default_config("schnet", **TINY)
    trial = Trainer(dataclasses.replace(cfg, epochs=1, time_budget_min=None), TASK, data,
                    tmp_path / "trial", model_config=mc, log=quiet)
    trial.fit(progress=False)
    compiled = trial.train_step._cache_size(), trial.predict_step._cache_size()
    run = Trainer(cfg, TASK, data, tmp_path / "run", model_config=mc, log=quiet,
                  compiled_from=trial)
    assert run.train_step is trial.train_step and run.epoch == 0
    assert run.predict_step is trial.predict_step
    run.fit(progress=False)
    # only batch shapes the trial's one epoch did not meet compile (a fresh carry would
    # have compiled every shape again)
    shapes = {(b.nodes["z"].shape[0], b.senders.shape[0]) for e in range(3)
              for b in run.loader.epoch(e)}
    seen = {(b.nodes["z"].shape[0], b.senders.shape[0]) for b in trial.loader.epoch(0)}
    assert compiled[0] == len(seen) and seen < shapes  # the run meets a new shape
    assert (run.train_step._cache_size(), run.predict_step._cache_size()) == (
        len(shapes), compiled[1])
    fresh = Trainer(cfg, TASK, data, tmp_path / "fresh", model_config=mc, log=quiet)
    fresh.fit(progress=False)
    for a, b in zip(run.history, fresh.history, strict=True):
        for key in ("train_loss", "val_mae", "lr"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), key
    assert run.history[-1]["lr"] < 1e-4  # the 3-epoch cosine has run its course
    with pytest.raises(ValueError, match="differs in settings; its compiled steps do not"):
        Trainer(dataclasses.replace(cfg, lr=5e-4), TASK, data, tmp_path / "other",
                model_config=mc, log=quiet, compiled_from=trial)
    with pytest.raises(ValueError, match="differs in task; its compiled steps do not"):
        Trainer(cfg, PropertyTask(weighting="size"), data, tmp_path / "other",
                model_config=mc, log=quiet, compiled_from=trial)
    # the run holds the trial's compiled steps, not the trial (nor its checkpoint manager)
    import gc
    import weakref

    gone = weakref.ref(trial)
    del trial
    gc.collect()
    assert gone() is None


def test_replan_fits_the_cosine_to_the_pace_the_run_gets(qm9_molset, tmp_path, monkeypatch):
    """``Replan`` (``fit(after_epoch=Replan(log))``): on a clock where every epoch takes
    exactly 1 s, a plan of 20 epochs in a 6-s budget is re-fitted after the second epoch to
    the 4 more that fit (and the cosine's length in the optimizer state with it); without it
    the plan stays and the budget cuts the schedule."""
    import experiments.planning as planning
    import mpattn.train.trainer as trainer_module
    from experiments.planning import Replan
    from mpattn.models import default_config
    from mpattn.train.checkpoint import read_meta
    from mpattn.train.schedules import CosineState

    class Clock:  # the loop's time: 1 s per epoch, nothing else counts
        now = 0.0

        @staticmethod
        def perf_counter():
            return Clock.now

    monkeypatch.setattr(trainer_module, "time", Clock)
    monkeypatch.setattr(planning, "time", Clock)
    cfg = _config(epochs=20, time_budget_min=0.1, checkpoint_every_s=0, keep_checkpoints=10)
    data = _data(qm9_molset, cfg)
    mc = default_config("schnet", **TINY)
    runs = {}
    for replan in (True, False):
        said = []
        t = Trainer(cfg, TASK, data, tmp_path / str(replan), model_config=mc, log=said.append)
        run_epoch = t._run_epoch

        def one_second(epoch, run_epoch=run_epoch):
            Clock.now += 1.0
            return run_epoch(epoch)

        t._run_epoch = one_second
        t.fit(progress=False, after_epoch=Replan(said.append) if replan else None)
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
    assert any("time budget of 0.1 min reached after 6 epochs" in m for m in said)
    # a schedule without a length in the state is left alone
    step = Trainer(_config(schedule="step"), TASK, data, tmp_path / "step", model_config=mc,
                   log=quiet)
    assert not step.set_epochs(5)
    assert step.config.epochs == 3


