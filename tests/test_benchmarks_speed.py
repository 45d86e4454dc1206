"""Tests of benchmarks/speed.py's own logic: real-atom counts, throughput, compile counter,
memory reader and table row (no timing is asserted)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.speed import (
    HEADER,
    CompileCounter,
    batch_counts,
    format_row,
    peak_memory,
    throughput,
)
from mpattn.graph import Budget, pad_batch


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
