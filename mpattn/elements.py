"""Elements: the one element list, per-structure element counts, and the per-element linear
reference ``E ≈ Σ_e n_e E_e (+ c)`` that every task subtracts before a network sees a target.

Host-side numpy float64 throughout (absolute molecular energies are thousands of eV; float32
would round them at the meV level). Used by the property task's target transform
(:class:`~mpattn.train.targets.TargetTransform`, with an intercept), by the potentials'
:class:`~mpattn.potential.Reference` (without one), by the predictor and by the metrics.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from ase.data import atomic_numbers as _SYMBOL_TO_Z
from ase.data import chemical_symbols

__all__ = [
    "QM9_ELEMENTS",
    "as_atomic_numbers",
    "element_counts",
    "fit_linear_reference",
    "symbols",
]

#: The elements of QM9 (H, C, N, O, F), as atomic numbers: the featurizer's one-hot columns
#: and the property task's reference columns.
QM9_ELEMENTS: tuple[int, ...] = (1, 6, 7, 8, 9)


def symbols(zs: Iterable[int]) -> list[str]:
    """Chemical symbols of atomic numbers (the number itself where it names no element)."""
    return [chemical_symbols[int(z)] if 0 < int(z) < len(chemical_symbols) else str(int(z))
            for z in zs]


def _described(zs) -> str:
    return ", ".join(f"{int(z)} ({s})" for z, s in zip(zs, symbols(zs), strict=True))


def as_atomic_numbers(elements: Iterable[int | str]) -> tuple[int, ...]:
    """Distinct atomic numbers from numbers or symbols (``("H", 6, "O")`` -> ``(1, 6, 8)``).

    Raises:
        ValueError: an unknown symbol or number, a repeated element, or none at all.
    """
    out = []
    for e in elements:
        z = _SYMBOL_TO_Z.get(e) if isinstance(e, str) else int(e)
        if z is None or not 0 < z < len(chemical_symbols):
            raise ValueError(f"unknown element {e!r}")
        out.append(z)
    if len(set(out)) != len(out) or not out:
        raise ValueError(f"elements must be distinct and non-empty, got {tuple(elements)}")
    return tuple(out)


def element_counts(z, n_node, elements: Iterable[int] = QM9_ELEMENTS) -> np.ndarray:
    """Number of atoms of each element in each structure.

    Args:
        z: int [num_atoms] atomic numbers of all structures, concatenated (no padding).
        n_node: int [num_structures] atoms per structure (sums to ``len(z)``).
        elements: atomic numbers, one column each, in this order.

    Returns:
        float64 [num_structures, len(elements)].

    Raises:
        ValueError: ``z`` holds an element not in ``elements`` (the message names the
            elements and the first structure holding one), or ``n_node`` does not add up.
    """
    z = np.asarray(z).astype(np.int64).ravel()
    n_node = np.asarray(n_node).astype(np.int64).ravel()
    elements = tuple(int(e) for e in elements)
    if len(set(elements)) != len(elements):
        raise ValueError(f"element_counts: repeated elements in {elements}")
    if n_node.sum() != len(z) or (n_node < 0).any():
        raise ValueError(f"element_counts: {len(z)} atomic numbers for structures of "
                         f"{int(n_node.sum())} atoms in all")
    lookup = np.full(max(elements + (int(z.max(initial=0)),)) + 1, -1, np.int64)
    lookup[list(elements)] = np.arange(len(elements))
    column = lookup[np.clip(z, 0, None)] if len(z) else np.zeros(0, np.int64)
    graph = np.repeat(np.arange(len(n_node)), n_node)
    bad = (column < 0) | (z < 0)
    if bad.any():
        raise ValueError(f"atomic numbers {_described(np.unique(z[bad]))} not in elements "
                         f"{_described(elements)} (first in structure "
                         f"{int(graph[np.argmax(bad)])})")
    counts = np.zeros((len(n_node), len(elements)), np.float64)
    np.add.at(counts, (graph, column), 1.0)
    return counts


def fit_linear_reference(counts, y, *, intercept: bool) -> tuple[np.ndarray, float]:
    """Least-squares per-element values ``y ≈ counts @ coef (+ c)`` in float64.

    An element no structure contains (a zero column) gets ``coef = 0``; collinear
    compositions (one molecule's MD trajectory) get the minimum-norm solution
    (``np.linalg.lstsq``). Without ``intercept`` the fit is size-extensive, as a potential's
    reference must be; the property task fits ``c`` too.

    Args:
        counts: float [num_structures, num_elements] from :func:`element_counts`.
        y: float [num_structures] values (e.g. energies in eV).
        intercept: also fit a constant ``c``.

    Returns:
        ``(coef float64 [num_elements], c)`` (``c = 0.0`` without ``intercept``).

    Raises:
        ValueError: shapes that differ, no structure, or a value that is not finite.
    """
    counts = np.asarray(counts, np.float64)
    y = np.asarray(y, np.float64).ravel()
    if counts.ndim != 2 or len(counts) != len(y) or not len(y):
        raise ValueError(f"need one value per structure: counts {counts.shape}, {len(y)} "
                         "values")
    if not np.isfinite(y).all():
        raise ValueError("the values to fit a reference to must be finite")
    used = counts.any(axis=0)
    design = counts[:, used]
    if intercept:
        design = np.concatenate([design, np.ones((len(y), 1))], axis=1)
    solution = np.linalg.lstsq(design, y, rcond=None)[0]
    coef = np.zeros(counts.shape[1], np.float64)
    coef[used] = solution[: int(used.sum())]
    return coef, float(solution[-1]) if intercept else 0.0
