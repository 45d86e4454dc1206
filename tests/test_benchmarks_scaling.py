"""Tests of benchmarks/scaling.py's own logic: exponent fit, water builder, row builder."""

from __future__ import annotations

import math

import numpy as np
import pytest

from benchmarks.scaling import (
    HEADER,
    WATER_DENSITY,
    fit_exponent,
    fits_of,
    format_row,
    measure,
    water_box,
)


def test_fit_exponent_recovers_noiseless_power_law():
    atoms = np.array([100, 300, 1000, 3000, 10000])
    secs = 2.5e-6 * atoms**1.37
    p, c = fit_exponent(atoms, secs, min_atoms=0)
    np.testing.assert_allclose(p, 1.37, rtol=0, atol=1e-9)
    np.testing.assert_allclose(c, 2.5e-6, rtol=1e-9)


def test_fit_exponent_honours_min_atoms():
    atoms = np.array([100, 200, 1000, 2000, 4000])
    secs = 3e-5 * atoms**1.0
    secs[:2] = 0.5  # overhead-dominated small sizes: constant
    p, c = fit_exponent(atoms, secs, min_atoms=1000)
    np.testing.assert_allclose([p, c], [1.0, 3e-5], rtol=1e-9)
    p_all, _ = fit_exponent(atoms, secs, min_atoms=0)
    assert abs(p_all - 1.0) > 0.1  # the small sizes would bias the fit


def test_fit_exponent_too_few_points():
    with pytest.raises(ValueError, match=r"needs at least 2 distinct sizes >= 1000 atoms, got 1"):
        fit_exponent([100, 500, 2000], [1.0, 2.0, 3.0], min_atoms=1000)
    with pytest.raises(ValueError, match="got 1"):
        fit_exponent([2000, 2000], [1.0, 2.0], min_atoms=1000)
    with pytest.raises(ValueError, match="must be positive"):
        fit_exponent([1000, 2000], [1.0, 0.0])


def _min_image(d, length):
    return d - length * np.rint(d / length)


@pytest.mark.parametrize("n_atoms", [48, 96, 1536])
def test_water_box_geometry(n_atoms):
    z, pos, cell = water_box(n_atoms, seed=3)
    n_mol = n_atoms // 3
    assert z.shape == (n_atoms,) and pos.shape == (n_atoms, 3)
    np.testing.assert_array_equal(z, np.tile([8, 1, 1], n_mol))
    length = cell[0, 0]
    np.testing.assert_allclose(cell, np.eye(3) * length)
    assert (pos >= 0).all() and (pos < length).all()
    # density: molecules / volume and mass density 1.0 g/cm^3 within 2%
    np.testing.assert_allclose(n_mol / length**3, WATER_DENSITY, rtol=0.02)
    grams_per_cm3 = n_mol * 18.015 / 6.02214076e23 / (length * 1e-8) ** 3
    np.testing.assert_allclose(grams_per_cm3, 1.0, rtol=0.02)
    o, h1, h2 = pos[0::3], pos[1::3], pos[2::3]
    d1 = np.linalg.norm(_min_image(h1 - o, length), axis=1)
    d2 = np.linalg.norm(_min_image(h2 - o, length), axis=1)
    np.testing.assert_allclose(np.concatenate([d1, d2]), 0.96, atol=1e-9)
    v1, v2 = _min_image(h1 - o, length), _min_image(h2 - o, length)
    cos = np.sum(v1 * v2, axis=1) / (d1 * d2)
    np.testing.assert_allclose(np.degrees(np.arccos(cos)), 104.5, atol=1e-6)
    # minimum O-O distance under the minimum image (plain loop over pairs)
    best = math.inf
    for i in range(n_mol):
        d = np.linalg.norm(_min_image(o[i + 1:] - o[i], length), axis=1)
        if d.size:
            best = min(best, float(d.min()))
    assert best > 2.0


def test_water_box_rounding_and_seed():
    assert len(water_box(100)[0]) == 99  # round(100/3) = 33 molecules
    assert len(water_box(101)[0]) == 102  # round(101/3) = 34 molecules
    assert len(water_box(1)[0]) == 3  # at least one molecule
    a, b, c = water_box(96, seed=7), water_box(96, seed=7), water_box(96, seed=8)
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.allclose(a[1], c[1])


def test_water_box_too_dense_grid_raises():
    with pytest.raises(ValueError, match=r"grid spacing .* below min_oo=2.0"):
        water_box(6)  # 2 molecules on a 2x2x2 grid of a 3.9 Å box: spacing 1.96 Å


