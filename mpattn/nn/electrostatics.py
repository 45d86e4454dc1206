"""Electrostatics between learned atomic charges: neutral charges, their dipole, and a
damped, smoothly cut Coulomb energy (PhysNet, Unke & Meuwly, JCTC 15, 3678 (2019)).

Pure functions on segment indices; a model holds the charge head and the Coulomb scale as
its own parameters (:class:`~mpattn.models.attention.AttentionModel` with
``electrostatics=True``). With charges in e (the dipole loss teaches them,
:mod:`mpattn.train.terms`), the Coulomb sum times ``k_e`` (:data:`COULOMB_SCALE_INIT`) is in
eV.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from mpattn.ops import graph_index, segment_sum

__all__ = [
    "CHARGE_INIT",
    "COULOMB_SCALE_INIT",
    "DEBYE",
    "coulomb_energy",
    "dipole_moment",
    "neutral_charges",
]

#: Scale of a charge head's initial weights (``normal(CHARGE_INIT / sqrt(dim))``): charges
#: start near 0, so the first epochs belong to the rest of the model rather than to a random
#: quadratic energy (``tests/models/test_attention_model.py`` bounds the starting charges).
CHARGE_INIT = 0.03

#: Initial (learned) scale of the Coulomb sum: ``k_e`` in eV Å / e².
COULOMB_SCALE_INIT = 14.399645

#: One Debye in e Å.
DEBYE = 0.20819434


def neutral_charges(raw: Float[Array, " num_nodes"], n_node: Int[Array, " num_graphs"],
                    mask: Bool[Array, " num_nodes"]) -> Float[Array, " num_nodes"]:
    """Per-atom charges whose sum is 0 in every graph: ``q_i = raw_i - mean_{j in G(i)} raw_j``
    over the real atoms (PhysNet's correction, spread evenly); padding nodes get 0."""
    seg = graph_index(n_node, raw.shape[0])
    raw = jnp.where(mask, raw, 0.0)
    count = segment_sum(mask.astype(raw.dtype), seg, num_segments=n_node.shape[0])
    mean = segment_sum(raw, seg, num_segments=n_node.shape[0]) / jnp.maximum(count, 1.0)
    return jnp.where(mask, raw - mean[seg], 0.0)


def dipole_moment(q: Float[Array, " num_nodes"], positions: Float[Array, "num_nodes 3"],
                  n_node: Int[Array, " num_graphs"]) -> Float[Array, "num_graphs 3"]:
    """``μ_G = Σ_{i in G} q_i r_i`` [num_graphs, 3] (e Å for charges in e; independent of the
    origin when each graph's charges sum to 0, as :func:`neutral_charges` makes them)."""
    seg = graph_index(n_node, q.shape[0])
    return segment_sum(q[:, None] * positions, seg, num_segments=n_node.shape[0])


def coulomb_energy(q: Float[Array, " num_nodes"], distances: Float[Array, " num_edges"],
                   envelope: Float[Array, " num_edges"], *, senders: Int[Array, " num_edges"],
                   receivers: Int[Array, " num_edges"]) -> Float[Array, " num_nodes"]:
    """Per-atom shares of a damped, smoothly cut Coulomb energy over the graph's edges:
    ``E_i = ½ Σ_{e: receiver i} q_i q_{s_e} f(r_e) / sqrt(r_e² + 1)`` (r in Å).

    Every pair is two directed edges (all our edge sets are symmetric), so the shares sum to
    ``Σ_{pairs} q_i q_j f(r) / sqrt(r² + 1)``. The ``+1`` damps the singularity at short range
    (where the message passing describes the energy anyway); the envelope ``f`` takes the term
    smoothly to 0 at its cutoff, so forces stay continuous. ``k_e`` is left to the caller.
    """
    pair = q[receivers] * q[senders] * envelope * jax.lax.rsqrt(distances * distances + 1.0)
    return 0.5 * segment_sum(pair, receivers, num_segments=q.shape[0])
