"""Tests of the peer benchmarks' own logic, without any peer installed: the split written for
the peers is the one ``experiments.potential`` trains on, in eV and Å; errors scored by hand;
the peers' logs read; venvs made once and reused; the worker's ASE-side measurements; the
PaiNN inputs and scoring by QM9 id; the summary table and plot."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks.peer_venvs import REQUIREMENTS, ensure_venv, worker_env
from benchmarks.peer_workers import apax_worker, mace_worker
from benchmarks.peer_workers.ase_side import md_speed, predict, write_report
from benchmarks.peers_painn import painn_inputs, score_predictions
from benchmarks.peers_potentials import (
    check_same_split,
    curve_from_metrics,
    format_rows,
    plot,
    reference,
    score,
    split_parts,
    summary_rows,
    write_parts,
)


@pytest.fixture(scope="module")
def ethanol_parts(tmp_path_factory):
    frames, parts, name = split_parts("ethanol_xtb")
    folder = tmp_path_factory.mktemp("parts")
    return frames, parts, name, folder, write_parts(frames, parts, folder)


# ---------------------------------------------------------------- split and units


def test_split_is_the_experiments_split(ethanol_parts):
    from experiments import potential_data
    from experiments.configs.potential import DATASETS

    frames, parts, name, _, ids = ethanol_parts
    assert name == "ethanol_xtb"
    assert {k: len(v) for k, v in ids.items()} == {"train": 950, "val": 50, "test": 1000}
    sizes = dict(DATASETS["ethanol_xtb"][1], test_size=None)
    again = potential_data.split(frames, sizes, 0, val_file=False, test_file=False)
    for part in ("train", "val", "test"):  # what experiments.potential writes to split.json
        assert ids[part] == frames.ids[again[part]].tolist()
    every = np.concatenate([ids[p] for p in ("train", "val", "test")])
    assert len(np.unique(every)) == 2000  # disjoint, all frames


def test_written_parts_keep_ev_and_angstrom(ethanol_parts):
    import ase.io

    frames, parts, _, folder, ids = ethanol_parts
    ref = reference(folder / "val.extxyz")
    index = parts["val"]
    np.testing.assert_array_equal(ref["energy"], frames.energy[index])
    forces = np.concatenate([frames.forces[frames.atom_index(int(i))] for i in index])
    np.testing.assert_allclose(ref["forces"], forces, rtol=0, atol=1e-9)
    atoms = ase.io.read(str(folder / "val.extxyz"), index=3)
    i = int(index[3])
    np.testing.assert_allclose(atoms.positions, frames.positions[frames.atom_index(i)],
                               atol=1e-9)
    assert atoms.get_potential_energy() == pytest.approx(frames.energy[i], abs=1e-9)
    assert atoms.info["frame_id"] == ids["val"][3]


def test_check_same_split(tmp_path, ethanol_parts):
    *_, folder, ids = ethanol_parts
    good = tmp_path / "split.json"
    good.write_text(json.dumps({"source": "x", "seed": 0, **ids, "test_unseen": []}))
    check_same_split(good, folder / "parts.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**ids, "test": ids["test"][::-1]}))
    with pytest.raises(RuntimeError, match="the test frames differ"):
        check_same_split(bad, folder / "parts.json")


# ---------------------------------------------------------------- metrics


def test_score_by_hand():
    ref = {"energy": np.array([1.0, 2.0]), "n_atoms": np.array([1, 2]),
           "forces": np.zeros((3, 3))}
    forces = np.zeros((3, 3))
    forces[0, 0], forces[2, 1] = 0.003, -0.006
    pred = {"energy": np.array([1.001, 1.998]), "n_atoms": np.array([1, 2]), "forces": forces}
    got = score(ref, pred)
    assert got["energy_mae_mev"] == pytest.approx(1.5)
    assert got["energy_mae_mev_per_atom"] == pytest.approx(1.0)  # (1/1 + 2/2) / 2
    assert got["force_mae_mev_ang"] == pytest.approx(9.0 / 9)  # (3 + 6) meV over 9 components
    with pytest.raises(ValueError, match="do not match the 2 reference frames"):
        score(ref, dict(pred, n_atoms=np.array([2, 1])))


def test_score_predictions_by_id():
    got = score_predictions([10, 20, 30], [1.0, 2.0, 3.0], [3, 4, 5], [30, 10, 20],
                            [3.003, 1.0, 2.0])
    assert got["mae_mev"] == pytest.approx(1.0)  # 3 meV on one of three, after re-ordering
    with pytest.raises(ValueError, match="do not cover the 3 test molecules"):
        score_predictions([10, 20, 30], [1, 2, 3], [3, 4, 5], [10, 10, 20], [1, 2, 3])
    with pytest.raises(ValueError, match="do not cover"):
        score_predictions([10, 20, 30], [1, 2, 3], [3, 4, 5], [10, 20], [1, 2])


def test_painn_inputs_follow_the_split(qm9_molset):
    from mpattn.data.qm9 import make_split
    from mpattn.train import PropertyTask

    starts = np.concatenate([[0], np.cumsum(qm9_molset.n_atoms)])
    no_fluorine = [qm9_molset.ids[g] for g in range(len(qm9_molset))  # F in training only
                   if 9 not in qm9_molset.z[starts[g]:starts[g + 1]]]
    split = make_split(no_fluorine, sizes=(300, 50, 100), seed=0)
    prepared = PropertyTask().prepare(qm9_molset, split)
    x = painn_inputs(qm9_molset, split, prepared.transform)
    np.testing.assert_array_equal(x["ids"][x["train"]], split.train)
    np.testing.assert_array_equal(x["ids"][x["test"]], split.test)
    assert len(x["z"]) == x["n_atoms"].sum() == len(x["positions"])
    k = int(x["test"][2])  # a test molecule's U0 (eV) and atoms, by id
    i = int(qm9_molset.index_of([x["ids"][k]])[0])
    assert x["energy"][k] == qm9_molset.targets["U0"][i]
    start = int(x["n_atoms"][:k].sum())
    a = slice(int(starts[i]), int(starts[i + 1]))
    np.testing.assert_array_equal(x["z"][start:start + x["n_atoms"][k]], qm9_molset.z[a])
    coef = dict(zip(prepared.transform.elements, prepared.transform.coef, strict=True))
    assert x["atomrefs"][6] == coef[6] and x["atomrefs"][1] == coef[1]
    assert x["atomrefs"][0] == 0.0


# ---------------------------------------------------------------- the peers' logs


def test_mace_log_rows(tmp_path):
    log = tmp_path / "mace.log"
    log.write_text(
        "2026-12-02 03:00:00.123 INFO: Started training\n"
        "2026-12-02 03:00:10.000 INFO: Initial: head: Default, loss=1.0, MAE_E=  50.00 meV, "
        "MAE_F= 400.00 meV / A\n"
        "2026-12-02 03:00:40.000 INFO: Epoch 0: head: Default, loss=0.5, MAE_E=  20.00 meV, "
        "MAE_F= 120.50 meV / A\n"
        "2026-12-02 03:01:10.000 INFO: Epoch 1: head: Default, loss=0.4, MAE_E=  10.00 meV, "
        "MAE_F=  80.25 meV / A\n")
    rows = mace_worker.read_log(log)
    assert [(e, f) for _, e, f in rows] == [(-1, 400.0), (0, 120.5), (1, 80.25)]
    assert rows[2][0] - rows[0][0] == 60.0


def test_mace_settings_scale_stage_two_with_epochs(tmp_path):
    s = mace_worker.settings(tmp_path, 20, 0)
    assert s[s.index("--max_num_epochs") + 1] == "20"
    assert s[s.index("--start_swa") + 1] == "16"
    assert s[s.index("--train_file") + 1] == str(tmp_path / "train.extxyz")


def test_apax_log_rows(tmp_path):
    (tmp_path / "log.csv").write_text("epoch,train_loss,val_energy_mae,val_forces_mae,"
                                      "epoch_time\n0,1.0,0.05,0.200,30.0\n1,0.5,0.02,0.0805,"
                                      "2.5\n")
    assert apax_worker.read_log(tmp_path / "log.csv") == [(30.0, 200.0), (2.5, 80.5)]


def test_curve_from_metrics_is_cumulative(tmp_path):
    (tmp_path / "metrics.csv").write_text(
        "epoch,step,val_force_mae_mev_ang,seconds\n1,10,50.0,2.0\n2,20,40.0,1.5\n")
    assert curve_from_metrics(tmp_path / "metrics.csv") == [[2.0, 50.0], [3.5, 40.0]]


# ---------------------------------------------------------------- venvs


def test_ensure_venv_makes_once_and_reuses(tmp_path):
    calls = []

    def fake_run(cmd, check):
        calls.append(cmd)
        if cmd[1:3] == ["-m", "venv"]:
            (tmp_path / "apax" / "bin").mkdir(parents=True)
            (tmp_path / "apax" / "bin" / "python").write_text("")

    python = ensure_venv("apax", tmp_path, log=lambda _m: None, run=fake_run)
    assert python == tmp_path / "apax" / "bin" / "python"
    assert calls[1][-len(REQUIREMENTS["apax"]):] == REQUIREMENTS["apax"]
    assert len(calls) == 2
    ensure_venv("apax", tmp_path, log=lambda _m: None, run=fake_run)
    assert len(calls) == 2  # the marker says it holds them: nothing run
    marker = tmp_path / "apax" / "mpattn-peer.json"
    marker.write_text(json.dumps({"requirements": ["apax==0.0.1"]}))
    ensure_venv("apax", tmp_path, log=lambda _m: None, run=fake_run)
    assert len(calls) == 3 and calls[2][1:4] == ["-m", "pip", "install"]  # no new venv
    with pytest.raises(KeyError, match="known: mace, apax, schnetpack"):
        ensure_venv("nequip", tmp_path, run=fake_run)


def test_worker_env_drops_ours():
    env = worker_env({"PATH": "/bin", "PYTHONPATH": "/x", "GLIBC_TUNABLES": "glibc.malloc",
                      "VIRTUAL_ENV": "/v", "OMP_NUM_THREADS": "2"})
    assert env == {"PATH": "/bin", "OMP_NUM_THREADS": "2"}


# ---------------------------------------------------------------- the ASE side


def test_predict_and_md_speed_through_a_calculator(ethanol_parts, tmp_path):
    import ase.io
    from ase.calculators.emt import EMT

    *_, folder, _ = ethanol_parts
    few = tmp_path / "few.extxyz"
    images = ase.io.read(str(folder / "val.extxyz"), index=":3")
    ase.io.write(str(few), images, format="extxyz")
    got = predict(EMT(), few)
    expected = []
    for atoms in images:
        atoms.calc = EMT()
        expected.append(atoms.get_potential_energy())
    np.testing.assert_allclose(got["energy"], expected, rtol=1e-12)
    assert got["forces"].shape == (27, 3) and list(got["n_atoms"]) == [9, 9, 9]
    speed = md_speed(EMT(), few, steps=4, warmup=1)
    assert speed["atoms"] == 9 and speed["steps"] == 4 and speed["steps_per_s"] > 0
    assert speed["finite"]
    out = write_report(tmp_path / "lib", {"library": "emt", "curve": [[1.0, 5.0]]},
                       {"test": got})
    report = json.loads(out.read_text())
    assert report["library"] == "emt" and "test" in report["predict_seconds"]
    np.testing.assert_array_equal(np.load(tmp_path / "lib" / "predictions.npz")[
        "test_n_atoms"], [9, 9, 9])


def test_summary_table_and_plot(ethanol_parts, tmp_path):
    *_, folder, _ = ethanol_parts
    ref = reference(folder / "val.extxyz")
    reports = {}
    for k, lib in enumerate(("mpattn", "peer")):
        pred = dict(ref, energy=ref["energy"] + 0.001 * (k + 1))  # 1 and 2 meV off
        pred = {"energy": pred["energy"], "forces": ref["forces"], "n_atoms": ref["n_atoms"],
                "seconds": 1.0}
        reports[lib] = {"library": lib, "model": lib, "params": 10, "epochs": 3,
                        "train_seconds": 60.0, "train_frames_per_s": 100.0,
                        "curve": [[10.0, 50.0], [60.0, 20.0 + k]],
                        "md": [{"structure": "first", "atoms": 9, "steps_per_s": 100.0}]}
        write_report(tmp_path / lib, reports[lib], {"val": pred})
    rows = summary_rows(reports, folder, tmp_path, parts=("val",))
    assert [r["val"]["energy_mae_mev"] for r in rows] == pytest.approx([1.0, 2.0])
    assert rows[1]["best_val_force_mae_mev_ang"] == 21.0
    assert rows[0]["train_frames_per_s"] == pytest.approx(950 * 3 / 60.0)  # the same rule
    lines = format_rows(rows, part="val")
    assert lines[1].split()[0] == "mpattn" and "1.00" in lines[1] and "2.00" in lines[2]
    path = plot({lib: r["curve"] for lib, r in reports.items()}, rows, tmp_path / "p.png",
                "t", part="val")
    assert path.stat().st_size > 1000


def test_beside_adds_an_earlier_result_of_the_same_comparison_only(tmp_path):
    """``--beside``: an earlier result's rows join, marked with their file and machine,
    except libraries this run has; another split or budget is refused by name."""
    from benchmarks.peers_potentials import beside_rows

    split = {"train": 950, "val": 50, "test": 1000}
    earlier = {"machine": {"device": "cpu2", "date": "2026-12-02"}, "data": "ethanol_xtb",
               "minutes": 10.0, "split": split,
               "rows": [{"library": "mpattn", "test": {"force_mae_mev_ang": 7.7}},
                        {"library": "mace", "test": {"force_mae_mev_ang": 11.1}}],
               "curves": {"mpattn": [[60.0, 9.0]], "mace": [[60.0, 12.0]]}}
    path = tmp_path / "earlier.json"
    path.write_text(json.dumps(earlier))
    rows, curves = beside_rows(path, "ethanol_xtb", 10.0, split, skip={"mpattn"})
    assert [r["library"] for r in rows] == ["mace"] and list(curves) == ["mace"]
    assert rows[0]["from"] == "earlier.json (cpu2, 2026-12-02)"
    assert rows[0]["test"]["force_mae_mev_ang"] == 11.1
    with pytest.raises(ValueError, match=r"earlier.json: ethanol_xtb, 10 min.*this run: "
                                         r"ethanol_xtb, 40 min"):
        beside_rows(path, "ethanol_xtb", 40.0, split)
    with pytest.raises(ValueError, match="earlier.json: ethanol_xtb.*this run: spice_like"):
        beside_rows(path, "spice_like_xtb", 10.0, split)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="bad.json: not a peers_potentials result"):
        beside_rows(tmp_path / "bad.json", "ethanol_xtb", 10.0, split)


def test_painn_is_compared_at_equal_time_only(capsys):
    from benchmarks.peers import main

    with pytest.raises(SystemExit):
        main(["--models", "painn", "--no-save"])
    assert "--models painn is compared at equal time: give --minutes" in capsys.readouterr().err


def test_our_models_are_labelled_and_checked(capsys):
    """``--ours`` names any registered model; the attention model keeps the label ``mpattn``
    that the results written before so3krates became the default join on."""
    from benchmarks.peers_potentials import main, ours_label

    assert ours_label("attention") == "mpattn"
    assert ours_label("so3krates") == "mpattn-so3krates"
    with pytest.raises(SystemExit):
        main(["--ours", "gat", "--no-save"])
    assert "argument --ours: invalid choice: 'gat'" in capsys.readouterr().err
