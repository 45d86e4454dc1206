"""Run outputs: ``results.json`` and the plots (learning curves, parity, error per size)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

__all__ = ["environment", "plot_curves", "plot_parity", "plot_per_size", "read_predictions",
           "write_json", "write_predictions"]


def write_json(path: str | Path, obj: dict) -> Path:
    """JSON with numpy scalars/arrays converted; written to a temporary name, then renamed."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")

    def default(o):
        if isinstance(o, np.ndarray):
            return o.tolist()
        if hasattr(o, "item"):
            return o.item()
        return str(o)

    tmp.write_text(json.dumps(obj, indent=1, default=default) + "\n")
    tmp.replace(path)
    return path


def environment() -> dict:
    """Where a run ran, for its results file: ``{"device", "python", "versions"}``."""
    import platform
    from importlib import metadata

    import jax

    d = jax.devices()[0]
    hosts = f" ({jax.process_count()} processes)" if jax.process_count() > 1 else ""
    versions = {}
    for pkg in ("mpattn", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return {"device": f"{d.platform}:{d.device_kind} x{jax.device_count()}{hosts}",
            "python": platform.python_version(), "versions": versions}


PREDICTION_COLUMNS = ("part", "id", "n_atoms", "true", "pred")


def write_predictions(path: str | Path, parts: dict) -> Path:
    """``predictions.csv``: one row per molecule, ``part,id,n_atoms,true,pred``.

    Args:
        path: the file to write (through a temporary name, then renamed).
        parts: part name (``"val"``, ``"test"``) -> ``(ids, n_atoms, true, pred)``, arrays of
            one length each; values in the target's unit (eV for energies).
    """
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    lines = [",".join(PREDICTION_COLUMNS)]
    for name, (ids, n_atoms, true, pred) in parts.items():
        ids, n_atoms, true, pred = (np.asarray(a).ravel() for a in (ids, n_atoms, true, pred))
        if not len(ids) == len(n_atoms) == len(true) == len(pred):
            raise ValueError(f"write_predictions: part {name!r} has {len(ids)} ids, "
                             f"{len(n_atoms)} sizes, {len(true)} targets, {len(pred)} "
                             "predictions")
        lines += [f"{name},{int(i)},{int(n)},{t:.6f},{p:.6f}"
                  for i, n, t, p in zip(ids, n_atoms, true, pred, strict=True)]
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)
    return path


def read_predictions(path: str | Path) -> dict[str, dict[str, np.ndarray]]:
    """Inverse of :func:`write_predictions`: part -> ``{"id", "n_atoms", "true", "pred"}``."""
    path = Path(path)
    with path.open() as f:
        header = f.readline().strip().split(",")
        if tuple(header) != PREDICTION_COLUMNS:
            raise ValueError(f"{path}: not a predictions file (header {header}, expected "
                             f"{list(PREDICTION_COLUMNS)})")
        rows = [line.rstrip("\n").split(",") for line in f if line.strip()]
    out: dict[str, dict[str, list]] = {}
    for k, row in enumerate(rows, start=2):
        if len(row) != len(PREDICTION_COLUMNS):
            raise ValueError(f"{path}, line {k}: {len(row)} fields, expected "
                             f"{len(PREDICTION_COLUMNS)}")
        cols = out.setdefault(row[0], {"id": [], "n_atoms": [], "true": [], "pred": []})
        cols["id"].append(int(row[1]))
        cols["n_atoms"].append(int(row[2]))
        cols["true"].append(float(row[3]))
        cols["pred"].append(float(row[4]))
    return {part: {"id": np.asarray(c["id"], np.int64),
                   "n_atoms": np.asarray(c["n_atoms"], np.int64),
                   "true": np.asarray(c["true"], np.float64),
                   "pred": np.asarray(c["pred"], np.float64)} for part, c in out.items()}


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(history: list[dict], path: str | Path, *, unit: str = "meV",
                key: str = "val_mae") -> Path:
    """Training loss and validation MAE (the rows' ``key``) per epoch, log scale."""
    plt = _figure()
    epochs = [r["epoch"] for r in history]
    fig, ax1 = plt.subplots(figsize=(6, 4))
    ax1.plot(epochs, [r[key] for r in history], "o-", color="C1", label="val MAE")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel(f"validation MAE ({unit})")
    ax1.set_yscale("log")
    ax2 = ax1.twinx()
    ax2.plot(epochs, [r["train_loss"] for r in history], "s--", color="C0",
             label="train loss (standardised)")
    ax2.set_ylabel("train loss (standardised)")
    ax2.set_yscale("log")
    fig.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_parity(pred, true, path: str | Path, *, unit: str = "eV", label: str = "test",
                offset=None, quantity: str = "target") -> Path:
    """Predicted vs reference, with the error histogram inset.

    ``offset`` (e.g. the per-element linear reference of each molecule) is subtracted from
    both axes, so that a total energy spanning thousands of eV shows its informative part.
    """
    plt = _figure()
    pred, true = np.asarray(pred, np.float64), np.asarray(true, np.float64)
    if offset is not None:
        pred, true = pred - offset, true - offset
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(true, pred, s=3, alpha=0.4)
    lo, hi = float(min(true.min(), pred.min())), float(max(true.max(), pred.max()))
    ax.plot([lo, hi], [lo, hi], "k--", lw=1)
    mae = np.mean(np.abs(pred - true))
    ax.set_title(f"{label}: MAE {mae * (1000 if unit == 'eV' else 1):.1f} "
                 f"{'meV' if unit == 'eV' else unit}")
    ax.set_xlabel(f"reference {quantity} ({unit})")
    ax.set_ylabel(f"predicted {quantity} ({unit})")
    inset = ax.inset_axes([0.58, 0.1, 0.38, 0.3])
    inset.hist((pred - true) * (1000 if unit == "eV" else 1), bins=60)
    inset.set_yscale("log")
    inset.set_title("error", fontsize=8)
    inset.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_per_size(per_size: dict, path: str | Path, *, key: str = "mae_mev",
                  unit: str = "meV") -> Path:
    """MAE per number of atoms (bars) with the molecule count on a second axis."""
    plt = _figure()
    sizes = sorted(int(s) for s in per_size)
    mae = [per_size[s if s in per_size else str(s)][key] for s in sizes]
    count = [per_size[s if s in per_size else str(s)]["n"] for s in sizes]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(sizes, mae, color="C1")
    ax.set_xlabel("atoms per molecule")
    ax.set_ylabel(f"test MAE ({unit})")
    ax2 = ax.twinx()
    ax2.plot(sizes, count, "k.-", lw=1)
    ax2.set_ylabel("molecules")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
