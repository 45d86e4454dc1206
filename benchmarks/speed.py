"""Speed: training and inference throughput, compilations and peak memory per model and batch.

    python -m benchmarks.speed                                  # every model, batch 32 and 128
    python -m benchmarks.speed --models mpnn --batch-sizes 64 --batches 8 --no-save
    python -m benchmarks.speed --models schnet --steps-per-call 4   # 4 train steps per jit call
    python -m benchmarks.speed --sync-every-step      # block after every call (older results)
    python -m benchmarks.speed --models attention --model-config '{"attention_weights": "softmax"}'

Every registered QM9 model runs its default configuration (``mpattn.models.default_config``)
on real QM9 batches (complete edge set, a seeded random sample of ``--molecules`` molecules)
padded by ``BatchLoader`` to its static budgets. ``--model-config JSON`` overrides fields of
the config of every model in ``--models`` (each must have them), to time a non-default
configuration; the overrides are recorded in every row and in the JSON (``model_config``,
``{}`` for the defaults). The ``attention`` model's default has ``attention_weights="silu"``
(the model the main job trains); the rows of ``attention_potential`` in results written
before the one-engine refactor timed its softmax weights, which
``--models attention --model-config '{"attention_weights": "softmax"}'`` times again. For each
batch size it reports

- training throughput (jit ``value_and_grad`` + optax Adam step with donated parameters and
  optimizer state) and inference throughput (jit forward), in molecules/s and atoms/s, counting
  only real molecules and real atoms (never padding); throughput is the total real molecules
  (atoms) of the timed batches over their total wall time, after compilation;
- the timing mode (``timing`` in every row): ``pipelined`` (default) dispatches every call of a
  timed pass and blocks once, at its end, as a training loop does (steps run asynchronously,
  losses read at the epoch's end; the carried state keeps the train steps in order);
  ``sync_every_step`` (``--sync-every-step``) blocks after every call, the timing of the
  results written before pipelined timing existed. Either way the compile pass blocks after
  the first call on each padding budget;
- ``--steps-per-call K`` > 1: K train steps per jit call (``mse_adam_steps(model,
  steps_per_call=K)``: a ``jax.lax.scan`` over K batches stacked on a leading axis), one
  dispatch per K batches. The train batches then all share one padding budget (``BatchLoader``
  with ``derive_budgets(..., num_budgets=1)``: the same molecules per batch as with the default
  budgets, as greedy packing cuts by the largest budget either way, but more padding), and
  ``--batches`` is rounded down to a multiple of K (both passes time the same batches).
  Inference stays one batch per call on the default budgets, so its numbers do not depend on K;
- compile seconds (wall time of the first call on each distinct padding budget) and the number
  of XLA compilations of each function observed through ``jax.monitoring`` (it must equal the
  number of distinct padding budgets seen, ``budgets_seen_train`` for the train step (1 with
  K > 1) and ``budgets_seen`` for inference: ``ok`` in the table);
- peak memory: the device's ``peak_bytes_in_use`` on GPU, the process's peak resident set
  (``ru_maxrss``) on CPU. Both are process-wide high-water marks, so a row includes every row
  measured before it.

Writes ``benchmarks/results/speed-<device>-<date>.json``.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import numpy as np

from benchmarks.common import mse_adam_steps, write_result

__all__ = ["CompileCounter", "HEADER", "add_timing_arguments", "batch_counts",
           "check_timing_arguments", "format_row", "header", "main", "measure",
           "parse_model_config", "peak_memory", "qm9_batches", "stack_batches", "throughput",
           "timing_mode"]

_BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def batch_counts(graph) -> tuple[int, int]:
    """Real molecules and real atoms of a padded batch (padding graph and nodes excluded).

    Args:
        graph: A ``jraph.GraphsTuple`` padded as by ``mpattn.graph.pad_batch``.

    Returns:
        ``(molecules, atoms)``: the number of real graphs and of real nodes.
    """
    from mpattn.graph import graph_mask, node_mask

    return int(np.asarray(graph_mask(graph)).sum()), int(np.asarray(node_mask(graph)).sum())


def throughput(molecules: int, atoms: int, seconds: float) -> dict[str, float]:
    """Molecules/s and atoms/s of ``molecules`` and ``atoms`` processed in ``seconds``."""
    if seconds <= 0:
        raise ValueError(f"seconds must be positive, got {seconds}")
    return {"mol_per_s": molecules / seconds, "atoms_per_s": atoms / seconds}


class CompileCounter:
    """Counts XLA backend compilations inside a ``with`` block (via ``jax.monitoring``).

    Args:
        name: Only count compilations of the jitted function of this Python name (JAX reports
            it as ``jit(name)``); ``None`` counts every compilation (eager ops included).

    Attributes:
        count: Compilations observed so far.
        seconds: Their summed backend compile time.
    """

    def __init__(self, name: str | None = None):
        self.name, self.count, self.seconds = name, 0, 0.0

    def _listen(self, event: str, duration_secs: float, **kwargs) -> None:
        if event != _BACKEND_COMPILE_EVENT:
            return
        if self.name is None or kwargs.get("fun_name") in (self.name, f"jit({self.name})"):
            self.count += 1
            self.seconds += duration_secs

    def __enter__(self) -> CompileCounter:
        import jax.monitoring

        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def __exit__(self, *exc) -> None:
        import jax.monitoring

        jax.monitoring.unregister_event_duration_listener(self._listen)


def peak_memory() -> tuple[int, str]:
    """Peak memory of this process in bytes and what was measured.

    Returns:
        ``(bytes, "device_peak_bytes_in_use")`` from the first JAX device's memory stats where it
        reports them (GPU), else ``(bytes, "process_peak_rss")`` from ``ru_maxrss`` (KiB on
        Linux, bytes on macOS).
    """
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    if stats.get("peak_bytes_in_use"):
        return int(stats["peak_bytes_in_use"]), "device_peak_bytes_in_use"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024), "process_peak_rss"


def timing_mode(sync_every_step: bool) -> str:
    """The ``timing`` field of a result: ``"sync_every_step"`` or ``"pipelined"``."""
    return "sync_every_step" if sync_every_step else "pipelined"


def qm9_batches(gs, batch_size: int, batches: int, *, single_budget: bool = False) -> list:
    """The first ``batches`` BatchLoader batches (seed 0), standardised-ish ``y``, on device.

    ``single_budget``: pad every batch to one budget (``derive_budgets(gs, batch_size,
    num_budgets=1)``, the largest of the default ones) instead of the loader's default budgets;
    the molecules of each batch are the same either way (packing cuts by the largest budget).
    """
    import jax

    from mpattn.data.loader import BatchLoader, derive_budgets

    budgets = derive_budgets(gs, batch_size, num_budgets=1) if single_budget else None
    out = []
    for b in BatchLoader(gs, batch_size, budgets=budgets, prefetch=0, seed=0):
        real = np.asarray(b.globals["id"]) >= 0
        y = np.asarray(b.globals["U0"], np.float64)
        y = np.where(real, (y - y[real].mean()) / 10.0, 0.0)  # a standardised-ish target
        out.append(jax.device_put(b._replace(globals={"y": y.astype(np.float32)})))
        if len(out) == batches:
            break
    return out


def stack_batches(data: list, k: int) -> list:
    """Consecutive batches stacked ``k`` at a time on a new leading axis, on device.

    The input of ``mse_adam_steps(model, steps_per_call=k)``'s train step: call ``i`` stacks
    ``data[i*k : (i+1)*k]`` (numpy stack per leaf); a remainder of fewer than ``k`` batches at
    the end is dropped.

    Args:
        data: Padded batches (numpy or jax arrays), all of one padding budget.
        k: Batches per stack.

    Raises:
        ValueError: If ``k`` < 1, there are fewer than ``k`` batches, or the batches of one
            stack differ in shape (several padding budgets).
    """
    import jax

    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if len(data) < k:
        raise ValueError(f"{len(data)} batch(es) cannot fill one call of {k} steps: "
                         "use more --batches (or --molecules) or fewer --steps-per-call")
    out = []
    for i in range(len(data) // k):
        group = data[i * k:(i + 1) * k]
        shapes = {tuple(np.shape(x) for x in jax.tree.leaves(b)) for b in group}
        if len(shapes) != 1:
            raise ValueError(f"batches {i * k}..{(i + 1) * k - 1} differ in shape: the batches "
                             "of one call must share one padding budget")
        out.append(jax.device_put(jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]),
                                               *group)))
    return out


def _run(fn, data: list, name: str, sync_every_step: bool = False) -> tuple[float, float, int]:
    """(wall s of first calls per new shape, wall s of a pass over all data, compilations).

    The compile pass blocks after each first call; the timed pass blocks after every call with
    ``sync_every_step``, else once at its end (on every output: all calls have finished).
    """
    import jax

    def shape(b):
        return tuple(b.nodes["z"].shape) + tuple(b.senders.shape) + tuple(b.n_node.shape)

    first = {shape(b): b for b in data}
    with CompileCounter(name) as counter:
        t0 = time.perf_counter()
        for b in first.values():
            jax.block_until_ready(fn(b))
        compile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        if sync_every_step:
            for b in data:
                jax.block_until_ready(fn(b))
        else:
            jax.block_until_ready([fn(b) for b in data])
        run_s = time.perf_counter() - t0
    return compile_s, run_s, counter.count


def measure(name: str, gs, batch_size: int, batches: int, *, steps_per_call: int = 1,
            sync_every_step: bool = False, model_config: dict | None = None) -> dict:
    """Throughput, compilations and peak memory of one model at one batch size.

    Args:
        name: A registered model (``mpattn.models.model_names()``), default configuration
            with ``model_config``'s fields on top.
        gs: The GraphSet to batch (needs ``U0`` and ``id`` globals).
        batch_size: Molecules per batch (``BatchLoader``'s batch size).
        batches: How many batches to time (> 1 steps per call: rounded down to a multiple).
        steps_per_call: Train steps per jit call (K batches of one padding budget, stacked).
        sync_every_step: Block after every call instead of once per timed pass.
        model_config: Config field overrides of the model (``--model-config``; None or ``{}``:
            its default configuration), recorded in the row as ``model_config``.

    Returns:
        One result row (see the module docstring).
    """
    import jax
    from flax import nnx

    from mpattn.models import create_model

    overrides = dict(model_config or {})
    model = create_model(name, rngs=nnx.Rngs(0), **overrides)
    params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    data = qm9_batches(gs, batch_size, batches)
    data = data[:len(data) - len(data) % steps_per_call]  # whole calls of K train steps
    stacks = data
    if steps_per_call > 1:  # the same molecules per batch, all padded to one budget
        one = qm9_batches(gs, batch_size, max(len(data), steps_per_call), single_budget=True)
        stacks = stack_batches(one, steps_per_call)
        if [batch_counts(b) for b in one] != [batch_counts(b) for b in data]:
            raise RuntimeError(f"{name}: the one-budget batches hold other molecules")
    for b in data:
        model.check(b)
    mols, atoms = map(sum, zip(*(batch_counts(b) for b in data), strict=True))

    def budgets_of(batches):
        return len({(b.nodes["z"].shape, b.senders.shape, b.n_node.shape) for b in batches})

    budgets, budgets_train = budgets_of(data), budgets_of(stacks)
    forward, train_step, state, opt_state = mse_adam_steps(model, steps_per_call=steps_per_call)
    carry = {"state": state, "opt": opt_state}

    def infer(b):
        return forward(carry["state"], b)

    def step(b):
        carry["state"], carry["opt"], loss = train_step(carry["state"], carry["opt"], b)
        return loss

    fwd_compile, fwd_s, fwd_n = _run(infer, data, "forward", sync_every_step)
    train_compile, train_s, train_n = _run(step, stacks, "train_step", sync_every_step)
    mem, kind = peak_memory()
    fwd, train = throughput(mols, atoms, fwd_s), throughput(mols, atoms, train_s)
    return {
        "model": name, "model_config": overrides, "batch_size": batch_size,
        "params": int(params), "batches": len(data),
        "molecules": mols, "atoms": atoms, "budgets_seen": budgets,
        "budgets_seen_train": budgets_train,
        "timing": timing_mode(sync_every_step), "steps_per_call": steps_per_call,
        "train_calls": len(stacks),
        "train_mol_per_s": train["mol_per_s"], "train_atoms_per_s": train["atoms_per_s"],
        "infer_mol_per_s": fwd["mol_per_s"], "infer_atoms_per_s": fwd["atoms_per_s"],
        "compile_s_train": train_compile, "compile_s_infer": fwd_compile,
        "compiles_train": train_n, "compiles_infer": fwd_n,
        "compiles_ok": train_n == budgets_train and fwd_n == budgets,
        "peak_memory_bytes": mem, "peak_memory_kind": kind,
    }


HEADER = (f"{'model':19s} {'batch':>5s} {'params':>9s} {'train mol/s':>11s} {'atoms/s':>9s} "
          f"{'infer mol/s':>11s} {'atoms/s':>9s} {'compile s':>9s} {'compiles':>10s} "
          f"{'peak MiB':>9s}")


def header(steps_per_call: int = 1) -> str:
    """The table header: :data:`HEADER`, plus a ``steps/call`` column where K > 1."""
    return HEADER + (f" {'steps/call':>10s}" if steps_per_call > 1 else "")


def format_row(r: dict) -> str:
    """One table line of a :func:`measure` row (compiles as ``train/infer:budgets``, or
    ``train/infer:train budgets/infer budgets`` where those differ, as with more than one train
    step per call; then a last column ``steps/call``)."""
    comp = f"{r['compiles_train']}/{r['compiles_infer']}:"
    bt = r.get("budgets_seen_train", r["budgets_seen"])
    comp += f"{bt}/{r['budgets_seen']}" if bt != r["budgets_seen"] else f"{r['budgets_seen']}"
    comp += "" if r["compiles_ok"] else "!"
    k = r.get("steps_per_call", 1)
    return (f"{r['model']:19s} {r['batch_size']:5d} {r['params']:9,d} "
            f"{r['train_mol_per_s']:11.1f} {r['train_atoms_per_s']:9.0f} "
            f"{r['infer_mol_per_s']:11.1f} {r['infer_atoms_per_s']:9.0f} "
            f"{r['compile_s_train'] + r['compile_s_infer']:9.1f} {comp:>10s} "
            f"{r['peak_memory_bytes'] / 2**20:9.0f}" + (f" {k:10d}" if k > 1 else ""))


def add_timing_arguments(ap) -> None:
    """``--steps-per-call K`` and ``--sync-every-step`` (benchmarks.speed and .peers)."""
    ap.add_argument("--steps-per-call", type=int, default=1,
                    help="our train steps per jit call (lax.scan over K stacked batches of one "
                         "padding budget; --batches rounded down to a multiple of K)")
    ap.add_argument("--sync-every-step", action="store_true",
                    help="block after every timed call (PyG: read the loss every step), as "
                         "results before pipelined timing did; default: block once per pass")


def check_timing_arguments(ap, args) -> None:
    """``ap.error`` for a ``--steps-per-call`` below 1 or above ``--batches``."""
    if args.steps_per_call < 1:
        ap.error(f"--steps-per-call must be >= 1, got {args.steps_per_call}")
    if args.batches < args.steps_per_call:
        ap.error(f"--batches ({args.batches}) must be at least --steps-per-call "
                 f"({args.steps_per_call})")


def parse_model_config(ap, text: str, models) -> dict:
    """``--model-config``'s JSON object, checked against the config of every model in
    ``models`` (``ap.error`` naming the problem: bad JSON, not an object, a field a model's
    config lacks or a value it rejects)."""
    from mpattn.models import default_config

    try:
        overrides = json.loads(text)
    except json.JSONDecodeError as err:
        ap.error(f"--model-config {text!r}: not JSON ({err})")
    if not isinstance(overrides, dict):
        ap.error(f"--model-config {text!r}: not a JSON object")
    for name in models:
        try:
            default_config(name, **overrides)
        except (ValueError, TypeError) as err:
            ap.error(f"--model-config: {err}")
    return overrides


def main(argv=None) -> int:
    from benchmarks.common import add_dataset_cache_argument, qm9_graphs
    from mpattn.models import model_names

    ap = argparse.ArgumentParser(prog="python -m benchmarks.speed",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=model_names(), choices=model_names())
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[32, 128])
    ap.add_argument("--batches", type=int, default=8, help="timed batches per model and size")
    ap.add_argument("--molecules", type=int, default=2000,
                    help="QM9 molecules drawn at random (seeded) from the whole set")
    ap.add_argument("--model-config", default="{}", metavar="JSON",
                    help="config overrides (a JSON object) of every model in --models, e.g. "
                         '\'{"attention_weights": "softmax"}\'; recorded in the rows '
                         "(default: each model's default configuration)")
    add_timing_arguments(ap)
    add_dataset_cache_argument(ap)
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args(argv)
    check_timing_arguments(ap, args)
    overrides = parse_model_config(ap, args.model_config, args.models)
    gs = qm9_graphs(args.molecules, "complete", dataset_cache=args.dataset_cache)
    print(header(args.steps_per_call), flush=True)
    rows = []
    for name in args.models:
        for bs in args.batch_sizes:
            rows.append(measure(name, gs, bs, args.batches, steps_per_call=args.steps_per_call,
                                sync_every_step=args.sync_every_step, model_config=overrides))
            print(format_row(rows[-1]), flush=True)
    kind = rows[-1]["peak_memory_kind"] if rows else None
    timing = timing_mode(args.sync_every_step)
    print(f"compiles: train/infer:budgets seen (train/infer where they differ; '!' = "
          f"mismatch); peak memory: {kind} "
          f"(process-wide high-water mark); timing: {timing}; train steps per call: "
          f"{args.steps_per_call}; model config: "
          f"{json.dumps(overrides) if overrides else 'defaults'}")
    if not args.no_save:
        path = write_result("speed", {"edge_set": "complete", "molecules": args.molecules,
                                      "batches": args.batches, "timing": timing,
                                      "steps_per_call": args.steps_per_call,
                                      "model_config": overrides,
                                      "memory_kind": kind, "rows": rows})
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    from mpattn.runtime import restart_with_hugepages

    restart_with_hugepages()  # before any work: huge pages for XLA's CPU buffers
    raise SystemExit(main())
