"""Error reports in physical units (host-side numpy float64).

:func:`error_report` gives the overall MAE and RMSE and the error analysis chemists ask for:
per number of atoms and per element present (SchNet's size study). Energies (``unit="eV"``)
are reported in meV, with the MAE also in kcal/mol (1 kcal/mol = 43.364 meV, from
``ase.units``; chemical accuracy is 1 kcal/mol); any other target is reported in its own unit
under ``mae``/``rmse``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from ase import units
from ase.data import chemical_symbols

__all__ = ["KCAL_MOL_MEV", "error_report"]

#: One kcal/mol in meV (≈ 43.364).
KCAL_MOL_MEV: float = 1000.0 * units.kcal / units.mol


def error_report(pred, true, *, n_atoms, counts=None, elements=None,
                 unit: str = "eV") -> dict[str, Any]:
    """MAE/RMSE overall, per molecule size and per element present.

    Args:
        pred, true: float [num_molecules] predictions and references in ``unit``
            (decoded with :meth:`~mpattn.train.targets.TargetTransform.decode`).
        n_atoms: int [num_molecules] atoms per molecule.
        counts: optional float [num_molecules, len(elements)] element counts
            (:func:`~mpattn.train.targets.element_counts`); with ``elements`` it gives
            ``per_element``.
        elements: atomic numbers of the columns of ``counts``.
        unit: the targets' unit. ``"eV"``: errors in meV under ``*_mev`` keys and
            ``mae_kcal_mol``; otherwise errors in ``unit`` under ``mae``/``rmse``.

    Returns:
        A JSON-able dict; ``"unit"`` is the unit of the errors reported (``"meV"`` for
        ``unit="eV"``). For ``unit="eV"``: ``{"unit", "n", "mae_mev", "rmse_mev",
        "mae_kcal_mol", "per_size": {atoms: {"n", "mae_mev"}}, "per_element":
        {symbol: {"n", "mae_mev"}}}`` where ``per_element[s]`` covers the molecules that
        contain element ``s`` (elements no molecule contains are left out; ``{}`` without
        ``counts``). Other units: the same with ``mae``, ``rmse`` and per-group ``mae``.
    """
    pred = np.asarray(pred, np.float64).ravel()
    true = np.asarray(true, np.float64).ravel()
    n_atoms = np.asarray(n_atoms).astype(np.int64).ravel()
    if not (pred.shape == true.shape == n_atoms.shape):
        raise ValueError(
            f"error_report: pred {pred.shape}, true {true.shape} and n_atoms {n_atoms.shape} "
            "differ in shape"
        )
    if len(pred) == 0:
        raise ValueError("error_report: no molecules")
    energy = unit == "eV"
    factor = 1000.0 if energy else 1.0
    suffix = "_mev" if energy else ""
    err = np.abs(pred - true) * factor

    report: dict[str, Any] = {
        "unit": "meV" if energy else unit,
        "n": int(len(err)),
        f"mae{suffix}": float(err.mean()),
        f"rmse{suffix}": float(np.sqrt(np.mean(err**2))),
    }
    if energy:
        report["mae_kcal_mol"] = float(err.mean() / KCAL_MOL_MEV)
    report["per_size"] = {
        int(s): {"n": int(np.sum(n_atoms == s)), f"mae{suffix}": float(err[n_atoms == s].mean())}
        for s in np.unique(n_atoms)
    }
    per_element: dict[str, dict[str, Any]] = {}
    if counts is not None:
        if elements is None:
            raise ValueError("error_report: counts need elements (their atomic numbers)")
        counts = np.asarray(counts)
        if counts.shape != (len(err), len(elements)):
            raise ValueError(
                f"error_report: counts has shape {counts.shape}, expected "
                f"({len(err)}, {len(elements)})"
            )
        for j, z in enumerate(elements):
            has = counts[:, j] > 0
            if has.any():
                per_element[chemical_symbols[int(z)]] = {
                    "n": int(has.sum()), f"mae{suffix}": float(err[has].mean())}
    report["per_element"] = per_element
    return report
