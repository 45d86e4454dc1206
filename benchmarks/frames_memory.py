"""Memory and loader throughput of potential training data: radius graphs stored for the
whole dataset against the atoms alone with edges built per batch (RadiusGraphSet).

    python -m benchmarks.frames_memory [--frames 4400] [--cutoff 5] [--batch-size 8]

On the bundled SPICE-like set (or its first ``--frames``): bytes of each layout's arrays,
the resident-memory growth of building each (``VmRSS``), and the frames per second of one
epoch of batches assembled by the loader (synchronously, so the edge building is timed).
Then what 1,000,000 frames of 30 atoms would take in each layout, from bytes per atom and
per frame measured here and the edges per frame of the set's largest molecules (all pairs
within the cutoff: 30 atoms give up to 870 directed edges). Prints and saves
``benchmarks/results/frames_memory-<device>-<date>.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import sys
import time

import numpy as np

from benchmarks.common import RESULTS, device_name, machine_info

__all__ = ["main"]


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _epoch_rate(gs, batch_size: int) -> float:
    from mpattn.data.loader import BatchLoader

    loader = BatchLoader(gs, batch_size, prefetch=0, seed=0)
    t = time.perf_counter()
    n = sum(int((b.globals["id"] >= 0).sum()) for b in loader)
    return n / (time.perf_counter() - t)


def main(argv=None) -> int:
    from mpattn.data.frames import read_frames, spice_like_xtb_path
    from mpattn.data.radius_graphs import RadiusGraphSet

    p = argparse.ArgumentParser(prog="python -m benchmarks.frames_memory")
    p.add_argument("--frames", type=int, default=4400)
    p.add_argument("--cutoff", type=float, default=5.0)
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args(argv)
    frames = read_frames(spice_like_xtb_path())
    frames = frames.subset(np.arange(min(args.frames, len(frames))))
    atoms = int(frames.n_atoms.sum())
    from mpattn.neighbors import radius_edges

    radius_edges(frames.positions[:frames.n_atoms[0]], args.cutoff)  # imports, warm caches
    gc.collect()
    r0 = _rss_mb()
    t = time.perf_counter()
    lazy = RadiusGraphSet(frames.n_atoms, {"z": frames.z.astype(np.int8),
                                           "positions": frames.positions.astype(np.float32),
                                           "forces": frames.forces.astype(np.float32)},
                          frames.cell, frames.pbc, args.cutoff,
                          globals={"energy": frames.energy.astype(np.float32)},
                          ids=frames.ids)
    lazy_s = time.perf_counter() - t
    r1 = _rss_mb()
    t = time.perf_counter()
    stored = frames.to_graphset(args.cutoff)
    stored.nodes["forces"] = frames.forces.astype(np.float32)
    stored.globals = {"energy": frames.energy.astype(np.float32)}
    stored_s = time.perf_counter() - t
    r2 = _rss_mb()
    stored_bytes = sum(a.nbytes for a in (stored.n_node, stored.n_edge, stored.ids,
                                          stored.senders, stored.receivers,
                                          *stored.nodes.values(), *stored.edges.values(),
                                          *stored.globals.values()))
    edges = int(stored.n_edge.sum())
    per_edge = (stored_bytes - lazy.nbytes()) / edges
    per_atom = sum(v.nbytes for v in lazy.nodes.values()) / atoms
    per_frame = (lazy.nbytes() - per_atom * atoms) / len(frames)
    big = frames.n_atoms >= np.quantile(frames.n_atoms, 0.9)
    fill = float(np.mean(stored.n_edge[big] / (frames.n_atoms[big] * (frames.n_atoms[big] - 1))))
    e30 = fill * 30 * 29
    million = {"atoms": 30_000_000, "edges_per_frame": e30,
               "per_batch_gb": (per_atom * 30e6 + per_frame * 1e6) / 1e9,
               "stored_gb": (per_atom * 30e6 + per_frame * 1e6 + per_edge * e30 * 1e6) / 1e9}
    result = {
        "command": "python -m benchmarks.frames_memory " + " ".join(
            sys.argv[1:] if argv is None else argv),
        "date": dt.date.today().isoformat(), "machine": machine_info(),
        "frames": len(frames), "atoms": atoms, "edges": edges, "cutoff": args.cutoff,
        "per_batch": {"bytes": lazy.nbytes(), "rss_mb": r1 - r0, "build_s": lazy_s,
                      "loader_frames_per_s": _epoch_rate(lazy, args.batch_size)},
        "stored": {"bytes": stored_bytes, "rss_mb": r2 - r1, "build_s": stored_s,
                   "loader_frames_per_s": _epoch_rate(stored, args.batch_size)},
        "bytes_per_atom": per_atom, "bytes_per_frame": per_frame, "bytes_per_edge": per_edge,
        "edge_fill_largest_molecules": fill, "million_frames_of_30_atoms": million,
    }
    print(f"{len(frames)} frames, {atoms} atoms, {edges} edges (cutoff {args.cutoff} Å)")
    for name in ("per_batch", "stored"):
        r = result[name]
        print(f"{name:<10} {r['bytes'] / 1e6:8.2f} MB arrays, RSS +{r['rss_mb']:7.1f} MB, "
              f"built in {r['build_s']:.2f} s, loader {r['loader_frames_per_s']:,.0f} frames/s")
    print(f"1,000,000 frames of 30 atoms (~{e30:.0f} edges each): per batch "
          f"{million['per_batch_gb']:.2f} GB, stored {million['stored_gb']:.1f} GB")
    out = RESULTS / f"frames_memory-{device_name()}-{dt.date.today().isoformat()}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
