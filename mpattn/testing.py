"""Invariance assertions for any model on any padded batch (used by the tests).

Each helper takes ``fn(graph) -> per-graph outputs`` ([num_graphs, ...]; e.g. a bound model
call) and a jraph-padded ``GraphsTuple`` of numpy arrays, transforms the *real* molecules
(atom permutation, rotation, translation, re-padding, re-composition) and compares the
outputs of the real graphs with ``np.testing.assert_allclose``.
"""

from __future__ import annotations

from collections.abc import Callable

import jraph
import numpy as np

__all__ = [
    "assert_composition_invariant",
    "assert_padding_invariant",
    "assert_permutation_invariant",
    "assert_rotation_invariant",
    "assert_translation_invariant",
    "permute_atoms",
    "random_rotation",
    "rotate",
    "translate",
]


def _node_ranges(graph) -> np.ndarray:
    off = np.concatenate([[0], np.cumsum(np.asarray(graph.n_node))])
    return off


def _num_real(graph: jraph.GraphsTuple, num_real_graphs: int | None) -> int:
    """Real graphs come first; jraph's padding graph is the last graph with any node."""
    if num_real_graphs is not None:
        return num_real_graphs
    return int(np.nonzero(np.asarray(graph.n_node))[0][-1])


def permute_atoms(graph: jraph.GraphsTuple, seed: int = 0,
                  num_real_graphs: int | None = None) -> jraph.GraphsTuple:
    """Randomly permute the atoms inside each real graph (and shuffle its edges' order).

    Node rows move, senders/receivers are remapped, and edges of each graph are reordered;
    padding nodes and edges stay where they are.
    """
    rng = np.random.default_rng(seed)
    g_real = _num_real(graph, num_real_graphs)
    noff = _node_ranges(graph)
    eoff = np.concatenate([[0], np.cumsum(np.asarray(graph.n_edge))])
    n_total = int(noff[-1])
    new_of_old = np.arange(n_total)
    for g in range(g_real):
        lo, hi = noff[g], noff[g + 1]
        new_of_old[lo:hi] = lo + rng.permutation(hi - lo)
    old_of_new = np.argsort(new_of_old)
    e_total = len(np.asarray(graph.senders))
    edge_order = np.arange(e_total)
    for g in range(g_real):
        lo, hi = eoff[g], eoff[g + 1]
        edge_order[lo:hi] = lo + rng.permutation(hi - lo)

    def nodes(a):
        return np.asarray(a)[old_of_new]

    def edges(a):
        return np.asarray(a)[edge_order]

    return graph._replace(
        nodes={k: nodes(v) for k, v in graph.nodes.items()},
        edges={k: edges(v) for k, v in graph.edges.items()},
        senders=new_of_old[np.asarray(graph.senders)][edge_order].astype(np.int32),
        receivers=new_of_old[np.asarray(graph.receivers)][edge_order].astype(np.int32),
    )


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random proper rotation matrix (QR of a Gaussian matrix, det +1)."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _per_graph_transform(graph, fn_of_graph, num_real_graphs):
    g_real = _num_real(graph, num_real_graphs)
    noff = _node_ranges(graph)
    eoff = np.concatenate([[0], np.cumsum(np.asarray(graph.n_edge))])
    pos = np.array(graph.nodes["positions"], copy=True)
    edges = dict(graph.edges)
    shift = np.array(edges["shift"], copy=True) if "shift" in edges else None
    for g in range(g_real):
        lo, hi = noff[g], noff[g + 1]
        rot, trans = fn_of_graph(g)
        pos[lo:hi] = pos[lo:hi] @ rot.T + trans
        if shift is not None:
            shift[eoff[g]:eoff[g + 1]] = shift[eoff[g]:eoff[g + 1]] @ rot.T
    if shift is not None:
        edges["shift"] = shift.astype(graph.edges["shift"].dtype)
    nodes = dict(graph.nodes)
    nodes["positions"] = pos.astype(graph.nodes["positions"].dtype)
    return graph._replace(nodes=nodes, edges=edges)


