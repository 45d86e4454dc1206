"""Peers: our MPNN and SchNet against PyTorch Geometric's, on the same molecules and batches.

    python -m benchmarks.peers                              # throughput, batch 32 and 128
    python -m benchmarks.peers --minutes 10                 # + test MAE after 10 min each
    python -m benchmarks.peers --models mpnn --batches 2 --molecules 300 --no-save
    python -m benchmarks.peers --models schnet --steps-per-call 4   # ours: 4 steps per jit call
    python -m benchmarks.peers --models painn --minutes 10     # SchNetPack's PaiNN, own venv

Needs the ``bench`` extra (``pip install -e ".[bench]"``: torch, torch-geometric). The PyG
peers are built from OUR default configs (``mpattn.models.default_config``), so a config change
moves both sides:

- **mpnn** vs PyG's ``examples/qm9_nn_conv.py``: ``Linear(12, d)`` + ReLU, ``steps`` x
  (``NNConv(d, d, Seq(Linear(21, 128), ReLU, Linear(128, d²)), aggr="add")`` + ReLU, ``GRU``),
  ``Set2Set(d, 3)``, ``Linear(2d, d)`` + ReLU, ``Linear(d, 1)``; edge features one_hot(bond, 5)
  ⊕ 16 Gaussians of the distance (``mpattn.nn.radial.gaussian_basis``'s formula), computed in
  the forward pass from the positions as ours does. Matched to ours: NNConv without root weight
  and bias (``root_weight=False, bias=False``; PyG's example has both and ``aggr="mean"``), the
  ReLU on ``h_0``, the edge network's Linear bias is our ``B``. Remaining differences: torch's
  GRU and LSTM carry a second, redundant bias vector (PyG has 3d + 4d = 448 more parameters,
  +0.07 %); each side keeps its framework's default initialisation (ours scales the edge
  network's ``M`` down for sum aggregation, ``B = 0``).
- **schnet** vs ``torch_geometric.nn.models.SchNet(128, 128, 6, 50, cutoff=10, readout="add")``
  given the batch's own complete graph, pairs at or beyond the cutoff dropped (ours keeps them
  with a filter of exactly 0: the same function). Differences: PyG's embedding has 100 rows,
  ours ``max_z + 1 = 101`` (128 parameters); Xavier (PyG) vs LeCun (ours) initialisation.

**Throughput** (as ``benchmarks.speed``): a seeded sample of ``--molecules`` QM9 molecules,
complete edge set, the first ``--batches`` batches ``BatchLoader`` makes; each is converted once,
before timing, to a PyG ``Batch`` of its real molecules (:func:`pyg_arrays`, padding dropped). A
train step is forward + MSE + backward + Adam (ours: ``benchmarks.common.mse_adam_steps``,
jit-compiled; compile time reported apart; PyG: one warm-up step first); inference is the
forward pass (PyG under ``torch.inference_mode``). Throughput = real molecules / wall time over
all batches; ratio = ours / PyG. torch uses ``--threads`` threads, JAX all cores. Where torch
sees a GPU the peers run there (``--torch-device``), their batches moved to it before the clock
starts and each timing ending with ``torch.cuda.synchronize``; JAX's memory preallocation is
switched off so that both fit on one GPU.

Timing (``timing`` in every row and the JSON): ``pipelined`` (default) as a training loop runs,
with no device sync per step: ours dispatches every call and blocks once at the end of the
pass; PyG keeps its losses as tensors (:func:`pyg_mse_step_async`, no ``.item()``) and
synchronizes once at the end. ``--sync-every-step``: ours blocks after every call and PyG reads
each step's loss (``float``, a device sync), the timing of the results written before.
``--steps-per-call K`` > 1 runs K of OUR train steps per jit call (``benchmarks.speed``: one
padding budget, K stacked batches, ``--batches`` rounded down to a multiple of K); PyG still
runs one step per batch, over the same batches (the same molecules; PyG has no padding).

**Accuracy at equal time** (``--minutes M``) and **painn**: :mod:`benchmarks.peers_accuracy`.

Writes ``peers-<device>-<date>[-n].json`` (and ``.png``, test MAE bars, with ``--minutes``) under
``--out`` (default ``benchmarks/results/``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import (
    RESULTS,
    add_dataset_cache_argument,
    qm9_graphs,
    write_result,
)
from benchmarks.peer_venvs import DEFAULT_ROOT
from benchmarks.peers_accuracy import (
    ACCURACY_HEADER,
    SIZES,
    accuracy_rows,
    format_accuracy_row,
    plot_accuracy,
)
from benchmarks.pyg_models import (
    MODELS,
    build_pyg,
    pyg_arrays,
    pyg_batch,
    require_torch,
    synchronize,
    torch_device,
    torch_params,
)
from benchmarks.speed import add_timing_arguments, check_timing_arguments, timing_mode

__all__ = ["SPEED_HEADER", "format_speed_row", "main", "measure_pair", "measure_pyg",
           "pyg_mse_step", "pyg_mse_step_async", "ratio", "speed_header"]


def ratio(ours: float, peer: float) -> float:
    """Throughput ratio ours / peer (> 1: ours is faster)."""
    if not peer > 0:
        raise ValueError(f"ratio: the peer's throughput must be positive, got {peer}")
    return ours / peer


# ----------------------------------------------------------------------------- throughput


def pyg_mse_step_async(model, opt, batch):
    """One PyG train step as ours in ``mse_adam_steps``: forward, MSE, backward, optimizer
    step; returns the loss before the step as a detached tensor, without reading it (no device
    sync: on a GPU the step's kernels may still be queued)."""
    torch, _ = require_torch()
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(model(batch), batch.y)
    loss.backward()
    opt.step()
    return loss.detach()


def pyg_mse_step(model, opt, batch) -> float:
    """:func:`pyg_mse_step_async`, the loss read as a float (a device sync on a GPU)."""
    return float(pyg_mse_step_async(model, opt, batch))


def measure_pyg(model, batches: list, lr: float = 1e-3, *, sync_every_step: bool = False
                ) -> dict:
    """Train (MSE + Adam) and inference throughput of a PyG model over converted batches,
    which already sit on the model's device (the clock stops after the device's last kernel).

    ``sync_every_step``: each train step reads its loss (:func:`pyg_mse_step`, a device sync);
    else the losses stay tensors (:func:`pyg_mse_step_async`) and only the end of the pass
    synchronizes. Inference never syncs per batch.
    """
    torch, _ = require_torch()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    device = next(model.parameters()).device

    def step(b):
        if sync_every_step:
            return pyg_mse_step(model, opt, b)
        return pyg_mse_step_async(model, opt, b)

    def infer(b):
        with torch.inference_mode():
            return model(b)

    mols = sum(int(b.num_graphs) for b in batches)
    out = {"params": torch_params(model), "molecules": mols, "device": str(device),
           "timing": timing_mode(sync_every_step)}
    for kind, fn in (("train", step), ("infer", infer)):
        model.train(kind == "train")
        t0 = time.perf_counter()
        fn(batches[0])  # warm-up
        synchronize(device)
        out[f"warmup_s_{kind}"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        for b in batches:
            fn(b)
        synchronize(device)
        out[f"{kind}_mol_per_s"] = mols / (time.perf_counter() - t0)
    return out


def measure_pair(name: str, gs, batch_size: int, batches: int, device=None, *,
                 steps_per_call: int = 1, sync_every_step: bool = False) -> dict:
    """Ours (``benchmarks.speed.measure``) and PyG's peer on the same batches: one table row.
    ``device``: the peer's torch device (default :func:`torch_device`: CUDA if there is one);
    its batches are moved there before the clock starts, as ours are. ``steps_per_call``: our
    train steps per jit call (PyG: one per batch, over the batches ours timed);
    ``sync_every_step``: the timing mode of both sides (see the module docstring)."""
    from benchmarks.speed import measure, qm9_batches

    device = device or torch_device()
    ours = measure(name, gs, batch_size, batches, steps_per_call=steps_per_call,
                   sync_every_step=sync_every_step)
    data = [pyg_batch(pyg_arrays(b)).to(device)
            for b in qm9_batches(gs, batch_size, ours["batches"])]
    pyg = measure_pyg(build_pyg(name, device=device), data, sync_every_step=sync_every_step)
    if pyg["molecules"] != ours["molecules"]:
        raise RuntimeError(f"{name}: PyG saw {pyg['molecules']} molecules, ours "
                           f"{ours['molecules']}")
    return {"model": name, "batch_size": batch_size, "molecules": ours["molecules"],
            "timing": timing_mode(sync_every_step), "steps_per_call": steps_per_call,
            "ours": ours, "pyg": pyg,
            "train_ratio": ratio(ours["train_mol_per_s"], pyg["train_mol_per_s"]),
            "infer_ratio": ratio(ours["infer_mol_per_s"], pyg["infer_mol_per_s"])}


SPEED_HEADER = (f"{'model':8s} {'batch':>5s} {'params ours/PyG':>17s} | {'train mol/s ours':>16s} "
                f"{'PyG':>7s} {'ratio':>6s} | {'infer mol/s ours':>16s} {'PyG':>7s} "
                f"{'ratio':>6s} | {'compile s':>9s}")


def speed_header(steps_per_call: int = 1) -> str:
    """The throughput table's header: :data:`SPEED_HEADER`, plus ``steps/call`` where K > 1."""
    return SPEED_HEADER + (f" {'steps/call':>10s}" if steps_per_call > 1 else "")


def format_speed_row(r: dict) -> str:
    """One line of the throughput table (compile s: ours, train + inference; a last column,
    our train steps per call, where that is more than one)."""
    o, p = r["ours"], r["pyg"]
    params = f"{o['params']:,}/{p['params']:,}"
    k = r.get("steps_per_call", 1)
    return (f"{r['model']:8s} {r['batch_size']:5d} {params:>17s} | {o['train_mol_per_s']:16.1f} "
            f"{p['train_mol_per_s']:7.1f} {r['train_ratio']:5.2f}x | "
            f"{o['infer_mol_per_s']:16.1f} {p['infer_mol_per_s']:7.1f} {r['infer_ratio']:5.2f}x "
            f"| {o['compile_s_train'] + o['compile_s_infer']:9.1f}"
            + (f" {k:10d}" if k > 1 else ""))


# ----------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.peers",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=[*MODELS, "painn"],
                    help="painn: SchNetPack 2's PaiNN at equal --minutes, in its own venv")
    ap.add_argument("--venvs", type=Path, default=None,
                    help="folder of the peers' own venvs (default ~/.cache/mpattn/peer-venvs)")
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[32, 128])
    ap.add_argument("--batches", type=int, default=8, help="timed batches per model and size")
    ap.add_argument("--molecules", type=int, default=2000,
                    help="QM9 molecules drawn at random (seeded) for the throughput part")
    ap.add_argument("--minutes", type=float, default=None,
                    help="also train each model this long and report test MAE")
    ap.add_argument("--batch-size", type=int, default=32, help="training batch of --minutes")
    ap.add_argument("--no-preset-row", action="store_true",
                    help="skip the '<model> (cpu preset)' row of --minutes")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
    ap.add_argument("--torch-device", default=None,
                    help="the PyG peers' device: cpu, cuda, cuda:1 (default: cuda if torch "
                         "sees a GPU, else cpu)")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="experiments.qm9_u0 run outputs of --minutes (default: a temporary "
                         "folder)")
    ap.add_argument("--out", type=Path, default=None,
                    help="folder of the JSON/PNG (default benchmarks/results)")
    add_timing_arguments(ap)
    add_dataset_cache_argument(ap)
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args(argv)
    check_timing_arguments(ap, args)
    if "painn" in args.models and not args.minutes:
        ap.error("--models painn is compared at equal time: give --minutes")
    pyg_models = [m for m in args.models if m in MODELS]
    torch = pyg = device = None
    if pyg_models:
        try:
            torch, pyg = require_torch()
        except ImportError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        # JAX would take 75% of the GPU's memory at start-up and leave torch the rest
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        torch.set_num_threads(args.threads)
        device = torch_device(args.torch_device)
    sizes = list(dict.fromkeys(args.batch_sizes + ([args.batch_size] if args.minutes else [])))
    gs = qm9_graphs(args.molecules, "complete", dataset_cache=args.dataset_cache) \
        if pyg_models else None
    if pyg_models:
        print(speed_header(args.steps_per_call), flush=True)
    rows = []
    for name in pyg_models:
        for bs in sizes:
            rows.append(measure_pair(name, gs, bs, args.batches, device=device,
                                     steps_per_call=args.steps_per_call,
                                     sync_every_step=args.sync_every_step))
            print(format_speed_row(rows[-1]), flush=True)
    timing = timing_mode(args.sync_every_step)
    print(f"timing: {timing}; our train steps per call: {args.steps_per_call}", flush=True)
    payload = {"edge_set": "complete", "molecules": args.molecules, "batches": args.batches,
               "timing": timing, "steps_per_call": args.steps_per_call,
               "torch": torch and torch.__version__, "torch_geometric": pyg and pyg.__version__,
               "torch_threads": torch and torch.get_num_threads(), "torch_device": str(device),
               "rows": rows}
    if args.minutes:
        speed = {(r["model"], fw): r[fw]["train_mol_per_s"] for r in rows
                 if r["batch_size"] == args.batch_size for fw in ("ours", "pyg")}
        with tempfile.TemporaryDirectory(prefix="peers-") as tmp:
            workdir = args.workdir or Path(tmp)
            workdir.mkdir(parents=True, exist_ok=True)
            print(ACCURACY_HEADER, flush=True)
            acc = accuracy_rows(args.models, speed, minutes=args.minutes,
                                batch_size=args.batch_size, workdir=workdir,
                                preset_row=not args.no_preset_row,
                                dataset_cache=args.dataset_cache, device=device,
                                venvs=args.venvs or DEFAULT_ROOT)
        print(ACCURACY_HEADER)
        print("\n".join(format_accuracy_row(r) for r in acc))
        payload["accuracy"] = {"minutes": args.minutes, "batch_size": args.batch_size,
                               "split": list(SIZES), "target": "U0", "rows": acc}
    if not args.no_save:
        path = write_result("peers", payload, directory=args.out or RESULTS)
        if args.minutes:
            plot_accuracy(payload["accuracy"]["rows"], path.with_suffix(".png"), args.minutes)
        print(f"wrote {path}" + (" and .png" if args.minutes else ""))
    return 0


if __name__ == "__main__":
    from mpattn.runtime import restart_with_hugepages

    restart_with_hugepages()  # before any work: huge pages for XLA's CPU buffers
    raise SystemExit(main())
