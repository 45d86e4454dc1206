"""The user-facing predictor on a tiny SchNet trained on the real 500-molecule QM9 slice:
agreement with the training engine's own evaluation, invariances, the compile count, bad
input and the command line."""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms

from mpattn.data.cache import save_molset
from mpattn.models import default_config
from mpattn.predict import Ensemble, Predictor, load_ensemble, load_predictor, main
from mpattn.train import PropertyTask, TrainConfig

TINY = {"interactions": 2, "dim": 32, "num_filters": 32, "num_rbf": 16, "cutoff": 5.0}
SIZES = (300, 60, 100)  # seed 1 puts the slice's only F molecule in train
# the QM9 trainer's settings when these tests were written (no EMA then)
CONFIG = TrainConfig(model="schnet", epochs=2, batch_size=32, lr=1e-3, schedule="cosine",
                     seed=1, ema_decay=None)
TASK = PropertyTask(target="U0")


@pytest.fixture(scope="module")
def workdir(qm9_molset, tmp_path_factory) -> Path:
    """A tiny SchNet run (2 epochs) written by the experiment driver."""
    from experiments.qm9_u0 import run

    root = tmp_path_factory.mktemp("predict")
    save_molset(qm9_molset, root / "qm9-slice.npz")
    run(CONFIG, TASK, workdir=root / "run", sizes=SIZES, dataset_cache=root / "qm9-slice.npz",
        model_config=default_config("schnet", **TINY), progress=False, log=lambda *_: None)
    return root / "run"


@pytest.fixture(scope="module")
def second_workdir(workdir) -> Path:
    """Another tiny SchNet run (seed 2: other initial weights and split) for ensembles."""
    from experiments.qm9_u0 import run

    run(dataclasses.replace(CONFIG, seed=2), TASK, workdir=workdir.parent / "run2", sizes=SIZES,
        dataset_cache=workdir.parent / "qm9-slice.npz",
        model_config=default_config("schnet", **TINY), progress=False, log=lambda *_: None)
    return workdir.parent / "run2"


@pytest.fixture(scope="module")
def predictor(workdir) -> Predictor:
    return load_predictor(workdir)


@pytest.fixture(scope="module")
def test_split(qm9_molset, workdir):
    """The run's test molecules (ids from split.json) as a MoleculeSet and as ase.Atoms."""
    ids = json.loads((workdir / "split.json").read_text())["test"]
    ms = qm9_molset.subset(qm9_molset.index_of(ids))
    return ms, ms.to_atoms()


def test_predictor_agrees_with_the_eval_step(qm9_molset, workdir, predictor, test_split):
    """The predictor's U0 of the test molecules equals the Trainer's own test predictions
    from the same (best) checkpoint. SchNet reads only elements and distances, so the bonds
    that the predictor perceives from geometry (training used the SMILES template) cannot
    make them differ; padding budgets and batch composition differ and must not matter."""
    from mpattn.data.qm9 import load_split
    from mpattn.train import Trainer

    split = load_split(workdir / "split.json")
    data = TASK.prepare(qm9_molset, split, CONFIG)
    trainer = Trainer(CONFIG, TASK, data, workdir,
                      model_config=default_config("schnet", **TINY), log=lambda *_: None)
    trainer.restore("best")
    expected = trainer.report(data.test)["_pred"]  # decoded: U0 in eV
    ms, atoms = test_split
    got = predictor(atoms)
    assert got.dtype == np.float64 and got.shape == (len(ms),)
    assert np.all(np.abs(got) > 1e3)  # the full U0 in eV, reference included
    np.testing.assert_allclose(got, expected, rtol=1e-7, atol=1e-3)
    assert (predictor.target, predictor.unit) == ("U0", "eV")
    assert predictor.config == CONFIG and predictor.task == TASK
    assert predictor.model_config == default_config("schnet", **TINY)
    assert predictor.step == trainer.checkpoints.best_step()
    # the model is a real fit: far better than the per-element reference alone
    true = ms.targets["U0"]
    ref = predictor.transform.reference(trainer.data.test.counts) + predictor.transform.mean
    assert np.abs(got - true).mean() < np.abs(ref - true).mean()


def test_order_and_batch_size_do_not_change_predictions(predictor, test_split):
    atoms = test_split[1][:40]
    base = predictor(atoms, batch_size=64)
    perm = np.random.default_rng(0).permutation(len(atoms))
    shuffled = predictor([atoms[i] for i in perm], batch_size=7)
    np.testing.assert_allclose(shuffled, base[perm], rtol=1e-7, atol=1e-4)
    single = predictor(atoms[3])
    assert single.shape == (1,)
    np.testing.assert_allclose(single, base[3:4], rtol=1e-7, atol=1e-4)
    assert predictor([]).shape == (0,)


