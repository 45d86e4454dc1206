"""benchmarks.sweep's own logic: the runs' command lines, launching, the ensemble, the table."""

from __future__ import annotations

import json
import stat
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks import sweep
from mpattn.train.report import read_predictions, write_predictions


def _args(*argv):
    return sweep.parse(["--dataset-cache", "qm9.npz", *argv])


def test_command_puts_the_variants_options_last_so_they_win():
    args = _args("--variants", "vec64-b32", "--minutes", "3", "--train-size", "500", "--",
                 "--lr", "5e-4")
    cmd = sweep.command("vec64-b32", args, Path("w"))
    assert cmd[1:4] == ["-m", "experiments.qm9_u0", "--preset"]
    assert json.loads(cmd[cmd.index("--model-config") + 1]) == {"vector_features": True,
                                                                "attention_weights": "softmax"}
    assert cmd[cmd.index("--time-budget-min") + 1] == "3"
    assert cmd[cmd.index("--train-size") + 1] == "500" and "--val-size" not in cmd
    assert "--epochs" not in cmd  # planned from the budget
    # the sweep's batch 64 first, the variant's batch 32 after it (argparse keeps the last)
    sizes = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--batch-size"]
    assert sizes == ["64", "32"]
    assert cmd[-2:] == ["--lr", "5e-4"]
    wide = sweep.command("vec128", _args("--epochs", "5"), Path("w"))
    assert json.loads(wide[wide.index("--model-config") + 1]) == {
        "vector_features": True, "attention_weights": "softmax", "dim": 128, "num_heads": 8,
        "ff_dim": 256}
    assert wide[wide.index("--epochs") + 1] == "5"


def test_parse_rejects_bad_variant_lists(capsys):
    with pytest.raises(SystemExit):
        _args("--variants", "vec64", "vec64")
    assert "names a run twice" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _args("--variants", "vec65")
    assert "invalid choice: 'vec65'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _args("--cores-per-run", "0")
    assert "must be >= 1" in capsys.readouterr().err


def test_core_slots_share_a_cpu_and_leave_an_accelerator_alone():
    gpu = _args()
    assert sweep.core_slots(gpu, "NVIDIA-H100", [0, 1]) is None
    assert gpu.concurrency == len(sweep.DEFAULT_VARIANTS)  # all at once on the device
    two = _args("--variants", "vec64", "vec64-wd")
    assert sweep.core_slots(two, "cpu2", [0, 1]) == [(0,), (1,)]  # one core each, together
    assert (two.concurrency, two.cores_per_run) == (2, 1)
    four = _args()  # 4 runs on 2 cores: 2 at a time, 1 core each
    assert sweep.core_slots(four, "cpu2", [4, 5]) == [(4,), (5,)] and four.concurrency == 2
    one = _args("--variants", "vec128")
    assert sweep.core_slots(one, "cpu16", list(range(16))) == [tuple(range(16))]
    wide = _args("--cores-per-run", "3", "--concurrency", "2")
    assert sweep.core_slots(wide, "cpu8", list(range(8))) == [(0, 1, 2), (3, 4, 5)]
    with pytest.raises(ValueError, match=r"2 runs at once of 2 cores each need 4 cores; this "
                                         r"process has 2 \(\[0, 1\]\)"):
        sweep.core_slots(_args("--cores-per-run", "2", "--concurrency", "2"), "cpu2", [0, 1])
    env = sweep.run_env((1,))
    assert sweep.ONE_THREAD in env["XLA_FLAGS"] and env["XLA_PYTHON_CLIENT_PREALLOCATE"]
    assert sweep.ONE_THREAD not in sweep.run_env((0, 1)).get("XLA_FLAGS", "")


def _predictions(ids, true, pred):
    n = np.full(len(ids), 9)
    return {"val": {"id": np.asarray(ids), "n_atoms": n, "true": np.asarray(true),
                    "pred": np.asarray(pred)},
            "test": {"id": np.asarray(ids), "n_atoms": n, "true": np.asarray(true),
                     "pred": np.asarray(pred)}}


def test_ensemble_averages_predictions_matched_by_id():
    # run a is 20 meV high on molecule 1 and 10 meV low on 2; run b lists them in the other
    # order and is 20 meV low and 30 meV high: the mean is 0 and +10 meV
    a = _predictions([1, 2], [-10.0, -20.0], [-9.98, -20.01])
    b = _predictions([2, 1], [-20.0, -10.0], [-19.97, -10.02])
    out = sweep.ensemble({"a": a, "b": b})
    assert out["members"] == ["a", "b"]
    assert out["test"]["mae_mev"] == pytest.approx(5.0, abs=1e-9)
    assert out["test"]["rmse_mev"] == pytest.approx(np.sqrt(50.0), abs=1e-9)
    with pytest.raises(ValueError, match="run 'c' has other val molecules than 'a'"):
        sweep.ensemble({"a": a, "c": _predictions([1, 3], [-10.0, -30.0], [-10.0, -30.0])})
    with pytest.raises(ValueError, match="at least 2 runs"):
        sweep.ensemble({"a": a})