def rotate(graph, seed: int = 0, num_real_graphs: int | None = None):
    """Rotate each real molecule by its own random rotation about the origin."""
    rng = np.random.default_rng(seed)
    rots = {}

    def f(g):
        rots[g] = random_rotation(rng)
        return rots[g], np.zeros(3)

    return _per_graph_transform(graph, f, num_real_graphs)


def translate(graph, seed: int = 0, scale: float = 10.0, num_real_graphs: int | None = None):
    """Translate each real molecule by its own random vector (|t| ~ ``scale`` Å)."""
    rng = np.random.default_rng(seed)
    return _per_graph_transform(graph, lambda g: (np.eye(3), rng.normal(size=3) * scale),
                                num_real_graphs)


def _compare(a, b, num_real: int, rtol: float, atol: float, what: str) -> None:
    a, b = np.asarray(a)[:num_real], np.asarray(b)[:num_real]
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, err_msg=f"not {what}")


def assert_permutation_invariant(fn: Callable, graph, *, seed: int = 0, rtol: float = 1e-5,
                                 atol: float = 1e-5, num_real_graphs: int | None = None) -> None:
    """``fn`` gives the same per-graph outputs after permuting atoms within molecules."""
    n = _num_real(graph, num_real_graphs)
    _compare(fn(graph), fn(permute_atoms(graph, seed, n)), n, rtol, atol,
             "permutation invariant")


def assert_rotation_invariant(fn: Callable, graph, *, seed: int = 0, rtol: float = 1e-5,
                              atol: float = 1e-5, num_real_graphs: int | None = None) -> None:
    """``fn`` gives the same per-graph outputs after rotating each molecule."""
    n = _num_real(graph, num_real_graphs)
    _compare(fn(graph), fn(rotate(graph, seed, n)), n, rtol, atol, "rotation invariant")


def assert_translation_invariant(fn: Callable, graph, *, seed: int = 0, rtol: float = 1e-5,
                                 atol: float = 1e-5, num_real_graphs: int | None = None) -> None:
    """``fn`` gives the same per-graph outputs after translating each molecule."""
    n = _num_real(graph, num_real_graphs)
    _compare(fn(graph), fn(translate(graph, seed, num_real_graphs=n)), n, rtol, atol,
             "translation invariant")


def assert_padding_invariant(fn: Callable, gs, index, budgets, *, rtol: float = 1e-5,
                             atol: float = 1e-5) -> None:
    """The same molecules padded to each budget in ``budgets`` give the same outputs.

    Args:
        fn: per-graph outputs of a padded GraphsTuple.
        gs: a :class:`~mpattn.data.graphset.GraphSet`.
        index: positions of the molecules in ``gs``.
        budgets: two or more :class:`~mpattn.graph.Budget` that all fit them.
    """
    from mpattn.graph import pad_batch

    index = np.asarray(index)
    outs = [np.asarray(fn(pad_batch(gs, index, b)))[: len(index)] for b in budgets]
    for b, o in zip(budgets[1:], outs[1:], strict=True):
        np.testing.assert_allclose(o, outs[0], rtol=rtol, atol=atol,
                                   err_msg=f"outputs change when padded to {b}")


def assert_composition_invariant(fn: Callable, gs, index, others, budget, *, seed: int = 0,
                                 rtol: float = 1e-5, atol: float = 1e-5) -> None:
    """Molecules give the same outputs whatever other molecules share their batch.

    ``index`` is batched alone, then shuffled together with ``others``; each molecule's
    output must not change (compared by position in ``gs``).
    """
    from mpattn.graph import pad_batch

    index, others = np.asarray(index), np.asarray(others)
    alone = np.asarray(fn(pad_batch(gs, index, budget)))[: len(index)]
    mixed_idx = np.random.default_rng(seed).permutation(np.concatenate([index, others]))
    mixed = np.asarray(fn(pad_batch(gs, mixed_idx, budget)))[: len(mixed_idx)]
    where = {int(m): k for k, m in enumerate(mixed_idx)}
    got = mixed[[where[int(i)] for i in index]]
    np.testing.assert_allclose(got, alone, rtol=rtol, atol=atol,
                               err_msg="outputs depend on the other molecules in the batch")
