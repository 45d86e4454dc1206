"""The property task: one target per molecule (QM9's U0 by default), learned as a standardised
residual after a per-element linear reference.

The device only sees standardised residual targets (float32); the reference, decoding and
metrics run on the host in float64 (:class:`~mpattn.train.targets.TargetTransform`, fitted
on the training part only). The loss is the target term (L1/MSE/Huber with an optional
size weighting of the SchNet study) plus any auxiliary terms (:mod:`mpattn.train.terms`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import jax.numpy as jnp
import numpy as np

from mpattn.data.graphset import GraphSet
from mpattn.data.molecules import MoleculeSet
from mpattn.data.qm9 import Split
from mpattn.elements import QM9_ELEMENTS, element_counts, symbols
from mpattn.featurize import EDGE_SETS, FeaturizeOptions
from mpattn.train.losses import WEIGHTINGS, cap_per_size, graph_weights, size_range
from mpattn.train.metrics import error_report
from mpattn.train.targets import TargetTransform
from mpattn.train.task import Task
from mpattn.train.terms import TargetTerm

__all__ = ["PropertyData", "PropertyPart", "PropertyTask"]


@dataclass
class PropertyPart:
    """One part of a split, ready to batch: graphs with standardised targets + host truth."""

    graphs: GraphSet
    true: np.ndarray  # float64 [G], target units
    counts: np.ndarray  # float64 [G, elements]
    n_atoms: np.ndarray  # int [G]
    ids: np.ndarray | None = None  # int64 [G] dataset ids (QM9 indices), when known


@dataclass
class PropertyData:
    """:meth:`PropertyTask.prepare`'s output: the three parts and the fitted transform."""

    train: PropertyPart
    val: PropertyPart
    test: PropertyPart
    transform: TargetTransform
    elements: tuple[int, ...] = QM9_ELEMENTS


