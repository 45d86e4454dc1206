"""benchmarks.compare_runs: reading run folders, matched-epoch table, errors, figure."""

import json
from pathlib import Path

import pytest

from benchmarks.compare_runs import compare, main, read_run, table


def _run(folder, vals, *, column="val_mae", results=None, seconds=60.0):
    folder.mkdir(parents=True)
    lines = [f"epoch,train_loss,{column},lr,seconds"]
    lines += [f"{e},0.5,{v},0.001,{seconds}" for e, v in enumerate(vals, start=1)]
    (folder / "metrics.csv").write_text("\n".join(lines) + "\n")
    if results is not None:
        (folder / "results.json").write_text(json.dumps(results))
    return folder


def test_matched_epochs_best_and_test(tmp_path):
    done = _run(tmp_path / "a", [100.0, 60.0, 40.0, 45.0],
                results={"config": {"epochs": 4}, "test": {"mae_mev": 41.25}, "params": 1234})
    going = _run(tmp_path / "b", [90.0, 50.0])
    runs = [read_run(done), read_run(going, "wide")]
    assert runs[0].planned == 4 and runs[0].test == 41.25 and runs[0].params == 1234
    assert runs[1].planned is None and runs[1].test is None  # no results, no checkpoints
    s = compare(runs, [2, 3])
    a, b = s["runs"]
    assert a["val_at"] == {"2": 60.0, "3": 40.0} and (a["best_val"], a["best_epoch"]) == (40.0, 3)
    assert b["val_at"] == {"2": 50.0, "3": None} and b["label"] == "wide"
    assert a["hours"] == pytest.approx(4 * 60 / 3600) and b["epochs"] == 2
    text = table(s)
    assert "4/4" in text and "2/-" in text and "1,234" in text and "41.25" in text
    assert "40.0 (3)" in text and "meV" in text
    wide = next(line for line in text.splitlines() if line.startswith("wide"))
    assert wide.split()[4:7] == ["50.0", "-", "50.0"]  # val@2, val@3 (not reached), best


def test_potential_runs_compare_their_force_mae(tmp_path):
    run = read_run(_run(tmp_path / "p", [30.0, 20.0], column="val_force_mae_mev_ang",
                        results={"config": {"epochs": 2},
                                 "test": {"force_mae_mev_ang": 21.5}}))
    assert run.metric == "val_force_mae_mev_ang" and run.unit == "meV/Å" and run.test == 21.5


def test_bad_folders_are_named(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"empty: no metrics.csv"):
        read_run(tmp_path / "empty")
    bad = _run(tmp_path / "bad", [1.0, 2.0])
    (bad / "metrics.csv").write_text("epoch,val_mae\n1,3.0\n2,oops\n")
    with pytest.raises(ValueError, match=r"bad/metrics.csv, line 3: not a row of numbers"):
        read_run(bad)
    other = _run(tmp_path / "other", [1.0], column="score")
    with pytest.raises(ValueError, match="none of the validation columns"):
        read_run(other)
    assert main([str(bad), "--no-save"]) == 2
    assert "line 3" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(other), "--labels", "x", "y"])


def test_main_prints_and_draws(tmp_path, capsys):
    a = _run(tmp_path / "a", [100.0, 60.0])
    b = _run(tmp_path / "b", [80.0, 70.0, 65.0])
    out = tmp_path / "cmp.png"
    assert main([str(a), str(b), "--at", "1", "3", "--no-save", "--out", str(out),
                 "--x", "hours"]) == 0
    printed = capsys.readouterr().out
    assert "val@1" in printed and "val@3" in printed and f"wrote {out}" in printed
    assert out.stat().st_size > 1000 and out.read_bytes()[:4] == b"\x89PNG"


def test_finished_runs_of_one_split_are_ensembled(tmp_path):
    """The table adds the mean prediction's MAE of the finished runs of the first run's split
    (hand-computed), names a run of another split, and has no ensemble below two runs."""
    import numpy as np

    from mpattn.train.report import write_predictions

    def finished(name, pred_val, pred_test, ids=(1, 2)):
        folder = _run(tmp_path / name, [50.0], results={"config": {"epochs": 1}})
        true = np.array([1.0, 2.0])
        write_predictions(folder / "predictions.csv", {
            "val": (np.array(ids), np.array([5, 6]), true, np.asarray(pred_val)),
            "test": (np.array(ids) + 10, np.array([5, 6]), true, np.asarray(pred_test))})
        return folder

    a = finished("a", [1.010, 2.000], [1.0, 2.030])
    b = finished("b", [0.990, 2.020], [1.0, 1.990])
    c = finished("c", [1.0, 2.0], [1.0, 2.0], ids=(3, 4))
    going = _run(tmp_path / "going", [70.0])
    s = compare([read_run(x) for x in (a, going, b, c)], [1])
    ens = s["ensemble"]
    assert ens["members"] == ["a", "b"] and ens["left_out"] == ["c"]
    # mean predictions: val (1.000, 2.010) -> MAE 5 meV; test (1.000, 2.010) -> 5 meV
    assert ens["val"]["mae_mev"] == pytest.approx(5.0)
    assert ens["test"]["mae_mev"] == pytest.approx(5.0)
    text = table(s)
    assert "ensemble of a, b (mean prediction): val 5.00, test 5.00" in text
    assert "not in the ensemble (another split): c" in text
    assert compare([read_run(a), read_run(going)], [1])["ensemble"] is None


RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"


def test_old_run_folders_are_read_as_they_were_written():
    """Folders written before the one-engine refactor (benchmarks/results): a finished QM9 run
    (model "attention_potential", config["target"]), one still training when copied (no
    results.json, no checkpoints), a potential's run whose metrics.csv has no
    train_loss_low5; the finished runs of the cpu preset's split (the seed-1 run shares it)
    are ensembled."""
    done = read_run(RESULTS / "qm9_u0-cpu2-2026-11-24-vec64-silu-dn0.02-150epochs")
    assert (done.metric, done.unit, done.planned, done.params) == ("val_mae", "meV", 150,
                                                                   252813)
    assert done.test == pytest.approx(25.729, abs=1e-3) and done.rows[-1]["epoch"] == 150
    assert "train_loss_low5" in done.rows[0]
    going = read_run(RESULTS / "qm9_u0-cpu2-2026-11-23-vec128-150epochs-in-progress")
    assert going.planned is None and going.test is None and going.rows[-1]["epoch"] == 33
    pot = read_run(RESULTS / "ethanol_potential-cpu2-2026-11-23-default")
    assert pot.metric == "val_force_mae_mev_ang" and pot.unit == "meV/Å"
    assert pot.planned == 666 and pot.test == pytest.approx(8.756, abs=1e-3)
    assert "train_loss_low5" not in pot.rows[0] and len(pot.rows) == 480
    silu = read_run(RESULTS / "qm9_u0-cpu2-2026-11-24-vec64-silu-150epochs")
    seed1 = read_run(RESULTS / "qm9_u0-cpu2-2026-11-24-vec64-silu-dn0.02-seed1-150epochs")
    s = compare([done, going, silu, seed1], [10, 50])
    assert s["runs"][1]["val_at"] == {"10": going.at(10), "50": None}
    ens = s["ensemble"]
    assert ens["members"] == [done.label, silu.label, seed1.label] and ens["left_out"] == []
    assert ens["test"]["mae_mev"] < min(done.test, silu.test, seed1.test)  # the mean: lower
    text = table(s)
    assert "150/150" in text and "33/-" in text and "ensemble of" in text
