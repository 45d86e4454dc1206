"""benchmarks.error_analysis: charge classes of QM9 SMILES, per-class errors, worst molecules,
and its errors for runs of another split or without predictions."""

import re
from pathlib import Path

import numpy as np
import pytest

from benchmarks.error_analysis import analyse, charge_class, main, table
from mpattn.data.cache import save_molset
from mpattn.train.report import write_predictions


@pytest.mark.parametrize("smiles, expected", [
    ("[NH3+]CCCCCC([O-])=O", "zwitterion"),          # QM9 id 123126
    ("NC(N)=[NH+][C-](C#C)C#N", "zwitterion"),       # QM9 id 57737
    ("C12C3C4C1C1C2C3C41", "neutral"),               # cubane, QM9 id 19116
    ("CC(C)C-C", "neutral"),                          # "-" outside brackets is a bond
    ("[NH4+]", "ion"),
    ("[O-][N+2][O-]", "zwitterion"),
    ("[C--]=[N+]=[N+]", "zwitterion"),
    ("[CH3:1][N+:2](C)(C)C", "ion"),                  # charge before the atom-map number
])
def test_charge_class(smiles, expected):
    assert charge_class(smiles) == expected


def _preds(ids, errors_mev, n_atoms=None):
    ids = np.asarray(ids)
    true = -100.0 - ids * 1e-3
    return {"id": ids, "n_atoms": np.asarray(n_atoms if n_atoms is not None else [9] * len(ids)),
            "true": true, "pred": true + np.asarray(errors_mev) / 1000.0}


def test_classes_and_worst_molecules_by_hand():
    smiles = {1: "CC", 2: "[NH3+]CC([O-])=O", 3: "CO", 4: "C#N"}
    a = _preds([1, 2, 3, 4], [10.0, -400.0, 20.0, 30.0])
    b = _preds([4, 3, 2, 1], [10.0, -20.0, 200.0, 30.0])  # another order: matched by id
    out = analyse({"a": a, "b": b}, smiles.get, top=2)
    assert out["n"] == 4
    assert out["mae_mev"]["a"] == pytest.approx(115.0) and out["mae_mev"]["b"] == pytest.approx(65)
    z, n = out["classes"]["zwitterion"], out["classes"]["neutral"]
    assert (z["n"], n["n"]) == (1, 3) and "ion" not in out["classes"]
    assert z["mae_mev"] == pytest.approx({"a": 400.0, "b": 200.0})
    assert n["mae_mev"] == pytest.approx({"a": 20.0, "b": 20.0})
    assert z["share"]["a"] == pytest.approx(400 / 460)
    assert n["share"]["b"] == pytest.approx(60 / 260)
    worst = out["worst"]
    assert [w["id"] for w in worst] == [2, 1]  # mean |error| 300, then 20 (ties: id order)
    assert worst[0]["error_mev"] == pytest.approx({"a": -400.0, "b": 200.0})
    assert worst[0]["class"] == "zwitterion" and worst[0]["smiles"] == smiles[2]
    mol = out["_molecules"]  # per molecule in id order, for the figure
    np.testing.assert_allclose(mol["mean_abs_mev"], [20.0, 300.0, 20.0, 20.0])
    assert list(mol["class"]) == ["neutral", "zwitterion", "neutral", "neutral"]
    text = table(out)
    assert "zwitterion" in text and "400.0 (87.0%)" in text and "[NH3+]CC([O-])=O" in text
    # the mean prediction's errors by id: 20, -100, 0, 20; the spread |a - b| / 2: 10, 300, 20, 10
    ens = out["ensemble"]
    assert ens["runs"] == 2 and ens["mae_mev"] == pytest.approx(35.0)
    assert ens["spread_mev"] == pytest.approx(85.0)
    assert ens["classes"]["zwitterion"] == pytest.approx({"mae_mev": 100.0, "spread_mev": 300.0})
    assert ens["classes"]["neutral"] == pytest.approx({"mae_mev": 40 / 3, "spread_mev": 40 / 3})
    # ranks with ties averaged: spread 1.5, 4, 3, 1.5 and |error| 2.5, 4, 1, 2.5 -> 1.5 / 4.5
    assert ens["spearman_spread_error"] == pytest.approx(1 / 3)
    assert ens["widest"] == pytest.approx({"fraction": 0.05, "n": 1, "mae_mev": 100.0,
                                           "rest_mae_mev": 40 / 3, "share": 100 / 140,
                                           "zwitterions": 1})
    assert "the mean prediction of the 2 runs: MAE 35.0 meV" in text
    assert "Spearman 0.33" in text and "MAE 100.0 meV against 13.3 for the rest" in text
    assert "ensemble" not in analyse({"a": a}, smiles.get)
    with pytest.raises(ValueError, match=r"run 'c' has other molecules than 'a' \(not the "
                                         "same split\\)"):
        analyse({"a": a, "c": _preds([1, 2, 3, 5], [0.0] * 4)}, smiles.get)


