"""Tests of benchmarks/speed.py's own logic: real-atom counts, throughput, compile counter,
memory reader, table row, batch stacking for several steps per call, the pipelined and
sync-every-step timing paths (no timing is asserted)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.speed import (
    HEADER,
    CompileCounter,
    _run,
    batch_counts,
    format_row,
    header,
    main,
    measure,
    peak_memory,
    qm9_batches,
    stack_batches,
    throughput,
)
from mpattn.graph import Budget, node_mask, pad_batch


def test_batch_counts_excludes_padding(qm9_graphset):
    index = np.array([3, 0, 7, 11, 42])
    n_atoms = sum(qm9_graphset.graph(int(i)).n_node[0] for i in index)  # hand count, per graph
    budget = Budget(n_node=n_atoms + 37, n_edge=int(4 * n_atoms**2), n_graph=9)
    batch = pad_batch(qm9_graphset, index, budget)
    assert batch.nodes["z"].shape[0] == n_atoms + 37  # padded well beyond the real atoms
    assert batch_counts(batch) == (5, int(n_atoms))


def test_throughput_from_a_padded_batch(qm9_graphset):
    index = np.arange(4)
    batch = pad_batch(qm9_graphset, index, Budget(n_node=128, n_edge=4096, n_graph=8))
    mols, atoms = batch_counts(batch)
    hand_atoms = int(sum(qm9_graphset.graph(i).n_node[0] for i in range(4)))
    got = throughput(mols, atoms, 0.5)
    np.testing.assert_allclose([got["mol_per_s"], got["atoms_per_s"]],
                               [4 / 0.5, hand_atoms / 0.5], rtol=1e-12)


def test_throughput_rejects_non_positive_time():
    with pytest.raises(ValueError, match=r"seconds must be positive, got 0.0"):
        throughput(3, 30, 0.0)


def test_compile_counter_counts_one_compilation_per_shape():
    @jax.jit
    def toy_speed_fn(x):
        return jnp.sin(x) * 2

    a, b = jnp.ones(5), jnp.ones(7)  # created outside: eager ops are not counted anyway
    with CompileCounter("toy_speed_fn") as counter:
        for x in (a, b, a, b, a):
            toy_speed_fn(x).block_until_ready()
    assert counter.count == 2
    assert counter.seconds > 0
    with CompileCounter("toy_speed_fn") as again:  # both shapes cached: nothing new
        toy_speed_fn(a).block_until_ready()
    assert again.count == 0


def test_compile_counter_filters_by_name_and_unregisters():
    @jax.jit
    def other_fn(x):
        return x + 1

    with CompileCounter("toy_absent") as named, CompileCounter() as every:
        other_fn(jnp.ones(3)).block_until_ready()
    assert named.count == 0 and every.count >= 1
    before = every.count
    other_fn(jnp.ones(6)).block_until_ready()  # a new shape after exit: listener removed
    assert every.count == before


def test_peak_memory_is_positive_with_its_kind():
    nbytes, kind = peak_memory()
    assert isinstance(nbytes, int) and nbytes > 0
    expected = ("process_peak_rss" if jax.devices()[0].platform == "cpu"
                else "device_peak_bytes_in_use")
    assert kind == expected


def test_format_row_marks_compile_mismatch():
    row = {"model": "mpnn", "batch_size": 32, "params": 1234, "train_mol_per_s": 10.0,
           "train_atoms_per_s": 180.0, "infer_mol_per_s": 40.0, "infer_atoms_per_s": 720.0,
           "compile_s_train": 2.0, "compile_s_infer": 1.0, "compiles_train": 2,
           "compiles_infer": 2, "budgets_seen": 2, "compiles_ok": True,
           "peak_memory_bytes": 3 * 2**20}
    line = format_row(row)
    assert len(line) == len(HEADER)
    assert line.split() == ["mpnn", "32", "1,234", "10.0", "180", "40.0", "720", "3.0",
                            "2/2:2", "3"]
    assert format_row(row | {"compiles_train": 3, "compiles_ok": False}).split()[8] == "3/2:2!"


def test_format_row_shows_steps_per_call_above_one():
    row = {"model": "schnet", "batch_size": 32, "params": 1234, "train_mol_per_s": 10.0,
           "train_atoms_per_s": 180.0, "infer_mol_per_s": 40.0, "infer_atoms_per_s": 720.0,
           "compile_s_train": 2.0, "compile_s_infer": 1.0, "compiles_train": 1,
           "compiles_infer": 1, "budgets_seen": 1, "compiles_ok": True,
           "peak_memory_bytes": 3 * 2**20, "steps_per_call": 4}
    line = format_row(row)
    assert len(line) == len(header(4)) and header(4).split()[-1] == "steps/call"
    assert line.split()[-3:] == ["1/1:1", "3", "4"]
    three = row | {"budgets_seen": 3, "budgets_seen_train": 1, "compiles_infer": 3}
    assert format_row(three).split()[-3] == "1/3:1/3"  # train/infer:train/infer budgets
    assert format_row(three | {"compiles_ok": False}).split()[-3] == "1/3:1/3!"
    assert header(1) == HEADER
    assert format_row(row | {"steps_per_call": 1}).split()[-1] == "3"  # no column for K = 1


# ------------------------------------------------------------- stacking K batches per call


def _padded(gs, n: int) -> list:
    """``n`` padded batches of 4 consecutive real QM9 molecules each, one budget."""
    budget = Budget(n_node=128, n_edge=1536, n_graph=5)
    return [pad_batch(gs, np.arange(4 * i, 4 * i + 4), budget) for i in range(n)]


def test_stack_batches_groups_consecutive_batches_and_drops_the_remainder(qm9_graphset):
    data = _padded(qm9_graphset, 10)
    stacks = stack_batches(data, 4)
    assert len(stacks) == 2  # batches 8 and 9 are dropped
    for i, stack in enumerate(stacks):
        assert stack.nodes["z"].shape == (4, 128) and stack.senders.shape == (4, 1536)
        assert isinstance(stack.senders, jax.Array)  # on device
        for j in range(4):
            for got, want in zip(jax.tree.leaves(stack), jax.tree.leaves(data[4 * i + j]),
                                 strict=True):
                # as jax.device_put gives it: float64 globals become float32 without x64
                np.testing.assert_array_equal(np.asarray(got)[j], want.astype(got.dtype))
    assert len(stack_batches(data[:8], 4)) == 2  # no remainder
    assert [s.n_node.shape for s in stack_batches(data[:3], 1)] == [(1, 5)] * 3
    assert len(stack_batches(data[:7], 7)) == 1


def test_stack_batches_errors(qm9_graphset):
    data = _padded(qm9_graphset, 3)
    with pytest.raises(ValueError, match=r"^3 batch\(es\) cannot fill one call of 4 steps: "):
        stack_batches(data, 4)
    with pytest.raises(ValueError, match=r"^k must be >= 1, got 0$"):
        stack_batches(data, 0)
    other = pad_batch(qm9_graphset, np.arange(4), Budget(n_node=128, n_edge=2048, n_graph=5))
    with pytest.raises(ValueError, match=r"^batches 2\.\.3 differ in shape: the batches of "
                                         r"one call must share one padding budget$"):
        stack_batches(data[:2] + [data[2], other], 2)


def test_one_padding_budget_keeps_the_molecules_of_each_batch(qm9_graphset):
    gs = qm9_graphset.subset(np.arange(200))
    default = qm9_batches(gs, 16, 6)
    single = qm9_batches(gs, 16, 6, single_budget=True)

    def shapes(data):
        return {(b.nodes["z"].shape[0], b.senders.shape[0]) for b in data}

    assert len(shapes(default)) > 1 and len(shapes(single)) == 1  # the test means something
    assert max(shapes(default)) <= next(iter(shapes(single)))
    for a, b in zip(default, single, strict=True):
        assert batch_counts(a) == batch_counts(b)
        for key in ("z", "positions"):
            np.testing.assert_array_equal(np.asarray(a.nodes[key])[np.asarray(node_mask(a))],
                                          np.asarray(b.nodes[key])[np.asarray(node_mask(b))])
        n = batch_counts(a)[0]
        np.testing.assert_array_equal(np.asarray(a.globals["y"])[:n],
                                      np.asarray(b.globals["y"])[:n])


# ------------------------------------------------------------- timing: pipelined or synced


@pytest.mark.parametrize(("sync", "blocks"), [(True, 2 + 5), (False, 2 + 1)])
def test_run_blocks_after_every_call_or_once(sync, blocks, qm9_graphset, monkeypatch):
    calls = []
    real_block = jax.block_until_ready

    def counting_block(x):
        calls.append(x)
        return real_block(x)

    @jax.jit
    def toy_run_fn(graph):
        return jnp.cos(graph.nodes["positions"]).sum()

    small, big = Budget(n_node=64, n_edge=512, n_graph=3), Budget(n_node=128, n_edge=512,
                                                                 n_graph=3)
    data = [jax.device_put(pad_batch(qm9_graphset, np.array([i, i + 5]), budget))
            for i, budget in enumerate([small, big, small, big, small])]
    monkeypatch.setattr(jax, "block_until_ready", counting_block)
    compile_s, run_s, compiles = _run(toy_run_fn, data, "toy_run_fn", sync_every_step=sync)
    assert compiles == 2 and compile_s > 0 and run_s > 0
    assert len(calls) == blocks
    if not sync:  # the one block at the end waits on every call's output
        assert len(calls[-1]) == 5
        np.testing.assert_allclose(np.asarray(calls[-1][3]),
                                   np.cos(np.asarray(data[3].nodes["positions"])).sum(),
                                   rtol=1e-5)


@pytest.mark.parametrize(("k", "sync", "timing"), [(1, True, "sync_every_step"),
                                                   (2, False, "pipelined")])
def test_measure_records_timing_and_steps_per_call(k, sync, timing, qm9_graphset):
    gs = qm9_graphset.subset(np.arange(64))  # its first 4 batches have 2 padding budgets
    row = measure("schnet", gs, 8, 5, steps_per_call=k, sync_every_step=sync)
    assert row["timing"] == timing and row["steps_per_call"] == k
    want_batches = 5 if k == 1 else 4  # 5 batches, 2 steps per call: the fifth is dropped
    assert row["batches"] == want_batches and row["train_calls"] == want_batches // k
    assert row["molecules"] == 8 * want_batches  # 8 molecules fit in every batch
    data = qm9_batches(gs, 8, want_batches)  # the batches timed (default budgets)
    assert row["atoms"] == sum(batch_counts(b)[1] for b in data) < int(gs.n_node.sum())
    budgets = len({b.senders.shape for b in data})
    assert budgets > 1  # so that one budget for K > 1 is a real difference
    assert row["budgets_seen"] == row["compiles_infer"] == budgets  # inference: as with K = 1
    assert row["budgets_seen_train"] == row["compiles_train"] == (budgets if k == 1 else 1)
    assert row["compiles_ok"] is True
    assert row["train_mol_per_s"] > 0 and row["infer_mol_per_s"] > 0


@pytest.mark.parametrize(("args", "message"), [
    (["--steps-per-call", "0"], "--steps-per-call must be >= 1, got 0"),
    (["--batches", "2", "--steps-per-call", "4"],
     "--batches (2) must be at least --steps-per-call (4)"),
])
def test_main_rejects_bad_steps_per_call(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:  # before any QM9 loading
        main(["--no-save", *args])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().endswith(message)


# ------------------------------------------------------------- --model-config


def test_measure_builds_and_records_the_model_config(qm9_graphset):
    gs = qm9_graphset.subset(np.arange(32))
    tiny = {"interactions": 2, "dim": 32, "num_filters": 32, "num_rbf": 16}
    small = measure("schnet", gs, 8, 2, model_config=tiny)
    default = measure("schnet", gs, 8, 2)
    assert small["model_config"] == tiny and default["model_config"] == {}
    assert small["params"] < default["params"]  # the overrides built another model
    assert small["molecules"] == default["molecules"] == 16


@pytest.mark.parametrize(("config", "message"), [
    ('{"dim": ', "--model-config '{\"dim\": ': not JSON"),
    ('"softmax"', "--model-config '\"softmax\"': not a JSON object"),
    ('{"attention_weights": "softmax"}', "mpnn: unknown config field(s) ['attention_weights']"),
    ('{"attention_weights": "sigmoid"}', "attention_weights must be 'softmax' or 'silu', got "
                                         "'sigmoid'"),
])
def test_main_rejects_a_bad_model_config(config, message, capsys):
    with pytest.raises(SystemExit) as exit_info:  # before any QM9 loading
        main(["--models", "attention", "mpnn", "--model-config", config, "--no-save"])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_main_times_a_non_default_configuration_and_saves_it(qm9_molset, tmp_path,
                                                              monkeypatch, capsys):
    """--models attention --model-config '{"attention_weights": "softmax", ...}': the rows
    and the saved JSON record the overrides (the softmax model the rows of
    attention_potential timed before the one-engine refactor)."""
    import json

    import benchmarks.speed as speed
    from mpattn.data.cache import save_molset

    cache = tmp_path / "qm9-test.npz"
    save_molset(qm9_molset, cache)
    saved = {}
    monkeypatch.setattr(speed, "write_result", lambda name, payload: saved.update(
        {name: payload}) or tmp_path / f"{name}.json")
    overrides = {"attention_weights": "softmax", "dim": 16, "num_heads": 2, "head_dim": 8,
                 "steps": 1, "ff_dim": 16, "num_rbf": 8}
    assert main(["--models", "attention", "--batch-sizes", "8", "--batches", "1",
                 "--molecules", "20", "--dataset-cache", str(cache),
                 "--model-config", json.dumps(overrides)]) == 0
    out = capsys.readouterr().out
    assert f"model config: {json.dumps(overrides)}" in out
    payload = saved["speed"]
    assert payload["model_config"] == overrides
    (row,) = payload["rows"]
    assert row["model"] == "attention" and row["model_config"] == overrides