def test_compiles_once_per_budget(workdir, test_split):
    fresh = load_predictor(workdir)
    _, atoms = test_split
    for lo in (0, 20, 40):  # three calls on similarly sized inputs
        fresh(atoms[lo:lo + 20], batch_size=10)
    assert 1 <= fresh._forward._cache_size() == len(fresh.budgets_used) <= 3
    assert all(b.n_graph == 11 and b.n_node % 64 == 0 and b.n_edge % 64 == 0
               for b in fresh.budgets_used)


def test_unknown_element_is_named(predictor, test_split):
    _, atoms = test_split
    chloro = Atoms("CH3Cl", positions=[[0, 0, 0], [0.63, 0.63, 0.63], [-0.63, -0.63, 0.63],
                                       [-0.63, 0.63, -0.63], [1.0, -1.0, -1.0]])
    with pytest.raises(ValueError, match=r"molecule 1 \(CH3Cl\): element\(s\) Cl never seen "
                                         r"by the model \(it knows H, C, N, O, F\)"):
        predictor([atoms[0], chloro])


def test_workdir_without_checkpoints(tmp_path, workdir):
    with pytest.raises(ValueError, match=rf"cannot load a run from {tmp_path}: "
                                         rf"{tmp_path / 'checkpoints'}: missing checkpoints"):
        load_predictor(tmp_path)
    with pytest.raises(ValueError, match=rf"{tmp_path / 'nowhere'}: no such workdir"):
        load_predictor(tmp_path / "nowhere")
    damaged = tmp_path / "damaged"
    shutil.copytree(workdir, damaged)
    for f in (damaged / "checkpoints").rglob("state/*"):  # the arrays, metadata intact
        if f.is_file():
            f.write_bytes(b"garbage")
    with pytest.raises(ValueError, match=rf"cannot load a run from {damaged}: .*"
                                         "damaged checkpoint, nothing restored"):
        load_predictor(damaged, which="latest")
    for f in (damaged / "checkpoints").rglob("*"):  # everything, orbax's own files included
        if f.is_file():
            f.write_bytes(b"garbage")
    with pytest.raises(ValueError, match=rf"cannot load a run from {damaged}: "
                                         rf"{damaged / 'checkpoints'} is damaged"):
        load_predictor(damaged)
    with pytest.raises(ValueError, match="which must be 'best' or 'latest', got 'first'"):
        load_predictor(workdir, which="first")
    from mpattn.ase import Calculator

    with pytest.raises(ValueError, match="is a property model's run, not a potential's"):
        Calculator(workdir)


