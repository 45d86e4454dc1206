"""python -m experiments.md: JAX-MD and ASE engines, NVT with replicas and a committee, the
summary and trajectory it writes, exit status 3 for a run that exploded, 2 for bad input."""

from __future__ import annotations

import json

import ase
import ase.io
import pytest

from experiments import md
from mpattn.data.frames import ethanol_xtb_path, read_frames


@pytest.fixture(scope="module")
def structure(tmp_path_factory):
    path = tmp_path_factory.mktemp("md") / "ethanol.xyz"
    ase.io.write(path, read_frames(ethanol_xtb_path()).atoms(1700), format="extxyz")
    return path


def test_jax_md_nve(ethanol_members, structure, tmp_path, capsys):
    out = tmp_path / "traj.extxyz"
    assert md.main([str(ethanol_members[0]), str(structure), "--steps", "200",
                    "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "jax-md nve: 9 atoms, 200 steps x 1 replica(s) at" in printed and "drift" in printed
    summary = json.loads((tmp_path / "traj.extxyz.json").read_text())
    assert summary["compiles"] == 1 and summary["stopped"] is None
    assert summary["steps_per_s"] > 0 and abs(summary["drift_meV_per_atom_per_ps"][0]) < 1
    frames = ase.io.read(out, ":")
    assert len(frames) == 11 and frames[-1].info["step"] == 200
    assert (tmp_path / "traj.extxyz.png").stat().st_size > 10_000


def test_ase_engine(ethanol_members, structure, tmp_path):
    out = tmp_path / "ase.extxyz"
    assert md.main([str(ethanol_members[0]), str(structure), "--steps", "100",
                    "--engine", "ase", "--out", str(out), "--no-progress"]) == 0
    summary = json.loads((tmp_path / "ase.extxyz.json").read_text())
    assert summary["engine"] == "ase" and summary["steps"] == 100
    frames = ase.io.read(out, ":")
    assert len(frames) == 6 and frames[-1].get_forces().shape == (9, 3)


def test_nvt_replicas_and_committee(ethanol_members, structure, tmp_path):
    out = tmp_path / "nvt.extxyz"
    w0, w1, w2 = map(str, ethanol_members)
    assert md.main([w0, str(structure), "--ensemble", "nvt", "--thermostat", "nose-hoover",
                    "--steps", "100", "--replicas", "2", "--committee", w1, w2,
                    "--out", str(out), "--no-progress"]) == 0
    summary = json.loads((tmp_path / "nvt.extxyz.json").read_text())
    assert summary["ensemble"] == "nose-hoover" and summary["members"] == 3
    assert len(summary["energy_std_eV"][0]) == 2  # per replica
    assert len(ase.io.read(tmp_path / "nvt-1.extxyz", ":")) == 6


def test_an_exploding_run_stops_with_status_3(ethanol_members, structure, tmp_path, capsys):
    out = tmp_path / "boom.extxyz"
    code = md.main([str(ethanol_members[0]), str(structure), "--steps", "2000",
                    "--timestep-fs", "10", "--temperature", "1000", "--out", str(out),
                    "--no-progress"])
    assert code == 3
    assert "stopped at step" in capsys.readouterr().err
    summary = json.loads((tmp_path / "boom.extxyz.json").read_text())
    assert summary["stopped"]["step"] == summary["steps_done"] < 2000
    assert len(ase.io.read(out, ":")) == summary["steps_done"] // 20 + 1


def test_bad_input(ethanol_members, structure, tmp_path, capsys):
    w = str(ethanol_members[0])
    assert md.main([w, str(tmp_path / "none.xyz")]) == 2
    assert "none.xyz: no such structure file" in capsys.readouterr().err
    assert md.main([w, str(structure), "--engine", "ase", "--ensemble", "nvt"]) == 2
    assert "--engine ase runs NVE" in capsys.readouterr().err
    sulfur = tmp_path / "s.xyz"
    ase.io.write(sulfur, ase.Atoms("SH2", positions=[[0, 0, 0], [1.3, 0, 0], [0, 1.3, 0]]))
    assert md.main([w, str(sulfur), "--out", str(tmp_path / "t.extxyz")]) == 2
    assert "['S'] unknown" in capsys.readouterr().err
