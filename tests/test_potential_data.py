"""Reading any data for potentials: units, keys, molecule labels, stress, splits by molecule
and by frame, refused frames, the config file, and the metrics a chemist reads."""

from __future__ import annotations

import argparse
import json

import ase.io
import numpy as np
import pytest
from ase import units
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator

from experiments import potential_data
from experiments.config_file import parse_with_config, read_config, write_config
from mpattn.data.frames import ethanol_xtb_path, read_frames, split_molecules
from mpattn.train.metrics import force_breakdown


@pytest.fixture(scope="module")
def ethanol():
    return read_frames(ethanol_xtb_path()).subset(np.arange(6))


def _write(path, frames, *, energy_key="energy", forces_key="forces", energy_scale=1.0,
           length_scale=1.0, labels=None):
    """``frames`` to extxyz with its values divided by the scales (as a file in other units
    would hold them) under the keys given."""
    out = []
    for i in range(len(frames)):
        atoms = frames.atoms(i)
        atoms.calc = None
        atoms.positions /= length_scale
        atoms.info[energy_key] = frames.energy[i] / energy_scale
        atoms.arrays[forces_key] = frames.forces[frames.atom_index(i)] / (
            energy_scale / length_scale)
        if labels is not None:
            atoms.info["molecule"] = labels[i]
        out.append(atoms)
    ase.io.write(path, out, format="extxyz")
    return path


