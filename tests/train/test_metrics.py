"""Error reports against direct numpy on hand-made arrays; the kcal/mol factor; force metrics."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mpattn.elements import element_counts
from mpattn.train.metrics import KCAL_MOL_MEV, error_report, force_metrics

ELEMENTS = (1, 6, 7, 8, 9)


@pytest.fixture
def molecules():
    # four molecules: CH4 (5 atoms), H2O (3), NH3 (4), CH3OH (6) -- errors 10, 20, 30, 45 meV
    z = np.array([6, 1, 1, 1, 1, 8, 1, 1, 7, 1, 1, 1, 6, 1, 1, 1, 8, 1])
    n_atoms = np.array([5, 3, 4, 6])
    true = np.array([-1100.0, -2080.0, -1530.0, -3150.0])
    pred = true + np.array([0.010, -0.020, 0.030, -0.045])
    return pred, true, n_atoms, element_counts(z, n_atoms, ELEMENTS)


def test_kcal_mol_factor():
    np.testing.assert_allclose(KCAL_MOL_MEV, 43.364, rtol=1e-4)


def test_energy_report_against_numpy(molecules):
    pred, true, n_atoms, counts = molecules
    rep = error_report(pred, true, n_atoms=n_atoms, counts=counts, elements=ELEMENTS)
    err = np.abs(pred - true) * 1000
    assert rep["n"] == 4 and rep["unit"] == "meV"
    np.testing.assert_allclose(rep["mae_mev"], 26.25, rtol=1e-9)
    np.testing.assert_allclose(rep["mae_mev"], err.mean(), rtol=1e-12)
    np.testing.assert_allclose(rep["rmse_mev"], np.sqrt(np.mean(err**2)), rtol=1e-12)
    np.testing.assert_allclose(rep["rmse_mev"], np.sqrt((100 + 400 + 900 + 2025) / 4),
                               rtol=1e-9)
    np.testing.assert_allclose(rep["mae_kcal_mol"], 26.25 / 43.364, rtol=1e-4)
    assert set(rep["per_size"]) == {3, 4, 5, 6}
    for s, e in ((3, 20), (4, 30), (5, 10), (6, 45)):
        assert rep["per_size"][s]["n"] == 1
        np.testing.assert_allclose(rep["per_size"][s]["mae_mev"], e, rtol=1e-9)
    # H in all four; C in CH4 and CH3OH; N in NH3; O in H2O and CH3OH; no F (left out)
    assert set(rep["per_element"]) == {"H", "C", "N", "O"}
    for sym, n, e in (("H", 4, 26.25), ("C", 2, 27.5), ("N", 1, 30.0), ("O", 2, 32.5)):
        assert rep["per_element"][sym]["n"] == n
        np.testing.assert_allclose(rep["per_element"][sym]["mae_mev"], e, rtol=1e-9)
    json.dumps(rep)  # JSON-able


def test_per_size_groups_against_numpy():
    rng = np.random.default_rng(3)
    true = rng.normal(size=200)
    pred = true + rng.normal(size=200) * 0.1
    n_atoms = rng.integers(3, 30, size=200)
    rep = error_report(pred, true, n_atoms=n_atoms)
    assert rep["per_element"] == {}
    for s, group in rep["per_size"].items():
        sel = n_atoms == s
        assert group["n"] == sel.sum()
        np.testing.assert_allclose(group["mae_mev"], 1000 * np.abs(pred - true)[sel].mean(),
                                   rtol=1e-12)
    assert sum(g["n"] for g in rep["per_size"].values()) == 200


def test_non_energy_target_in_its_unit(molecules):
    pred, true, n_atoms, counts = molecules
    rep = error_report(pred / 1000, true / 1000, n_atoms=n_atoms, counts=counts,
                       elements=ELEMENTS, unit="Debye")
    assert rep["unit"] == "Debye"
    assert "mae_mev" not in rep and "mae_kcal_mol" not in rep
    np.testing.assert_allclose([rep["mae"], rep["rmse"]],
                               [26.25e-6, np.sqrt((100 + 400 + 900 + 2025) / 4) * 1e-6],
                               rtol=1e-6)
    np.testing.assert_allclose(rep["per_element"]["O"]["mae"], 32.5e-6, rtol=1e-6)
    np.testing.assert_allclose(rep["per_size"][6]["mae"], 45e-6, rtol=1e-6)


def test_errors(molecules):
    pred, true, n_atoms, counts = molecules
    with pytest.raises(ValueError, match=r"differ in shape"):
        error_report(pred[:3], true, n_atoms=n_atoms)
    with pytest.raises(ValueError, match="counts need elements"):
        error_report(pred, true, n_atoms=n_atoms, counts=counts)
    with pytest.raises(ValueError, match=r"counts has shape \(4, 5\), expected \(4, 2\)"):
        error_report(pred, true, n_atoms=n_atoms, counts=counts, elements=(1, 6))


def test_force_metrics_against_numpy():
    """Energies per structure and per atom (meV), forces per Cartesian component (meV/Å)."""
    from mpattn.train.metrics import force_metrics

    rng = np.random.default_rng(5)
    n_atoms = np.array([3, 9, 5])
    true_e = np.array([-300.0, -1200.5, -640.25])
    pred_e = true_e + np.array([0.003, -0.018, 0.010])
    true_f = rng.normal(size=(17, 3))
    pred_f = true_f + rng.normal(size=(17, 3)) * 0.05
    m = force_metrics(pred_e, true_e, pred_f, true_f, n_atoms)
    de = np.array([3.0, -18.0, 10.0])
    np.testing.assert_allclose([m["energy_mae_mev"], m["energy_rmse_mev"]],
                               [31 / 3, np.sqrt((9 + 324 + 100) / 3)], rtol=1e-6)
    np.testing.assert_allclose(m["energy_mae_mev_per_atom"], np.mean(np.abs(de) / n_atoms),
                               rtol=1e-6)
    np.testing.assert_allclose(m["energy_rmse_mev_per_atom"],
                               np.sqrt(np.mean((de / n_atoms) ** 2)), rtol=1e-6)
    df = 1000 * (pred_f - true_f)
    np.testing.assert_allclose([m["force_mae_mev_ang"], m["force_rmse_mev_ang"]],
                               [np.abs(df).mean(), np.sqrt(np.mean(df**2))], rtol=1e-12)
    assert (m["n_structures"], m["n_atoms"]) == (3, 17)
    json.dumps(m)  # JSON-able
    with pytest.raises(ValueError, match=r"force_metrics: \(3,\) / \(3,\) energies for \(3,\) "
                                         r"structures of 17 atoms, forces \(16, 3\)"):
        force_metrics(pred_e, true_e, pred_f[:16], true_f[:16], n_atoms)


def test_force_metrics_by_hand():
    m = force_metrics(pred_e=[1.0, 2.0], true_e=[1.003, 1.99], n_atoms=[1, 2],
                      pred_f=[[0.0, 0.0, 0.01], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]],
                      true_f=np.zeros((3, 3)))
    # energy errors 3 and 10 meV; per atom 3 and 5; one force component of 10 meV/Å in 9
    np.testing.assert_allclose(
        [m["energy_mae_mev"], m["energy_rmse_mev"], m["energy_mae_mev_per_atom"],
         m["energy_rmse_mev_per_atom"], m["force_mae_mev_ang"], m["force_rmse_mev_ang"]],
        [6.5, np.sqrt(109 / 2), 4.0, np.sqrt(17), 10 / 9, np.sqrt(100 / 9)], rtol=1e-9)
    assert (m["n_structures"], m["n_atoms"]) == (2, 3)
    with pytest.raises(ValueError, match="force_metrics: "):
        force_metrics([1.0], [1.0], np.zeros((2, 3)), np.zeros((2, 3)), [1])
