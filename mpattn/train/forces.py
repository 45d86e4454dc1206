"""The energy+forces task: an interatomic potential trained on energies and forces.

The trained module is a :class:`~mpattn.potential.Potential` around the model; forces are
``-∂E/∂R`` by ``jax.grad`` inside the loss (a gradient of a gradient). With ``s`` the RMS
force component of the training set (:func:`~mpattn.potential.fit_reference`)::

    L = (1-β) ℓ((E - Σ n_e E_e)/s - Ê) + β/(3N) Σ ℓ(F/s - F̂/s)

Residual energies are formed on the host in float64 (absolute xTB ethanol energies are
about -309 eV, DFT ones thousands of eV: float32 would round them at the meV level) and reach
the device as ``residual / s``. Validation reports energy MAE (meV) and force MAE (meV/Å);
the best checkpoint has the lowest validation force MAE (forces are what MD uses).

Reference: Frank, Unke & Müller, "So3krates", NeurIPS 2022 (loss, linear energy correction).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import jax.numpy as jnp
import numpy as np

from mpattn.data.frames import FrameSet
from mpattn.data.graphset import GraphSet
from mpattn.potential import Potential, Reference, energy_and_forces, fit_reference
from mpattn.train.metrics import force_metrics
from mpattn.train.task import Task
from mpattn.train.terms import EnergyTerm, ForceTerm

__all__ = ["EnergyForceTask", "ForceData", "FramePart"]


@dataclass
class FramePart:
    """One part of a split: device graphs with standardised targets, host truth in float64.

    ``graphs`` holds ``nodes["forces"]`` = F/s and ``globals["energy"]`` = (E - Σ n_e E_e)/s
    (float32, float64 with ``x64``); ``energy`` [F] and ``forces`` [N, 3] are the absolute
    references (eV, eV/Å, float64) and ``baseline`` [F] the float64 ``Σ n_e E_e``.
    """

    graphs: GraphSet
    energy: np.ndarray
    forces: np.ndarray
    baseline: np.ndarray
    n_atoms: np.ndarray
    frames: FrameSet


@dataclass
class ForceData:
    """:meth:`EnergyForceTask.prepare`'s output: the three parts and the reference."""

    train: FramePart
    val: FramePart
    test: FramePart
    reference: Reference
    cutoff: float
    dtype: str = "float32"

    @property
    def elements(self) -> tuple[int, ...]:
        return self.reference.elements


