"""The loss as a list of named, weighted terms.

A task builds its main terms (the property task: :class:`TargetTerm`; the energy+forces
task: :class:`EnergyTerm`, :class:`ForceTerm` and, with a stress weight,
:class:`StressTerm`) and takes auxiliary ones from its ``aux``
setting (:class:`Denoising`, :class:`Dipole`). The train step computes the model's output
mapping once and sums ``weight · term(outputs, graph, context)`` in list order; the engine
knows nothing about any particular term.

A term may also:
- ask for a model head (``model_config(config)`` returns the model config with it on, or
  raises naming what is missing), e.g. the denoising head;
- perturb the batch before the model sees it (``perturb(graph, key)`` returns the new graph
  and what the term needs to remember, e.g. the noise);
- ask for per-graph data that the task's preparation must carry (``data_keys``, e.g. QM9's
  dipole moment ``"mu"``).

Auxiliary terms are recorded in checkpoints as ``{"name": ..., **fields}``
(:func:`aux_to_dict`, :func:`aux_from_dict`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import jax
import jax.numpy as jnp

from mpattn.graph import graph_mask, node_mask
from mpattn.nn.electrostatics import DEBYE, dipole_moment
from mpattn.train.losses import energy_term, force_term, graph_weights, loss_value, stress_term

__all__ = [
    "AUX_TERMS",
    "Denoising",
    "Dipole",
    "EnergyTerm",
    "ForceTerm",
    "StressTerm",
    "TargetTerm",
    "add_position_noise",
    "aux_from_dict",
    "aux_to_dict",
    "dipole_error",
    "masked_node_mean",
]


class _Term:
    """Defaults of the optional parts of a term."""

    data_keys: ClassVar[tuple[str, ...]] = ()
    perturbs: ClassVar[bool] = False  # True: perturb() changes the batch

    def model_config(self, config):
        return config

    def perturb(self, graph, key):
        return graph, None


@dataclass(frozen=True)
class TargetTerm(_Term):
    """A per-graph target ``graph.globals["y"]`` against ``outputs["energy"]``: the weighted
    mean of :func:`~mpattn.train.losses.loss_value` (size weightings of the SchNet study)."""

    loss: str = "l1"
    weighting: str = "none"
    weight_r: float = 1.0
    weight: float = 1.0
    name: ClassVar[str] = "target"

    def __call__(self, outputs, graph, context):
        return loss_value(self.loss, outputs["energy"], graph.globals["y"], graph_mask(graph),
                          graph.n_node, weighting=self.weighting, r=self.weight_r)

    def graph_weights(self, graph):
        """Per-graph weights of the size weighting (they weigh batches across devices)."""
        return graph_weights(self.weighting, graph.n_node, r=self.weight_r)


@dataclass(frozen=True)
class EnergyTerm(_Term):
    """Energies per molecule, ``globals["energy"]`` against ``outputs["energy"]``."""

    loss: str = "mse"
    weight: float = 0.01
    name: ClassVar[str] = "energy"

    def __call__(self, outputs, graph, context):
        return energy_term(outputs["energy"], graph.globals["energy"], graph, loss=self.loss)


@dataclass(frozen=True)
class ForceTerm(_Term):
    """Force components, ``nodes["forces"]`` against ``outputs["forces"]``."""

    loss: str = "mse"
    weight: float = 0.99
    name: ClassVar[str] = "forces"

    def __call__(self, outputs, graph, context):
        return force_term(outputs["forces"], graph.nodes["forces"], graph, loss=self.loss)


@dataclass(frozen=True)
class StressTerm(_Term):
    """Stress of the structures that have one, ``globals["stress"]`` against
    ``outputs["stress"]`` (weighted by ``globals["stress_weight"]``: 1 where the structure
    has a reference stress, 0 elsewhere)."""

    loss: str = "mse"
    weight: float = 1.0
    name: ClassVar[str] = "stress"

    def __call__(self, outputs, graph, context):
        return stress_term(outputs["stress"], graph.globals["stress"], graph,
                           weights=graph.globals["stress_weight"], loss=self.loss)


def add_position_noise(graph, key, sigma: float):
    """``graph`` with ``sigma`` (Å) times standard normal noise on the real atoms' positions,
    and the noise in units of ``sigma`` [num_nodes, 3] (0 on padding nodes)."""
    pos = jnp.asarray(graph.nodes["positions"])
    noise = jnp.where(node_mask(graph)[:, None],
                      jax.random.normal(key, pos.shape, pos.dtype), 0.0)
    return graph._replace(nodes={**graph.nodes, "positions": pos + sigma * noise}), noise


def masked_node_mean(values, graph):
    """Mean over the real nodes of ``values`` [num_nodes, ...] summed over trailing axes."""
    per_node = jnp.sum(values.reshape(values.shape[0], -1), axis=1)
    mask = node_mask(graph)
    return jnp.sum(jnp.where(mask, per_node, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


@dataclass(frozen=True)
class Denoising(_Term):
    """Noisy nodes (Godwin et al., ICLR 2022): the batch's positions get Gaussian noise of
    ``sigma`` Å, every other term reads the noisy batch, and the model's ``"noise"`` output
    (its denoising head, switched on here) is fitted to the noise in units of ``sigma`` by
    mean squared error. Needs a model with a denoising head (``so3krates``, or
    ``attention`` with ``vector_features``)."""

    sigma: float = 0.02
    weight: float = 0.1
    name: ClassVar[str] = "denoise"
    perturbs: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if not (self.sigma > 0 and self.weight >= 0):
            raise ValueError(f"denoising needs sigma > 0 and weight >= 0, got {self.sigma}, "
                             f"{self.weight}")

    def model_config(self, config):
        if not hasattr(config, "denoise") or not getattr(config, "vector_features", True):
            raise ValueError(f"--denoise-sigma {self.sigma}: denoising needs a model with a "
                             "denoising head: so3krates, or attention with vector_features "
                             "(--model-config '{\"vector_features\": true}'), got "
                             f"{type(config).__name__} without one (--denoise-sigma 0 turns "
                             "denoising off)")
        return dataclasses.replace(config, denoise=True)

    def perturb(self, graph, key):
        return add_position_noise(graph, key, self.sigma)

    def __call__(self, outputs, graph, context):
        return masked_node_mean(jnp.square(outputs["noise"] - context), graph)


def dipole_error(q, graph):
    """Mean over the real graphs of ``| |Σ q_i r_i| / DEBYE - mu |`` (Debye): the length of
    the charges' dipole against ``graph.globals["mu"]`` (QM9 gives the length only)."""
    mu = dipole_moment(q, jnp.asarray(graph.nodes["positions"]), graph.n_node)
    length = jnp.sqrt(jnp.sum(mu * mu, axis=-1) + 1e-12) / DEBYE
    mask = graph_mask(graph)
    err = jnp.where(mask, jnp.abs(length - graph.globals["mu"]), 0.0)
    return jnp.sum(err) / jnp.maximum(jnp.sum(mask), 1)


