"""Data pipeline benchmark: featurize all of QM9, reload it from the cache, batch it.

    python -m benchmarks.data_pipeline            # full QM9 (the issue's targets below)
    python -m benchmarks.data_pipeline --limit 5000 --no-save   # a quick look
    python -m benchmarks.data_pipeline --from-cache qm9-....npz  # no RDKit needed (GPU hosts)

Targets on 2 CPU cores: featurize all 130,831 molecules (complete edge set) in under 90 s;
reload from the cache in under 5 s; the loader yields at least 20,000 molecules/s.
Prints a table and writes ``benchmarks/results/data_pipeline-<device>-<date>.json``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from benchmarks.common import write_result


def featurize_all(limit: int | None, workers: int | None) -> tuple[dict, object]:
    """Featurize QM9 into a fresh temporary cache, then reload it; timings and the set."""
    from mpattn.data.cache import cached
    from mpattn.data.qm9 import build_qm9, read_qm9pack
    from mpattn.featurize import FeaturizeOptions

    with tempfile.TemporaryDirectory(prefix="mpattn-bench-") as tmp:
        t0 = time.perf_counter()
        raw, bad = read_qm9pack(nrows=limit)
        t1 = time.perf_counter()
        ms = cached("qm9-bench", "x", lambda: build_qm9(raw, bad, workers=workers),
                    directory=Path(tmp), log=None)
        t2 = time.perf_counter()
        gs = ms.to_graphset(FeaturizeOptions(edge_set="complete"))
        t3 = time.perf_counter()
        cache_mb = next(Path(tmp).glob("*.npz")).stat().st_size / 1e6
        t4 = time.perf_counter()
        reloaded = cached("qm9-bench", "x", lambda: None, directory=Path(tmp), log=None)
        t5 = time.perf_counter()
        assert len(reloaded) == len(ms)
    return dict(
        molecules=len(ms),
        rejected=len(ms.rejected),
        paths=ms.summary()["paths"],
        edges=int(gs.n_edge.sum()),
        cache_mb=cache_mb,
        read_s=t1 - t0,
        perceive_and_cache_s=t2 - t1,
        graphs_s=t3 - t2,
        featurize_total_s=t3 - t0,
        reload_s=t5 - t4,
    ), gs


def from_cache(path: Path) -> tuple[dict, object]:
    """Load a cache file (no RDKit, no qm9pack) and build complete graphs; timings and set."""
    import sys

    from mpattn.data.cache import load_molset
    from mpattn.featurize import FeaturizeOptions

    t0 = time.perf_counter()
    ms = load_molset(path)
    t1 = time.perf_counter()
    gs = ms.to_graphset(FeaturizeOptions(edge_set="complete"))
    t2 = time.perf_counter()
    return dict(molecules=len(ms), edges=int(gs.n_edge.sum()), reload_s=t1 - t0,
                graphs_s=t2 - t1, cache_mb=path.stat().st_size / 1e6,
                rdkit_imported="rdkit" in sys.modules), gs


def loader_throughput(gs, batch_size: int, epochs: int = 2, device_put: bool = False) -> dict:
    """Best-of-``epochs`` molecules/s of the loader, with and without prefetch.

    With ``device_put`` every batch is also copied to the default JAX device and waited for.
    """
    from mpattn.data.loader import BatchLoader

    out: dict = {}
    if device_put:
        import jax
    for prefetch in (0, 2):
        loader = BatchLoader(gs, batch_size, prefetch=prefetch, seed=0)
        best = 0.0
        for _ in range(epochs):
            t = time.perf_counter()
            n = 0
            for b in loader:
                n += int((b.globals["id"] >= 0).sum())
                if device_put:
                    jax.block_until_ready(jax.device_put(b))
            best = max(best, n / (time.perf_counter() - t))
        assert n == len(gs)
        key = "loader_device_put" if device_put else "loader"
        out[f"{key}_mol_per_s_prefetch{prefetch}"] = best
    out["budgets"] = [(b.n_node, b.n_edge, b.n_graph) for b in loader.budgets]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.data_pipeline",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--limit", type=int, default=None,
                    help="only the first N molecules of qm9pack's first CSV")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--from-cache", type=Path, default=None,
                    help="skip featurization: load this cache file (needs no RDKit)")
    ap.add_argument("--device-put", action="store_true",
                    help="also time copying every batch to the default JAX device")
    ap.add_argument("--no-save", action="store_true", help="print only; write no JSON")
    args = ap.parse_args(argv)
    if args.from_cache:
        r, gs = from_cache(args.from_cache)
    else:
        r, gs = featurize_all(args.limit, args.workers)
    r["batch_size"] = args.batch_size
    r.update(loader_throughput(gs, args.batch_size))
    if args.device_put:
        r.update(loader_throughput(gs, args.batch_size, device_put=True))
    rows = [("molecules", f"{r['molecules']:,} ({r.get('rejected', 0)} rejected)")]
    if "paths" in r:
        rows += [
            ("bond perception paths", ", ".join(f"{k} {v:,}" for k, v in r["paths"].items())),
            ("read CSV", f"{r['read_s']:.1f} s"),
            ("perceive + write cache", f"{r['perceive_and_cache_s']:.1f} s"),
        ]
    rows.append(("complete graphs", f"{r['graphs_s']:.1f} s ({r['edges']:,} edges)"))
    if "featurize_total_s" in r:
        rows.append(("featurize total (target < 90 s)", f"{r['featurize_total_s']:.1f} s"))
    rows += [
        ("cache size", f"{r['cache_mb']:.1f} MB"),
        ("reload from cache (target < 5 s)", f"{r['reload_s']:.2f} s"),
    ]
    if "rdkit_imported" in r:
        rows.append(("RDKit imported", str(r["rdkit_imported"])))
    for key, label in (("loader", "loader"), ("loader_device_put", "loader + device_put")):
        if f"{key}_mol_per_s_prefetch0" in r:
            rows.append((f"{label}, no prefetch", f"{r[key + '_mol_per_s_prefetch0']:,.0f} mol/s"))
            rows.append((f"{label}, prefetch 2 (target >= 20,000)",
                         f"{r[key + '_mol_per_s_prefetch2']:,.0f} mol/s"))
    rows.append(("budgets (n_node, n_edge, n_graph)", str(r["budgets"])))
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{w}}  {v}")
    if not args.no_save:
        print(f"wrote {write_result('data_pipeline', r)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
