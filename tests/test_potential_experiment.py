"""``python -m experiments.potential`` end to end on small slices of real data: the SPICE-like
xTB set (seen and unseen molecules, the post-hoc energy fit of a forces-only run, the
resolved config.toml repeating a run), EMT copper cells with stress, and fine-tuning."""

from __future__ import annotations

import json

import ase.io
import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from flax import nnx

from experiments import potential
from mpattn.data.frames import read_frames, spice_like_xtb_path
from mpattn.train import load_run

# the default model (so3krates), tiny
TINY = json.dumps({"dim": 16, "num_heads": 2, "degree_dim": 4, "steps": 1, "mix_dim": 16,
                   "num_rbf": 8})
QUIET = ["--no-md", "--no-progress", "--model-config", TINY]


@pytest.fixture(scope="module")
def spice_slice(tmp_path_factory):
    """6 frames each of 3 sulfur and 3 QM9-like molecules of the bundled set."""
    frames = read_frames(spice_like_xtb_path())
    names = ["methanethiol", "thiophene", "dimethyl_sulfoxide", "ethanol", "urea", "furan"]
    index = np.concatenate([np.flatnonzero(frames.molecules == n)[:6] for n in names])
    path = tmp_path_factory.mktemp("spice") / "slice.extxyz"
    ase.io.write(path, [frames.atoms(int(i)) for i in index], format="extxyz")
    return path


@pytest.fixture(scope="module")
def forces_only(spice_slice, tmp_path_factory):
    work = tmp_path_factory.mktemp("run") / "forces_only"
    code = potential.main(["--data", str(spice_slice), "--epochs", "2", "--beta", "1",
                           "--unseen-molecules", "0.34", "--train-size", "0.6", "--val-size",
                           "0.2", "--workdir", str(work), *QUIET])
    assert code == 0
    return work, json.loads((work / "results.json").read_text())


def test_seen_and_unseen_molecules_are_reported_apart(forces_only):
    work, r = forces_only
    assert r["split_sizes"] == {"train": 14, "val": 5, "test": 5, "test_unseen": 12}
    split = json.loads((work / "split.json").read_text())
    assert not set(split["train"]) & set(split["test_unseen"])
    for part in ("val", "test", "test_unseen"):
        rep = r[part]
        assert rep["force_mae_mev_ang"] > 0 and rep["energy_mae_mev_per_atom"] > 0
        assert set(rep["per_element"]) <= {"H", "C", "N", "O", "S"}
        assert sum(m["n_frames"] for m in rep["per_molecule"].values()) == rep["n_structures"]
        assert rep["worst_molecules"][0] in rep["per_molecule"]
    assert len(r["test_unseen"]["per_molecule"]) == 2  # 0.34 of 6 molecules, whole
    assert not set(r["test_unseen"]["per_molecule"]) & set(r["test"]["per_molecule"])
    assert r["frames"]["read"] == r["frames"]["used"] == 36 and r["frames"]["refused"] == 0
    for name in ("force_parity.png", "energy_parity.png", "force_parity_unseen.png",
                 "curves.png", "config.toml"):
        assert (work / name).is_file(), name


def test_a_forces_only_run_fits_its_energies_afterwards(forces_only):
    """β = 1: the per-element fit on the training frames cannot raise their energy error
    (least squares with the zero correction among the candidates); the potential loaded
    from the run carries it, so its energies are the corrected ones."""
    work, r = forces_only
    fit = r["energy_fit"]
    assert fit["applied"] and (work / "energy_fit.json").is_file()
    assert fit["train"]["after"]["energy_mae_mev"] <= fit["train"]["before"]["energy_mae_mev"]
    assert r["test"]["energy_mae_mev"] == pytest.approx(fit["test"]["after"]["energy_mae_mev"])
    pot = load_run(work)
    stored = json.loads((work / "energy_fit.json").read_text())
    raw = r["reference"]  # fitted before training, as the checkpoint records it
    np.testing.assert_allclose(pot.reference.energies,
                               np.asarray(raw["energies"]) + np.asarray(stored["delta"]))


def test_config_toml_repeats_the_run(forces_only, tmp_path):
    work, first = forces_only
    again = tmp_path / "again"
    assert potential.main(["--config", str(work / "config.toml"), "--workdir", str(again)]) == 0
    second = json.loads((again / "results.json").read_text())
    assert second["split_sizes"] == first["split_sizes"]
    assert second["test"]["force_mae_mev_ang"] == pytest.approx(
        first["test"]["force_mae_mev_ang"], rel=1e-6)
    assert json.loads((again / "split.json").read_text())["train"] == json.loads(
        (work / "split.json").read_text())["train"]


def test_bad_options_are_refused_before_training(spice_slice, tmp_path, capsys):
    work = tmp_path / "w"
    assert potential.main(["--data", str(spice_slice), "--energy-key", "DFT", "--workdir",
                           str(work), *QUIET]) == 2
    assert "no frame has the energy key 'DFT'" in capsys.readouterr().err
    assert potential.main(["--data", str(spice_slice), "--stress-weight", "1", "--workdir",
                           str(work), "--epochs", "1", *QUIET]) == 2
    assert "--stress-weight 1.0: no training frame" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text("learning_rate = 0.1\n")
    with pytest.raises(SystemExit):
        potential.main(["--config", str(bad)])
    assert "bad.toml: unknown key 'learning_rate'" in capsys.readouterr().err


