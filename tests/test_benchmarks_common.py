"""benchmarks.common: result files are never overwritten; QM9 from a cache file."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks.common import qm9_graphs, write_result


def test_a_second_run_on_one_day_gets_its_own_file(tmp_path):
    first = write_result("bench", {"value": 1}, directory=tmp_path)
    second = write_result("bench", {"value": 2}, directory=tmp_path)
    third = write_result("bench", {"value": 3}, directory=tmp_path)
    assert first.name.startswith("bench-") and first.suffix == ".json"
    assert second.name == first.name.replace(".json", "-2.json")
    assert third.name == first.name.replace(".json", "-3.json")
    values = [json.loads(p.read_text())["value"] for p in (first, second, third)]
    assert values == [1, 2, 3]
    assert json.loads(first.read_text())["machine"]["date"] in first.name


@pytest.fixture
def no_qm9pack(monkeypatch):
    """load_qm9 (qm9pack + RDKit) fails, as on a GPU host that has neither."""
    import mpattn.data.qm9

    def refuse(*_a, **_k):
        raise AssertionError("load_qm9 called although a dataset cache was given")

    monkeypatch.setattr(mpattn.data.qm9, "load_qm9", refuse)


def test_qm9_graphs_from_a_cache_file_are_the_seeded_sample(qm9_molset, tmp_path, no_qm9pack):
    from mpattn.data.cache import save_molset

    path = tmp_path / "qm9-test.npz"
    save_molset(qm9_molset, path)
    gs = qm9_graphs(40, "bonds", seed=3, dataset_cache=path)
    pick = np.random.default_rng(3).choice(len(qm9_molset), size=40, replace=False)
    np.testing.assert_array_equal(gs.ids, qm9_molset.ids[pick])
    np.testing.assert_allclose(gs.globals["U0"], qm9_molset.targets["U0"][pick])
    assert len(qm9_graphs(10_000, dataset_cache=path)) == len(qm9_molset)  # capped at all


@pytest.mark.parametrize("script", ["models", "speed"])
def test_benchmark_scripts_read_the_dataset_cache(script, qm9_molset, tmp_path, no_qm9pack,
                                                  capsys):
    import importlib

    from mpattn.data.cache import save_molset

    path = tmp_path / "qm9-test.npz"
    save_molset(qm9_molset, path)
    main = importlib.import_module(f"benchmarks.{script}").main
    size = ["--batch-size", "8"] if script == "models" else ["--batch-sizes", "8"]
    assert main(["--models", "schnet", *size, "--batches", "1", "--molecules", "30",
                 "--dataset-cache", str(path), "--no-save"]) == 0
    assert "schnet" in capsys.readouterr().out