def test_command_line_on_a_real_qm9_slice(qm9_molset, tmp_path, capsys):
    cache = tmp_path / "slice.npz"
    save_molset(qm9_molset, cache)
    ids = np.asarray(qm9_molset.ids[:6])
    n_atoms = np.asarray(qm9_molset.n_atoms[:6])
    true = -10.0 - np.arange(6)
    run = tmp_path / "run"
    run.mkdir()
    write_predictions(run / "predictions.csv", {
        "val": (ids[:2], n_atoms[:2], true[:2], true[:2]),
        "test": (ids, n_atoms, true, true + np.array([0.5, 0, 0, 0, 0, 0.1]))})
    assert main([str(run), "--dataset-cache", str(cache), "--no-save", "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert "6 molecules" in out and "100.0" in out  # MAE (500 + 100) / 6 meV
    lines = [line for line in out.splitlines() if line.startswith("  id")]
    assert len(lines) == 2 and f"id {ids[0]:>6}" in lines[0] and "+500" in lines[0]
    assert qm9_molset.smiles[0] in lines[0]
    fig = tmp_path / "errors.png"
    assert main([str(run), "--dataset-cache", str(cache), "--no-save", "--out", str(fig)]) == 0
    assert fig.stat().st_size > 5000 and f"wrote {fig}" in capsys.readouterr().out
    # no predictions, or molecules the dataset lacks: a clear error
    assert main([str(tmp_path / "none"), "--dataset-cache", str(cache), "--no-save"]) == 2
    assert "no predictions.csv" in capsys.readouterr().err
    other = tmp_path / "other"
    other.mkdir()
    write_predictions(other / "predictions.csv", {"test": (np.array([999_999]), np.array([9]),
                                                           np.array([1.0]), np.array([1.0]))})
    assert main([str(other), "--dataset-cache", str(cache), "--no-save"]) == 2
    assert "QM9 id 999999 of the predictions is not in the dataset" in capsys.readouterr().err
    (other / "results.json").write_text('{"target": "mu", "test": {"mae": 0.1}}')
    assert main([str(other), "--dataset-cache", str(cache), "--no-save"]) == 2
    assert "its target is not an energy" in capsys.readouterr().err
    assert main([str(run), str(other), "--labels", "x", "--no-save"]) == 2
    assert "one distinct label per run" in capsys.readouterr().err


def test_a_run_still_training_is_read_from_its_best_checkpoint(qm9_molset, tmp_path, capsys):
    """Without predictions.csv (a run still training) the best checkpoint predicts the split's
    part: the same values the finished run wrote, matched to the dataset's truth."""
    from benchmarks.error_analysis import _read
    from experiments.qm9_u0 import run as run_qm9
    from mpattn.models import default_config
    from mpattn.train import PropertyTask, TrainConfig

    cache = tmp_path / "slice.npz"
    save_molset(qm9_molset, cache)
    run = tmp_path / "run"
    # the step schedule and no EMA: the TrainConfig defaults this run was written with
    run_qm9(TrainConfig(model="schnet", epochs=2, batch_size=32, seed=1, schedule="step",
                        ema_decay=None), PropertyTask(), workdir=run,
            sizes=(300, 60, 100), dataset_cache=cache, progress=False, log=lambda *_: None,
            model_config=default_config("schnet", interactions=2, dim=32, num_filters=32,
                                        num_rbf=16))
    finished, source = _read(run, "test")
    assert source == "predictions.csv"
    (run / "predictions.csv").rename(tmp_path / "kept.csv")
    with pytest.raises(ValueError, match="no predictions.csv"):
        _read(run, "test")  # without the dataset, nothing to predict
    training, source = _read(run, "test", qm9_molset)
    assert re.fullmatch(r"still training, its best checkpoint \(epoch [12]\)", source)
    assert f"{run}: {source}" in capsys.readouterr().out
    o, p = np.argsort(finished["id"]), np.argsort(training["id"])
    np.testing.assert_array_equal(finished["id"][o], training["id"][p])
    np.testing.assert_array_equal(finished["n_atoms"][o], training["n_atoms"][p])
    # the CSV keeps 6 decimals (µeV)
    np.testing.assert_allclose(training["true"][p], finished["true"][o], rtol=0, atol=1e-6)
    np.testing.assert_allclose(training["pred"][p], finished["pred"][o], rtol=0, atol=1e-4)
    assert main([str(run), "--dataset-cache", str(cache), "--no-save"]) == 0
    assert "100 molecules" in capsys.readouterr().out
    (run / "split.json").unlink()
    assert main([str(run), "--dataset-cache", str(cache), "--no-save"]) == 2
    assert "neither predictions.csv nor split.json" in capsys.readouterr().err


#: a finished run written before the one-engine refactor (model "attention_potential", the
#: target under config["target"], no results["task"])
OLD_RUN = (Path(__file__).resolve().parent.parent / "benchmarks" / "results"
           / "qm9_u0-cpu2-2026-11-24-vec64-silu-dn0.02-150epochs")


def test_an_old_finished_run_is_read_from_its_predictions():
    import json

    from benchmarks.error_analysis import _read

    results = json.loads((OLD_RUN / "results.json").read_text())
    assert results["config"]["model"] == "attention_potential" and "task" not in results
    preds, source = _read(OLD_RUN, "test")
    assert source == "predictions.csv"
    assert len(preds["id"]) == results["split_sizes"][2] == 5000
    mae = 1000 * np.mean(np.abs(preds["pred"] - preds["true"]))
    np.testing.assert_allclose(mae, results["test"]["mae_mev"], rtol=1e-4)
    val, _ = _read(OLD_RUN, "val")
    assert len(val["id"]) == 1000
