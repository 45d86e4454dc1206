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
from mpattn.data.radius_graphs import RadiusGraphSet
from mpattn.potential import (
    Potential,
    Reference,
    energy_and_forces,
    energy_forces_stress,
    fit_reference,
)
from mpattn.train.metrics import force_breakdown, force_metrics
from mpattn.train.task import Task
from mpattn.train.terms import EnergyTerm, ForceTerm, StressTerm

__all__ = ["ENERGY_FIT_FILE", "EnergyForceTask", "ForceData", "FramePart", "posthoc_energy_fit"]


@dataclass
class FramePart:
    """One part of a split: device graphs with standardised targets, host truth in float64.

    ``graphs`` (a GraphSet, or for data whose edges would take over 1 GiB a
    :class:`~mpattn.data.radius_graphs.RadiusGraphSet`: the atoms, edges built per batch)
    holds ``nodes["forces"]`` = F/s and ``globals["energy"]`` = (E - Σ n_e E_e)/s
    (float32, float64 with ``x64``); ``energy`` [F] and ``forces`` [N, 3] are the absolute
    references (eV, eV/Å, float64) and ``baseline`` [F] the float64 ``Σ n_e E_e``.
    """

    graphs: GraphSet | RadiusGraphSet
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
    stress: bool = False  # graphs carry the stress targets (the task's stress weight > 0)

    @property
    def elements(self) -> tuple[int, ...]:
        return self.reference.elements

    def part(self, frames: FrameSet, name: str = "frames") -> FramePart:
        """Any frames as a part for evaluation (``trainer.report(data.part(frames))``), with
        this data's reference, cutoff and dtype; ``name`` goes into error messages."""
        if frames.forces is None:
            raise ValueError(f"{name}: {frames.source or 'frames'} has no forces")
        try:
            baseline = self.reference.energy(frames.z, frames.n_atoms)
        except ValueError as err:
            raise ValueError(f"{name} part: {err} (seen in training: {self.elements})") from err
        dtype = np.dtype(self.dtype)
        s = self.reference.scale
        nodes = {"z": frames.z.astype(np.int8), "positions": frames.positions.astype(dtype),
                 "forces": (frames.forces / s).astype(dtype)}
        glob = {"energy": ((frames.energy - baseline) / s).astype(dtype),
                "cell": frames.cell.astype(dtype)}
        if self.stress:
            has = frames.has_stress()
            stress = np.where(has[:, None, None], frames.stress if frames.stress is not None
                              else 0.0, 0.0)
            glob["stress"] = (stress / s).astype(dtype)
            glob["stress_weight"] = has.astype(dtype)
        gs = RadiusGraphSet(frames.n_atoms, nodes, frames.cell, frames.pbc, self.cutoff,
                            globals=glob, ids=frames.ids, source=frames.source).maybe_stored()
        return FramePart(gs, np.asarray(frames.energy, np.float64),  # no copies
                         np.asarray(frames.forces, np.float64), baseline,
                         frames.n_atoms.astype(np.int64), frames)


