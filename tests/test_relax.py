"""mpattn.md.relax: batched FIRE reaches the minima ASE's FIRE reaches one structure at a
time, each structure converges on its own, structures of different sizes share a batch, and
bad input is named by its index; experiments.relax from the shell."""

from __future__ import annotations

import json

import ase
import ase.io
import numpy as np
import pytest
from ase.optimize import FIRE

from experiments import relax as relax_cmd
from mpattn.ase import Calculator
from mpattn.data.frames import ethanol_xtb_path, read_frames
from mpattn.md.relax import relax
from mpattn.train.runs import load_run

FMAX = 0.01


@pytest.fixture(scope="module")
def pot(ethanol_members):
    return load_run(ethanol_members[0])


@pytest.fixture(scope="module")
def structures():
    """Three ethanol frames, one with its O-H bond stretched, and the OH-fragment water
    (H, O only: a smaller structure in the same batch)."""
    frames = read_frames(ethanol_xtb_path())
    out = [frames.atoms(i) for i in (0, 400, 1300)]
    out[2].positions[out[2].get_chemical_symbols().index("O")] += [0.15, 0.1, 0.0]
    water = ase.Atoms("OH2", positions=[[0, 0, 0], [0.99, 0.05, 0], [-0.3, 0.95, 0.05]])
    return out + [water]


@pytest.fixture(scope="module")
def batched(pot, structures):
    return relax(pot, structures, fmax=FMAX, max_steps=2000, batch_size=3, progress=False)


def ase_fire(pot, atoms):
    a = atoms.copy()
    a.calc = Calculator.from_potential(pot)
    opt = FIRE(a, logfile=None)
    assert opt.run(fmax=FMAX, steps=2000)
    return a, opt.nsteps


def test_batched_fire_reaches_ase_fire_minima(pot, structures, batched):
    # two sizes (9 and 3 atoms: padded to 16 and 8): two groups, one compile each
    assert batched["converged"].all() and batched["compiles"] == 2
    for k, atoms in enumerate(structures):
        ref, nsteps = ase_fire(pot, atoms)
        got = batched["atoms"][k]
        assert got.info["converged"] and got.info["fmax"] < FMAX
        # ASE's FIRE step in JAX: the same steps, the same minimum (float32 forces)
        assert got.get_potential_energy() == pytest.approx(ref.get_potential_energy(),
                                                           abs=2e-4)
        np.testing.assert_allclose(got.get_all_distances(), ref.get_all_distances(),
                                   atol=2e-3)
        assert abs(got.info["relax_steps"] - nsteps) <= 2
        # a relaxation, not a no-op: the energy went down
        atoms = atoms.copy()
        atoms.calc = Calculator.from_potential(pot)
        assert got.get_potential_energy() < atoms.get_potential_energy() - 1e-3


def test_each_structure_stops_at_its_own_convergence(pot, structures, batched):
    steps = batched["steps"]
    assert len(set(steps.tolist())) > 1  # not all the batch's step count
    again = relax(pot, structures[:1], fmax=FMAX, max_steps=2000, progress=False)
    assert again["steps"][0] == steps[0]  # alone or in a batch: the same steps
    assert again["energies"][0] == pytest.approx(batched["energies"][0], abs=1e-5)


def test_max_steps_leaves_it_unconverged_and_flagged(pot, structures):
    r = relax(pot, structures[2:3], fmax=1e-4, max_steps=25, progress=False)
    assert not r["converged"][0] and r["steps"][0] == 25
    assert r["atoms"][0].info["converged"] is False or not r["atoms"][0].info["converged"]


def test_bad_structures_are_named(pot, structures):
    with pytest.raises(ValueError, match=r"structure 1: element\(s\) \['S'\] unknown"):
        relax(pot, [structures[0], ase.Atoms("SH2", positions=np.eye(3))], progress=False)
    squeezed = structures[0].copy()
    squeezed.positions[3] = squeezed.positions[0] + [0.1, 0, 0]
    with pytest.raises(ValueError, match="structure 0: atoms 0 and 3 overlap"):
        relax(pot, [squeezed], progress=False)
    with pytest.raises(ValueError, match="fmax > 0"):
        relax(pot, structures, fmax=0)


def test_relax_command(ethanol_members, structures, tmp_path, capsys):
    src = tmp_path / "in.extxyz"
    ase.io.write(src, structures, format="extxyz")
    out = tmp_path / "relaxed.extxyz"
    work = str(ethanol_members[0])
    assert relax_cmd.main([work, str(src), "--fmax", str(FMAX), "--max-steps", "2000",
                           "--out", str(out), "--no-progress"]) == 0
    frames = ase.io.read(out, ":")
    assert len(frames) == 4 and all(f.info["converged"] for f in frames)
    summary = json.loads((tmp_path / "relaxed.extxyz.json").read_text())
    assert summary["converged"] == 4 and summary["engine"] == "jax-md"
    out_ase = tmp_path / "ase.extxyz"
    assert relax_cmd.main([work, str(src), "--fmax", str(FMAX), "--max-steps", "2000",
                           "--out", str(out_ase), "--engine", "ase", "--no-progress"]) == 0
    by_ase = ase.io.read(out_ase, ":")
    np.testing.assert_allclose([f.get_potential_energy() for f in frames],
                               [f.get_potential_energy() for f in by_ase], atol=2e-4)
    assert "relaxed 4 structures" in capsys.readouterr().out
    # not converged: written, flagged, exit status 3
    assert relax_cmd.main([work, str(src), "--fmax", "1e-5", "--max-steps", "5",
                           "--out", str(tmp_path / "short.extxyz"), "--no-progress"]) == 3
    assert "did not converge" in capsys.readouterr().err
    assert relax_cmd.main([work, str(tmp_path / "missing.xyz"), "--no-progress"]) == 2
    assert "missing.xyz: no such structure file" in capsys.readouterr().err
