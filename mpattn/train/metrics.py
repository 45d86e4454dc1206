"""Error reports in physical units (host-side numpy float64).

:func:`error_report` (the property task) gives the overall MAE and RMSE and the error
analysis chemists ask for: per number of atoms and per element present (SchNet's size
study). Energies (``unit="eV"``) are reported in meV, with the MAE also in kcal/mol
(1 kcal/mol = 43.364 meV, from ``ase.units``; chemical accuracy is 1 kcal/mol); any other
target is reported in its own unit under ``mae``/``rmse``. :func:`force_metrics` (the
energy+forces task) gives energy errors per structure and per atom and force errors per
Cartesian component, in meV and meV/Å; :func:`force_breakdown` the same per element and
per molecule (the worst ten named).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from ase import units
from ase.data import chemical_symbols

__all__ = ["KCAL_MOL_MEV", "error_report", "force_breakdown", "force_metrics"]

#: One kcal/mol in meV (≈ 43.364).
KCAL_MOL_MEV: float = 1000.0 * units.kcal / units.mol


def _mae_rmse(err: np.ndarray) -> tuple[float, float]:
    return float(np.mean(np.abs(err))), float(np.sqrt(np.mean(err**2)))


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
    mae, rmse = _mae_rmse(err)
    report: dict[str, Any] = {
        "unit": "meV" if energy else unit,
        "n": int(len(err)),
        f"mae{suffix}": mae,
        f"rmse{suffix}": rmse,
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


def force_metrics(pred_e, true_e, pred_f, true_f, n_atoms) -> dict[str, float]:
    """Energy and force errors (numpy float64), inputs in eV and eV/Å.

    Args:
        pred_e, true_e: [num_structures] energies.
        pred_f, true_f: [total_atoms, 3] forces of the same structures, concatenated.
        n_atoms: int [num_structures].

    Returns:
        ``energy_mae_mev``, ``energy_rmse_mev``, ``energy_mae_mev_per_atom`` (mean of
        ``|ΔE| / N``), ``energy_rmse_mev_per_atom``, ``force_mae_mev_ang`` and
        ``force_rmse_mev_ang`` (over all Cartesian components), ``n_structures``, ``n_atoms``.
    """
    pe, te = (np.asarray(a, np.float64).ravel() for a in (pred_e, true_e))
    pf, tf = (np.asarray(a, np.float64).reshape(-1, 3) for a in (pred_f, true_f))
    n = np.asarray(n_atoms, np.int64).ravel()
    if not (pe.shape == te.shape == n.shape) or pf.shape != tf.shape or len(pf) != n.sum():
        raise ValueError(f"force_metrics: {pe.shape} / {te.shape} energies for {n.shape} "
                         f"structures of {int(n.sum())} atoms, forces {pf.shape} / {tf.shape}")
    de = (pe - te) * 1000.0
    e_mae, e_rmse = _mae_rmse(de)
    a_mae, a_rmse = _mae_rmse(de / n)
    f_mae, f_rmse = _mae_rmse((pf - tf) * 1000.0)
    return {
        "energy_mae_mev": e_mae,
        "energy_rmse_mev": e_rmse,
        "energy_mae_mev_per_atom": a_mae,
        "energy_rmse_mev_per_atom": a_rmse,
        "force_mae_mev_ang": f_mae,
        "force_rmse_mev_ang": f_rmse,
        "n_structures": int(len(pe)),
        "n_atoms": int(n.sum()),
    }


def force_breakdown(pred_e, true_e, pred_f, true_f, n_atoms, z, molecules, *,
                    worst: int = 10) -> dict[str, Any]:
    """Errors per element (forces on the atoms of each element) and per molecule (all frames
    of each label), inputs in eV and eV/Å as for :func:`force_metrics`.

    Args:
        z: int [total_atoms] atomic numbers; molecules: str [num_structures] labels.
        worst: how many molecules ``worst_molecules`` names.

    Returns:
        ``{"per_element": {symbol: {"n_atoms", "force_mae_mev_ang", "force_rmse_mev_ang"}},
        "per_molecule": {label: {"n_frames", "n_atoms", "energy_mae_mev",
        "energy_mae_mev_per_atom", "force_mae_mev_ang"}}, "worst_molecules": [label, ...]}``
        (worst by force MAE, highest first).
    """
    pe, te = (np.asarray(a, np.float64).ravel() for a in (pred_e, true_e))
    pf, tf = (np.asarray(a, np.float64).reshape(-1, 3) for a in (pred_f, true_f))
    n = np.asarray(n_atoms, np.int64).ravel()
    z = np.asarray(z, np.int64).ravel()
    molecules = np.asarray(molecules, dtype=str).ravel()
    if len(z) != len(pf) or len(molecules) != len(pe):
        raise ValueError(f"force_breakdown: {len(z)} atomic numbers for {len(pf)} force rows, "
                         f"{len(molecules)} labels for {len(pe)} structures")
    ferr = np.abs(pf - tf) * 1000.0
    fsq = np.square(ferr)
    per_element = {}
    elements, of_atom = np.unique(z, return_inverse=True)
    atoms_of = np.bincount(of_atom, minlength=len(elements))
    abs_sum = np.bincount(of_atom, weights=ferr.sum(axis=1), minlength=len(elements))
    sq_sum = np.bincount(of_atom, weights=fsq.sum(axis=1), minlength=len(elements))
    for k, e in enumerate(elements):
        per_element[chemical_symbols[int(e)]] = {
            "n_atoms": int(atoms_of[k]), "force_mae_mev_ang": float(abs_sum[k] / (3 * atoms_of[k])),
            "force_rmse_mev_ang": float(np.sqrt(sq_sum[k] / (3 * atoms_of[k])))}
    # per molecule: one pass over frames and atoms (bincount), not one mask per molecule
    names, of_frame = np.unique(molecules, return_inverse=True)
    m = len(names)
    de = np.abs(pe - te) * 1000.0
    frames_of = np.bincount(of_frame, minlength=m)
    e_sum = np.bincount(of_frame, weights=de, minlength=m)
    ea_sum = np.bincount(of_frame, weights=de / n, minlength=m)
    atom_mol = np.repeat(of_frame, n)
    f_sum = np.bincount(atom_mol, weights=ferr.sum(axis=1), minlength=m)
    f_cnt = np.bincount(atom_mol, minlength=m) * 3
    first = np.zeros(m, np.int64)
    first[of_frame[::-1]] = np.arange(len(of_frame))[::-1]  # each molecule's first frame
    per_molecule = {str(name): {
        "n_frames": int(frames_of[k]), "n_atoms": int(n[first[k]]),
        "energy_mae_mev": float(e_sum[k] / frames_of[k]),
        "energy_mae_mev_per_atom": float(ea_sum[k] / frames_of[k]),
        "force_mae_mev_ang": float(f_sum[k] / f_cnt[k])} for k, name in enumerate(names)}
    ranked = sorted(per_molecule, key=lambda k: -per_molecule[k]["force_mae_mev_ang"])
    return {"per_element": per_element, "per_molecule": per_molecule,
            "worst_molecules": ranked[:worst]}