def test_measure_row_on_tiny_system():
    tiny = {"dim": 8, "num_heads": 2, "head_dim": 4, "steps": 1, "ff_dim": 8, "num_rbf": 4}
    row = measure("attention", 48, cutoff=3.0, repeats=2, overrides=tiny)
    assert set(row) == {"model", "atoms", "box_A", "edges", "mean_neighbors", "budget_nodes",
                        "budget_edges", "edge_array_bytes", "neighbor_list_ms", "compile_s",
                        "step_ms", "step_ms_all", "us_per_atom_step", "peak_rss_mb"}
    assert row["atoms"] == 48 and len(row["step_ms_all"]) == 2
    for key in ("neighbor_list_ms", "compile_s", "step_ms", "us_per_atom_step", "peak_rss_mb"):
        assert row[key] > 0, key
    np.testing.assert_allclose(row["us_per_atom_step"], 1000 * row["step_ms"] / 48)
    np.testing.assert_allclose(row["mean_neighbors"], row["edges"] / 48)
    assert row["budget_edges"] >= row["edges"] > 0
    # senders, receivers, bond, pair (edge_pairs), shift
    assert row["edge_array_bytes"] == row["budget_edges"] * (4 + 4 + 4 + 4 + 12)
    assert len(format_row(row)) == len(HEADER)  # columns line up
    fits = fits_of([row, {**row, "atoms": 96, "step_ms": 2 * row["step_ms"]}], 1000)
    assert fits["upper"]["exponent"] is None and "needs at least 2" in fits["upper"]["error"]
    np.testing.assert_allclose(fits["all"]["exponent"], 1.0, rtol=1e-9)


def test_worker_prints_one_json_row(capsys):
    import json

    from benchmarks.scaling import main

    assert main(["--one", "schnet", "48", "--cutoff", "3.0", "--repeats", "1"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["model"] == "schnet" and row["atoms"] == 48 and row["step_ms"] > 0


TINY = {"dim": 8, "num_heads": 2, "head_dim": 4, "steps": 1, "ff_dim": 8, "num_rbf": 4}


def test_worker_measures_the_model_config_it_is_given(capsys):
    """--model-config reaches the isolated worker's model (softmax weights: what the rows of
    attention_potential measured before the one-engine refactor)."""
    import json

    from benchmarks.scaling import build_potential, main

    config = json.dumps(TINY | {"attention_weights": "softmax"})
    assert main(["--one", "attention", "48", "--cutoff", "3.0", "--repeats", "1",
                 "--model-config", config]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["model"] == "attention" and row["atoms"] == 48 and row["step_ms"] > 0
    model = build_potential("attention", 3.0, TINY | {"attention_weights": "softmax"}).model
    assert (model.config.attention_weights, model.config.dim, model.config.cutoff) == (
        "softmax", 8, 3.0)  # --cutoff wins over a config's cutoff


@pytest.mark.parametrize(("config", "message"), [
    ('{"dim": ', "--model-config '{\"dim\": ': not JSON"),
    ('[1]', "--model-config '[1]': not a JSON object"),
    ('{"attention_weights": "softmax"}', "schnet: unknown config field(s) "
                                         "['attention_weights']"),
])
def test_main_rejects_a_bad_model_config(config, message, capsys):
    from benchmarks.scaling import main

    with pytest.raises(SystemExit) as exit_info:  # before any model is built
        main(["--models", "attention", "schnet", "--model-config", config, "--no-save"])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_isolated_sizes_pass_the_model_config_to_each_worker(monkeypatch):
    import json
    import subprocess

    from benchmarks import scaling

    commands = []

    def fake_run(cmd, **kwargs):
        commands.append(cmd)
        row = {"atoms": int(cmd[cmd.index("--one") + 2]), "step_ms": 1.0, "peak_rss_mb": 1.0}
        return subprocess.CompletedProcess(cmd, 0, stdout=json.dumps(row) + "\n", stderr="")

    monkeypatch.setattr(scaling.subprocess, "run", fake_run)
    monkeypatch.setattr(scaling, "format_row", lambda row: "")
    overrides = {"attention_weights": "softmax"}
    rows, why = scaling.run_model("attention", [96, 48], cutoff=3.0, repeats=1,
                                  overrides=overrides, isolate=True, log=lambda _s: None)
    assert why is None and [r["atoms"] for r in rows] == [48, 96]
    for cmd in commands:
        assert json.loads(cmd[cmd.index("--model-config") + 1]) == overrides
    scaling.run_model("schnet", [48], cutoff=3.0, repeats=1, isolate=True, log=lambda _s: None)
    assert "--model-config" not in commands[-1]  # the default config: no option
