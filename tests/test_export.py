"""mpattn.export: a potential as a jax.export artefact equals the ASE calculator (molecule
with padding slots, periodic box with minimum-image edges), runs in a process without
mpattn, and the CLI exports a trained run; bad inputs are refused (or give NaN inside)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import ase.io
import jax
import numpy as np
import pytest
from ase import Atoms

from mpattn.ase import Calculator
from mpattn.data.frames import ethanol_xtb_path, read_frames
from mpattn.export import check_cell, export_potential, load_exported, main
from mpattn.potential import Potential
from mpattn.train import load_run

CUTOFF = 4.0
MAX_ATOMS = 12  # more than ethanol's 9 atoms and the box's 8: padding slots in use


@pytest.fixture(scope="module")
def frames():
    return read_frames(ethanol_xtb_path()).subset(np.arange(8))


@pytest.fixture(scope="module")
def trained(frames, tmp_path_factory):
    """A potential run of one epoch on 6 ethanol frames with a tiny model (cutoff 4 Å)."""
    from experiments import potential

    root = tmp_path_factory.mktemp("trained")
    data = root / "ethanol.extxyz"
    ase.io.write(data, [frames.atoms(i) for i in range(6)], format="extxyz")
    tiny = json.dumps({"dim": 8, "num_heads": 1, "degree_dim": 4, "steps": 1, "mix_dim": 8,
                       "num_rbf": 4})  # the default model, so3krates
    work = root / "run"
    assert potential.main(["--data", str(data), "--epochs", "1", "--train-size", "2",
                           "--val-size", "2", "--test-size", "2", "--batch-size", "2",
                           "--eval-batch-size", "2", "--cutoff", str(CUTOFF), "--workdir",
                           str(work), "--no-md", "--no-progress", "--model-config", tiny]) == 0
    return work


@pytest.fixture(scope="module")
def pot(trained) -> Potential:
    """The trained run's potential (reference fitted on xTB frames: absolute energies of
    ~ -320 eV, where float32 rounding of the reference would show)."""
    pot = load_run(trained, which="latest")
    assert isinstance(pot, Potential)
    return pot


@pytest.fixture(scope="module")
def artefact(pot, tmp_path_factory):
    path = tmp_path_factory.mktemp("export") / "ethanol.mpattn"
    meta = export_potential(pot, path, max_atoms=MAX_ATOMS, platforms=("cpu", "cuda"))
    return path, meta


@pytest.fixture(scope="module")
def box() -> Atoms:
    """8 H/O atoms in a periodic cubic cell of 9 Å, some pairs closer only through the cell
    boundary."""
    rng = np.random.default_rng(3)
    cell = 9.0 * np.eye(3)
    pos = [np.array([0.4, 4.5, 4.5]), np.array([8.2, 4.6, 4.4])]  # 1.2 Å across x = 0
    while len(pos) < 8:
        p = rng.uniform(0, 9, 3)
        d = np.array(pos) - p
        d -= 9.0 * np.round(d / 9.0)
        if np.linalg.norm(d, axis=1).min() > 1.3:
            pos.append(p)
    return Atoms("HHOHHOOH", positions=pos, cell=cell, pbc=True)


@pytest.fixture(scope="module")
def calc(pot) -> Calculator:
    """The reference: the ASE calculator (vesin's neighbour list, float64 reference)."""
    return Calculator.from_potential(pot)


@pytest.fixture(scope="module")
def exported(artefact):
    return load_exported(artefact[0])


def _with(calc, atoms):
    atoms = atoms.copy()
    atoms.calc = calc
    return atoms


def test_metadata_and_sidecar(artefact, pot):
    path, meta = artefact
    side = json.loads(open(f"{path}.json").read())
    assert side == meta
    assert meta["elements"] == [1, 6, 8] and meta["symbols"] == ["H", "C", "O"]
    assert meta["cutoff"] == 4.0 and meta["max_atoms"] == MAX_ATOMS
    assert meta["dtype"] == "float32" and meta["platforms"] == ["cpu", "cuda"]
    assert meta["units"]["stress"] == "eV/Å³" and meta["bytes"] == path.stat().st_size
    assert [i["name"] for i in meta["inputs"]] == ["z", "positions", "cell"]
    assert [o["name"] for o in meta["outputs"]] == ["energy", "forces", "stress"]
    np.testing.assert_allclose(list(meta["reference_energies"].values()),
                               pot.reference.energies)


def test_molecule_equals_the_calculator(exported, calc, frames):
    atoms = _with(calc, frames.atoms(3))
    energy, forces = atoms.get_potential_energy(), atoms.get_forces()
    exp = exported
    out = exp(atoms.get_atomic_numbers(), atoms.get_positions())
    np.testing.assert_allclose(out["energy"], energy, rtol=1e-6)
    np.testing.assert_allclose(out["forces"], forces, atol=1e-4)
    np.testing.assert_array_equal(out["stress"], 0)
    assert np.abs(forces).max() > 1e-2 and out["forces"].shape == (9, 3)
    # the raw function: padding slots get zero force
    z = np.zeros(MAX_ATOMS, np.int32)
    z[:9] = atoms.numbers
    pos = np.zeros((MAX_ATOMS, 3), np.float32)
    pos[:9] = atoms.positions
    pos[9:] = 1.0  # whatever sits in padding slots is ignored
    e, f, s = exp.exported.call(z, pos, np.zeros((3, 3), np.float32))
    assert f.shape == (MAX_ATOMS, 3) and s.shape == (3, 3) and e.shape == ()
    np.testing.assert_array_equal(np.asarray(f)[9:], 0)
    np.testing.assert_allclose(np.asarray(f)[:9], forces, atol=1e-4)


def test_periodic_box_equals_the_calculator(exported, calc, box):
    # a pair within the cutoff only through the boundary: the minimum image is in use
    assert np.linalg.norm(box.positions[0] - box.positions[1]) > CUTOFF
    assert box.get_distance(0, 1, mic=True) < CUTOFF
    atoms = _with(calc, box)
    energy, forces, stress = (atoms.get_potential_energy(), atoms.get_forces(),
                              atoms.get_stress())
    exp = exported
    out = exp(box)
    np.testing.assert_allclose(out["energy"], energy, rtol=1e-6)
    np.testing.assert_allclose(out["forces"], forces, atol=1e-4)
    voigt = out["stress"][[0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1]]
    np.testing.assert_allclose(voigt, stress, atol=1e-5)
    np.testing.assert_allclose(out["stress"], out["stress"].T, atol=1e-7)
    assert np.abs(stress).max() > 1e-4 and np.abs(forces).max() > 1e-2
    # atoms outside the cell: the same structure
    pos = box.positions.copy()
    pos[1] -= box.cell[0]
    pos[4] += box.cell[1] + box.cell[2]
    moved = exp(box.numbers, pos, box.cell)
    np.testing.assert_allclose(moved["energy"], energy, rtol=1e-6)
    np.testing.assert_allclose(moved["forces"], forces, atol=1e-4)


def test_a_fresh_process_runs_it_without_mpattn(artefact, calc, frames):
    atoms = _with(calc, frames.atoms(5))
    forces = atoms.get_forces()
    z = np.zeros(MAX_ATOMS, np.int32)
    z[:9] = atoms.numbers
    pos = np.zeros((MAX_ATOMS, 3))
    pos[:9] = atoms.positions
    code = (
        "import json, sys\n"
        "import jax, numpy as np\n"
        "z = np.array(json.loads(sys.argv[2]), np.int32)\n"
        "pos = np.array(json.loads(sys.argv[3]), np.float32)\n"
        "exp = jax.export.deserialize(bytearray(open(sys.argv[1], 'rb').read()))\n"
        "energy, forces, stress = exp.call(z, pos, np.zeros((3, 3), np.float32))\n"
        "assert 'mpattn' not in sys.modules, 'mpattn was imported'\n"
        "print(json.dumps({'energy': float(energy), 'forces': np.asarray(forces).tolist()}))\n"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    run = subprocess.run([sys.executable, "-c", code, str(artefact[0]), json.dumps(z.tolist()),
                          json.dumps(pos.tolist())], capture_output=True, text=True,
                         timeout=120, env=env, cwd=artefact[0].parent)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(np.array(out["forces"])[:9], forces, atol=1e-4)
    np.testing.assert_array_equal(np.array(out["forces"])[9:], 0)
    np.testing.assert_allclose(out["energy"], atoms.get_potential_energy(), rtol=1e-6)


def test_invalid_inputs_raise_eagerly_and_give_nan_inside(exported, frames, box):
    exp = exported
    atoms = frames.atoms(0)
    raw = exp.exported.call
    z = np.zeros(MAX_ATOMS, np.int32)
    pos = np.zeros((MAX_ATOMS, 3), np.float32)
    pos[:9] = atoms.positions
    zero = np.zeros((3, 3), np.float32)
    # a real atom after a padding slot
    z[:9] = atoms.numbers
    z[3], z[10] = 0, 1
    pos[10] = 2.0
    assert all(np.isnan(np.asarray(x)).all() for x in raw(z, pos, zero))
    with pytest.raises(ValueError, match=r"absent atoms \(z = 0\) after all real ones"):
        exp(z, pos)
    # an element the potential does not know (Cl)
    z = np.zeros(MAX_ATOMS, np.int32)
    z[:9] = atoms.numbers
    z[0] = 17
    assert np.isnan(np.asarray(raw(z, pos, zero)[0]))
    with pytest.raises(ValueError, match=r"element\(s\) Z=\[17\] unknown to this potential, "
                                         r"which knows \['H', 'C', 'O'\]"):
        exp(z[:9], atoms.positions)
    # a cell too small for minimum-image neighbours within 4 Å (heights 7 Å < 8 Å)
    small = box.copy()
    small.set_cell(7.0 * np.eye(3), scale_atoms=True)
    with pytest.raises(ValueError, match="cell too small for the cutoff 4.0 Å"):
        exp(small)
    z = np.zeros(MAX_ATOMS, np.int32)
    z[:8] = small.numbers
    pos = np.zeros((MAX_ATOMS, 3), np.float32)
    pos[:8] = small.positions
    assert all(np.isnan(np.asarray(x)).all()
               for x in raw(z, pos, small.cell.array.astype(np.float32)))
    # too many atoms, a singular nonzero cell
    with pytest.raises(ValueError, match="13 atoms .* max_atoms=12"):
        exp(np.ones(13, int), np.zeros((13, 3)))
    with pytest.raises(ValueError, match="volume 0"):
        check_cell(np.diag([9.0, 9.0, 0.0]), 4.0)
    assert check_cell(9.0 * np.eye(3), 4.0) and not check_cell(np.zeros((3, 3)), 4.0)


def test_export_refuses_bad_arguments(pot, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="max_atoms must be at least 1, got 0"):
        export_potential(pot, tmp_path / "a", max_atoms=0)
    with pytest.raises(ValueError, match="platforms must be some of"):
        export_potential(pot, tmp_path / "a", max_atoms=4, platforms=("gpu",))
    if not jax.config.read("jax_enable_x64"):
        with pytest.raises(ValueError, match="float64 needs"):
            export_potential(pot, tmp_path / "a", max_atoms=4, dtype="float64")
    # a property run's workdir: load_run gives a Predictor, not a Potential
    monkeypatch.setattr("mpattn.train.runs.load_run", lambda *a, **k: object())
    work = tmp_path / "qm9_run"
    with pytest.raises(ValueError, match=f"{work} is a property model's run"):
        export_potential(work, tmp_path / "a", max_atoms=4)
    assert not (tmp_path / "a").exists()


def test_cli_exports_a_trained_run(trained, artefact, exported, calc, frames, tmp_path,
                                   capsys):
    out = tmp_path / "deploy" / "ethanol.bin"
    assert main([str(trained), str(out), "--max-atoms", str(MAX_ATOMS), "--which",
                 "latest"]) == 0
    printed = capsys.readouterr().out
    size = out.stat().st_size
    assert printed.startswith(f"wrote {out} ({size:,} bytes") and f"{out}.json" in printed
    meta = json.loads(out.with_name("ethanol.bin.json").read_text())
    assert meta["platforms"] == ["cpu", "cuda"]  # the CLI's default: runs on a GPU too
    assert meta["source"] == str(trained) and meta["bytes"] == size
    assert {k: v for k, v in meta.items() if k not in ("source", "bytes")} == {
        k: v for k, v in artefact[1].items() if k not in ("source", "bytes")}
    atoms = frames.atoms(7)
    atoms.calc = calc
    res = load_exported(out)(atoms)
    np.testing.assert_allclose(res["energy"], atoms.get_potential_energy(), rtol=1e-6)
    np.testing.assert_allclose(res["forces"], atoms.get_forces(), atol=1e-4)


def test_cli_errors(trained, tmp_path, capsys):
    out = tmp_path / "x.bin"
    assert main([str(trained), str(out), "--max-atoms", "0"]) == 2
    err = capsys.readouterr().err
    assert err == "error: --max-atoms must be at least 1, got 0\n"
    missing = tmp_path / "no_such_run"
    assert main([str(missing), str(out), "--max-atoms", "10"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and f"{missing}: no such workdir" in err
    assert main([str(trained), str(out), "--max-atoms", "10", "--platforms", "cpu,gpu"]) == 2
    assert "error: platforms must be some of" in capsys.readouterr().err
    assert not out.exists()
