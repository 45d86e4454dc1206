"""Tests of benchmarks/md.py and benchmarks/relax.py's own logic: the water box builder, the
exponent fit, the energy comparison, and --quick runs of both with a tiny untrained potential
(the result files hold the keys the README quotes)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks.md import fit_rows, water_atoms
from benchmarks.relax import energy_agreement, intact, perturb, split_known

_AVOGADRO = 6.02214076e23


@pytest.fixture(scope="module")
def tiny_potential():
    """An untrained small attention potential (H, C, O; reference fitted on 20 ethanol
    frames): what the scripts load from a run folder, in a second."""
    from flax import nnx

    from mpattn.data.frames import ethanol_xtb_path, read_frames
    from mpattn.models.attention import AttentionConfig, AttentionModel
    from mpattn.potential import Potential, fit_reference

    frames = read_frames(ethanol_xtb_path()).subset(np.arange(20))
    zs = [frames.z[frames.atom_index(i)] for i in range(len(frames))]
    ref = fit_reference(zs, frames.energy, ("H", "C", "O"), forces=frames.forces)
    config = AttentionConfig(dim=8, num_heads=2, head_dim=4, steps=1, ff_dim=16, num_rbf=4,
                             cutoff=4.0)
    return Potential(AttentionModel(config, rngs=nnx.Rngs(0)), reference=ref)


# ---------------------------------------------------------------- water boxes


def _pair_distances(atoms, cutoff):
    from mpattn.neighbors import radius_edges

    pos = atoms.get_positions()
    s, r, shift = radius_edges(pos, cutoff, atoms.cell.array, atoms.pbc)
    return s, r, np.linalg.norm(pos[s] - pos[r] + shift, axis=1)


@pytest.mark.parametrize("n_atoms", [192, 1000])
def test_water_box_count_density_spacing_and_periodicity(n_atoms):
    atoms = water_atoms(n_atoms, seed=1)
    n_mol = round(n_atoms / 3)
    assert len(atoms) == 3 * n_mol
    np.testing.assert_array_equal(atoms.numbers, np.tile([8, 1, 1], n_mol))
    assert atoms.pbc.all()
    length = atoms.cell[0, 0]
    np.testing.assert_allclose(atoms.cell.array, np.eye(3) * length)
    pos = atoms.get_positions()
    assert (pos >= 0).all() and (pos < length).all()  # wrapped into the cell
    grams_per_cm3 = n_mol * 18.015 / _AVOGADRO / (length * 1e-8) ** 3
    assert grams_per_cm3 == pytest.approx(1.0, rel=0.05)
    # O-O >= 2.5 Å under the minimum image (also across the boundary)
    oxygen = atoms[atoms.numbers == 8]
    _, _, d_oo = _pair_distances(oxygen, 2.5)
    assert d_oo.size == 0
    _, _, d_oo = _pair_distances(oxygen, 3.2)
    assert d_oo.size and d_oo.min() >= 2.5
    # rigid molecules (O-H 0.96 Å through the boundary) and no clash between molecules
    s, r, d = _pair_distances(atoms, 1.6)
    intra = s // 3 == r // 3
    assert not (~intra).any()
    np.testing.assert_allclose(d[intra & ((s % 3 == 0) | (r % 3 == 0))], 0.96, atol=1e-9)


def test_water_box_is_seeded_and_too_small_boxes_fail():
    a, b, c = water_atoms(192, seed=3), water_atoms(192, seed=3), water_atoms(192, seed=4)
    np.testing.assert_array_equal(a.positions, b.positions)
    assert not np.allclose(a.positions, c.positions)
    with pytest.raises(ValueError, match="below min_oo"):
        water_atoms(99)  # 33 molecules on a 4x4x4 grid of a 10.0 Å box: 2.5 Å is too tight


# ---------------------------------------------------------------- analysis


def test_fit_rows_recovers_the_exponent_of_time_per_step():
    atoms = np.array([1000, 2000, 5000, 10000])
    rows = [{"atoms": int(n), "steps_done": 200, "steps_per_s": 1.0 / (3e-6 * n ** 1.12)}
            for n in atoms]
    rows.append({"atoms": 20000, "steps_done": 0, "steps_per_s": 0.0})  # stopped at once
    fit = fit_rows(rows)
    assert fit["exponent"] == pytest.approx(1.12, abs=1e-9)
    assert fit["prefactor_s"] == pytest.approx(3e-6, rel=1e-9)
    assert fit["sizes"] == atoms.tolist()
    one = fit_rows(rows[:1])
    assert one["exponent"] is None and "at least 2 distinct sizes" in one["error"]


def test_energy_agreement_counts_over_both_converged():
    e_ase = np.array([-10.0, -20.0, -30.0, -40.0, -50.0])
    e_batched = e_ase + np.array([0.0002, -0.0005, 0.003, 0.5, 0.0])
    both = np.array([True, True, True, False, True])
    out = energy_agreement(e_batched, e_ase, both, tolerance_meV=1.0)
    assert out["n"] == 4 and out["over_tolerance"] == 1  # the 500 meV one is not converged
    np.testing.assert_allclose(sorted(out["abs_meV"]), [0.0, 0.2, 0.5, 3.0], atol=1e-6)
    assert out["median_meV"] == pytest.approx(0.35, abs=1e-6)
    assert out["max_meV"] == pytest.approx(3.0, abs=1e-6)
    assert energy_agreement(e_batched, e_ase, np.zeros(5, bool))["median_meV"] is None


def test_split_known_perturb_and_intact():
    from ase.build import molecule

    mols = [molecule("CH4"), molecule("CH3Cl"), molecule("H2O"), molecule("NH3")]
    keep, skipped = split_known(mols, (1, 6, 8))
    assert keep.tolist() == [0, 2] and skipped == {"Cl": 1, "N": 1}
    before = [m.positions.copy() for m in mols]
    noisy, redrawn = perturb(mols, 0.05, seed=2)
    assert redrawn == 0
    assert all(np.array_equal(m.positions, p) for m, p in zip(mols, before, strict=True))
    shift = np.concatenate([n.positions - m.positions for m, n in zip(mols, noisy, strict=True)])
    assert 0.03 < shift.std() < 0.07
    np.testing.assert_array_equal(perturb(mols, 0.05, seed=2)[0][1].positions,
                                  noisy[1].positions)
    # noise that brings atoms within min_distance is drawn again
    wide, redrawn = perturb(mols[:1] * 20, 0.4, seed=0, min_distance=0.7)
    assert redrawn > 0
    for m in wide:
        d = np.linalg.norm(m.positions[:, None] - m.positions[None], axis=-1)
        assert d[np.triu_indices(len(m), 1)].min() >= 0.7
    broken = mols[0].copy()
    broken.positions[1] += [3.0, 0, 0]  # an H pulled off the carbon
    assert intact(mols[:2], [noisy[0], mols[1]]).tolist() == [True, True]
    assert intact(mols[:1], [broken]).tolist() == [False]


# ---------------------------------------------------------------- --quick runs


# ASE's ZeroRotation (applied to the momenta of every system by run_nve and run_md) warns for
# periodic boxes
@pytest.mark.filterwarnings("ignore:Periodic boundary conditions are ignored")
def test_md_quick_run_writes_the_result(tiny_potential, monkeypatch, tmp_path, capsys):
    from benchmarks import md

    monkeypatch.setattr(md, "load_potential", lambda workdir: tiny_potential)
    # the tiny potential's 4 Å cutoff lets an 81-atom box (9.3 Å) in; every run_md call
    # compiles several functions (seconds): no warm-up runs, ASE on the small box only
    assert md.main(["--quick", "--water-sizes", "81", "192", "--no-warmup", "--ase-max-atoms",
                    "81", "--results-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "JAX-MD / ASE" in out and "time per step ∝ N^" in out and "lenient" in out
    (path,) = tmp_path.glob("md-*.json")
    assert path.with_suffix(".png").is_file()
    r = json.loads(path.read_text())
    assert {"machine", "versions", "command", "notes", "ethanol", "water", "summary"} <= set(r)
    assert {"jax", "jax-md", "mpattn"} <= set(r["versions"]) and r["machine"]["date"]
    s = r["summary"]
    for key in ("ethanol_ase_steps_per_s", "ethanol_jax_md_steps_per_s",
                "ethanol_jax_md_replicas_trajectory_steps_per_s",
                "ethanol_speedup_jax_md_over_ase", "ethanol_ase_drift_meV_per_atom_per_ps",
                "ethanol_jax_md_drift_meV_per_atom_per_ps", "water_jax_md_exponent"):
        assert s[key] is not None and np.isfinite(s[key]), key
    assert s["ethanol_compiles"] == {"ase": 1, "jax_md": 1, "jax_md_replicas": 1}
    eth = r["ethanol"]
    assert eth["steps"] == 40 and eth["jax_md_replicas"]["replicas"] == 2
    assert len(eth["jax_md_replicas"]["drift_meV_per_atom_per_ps"]) == 2
    # same momenta, same velocity Verlet: one trajectory in both engines
    assert eth["jax_md"]["max_deviation_meV_per_atom"][0] == pytest.approx(
        eth["ase"]["max_deviation_meV_per_atom"], rel=0.05, abs=1e-3)
    rows = r["water"]["rows"]
    assert [(w["engine"], w["atoms"]) for w in rows] == [
        ("jax-md", 81), ("ase", 81), ("jax-md", 192)]
    for w in rows:
        assert w["steps_done"] == 20 and w["steps_per_s"] > 0 and w["compile_seconds"] > 0
    assert r["water"]["fits"]["jax-md"]["sizes"] == [81, 192]


def test_relax_quick_run_writes_the_result(tiny_potential, monkeypatch, tmp_path, capsys):
    from benchmarks import relax

    monkeypatch.setattr(relax, "load_potential", lambda workdir: tiny_potential)
    assert relax.main(["--quick", "--molecules", "12", "--ase-molecules", "3", "--max-steps",
                       "25", "--first-rows", "200", "--results-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "extrapolated" in out and "speed-up of batched FIRE" in out
    (path,) = tmp_path.glob("relax-*.json")
    assert path.with_suffix(".png").is_file()
    r = json.loads(path.read_text())
    m = r["molecules"]
    assert m["drawn"] == 12 and m["skipped"] > 0 and "N" in m["skipped_by_element"]
    assert m["relaxed"] == 12 - m["skipped"] == len(m["ids"])
    assert r["batched"]["molecules"] == m["relaxed"] and r["ase"]["molecules"] == 3
    assert r["ase"]["extrapolated"]
    assert r["ase"]["seconds_all"] == pytest.approx(r["ase"]["seconds"] * m["relaxed"] / 3)
    for key in ("molecules", "skipped", "batched_seconds", "ase_seconds", "speedup",
                "batched_converged", "ase_converged", "batched_mean_steps", "ase_mean_steps",
                "median_abs_dE_meV", "p95_abs_dE_meV", "over_tolerance"):
        assert key in r["summary"], key
    assert r["batched"]["max_steps_taken"] <= 25 and r["ase"]["max_steps_taken"] <= 25
