"""What every model reads off a padded batch: edge geometry, masks, sizes."""

from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp
import jraph
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from mpattn.nn.radial import edge_distances

__all__ = ["GraphInputs", "check_max_nodes", "check_max_z", "check_smooth_activation",
           "graph_inputs"]

NOT_BONDED = 4


@dataclass
class GraphInputs:
    """Arrays shared by the layers of a model (see docs/design.md, "Graph contract")."""

    senders: Int[Array, " num_edges"]
    receivers: Int[Array, " num_edges"]
    distances: Float[Array, " num_edges"]
    bond: Int[Array, " num_edges"]
    n_node: Int[Array, " num_graphs"]
    edge_mask: Bool[Array, " num_edges"] | None
    #: pair slot of each edge (``edges["pair"]``, see ``mpattn.graph.edge_pairs``) or None
    pair: Int[Array, " num_edges"] | None = None
    #: edge vectors ``positions[senders] - positions[receivers] (+ shift)`` [num_edges, 3]
    vectors: Float[Array, "num_edges 3"] | None = None


def graph_inputs(graph: jraph.GraphsTuple, *, bonded_only: bool = False) -> GraphInputs:
    """Distances from positions (never stored), bond categories, optional bonded-only mask.

    Args:
        graph: a padded batch.
        bonded_only: mask out ``not bonded`` edges (messages and attention along bonds only,
            whatever edge set the graph carries).
    """
    senders = jnp.asarray(graph.senders)
    receivers = jnp.asarray(graph.receivers)
    vectors, distances = edge_distances(jnp.asarray(graph.nodes["positions"]), senders=senders,
                                  receivers=receivers, shift=graph.edges.get("shift"))
    bond = jnp.asarray(graph.edges["bond"]).astype(jnp.int32)
    return GraphInputs(
        senders=senders,
        receivers=receivers,
        distances=distances,
        bond=bond,
        n_node=jnp.asarray(graph.n_node),
        edge_mask=(bond != NOT_BONDED) if bonded_only else None,
        pair=jnp.asarray(graph.edges["pair"]) if "pair" in graph.edges else None,
        vectors=vectors,
    )


def check_max_nodes(graph: jraph.GraphsTuple, max_nodes: int, model: str) -> None:
    """ValueError if a real molecule of the batch has more atoms than ``max_nodes``.

    The dense per-molecule layout of the edge network has a static molecule size; call this
    eagerly on the data (trainers do) since it cannot raise inside ``jax.jit``.
    """
    n_node = np.asarray(graph.n_node)
    real = n_node[: int(np.nonzero(n_node)[0][-1])] if n_node.any() else n_node
    if real.size and real.max() > max_nodes:
        raise ValueError(f"{model}: a molecule has {int(real.max())} atoms, more than "
                         f"max_nodes={max_nodes} of the dense edge-network layout; raise "
                         "max_nodes in the model config")


def check_max_z(graph: jraph.GraphsTuple, max_z: int, model: str) -> None:
    """ValueError if an atomic number of the batch is above ``max_z`` (not embeddable); an
    eager check, since an out-of-range embedding index cannot raise inside ``jax.jit``."""
    z = np.asarray(graph.nodes["z"])
    if z.size and z.max() > max_z:
        raise ValueError(f"{model}: atomic number {int(z.max())} above max_z={max_z}")


def check_smooth_activation(activation: str) -> None:
    """ValueError unless ``activation`` is a smooth one of ``ACTIVATIONS`` (a potential's
    forces are its gradient: relu would make them jump)."""
    from mpattn.nn.update import ACTIVATIONS

    if activation not in ACTIVATIONS or activation == "relu":
        raise ValueError(f"activation must be a smooth one of "
                         f"{sorted(set(ACTIVATIONS) - {'relu'})} (relu makes forces "
                         f"discontinuous), got {activation!r}")
