"""Tests of benchmarks/peers.py: ratios and the speed table, batch conversion, the
missing-torch error (all without torch), and with PyG installed: parameter counts, the PyG
peers computing our models' function given our weights, a train step, the pipelined and
sync-every-step timing paths with several of our steps per call. The equal-time comparison:
tests/test_benchmarks_peers_accuracy.py."""

from __future__ import annotations

import builtins
import importlib.util

import numpy as np
import pytest

from benchmarks.peers import (
    SPEED_HEADER,
    format_speed_row,
    main,
    ratio,
    speed_header,
)
from benchmarks.pyg_models import pyg_arrays, require_torch
from mpattn.graph import Budget, pad_batch


def test_ratio_and_its_error():
    np.testing.assert_allclose(ratio(163.0, 26.0), 6.269230769230769, rtol=1e-15)
    np.testing.assert_allclose(ratio(217.0, 252.0), 0.8611111111111112, rtol=1e-15)
    with pytest.raises(ValueError, match=r"^ratio: the peer's throughput must be positive, "
                                         r"got 0.0$"):
        ratio(1.0, 0.0)


def _speed_row():
    ours = {"params": 614_529, "train_mol_per_s": 163.04, "infer_mol_per_s": 812.0,
            "compile_s_train": 9.25, "compile_s_infer": 3.0}
    pyg = {"params": 614_977, "train_mol_per_s": 26.0, "infer_mol_per_s": 100.0}
    return {"model": "mpnn", "batch_size": 128, "ours": ours, "pyg": pyg,
            "train_ratio": ratio(163.04, 26.0), "infer_ratio": ratio(812.0, 100.0)}


def test_format_speed_row_fields_and_alignment():
    line = format_speed_row(_speed_row())
    head, train, infer, comp = (part.split() for part in line.split("|"))
    assert head == ["mpnn", "128", "614,529/614,977"]
    assert train == ["163.0", "26.0", "6.27x"]
    assert infer == ["812.0", "100.0", "8.12x"]
    assert comp == ["12.2"]  # 9.25 + 3.0
    assert [i for i, c in enumerate(line) if c == "|"] == [
        i for i, c in enumerate(SPEED_HEADER) if c == "|"]


def test_format_speed_row_shows_our_steps_per_call_above_one():
    line = format_speed_row(_speed_row() | {"steps_per_call": 4})
    assert line.split()[-2:] == ["12.2", "4"]
    assert len(line) == len(speed_header(4)) and speed_header(4).endswith(" steps/call")
    assert speed_header(1) == SPEED_HEADER
    assert len(format_speed_row(_speed_row() | {"steps_per_call": 1})) == len(SPEED_HEADER)


@pytest.mark.parametrize(("args", "message"), [
    (["--steps-per-call", "-2"], "--steps-per-call must be >= 1, got -2"),
    (["--batches", "3", "--steps-per-call", "4"],
     "--batches (3) must be at least --steps-per-call (4)"),
])
def test_main_rejects_bad_steps_per_call(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:  # an argument error, before torch or QM9
        main(["--no-save", *args])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().endswith(message)


def test_pyg_arrays_drops_padding_and_matches_per_graph_loops(qm9_graphset):
    gs = qm9_graphset
    index = np.array([5, 0, 17, 3])
    n = int(gs.n_node[index].sum())
    e = int(gs.n_edge[index].sum())
    graph = pad_batch(gs, index, Budget(n_node=n + 40, n_edge=e + 100, n_graph=7))
    graph = graph._replace(globals={"y": np.arange(7, dtype=np.float32)})
    got = pyg_arrays(graph)
    # plain loops over the graphs, one at a time, with their nodes renumbered by hand
    xs, zs, pos, src, dst, bonds, batch = [], [], [], [], [], [], []
    offset = 0
    for k, i in enumerate(index):
        g = gs.graph(int(i))
        xs.append(g.nodes["features"])
        zs.append(g.nodes["z"])
        pos.append(g.nodes["positions"])
        for s, r, b in zip(g.senders, g.receivers, g.edges["bond"], strict=True):
            src.append(int(s) + offset)
            dst.append(int(r) + offset)
            bonds.append(int(b))
        batch += [k] * int(g.n_node[0])
        offset += int(g.n_node[0])
    assert set(got) == {"x", "z", "pos", "edge_index", "bond", "batch", "ptr", "y"}
    np.testing.assert_array_equal(got["edge_index"], np.array([src, dst]))
    assert got["edge_index"].dtype == np.int64 and got["edge_index"].shape == (2, e)
    np.testing.assert_array_equal(got["batch"], batch)
    np.testing.assert_array_equal(got["ptr"], np.concatenate([[0], np.cumsum(gs.n_node[index])]))
    np.testing.assert_array_equal(got["x"], np.concatenate(xs))
    np.testing.assert_array_equal(got["z"], np.concatenate(zs))
    np.testing.assert_array_equal(got["pos"], np.concatenate(pos))
    np.testing.assert_array_equal(got["bond"], bonds)
    np.testing.assert_array_equal(got["y"], [0.0, 1.0, 2.0, 3.0])  # padding graphs dropped


@pytest.mark.parametrize("hidden", [("torch", "torch_geometric"), ("torch_geometric",)])
def test_missing_torch_names_the_bench_extra(hidden, monkeypatch, capsys):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):  # an import statement always calls __import__
        if name.split(".")[0] in hidden:
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    # the first missing module is named: torch itself where it is not installed (as in CI)
    first = "torch" if "torch" in hidden or importlib.util.find_spec("torch") is None \
        else hidden[0]
    monkeypatch.setattr(builtins, "__import__", fake_import)
    hint = r'install them with: pip install -e "\.\[bench\]"$'
    with pytest.raises(ImportError, match=r"^benchmarks\.peers needs PyTorch and PyTorch "
                                          rf"Geometric \(No module named '{first}'\); "
                                          + hint):
        require_torch()
    assert main(["--no-save"]) == 2  # before any QM9 loading
    assert capsys.readouterr().err.strip().endswith('pip install -e ".[bench]"')
    with pytest.raises(SystemExit) as exit_info:  # --help needs neither torch nor PyG
        main(["--help"])
    assert exit_info.value.code == 0
    assert "--minutes" in capsys.readouterr().out


