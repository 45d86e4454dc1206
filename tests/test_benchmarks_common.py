"""benchmarks.common: result files are never overwritten; QM9 from a cache file; runs' predictions
matched by id."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks.common import align_by_id, qm9_graphs, save_result_and_figure, write_result


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


def test_result_and_figure_beside_it_or_where_asked(tmp_path, capsys):
    drawn = []

    def draw(path):
        drawn.append(path)
        return path

    save_result_and_figure("errors", {"value": 1}, draw, directory=tmp_path / "res")
    (json_file,) = (tmp_path / "res").glob("errors-*.json")
    assert json.loads(json_file.read_text())["value"] == 1
    assert drawn == [json_file.with_suffix(".png")]
    out = capsys.readouterr().out
    assert f"wrote {json_file}" in out and f"wrote {json_file.with_suffix('.png')}" in out
    save_result_and_figure("errors", {}, draw, save=False, directory=tmp_path / "none")
    assert len(drawn) == 1 and not (tmp_path / "none").exists()  # nothing at all
    save_result_and_figure("errors", {}, draw, save=False, out=tmp_path / "f.png",
                           directory=tmp_path / "none")
    assert drawn[-1] == tmp_path / "f.png" and not (tmp_path / "none").exists()


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


# ------------------------------------------------- mse_adam_steps: K train steps in one call


def _tiny_schnet():
    from flax import nnx

    from mpattn.models import create_model

    return create_model("schnet", rngs=nnx.Rngs(0), interactions=2, dim=32, num_filters=32,
                        num_rbf=16)


@pytest.fixture(scope="module")
def one_budget_batches(qm9_graphset):
    """8 batches of 8 real QM9 molecules (the first 64), all padded to one budget."""
    from benchmarks.speed import qm9_batches

    data = qm9_batches(qm9_graphset.subset(np.arange(64)), 8, 8, single_budget=True)
    assert len(data) == 8
    assert len({b.senders.shape for b in data}) == 1
    return data


def test_k_steps_in_one_call_equal_k_single_steps(one_budget_batches):
    import jax

    from benchmarks.common import mse_adam_steps
    from benchmarks.speed import stack_batches

    batches = one_budget_batches[:4]
    _, single, state, opt_state = mse_adam_steps(_tiny_schnet())
    losses = []
    for b in batches:
        state, opt_state, loss = single(state, opt_state, b)
        losses.append(float(loss))
    _, scanned, state_k, opt_k = mse_adam_steps(_tiny_schnet(), steps_per_call=4)
    (stack,) = stack_batches(batches, 4)
    state_k, opt_k, losses_k = scanned(state_k, opt_k, stack)
    assert losses_k.shape == (4,)
    np.testing.assert_allclose(np.asarray(losses_k), losses, rtol=1e-5, atol=1e-6)
    assert len(set(losses)) == 4  # the parameters really moved between the steps
    leaves, leaves_k = jax.tree.leaves(state), jax.tree.leaves(state_k)
    assert len(leaves) == len(leaves_k) > 0
    for a, b in zip(leaves, leaves_k, strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(opt_state), jax.tree.leaves(opt_k), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)


def test_k_step_train_step_compiles_once_per_budget(one_budget_batches):
    from benchmarks.common import mse_adam_steps
    from benchmarks.speed import CompileCounter, stack_batches

    _, train_step, state, opt_state = mse_adam_steps(_tiny_schnet(), steps_per_call=4)
    stacks = stack_batches(one_budget_batches, 4)
    assert len(stacks) == 2
    with CompileCounter("train_step") as counter:
        for stack in stacks + stacks:  # 4 calls, 16 steps, one shape
            state, opt_state, losses = train_step(state, opt_state, stack)
            losses.block_until_ready()
    assert counter.count == 1
    assert losses.shape == (4,) and np.isfinite(np.asarray(losses)).all()
    with pytest.raises(ValueError, match="length"):  # a stack of 2 is not a call of 4 steps
        train_step(state, opt_state, stack_batches(one_budget_batches[:2], 2)[0])


@pytest.mark.parametrize("k", [0, -1, 2.5])
def test_mse_adam_steps_rejects_bad_steps_per_call(k):
    from benchmarks.common import mse_adam_steps

    with pytest.raises(ValueError, match=rf"^steps_per_call must be a positive integer, "
                                         rf"got {k}$"):
        mse_adam_steps(_tiny_schnet(), steps_per_call=k)


def test_align_by_id_matches_rows_by_id_and_names_another_split():
    a = {"id": np.array([7, 3, 5]), "pred": np.array([0.7, 0.3, 0.5])}
    b = {"id": np.array([5, 7, 3]), "pred": np.array([1.5, 1.7, 1.3])}
    ids, orders = align_by_id({"a": a, "b": b})
    np.testing.assert_array_equal(ids, [3, 5, 7])
    np.testing.assert_allclose(a["pred"][orders["a"]], [0.3, 0.5, 0.7])
    np.testing.assert_allclose(b["pred"][orders["b"]], [1.3, 1.5, 1.7])
    with pytest.raises(ValueError, match=r"run 'c' has other test molecules than 'a' \(not"):
        align_by_id({"a": a, "c": {"id": np.array([3, 5, 8])}}, "test molecules")
