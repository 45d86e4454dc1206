"""Shared fixtures: small slices of real QM9 (the qm9pack package's CSV files)."""

from __future__ import annotations

import pytest

from mpattn.data.graphset import GraphSet
from mpattn.data.molecules import MoleculeSet

N_SMALL = 500


@pytest.fixture(scope="session")
def qm9_raw():
    """The first 500 QM9 molecules as raw records (properties in QM9's units)."""
    from mpattn.data.qm9 import read_qm9pack

    mols, bad = read_qm9pack(nrows=N_SMALL)
    assert not bad and len(mols) == N_SMALL
    return mols


@pytest.fixture(scope="session")
def qm9_molset(qm9_raw) -> MoleculeSet:
    """The first 500 QM9 molecules, bond-perceived (in-process), targets in eV etc."""
    from mpattn.data.qm9 import build_qm9

    ms = build_qm9(qm9_raw, workers=1, progress=False)
    assert not ms.rejected
    return ms


@pytest.fixture(scope="session")
def qm9_graphset(qm9_molset) -> GraphSet:
    """The first 500 QM9 molecules, featurized, complete edge set, all targets as globals."""
    return qm9_molset.to_graphset()


@pytest.fixture
def x64():
    """float64 JAX inside the test (restored afterwards)."""
    import jax

    prev = jax.config.read("jax_enable_x64")
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", prev)


@pytest.fixture(scope="module")
def cache_file(qm9_molset, tmp_path_factory):
    """The 500-molecule QM9 slice as a dataset cache file (what --dataset-cache reads)."""
    from mpattn.data.cache import save_molset

    path = tmp_path_factory.mktemp("cache") / "qm9-slice.npz"
    save_molset(qm9_molset, path)
    return path


@pytest.fixture(scope="session")
def ethanol_members(tmp_path_factory):
    """Three tiny attention potentials (potential_helpers.TINY, one block, cutoff 4 Å) trained
    60 epochs on frames 0-199 of the bundled ethanol xTB set from different random
    initialisations (seeds 0, 1, 2; the same batches, so the compiled steps are shared): the
    workdirs. Trained once per session for the ensemble, relaxation and MD-command tests."""
    import numpy as np
    from flax import nnx

    from mpattn.data.frames import ethanol_xtb_path, read_frames
    from mpattn.models import create_model, default_config
    from mpattn.train import EnergyForceTask, TrainConfig, Trainer
    from tests.potential_helpers import TINY

    frames = read_frames(ethanol_xtb_path())
    config = TrainConfig(model="attention", loss="mse", lr=3e-3, schedule="cosine",
                         epochs=60, batch_size=8, ema_decay=0.99, checkpoint_every_s=1e9)
    task = EnergyForceTask(cutoff=TINY["cutoff"], beta=0.99)
    data = task.prepare(frames, (np.arange(200), np.arange(1000, 1016),
                                 np.arange(1016, 1020)), config)
    model_config = task.model_config(default_config("attention", **TINY))
    root, first, workdirs = tmp_path_factory.mktemp("ethanol_members"), None, []
    for seed in range(3):
        init = nnx.state(task.module(create_model("attention", rngs=nnx.Rngs(seed),
                                                  config=model_config), data), nnx.Param)
        trainer = Trainer(config, task, data, root / f"m{seed}", model_config=model_config,
                          log=lambda _msg: None, compiled_from=first, init_params=init)
        trainer.fit(progress=False)
        assert trainer.history[-1]["val_force_mae_mev_ang"] < 300  # it learned something
        first = first or trainer
        workdirs.append(root / f"m{seed}")
    return workdirs