# ------------------------------------------------------------------- with PyTorch Geometric


def _copy_mpnn(ours, peer):
    """Our MPNN's weights into the PyG peer (torch's redundant second biases set to 0)."""
    import torch

    def t(x):
        return torch.tensor(np.asarray(x[...]))

    cell, lstm = ours.update.cell, ours.readout.lstm
    zero = torch.zeros
    d, k = ours.config.dim, ours.config.edge_hidden
    pairs = {
        "lin0.weight": t(ours.embed.linear.kernel).T, "lin0.bias": t(ours.embed.linear.bias),
        "conv.nn.0.weight": t(ours.message.edge_mlp.kernel).T,
        "conv.nn.0.bias": t(ours.message.edge_mlp.bias),
        "conv.nn.2.weight": t(ours.message.M).reshape(k, d * d).T,
        "conv.nn.2.bias": t(ours.message.B).reshape(d * d),
        "gru.weight_ih_l0": t(cell.dense_i.kernel).T, "gru.bias_ih_l0": t(cell.dense_i.bias),
        "gru.weight_hh_l0": t(cell.dense_h.kernel).T, "gru.bias_hh_l0": zero(3 * d),
        "set2set.lstm.weight_ih_l0": torch.cat(
            [t(getattr(lstm, g).kernel) for g in ("ii", "if_", "ig", "io")], 1).T,
        "set2set.lstm.weight_hh_l0": torch.cat(
            [t(getattr(lstm, g).kernel) for g in ("hi", "hf", "hg", "ho")], 1).T,
        "set2set.lstm.bias_hh_l0": torch.cat(
            [t(getattr(lstm, g).bias) for g in ("hi", "hf", "hg", "ho")]),
        "set2set.lstm.bias_ih_l0": zero(4 * d),
        "lin1.weight": t(ours.hidden.kernel).T, "lin1.bias": t(ours.hidden.bias),
        "lin2.weight": t(ours.final.kernel).T, "lin2.bias": t(ours.final.bias),
    }
    assert set(pairs) == set(peer.state_dict())
    peer.load_state_dict(pairs)


def _copy_schnet(ours, peer):
    import torch

    def t(x):
        return torch.tensor(np.asarray(x[...]))

    pairs = {"net.embedding.weight": t(ours.embed.table.embedding)[:100],
             "net.lin1.weight": t(ours.readout.hidden.kernel).T,
             "net.lin1.bias": t(ours.readout.hidden.bias),
             "net.lin2.weight": t(ours.readout.final.kernel).T,
             "net.lin2.bias": t(ours.readout.final.bias)}
    for i, block in enumerate(ours.interactions):
        p = f"net.interactions.{i}."
        for name, lin in (("mlp.0", block.conv.filter_in), ("mlp.2", block.conv.filter_out),
                          ("conv.lin2", block.f2out), ("lin", block.dense)):
            pairs[p + name + ".weight"], pairs[p + name + ".bias"] = t(lin.kernel).T, t(lin.bias)
        pairs[p + "conv.lin1.weight"] = t(block.in2f.kernel).T
    state = peer.state_dict()
    pairs.update({k: v for k, v in state.items() if k not in pairs})  # buffers (offsets)
    assert not [k for k in pairs if k not in state]
    peer.load_state_dict(pairs)