def _copper(path, n=12, seed=0):
    rng = np.random.default_rng(seed)
    frames = []
    for i in range(n):
        atoms = bulk("Cu", cubic=True) * (2, 1, 1)
        atoms.set_cell(atoms.cell * (1 + 0.02 * rng.standard_normal()), scale_atoms=True)
        atoms.rattle(0.05, seed=int(rng.integers(1 << 30)))
        atoms.calc = EMT()
        e, f, s = atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()
        atoms.calc = SinglePointCalculator(atoms, energy=e, forces=f, stress=s)
        atoms.info["molecule"] = f"cu{i % 2}"
        frames.append(atoms)
    ase.io.write(path, frames, format="extxyz")
    return path


def test_stress_trains_and_is_reported(tmp_path):
    data = _copper(tmp_path / "cu.extxyz")
    work = tmp_path / "cu"
    assert potential.main(["--data", str(data), "--stress-weight", "1", "--epochs", "2",
                           "--cutoff", "4.0", "--workdir", str(work), *QUIET]) == 0
    r = json.loads((work / "results.json").read_text())
    assert r["task"]["stress_weight"] == 1.0
    assert r["test"]["n_stress"] == r["test"]["n_structures"] > 0
    assert np.isfinite(r["test"]["stress_mae_mev_ang3"]) and r["test"]["stress_mae_mev_ang3"] > 0
    assert r["md"] == {"skipped": "--no-md"}
    from mpattn.ase import Calculator

    atoms = ase.io.read(data, 0)
    atoms.calc = Calculator(work)
    assert np.all(np.isfinite(atoms.get_stress()))


def test_fine_tuning_starts_from_the_run_and_can_freeze_all_but_the_readout(
        forces_only, spice_slice, tmp_path, capsys):
    pre, _ = forces_only
    work = tmp_path / "ft"
    assert potential.main(["--data", str(spice_slice), "--epochs", "1", "--init-from",
                           str(pre), "--train-only-readout", "--workdir", str(work),
                           *QUIET]) == 0
    assert f"--init-from {pre}: parameters of its best checkpoint" in capsys.readouterr().out
    before = nnx.state(load_run(pre).model, nnx.Param)
    after = nnx.state(load_run(work).model, nnx.Param)
    flat_b = dict(nnx.to_flat_state(before))
    flat_a = dict(nnx.to_flat_state(after))
    readout = [k for k in flat_a if "readout" in k]
    frozen = [k for k in flat_a if "readout" not in k]
    assert readout and frozen
    # the loaded weights are the EMA's: a constant parameter's average moves by rounding only
    for k in frozen:
        np.testing.assert_allclose(np.asarray(flat_a[k][...]), np.asarray(flat_b[k][...]),
                                   rtol=1e-6, atol=1e-7)
    assert max(float(np.max(np.abs(np.asarray(flat_a[k][...]) - np.asarray(flat_b[k][...]))))
               for k in readout) > 1e-4
    other = json.dumps(json.loads(TINY) | {"dim": 24})
    assert potential.main(["--data", str(spice_slice), "--epochs", "1", "--init-from",
                           str(pre), "--workdir", str(tmp_path / "x"), "--no-md",
                           "--no-progress", "--model-config", other]) == 2
    assert "the model config differs (dim: 16 there, 24 here" in capsys.readouterr().err


def test_the_readmes_potential_commands_parse():
    """Every ``python -m experiments.potential`` line of the README names real options."""
    import re
    import shlex
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text().replace("\\\n", " ")
    lines = re.findall(r"^python -m experiments\.potential(.*?)(?:#.*)?$", text, flags=re.M)
    assert len(lines) >= 5
    for line in lines:
        argv = shlex.split(line)
        if "--config" in argv:
            continue  # names a run's file
        args = potential.parser().parse_args(argv)
        assert args.model == "so3krates"


def test_an_element_the_fine_tuned_model_cannot_embed_is_refused(spice_slice, tmp_path, capsys):
    frames = read_frames(spice_slice)
    plain = [frames.atoms(i) for i in range(len(frames)) if 16 not in frames.z[
        frames.atom_index(i)]]
    ase.io.write(tmp_path / "plain.extxyz", plain, format="extxyz")
    small = json.dumps(json.loads(TINY) | {"max_z": 9})
    pre = tmp_path / "pre"
    options = ["--epochs", "1", "--no-md", "--no-progress", "--model-config", small]
    assert potential.main(["--data", str(tmp_path / "plain.extxyz"), "--workdir", str(pre),
                           *options]) == 0
    assert potential.main(["--data", str(spice_slice), "--init-from", str(pre), "--workdir",
                           str(tmp_path / "ft"), *options]) == 2
    assert "element(s) ['S'] of the data are beyond the model's embedding table (max_z 9)" \
        in capsys.readouterr().err


def test_a_trained_potentials_stress_is_finite_on_liquid_water(forces_only):
    """64 water molecules at 1 g/cm³ (random orientations) through the calculator of the
    potential trained above (it knows H and O)."""
    from ase import Atoms
    from ase.build import molecule

    from mpattn.ase import Calculator

    rng = np.random.default_rng(0)
    side = (64 * 18.015 / 0.6022) ** (1 / 3)  # Å for 1 g/cm³
    grid = (np.stack(np.meshgrid(*[np.arange(4)] * 3), -1).reshape(-1, 3) + 0.5) * side / 4
    water = Atoms(cell=[side] * 3, pbc=True)
    for centre in grid:
        h2o = molecule("H2O")
        h2o.rotate(rng.uniform(0, 360), rng.normal(size=3))
        h2o.translate(centre - h2o.get_center_of_mass())
        water += h2o
    water.calc = Calculator(forces_only[0])
    stress = water.get_stress()
    assert stress.shape == (6,) and np.all(np.isfinite(stress)) and np.any(stress != 0)
