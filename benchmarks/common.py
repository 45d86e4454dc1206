"""Shared helpers of the benchmark scripts: machine description and result files."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
from importlib import metadata
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

__all__ = ["RESULTS", "add_dataset_cache_argument", "align_by_id", "device_name",
           "machine_info", "mse_adam_steps", "qm9_graphs", "qm9_molecules",
           "save_result_and_figure", "write_result"]


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


def add_dataset_cache_argument(ap) -> None:
    """``--dataset-cache FILE``: every QM9 benchmark reads the featurized cache instead of
    qm9pack when given one (a machine without qm9pack or RDKit, such as a lent GPU host)."""
    ap.add_argument("--dataset-cache", type=Path, default=None,
                    help="featurized QM9 cache file (qm9-<key>.npz; no qm9pack/RDKit needed)")


def align_by_id(runs: dict, what: str = "molecules") -> tuple:
    """Match several runs' predictions of the same molecules by QM9 id.

    Args:
        runs: label -> ``{"id": ..., ...}`` (a part of
            :func:`mpattn.train.report.read_predictions`), in any row order.
        what: the rows' name in the error (e.g. ``"test molecules"``).

    Returns:
        ``(ids, orders)``: the sorted ids and, per label, the row order that puts that run's
        arrays in ``ids`` order (``p["pred"][orders[label]]``).

    Raises:
        ValueError: a run holds other molecules than the first (another split), named.
    """
    import numpy as np

    labels = list(runs)
    orders = {labels[0]: np.argsort(runs[labels[0]]["id"], kind="stable")}
    ids = np.asarray(runs[labels[0]]["id"])[orders[labels[0]]]
    for label in labels[1:]:
        o = np.argsort(runs[label]["id"], kind="stable")
        if not np.array_equal(np.asarray(runs[label]["id"])[o], ids):
            raise ValueError(f"run {label!r} has other {what} than {labels[0]!r} (not the "
                             "same split)")
        orders[label] = o
    return ids, orders


def qm9_molecules(dataset_cache: Path | None = None):
    """All of QM9: the ``dataset_cache`` file if given, else ``load_qm9()`` (qm9pack)."""
    if dataset_cache is not None:
        from mpattn.data.cache import load_molset

        return load_molset(Path(dataset_cache))
    from mpattn.data.qm9 import load_qm9

    return load_qm9(progress=False)


def qm9_graphs(n: int, edge_set: str = "complete", *, seed: int = 0,
               dataset_cache: Path | None = None):
    """A seeded random sample of ``n`` QM9 molecules as a GraphSet with the U0 target (the
    first rows of QM9 are its smallest molecules, hence the random draw)."""
    import numpy as np

    from mpattn.featurize import FeaturizeOptions

    ms = qm9_molecules(dataset_cache)
    pick = np.random.default_rng(seed).choice(len(ms), size=min(n, len(ms)), replace=False)
    return ms.subset(pick).to_graphset(FeaturizeOptions(edge_set=edge_set), targets=["U0"])


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


def save_result_and_figure(name: str, payload: dict, draw, *, out: Path | None = None,
                           save: bool = True, directory: Path = RESULTS) -> None:
    """The analysis scripts' outputs: ``payload`` through :func:`write_result` (unless not
    ``save``) and the figure ``draw(path)`` beside it as ``.png``, or at ``out`` when given
    (with ``save`` off, a figure only then); prints what it wrote."""
    if save:
        written = write_result(name, payload, directory)
        print(f"wrote {written}")
        out = out or written.with_suffix(".png")
    if out is not None:
        print(f"wrote {draw(out)}")


def mse_adam_steps(model, lr: float = 1e-3, *, steps_per_call: int = 1):
    """The benchmarks' jit-compiled forward and train step of an nnx ``model``.

    Returns ``(forward, train_step, state, opt_state)``, ``state`` and ``opt_state`` as flat
    lists of arrays (the model's nnx state and Adam's state; the trainer passes its carry
    the same way, see ``mpattn.train.steps.jit_carry``): ``forward(state, graph)`` gives the
    per-graph predictions (the model's ``"energy"`` output, [num_graphs]: only that output
    leaves the jitted function, as when the models returned it alone);
    ``train_step(state, opt_state, graph) -> (state, opt_state, loss)`` is a
    masked MSE (against ``graph.globals["y"]``) + Adam step with ``state`` and ``opt_state``
    donated (pass the returned ones on). The jitted functions keep the names ``forward`` and
    ``train_step`` (compile counters filter on them).

    ``steps_per_call`` K > 1: ``train_step(state, opt_state, graphs) -> (state, opt_state,
    losses)`` takes K batches of one padding budget stacked on a new leading axis (every leaf
    ``[K, ...]``, see ``benchmarks.speed.stack_batches``) and runs the same step on each in
    turn inside one jit (``jax.lax.scan``): K updates for one dispatch; ``losses`` is
    float32[K], each the loss before its update.
    """
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from mpattn.graph import graph_mask

    if int(steps_per_call) != steps_per_call or steps_per_call < 1:
        raise ValueError(f"steps_per_call must be a positive integer, got {steps_per_call}")
    graphdef, state = nnx.split(model)
    opt = optax.adam(lr)

    def forward(state, graph):
        return nnx.merge(graphdef, state)(graph)["energy"]

    def loss_fn(state, graph):
        mask = graph_mask(graph)
        err = jnp.where(mask, forward(state, graph) - graph.globals["y"], 0.0)
        return jnp.sum(err**2) / jnp.sum(mask)

    def one_step(state, opt_state, graph):
        loss, grads = jax.value_and_grad(loss_fn)(state, graph)
        updates, opt_state = opt.update(grads, opt_state, state)
        return optax.apply_updates(state, updates), opt_state, loss

    if steps_per_call == 1:
        def train_step(state, opt_state, graph):
            return one_step(state, opt_state, graph)
    else:
        def train_step(state, opt_state, graphs):
            def body(carry, graph):
                state, opt_state, loss = one_step(*carry, graph)
                return (state, opt_state), loss

            (state, opt_state), losses = jax.lax.scan(body, (state, opt_state), graphs,
                                                      length=steps_per_call)
            return state, opt_state, losses

    # the jitted functions take and return flat lists of arrays, as the trainer's steps do
    # (mpattn.train.steps.jit_carry): nnx State arguments cost ms of host time per call
    state_leaves, state_def = jax.tree.flatten(state)
    opt_leaves, opt_def = jax.tree.flatten(opt.init(state))

    def flat_forward(state_leaves, graph):
        return forward(jax.tree.unflatten(state_def, state_leaves), graph)

    def flat_train_step(state_leaves, opt_leaves, graph):
        state, opt_state, loss = train_step(jax.tree.unflatten(state_def, state_leaves),
                                            jax.tree.unflatten(opt_def, opt_leaves), graph)
        return jax.tree.leaves(state), jax.tree.leaves(opt_state), loss

    flat_forward.__name__ = flat_forward.__qualname__ = "forward"
    flat_train_step.__name__ = flat_train_step.__qualname__ = "train_step"
    return (jax.jit(flat_forward), jax.jit(flat_train_step, donate_argnums=(0, 1)),
            state_leaves, opt_leaves)