SMALL = {"mpnn": {"dim": 8, "edge_hidden": 16, "steps": 2, "set2set_steps": 2},
         "schnet": {"dim": 16, "num_filters": 12, "interactions": 2, "num_rbf": 10,
                    "cutoff": 4.0}}  # a cutoff inside the molecules: PyG drops far pairs


@pytest.mark.parametrize("name", ["mpnn", "schnet"])
def test_pyg_peer_computes_our_model_given_our_weights(name, qm9_graphset):
    pytest.importorskip("torch_geometric")
    import jax
    import torch
    from flax import nnx

    from benchmarks.pyg_models import build_pyg, pyg_batch
    from mpattn.models import create_model, default_config

    config = default_config(name, **SMALL[name])
    ours = create_model(name, rngs=nnx.Rngs(3), config=config)
    peer = build_pyg(name, config)
    (_copy_mpnn if name == "mpnn" else _copy_schnet)(ours, peer)
    index = np.array([40, 2, 399, 123, 7])
    n, e = int(qm9_graphset.n_node[index].sum()), int(qm9_graphset.n_edge[index].sum())
    graph = pad_batch(qm9_graphset, index, Budget(n_node=n + 9, n_edge=e + 30, n_graph=8))
    if name == "schnet":  # the cutoff really drops pairs of these molecules
        pos = graph.nodes["positions"]
        d = np.linalg.norm(pos[graph.senders[:e]] - pos[graph.receivers[:e]], axis=-1)
        assert 0 < (d >= config.cutoff).sum() < e
    want = np.asarray(jax.jit(ours)(graph)["energy"])[:5]
    with torch.no_grad():
        got = peer(pyg_batch(pyg_arrays(graph))).numpy()
    assert got.shape == (5,)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_parameter_counts_agree_within_one_percent():
    pytest.importorskip("torch_geometric")
    import jax
    from flax import nnx

    from benchmarks.pyg_models import build_pyg, torch_params
    from mpattn.models import create_model

    counts = {}
    for name in ("mpnn", "schnet"):
        ours = nnx.eval_shape(lambda name=name: create_model(name, rngs=nnx.Rngs(0)))
        counts[name] = (sum(x.size for x in jax.tree.leaves(nnx.state(ours, nnx.Param))),
                        torch_params(build_pyg(name)))
        print(f"{name:8s} ours {counts[name][0]:>9,d}  PyG {counts[name][1]:>9,d}")
    # the docstring's accounting: torch's GRU (3d) and LSTM (4d) second biases, d = 64;
    # PyG's SchNet embeds 100 elements, ours max_z + 1 = 101 (d = 128)
    assert counts["mpnn"][1] - counts["mpnn"][0] == 3 * 64 + 4 * 64
    assert counts["schnet"][0] - counts["schnet"][1] == 128
    for ours_n, pyg_n in counts.values():
        np.testing.assert_allclose(pyg_n, ours_n, rtol=0.01)


def test_edge_features_match_our_basis():
    pytest.importorskip("torch_geometric")
    import torch

    from benchmarks.pyg_models import edge_features
    from mpattn.nn.radial import gaussian_basis

    dist = np.array([0.0, 0.96, 1.4, 2.5, 5.0, 7.3], np.float32)
    bond = np.array([0, 1, 2, 3, 4, 4])
    got = edge_features(torch.from_numpy(bond), torch.from_numpy(dist), num_rbf=16,
                        cutoff=5.0).numpy()
    want = np.concatenate([np.eye(5)[bond], gaussian_basis(dist, num=16, cutoff=5.0)], -1)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def _pyg_first(gs, k: int):
    """The first ``k`` molecules of ``gs`` as one PyG batch, U0 standardised as ``y``."""
    from benchmarks.pyg_models import pyg_batch

    index = np.arange(k)
    n, e = int(gs.n_node[index].sum()), int(gs.n_edge[index].sum())
    graph = pad_batch(gs, index, Budget(n_node=n + 1, n_edge=e, n_graph=k + 1))
    u0 = gs.globals["U0"][index]
    y = np.zeros(k + 1, np.float32)
    y[:k] = (u0 - u0.mean()) / u0.std()
    return pyg_batch(pyg_arrays(graph._replace(globals={"y": y})))


def test_one_pyg_train_step_lowers_the_loss(qm9_graphset):
    pytest.importorskip("torch_geometric")
    import torch

    from benchmarks.peers import pyg_mse_step
    from benchmarks.pyg_models import build_pyg
    from mpattn.models import default_config

    batch = _pyg_first(qm9_graphset, 16)
    for name in ("mpnn", "schnet"):
        model = build_pyg(name, default_config(name, **SMALL[name]))
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        before = pyg_mse_step(model, opt, batch)
        with torch.no_grad():
            after = float(torch.nn.functional.mse_loss(model(batch), batch.y))
        assert after < before, name
        np.testing.assert_allclose(pyg_mse_step(model, opt, batch), after, rtol=1e-5)


