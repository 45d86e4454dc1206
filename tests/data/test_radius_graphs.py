"""RadiusGraphSet: the atoms kept compact, the edges built per batch exactly as stored radius
graphs would hold them."""

from __future__ import annotations

import numpy as np
import pytest
from ase.build import bulk

from mpattn.data.frames import ethanol_xtb_path, read_frames
from mpattn.data.frameset import FrameSet
from mpattn.data.loader import BatchLoader
from mpattn.data.radius_graphs import RadiusGraphSet


def _lazy(frames: FrameSet, cutoff: float, dtype=np.float64) -> RadiusGraphSet:
    nodes = {"z": frames.z.astype(np.int8), "positions": frames.positions.astype(dtype)}
    return RadiusGraphSet(frames.n_atoms, nodes, frames.cell, frames.pbc, cutoff,
                          globals={"energy": frames.energy}, ids=frames.ids)


def _mixed() -> FrameSet:
    ethanol = read_frames(ethanol_xtb_path()).subset(np.arange(5))
    cu = bulk("Cu", cubic=True) * (2, 2, 1)
    cu.rattle(0.05, seed=1)
    n = len(cu)
    return FrameSet(
        n_atoms=np.concatenate([ethanol.n_atoms, [n]]),
        z=np.concatenate([ethanol.z, cu.numbers]),
        positions=np.concatenate([ethanol.positions, cu.positions]),
        energy=np.concatenate([ethanol.energy, [0.0]]),
        cell=np.concatenate([ethanol.cell, [np.asarray(cu.cell)]]),
        pbc=np.concatenate([ethanol.pbc, [[True] * 3]]))


@pytest.mark.parametrize("cutoff", [2.0, 4.5])
def test_materialized_edges_equal_stored_radius_graphs(cutoff):
    frames = _mixed()
    stored = frames.to_graphset(cutoff)
    lazy = _lazy(frames, cutoff)
    np.testing.assert_array_equal(lazy.n_edge, stored.n_edge)
    index = np.array([5, 0, 3])
    a, b = lazy.materialize(index), stored.subset(index)
    for name in ("n_node", "n_edge", "senders", "receivers", "ids"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    for name in ("bond", "shift"):
        np.testing.assert_array_equal(a.edges[name], b.edges[name], err_msg=name)
    assert a.nodes["z"].dtype == np.int32 and a.nodes["features"].shape == (a.n_node.sum(), 0)
    np.testing.assert_array_equal(a.nodes["z"], b.nodes["z"])
    np.testing.assert_array_equal(a.globals["energy"], b.globals["energy"])
    if cutoff > 2.6:  # beyond copper's nearest-neighbour distance: periodic images
        assert np.abs(a.edges["shift"]).max() > 0


def test_the_loader_builds_the_same_batches_from_either():
    frames = _mixed()
    stored = frames.to_graphset(4.0)
    stored.nodes["positions"] = frames.positions.copy()
    stored.globals = {"energy": frames.energy}
    lazy = _lazy(frames, 4.0)
    one = list(BatchLoader(stored, 3, seed=2, prefetch=2))
    two = list(BatchLoader(lazy, 3, seed=2, prefetch=2))
    assert len(one) == len(two) > 1
    for x, y in zip(one, two, strict=True):
        for name in ("senders", "receivers", "n_node", "n_edge"):
            np.testing.assert_array_equal(getattr(x, name), getattr(y, name))
        np.testing.assert_array_equal(x.edges["shift"], y.edges["shift"])
        np.testing.assert_array_equal(x.nodes["positions"], y.nodes["positions"])
        np.testing.assert_array_equal(x.globals["id"], y.globals["id"])


def test_memory_grows_with_atoms_not_edges():
    frames = read_frames(ethanol_xtb_path()).subset(np.arange(50))
    stored = frames.to_graphset(5.0)
    lazy = _lazy(frames, 5.0, np.float32)
    edge_bytes = sum(v.nbytes for v in stored.edges.values()) + stored.senders.nbytes * 2
    assert lazy.nbytes() < edge_bytes / 5
    assert lazy.nodes["z"].dtype == np.int8 and lazy.nodes["positions"].dtype == np.float32


def test_a_frame_that_changed_since_counting_is_an_error():
    lazy = _lazy(_mixed(), 4.0)
    lazy.nodes["positions"][:9] *= 0.5  # ethanol squeezed: more pairs within the cutoff
    with pytest.raises(RuntimeError, match="frame 0: .* edges now, .* when counted"):
        lazy.materialize([0])


def test_small_edge_sets_are_stored_large_ones_built_per_batch():
    lazy = _lazy(_mixed(), 4.0)
    stored = lazy.maybe_stored()
    assert not hasattr(stored, "materialize") and len(stored.senders) == lazy.n_edge.sum()
    assert lazy.maybe_stored(max_bytes=lazy.edge_nbytes() - 1) is lazy


def test_a_slab_is_refused_naming_its_frame():
    frames = _mixed()
    frames.pbc[5] = [True, True, False]
    with pytest.raises(ValueError, match="frame 5: radius_edges: mixed periodicity"):
        _lazy(frames, 4.0)
