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