def test_the_async_pyg_step_is_the_same_step_without_reading_the_loss(qm9_graphset):
    pytest.importorskip("torch_geometric")
    import torch

    from benchmarks.peers import pyg_mse_step, pyg_mse_step_async
    from benchmarks.pyg_models import build_pyg
    from mpattn.models import default_config

    batch = _pyg_first(qm9_graphset, 12)
    config = default_config("schnet", **SMALL["schnet"])
    models = [build_pyg("schnet", config, seed=1) for _ in range(2)]
    opts = [torch.optim.Adam(m.parameters(), lr=1e-3) for m in models]
    for _ in range(2):
        got = pyg_mse_step_async(models[0], opts[0], batch)
        want = pyg_mse_step(models[1], opts[1], batch)
        assert isinstance(got, torch.Tensor) and got.shape == () and not got.requires_grad
        assert isinstance(want, float)
        np.testing.assert_allclose(float(got), want, rtol=1e-6)
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        np.testing.assert_allclose(a.detach().numpy(), b.detach().numpy(), rtol=1e-6)


@pytest.mark.parametrize(("sync", "timing"), [(True, "sync_every_step"), (False, "pipelined")])
def test_measure_pyg_reads_the_loss_every_step_only_when_synced(sync, timing, qm9_graphset,
                                                                monkeypatch):
    pytest.importorskip("torch_geometric")
    import torch

    import benchmarks.peers as peers
    from benchmarks.pyg_models import build_pyg, pyg_batch
    from mpattn.models import default_config

    reads = []
    real_float = torch.Tensor.__float__

    def counted_float(self):  # float(loss): the device sync of a synced step
        reads.append(self)
        return real_float(self)

    monkeypatch.setattr(torch.Tensor, "__float__", counted_float)
    synced_steps = []
    real_step = peers.pyg_mse_step
    monkeypatch.setattr(peers, "pyg_mse_step",
                        lambda *a: synced_steps.append(1) or real_step(*a))
    batches = []
    for i in range(3):
        index = np.arange(6 * i, 6 * i + 6)
        n, e = int(qm9_graphset.n_node[index].sum()), int(qm9_graphset.n_edge[index].sum())
        graph = pad_batch(qm9_graphset, index, Budget(n_node=n + 1, n_edge=e, n_graph=7))
        y = np.linspace(-1, 1, 7).astype(np.float32)
        batches.append(pyg_batch(pyg_arrays(graph._replace(globals={"y": y}))))
    model = build_pyg("schnet", default_config("schnet", **SMALL["schnet"]))
    out = peers.measure_pyg(model, batches, sync_every_step=sync)
    assert out["timing"] == timing and out["molecules"] == 18
    assert out["train_mol_per_s"] > 0 and out["infer_mol_per_s"] > 0
    # synced: the warm-up step and the 3 timed ones each read their loss; pipelined: none
    assert len(synced_steps) == len(reads) == (4 if sync else 0)


def test_measure_pair_runs_ours_k_steps_per_call_against_pyg(qm9_graphset):
    pytest.importorskip("torch_geometric")
    import torch

    from benchmarks.peers import measure_pair

    gs = qm9_graphset.subset(np.arange(60))
    row = measure_pair("schnet", gs, 8, 5, device=torch.device("cpu"), steps_per_call=2)
    assert row["timing"] == row["ours"]["timing"] == row["pyg"]["timing"] == "pipelined"
    assert row["steps_per_call"] == row["ours"]["steps_per_call"] == 2
    assert row["ours"]["batches"] == 4 and row["ours"]["train_calls"] == 2  # 5th dropped
    assert row["molecules"] == row["ours"]["molecules"] == row["pyg"]["molecules"] == 32
    assert row["ours"]["compiles_train"] == 1 and row["ours"]["compiles_ok"] is True
    np.testing.assert_allclose(row["train_ratio"], row["ours"]["train_mol_per_s"]
                               / row["pyg"]["train_mol_per_s"], rtol=1e-12)


def test_torch_device_choice_and_the_peer_on_it():
    pytest.importorskip("torch_geometric")
    import torch

    from benchmarks.pyg_models import build_pyg, synchronize, torch_device

    assert torch_device("cpu") == torch.device("cpu")
    assert torch_device("cuda:1") == torch.device("cuda", 1)  # named, not checked here
    auto = torch_device()
    assert auto.type == ("cuda" if torch.cuda.is_available() else "cpu")
    model = build_pyg("schnet", device=torch_device("cpu"))
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    synchronize(torch_device("cpu"))  # a no-op off CUDA
