"""Target transform on real QM9 U0 (float64 host side, float32-safe encoded values)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mpattn.elements import QM9_ELEMENTS, element_counts
from mpattn.train.targets import TargetTransform


@pytest.fixture(scope="module")
def u0(qm9_molset):
    counts = element_counts(qm9_molset.z, qm9_molset.n_atoms, QM9_ELEMENTS)
    return qm9_molset.targets["U0"], counts


def test_element_counts_hand_made():
    z = np.array([6, 1, 1, 1, 1, 8, 1, 1, 7])
    counts = element_counts(z, [5, 3, 1], (1, 6, 7, 8))
    np.testing.assert_array_equal(counts, [[4, 1, 0, 0], [2, 0, 0, 1], [0, 0, 1, 0]])
    assert counts.dtype == np.float64
    # an empty graph is a row of zeros
    np.testing.assert_array_equal(element_counts([1], [0, 1], (1,)), [[0], [1]])


def test_element_counts_matches_loop(qm9_molset, u0):
    _, counts = u0
    off = np.concatenate([[0], np.cumsum(qm9_molset.n_atoms)])
    for g in (0, 17, 499):
        zg = qm9_molset.z[off[g]:off[g + 1]]
        np.testing.assert_array_equal(counts[g], [np.sum(zg == e) for e in QM9_ELEMENTS])
    np.testing.assert_array_equal(counts.sum(1), qm9_molset.n_atoms)


def test_element_counts_errors():
    with pytest.raises(ValueError, match=r"atomic numbers 9 \(F\), 17 \(Cl\) not in elements "
                                         r"1 \(H\), 6 \(C\) \(first in structure 0\)"):
        element_counts([1, 9, 17, 6], [4], (1, 6))
    with pytest.raises(ValueError, match=r"\(first in structure 1\)"):
        element_counts([1, 6, 6, 9, 1], [3, 2], (1, 6))
    with pytest.raises(ValueError, match="element_counts: 4 atomic numbers for structures of 3 "
                                         "atoms in all"):
        element_counts([1, 1, 6, 6], [1, 2], (1, 6))


def test_round_trip_exact_in_ev(u0):
    y, counts = u0
    t = TargetTransform.fit(y, counts)
    np.testing.assert_allclose(t.decode(t.encode(y, counts), counts), y, rtol=0, atol=1e-9)
    # through float32, as the device sees it: the loss is below 0.1 meV
    back = t.decode(t.encode(y, counts).astype(np.float32), counts)
    np.testing.assert_allclose(back, y, rtol=0, atol=1e-4)


def test_reference_explains_u0(u0):
    y, counts = u0
    t = TargetTransform.fit(y, counts)
    residual = y - t.reference(counts)
    # measured on these 500 molecules: MAE 0.578 eV, std 0.744 eV (U0 itself: std 1340 eV)
    assert np.mean(np.abs(residual)) < 0.7
    np.testing.assert_allclose(t.std, np.std(residual), rtol=1e-12)
    coef = dict(zip(QM9_ELEMENTS, t.coef, strict=True))
    # per-atom energies of the order of the free atoms' (H -13.6 eV, C -1029.8 eV, ...)
    assert -20 < coef[1] < -10
    assert -1100 < coef[6] < -1000
    assert -1550 < coef[7] < -1450
    assert -2100 < coef[8] < -2000
    # least squares: the residual is orthogonal to every column of the design
    design = np.concatenate([counts, np.ones((len(y), 1))], axis=1)
    np.testing.assert_allclose(design.T @ residual, 0, atol=1e-6 * np.abs(y).sum())


def test_encode_standardises_fit_set(u0):
    y, counts = u0
    for reference in (True, False):
        t = TargetTransform.fit(y, counts, reference=reference)
        e = t.encode(y, counts)
        np.testing.assert_allclose([e.mean(), e.std()], [0.0, 1.0], atol=1e-9)
        assert np.abs(e).max() < 50  # float32-safe: spacing 4e-6 at 50
        np.testing.assert_allclose(t.decode(e, counts), y, rtol=0, atol=1e-8)
    plain = TargetTransform.fit(y, reference=False)
    assert plain.coef is None
    np.testing.assert_allclose(plain.scale, np.std(y), rtol=1e-12)
    np.testing.assert_allclose(plain.encode(y), (y - y.mean()) / y.std(), atol=1e-9)


def test_scale_turns_standardised_errors_into_units(u0):
    y, counts = u0
    t = TargetTransform.fit(y, counts)
    e = t.encode(y, counts)
    shifted = t.decode(e + 0.01, counts)
    np.testing.assert_allclose(shifted - y, 0.01 * t.scale, rtol=1e-6)


def test_dict_round_trip(u0):
    y, counts = u0
    t = TargetTransform.fit(y, counts)
    t2 = TargetTransform.from_dict(json.loads(json.dumps(t.to_dict())))
    assert t2.elements == t.elements
    np.testing.assert_array_equal(t2.coef, t.coef)
    assert (t2.intercept, t2.mean, t2.std) == (t.intercept, t.mean, t.std)
    np.testing.assert_array_equal(t2.encode(y, counts), t.encode(y, counts))
    plain = TargetTransform.fit(y, reference=False)
    assert TargetTransform.from_dict(json.loads(json.dumps(plain.to_dict()))) == plain


def test_absent_element_and_constant_target():
    counts = np.array([[4.0, 1, 0], [2, 1, 0], [6, 2, 0], [0, 1, 0]])
    y = counts @ np.array([-13.0, -1030.0, -1500.0]) + 2.0
    t = TargetTransform.fit(y, counts, elements=(1, 6, 7))
    np.testing.assert_allclose(t.coef, [-13.0, -1030.0, 0.0], atol=1e-9)
    np.testing.assert_allclose(t.intercept, 2.0, atol=1e-9)
    # exact fit: the residual std is rounding noise, never below the floor
    assert t.std >= 1e-12
    np.testing.assert_allclose(t.std, 0, atol=1e-6)
    np.testing.assert_allclose(t.decode(np.zeros(4), counts), y, atol=1e-9)


def test_errors():
    with pytest.raises(ValueError, match="counts are required"):
        TargetTransform.fit([1.0, 2.0])
    with pytest.raises(ValueError, match=r"counts has shape \(2, 1\), expected \(2, 5\)"):
        TargetTransform.fit([1.0, 2.0], np.ones((2, 1)))
    t = TargetTransform.fit([1.0, 2.0], np.eye(2), elements=(1, 6))
    with pytest.raises(ValueError, match="counts are required"):
        t.encode([1.0])
    with pytest.raises(ValueError, match="non-empty and finite"):
        TargetTransform.fit([1.0, np.nan], reference=False)
