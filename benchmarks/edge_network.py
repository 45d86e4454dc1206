"""Edge-network layouts: molecules/s of a jitted train step (forward + backward) on real QM9.

    python -m benchmarks.edge_network --from-cache qm9-....npz   # random QM9 sample (no RDKit)
    python -m benchmarks.edge_network --molecules 256 --no-save  # first rows of qm9pack

The model is Gilmer's MPNN core: a Linear embedding of the node features (d = 64), ``steps``
(3) message-passing steps with one shared :class:`~mpattn.nn.message.EdgeNetwork` (K = 128
hidden units) and a shared :class:`~mpattn.nn.update.GRUUpdate`, a sum readout and a Linear
to U0 (standardised); the timed function is ``jax.value_and_grad`` of the squared error w.r.t.
all parameters, jit-compiled once (batches of 128 complete graphs, one padding budget).
Layouts: ``dense:sum_first`` and ``dense:project_first`` (per-molecule batched matmuls in two
contraction orders, :func:`~mpattn.nn.message.edge_network_dense`) and ``plain`` (A
materialised per edge, :func:`~mpattn.nn.message.edge_network_plain`).
Prints molecules/s per layout and writes ``benchmarks/results/edge_network-<device>-<date>.json``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from benchmarks.common import write_result

LAYOUTS = ("dense:sum_first", "dense:project_first", "plain")


def load_graphs(molecules: int, from_cache: Path | None):
    """``molecules`` QM9 molecules as a complete-graph GraphSet.

    From a cache (all of QM9): a uniform random sample (seed 0), representative of training
    batches (18 atoms on average, up to 29). Otherwise the first rows of qm9pack's CSV, which
    are smaller molecules on average.
    """
    import numpy as np

    if from_cache is not None:
        from mpattn.data.cache import load_molset

        gs = load_molset(from_cache).to_graphset()
        pick = np.random.default_rng(0).choice(len(gs), min(molecules, len(gs)), replace=False)
        return gs.subset(np.sort(pick))
    from mpattn.data.qm9 import build_qm9, read_qm9pack

    raw, _ = read_qm9pack(nrows=molecules)
    return build_qm9(raw, workers=1, progress=False).to_graphset()


def make_step(layout: str, order: str, num_features: int, dim: int, hidden: int, steps: int,
              max_nodes: int):
    """A jitted ``(state, batch) -> (loss, grads)`` and the model's initial state."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from mpattn.graph import graph_mask
    from mpattn.nn.message import EdgeNetwork
    from mpattn.nn.radial import edge_distances
    from mpattn.nn.update import GRUUpdate
    from mpattn.ops import graph_index, segment_sum

    class MPNN(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Linear(num_features, dim, rngs=rngs)
            self.message = EdgeNetwork(dim, hidden=hidden, layout=layout, max_nodes=max_nodes,
                                       order=order, rngs=rngs)
            self.update = GRUUpdate(dim, rngs=rngs)
            self.out = nnx.Linear(dim, 1, rngs=rngs)

        def __call__(self, g):
            _, dist = edge_distances(g.nodes["positions"], senders=g.senders,
                                     receivers=g.receivers)
            h = self.embed(g.nodes["features"])
            for _ in range(steps):
                m = self.message(h, senders=g.senders, receivers=g.receivers,
                                 bond=g.edges["bond"], distances=dist, n_node=g.n_node)
                h = self.update(h, m)
            gi = graph_index(g.n_node, h.shape[0])
            return self.out(segment_sum(h, gi, num_segments=g.n_node.shape[0]))[:, 0]

    model = MPNN(nnx.Rngs(0))
    graphdef, state = nnx.split(model)

    @jax.jit
    def step(state, g, y):
        def loss(state):
            pred = nnx.merge(graphdef, state)(g)
            mask = graph_mask(g)
            return jnp.sum(jnp.where(mask, (pred - y) ** 2, 0)) / jnp.maximum(mask.sum(), 1)

        return jax.value_and_grad(loss)(state)

    return step, state


def run(gs, layouts, batch_size: int, dim: int, hidden: int, steps: int, repeats: int,
        max_batches: int) -> dict:
    import jax
    import numpy as np

    from mpattn.data.loader import BatchLoader, derive_budgets

    budget = derive_budgets(gs, batch_size, num_budgets=1)  # one shape: one compilation
    loader = BatchLoader(gs, batch_size, budgets=budget, shuffle=False, prefetch=0)
    batches = []
    for b in loader:
        if len(batches) == max_batches:
            break
        if (b.globals["id"] >= 0).sum() == batch_size:  # full batches only
            batches.append(b)
    u0 = gs.globals["U0"]
    mu, sd = float(np.mean(u0)), float(np.std(u0))
    data = []
    for b in batches:
        y = ((b.globals["U0"] - mu) / sd).astype(np.float32)
        b = b._replace(globals={})
        data.append((jax.device_put(b), jax.device_put(y)))
    mols = batch_size * len(data)
    max_nodes = int(gs.n_node.max())
    out = {"budget": [budget[0].n_node, budget[0].n_edge, budget[0].n_graph],
           "batches": len(data), "max_nodes": max_nodes}
    for name in layouts:
        layout, _, order = name.partition(":")
        step, state = make_step(layout, order or "sum_first", gs.nodes["features"].shape[1], dim,
                                hidden, steps, max_nodes)
        t = time.perf_counter()
        jax.block_until_ready(step(state, *data[0]))
        compile_s = time.perf_counter() - t
        best = 0.0
        for _ in range(repeats):
            t = time.perf_counter()
            for g, y in data:
                res = step(state, g, y)
            jax.block_until_ready(res)
            best = max(best, mols / (time.perf_counter() - t))
        out[name] = {"mol_per_s": best, "compile_s": compile_s}
        print(f"{name:>19}: {best:9.1f} molecules/s   (compile {compile_s:.1f} s)", flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.edge_network",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--molecules", type=int, default=1024, help="first N QM9 molecules")
    ap.add_argument("--from-cache", type=Path, default=None,
                    help="load this MoleculeSet cache file instead of featurizing (no RDKit)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-batches", type=int, default=8)
    ap.add_argument("--layouts", nargs="+", choices=LAYOUTS,
                    default=["dense:sum_first", "dense:project_first", "plain"])
    ap.add_argument("--no-save", action="store_true", help="print only; write no JSON")
    args = ap.parse_args(argv)
    import jax

    gs = load_graphs(args.molecules, args.from_cache)
    mean_atoms = float(gs.n_node.mean())
    print(f"{len(gs)} QM9 molecules ({mean_atoms:.1f} atoms on average, complete graphs), batch "
          f"{args.batch_size}, d={args.dim}, K={args.hidden}, {args.steps} steps, device "
          f"{jax.devices()[0]}", flush=True)
    r = dict(molecules=len(gs), mean_atoms=mean_atoms, sampled=args.from_cache is not None,
             batch_size=args.batch_size, dim=args.dim, hidden=args.hidden, steps=args.steps)
    r.update(run(gs, args.layouts, args.batch_size, args.dim, args.hidden, args.steps,
                 args.repeats, args.max_batches))
    if not args.no_save:
        print(f"wrote {write_result('edge_network', r)}")
    return 0


if __name__ == "__main__":
    from mpattn.runtime import restart_with_hugepages

    restart_with_hugepages()  # before any work: huge pages for XLA's CPU buffers
    raise SystemExit(main())
