"""Tests of benchmarks/roofline.py: XLA's FLOP count against hand counts, the floor, a row."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from benchmarks.roofline import (
    HEADER,
    bandwidth,
    compiled_cost,
    floor,
    format_row,
    matmul_peak,
    measure,
)


def test_flop_count_of_a_dense_layer_by_hand():
    # y = x W + b on 64 rows, 32 -> 16: 2·64·32·16 multiply-adds plus 64·16 bias additions
    lin = nnx.Linear(32, 16, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(lin)
    f = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    cost = compiled_cost(f, state, jnp.ones((64, 32)))
    assert cost["flops"] == 2 * 64 * 32 * 16 + 64 * 16
    assert cost["transcendentals"] == 0
    # operands and result at least once each: 4 bytes x (64·32 + 32·16 + 16 + 64·16)
    assert cost["bytes"] >= 4 * (64 * 32 + 32 * 16 + 16 + 64 * 16)


def test_transcendentals_counted_apart():
    cost = compiled_cost(jax.jit(lambda x: jnp.exp(x) * 2.0), jnp.ones((8, 5)))
    assert (cost["flops"], cost["transcendentals"]) == (40, 40)


def test_floor_by_hand():
    r = floor(2e9, 1e8, peak=1e11, bw=1e10)  # compute 20 ms, memory 10 ms
    assert r["bound"] == "compute" and math.isclose(r["floor_s"], 0.02)
    assert math.isclose(r["compute_s"], 0.02) and math.isclose(r["memory_s"], 0.01)
    assert math.isclose(r["intensity"], 20.0) and math.isclose(r["ridge"], 10.0)
    r = floor(1e8, 1e9, peak=1e11, bw=1e10)  # compute 1 ms, memory 100 ms
    assert r["bound"] == "memory" and math.isclose(r["floor_s"], 0.1)
    assert floor(1.0, 0.0, 1.0, 1.0)["intensity"] == math.inf
    with pytest.raises(ValueError, match="peak and bandwidth must be positive, got 0"):
        floor(1.0, 1.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="flops and bytes must be >= 0"):
        floor(-1.0, 1.0, 1.0, 1.0)


def test_ceilings_are_positive_rates():
    peak, bw = matmul_peak(128, repeats=2), bandwidth(1 << 20, repeats=2)
    assert np.isfinite(peak) and peak > 1e6
    assert np.isfinite(bw) and bw > 1e6


def test_measure_row_is_consistent(qm9_graphset):
    from benchmarks.speed import qm9_batches

    gs = qm9_graphset
    row = measure("schnet", gs, batch_size=8, batches=2, peak=1e11, bw=1e10)
    assert row["model"] == "schnet" and row["batches"] == 2 and row["molecules"] == 16
    assert row["flops_per_step"] > 0 and row["bytes_per_step"] > 0
    # the step's FLOPs include at least the filter networks' matmuls, once per edge pair and
    # interaction, forward (2·P·(50·128 + 128·128)) and the weight gradient (as much again)
    pairs = np.mean([(b.senders.shape[0] + 1) // 2 for b in qm9_batches(gs, 8, 2)])
    assert row["flops_per_step"] >= 6 * 2 * 2 * pairs * (50 * 128 + 128 * 128)
    np.testing.assert_allclose(row["x_floor"], row["step_s"] / row["floor_s"], rtol=1e-9)
    np.testing.assert_allclose(row["x_compute"], row["step_s"] / row["compute_floor_s"],
                               rtol=1e-9)
    np.testing.assert_allclose(row["compute_floor_s"], row["flops_per_step"] / 1e11, rtol=1e-9)
    assert row["floor_s"] == max(row["compute_floor_s"], row["memory_floor_s"])
    np.testing.assert_allclose(row["train_mol_per_s"], 16 / (2 * row["step_s"]), rtol=1e-9)
    assert len(format_row(row)) == len(HEADER)