def test_command_line(workdir, predictor, test_split, tmp_path, capsys):
    import ase.io

    _, atoms = test_split
    xyz = tmp_path / "three.xyz"
    ase.io.write(xyz, atoms[:3])
    out = tmp_path / "pred.csv"
    assert main([str(workdir), str(xyz), "--out", str(out), "--batch-size", "2"]) == 0
    rows = list(csv.DictReader(out.open()))
    assert [r["formula"] for r in rows] == [a.get_chemical_formula() for a in atoms[:3]]
    assert [int(r["index"]) for r in rows] == [0, 1, 2] and {r["unit"] for r in rows} == {"eV"}
    # xyz stores positions with fewer digits than float32: compare at a meV
    np.testing.assert_allclose([float(r["U0"]) for r in rows],
                               predictor(ase.io.read(xyz, index=":")), rtol=0, atol=1e-9)
    np.testing.assert_allclose([float(r["U0"]) for r in rows], predictor(atoms[:3]),
                               rtol=0, atol=1e-3)
    assert "featurize" in capsys.readouterr().err  # progress bars on stderr by default
    assert main([str(workdir), str(xyz), "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "U0 [eV]" in captured.out and atoms[2].get_chemical_formula() in captured.out
    assert captured.err == ""

    assert main([str(workdir), str(tmp_path / "none.xyz")]) == 2
    assert f"error: molecules file {tmp_path / 'none.xyz'} does not exist" in \
        capsys.readouterr().err
    bad = tmp_path / "bad.xyz"
    bad.write_text("3\n\nC 0 0 zero\n")
    assert main([str(workdir), str(bad)]) == 2
    assert f"error: cannot read molecules from {bad}" in capsys.readouterr().err
    assert main([str(tmp_path / "nowhere"), str(xyz)]) == 2
    assert f"error: {tmp_path / 'nowhere'}: no such workdir" in capsys.readouterr().err


def test_load_run_is_lazy_on_the_package(workdir, predictor):
    """``mpattn.load_run`` (which replaced ``mpattn.load_predictor`` on the package) and
    ``mpattn.load_ensemble`` import JAX only when used; for a property run load_run gives
    the predictor load_predictor gives."""
    import subprocess
    import sys

    import jax

    import mpattn

    code = ("import sys, mpattn; assert 'jax' not in sys.modules, 'jax imported eagerly'; "
            "from mpattn.predict import load_ensemble; from mpattn.train.runs import load_run; "
            "assert mpattn.load_run is load_run; "
            "assert mpattn.load_ensemble is load_ensemble; print('LAZY')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "LAZY" in out.stdout, out.stderr[-2000:]
    run = mpattn.load_run(workdir)
    assert isinstance(run, Predictor) and (run.step, run.config) == (predictor.step,
                                                                     predictor.config)
    for a, b in zip(jax.tree.leaves(run.params), jax.tree.leaves(predictor.params), strict=True):
        np.testing.assert_array_equal(a, b)


def test_ensemble_is_the_mean_of_its_members(workdir, second_workdir, predictor, test_split):
    """Mean and spread against the members' own predictions (two runs: std = |a - b| / 2)."""
    _, atoms = test_split
    a, b = predictor(atoms), load_predictor(second_workdir)(atoms)
    assert np.abs(a - b).max() > 1e-3  # two different models, else the test proves nothing
    ens = load_ensemble([workdir, second_workdir])
    assert ens.names == [str(workdir), str(second_workdir)] and ens.target == "U0"
    # another batch size pads differently: float32 sums in another order (1e-5 eV = 0.01 meV)
    np.testing.assert_allclose(ens.predict_all(atoms, batch_size=7), [a, b], rtol=0, atol=1e-5)
    mean, spread = ens.predict(atoms)
    np.testing.assert_allclose(mean, (a + b) / 2, rtol=0, atol=1e-9)
    np.testing.assert_allclose(spread, np.abs(a - b) / 2, rtol=0, atol=1e-9)
    np.testing.assert_allclose(ens(atoms), mean, rtol=0, atol=1e-12)
    one_mean, one_spread = Ensemble([predictor]).predict(atoms[:5])
    np.testing.assert_allclose(one_mean, a[:5], rtol=0, atol=1e-5)  # other padding, as above
    assert np.all(one_spread == 0)
    assert ens.predict_all([]).shape == (2, 0)


def test_ensemble_bad_input(workdir, predictor, tmp_path):
    import copy

    with pytest.raises(ValueError, match="load_ensemble needs at least one workdir"):
        load_ensemble([])
    with pytest.raises(ValueError, match=rf"{workdir} is given twice"):
        load_ensemble([workdir, workdir])
    with pytest.raises(ValueError, match=rf"cannot load a run from {tmp_path}"):
        load_ensemble([workdir, tmp_path])
    gap = copy.copy(predictor)
    gap.target, gap.unit = "gap", "eV"
    with pytest.raises(ValueError, match=r"b predicts 'gap' \[eV\], a 'U0' \[eV\]: an "
                                         "ensemble needs one target"):
        Ensemble([predictor, gap], names=["a", "b"])
    with pytest.raises(ValueError, match="1 names for 2 members"):
        Ensemble([predictor, predictor], names=["a"])
    with pytest.raises(ValueError, match="at least one member"):
        Ensemble([])


def test_command_line_ensemble(workdir, second_workdir, test_split, tmp_path, capsys):
    import ase.io

    _, atoms = test_split
    xyz = tmp_path / "four.xyz"
    ase.io.write(xyz, atoms[:4])
    frames = ase.io.read(xyz, index=":")
    mean, spread = load_ensemble([workdir, second_workdir]).predict(frames)
    out = tmp_path / "pred.csv"
    assert main([str(workdir), str(second_workdir), str(xyz), "--out", str(out)]) == 0
    assert "(the mean of 2 runs, with their spread)" in capsys.readouterr().out
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == ["index", "formula", "U0", "U0_std", "unit"]
    np.testing.assert_allclose([float(r["U0"]) for r in rows], mean, rtol=0, atol=1e-9)
    np.testing.assert_allclose([float(r["U0_std"]) for r in rows], spread, rtol=0, atol=1e-9)
    assert main([str(workdir), str(second_workdir), str(xyz)]) == 0
    printed = capsys.readouterr().out
    assert "the mean of 2 runs' U0 [eV]" in printed and f"{spread[3]:10.6f}" in printed
    assert main([str(workdir), str(workdir), str(xyz)]) == 2
    assert "is given twice" in capsys.readouterr().err
