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

**Accuracy at equal time** (``--minutes M``): the ``cpu`` preset's split 15,000 / 1,000 / 5,000
(``make_split``, seed 0, one split file for all runs); the same per-element reference and
standardisation fitted on the training split (``mpattn.train.PropertyTask().prepare``: PyG
trains on the very same numbers); L1 loss, Adam lr 1e-3, batch ``--batch-size``, gradient
clipping 10, cosine lr (1 warm-up epoch) over ``planned_epochs(M, train mol/s at that batch
size, n_train)`` epochs (:func:`planned_epochs`, the same rule for both). Ours trains through
``experiments.qm9_u0.run`` with the model's default config (time budget checked at epoch
ends: it stops before an epoch that would overrun); PyG through a torch loop
(PyG ``DataLoader`` shuffled each epoch from seed 0, collation in the main thread, lr from our
optax schedule at every step, stop after the first batch that ends past M minutes). Both
clocks include the per-epoch validation; both evaluate the best-by-validation weights (PyG:
validation after each epoch and once after stopping). Plus a row "<model> (cpu preset)":
``experiments.qm9_u0.run`` with the ``cpu`` preset (``experiments.configs.qm9.PRESETS``), its
default model (``attention``, silu attention weights), its model config and task and
``time_budget_min=M``, its epochs not planned (``--no-preset-row`` skips it).

**painn** (``--models painn``, accuracy only, needs ``--minutes``): SchNetPack 2's PaiNN with
SchNetPack's own QM9 settings, trained in a virtual environment of its own (``--venvs``,
made on first use: ``benchmarks/peer_venvs.py``) for ``--minutes`` of Lightning's
``max_time`` on the same split and per-element reference (``benchmarks/peers_painn.py``,
``benchmarks/peer_workers/painn_worker.py``); its row sits beside the cpu preset's.

Writes ``peers-<device>-<date>[-n].json`` (and ``.png``, test MAE bars, with ``--minutes``) under
``--out`` (default ``benchmarks/results/``).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import (
    RESULTS,
    add_dataset_cache_argument,
    qm9_graphs,
    qm9_molecules,
    write_result,
)
from benchmarks.peer_venvs import DEFAULT_ROOT
from benchmarks.pyg_models import (
    MODELS,
    build_pyg,
    pyg_arrays,
    pyg_batch,
    pyg_molecules,
    require_torch,
    synchronize,
    torch_device,
    torch_params,
)
from benchmarks.speed import add_timing_arguments, check_timing_arguments, timing_mode

__all__ = ["ACCURACY_HEADER", "SPEED_HEADER", "accuracy_rows", "format_accuracy_row",
           "format_speed_row", "lr_values", "main", "measure_pair", "measure_pyg",
           "planned_epochs", "plot_accuracy", "pyg_mse_step", "pyg_mse_step_async", "ratio",
           "speed_header", "train_pyg"]

SIZES = (15_000, 1_000, 5_000)  # the cpu preset's split


def planned_epochs(minutes: float, mol_per_s: float, n_train: int) -> int:
    """Epochs the cosine schedule plans for: ``floor(minutes · 60 · mol_per_s / n_train)``, ≥ 1.

    Args:
        minutes: Training time budget M.
        mol_per_s: Training molecules per second measured for that model and batch size.
        n_train: Training molecules per epoch.
    """
    for name, v in (("minutes", minutes), ("mol_per_s", mol_per_s)):
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"planned_epochs: {name} must be positive and finite, got {v}")
    if int(n_train) != n_train or n_train < 1:
        raise ValueError(f"planned_epochs: n_train must be a positive integer, got {n_train}")
    return max(1, math.floor(minutes * 60.0 * mol_per_s / n_train + 1e-9))


def ratio(ours: float, peer: float) -> float:
    """Throughput ratio ours / peer (> 1: ours is faster)."""
    if not peer > 0:
        raise ValueError(f"ratio: the peer's throughput must be positive, got {peer}")
    return ours / peer


def lr_values(lr: float, *, steps_per_epoch: int, epochs: int) -> np.ndarray:
    """Our cosine schedule (``mpattn.train.schedules.make_schedule``) at steps 0..total:
    update ``k`` uses ``values[min(k, total)]``, as optax's ``inject_hyperparams`` does."""
    import jax.numpy as jnp

    from mpattn.train.schedules import make_schedule

    sched = make_schedule(lr, "cosine", steps_per_epoch=steps_per_epoch, epochs=epochs)
    return np.asarray(sched(jnp.arange(steps_per_epoch * epochs + 1)), np.float64)


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


# ----------------------------------------------------------------------------- accuracy


