"""Shared helpers of the benchmark scripts: machine description and result files."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
from importlib import metadata
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

__all__ = ["RESULTS", "device_name", "machine_info", "mse_adam_steps", "write_result"]


def device_name() -> str:
    """A short file-name-safe name of the compute device (GPU model or CPU core count)."""
    try:
        import jax

        dev = jax.devices()[0]
        if dev.platform != "cpu":
            return dev.device_kind.replace(" ", "-").replace("/", "-")
    except Exception:  # noqa: BLE001 - no JAX backend is fine for CPU-only benchmarks
        pass
    return f"cpu{_cores()}"


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def machine_info() -> dict:
    """Processor, core count and versions of the packages that matter for the numbers."""
    versions = {}
    for pkg in ("mpattn", "jax", "jaxlib", "flax", "numpy", "rdkit", "vesin", "torch",
                "torch-geometric"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return {
        "device": device_name(),
        "processor": platform.processor() or platform.machine(),
        "cores": _cores(),
        "python": platform.python_version(),
        "versions": versions,
        "date": _dt.date.today().isoformat(),
    }


def write_result(name: str, payload: dict, directory: Path = RESULTS) -> Path:
    """Write ``<name>-<device>-<date>.json`` under ``benchmarks/results/``; a second run on
    the same day writes ``...-<date>-2.json`` (then ``-3``...): no result is overwritten."""
    info = machine_info()
    directory.mkdir(parents=True, exist_ok=True)
    stem = f"{name}-{info['device']}-{info['date']}"
    path, n = directory / f"{stem}.json", 1
    while path.exists():
        n += 1
        path = directory / f"{stem}-{n}.json"
    path.write_text(json.dumps({"machine": info, **payload}, indent=1) + "\n")
    return path


def mse_adam_steps(model, lr: float = 1e-3):
    """The benchmarks' jit-compiled forward and train step of an nnx ``model``.

    Returns ``(forward, train_step, state, opt_state)``: ``forward(state, graph)`` gives the
    predictions; ``train_step(state, opt_state, graph) -> (state, opt_state, loss)`` is a
    masked MSE (against ``graph.globals["y"]``) + Adam step with ``state`` and ``opt_state``
    donated (pass the returned ones on). The jitted functions keep the names ``forward`` and
    ``train_step`` (compile counters filter on them).
    """
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from mpattn.graph import graph_mask

    graphdef, state = nnx.split(model)
    opt = optax.adam(lr)

    def forward(state, graph):
        return nnx.merge(graphdef, state)(graph)

    def loss_fn(state, graph):
        mask = graph_mask(graph)
        err = jnp.where(mask, forward(state, graph) - graph.globals["y"], 0.0)
        return jnp.sum(err**2) / jnp.sum(mask)

    def train_step(state, opt_state, graph):
        loss, grads = jax.value_and_grad(loss_fn)(state, graph)
        updates, opt_state = opt.update(grads, opt_state, state)
        return optax.apply_updates(state, updates), opt_state, loss

    return (jax.jit(forward), jax.jit(train_step, donate_argnums=(0, 1)), state,
            opt.init(state))
