"""Peers at equal time, ``python -m benchmarks.peers --minutes M``: our model and its PyTorch
Geometric peer (:mod:`benchmarks.peers` builds them) trained M minutes each, compared by test MAE.

The runs: the ``cpu`` preset's split 15,000 / 1,000 / 5,000
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

Rows land in the ``accuracy`` part of ``peers-<device>-<date>[-n].json``, bars in its ``.png``.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from pathlib import Path

import numpy as np

from benchmarks.common import qm9_molecules
from benchmarks.pyg_models import (
    build_pyg,
    pyg_molecules,
    require_torch,
    synchronize,
    torch_device,
    torch_params,
)

__all__ = ["ACCURACY_HEADER", "SIZES", "accuracy_rows", "format_accuracy_row", "lr_values",
           "planned_epochs", "plot_accuracy", "train_pyg"]

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


def lr_values(lr: float, *, steps_per_epoch: int, epochs: int) -> np.ndarray:
    """Our cosine schedule (``mpattn.train.schedules.make_schedule``) at steps 0..total:
    update ``k`` uses ``values[min(k, total)]``, as optax's ``inject_hyperparams`` does."""
    import jax.numpy as jnp

    from mpattn.train.schedules import make_schedule

    sched = make_schedule(lr, "cosine", steps_per_epoch=steps_per_epoch, epochs=epochs)
    return np.asarray(sched(jnp.arange(steps_per_epoch * epochs + 1)), np.float64)


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
