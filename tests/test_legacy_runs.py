"""Runs written by the code before the one-engine change still load and predict what they
predicted then.

``tests/fixtures/legacy-1a0cb37/`` holds three tiny runs made by commit 1a0cb37 with
``make_legacy_runs.py`` (beside them): the standard preset's attention model on a QM9 slice
(vector channels, silu weights, electrostatics, trained with the denoising and dipole terms),
the thesis' MH-MP, and an attention potential on the xTB ethanol set; ``expected.json`` holds
what that code's ``load_predictor`` and ``Calculator`` predicted from them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import mpattn
from mpattn.data.cache import load_molset
from mpattn.train.checkpoint import Checkpointer, read_meta
from mpattn.train.runs import run_settings

LEGACY = Path(__file__).parent / "fixtures" / "legacy-1a0cb37"


@pytest.fixture(scope="module")
def expected() -> dict:
    return json.loads((LEGACY / "expected.json").read_text())


@pytest.fixture(scope="module")
def slice_molset():
    return load_molset(LEGACY / "qm9-slice.npz")


def _meta(name: str) -> dict:
    directory = LEGACY / name / "checkpoints"
    steps, best = Checkpointer(directory).listing("best")
    return read_meta(directory, [best])


@pytest.mark.parametrize("name", ["qm9-attention", "qm9-mhmp"])
def test_old_property_runs_predict_what_they_predicted(name, expected, slice_molset):
    run = mpattn.load_run(LEGACY / name)
    ids = expected[name]["ids"]
    atoms = slice_molset.subset(slice_molset.index_of(ids)).to_atoms()
    # eV; the old code gave these to the last bit on the machine that wrote them
    np.testing.assert_allclose(run(atoms), expected[name]["pred"], rtol=0, atol=1e-5)


def test_old_potential_run_gives_the_same_energies_and_forces(expected):
    from mpattn.ase import Calculator
    from mpattn.data.frames import ethanol_xtb_path, read_frames

    frames = read_frames(ethanol_xtb_path())
    calc = Calculator(LEGACY / "ethanol-attention")
    want = expected["ethanol-attention"]
    for i, energy, forces in zip(want["frames"], want["energy"], want["forces"], strict=True):
        atoms = frames.atoms(i)
        atoms.calc = calc
        np.testing.assert_allclose(atoms.get_potential_energy(), energy, rtol=0, atol=1e-5)
        np.testing.assert_allclose(atoms.get_forces(), forces, rtol=0, atol=1e-5)


def test_the_table_of_old_defaults_gives_old_runs_their_settings():
    """Old names, old class defaults and the options that became tasks and terms."""
    from mpattn.train import Denoising, Dipole, EnergyForceTask, PropertyTask

    config, task, model_config, run_info = run_settings(_meta("qm9-attention"))
    assert config.model == "attention"  # recorded as attention_potential
    assert (config.loss, config.batch_size, config.ema_decay) == ("l1", 32, 0.999)
    assert task == PropertyTask(target="U0", aux=(Denoising(0.02, 0.1), Dipole(0.1)))
    assert model_config.denoise and model_config.electrostatics  # heads as built
    assert model_config.attention_weights == "silu"  # recorded: kept
    assert run_info == {"planned": False}

    config, task, model_config, _ = run_settings(_meta("qm9-mhmp"))
    # the old QM9 TrainConfig's defaults, not today's: step schedule, no EMA
    assert (config.model, config.schedule, config.ema_decay, config.loss) == (
        "mhmp", "step", None, "mse")
    assert task == PropertyTask()

    config, task, model_config, _ = run_settings(_meta("ethanol-attention"))
    # the old PotentialConfig's defaults: MSE, Adam 3e-3, batch 8, EMA 0.99
    assert (config.model, config.loss, config.lr, config.ema_decay) == (
        "attention", "mse", 3e-3, 0.99)
    assert task == EnergyForceTask(cutoff=5.0, beta=0.99)
    # the field the old run recorded keeps its value: softmax, the old class default
    assert model_config.attention_weights == "softmax"


def test_a_model_field_an_old_run_did_not_record_takes_its_old_default():
    """attention_weights did not exist in the first runs: they trained with softmax, which
    is no longer the class default."""
    meta = _meta("qm9-attention")
    del meta["model_config"]["attention_weights"]
    assert run_settings(meta)[2].attention_weights == "softmax"
    # the reader applies the one table to today's format too (today's runs record every field)
    meta.update(format=2, config={"model": "attention"}, task={"kind": "property"},
                task_state={"transform": meta["transform"]})
    assert run_settings(meta)[2].attention_weights == "softmax"


def test_an_old_run_cannot_be_resumed_but_says_so(tmp_path):
    from experiments.qm9_u0 import run
    from mpattn.train import TrainConfig

    work = tmp_path / "old"
    shutil.copytree(LEGACY / "qm9-mhmp", work)
    with pytest.raises(ValueError, match=r"written by mpattn before the one-engine change "
                                         r"and cannot be continued \(mpattn.load_run"):
        run(TrainConfig(model="mhmp"), workdir=work, resume=True,
            dataset_cache=LEGACY / "qm9-slice.npz")
