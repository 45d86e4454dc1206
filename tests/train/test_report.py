"""predictions.csv: round trip and clear errors on files that are not one."""

from __future__ import annotations

import numpy as np
import pytest

from mpattn.train.report import read_predictions, write_predictions


def test_predictions_round_trip_to_a_micro_ev(tmp_path):
    path = tmp_path / "predictions.csv"
    parts = {"val": ([7, 3], [9, 18], [-40.4785, -402.1234567], [-40.4781, -402.1230001]),
             "test": ([11], [29], [-500.0], [-500.02])}
    write_predictions(path, parts)
    back = read_predictions(path)
    assert list(back) == ["val", "test"]
    assert back["val"]["id"].tolist() == [7, 3] and back["val"]["n_atoms"].tolist() == [9, 18]
    np.testing.assert_allclose(back["val"]["true"], parts["val"][2], atol=5e-7)
    np.testing.assert_allclose(back["val"]["pred"], parts["val"][3], atol=5e-7)
    assert back["test"]["pred"].tolist() == [-500.02]


def test_predictions_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="part 'test' has 2 ids, 2 sizes, 2 targets, 1 pred"):
        write_predictions(tmp_path / "p.csv", {"test": ([1, 2], [3, 4], [0.0, 1.0], [0.5])})
    bad = tmp_path / "metrics.csv"
    bad.write_text("epoch,step\n1,2\n")
    with pytest.raises(ValueError, match="metrics.csv: not a predictions file"):
        read_predictions(bad)
    cut = tmp_path / "cut.csv"
    cut.write_text("part,id,n_atoms,true,pred\ntest,1,3,0.5,0.4\ntest,2,3\n")
    with pytest.raises(ValueError, match="cut.csv, line 3: 3 fields, expected 5"):
        read_predictions(cut)
