"""Roofline: how far each model's train step is from the device's floor.

    python -m benchmarks.roofline                       # mpnn, schnet, mhmp at batch 128
    python -m benchmarks.roofline --models schnet --batch-size 32 --batches 4 --no-save

For one jit-compiled train step (MSE + Adam, ``benchmarks.common.mse_adam_steps``) on real QM9
batches (complete graphs), XLA's own cost model of the compiled step
(``jax.jit(...).lower(...).compile().cost_analysis()``) gives the floating-point operations
and the bytes the step moves between memory and the compute units. Two ceilings are measured
on the same device in the same run:

- **matmul peak** (FLOP/s): a large float32 ``A @ B`` (4096² on an accelerator, 1024² on a
  CPU), timed after compilation;
- **memory bandwidth** (bytes/s): a jitted ``2 * x`` over a float32 array far larger than the
  caches (256 MiB on an accelerator, 64 MiB on a CPU), counted as one read and one write.

The floor of a step is ``max(flops / peak, bytes / bandwidth)`` (the roofline: a step cannot
be faster than its arithmetic at the matmul rate, nor than its traffic at the measured
bandwidth); the report gives measured time / floor (1.0 = at the roof), which ceiling binds
(``compute`` or ``memory``) and the arithmetic intensity (FLOP per byte) against the
device's ridge point ``peak / bandwidth``, and measured time / compute floor alone. XLA's
byte count sums every kernel's operands and results whether or not they sit in a cache, so on
a CPU (large caches, small kernels) the memory time over-states the traffic and "x floor" can
fall below 1; the compute floor stays a true lower bound. On a GPU, where kernels stream
operands from HBM, both ceilings are meaningful.

Writes ``benchmarks/results/roofline-<device>-<date>.json``.
"""

from __future__ import annotations

import argparse
import time

from benchmarks.common import mse_adam_steps, write_result

__all__ = ["HEADER", "bandwidth", "compiled_cost", "floor", "format_row", "main", "matmul_peak",
           "measure"]


def compiled_cost(fn, *args) -> dict[str, float]:
    """XLA's cost model of ``fn`` compiled for ``args``: flops, transcendentals, bytes.

    Args:
        fn: A ``jax.jit``-wrapped function.
        *args: Example arguments (their shapes and dtypes select the compilation).

    Returns:
        ``{"flops", "transcendentals", "bytes"}`` (floats; 0 where XLA reports nothing).
    """
    cost = fn.lower(*args).compile().cost_analysis()
    if isinstance(cost, list | tuple):  # older JAX: one dict per device program
        cost = cost[0] if cost else {}
    cost = cost or {}
    return {"flops": float(cost.get("flops", 0.0)),
            "transcendentals": float(cost.get("transcendentals", 0.0)),
            "bytes": float(cost.get("bytes accessed", 0.0))}


def _best_time(fn, *args, repeats: int) -> float:
    import jax

    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return best


def matmul_peak(n: int, *, repeats: int = 10) -> float:
    """Measured float32 FLOP/s of an ``n x n`` by ``n x n`` matrix product (best of repeats)."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    return 2.0 * n**3 / _best_time(jax.jit(jnp.matmul), a, b, repeats=repeats)


def bandwidth(nbytes: int, *, repeats: int = 10) -> float:
    """Measured bytes/s of ``2 * x`` on a float32 array of ``nbytes`` (one read + one write)."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones(max(1, nbytes // 4), jnp.float32)
    return 2.0 * x.nbytes / _best_time(jax.jit(lambda v: 2.0 * v), x, repeats=repeats)


def floor(flops: float, nbytes: float, peak: float, bw: float) -> dict:
    """The roofline floor of a step of ``flops`` and ``nbytes`` on a device of ``peak`` FLOP/s
    and ``bw`` bytes/s: ``{"compute_s", "memory_s", "floor_s", "bound", "intensity",
    "ridge"}`` (``floor_s`` is the larger of the compute and memory times)."""
    if not (peak > 0 and bw > 0):
        raise ValueError(f"peak and bandwidth must be positive, got {peak} and {bw}")
    if flops < 0 or nbytes < 0:
        raise ValueError(f"flops and bytes must be >= 0, got {flops} and {nbytes}")
    compute, memory = flops / peak, nbytes / bw
    return {"compute_s": compute, "memory_s": memory, "floor_s": max(compute, memory),
            "bound": "compute" if compute >= memory else "memory",
            "intensity": flops / nbytes if nbytes else float("inf"), "ridge": peak / bw}