def test_units_are_converted_with_ase_codata(ethanol, tmp_path):
    path = _write(tmp_path / "hartree.extxyz", ethanol, energy_key="E", forces_key="F",
                  energy_scale=units.Hartree, length_scale=units.Bohr)
    back = read_frames(path, energy_key="E", forces_key="F", energy_unit="Hartree",
                       length_unit="Bohr")
    # extxyz writes 8 significant digits
    np.testing.assert_allclose(back.energy, ethanol.energy, rtol=1e-7)
    np.testing.assert_allclose(back.forces, ethanol.forces, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(back.positions, ethanol.positions, rtol=1e-6, atol=1e-6)
    assert units.Hartree == pytest.approx(27.211386, rel=1e-7)  # the factor used
    kcal = read_frames(path, energy_key="E", forces_key="F", energy_unit="kcal/mol")
    np.testing.assert_allclose(kcal.energy, ethanol.energy / units.Hartree * 0.0433641,
                               rtol=1e-5)
    with pytest.raises(ValueError, match="--energy-unit 'Ry': choose one of eV, meV"):
        read_frames(path, energy_unit="Ry")


def test_a_key_in_no_frame_is_an_error_naming_the_keys_there(ethanol, tmp_path):
    path = _write(tmp_path / "keys.extxyz", ethanol, energy_key="REF_energy",
                  forces_key="REF_forces")
    with pytest.raises(ValueError, match=r"keys.extxyz: no frame has the energy key "
                       r"'DFT_energy'; frame 0 has info keys \[.*'REF_energy'"):
        read_frames(path, energy_key="DFT_energy", forces_key="REF_forces")
    with pytest.raises(ValueError, match="no frame has the forces key 'DFT_forces'.*array "
                       "keys .*'REF_forces'"):
        read_frames(path, energy_key="REF_energy", forces_key="DFT_forces")


def test_molecule_labels_default_to_the_formula(ethanol, tmp_path):
    labels = ["a", "b", "a", "c", "b", "a"]
    labelled = read_frames(_write(tmp_path / "l.extxyz", ethanol, labels=labels))
    assert labelled.molecules.tolist() == labels
    assert labelled.subset([3, 1]).molecules.tolist() == ["c", "b"]
    plain = read_frames(_write(tmp_path / "p.extxyz", ethanol), molecule_key="none")
    assert set(plain.molecules) == {"C2H6O"}


def test_split_by_molecule_holds_out_whole_molecules():
    molecules = np.repeat([f"m{i}" for i in range(10)], 7)
    seen, unseen = split_molecules(molecules, 0.2, seed=1)
    assert len(np.unique(molecules[unseen])) == 2 and len(unseen) == 14
    assert not set(molecules[seen]) & set(molecules[unseen])
    assert sorted(np.concatenate([seen, unseen]).tolist()) == list(range(70))
    again, _ = split_molecules(molecules, 0.2, seed=1)
    np.testing.assert_array_equal(seen, again)
    assert len(split_molecules(molecules, 0.0, 0)[1]) == 0
    with pytest.raises(ValueError, match="leaves none to train on"):
        split_molecules(np.array(["x"] * 5), 0.5, 0)


def test_experiment_split_counts_and_shares(ethanol):
    frames = read_frames(ethanol_xtb_path()).subset(np.arange(40))
    frames.molecules = np.repeat(["a", "b", "c", "d"], 10)
    sizes = {"train_size": 0.5, "val_size": 3, "test_size": None, "unseen_molecules": 0.25}
    parts = potential_data.split(frames, sizes, 0, val_file=False, test_file=False)
    assert [len(parts[k]) for k in ("train", "val", "test", "test_unseen")] == [15, 3, 12, 10]
    every = np.concatenate(list(parts.values()))
    assert len(np.unique(every)) == 40  # disjoint, nothing lost
    held = set(frames.molecules[parts["test_unseen"]])
    assert len(held) == 1 and not held & set(frames.molecules[parts["train"]])
    files = potential_data.split(frames, sizes | {"train_size": None, "unseen_molecules": 0},
                                 0, val_file=True, test_file=True)
    assert len(files["train"]) == 40 and len(files["val"]) == len(files["test"]) == 0


def _args(**kw):
    base = dict(energy_key=None, forces_key=None, stress_key=None, molecule_key="molecule",
                energy_unit="eV", length_unit="Ang", skip_bad_frames=False)
    return argparse.Namespace(**base | kw)


def test_refused_frames_stop_the_run_unless_skipped_and_are_counted(ethanol, tmp_path):
    path = _write(tmp_path / "bad.extxyz", ethanol)
    text = path.read_text().splitlines()
    n = len(ethanol.z) // len(ethanol)
    header = 1 + 1 * 1  # the first frame's count line and comment line
    third = 2 * (n + 2) + header - 1  # the comment line of frame 2
    text[third] = text[third].replace("energy=", "nrg=")
    path.write_text("\n".join(text) + "\n")
    with pytest.raises(ValueError, match=r"bad.extxyz: 1 frame\(s\) cannot be used: frame 2: "
                       r"no energy \(energy\).*--skip-bad-frames"):
        potential_data.read_checked(path, _args(), "data", log=lambda *_: None)
    frames, counts = potential_data.read_checked(path, _args(skip_bad_frames=True), "data",
                                                 log=lambda *_: None)
    assert counts == {"read": 6, "used": 5, "refused": 1,
                      "refused_frames": [[2, "no energy (energy)"]]}
    assert frames.ids.tolist() == [0, 1, 3, 4, 5]


def test_stress_is_read_in_voigt_and_full_form(tmp_path):
    frames = []
    for i, strain in enumerate((0.0, 0.01)):
        atoms = bulk("Cu", cubic=True) * (2, 1, 1)
        atoms.set_cell(atoms.cell * (1 + strain), scale_atoms=True)
        atoms.calc = EMT()
        e, f, s = atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()
        atoms.calc = SinglePointCalculator(atoms, energy=e, forces=f, stress=s)
        atoms.info["molecule"] = f"cu{i}"
        frames.append(atoms)
    ase.io.write(tmp_path / "cu.extxyz", frames)
    back = read_frames(tmp_path / "cu.extxyz")
    from ase.stress import voigt_6_to_full_3x3_stress

    np.testing.assert_allclose(back.stress[1], voigt_6_to_full_3x3_stress(
        frames[1].get_stress()), rtol=1e-9)
    assert back.has_stress().all() and back.pbc.all()
    assert not read_frames(ethanol_xtb_path()).has_stress().any()


def test_force_breakdown_by_hand():
    # two frames: a 2-atom "HO" (molecule x) and a 1-atom "H" (molecule y)
    z = np.array([1, 8, 1])
    true_f = np.zeros((3, 3))
    pred_f = np.array([[0.003, 0, 0], [0, 0.006, 0], [0, 0, -0.009]])
    out = force_breakdown([1.0, 2.0], [1.002, 2.0], pred_f, true_f, [2, 1], z, ["x", "y"])
    assert out["per_element"]["H"]["force_mae_mev_ang"] == pytest.approx(2.0)  # (3 + 9) / 6
    assert out["per_element"]["O"]["force_mae_mev_ang"] == pytest.approx(2.0)  # 6 / 3
    assert out["per_molecule"]["x"]["energy_mae_mev"] == pytest.approx(2.0)
    assert out["per_molecule"]["x"]["energy_mae_mev_per_atom"] == pytest.approx(1.0)
    assert out["per_molecule"]["y"]["force_mae_mev_ang"] == pytest.approx(3.0)
    assert out["worst_molecules"] == ["y", "x"]


def _parser():
    p = argparse.ArgumentParser(prog="demo")
    p.add_argument("--config")
    p.add_argument("--lr", type=float)
    p.add_argument("--epochs", type=int)
    p.add_argument("--loss", choices=["mse", "l1"])
    p.add_argument("--no-md", action="store_true")
    p.add_argument("--data")
    p.add_argument("--model-config")
    return p


def test_config_file_round_trip_and_command_line_wins(tmp_path):
    path = write_config(tmp_path / "c.toml", {"lr": 0.003, "epochs": 7, "loss": "l1",
                                              "no_md": True, "data": "a b.xyz", "config": "x",
                                              "model_config": json.dumps({"dim": 32,
                                                                          "steps": 2})})
    args = parse_with_config(_parser(), ["--config", str(path), "--epochs", "9"])
    assert (args.lr, args.epochs, args.loss, args.no_md, args.data) == (0.003, 9, "l1", True,
                                                                        "a b.xyz")
    assert json.loads(args.model_config) == {"dim": 32, "steps": 2}
    assert "config =" not in path.read_text()


@pytest.mark.parametrize("text, message", [
    ("lr = 1e-3\nlearning_rate = 2\n", "c.toml: unknown key 'learning_rate'"),
    ("epochs = 2.5\n", "c.toml: epochs = 2.5: must be an integer"),
    ("loss = 'huber'\n", "c.toml: loss = 'huber': choose one of mse, l1"),
    ("no_md = 1\n", "c.toml: no_md = 1: must be true or false"),
    ("lr = 'fast'\n", "c.toml: lr = 'fast': could not convert"),
    ("model_config = 3\n", "model_config must be a table"),
    ("lr = \n", "not valid TOML"),
])
def test_a_bad_config_file_names_the_file_and_key(tmp_path, text, message):
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_config(path, _parser())


def test_validation_and_test_files_replace_their_parts_only():
    from experiments.potential import _sizes

    protocol = {"train_size": 0.8, "val_size": 0.1, "unseen_molecules": 0.0}
    ns = argparse.Namespace(train_size=None, val_size=None, test_size=None,
                            unseen_molecules=None, val="v.xyz", test=None)
    assert _sizes(ns, protocol) == {"train_size": 0.8, "val_size": None, "test_size": None,
                                    "unseen_molecules": 0.0}
    ns.val, ns.test = None, "t.xyz"
    assert _sizes(ns, protocol) == {"train_size": None, "val_size": 0.1, "test_size": None,
                                    "unseen_molecules": 0.0}
    frames = read_frames(ethanol_xtb_path()).subset(np.arange(20))
    parts = potential_data.split(frames, _sizes(ns, protocol), 0, val_file=False,
                                 test_file=True)
    assert [len(parts[k]) for k in ("train", "val", "test")] == [18, 2, 0]
    with pytest.raises(ValueError, match="no test frames left of the 20 frames"):
        potential_data.split(frames, {"train_size": 18, "val_size": 2, "test_size": None,
                                      "unseen_molecules": 0}, 0, val_file=False,
                             test_file=False)