def _predict(model, data: list, batch_size: int = 256) -> np.ndarray:
    torch, _ = require_torch()
    from torch_geometric.loader import DataLoader

    device = next(model.parameters()).device
    model.eval()
    with torch.inference_mode():
        out = [model(b.to(device)).double().cpu().numpy()
               for b in DataLoader(data, batch_size=batch_size)]
    return np.concatenate(out)


def train_pyg(name: str, prepared, *, minutes: float, epochs: int, batch_size: int = 32,
              lr: float = 1e-3, clip_norm: float = 10.0, seed: int = 0, config=None,
              progress: bool = True, device=None) -> dict:
    """Train the PyG peer on ``PropertyTask.prepare``'s data (``mpattn.train.PropertyData``) for
    ``epochs`` or ``minutes``; best-by-val.

    Returns:
        ``epochs`` (updates / updates per epoch), ``steps``, ``mol_per_s`` (training molecules
        over the wall time of the training batches, loading included), ``seconds`` (the
        clock: training + per-epoch validation), ``val_mae_mev``/``test_mae_mev`` of the
        weights with the best validation MAE, ``val_history`` (each validation), ``params``.
        ``config``: our model config the peer copies (default: the model's default).
        ``device``: the peer's torch device (default :func:`torch_device`); each batch is
        moved there inside the timed loop (host-to-device copies are part of its training).
    """
    torch, _ = require_torch()
    from torch_geometric.loader import DataLoader
    from tqdm.auto import tqdm

    from mpattn.train.metrics import error_report

    def mae(part, data) -> float:
        pred = prepared.transform.decode(_predict(model, data), part.counts)
        return error_report(pred, part.true, n_atoms=part.n_atoms)["mae_mev"]

    device = device or torch_device()
    model = build_pyg(name, config, seed=seed, device=device)
    train, val = pyg_molecules(prepared.train.graphs), pyg_molecules(prepared.val.graphs)
    loader = DataLoader(train, batch_size=batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    spe = len(loader)
    lrs = lr_values(lr, steps_per_epoch=spe, epochs=epochs)
    opt = torch.optim.Adam(model.parameters(), lr=float(lrs[0]))
    best, best_state, step, mols, train_s, stop = math.inf, None, 0, 0, 0.0, False
    history = []
    t_start = time.perf_counter()
    with tqdm(total=spe * epochs, desc=f"PyG {name}", unit="step", disable=not progress) as bar:
        for _ in range(epochs):
            model.train()
            t0 = time.perf_counter()
            for b in loader:
                b = b.to(device, non_blocking=True)
                for group in opt.param_groups:
                    group["lr"] = float(lrs[min(step, len(lrs) - 1)])
                opt.zero_grad()
                loss = torch.nn.functional.l1_loss(model(b), b.y)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
                opt.step()
                step, mols = step + 1, mols + int(b.num_graphs)
                bar.update(1)
                if step % 50 == 0:  # the clock reads what the GPU has done, not what is queued
                    synchronize(device)
                if time.perf_counter() - t_start >= 60.0 * minutes:
                    stop = True
                    break
            synchronize(device)
            train_s += time.perf_counter() - t0
            val_mae = mae(prepared.val, val)
            history.append(val_mae)
            if val_mae < best:
                best, best_state = val_mae, copy.deepcopy(model.state_dict())
            bar.set_postfix(val_mae=f"{val_mae:.1f}", mol_s=f"{mols / train_s:.0f}")
            if stop:
                break
    seconds = time.perf_counter() - t_start
    if best_state is not None:
        model.load_state_dict(best_state)
    return {"epochs": step / spe, "steps": step, "mol_per_s": mols / train_s, "seconds": seconds,
            "val_mae_mev": mae(prepared.val, val),
            "test_mae_mev": mae(prepared.test, pyg_molecules(prepared.test.graphs)),
            "val_history": history, "params": torch_params(model)}


def _ours_row(model: str, results: dict, planned: int | None) -> dict:
    return {"model": model, "framework": "ours", "epochs": results["epochs"],
            "planned_epochs": planned, "mol_per_s": results["train_mol_per_s"],
            "seconds": results["train_seconds"], "val_mae_mev": results["val"]["mae_mev"],
            "test_mae_mev": results["test"]["mae_mev"], "params": results["params"]}


def accuracy_rows(models, speed: dict, *, minutes: float, batch_size: int, workdir: Path,
                  preset_row: bool = True, progress: bool = True,
                  dataset_cache: Path | None = None, device=None,
                  venvs: Path | None = None) -> list[dict]:
    """Test MAE after ``minutes`` of training for ours and PyG (see the module docstring).

    Args:
        models: Model names (each with a PyG peer).
        speed: ``(model, framework) -> train mol/s`` at ``batch_size`` (plans the epochs).
        minutes: Training time per run.
        batch_size: Training batch size.
        workdir: Folder for ``experiments.qm9_u0.run``'s outputs and the shared split file.
        dataset_cache: a featurized QM9 cache file to read instead of qm9pack.
        device: the PyG peers' torch device (default :func:`torch_device`).
        venvs: folder of the peers' own venvs (``painn``; ``benchmarks.peer_venvs``).
    """
    from experiments.configs.qm9 import PRESETS
    from experiments.qm9_u0 import run
    from mpattn.data.qm9 import make_split, save_split
    from mpattn.models import default_config
    from mpattn.train import PropertyTask, TrainConfig

    ms = qm9_molecules(dataset_cache)
    split = make_split(ms.ids, sizes=SIZES, seed=0)
    split_file = save_split(split, workdir / "split.json")  # every run reads this split
    task = PropertyTask()  # U0 with the per-element reference, for ours and PyG alike
    rows, prepared = [], None
    for name in models:
        cfg = TrainConfig(model=name, loss="l1", schedule="cosine", batch_size=batch_size,
                          ema_decay=None, time_budget_min=minutes)
        if prepared is None:
            prepared = task.prepare(ms, split, cfg)
        if name == "painn":  # SchNetPack's PaiNN in its own venv, Lightning's max_time
            from benchmarks.peers_painn import painn_row

            rows.append(painn_row(ms, split, prepared, minutes=minutes, workdir=workdir,
                                  venvs=venvs))
            print(format_accuracy_row(rows[-1]), flush=True)
            continue
        plan = {fw: planned_epochs(minutes, speed[name, fw], SIZES[0]) for fw in ("ours", "pyg")}
        res = run(dataclasses.replace(cfg, epochs=plan["ours"]), task, workdir=workdir / name,
                  split_file=split_file, progress=progress, dataset_cache=dataset_cache,
                  model_config=default_config(name))
        rows.append(_ours_row(name, res, plan["ours"]))
        print(format_accuracy_row(rows[-1]), flush=True)
        pyg = train_pyg(name, prepared, minutes=minutes, epochs=plan["pyg"],
                        batch_size=batch_size, lr=cfg.lr, clip_norm=cfg.clip_norm,
                        seed=cfg.seed, progress=progress, device=device)
        rows.append({"model": name, "framework": "pyg", "planned_epochs": plan["pyg"], **pyg})
        print(format_accuracy_row(rows[-1]), flush=True)
    if preset_row:
        p = PRESETS["cpu"]
        model = p.train.model
        cfg = dataclasses.replace(p.train_for(model), time_budget_min=minutes)
        res = run(cfg, p.task_for(model), workdir=workdir / f"{cfg.model}-cpu-preset",
                  split_file=split_file, preset="cpu", progress=progress,
                  dataset_cache=dataset_cache, model_config=p.model_config(model))
        rows.append(_ours_row(f"{cfg.model} (cpu preset)", res, cfg.epochs))
        print(format_accuracy_row(rows[-1]), flush=True)
    return rows


ACCURACY_HEADER = (f"{'model':32s} {'framework':9s} {'epochs':>11s} {'mol/s':>7s} "
                   f"{'seconds':>8s} {'val MAE meV':>11s} {'test MAE meV':>12s}")


def format_accuracy_row(r: dict) -> str:
    """One line of the accuracy table (epochs as done/planned)."""
    epochs = f"{r['epochs']:.4g}/{r['planned_epochs']}"
    return (f"{r['model']:32s} {r['framework']:9s} {epochs:>11s} {r['mol_per_s']:7.1f} "
            f"{r['seconds']:8.0f} {r['val_mae_mev']:11.1f} {r['test_mae_mev']:12.1f}")


def plot_accuracy(rows: list[dict], path: Path, minutes: float) -> None:
    """Bar plot of test MAE per model, ours vs PyG (log scale above a 10x spread)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["model"] for r in rows))
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for fw, label, color in (("ours", "mpattn (JAX)", "C0"), ("pyg", "PyG", "C1"),
                             ("schnetpack", "SchNetPack", "C2")):
        xs, ys = [], []
        for i, n in enumerate(names):
            have = {r["framework"]: r["test_mae_mev"] for r in rows if r["model"] == n}
            if fw in have:  # side by side where both ran, centred where one did
                xs.append(i + (0.0 if len(have) == 1 else (-0.2 if fw == "ours" else 0.2)))
                ys.append(have[fw])
        if xs:
            bars = ax.bar(xs, ys, width=0.4, label=label, color=color)
            ax.bar_label(bars, fmt="%.0f", fontsize=8)
    maes = [r["test_mae_mev"] for r in rows]
    if max(maes) > 10 * min(maes):
        ax.set_yscale("log")
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("test MAE, U0 (meV)")
    ax.set_title(f"QM9 U0 after {minutes:g} min of training")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