def measure(name: str, gs, batch_size: int, batches: int, peak: float, bw: float) -> dict:
    """Cost, time and floor of ``name``'s train step over ``batches`` QM9 batches.

    Time and counts are totals over the batches (each budget compiled once, not timed), so
    batches of different padding budgets weigh as they occur.
    """
    import jax
    from flax import nnx

    from benchmarks.speed import batch_counts, qm9_batches
    from mpattn.models import create_model

    model = create_model(name, rngs=nnx.Rngs(0))
    data = qm9_batches(gs, batch_size, batches)
    forward, step, state, opt_state = mse_adam_steps(model)
    costs = {}
    for b in data:
        key = (b.nodes["z"].shape[0], b.senders.shape[0], b.n_node.shape[0])
        if key not in costs:
            costs[key] = compiled_cost(step, state, opt_state, b)
    carry = [state, opt_state]

    def run(b):
        carry[0], carry[1], loss = step(carry[0], carry[1], b)
        return loss

    for b in {(b.nodes["z"].shape[0], b.senders.shape[0]): b for b in data}.values():
        jax.block_until_ready(run(b))  # compile each budget
    t0 = time.perf_counter()
    for b in data:
        jax.block_until_ready(run(b))
    seconds = time.perf_counter() - t0
    flops = bytes_ = 0.0
    for b in data:
        c = costs[(b.nodes["z"].shape[0], b.senders.shape[0], b.n_node.shape[0])]
        flops, bytes_ = flops + c["flops"], bytes_ + c["bytes"]
    mols = sum(batch_counts(b)[0] for b in data)
    roof = floor(flops, bytes_, peak, bw)
    return {"model": name, "batch_size": batch_size, "batches": len(data), "molecules": mols,
            "flops_per_step": flops / len(data), "bytes_per_step": bytes_ / len(data),
            "step_s": seconds / len(data), "floor_s": roof["floor_s"] / len(data),
            "compute_floor_s": roof["compute_s"] / len(data),
            "memory_floor_s": roof["memory_s"] / len(data),
            "x_floor": seconds / roof["floor_s"], "x_compute": seconds / roof["compute_s"],
            "bound": roof["bound"],
            "intensity": roof["intensity"], "achieved_flop_per_s": flops / seconds,
            "train_mol_per_s": mols / seconds}


HEADER = (f"{'model':8s} {'batch':>5s} {'GFLOP/step':>10s} {'MB/step':>8s} {'FLOP/B':>7s} "
          f"{'step ms':>8s} {'compute ms':>10s} {'memory ms':>9s} {'x floor':>7s} "
          f"{'x compute':>9s} {'bound':>7s} {'GFLOP/s':>8s}")


def format_row(r: dict) -> str:
    """One table line of a :func:`measure` row."""
    return (f"{r['model']:8s} {r['batch_size']:5d} {r['flops_per_step'] / 1e9:10.2f} "
            f"{r['bytes_per_step'] / 1e6:8.1f} {r['intensity']:7.1f} {1e3 * r['step_s']:8.1f} "
            f"{1e3 * r['compute_floor_s']:10.2f} {1e3 * r['memory_floor_s']:9.2f} "
            f"{r['x_floor']:7.1f} {r['x_compute']:9.1f} {r['bound']:>7s} "
            f"{r['achieved_flop_per_s'] / 1e9:8.1f}")


def main(argv=None) -> int:
    import jax

    from benchmarks.common import add_dataset_cache_argument, qm9_graphs

    ap = argparse.ArgumentParser(prog="python -m benchmarks.roofline",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["mpnn", "schnet", "mhmp"])
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--molecules", type=int, default=2000)
    add_dataset_cache_argument(ap)
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args(argv)
    accel = jax.devices()[0].platform != "cpu"
    n, nbytes = (4096, 256 * 2**20) if accel else (1024, 64 * 2**20)
    peak, bw = matmul_peak(n), bandwidth(nbytes)
    print(f"device {jax.devices()[0].device_kind}: matmul peak {peak / 1e9:.1f} GFLOP/s "
          f"(float32 {n}x{n}), bandwidth {bw / 1e9:.1f} GB/s (2*x over {nbytes >> 20} MiB); "
          f"ridge {peak / bw:.1f} FLOP/byte", flush=True)
    gs = qm9_graphs(args.molecules, "complete", dataset_cache=args.dataset_cache)
    print(HEADER, flush=True)
    rows = []
    for name in args.models:
        rows.append(measure(name, gs, args.batch_size, args.batches, peak, bw))
        print(format_row(rows[-1]), flush=True)
    print("x floor = measured step time / max(FLOPs / matmul peak, bytes / bandwidth); "
          "x compute = step time / (FLOPs / matmul peak) (XLA's cost model of the compiled "
          "step; its bytes count every kernel's operands, cached or not: on a CPU the memory "
          "time is an upper bound, x floor < 1 is possible)")
    if not args.no_save:
        path = write_result("roofline", {
            "matmul_peak_flop_per_s": peak, "matmul_n": n, "bandwidth_bytes_per_s": bw,
            "bandwidth_array_bytes": nbytes, "edge_set": "complete",
            "molecules": args.molecules, "rows": rows})
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    from mpattn.runtime import restart_with_hugepages

    restart_with_hugepages()  # before any work: huge pages for XLA's CPU buffers
    raise SystemExit(main())
