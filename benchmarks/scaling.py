"""Energy+forces cost versus system size: periodic liquid water from ~100 to ~12,000 atoms.

    python -m benchmarks.scaling                                 # both potentials, CPU
    python -m benchmarks.scaling --models schnet --sizes 96 384 1536 --repeats 3 --no-save
    python -m benchmarks.scaling --models attention \
        --model-config '{"attention_weights": "softmax"}'    # attention with softmax weights

Each system is a cubic periodic box of ``N/3`` rigid water molecules (O-H 0.96 Å, H-O-H
104.5°, random orientations) on a seeded jittered grid at 0.0334 molecules/Å³ (1.0 g/cm³;
O-O distances >= 2 Å under the minimum image). Structures are not equilibrated: what sets the
cost is the number of atoms and of neighbours within the cutoff (≈ 4π/3 r_c³ · 0.1 atoms/Å³
≈ 52 at 5 Å), both reported. Every model (its default config, ``--model-config``'s fields on
top, with ``cutoff`` overridden to ``--cutoff``: SchNet's published 10 Å becomes 5 Å; the
configs measured are recorded in the JSON) is wrapped in a
:class:`~mpattn.potential.Potential` with zero reference energies for H and O; per size
the padded neighbour graph is built once (:func:`mpattn.neighbors.neighbor_graph`, vesin,
timed separately), ``energy_and_forces`` is jit-compiled (compile seconds reported) and the
median of ``--repeats`` calls (``jax.block_until_ready``) is the time per step. The exponent
``t ∝ N^p`` is fitted by least squares in log-log over sizes >= ``--fit-min-atoms`` (smaller
systems are overhead-dominated) and over all sizes. Peak RSS is ``ru_maxrss``, monotone over
the process (a size's value includes every earlier size). A size that takes more than 60 s
per call, fails with an out-of-memory error or is predicted to exceed the available memory
stops the growth for that model (the reason is recorded). Each size runs in a fresh
process unless ``--in-process``. Writes
``benchmarks/results/scaling-<device>-<date>.json`` and ``.png`` (log-log plot).

The ``attention`` model's default config has ``attention_weights="silu"`` (the model the main
job trains); results written before the one-engine refactor name it ``attention_potential``
and timed its softmax weights, which ``--model-config '{"attention_weights": "softmax"}'``
times again.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import resource
import subprocess
import sys
import time

import numpy as np

from benchmarks.common import machine_info, write_result
from benchmarks.speed import parse_model_config

__all__ = ["WATER_DENSITY", "fit_exponent", "main", "measure", "water_box"]

#: liquid water at 1.0 g/cm³, molecules per Å³
WATER_DENSITY = 0.0334
_OH, _HOH = 0.96, math.radians(104.5)
_MAX_CALL_S = 60.0


def water_box(n_atoms: int, *, seed: int = 0, density: float = WATER_DENSITY,
              min_oo: float = 2.0, jitter: float = 0.25):
    """A periodic cubic box of rigid water molecules at ``density`` (molecules/Å³).

    ``round(n_atoms / 3)`` molecules (at least 1; ``n_atoms`` rounds to the nearest multiple
    of 3, ties to even as Python's ``round``) take distinct random sites of the smallest
    cubic grid with at least that many sites; each O is displaced uniformly by up to
    ``jitter`` Å per axis (less if the grid spacing demands it, so that O-O >= ``min_oo``),
    and the two H at 0.96 Å, 104.5° are rotated by a uniform random rotation. Positions are
    wrapped into the box.

    Returns:
        ``(z int32[3m], positions float64[3m, 3], cell float64[3, 3])``, atoms ordered
        O, H, H per molecule.

    Raises:
        ValueError: the grid spacing is below ``min_oo`` (too few molecules to place).
    """
    n_mol = max(1, round(n_atoms / 3))
    length = (n_mol / density) ** (1.0 / 3.0)
    m = math.ceil(n_mol ** (1.0 / 3.0) - 1e-9)
    spacing = length / m
    if spacing < min_oo:
        raise ValueError(f"water_box: grid spacing {spacing:.2f} Å below min_oo={min_oo} Å "
                         f"for {n_mol} molecules")
    amp = min(jitter, max(0.0, (spacing - min_oo) / 2 - 1e-6))
    rng = np.random.default_rng(seed)
    sites = rng.choice(m**3, size=n_mol, replace=False)
    grid = np.stack(np.unravel_index(sites, (m, m, m)), axis=1).astype(np.float64)
    oxygen = (grid + 0.5) * spacing + rng.uniform(-amp, amp, size=(n_mol, 3))
    half = _HOH / 2
    local = _OH * np.array([[math.sin(half), 0.0, math.cos(half)],
                            [-math.sin(half), 0.0, math.cos(half)]])
    q = rng.normal(size=(n_mol, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    w, x, y, zq = q.T  # unit quaternion -> rotation matrix (uniform over SO(3))
    rot = np.stack([
        np.stack([1 - 2 * (y * y + zq * zq), 2 * (x * y - zq * w), 2 * (x * zq + y * w)], -1),
        np.stack([2 * (x * y + zq * w), 1 - 2 * (x * x + zq * zq), 2 * (y * zq - x * w)], -1),
        np.stack([2 * (x * zq - y * w), 2 * (y * zq + x * w), 1 - 2 * (x * x + y * y)], -1),
    ], axis=1)  # [m, 3, 3]
    hydrogens = oxygen[:, None, :] + np.einsum("mij,hj->mhi", rot, local)
    pos = np.concatenate([oxygen[:, None, :], hydrogens], axis=1).reshape(-1, 3)
    z = np.tile(np.array([8, 1, 1], np.int32), n_mol)
    return z, np.mod(pos, length), np.eye(3) * length


def fit_exponent(atoms, seconds, min_atoms: int = 1000) -> tuple[float, float]:
    """Least-squares fit of ``seconds = prefactor · atoms^exponent`` in log-log space.

    Args:
        atoms: system sizes.
        seconds: times per step (same length, positive).
        min_atoms: only sizes ``>= min_atoms`` enter the fit.

    Returns:
        ``(exponent, prefactor)`` (prefactor in seconds at one atom).

    Raises:
        ValueError: fewer than two distinct sizes ``>= min_atoms``, or non-positive values.
    """
    a = np.asarray(atoms, np.float64).ravel()
    t = np.asarray(seconds, np.float64).ravel()
    if a.shape != t.shape:
        raise ValueError(f"fit_exponent: {a.size} sizes but {t.size} times")
    keep = a >= min_atoms
    a, t = a[keep], t[keep]
    if len(np.unique(a)) < 2:
        raise ValueError(f"fit_exponent needs at least 2 distinct sizes >= {min_atoms} atoms, "
                         f"got {len(np.unique(a))}")
    if (a <= 0).any() or (t <= 0).any():
        raise ValueError("fit_exponent: sizes and times must be positive")
    slope, intercept = np.polyfit(np.log(a), np.log(t), 1)
    return float(slope), float(math.exp(intercept))


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kB


def _available_mb() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return math.inf


def build_potential(name: str, cutoff: float, overrides: dict | None = None, seed: int = 0):
    """``Potential(model, elements=("H", "O"))`` of ``name``'s default config, ``overrides``
    and ``cutoff`` on top."""
    from flax import nnx

    from mpattn.models import create_model
    from mpattn.potential import Potential

    model = create_model(name, rngs=nnx.Rngs(seed), **{**(overrides or {}), "cutoff": cutoff})
    return Potential(model, elements=("H", "O"))


def measure(name: str, n_atoms: int, *, cutoff: float = 5.0, repeats: int = 5, seed: int = 0,
            overrides: dict | None = None, potential=None) -> dict:
    """One table row: energy+forces cost of model ``name`` on a water box of ``n_atoms``.

    Returns:
        ``model, atoms, box_A, edges, mean_neighbors, budget_nodes, budget_edges,
        edge_array_bytes, neighbor_list_ms, compile_s, step_ms, step_ms_all,
        us_per_atom_step, peak_rss_mb``.
    """
    import jax
    from flax import nnx

    from mpattn.neighbors import neighbor_graph
    from mpattn.potential import energy_and_forces

    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    potential = potential or build_potential(name, cutoff, overrides, seed)
    z, pos, cell = water_box(n_atoms, seed=seed)
    import vesin  # noqa: F401 - its first import (1.5 s where torch is installed) is not the list
    t0 = time.perf_counter()
    graph, budget = neighbor_graph((z, pos, cell, (True, True, True)), cutoff)
    nl_s = time.perf_counter() - t0
    potential.check(graph)
    edges = int(graph.n_edge[0])
    edge_bytes = sum(a.nbytes for a in (graph.senders, graph.receivers,
                                        *graph.edges.values()))
    graphdef, state = nnx.split(potential)

    def step(state, graph):
        return energy_and_forces(nnx.merge(graphdef, state), graph)

    g = jax.device_put(graph)
    t0 = time.perf_counter()
    compiled = jax.jit(step).lower(state, g).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(compiled(state, g))  # warm-up (first-call allocations)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(state, g))
        times.append(time.perf_counter() - t0)
        if times[-1] > _MAX_CALL_S:
            break
    step_s = float(np.median(times))
    return {
        "model": name, "atoms": len(z), "box_A": float(cell[0, 0]), "edges": edges,
        "mean_neighbors": edges / len(z), "budget_nodes": budget.n_node,
        "budget_edges": budget.n_edge, "edge_array_bytes": int(edge_bytes),
        "neighbor_list_ms": 1000 * nl_s, "compile_s": compile_s, "step_ms": 1000 * step_s,
        "step_ms_all": [1000 * t for t in times], "us_per_atom_step": 1e6 * step_s / len(z),
        "peak_rss_mb": _rss_mb(),
    }


def _is_oom(err: Exception) -> bool:
    text = f"{type(err).__name__} {err}".lower()
    return isinstance(err, MemoryError) or "resource_exhausted" in text \
        or "out of memory" in text


def _measure_isolated(name, n, *, cutoff, repeats, seed, overrides=None) -> dict:
    """:func:`measure` in a fresh Python process (per-size peak RSS, no state carried over)."""
    cmd = [sys.executable, "-m", "benchmarks.scaling", "--one", name, str(n), "--cutoff",
           str(cutoff), "--repeats", str(repeats), "--seed", str(seed)]
    if overrides:
        cmd += ["--model-config", json.dumps(overrides)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        if proc.returncode in (-9, 137) or _is_oom(RuntimeError(proc.stderr[-2000:])):
            raise MemoryError(f"exit {proc.returncode}")
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_model(name: str, sizes, *, cutoff: float, repeats: int, seed: int = 0,
              overrides: dict | None = None, isolate: bool = False,
              log=print) -> tuple[list[dict], str | None]:
    """Rows for growing sizes until done or stopped; ``(rows, reason stopped or None)``.

    With ``isolate`` every size runs in a fresh process (:func:`_measure_isolated`, given the
    same ``overrides``), so ``peak_rss_mb`` is that size's own peak.
    """
    potential = None if isolate else build_potential(name, cutoff, overrides, seed)
    rows, rss0 = [], 0.0 if isolate else _rss_mb()
    for n in sorted(sizes):
        if rows:  # predict this size's memory from the last size's growth
            grown = max(rows[-1]["peak_rss_mb"] - rss0, 0.0)
            need = grown * n / rows[-1]["atoms"]
            if need > 0.8 * _available_mb():
                return rows, (f"stopped before {n} atoms: predicted {need:.0f} MB > 80% of "
                              f"{_available_mb():.0f} MB available")
        try:
            if isolate:
                row = _measure_isolated(name, n, cutoff=cutoff, repeats=repeats, seed=seed,
                                        overrides=overrides)
            else:
                row = measure(name, n, cutoff=cutoff, repeats=repeats, seed=seed,
                              potential=potential)
        except Exception as err:  # noqa: BLE001 - record an out-of-memory and stop growing
            if not _is_oom(err):
                raise
            return rows, f"stopped at {n} atoms: out of memory ({type(err).__name__})"
        rows.append(row)
        log(format_row(row))
        if row["step_ms"] > 1000 * _MAX_CALL_S:
            return rows, f"stopped after {n} atoms: {row['step_ms'] / 1000:.0f} s per call > 60 s"
    return rows, None


HEADER = (f"{'model':20s} {'atoms':>6s} {'edges':>9s} {'nbrs':>5s} {'nlist ms':>8s} "
          f"{'compile s':>9s} {'step ms':>9s} {'us/atom':>8s} {'RSS MB':>8s} {'edge MB':>8s}")


def format_row(r: dict) -> str:
    """One line of the printed table (columns of :data:`HEADER`)."""
    return (f"{r['model']:20s} {r['atoms']:6d} {r['edges']:9d} {r['mean_neighbors']:5.1f} "
            f"{r['neighbor_list_ms']:8.1f} {r['compile_s']:9.1f} {r['step_ms']:9.1f} "
            f"{r['us_per_atom_step']:8.1f} {r['peak_rss_mb']:8.0f} "
            f"{r['edge_array_bytes'] / 2**20:8.1f}")


def fits_of(rows: list[dict], min_atoms: int) -> dict:
    """``{"upper": {...}, "all": {...}}`` exponent fits of one model's rows (None if too few)."""
    atoms = [r["atoms"] for r in rows]
    secs = [r["step_ms"] / 1000 for r in rows]
    out = {}
    for key, lo in (("upper", min_atoms), ("all", 0)):
        try:
            p, c = fit_exponent(atoms, secs, min_atoms=lo)
            out[key] = {"exponent": p, "prefactor_s": c, "min_atoms": lo}
        except ValueError as err:
            out[key] = {"exponent": None, "prefactor_s": None, "min_atoms": lo,
                        "error": str(err)}
    return out


def plot(results: dict, fits: dict, path) -> None:
    """Log-log time per step vs atoms, fitted lines and an ideal slope-1 guide."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for (name, rows), color in zip(results.items(), ("C0", "C1", "C2", "C3"), strict=False):
        if not rows:
            continue
        a = np.array([r["atoms"] for r in rows], float)
        t = np.array([r["step_ms"] for r in rows], float)
        ax.loglog(a, t, "o", color=color, label=name)
        f = fits[name]["upper"]
        if f["exponent"] is not None:
            xs = a[a >= f["min_atoms"]]
            ax.loglog(xs, 1000 * f["prefactor_s"] * xs ** f["exponent"], "-", color=color,
                      label=f"{name} fit: N^{f['exponent']:.2f}")
        ax.loglog(a, t[-1] * a / a[-1], ":", color=color, alpha=0.6,
                  label=f"{name} ideal slope 1")
    ax.set_xlabel("atoms (periodic water, 1.0 g/cm³)")
    ax.set_ylabel("energy+forces time per step (ms)")
    ax.set_title(f"scaling on {machine_info()['device']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.scaling",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["attention", "schnet"])
    ap.add_argument("--sizes", nargs="+", type=int,
                    default=[96, 384, 1536, 3072, 6144, 12288])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--cutoff", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fit-min-atoms", type=int, default=1000)
    ap.add_argument("--model-config", default="{}", metavar="JSON",
                    help="config overrides (a JSON object) of every model in --models, e.g. "
                         '\'{"attention_weights": "softmax"}\' (--cutoff still sets the '
                         "cutoff); recorded in the JSON (default: the default configs)")
    ap.add_argument("--in-process", action="store_true",
                    help="measure every size in this process (default: a fresh process per "
                         "size, so that peak RSS is per size and no state carries over)")
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--one", nargs=2, metavar=("MODEL", "ATOMS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    overrides = parse_model_config(ap, args.model_config,
                                   [args.one[0]] if args.one else args.models)
    if args.one:  # worker of the isolated mode: one row as JSON on the last stdout line
        row = measure(args.one[0], int(args.one[1]), cutoff=args.cutoff,
                      repeats=args.repeats, seed=args.seed, overrides=overrides)
        print(json.dumps(row))
        return 0
    from mpattn.models import default_config

    print(HEADER, flush=True)
    results, stopped, configs = {}, {}, {}
    for name in args.models:
        configs[name] = dataclasses.asdict(default_config(name, **{**overrides,
                                                                   "cutoff": args.cutoff}))
        rows, why = run_model(name, args.sizes, cutoff=args.cutoff, repeats=args.repeats,
                              seed=args.seed, overrides=overrides,
                              isolate=not args.in_process,
                              log=lambda s: print(s, flush=True))
        results[name], stopped[name] = rows, why
        if why:
            print(f"{name}: {why}", flush=True)
    fits = {name: fits_of(rows, args.fit_min_atoms) for name, rows in results.items()}
    for name, f in fits.items():
        up, al = f["upper"]["exponent"], f["all"]["exponent"]
        up_s = "n/a" if up is None else f"{up:.2f}"
        al_s = "n/a" if al is None else f"{al:.2f}"
        print(f"{name}: exponent {up_s} (must be <= 1.1: linear) over >= "
              f"{args.fit_min_atoms} atoms; all sizes {al_s}")
    ideal = 4 * math.pi / 3 * args.cutoff**3 * 3 * WATER_DENSITY
    rss = ("peak_rss_mb is ru_maxrss: monotone over the process (includes earlier sizes and "
           "models)" if args.in_process else "peak_rss_mb is ru_maxrss of a fresh process per "
           "size (its own peak, including ~0.4 GB of JAX/XLA baseline)")
    notes = [f"SchNet's default cutoff (10 Å) overridden to {args.cutoff} Å like every model",
             rss,
             f"ideal mean neighbours at the cutoff: {ideal:.1f}"]
    if not args.no_save:
        path = write_result("scaling", {
            "cutoff": args.cutoff, "sizes": args.sizes, "repeats": args.repeats,
            "seed": args.seed, "isolated_processes": not args.in_process,
            "density_molecules_per_A3": WATER_DENSITY,
            "fit_min_atoms": args.fit_min_atoms, "model_config": overrides,
            "configs": configs, "notes": notes,
            "stopped": stopped, "fits": fits, "rows": [r for v in results.values() for r in v],
        })
        png = path.with_suffix(".png")
        plot(results, fits, png)
        print(f"wrote {path} and {png.name}")
    return 0


if __name__ == "__main__":
    from mpattn.runtime import restart_with_hugepages

    restart_with_hugepages()  # before any work: huge pages for XLA's CPU buffers
    raise SystemExit(main())
