"""Shared helpers of the potential tests (tests/test_potential.py, tests/models/
test_attention_model.py): small models, radius graphs, padding, jitted energies and forces,
finite differences."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jraph
import numpy as np
from ase.build import bulk, molecule
from flax import nnx

from mpattn.graph import edge_pairs, graph_mask
from mpattn.models.attention import AttentionConfig, AttentionModel
from mpattn.models.schnet import SchNet, SchNetConfig
from mpattn.models.so3krates import So3krates, So3kratesConfig
from mpattn.neighbors import radius_edges
from mpattn.potential import Potential, Reference, energy_and_forces

# the softmax weights the attention model had by default when these tests were written
CFG = AttentionConfig(dim=16, num_heads=2, head_dim=8, steps=2, ff_dim=32, num_rbf=8,
                      cutoff=4.0, attention_weights="softmax")
SCHNET = SchNetConfig(dim=16, num_filters=16, interactions=2, num_rbf=8, cutoff=4.0)
SO3 = So3kratesConfig(dim=16, max_degree=3, num_heads=2, degree_dim=4, steps=2, mix_dim=16,
                      num_rbf=8, cutoff=4.0)
# one attention block: quicker to compile (the trained ethanol members of tests/conftest.py)
TINY = {"dim": 16, "num_heads": 2, "head_dim": 8, "steps": 1, "ff_dim": 16, "num_rbf": 8,
        "cutoff": 4.0, "attention_weights": "softmax"}
REF = Reference((1, 6, 8), np.array([-13.6, -1029.5, -2042.6]), scale=0.7)
# One padding budget per kind of batch: every call of a potential compiles once per dtype.
MOL = (48, 384, 16)  # (n_node, n_edge, n_graph) of molecular batches
PBC = (16, 320, 3)  # of periodic ones


@functools.cache
def potentials() -> dict[str, Potential]:
    """Small potentials, built once per session: attention (smooth and plain softmax, vector
    channels, silu weights, electrostatics), SchNet and SO3krates. Tests must not change them.

    Built with float64 JAX, as the module fixture they replace was (first used by a float64
    test): the reference table and scale are float64 arrays, the parameters float32.
    """
    prev = jax.config.read("jax_enable_x64")
    jax.config.update("jax_enable_x64", True)
    try:
        return _build_potentials()
    finally:
        jax.config.update("jax_enable_x64", prev)


def _build_potentials() -> dict[str, Potential]:
    attn = AttentionModel(CFG, rngs=nnx.Rngs(0))

    def attention(**changes):
        return Potential(AttentionModel(dataclasses.replace(CFG, **changes), rngs=nnx.Rngs(0)),
                         reference=REF)

    return {
        "attention": Potential(attn, reference=REF),
        "schnet": Potential(SchNet(SCHNET, rngs=nnx.Rngs(0)), reference=REF),
        "so3krates": Potential(So3krates(SO3, rngs=nnx.Rngs(0)), reference=REF),
        "vector": attention(vector_features=True),
        "vector_sum": attention(vector_features=True, vector_messages="sum"),
        "silu": attention(vector_features=True, vector_messages="sum",
                          attention_weights="silu"),
        "coulomb": attention(vector_features=True, vector_messages="sum",
                             attention_weights="silu", electrostatics=True),
        # the attention within 2.5 Å, the Coulomb term over the graph's 4 Å
        "coulomb_long": attention(vector_features=True, vector_messages="sum",
                                  attention_weights="silu", electrostatics=True, cutoff=2.5,
                                  coulomb_cutoff=CFG.cutoff),
        "plain": attention(smooth=False, steps=1),
        "crystal": Potential(attn, elements=("Si", "Cu")),
    }


def radius_graph(z, pos, cutoff, cell=None, pbc=None) -> jraph.GraphsTuple:
    """A graph as the frame readers build it: Z, positions, width-0 features, radius edges."""
    s, r, shift = radius_edges(pos, cutoff, cell, pbc)
    edges = {"bond": np.full(len(s), 4, np.int32)}
    if pbc is not None:  # integer image shifts times the cell, in float64
        cell = np.asarray(cell, np.float64)
        edges["shift"] = np.rint(shift @ np.linalg.inv(cell)) @ cell
    return jraph.GraphsTuple(
        nodes={"z": np.asarray(z, np.int32), "positions": np.asarray(pos, np.float64),
               "features": np.zeros((len(z), 0), np.float32)},
        edges=edges, senders=s, receivers=r, n_node=np.array([len(z)], np.int32),
        n_edge=np.array([len(s)], np.int32), globals={})


def pad(graphs, budget=MOL, dtype=np.float32):
    g = jraph.pad_with_graphs(jraph.batch_np(list(graphs)), *budget)
    nodes = {**g.nodes, "positions": g.nodes["positions"].astype(dtype)}
    edges = {k: (v.astype(dtype) if k == "shift" else v) for k, v in g.edges.items()}
    return g._replace(nodes=nodes, edges=edges)


@functools.partial(jax.jit, static_argnums=0)
def _energy_and_forces(graphdef, state, graph):
    return energy_and_forces(nnx.merge(graphdef, state), graph)


def run(pot, graph):
    """Jitted energies [num_graphs] and forces [num_nodes, 3] as numpy arrays."""
    return tuple(np.asarray(a) for a in _energy_and_forces(*nnx.split(pot), graph))


def fd_forces(pot, graph, h=1e-4):
    """Minus the central finite-difference gradient of the real-graph energy (float64)."""
    n_real = int(graph.n_node[np.asarray(graph_mask(graph))].sum())
    pos0 = np.asarray(graph.nodes["positions"], np.float64)
    fd = np.zeros((n_real, 3))
    for i in range(n_real):
        for k in range(3):
            e = []
            for step in (h, -h):
                pos = pos0.copy()
                pos[i, k] += step
                e.append(run(pot, graph._replace(nodes={**graph.nodes, "positions": pos}))[0])
            fd[i, k] = -(e[0] - e[1]).sum() / (2 * h)
    return fd


def ethanol(seed=0):
    a = molecule("CH3CH2OH")
    a.rattle(0.05, seed=seed)
    return a


def crystals():
    """Rattled diamond Si and fcc Cu, cubic cells (8 and 4 atoms)."""
    si = bulk("Si", "diamond", a=5.43, cubic=True)
    si.rattle(0.1, seed=1)
    cu = bulk("Cu", "fcc", a=3.61, cubic=True)
    cu.rattle(0.1, seed=2)
    return si, cu


def with_pairs(graph):
    """The graph with ``edges["pair"]`` over its real edges (as pad_batch/pad_structure add)."""
    real = int(graph.n_edge[np.asarray(graph_mask(graph))].sum())
    shift = graph.edges["shift"][:real] if "shift" in graph.edges else None
    pair = edge_pairs(graph.senders[:real], graph.receivers[:real], shift,
                      num_edges=graph.senders.shape[0])
    assert pair is not None
    return graph._replace(edges={**graph.edges, "pair": pair})


def share_weights(src: nnx.Module, dst: nnx.Module) -> None:
    """Copy into ``dst`` every variable of ``src`` at the same path (``dst``'s own variables
    that ``src`` lacks, e.g. an extra head, keep their values)."""
    flat = dict(nnx.to_flat_state(nnx.state(src)))
    nnx.update(dst, nnx.from_flat_state([(path, flat[path])
                                         for path, _ in nnx.to_flat_state(nnx.state(dst))
                                         if path in flat]))