@dataclass(frozen=True)
class Dipole(_Term):
    """PhysNet's dipole supervision: the length of ``Σ q_i r_i`` of the model's ``"charges"``
    against the data's dipole moment ``mu`` (Debye), absolute error. It teaches the charges
    of the Coulomb term in e, which energies alone do not. Needs ``attention`` with
    ``electrostatics`` and data with ``mu`` (QM9)."""

    weight: float = 0.1
    name: ClassVar[str] = "dipole"
    data_keys: ClassVar[tuple[str, ...]] = ("mu",)

    def __post_init__(self) -> None:
        if not self.weight >= 0:
            raise ValueError(f"--dipole-weight {self.weight}: must be >= 0")

    def model_config(self, config):
        if not getattr(config, "electrostatics", False):
            raise ValueError(f"--dipole-weight {self.weight}: the dipole loss needs a model "
                             "with atomic charges: attention with electrostatics "
                             "(--model-config '{\"electrostatics\": true}')")
        return config

    def __call__(self, outputs, graph, context):
        return dipole_error(outputs["charges"], graph)


#: name -> class of the auxiliary terms a task's ``aux`` may hold
AUX_TERMS: dict[str, type] = {"denoise": Denoising, "dipole": Dipole}


def aux_to_dict(term) -> dict:
    """``{"name": ..., **fields}`` of an auxiliary term (JSON-able)."""
    return {"name": term.name, **dataclasses.asdict(term)}


def aux_from_dict(d: dict):
    """Inverse of :func:`aux_to_dict` (ValueError naming an unknown term)."""
    fields = dict(d)
    name = fields.pop("name", None)
    if name not in AUX_TERMS:
        raise ValueError(f"unknown loss term {name!r}; choose from {sorted(AUX_TERMS)}")
    return AUX_TERMS[name](**fields)
