"""Host-side target preparation: a per-element linear reference, then standardisation.

QM9's U0 is about -11,000 eV per molecule; float32 has a spacing of about 1 meV there, so a
model that predicted it directly could not even *represent* a target to chemical accuracy.
Everything here therefore runs in numpy float64 on the host, and the device only ever sees
standardised residuals of order one:

    reference(counts) = counts @ coef + intercept          # E ≈ Σ_e n_e E_e + c
    encoded           = (y - reference - mean) / std       # what the model learns
    y                 = encoded * std + mean + reference   # decode, in float64

The per-element reference (the linear energy correction of SO3krates/apax and of the thesis'
issue) is fitted by least squares on the *training* split only. With ``reference=False`` the
transform is a plain standardisation (for intensive targets such as the HOMO-LUMO gap).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from mpattn.elements import QM9_ELEMENTS, fit_linear_reference

__all__ = ["TargetTransform"]

_STD_FLOOR = 1e-12


@dataclass
class TargetTransform:
    """Float64 map between a target in its units and the standardised residual a model learns.

    Attributes:
        elements: atomic numbers, the columns of ``counts``.
        coef: float64 [len(elements)] per-element reference values (e.g. eV per atom), or
            ``None`` for a plain standardisation.
        intercept: the constant ``c`` of the reference (0 without one).
        mean, std: mean and standard deviation of the residual on the fit set.
    """

    elements: tuple[int, ...]
    coef: np.ndarray | None
    intercept: float
    mean: float
    std: float

    def __post_init__(self) -> None:
        self.elements = tuple(int(e) for e in self.elements)
        if self.coef is not None:
            self.coef = np.asarray(self.coef, np.float64).ravel()
            if self.coef.shape != (len(self.elements),):
                raise ValueError(
                    f"TargetTransform: {self.coef.shape[0]} coefficients for "
                    f"{len(self.elements)} elements"
                )
        self.intercept, self.mean, self.std = (
            float(self.intercept), float(self.mean), float(self.std))
        if not self.std > 0:
            raise ValueError(f"TargetTransform: std must be positive, got {self.std}")

    @classmethod
    def fit(cls, y, counts=None, *, reference: bool = True,
            elements=QM9_ELEMENTS) -> TargetTransform:
        """Fit on the training split.

        Args:
            y: float [num_graphs] targets in their units.
            counts: float [num_graphs, len(elements)] from
                :func:`~mpattn.elements.element_counts` (needed when ``reference``).
            reference: fit ``y ≈ counts @ coef + intercept`` by least squares
                (:func:`~mpattn.elements.fit_linear_reference`; an element absent from the
                fit set gets coefficient 0) and standardise the residual; otherwise
                standardise ``y`` itself.
            elements: atomic numbers of the columns of ``counts``.

        Returns:
            The transform; ``std`` is floored at 1e-12 so a constant target cannot divide
            by zero.
        """
        y = np.asarray(y, np.float64).ravel()
        if len(y) == 0 or not np.isfinite(y).all():
            raise ValueError("TargetTransform.fit: y must be non-empty and finite")
        elements = tuple(int(e) for e in elements)
        coef, intercept = None, 0.0
        if reference:
            counts = cls._check_counts(counts, len(y), elements)
            coef, intercept = fit_linear_reference(counts, y, intercept=True)
            y = y - (counts @ coef + intercept)
        std = max(float(np.std(y)), _STD_FLOOR)
        return cls(elements, coef, intercept, float(np.mean(y)), std)

    @staticmethod
    def _check_counts(counts, n: int, elements) -> np.ndarray:
        if counts is None:
            raise ValueError("TargetTransform: counts are required with a per-element reference")
        counts = np.asarray(counts, np.float64)
        if counts.shape != (n, len(elements)):
            raise ValueError(
                f"TargetTransform: counts has shape {counts.shape}, expected "
                f"({n}, {len(elements)})"
            )
        return counts

    @property
    def scale(self) -> float:
        """Target units per standardised unit (``std``): multiply standardised errors by it."""
        return self.std

    def reference(self, counts=None, n: int | None = None) -> np.ndarray:
        """The fitted linear reference ``counts @ coef + intercept`` (float64 [num_graphs]).

        Without a reference it is ``intercept`` (0) for each of the ``n`` graphs.
        """
        if self.coef is None:
            if n is None:
                n = 0 if counts is None else len(counts)
            return np.full(n, self.intercept, np.float64)
        if counts is None:
            raise ValueError("TargetTransform: counts are required with a per-element reference")
        counts = self._check_counts(counts, len(counts) if n is None else n, self.elements)
        return counts @ self.coef + self.intercept

    def encode(self, y, counts=None) -> np.ndarray:
        """Targets (float [num_graphs], target units) -> float64 standardised residuals."""
        y = np.asarray(y, np.float64).ravel()
        return (y - self.reference(counts, len(y)) - self.mean) / self.std

    def decode(self, pred_std, counts=None) -> np.ndarray:
        """Standardised predictions (float [num_graphs]) -> float64 values in target units."""
        pred = np.asarray(pred_std, np.float64).ravel()
        return pred * self.std + self.mean + self.reference(counts, len(pred))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (exact: Python's JSON writes float64 by round-trip ``repr``)."""
        return {
            "elements": list(self.elements),
            "coef": None if self.coef is None else [float(c) for c in self.coef],
            "intercept": self.intercept,
            "mean": self.mean,
            "std": self.std,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TargetTransform:
        """Inverse of :meth:`to_dict`."""
        return cls(tuple(d["elements"]), None if d["coef"] is None else np.asarray(d["coef"]),
                   d["intercept"], d["mean"], d["std"])
