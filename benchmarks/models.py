"""Model cost: parameters, forward and train-step time per 1,000 QM9 molecules.

    python -m benchmarks.models                      # every model, default configs, CPU
    python -m benchmarks.models --models mpnn --batch-size 64 --edge-set bonds
    python -m benchmarks.models --models mhmp --batch-size 16 \
        --model-config '{"dim": 48, "head_dim": 16, "edge_hidden": 32, "ff_dim": 96}'

Each model runs its default configuration on real QM9 batches (complete edge set by
default) padded to the loader's static budgets. The train step is a jit-compiled
MSE + Adam step (``jax.value_and_grad`` + optax) with donated buffers; times are the median
over batches after compilation (compile time reported separately). Writes
``benchmarks/results/models-<device>-<date>.json`` (with ``--model-config``:
``models-<model>-custom-bs<batch>-<device>-<date>.json``).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from benchmarks.common import add_dataset_cache_argument, mse_adam_steps, qm9_graphs, write_result


def measure(name: str, gs, batch_size: int, batches: int, overrides: dict | None = None) -> dict:
    import jax
    from flax import nnx

    from mpattn.data.loader import BatchLoader
    from mpattn.models import create_model

    model = create_model(name, rngs=nnx.Rngs(0), **(overrides or {}))
    params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    loader = BatchLoader(gs, batch_size, prefetch=0, seed=0)
    data, mols = [], []
    for b in loader:
        model.check(b)
        real = np.asarray(b.globals["id"]) >= 0
        y = np.asarray(b.globals["U0"], np.float64)
        y = np.where(real, (y - y[real].mean()) / 10.0, 0.0)  # a standardised-ish target
        data.append(jax.device_put(b._replace(globals={"y": y.astype(np.float32)})))
        mols.append(int(real.sum()))
        if len(data) == batches:
            break
    forward, train_step, state, opt_state = mse_adam_steps(model)

    def timed(fn):
        times = []
        for b in data:
            t = time.perf_counter()
            jax.block_until_ready(fn(b))
            times.append(time.perf_counter() - t)
        return times

    shapes = {tuple(b.nodes["z"].shape) + tuple(b.senders.shape) for b in data}
    t0 = time.perf_counter()
    for b in data:  # compile every budget once
        jax.block_until_ready(forward(state, b))
    fwd_compile = time.perf_counter() - t0
    fwd = timed(lambda b: forward(state, b))
    t0 = time.perf_counter()
    for b in data:  # the step donates its inputs: carry the returned state on
        state, opt_state, loss = train_step(state, opt_state, b)
        jax.block_until_ready(loss)
    step_compile = time.perf_counter() - t0

    def step(b):
        nonlocal state, opt_state
        state, opt_state, loss = train_step(state, opt_state, b)
        return loss

    steps = timed(step)
    per_batch = float(np.mean(mols))
    return {
        "model": name,
        "params": int(params),
        "budgets_seen": len(shapes),
        "forward_ms_per_1000_mol": 1000 * float(np.median(fwd)) / per_batch * 1000,
        "train_step_ms_per_1000_mol": 1000 * float(np.median(steps)) / per_batch * 1000,
        "train_mol_per_s": per_batch / float(np.median(steps)),
        "compile_s_forward": fwd_compile,
        "compile_s_train": step_compile,
    }


def main(argv=None) -> int:
    from mpattn.models import model_names

    ap = argparse.ArgumentParser(prog="python -m benchmarks.models",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=model_names(), choices=model_names())
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--batches", type=int, default=8, help="timed batches per model")
    ap.add_argument("--molecules", type=int, default=3000,
                    help="QM9 molecules drawn at random (seeded) from the whole set")
    ap.add_argument("--edge-set", default="complete", choices=["complete", "bonds"])
    ap.add_argument("--model-config", default="{}",
                    help='config overrides (JSON) for every model measured, e.g. \'{"dim": 48}\'')
    add_dataset_cache_argument(ap)
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args(argv)
    overrides = json.loads(args.model_config)
    gs = qm9_graphs(args.molecules, args.edge_set, dataset_cache=args.dataset_cache)
    rows = []
    for name in args.models:
        r = measure(name, gs, args.batch_size, args.batches, overrides)
        rows.append(r)
        print(f"{name:8s} params {r['params']:>9,d}  forward {r['forward_ms_per_1000_mol']:8.1f} "
              f"ms/1000 mol  train step {r['train_step_ms_per_1000_mol']:8.1f} ms/1000 mol "
              f"({r['train_mol_per_s']:7.1f} mol/s)  compile {r['compile_s_train']:.1f} s",
              flush=True)
    if not args.no_save:
        name = "models" if not overrides else f"models-{args.models[0]}-custom-bs{args.batch_size}"
        path = write_result(name, {"batch_size": args.batch_size,
                                       "edge_set": args.edge_set, "model_config": overrides,
                                       "rows": rows})
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    from mpattn.runtime import restart_with_hugepages

    restart_with_hugepages()  # before any work: huge pages for XLA's CPU buffers
    raise SystemExit(main())
