"""The README's Python examples run as written, and say what they claim."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def _block(word: str) -> str:
    (block,) = [b for b in _python_blocks() if word in b]
    return block


def test_readme_opens_with_the_two_commands():
    text = README.read_text()
    first = re.search(r"```bash\n(.*?)```", text, flags=re.S).group(1)
    assert 'pip install -e ".[qm9]" && python -m experiments.qm9_u0' in first
    assert 'pip install -e ".[qm9,dev]" && pytest' in first
    ci = (README.parent / ".ci" / "run").read_text()
    assert 'pip install -e ".[qm9,dev]" && pytest' in ci


def test_readme_featurization_example():
    ns: dict = {}
    exec(compile(_block("from_atoms"), "README.md", "exec"), ns)  # noqa: S102
    np.testing.assert_array_equal(ns["g"].edges["bond"][:4], [3, 3, 3, 3])
    assert ns["g"].nodes["features"].shape == (12, 12)


@pytest.mark.slow
def test_readme_qm9_example_on_all_of_qm9(tmp_path, monkeypatch):
    """Loads, featurizes and caches all 130,831 molecules (about a minute on 2 cores)."""
    monkeypatch.setenv("MPATTN_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(_block("load_qm9"), "README.md", "exec"), ns)  # noqa: S102
    ms, split, graphs = ns["ms"], ns["split"], ns["graphs"]
    s = ms.summary()
    assert s["molecules"] == 130_831 and s["rejected"] == 0 and s["excluded"] == 0
    assert sum(s["paths"].values()) == 130_831 and s["paths"]["template"] > 130_000
    assert sum(s["atoms_per_molecule"].values()) == 130_831
    assert split.sizes() == (15_000, 4_300, 2_200)
    assert (tmp_path / "runs/demo/split.json").is_file()
    assert len(graphs) == 15_000
    np.testing.assert_array_equal(graphs.n_edge, graphs.n_node * (graphs.n_node - 1))
    # methane, QM9 id 1: U0 = -40.47893 Hartree
    from ase.units import Hartree

    np.testing.assert_allclose(ms.targets["U0"][ms.index_of([1])], [-40.47893 * Hartree],
                               rtol=1e-12)
    assert list((tmp_path / "cache").glob("qm9-*.npz"))


def test_readme_models_example():
    ns: dict = {}
    exec(compile(_block("create_model"), "README.md", "exec"), ns)  # noqa: S102
    batch, pred = ns["batch"], ns["pred"]
    assert pred.shape == batch.n_node.shape and np.all(np.isfinite(pred))
    seg = np.repeat(np.arange(len(batch.n_node)), batch.n_node)
    np.testing.assert_allclose(np.bincount(seg, ns["per_atom"], minlength=len(batch.n_node)),
                               ns["energy"], rtol=1e-5, atol=1e-5)


def test_readme_compose_your_own_potential(tmp_path, monkeypatch):
    """The "Compose your own potential" block trains, lowers the force error and runs in ASE."""
    from mpattn.models import MODELS

    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    try:
        exec(compile(_block("register_model"), "README.md", "exec"), ns)  # noqa: S102
    finally:
        MODELS.pop("my_potential", None)
    history = ns["trainer"].history
    assert len(history) == 3
    assert history[-1]["val_force_mae_mev_ang"] < 0.8 * history[0]["val_force_mae_mev_ang"]
    assert np.isfinite(ns["test"]["force_mae_mev_ang"])
    forces = ns["atoms"].get_forces()
    assert forces.shape == (9, 3)
    np.testing.assert_allclose(forces.sum(axis=0), 0.0, atol=1e-4)  # no net force
    assert -310.5 < ns["atoms"].get_potential_energy() < -308.5  # xTB ethanol scale, eV
    assert (tmp_path / "runs/my_potential/checkpoints").is_dir()