STUB = """#!{python}
import json, os, sys
from pathlib import Path
argv = sys.argv
print("cores", sorted(os.sched_getaffinity(0)), "flags", os.environ.get("XLA_FLAGS", ""))
work = Path(argv[argv.index("--workdir") + 1])
if "--weight-decay" in argv:
    print("diverged"); sys.exit(3)
shift = 0.01 if "--batch-size" in argv[argv.index("--batch-size") + 2:] else -0.03
results = {{"params": 10, "epochs": 4, "best_epoch": 4, "train_mol_per_s": 123.0,
           "train_seconds": 1.0, "config": {{"epochs": 5, "batch_size": 64}},
           "val": {{"mae_mev": 1.0}}, "test": {{"mae_mev": 2.0, "rmse_mev": 3.0}}}}
(work / "results.json").write_text(json.dumps(results))
rows = [f"{{p}},{{i}},3,{{t}},{{t + shift}}" for p in ("val", "test")
        for i, t in ((1, -1.0), (2, -2.0))]
(work / "predictions.csv").write_text("\\n".join(["part,id,n_atoms,true,pred"] + rows))
print("ok")
"""


def test_sweep_runs_the_variants_and_reports_the_failed_one(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sweep, "device_name", lambda: "GPU-stub")  # no pinning
    stub = tmp_path / "fake_python"
    stub.write_text(STUB.format(python=sys.executable))
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    rc = sweep.main(["--variants", "vec64", "vec64-b32", "vec64-wd", "--concurrency", "2",
                     "--python", str(stub), "--results-dir", str(tmp_path / "res"),
                     "--tag", "t"])
    out = capsys.readouterr().out
    assert rc == 1  # one run failed
    assert "| vec64-wd | did not finish (status 3) |" in out
    # vec64 is 30 meV low, vec64-b32 10 meV high on both molecules: the mean is 10 meV low
    assert "| ensemble of 2 (mean prediction) | | | | 10.0 meV | 10.0 meV |" in out
    saved = json.loads(next((tmp_path / "res").glob("sweep-*.json")).read_text())
    assert [r["status"] for r in saved["runs"]] == [0, 0, 3]
    assert saved["ensemble"]["members"] == ["vec64", "vec64-b32"]
    work = Path(saved["runs"][2]["workdir"])
    assert work.name.endswith("-sweep-vec64-wd-t")
    log = (work / "log.txt").read_text()
    assert log.startswith("+ ") and "--weight-decay 0.05" in log and "diverged" in log
    # a second sweep into the same folders refuses to overwrite finished runs
    assert sweep.main(["--variants", "vec64", "--python", str(stub), "--results-dir",
                       str(tmp_path / "res"), "--tag", "t"]) == 2
    assert "hold results already" in capsys.readouterr().err


def test_predictions_written_by_a_run_feed_the_ensemble(tmp_path):
    for name, pred in (("a", [-1.002, -2.0]), ("b", [-0.998, -2.004])):
        write_predictions(tmp_path / f"{name}.csv",
                          {p: ([5, 6], [3, 4], [-1.0, -2.0], pred) for p in ("val", "test")})
    out = sweep.ensemble({n: read_predictions(tmp_path / f"{n}.csv") for n in "ab"})
    assert out["val"]["mae_mev"] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.skipif(not hasattr(__import__("os"), "sched_setaffinity"), reason="Linux only")
def test_on_a_cpu_each_run_gets_its_own_core(tmp_path, capsys, monkeypatch):
    import os

    core = sorted(os.sched_getaffinity(0))[0]
    monkeypatch.setattr(sweep, "device_name", lambda: "cpu1")
    monkeypatch.setattr(sweep, "available_cores", lambda: [core])
    stub = tmp_path / "fake_python"
    stub.write_text(STUB.format(python=sys.executable))
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    assert sweep.main(["--variants", "vec64", "vec64-b32", "--python", str(stub),
                       "--results-dir", str(tmp_path / "res"), "--epochs", "3",
                       "--no-save"]) == 0
    out = capsys.readouterr().out
    assert "2 runs, 1 at once (1 core(s) each), 3 epochs each" in out
    assert f"started vec64 on core(s) {core}:" in out
    for work in (tmp_path / "res").iterdir():  # one after the other, on the one core
        log = (work / "log.txt").read_text()
        assert f"cores [{core}] flags" in log and sweep.ONE_THREAD in log