@dataclass(frozen=True)
class EnergyForceTask(Task):
    """Energies and forces of structures (molecules or periodic cells).

    Attributes:
        cutoff: radius (Å) of the neighbour graphs; must equal the model config's
            ``graph_cutoff`` (or ``cutoff``).
        beta: force weight β of the loss. Energies and forces are both divided by the RMS
            force ``s`` (so β trades comparable numbers); 0.99 follows SO3krates and makes
            forces, which fix the energy surface up to a constant, the main signal; 1 trains
            on forces alone (fit the energies afterwards: :func:`posthoc_energy_fit`).
        stress_weight: weight of the stress term (stress σ = (1/V) ∂E/∂ε of periodic frames
            that have one, divided by ``s`` like the forces; 0: no stress, and no strain
            derivative in the step).
    """

    cutoff: float = 5.0
    beta: float = 0.99
    stress_weight: float = 0.0

    kind: ClassVar[str] = "energy_forces"
    score_key: ClassVar[str] = "val_force_mae_mev_ang"
    rate_key: ClassVar[str] = "frames_per_s"

    @property
    def prediction_kinds(self) -> dict[str, str]:
        kinds = {"energy": "graph", "forces": "node"}
        return kinds | {"stress": "graph"} if self.stress_weight > 0 else kinds

    def check(self) -> EnergyForceTask:
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"--beta {self.beta}: the force weight must be in [0, 1]")
        if not self.cutoff > 0:
            raise ValueError(f"--cutoff {self.cutoff}: must be positive (Å)")
        if not (math.isfinite(self.stress_weight) and self.stress_weight >= 0):
            raise ValueError(f"--stress-weight {self.stress_weight}: must be >= 0 (0: off)")
        return self

    def check_data(self, data: ForceData) -> None:
        if not math.isclose(data.cutoff, self.cutoff):
            raise ValueError(f"the frames were prepared with cutoff {data.cutoff} Å, the task "
                             f"asks for {self.cutoff} Å")
        if data.stress != (self.stress_weight > 0):
            raise ValueError("the frames were prepared for another stress weight: prepare "
                             "them with this task")

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
        parts = dict(zip(("train", "val", "test"), (np.asarray(s, np.int64) for s in split),
                         strict=True))
        if not len(parts["train"]):
            raise ValueError("the training part is empty")
        train = frames.subset(parts["train"])
        elements = tuple(sorted(set(np.unique(train.z).tolist())))
        zs = [train.z[train.atom_index(i)] for i in range(len(train))]
        reference = fit_reference(zs, train.energy, elements, forces=train.forces)
        data = ForceData(None, None, None, reference, self.cutoff,
                         "float64" if x64 else "float32", stress=self.stress_weight > 0)
        if data.stress and not train.has_stress().any():
            raise ValueError(f"--stress-weight {self.stress_weight}: no training frame of "
                             f"{frames.source or 'the data'} has a stress (periodic frames "
                             "with a stress key)")
        for name, index in parts.items():
            setattr(data, name, data.part(train if name == "train" else frames.subset(index),
                                          name))
        return data

    # ------------------------------------------------------------------ model and loss

    def module(self, model, data) -> Potential:
        return Potential(model, reference=data.reference)

    def main_terms(self, config) -> list:
        terms = [EnergyTerm(loss=config.loss, weight=1.0 - self.beta),
                 ForceTerm(loss=config.loss, weight=self.beta)]
        if self.stress_weight > 0:
            terms.append(StressTerm(loss=config.loss, weight=self.stress_weight))
        return terms

    def predictions(self, module, graph) -> dict:
        """Residual energies (eV), forces (eV/Å) and, with a stress weight, stress (eV/Å³)."""
        if self.stress_weight > 0:
            energy, forces, stress = energy_forces_stress(module, graph, reference=False)
            return {"energy": energy, "forces": forces, "stress": stress}
        energy, forces = energy_and_forces(module, graph, reference=False)
        return {"energy": energy, "forces": forces}

    def outputs(self, module, graph) -> dict:
        """The predictions in units of the RMS force ``s`` (what the terms compare)."""
        out = self.predictions(module, graph)
        s = module.scale[...].astype(out["energy"].dtype)
        return {k: v / s for k, v in out.items()}

    def graph_weights(self, graph):
        return jnp.ones(jnp.shape(graph.n_node), jnp.float32)

    # ------------------------------------------------------------------ reports

    def report(self, data: ForceData, part: FramePart, raw: dict) -> dict:
        """:func:`~mpattn.train.metrics.force_metrics` of ``part``; the absolute predictions
        (eV, eV/Å, float64) under ``"_energy"`` / ``"_forces"``."""
        energy = raw["energy"] + part.baseline
        out = force_metrics(energy, part.energy, raw["forces"], part.forces, part.n_atoms)
        frames = part.frames
        out |= force_breakdown(energy, part.energy, raw["forces"], part.forces, part.n_atoms,
                               frames.z, frames.molecules)
        if "stress" in raw:
            has = frames.has_stress()
            if has.any():
                err = (raw["stress"][has] - frames.stress[has]) * 1000.0
                out["stress_mae_mev_ang3"] = float(np.mean(np.abs(err)))
                out["n_stress"] = int(has.sum())
            out["_stress"] = raw["stress"]
        return out | {"_energy": energy, "_forces": raw["forces"]}

    def row(self, report: dict) -> dict:
        return {"val_energy_mae_mev": report["energy_mae_mev"],
                "val_force_mae_mev_ang": report["force_mae_mev_ang"]}

    def state(self, data: ForceData) -> dict:
        return {"reference": data.reference.to_dict(), "dtype": data.dtype}


ENERGY_FIT_FILE = "energy_fit.json"


def posthoc_energy_fit(part: FramePart, energy, elements) -> np.ndarray:
    """Seed 004's post-hoc energy correction for a potential trained on forces alone (β = 1):
    per-element energies ``δ_e`` fitted by least squares so that ``E_model + Σ_e n_e δ_e``
    matches the reference energies of ``part`` (the training frames).

    Forces fix the energy surface only up to a constant per composition, so a force-only
    model's energies are off by a per-element offset that this recovers. No intercept: the
    correction must stay size-extensive to be part of the potential's reference (and a
    constant is collinear with the counts for a single molecule's frames). :func:`load_run`
    adds ``δ_e`` to the reference when the workdir holds :data:`ENERGY_FIT_FILE`.

    Args:
        part: frames with reference energies (``part.energy``, eV).
        energy: float [F] the model's absolute energies of the same frames (eV).
        elements: atomic numbers, the columns of the fit.

    Returns:
        float64 [len(elements)] ``δ_e`` in eV.
    """
    from mpattn.elements import element_counts, fit_linear_reference

    counts = element_counts(part.frames.z, part.n_atoms, elements)
    delta, _ = fit_linear_reference(counts, part.energy - np.asarray(energy, np.float64),
                                    intercept=False)
    return delta
