"""The PyTorch Geometric peers of our ``mpnn`` and ``schnet``, and our batches as PyG's.

Torch and PyG are imported lazily (the ``bench`` extra, ``pip install -e ".[bench]"``), so this
module imports without them; :func:`require_torch` says how to install them. The peers, their
fidelity to ours and their remaining differences are described in :mod:`benchmarks.peers`.
"""

from __future__ import annotations

import functools

import numpy as np

__all__ = ["INSTALL_HINT", "MODELS", "build_pyg", "edge_features", "pyg_arrays", "pyg_batch",
           "pyg_molecules", "require_torch", "synchronize", "torch_device",
           "torch_params"]

MODELS = ("mpnn", "schnet")
NUM_BOND_TYPES, NOT_BONDED = 5, 4
INSTALL_HINT = 'pip install -e ".[bench]"'


def require_torch():
    """``(torch, torch_geometric)``, or an ImportError that says how to install them."""
    try:
        import torch
        import torch_geometric
    except ImportError as exc:
        raise ImportError(f"benchmarks.peers needs PyTorch and PyTorch Geometric ({exc}); "
                          f"install them with: {INSTALL_HINT}") from exc
    return torch, torch_geometric


# ----------------------------------------------------------------------------- batches


def pyg_arrays(graph) -> dict[str, np.ndarray]:
    """The real molecules of a padded jraph batch as the numpy arrays of a PyG ``Batch``.

    Returns:
        ``x`` [n, F], ``z`` int64 [n], ``pos`` [n, 3], ``edge_index`` int64 [2, e] (row 0 our
        senders, row 1 our receivers: PyG's source -> target), ``bond`` int64 [e], ``batch``
        int64 [n] (molecule of each atom), ``ptr`` int64 [g + 1] and ``y`` [g] if the batch
        has ``globals["y"]``; padding nodes, edges and graphs dropped.
    """
    from mpattn.graph import edge_mask, graph_mask, node_mask

    nm, em, gm = (np.asarray(f(graph)) for f in (node_mask, edge_mask, graph_mask))
    n_node = np.asarray(graph.n_node)[gm].astype(np.int64)
    edge_index = np.stack([np.asarray(graph.senders)[em], np.asarray(graph.receivers)[em]])
    if edge_index.size and edge_index.max() >= nm.sum():  # real nodes come first (jraph)
        raise ValueError("pyg_arrays: a real edge points at a padding node")
    out = {"x": np.asarray(graph.nodes["features"])[nm],
           "z": np.asarray(graph.nodes["z"])[nm].astype(np.int64),
           "pos": np.asarray(graph.nodes["positions"])[nm],
           "edge_index": edge_index.astype(np.int64),
           "bond": np.asarray(graph.edges["bond"])[em].astype(np.int64),
           "batch": np.repeat(np.arange(len(n_node)), n_node),
           "ptr": np.concatenate([[0], np.cumsum(n_node)])}
    if "y" in graph.globals:
        out["y"] = np.asarray(graph.globals["y"])[gm]
    return out


def pyg_batch(arrays: dict[str, np.ndarray]):
    """A ``torch_geometric.data.Batch`` holding :func:`pyg_arrays`' arrays."""
    torch, _ = require_torch()
    from torch_geometric.data import Batch

    return Batch(**{k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()})


def pyg_molecules(gs) -> list:
    """One ``torch_geometric.data.Data`` per graph of a GraphSet (``globals["y"]`` as ``y``)."""
    torch, _ = require_torch()
    from torch_geometric.data import Data

    t = torch.from_numpy
    nodes = np.split(np.arange(int(gs.n_node.sum())), np.cumsum(gs.n_node)[:-1])
    edges = np.split(np.arange(int(gs.n_edge.sum())), np.cumsum(gs.n_edge)[:-1])
    y = np.asarray(gs.globals["y"], np.float32)
    return [Data(x=t(gs.nodes["features"][n]), z=t(gs.nodes["z"][n].astype(np.int64)),
                 pos=t(gs.nodes["positions"][n]),
                 edge_index=t(np.stack([gs.senders[e], gs.receivers[e]]).astype(np.int64)),
                 bond=t(gs.edges["bond"][e].astype(np.int64)), y=t(y[i:i + 1]))
            for i, (n, e) in enumerate(zip(nodes, edges, strict=True))]


# ----------------------------------------------------------------------------- PyG models


def edge_features(bond, dist, *, num_rbf: int, cutoff: float):
    """torch: ``one_hot(bond, 5) ⊕ gaussian_basis(dist, num_rbf, cutoff)`` [E, 5 + num_rbf]."""
    torch, _ = require_torch()
    mu = torch.linspace(0.0, cutoff, num_rbf, dtype=dist.dtype, device=dist.device)
    gamma = 0.5 / (cutoff / (num_rbf - 1)) ** 2
    rbf = torch.exp(-gamma * (dist[:, None] - mu) ** 2)
    one_hot = torch.nn.functional.one_hot(bond, NUM_BOND_TYPES).to(dist.dtype)
    return torch.cat([one_hot, rbf], dim=-1)