@dataclass(frozen=True)
class PropertyTask(Task):
    """A per-molecule target.

    Attributes:
        target: a target of the molecule set (QM9: ``"U0"``, ``"gap"``, ...).
        reference: subtract the per-element linear reference before standardising.
        weighting, weight_r: size weighting of the loss (:data:`~mpattn.train.losses.
            WEIGHTINGS`) and its exponent.
        edge_set, cutoff: the graphs' edge set (``"complete"``, ``"bonds"``, ``"radius"``)
            and the radius (Å) of ``"radius"``.
        min_atoms, max_atoms, cap_per_size: train only on this size range / at most this many
            molecules per atom count (the SchNet size study's sampling).
        aux: auxiliary loss terms (:class:`~mpattn.train.terms.Denoising`,
            :class:`~mpattn.train.terms.Dipole`).
    """

    target: str = "U0"
    reference: bool = True
    weighting: str = "none"
    weight_r: float = 1.0
    edge_set: str = "complete"
    cutoff: float | None = None
    min_atoms: int | None = None
    max_atoms: int | None = None
    cap_per_size: int | None = None
    aux: tuple = ()

    kind: ClassVar[str] = "property"
    score_key: ClassVar[str] = "val_mae"
    rate_key: ClassVar[str] = "train_mol_per_s"
    prediction_kinds: ClassVar[dict[str, str]] = {"energy": "graph"}

    def check(self) -> PropertyTask:
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"--weighting {self.weighting!r}: choose one of "
                             f"{', '.join(WEIGHTINGS)}")
        if not self.weight_r > 0:
            raise ValueError(f"--weight-r {self.weight_r}: must be positive")
        if self.edge_set not in EDGE_SETS:
            raise ValueError(f"--edge-set {self.edge_set!r}: choose one of "
                             f"{', '.join(EDGE_SETS)}")
        if self.edge_set == "radius" and not (self.cutoff or 0) > 0:
            raise ValueError(f"--cutoff {self.cutoff}: --edge-set radius needs a positive "
                             "cutoff in Å")
        for name in ("min_atoms", "max_atoms", "cap_per_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} {value}: must be at least 1")
        if None not in (self.min_atoms, self.max_atoms) and self.min_atoms > self.max_atoms:
            raise ValueError(f"--min-atoms {self.min_atoms} is above --max-atoms "
                             f"{self.max_atoms}: no molecule fits")
        return self

    # ------------------------------------------------------------------ data

    def options(self) -> FeaturizeOptions:
        """How this task's graphs are built."""
        return FeaturizeOptions(edge_set=self.edge_set, cutoff=self.cutoff)

    def prepare(self, ms: MoleculeSet, split: Split, config=None) -> PropertyData:
        """Graphs of each split part; the target transform is fitted on the training part.

        Raises:
            ValueError: an unknown target, no training molecule left by the size options,
                an element of the validation or test part absent from the training part
                (the reference could not be fitted), or data the auxiliary terms need.
        """
        if self.target not in ms.targets:
            raise ValueError(f"--target {self.target!r}: unknown target; choose from "
                             f"{sorted(ms.targets)}")
        dtype = np.float64 if config is not None and config.x64 else np.float32
        seed = 0 if config is None else config.seed
        parts = {}
        for name in ("train", "val", "test"):
            sub = ms.subset(ms.index_of(getattr(split, name)))
            if name == "train":  # sampling options of the size study apply to training only
                sub = sub.subset(size_range(sub.n_atoms, self.min_atoms, self.max_atoms))
                if self.cap_per_size:
                    sub = sub.subset(cap_per_size(sub.n_atoms, self.cap_per_size, seed))
                if len(sub) == 0:
                    raise ValueError("no training molecules left after --min-atoms/"
                                     "--max-atoms/--cap-per-size")
            parts[name] = (sub, element_counts(sub.z, sub.n_atoms, QM9_ELEMENTS))
        seen = parts["train"][1].sum(axis=0) > 0
        for name in ("val", "test") if self.reference else ():
            unseen = (parts[name][1].sum(axis=0) > 0) & ~seen
            if unseen.any():
                missing = symbols(np.asarray(QM9_ELEMENTS)[unseen])
                raise ValueError(f"element(s) {missing} occur in the {name} split but not in "
                                 "the training split: the per-element reference cannot be "
                                 "fitted")
        sub, counts = parts["train"]
        transform = TargetTransform.fit(sub.targets[self.target], counts,
                                        reference=self.reference, elements=QM9_ELEMENTS)
        out = {}
        for name, (sub, counts) in parts.items():
            gs = sub.to_graphset(self.options(), targets=[])
            if dtype != np.float32:
                gs.nodes["positions"] = gs.nodes["positions"].astype(dtype)
            true = sub.targets[self.target].astype(np.float64)
            gs.globals["y"] = transform.encode(true, counts).astype(dtype)
            for key in self.data_keys():
                if key not in sub.targets:
                    raise ValueError(f"the loss terms need {key!r} of every molecule, which "
                                     "the data does not hold")
                gs.globals[key] = sub.targets[key].astype(dtype)
            out[name] = PropertyPart(gs, true, counts, sub.n_atoms.astype(np.int64),
                                     np.asarray(sub.ids, np.int64))
        return PropertyData(out["train"], out["val"], out["test"], transform)

    # ------------------------------------------------------------------ model and loss

    def module(self, model, data):
        return model

    def main_terms(self, config) -> list:
        return [TargetTerm(loss=config.loss, weighting=self.weighting, weight_r=self.weight_r)]

    def outputs(self, module, graph) -> dict:
        return module(graph)

    def predictions(self, module, graph) -> dict:
        return {"energy": module(graph)["energy"]}

    def graph_weights(self, graph):
        return graph_weights(self.weighting, jnp.asarray(graph.n_node), r=self.weight_r)

    # ------------------------------------------------------------------ reports

    def unit(self) -> str:
        from mpattn.data.qm9 import TARGETS

        return TARGETS[self.target][0] if self.target in TARGETS else "eV"

    def report(self, data: PropertyData, part: PropertyPart, raw: dict) -> dict:
        """:func:`~mpattn.train.metrics.error_report` of ``part`` in the target's unit; the
        decoded predictions (float64, target units) under ``"_pred"``."""
        pred = data.transform.decode(raw["energy"], part.counts)
        return error_report(pred, part.true, n_atoms=part.n_atoms, counts=part.counts,
                            elements=list(data.elements), unit=self.unit()) | {"_pred": pred}

    def row(self, report: dict) -> dict:
        return {"val_mae": float(report.get("mae_mev", report.get("mae")))}

    def state(self, data: PropertyData) -> dict:
        return {"transform": data.transform.to_dict()}