def test_every_variant_builds_a_valid_model_config():
    """A typo in a variant's model config would only show when its run starts."""
    from mpattn.models import default_config

    for name, variant in sweep.VARIANTS.items():
        config = default_config("attention", **variant.model_config)
        for key, value in variant.model_config.items():
            assert getattr(config, key) == value, name


#: the attention weights each variant was measured with (before the one-engine refactor the
#: class default was softmax and the cpu preset set silu; now the class default is silu)
WEIGHTS = {"vec64": "softmax", "vec128": "softmax", "vec64-wd": "softmax",
           "vec64-b32": "softmax", "vec64-4blocks": "softmax", "vec64-cut6": "softmax",
           "vec64-ema4": "softmax", "vec64-sum": "softmax", "vec64-silu": "silu",
           "vec128-silu": "silu", "vec64-silu-dn": "silu", "vec128-silu-dn": "silu",
           "vec64-silu-dn-cut10": "silu", "vec64-silu-dn-cut10-es": "silu",
           "vec64-silu-dn-cut10-es-dip": "silu", "vec64-silu-dn-es30-dip": "silu",
           "vec64-silu-dn-es30-dip0.1": "silu"}


def test_every_variant_names_its_attention_weights():
    """The model's defaults moved under the variants (class default softmax -> silu, the cpu
    preset's silu gone): each states its weights, so that it trains the model it did."""
    assert set(WEIGHTS) == set(sweep.VARIANTS)
    for name, variant in sweep.VARIANTS.items():
        assert variant.model_config["attention_weights"] == WEIGHTS[name], name
        assert variant.model_config["vector_features"] is True, name


def test_the_runs_command_line_builds_each_variants_model_and_task():
    """experiments.qm9_u0 reads a variant's command line into the model config the variant
    names on top of the class defaults (the cpu preset adds nothing to the attention model),
    the cpu preset's training settings with the sweep's and the variant's options, and the
    auxiliary terms of its options."""
    import dataclasses

    from experiments import qm9_u0
    from experiments.configs.qm9 import PRESETS
    from mpattn.models import default_config
    from mpattn.train import Denoising, Dipole

    for name, variant in sweep.VARIANTS.items():
        cmd = sweep.command(name, _args("--variants", name, "--steps-per-call", "1"), Path("w"))
        config, task, model_config, sizes, plan = qm9_u0.settings(qm9_u0.parse(cmd[3:]),
                                                                  say=lambda *_: None)
        want = default_config("attention", **variant.model_config)
        options = dict(zip(variant.options[::2], variant.options[1::2], strict=True))
        if "--denoise-sigma" in options:  # the run switches the denoising head on
            want = dataclasses.replace(want, denoise=True)
        assert task.model_config(model_config) == want, name
        assert model_config.attention_weights == WEIGHTS[name], name
        assert config.model == "attention" and sizes == PRESETS["cpu"].sizes and plan, name
        assert config.batch_size == int(options.get("--batch-size", 64)), name
        assert config.weight_decay == float(options.get("--weight-decay", 0.0)), name
        assert config.ema_decay == float(options.get("--ema-decay", 0.999)), name
        assert (config.loss, config.lr, config.schedule) == ("l1", 1e-3, "cosine"), name
        aux = ()
        if "--denoise-sigma" in options:
            aux += (Denoising(float(options["--denoise-sigma"]), 0.1),)
        if "--dipole-weight" in options:
            aux += (Dipole(float(options["--dipole-weight"])),)
        assert task.aux == aux, name
        assert (task.target, task.reference) == ("U0", True), name


def test_summarise_reads_runs_written_before_the_one_engine_refactor():
    """Sweep runs kept in benchmarks/results from before the refactor (model
    "attention_potential", old results.json): their rows and their ensemble."""
    results = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
    workdirs = {"vec64-silu": results / "qm9_u0-cpu2-2026-11-24-vec64-silu-150epochs",
                "vec64-silu-dn": results / "qm9_u0-cpu2-2026-11-24-vec64-silu-dn0.02-150epochs"}
    summary = sweep.summarise(list(workdirs), workdirs, {"vec64-silu": 0, "vec64-silu-dn": 0})
    silu, dn = summary["runs"]
    assert (silu["params"], silu["epochs"], silu["planned_epochs"], silu["batch_size"]) == (
        252749, 150, 150, 16)
    assert silu["test_mae_mev"] == pytest.approx(29.509, abs=1e-3)
    assert dn["test_mae_mev"] == pytest.approx(25.729, abs=1e-3)
    ens = summary["ensemble"]
    assert ens["members"] == ["vec64-silu", "vec64-silu-dn"]
    assert ens["test"]["mae_mev"] < dn["test_mae_mev"]
    assert "| vec64-silu-dn | 252,813 | 150 (150) |" in sweep.table(summary)