@dataclass(frozen=True)
class EnergyForceTask(Task):
    """Energies and forces of structures (molecules or periodic cells).

    Attributes:
        cutoff: radius (Å) of the neighbour graphs; must equal the model config's
            ``graph_cutoff`` (or ``cutoff``).
        beta: force weight β of the loss. Energies and forces are both divided by the RMS
            force ``s`` (so β trades comparable numbers); 0.99 follows SO3krates and makes
            forces, which fix the energy surface up to a constant, the main signal.
    """

    cutoff: float = 5.0
    beta: float = 0.99

    kind: ClassVar[str] = "energy_forces"
    score_key: ClassVar[str] = "val_force_mae_mev_ang"
    rate_key: ClassVar[str] = "frames_per_s"
    prediction_kinds: ClassVar[dict[str, str]] = {"energy": "graph", "forces": "node"}

    def check(self) -> EnergyForceTask:
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"--beta {self.beta}: the force weight must be in [0, 1]")
        if not self.cutoff > 0:
            raise ValueError(f"--cutoff {self.cutoff}: must be positive (Å)")
        return self

    def check_data(self, data: ForceData) -> None:
        if not math.isclose(data.cutoff, self.cutoff):
            raise ValueError(f"the frames were prepared with cutoff {data.cutoff} Å, the task "
                             f"asks for {self.cutoff} Å")

    def model_config(self, config):
        config = super().model_config(config)
        model_cutoff = getattr(config, "graph_cutoff", getattr(config, "cutoff", None))
        if model_cutoff is not None and not math.isclose(model_cutoff, self.cutoff):
            raise ValueError(f"cutoff {self.cutoff} Å of the task differs from the model "
                             f"config's {model_cutoff} Å; the graphs and the model must use "
                             "one cutoff")
        return config

    # ------------------------------------------------------------------ data

    def prepare(self, frames: FrameSet, split, config=None) -> ForceData:
        """Radius graphs of each part, the reference fitted on the training frames only.

        Args:
            frames: all frames (energies and forces required).
            split: ``(train, val, test)`` index arrays into ``frames`` (e.g. from
                :func:`~mpattn.data.frames.split_frames`).
            config: the run's :class:`~mpattn.train.config.TrainConfig` (its ``x64``).

        Raises:
            ValueError: frames without forces, an empty training part, or a validation/test
                frame holding an element absent from the training frames.
        """
        if frames.forces is None:
            raise ValueError(f"{frames.source or 'frames'}: no forces; a potential trains on "
                             "energies and forces")
        x64 = config is not None and config.x64
        dtype = np.float64 if x64 else np.float32
        parts = dict(zip(("train", "val", "test"), (np.asarray(s, np.int64) for s in split),
                         strict=True))
        if not len(parts["train"]):
            raise ValueError("the training part is empty")
        train = frames.subset(parts["train"])
        elements = tuple(sorted(set(np.unique(train.z).tolist())))
        zs = [train.z[train.atom_index(i)] for i in range(len(train))]
        reference = fit_reference(zs, train.energy, elements, forces=train.forces)
        out = {}
        for name, index in parts.items():
            sub = frames.subset(index)
            try:
                baseline = reference.energy(sub.z, sub.n_atoms)
            except ValueError as err:
                raise ValueError(f"{name} part: {err} (seen in training: {elements})") from err
            gs = sub.to_graphset(self.cutoff)
            s = reference.scale
            gs.nodes["forces"] = (sub.forces / s).astype(dtype)
            gs.nodes["positions"] = sub.positions.astype(dtype)
            gs.globals = {"energy": ((sub.energy - baseline) / s).astype(dtype)}
            out[name] = FramePart(gs, sub.energy.astype(np.float64),
                                  sub.forces.astype(np.float64), baseline,
                                  sub.n_atoms.astype(np.int64), sub)
        return ForceData(out["train"], out["val"], out["test"], reference, self.cutoff,
                         "float64" if x64 else "float32")

    # ------------------------------------------------------------------ model and loss

    def module(self, model, data) -> Potential:
        return Potential(model, reference=data.reference)

    def main_terms(self, config) -> list:
        return [EnergyTerm(loss=config.loss, weight=1.0 - self.beta),
                ForceTerm(loss=config.loss, weight=self.beta)]

    def outputs(self, module, graph) -> dict:
        """Residual energies and forces in units of the RMS force ``s``."""
        energy, forces = energy_and_forces(module, graph, reference=False)
        s = module.scale[...].astype(energy.dtype)
        return {"energy": energy / s, "forces": forces / s}

    def predictions(self, module, graph) -> dict:
        energy, forces = energy_and_forces(module, graph, reference=False)
        return {"energy": energy, "forces": forces}

    def graph_weights(self, graph):
        return jnp.ones(jnp.shape(graph.n_node), jnp.float32)

    # ------------------------------------------------------------------ reports

    def report(self, data: ForceData, part: FramePart, raw: dict) -> dict:
        """:func:`~mpattn.train.metrics.force_metrics` of ``part``; the absolute predictions
        (eV, eV/Å, float64) under ``"_energy"`` / ``"_forces"``."""
        energy = raw["energy"] + part.baseline
        return force_metrics(energy, part.energy, raw["forces"], part.forces, part.n_atoms) | {
            "_energy": energy, "_forces": raw["forces"]}

    def row(self, report: dict) -> dict:
        return {"val_energy_mae_mev": report["energy_mae_mev"],
                "val_force_mae_mev_ang": report["force_mae_mev_ang"]}

    def state(self, data: ForceData) -> dict:
        return {"reference": data.reference.to_dict(), "dtype": data.dtype}