class _BatchEdges:
    """PyG SchNet's ``interaction_graph``: the current batch's edges closer than the cutoff."""

    def __init__(self, cutoff: float, bonded_only: bool):
        self.cutoff, self.bonded_only, self.edge_index, self.bond = cutoff, bonded_only, None, None

    def __call__(self, pos, batch):
        row, col = self.edge_index
        dist = (pos[row] - pos[col]).norm(dim=-1)
        keep = dist < self.cutoff
        if self.bonded_only:
            keep = keep & (self.bond != NOT_BONDED)
        return self.edge_index[:, keep], dist[keep]


@functools.cache
def _classes():
    torch, _ = require_torch()
    from torch import nn
    from torch.nn.functional import relu
    from torch_geometric.nn import NNConv, Set2Set
    from torch_geometric.nn.models import SchNet

    class PyGMPNN(nn.Module):
        """PyG's QM9 NNConv example sized and shaped as our MPNN (``forward(batch) -> [G]``)."""

        def __init__(self, c):
            super().__init__()
            if c.readout != "set2set" or c.aggregation not in ("sum", "mean"):
                raise ValueError("the PyG MPNN peer has a set2set readout and sum/mean "
                                 f"aggregation, got {c.readout!r}/{c.aggregation!r}")
            self.c, d = c, c.dim
            self.lin0 = nn.Linear(c.num_features, d)
            edge_nn = nn.Sequential(nn.Linear(NUM_BOND_TYPES + c.num_rbf, c.edge_hidden),
                                    nn.ReLU(), nn.Linear(c.edge_hidden, d * d))
            self.conv = NNConv(d, d, edge_nn, aggr={"sum": "add"}.get(c.aggregation, "mean"),
                               root_weight=False, bias=False)
            self.gru = nn.GRU(d, d)
            self.set2set = Set2Set(d, processing_steps=c.set2set_steps)
            self.lin1, self.lin2 = nn.Linear(2 * d, d), nn.Linear(d, 1)

        def forward(self, data):
            c, edge_index, bond = self.c, data.edge_index, data.bond
            if c.bonded_only:
                keep = bond != NOT_BONDED
                edge_index, bond = edge_index[:, keep], bond[keep]
            dist = (data.pos[edge_index[0]] - data.pos[edge_index[1]]).norm(dim=-1)
            e = edge_features(bond, dist, num_rbf=c.num_rbf, cutoff=c.cutoff)
            out = relu(self.lin0(data.x))
            h = out.unsqueeze(0)
            for _ in range(c.steps):
                m = relu(self.conv(out, edge_index, e))
                out, h = self.gru(m.unsqueeze(0), h)
                out = out.squeeze(0)
            out = self.set2set(out, data.batch, dim_size=data.num_graphs)
            return self.lin2(relu(self.lin1(out))).view(-1)

    class PyGSchNet(nn.Module):
        """PyG's SchNet with our config and the batch's own edges (``forward(batch) -> [G]``)."""

        def __init__(self, c):
            super().__init__()
            self.edges = _BatchEdges(c.cutoff, c.bonded_only)
            self.net = SchNet(hidden_channels=c.dim, num_filters=c.num_filters,
                              num_interactions=c.interactions, num_gaussians=c.num_rbf,
                              cutoff=c.cutoff, interaction_graph=self.edges, readout="add")

        def forward(self, data):
            self.edges.edge_index, self.edges.bond = data.edge_index, data.bond
            return self.net(data.z, data.pos, data.batch).view(-1)

    return {"mpnn": PyGMPNN, "schnet": PyGSchNet}


def torch_device(name: str | None = None):
    """The torch device of the peers: ``name`` ("cpu", "cuda", "cuda:1"), else CUDA when torch
    sees a GPU (JAX benchmarks there run on the GPU too), else the CPU."""
    torch, _ = require_torch()
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def synchronize(device) -> None:
    """Wait for the device's queued kernels (CUDA runs asynchronously; timing needs this)."""
    torch, _ = require_torch()
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_pyg(name: str, config=None, *, seed: int = 0, device=None):
    """The PyG peer of our model ``name`` (``config``: ours, default its default config), on
    ``device`` (default :func:`torch_device`)."""
    torch, _ = require_torch()
    from mpattn.models import default_config

    if name not in MODELS:
        raise ValueError(f"no PyG peer for {name!r}; choose from {list(MODELS)}")
    torch.manual_seed(seed)
    return _classes()[name](config or default_config(name)).to(device or torch_device())


def torch_params(model) -> int:
    """Trainable parameters of a torch module."""
    return int(sum(p.numel() for p in model.parameters() if p.requires_grad))
