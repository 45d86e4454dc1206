"""The experiments' presets against the library's defaults, and settings refused before any
data is read or any file written."""

from __future__ import annotations

import dataclasses

import pytest
from flax import nnx

from experiments import ethanol_potential, qm9_u0
from experiments.configs.qm9 import PRESETS
from mpattn.models import create_model, default_config
from mpattn.train import PropertyTask, TrainConfig


def test_the_library_defaults_are_what_the_main_job_trains():
    """``create_model("attention")`` with no arguments is the cpu preset's model, and the cpu
    preset changes TrainConfig() only in its budget and checkpoint interval."""
    cpu = PRESETS["cpu"]
    model = create_model("attention", rngs=nnx.Rngs(0))
    assert model.config == cpu.model_config("attention") == default_config("attention")
    assert cpu.task_for("attention") == PropertyTask()
    changed = {f.name for f in dataclasses.fields(TrainConfig)
               if getattr(cpu.train, f.name) != getattr(TrainConfig(), f.name)}
    assert changed == {"time_budget_min", "checkpoint_every_s"}
    assert cpu.train_for("attention").model == TrainConfig().model == "attention"


def test_the_command_line_gives_the_presets_settings():
    args = qm9_u0.parse(["--preset", "standard", "--workdir", "unused"])
    config, task, model_config, sizes, plan = qm9_u0.settings(args, say=lambda *_: None)
    assert (config.batch_size, config.epochs, sizes) == (64, 300, (110_000, 10_000, None))
    assert model_config.vector_features and model_config.vector_messages == "sum"
    assert [t.name for t in task.aux] == ["denoise"] and not plan
    args = qm9_u0.parse(["--preset", "standard", "--denoise-sigma", "0", "--dipole-weight",
                         "0.1", "--workdir", "unused"])
    assert [t.name for t in qm9_u0.settings(args, say=lambda *_: None)[1].aux] == ["dipole"]
    args = qm9_u0.parse(["--preset", "cpu", "--model", "mhmp", "--workdir", "unused"])
    config, task, model_config, sizes, plan = qm9_u0.settings(args, say=lambda *_: None)
    assert config.model == "mhmp" and model_config.dim == 48 and plan


@pytest.mark.parametrize("options, message", [
    (["--lr", "-1"], "error: --lr -1.0: the learning rate must be a positive number"),
    (["--lr", "0"], "error: --lr 0.0: the learning rate must be a positive number"),
    (["--batch-size", "0"], "error: --batch-size 0: must be at least 1"),
    (["--epochs", "0"], "error: --epochs 0: must be at least 1"),
    (["--train-size", "0"], "error: --train-size 0: must be at least 1"),
    (["--min-atoms", "9", "--max-atoms", "5"], "error: --min-atoms 9 is above --max-atoms 5"),
    (["--denoise-sigma", "0.02"], "error: --denoise-sigma 0.02: denoising needs a model with "
                                  "a denoising head"),
    (["--ema-decay", "1.5"], "error: --ema-decay 1.5: must be in [0, 1)"),
])
def test_qm9_settings_that_cannot_work_are_refused_first(tmp_path, capsys, options, message):
    """One line naming the option, exit code 2, nothing written and no data read (the
    dataset cache named does not exist: reading it would fail differently)."""
    work = tmp_path / "run"
    code = qm9_u0.main(["--preset", "cpu", "--workdir", str(work), "--no-progress",
                        "--dataset-cache", str(tmp_path / "missing.npz"), *options])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(message) and err.count("\n") == 1
    assert not work.exists()


def test_a_workdir_that_is_a_file_is_refused(tmp_path, capsys):
    path = tmp_path / "results.txt"
    path.write_text("a file the user keeps\n")
    code = qm9_u0.main(["--workdir", str(path), "--no-progress",
                        "--dataset-cache", str(tmp_path / "missing.npz")])
    assert code == 2
    assert capsys.readouterr().err == f"error: --workdir {path}: exists and is not a folder\n"
    assert path.read_text() == "a file the user keeps\n"
    code = ethanol_potential.main(["--workdir", str(path), "--epochs", "1", "--no-md",
                                   "--no-progress"])
    assert code == 2
    assert path.read_text() == "a file the user keeps\n"


@pytest.mark.parametrize("options, message", [
    (["--lr", "-1"], "error: --lr -1.0: the learning rate must be a positive number"),
    (["--beta", "1.5"], "error: --beta 1.5: the force weight must be in [0, 1]"),
    (["--batch-size", "0"], "error: --batch-size 0: must be at least 1"),
])
def test_ethanol_settings_that_cannot_work_are_refused_first(tmp_path, capsys, options,
                                                             message):
    work = tmp_path / "run"
    code = ethanol_potential.main(["--workdir", str(work), "--epochs", "1", "--no-md",
                                   "--no-progress", *options])
    assert code == 2
    assert capsys.readouterr().err.startswith(message)
    assert not work.exists()
