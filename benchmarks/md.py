"""MD speed and energy conservation: the ASE path against JAX-MD, on ethanol and water boxes.

    python -m benchmarks.md --workdir runs/ethanol --water-workdir runs/spice_like_xtb
    python -m benchmarks.md --quick --workdir runs/spice_like_xtb \
        --water-workdir runs/spice_like_xtb                   # smoke run (tiny sizes and steps)

**Ethanol** (the first frame of the bundled xTB set), NVE at ``--timestep-fs`` from
Maxwell-Boltzmann momenta at ``--temperature`` (the same seed, hence the same momenta, for
every engine), ``--drift-ps`` of dynamics with the ``--workdir`` potential, three ways:
the ASE path (:func:`mpattn.md.run_nve`: ``VelocityVerlet`` through
:class:`mpattn.ase.Calculator`, one host round trip per step), JAX-MD with one trajectory
(:func:`mpattn.md.run_md`: blocks of ``--log-every`` steps per compiled call) and JAX-MD with
``--replicas`` trajectories at once (``vmap``; momenta seeds ``seed .. seed + R - 1``). Per
engine: steps/s of one trajectory (after compilation; for replicas also the trajectory-steps/s
summed over them), compiles, and the total-energy drift (slope of a least-squares line,
meV/atom/ps) and largest excursion (meV/atom) over the run.

**Water** boxes of about ``--water-sizes`` atoms (:func:`water_atoms`: rigid molecules on a
seeded cubic lattice at 1.0 g/cm³, random orientations, periodic), NVE with the
``--water-workdir`` potential (it must know H and O): JAX-MD runs one warm-up block (its
compile time is the reported ``compile_s``), then ``--water-steps`` measured steps in a
second :func:`~mpattn.md.run_md` (which compiles again, outside its timing); the ASE path runs
the same steps at the sizes up to ``--ase-max-atoms`` (its first force call, where it
compiles, is outside the timing). The exponent ``t ∝ N^p`` of the time per step is fitted by
least squares in log-log over every size of each engine. The boxes are not equilibrated and a
potential trained on molecules is out of its domain there: these short runs pass lenient
explosion limits (see :data:`WATER_LIMITS`); their drift is not a quality measure.

Prints the tables and writes ``benchmarks/results/md-<device>-<date>.json`` (or under
``--results-dir``) and ``.png`` (steps/s against atoms, log-log, both engines; ethanol's
steps/s beside it). ``--skip ethanol`` / ``--skip water`` leaves a part out, ``--no-warmup``
the warm-up runs; ``--quick`` sets small defaults (options given still win).
"""

from __future__ import annotations

import argparse
import math
import sys
from importlib import metadata
from pathlib import Path

import numpy as np

from benchmarks.common import RESULTS, machine_info, save_result_and_figure

__all__ = ["WATER_LIMITS", "ethanol_atoms", "fit_rows", "load_potential", "main", "run_ethanol",
           "run_water", "versions", "water_atoms"]

#: lenient explosion limits of the water speed runs (run_md's arguments): a potential
#: trained on molecules, in an unequilibrated box, is timed, not judged
WATER_LIMITS = {"max_temperature_K": 1e5, "max_energy_error": 1.0, "min_distance": 0.3}

_QUICK = {"drift_ps": 0.02, "replicas": 2, "water_sizes": [192, 375], "water_steps": 20,
          "log_every": 10, "ase_max_atoms": 375}


# ------------------------------------------------------------------ systems


def _random_rotations(rng, k: int) -> np.ndarray:
    """``k`` rotation matrices uniform over SO(3) (normalised Gaussian quaternions)."""
    q = rng.normal(size=(k, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    w, x, y, z = q.T
    return np.stack([
        np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
        np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
        np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
    ], axis=1)


def water_atoms(n_atoms: int, *, seed: int = 0, min_oo: float = 2.5,
                min_contact: float = 1.6, max_rounds: int = 200):
    """A periodic cubic box of about ``n_atoms`` atoms of rigid water at 1.0 g/cm³.

    The lattice, density and first orientations are :func:`benchmarks.scaling.water_box`'s
    (``round(n_atoms / 3)`` molecules on distinct sites of the smallest cubic grid that holds
    them, O jittered so that O-O >= ``min_oo`` Å, O-H 0.96 Å, H-O-H 104.5°, uniform random
    orientations, seeded). Then molecules with an atom closer than ``min_contact`` Å to an
    atom of another molecule (an H pointing at a neighbour) get a fresh random orientation
    until none is left, so that MD does not start from a clash.

    Returns:
        ``ase.Atoms`` (O, H, H per molecule; orthorhombic cell, ``pbc`` True, wrapped).

    Raises:
        ValueError: the grid spacing is below ``min_oo`` (see ``water_box``).
        RuntimeError: clashes left after ``max_rounds`` rounds of re-orientation.
    """
    import ase

    from benchmarks.scaling import water_box
    from mpattn.neighbors import radius_edges

    z, pos, cell = water_box(n_atoms, seed=seed, min_oo=min_oo)
    length = cell[0, 0]
    oxygen = pos[0::3]
    oh = pos.reshape(-1, 3, 3)[:, 1:] - oxygen[:, None]
    oh -= length * np.rint(oh / length)  # O-H vectors under the minimum image
    rng = np.random.default_rng([seed, 1])  # not water_box's stream
    for _ in range(max_rounds):
        pos = np.mod(np.concatenate([oxygen[:, None], oxygen[:, None] + oh], 1).reshape(-1, 3),
                     length)
        s, r, _ = radius_edges(pos, min_contact, cell, (True, True, True))
        clash = s // 3 != r // 3
        if not clash.any():
            break
        moved = np.unique(r[clash] // 3)
        oh[moved] = np.einsum("mij,mhj->mhi", _random_rotations(rng, len(moved)), oh[moved])
    else:
        raise RuntimeError(f"water_atoms({n_atoms}): intermolecular contacts below "
                           f"{min_contact} Å left after {max_rounds} rounds")
    return ase.Atoms(numbers=z, positions=pos, cell=cell, pbc=True)


def ethanol_atoms():
    """The first frame of the bundled ethanol xTB set."""
    from mpattn.data.frames import ethanol_xtb_path, read_frames

    atoms = read_frames(ethanol_xtb_path()).atoms(0)
    atoms.calc = None
    return atoms


def load_potential(workdir):
    """The trained :class:`~mpattn.potential.Potential` of a run folder."""
    from mpattn import load_run
    from mpattn.potential import Potential

    pot = load_run(workdir)
    if not isinstance(pot, Potential):
        raise ValueError(f"{workdir} is a property model's run, not a potential's")
    return pot


# ------------------------------------------------------------------ runs


def _ase_summary(r: dict) -> dict:
    keys = ("n_atoms", "steps", "seconds", "setup_seconds", "steps_per_s", "compiles",
            "recompiles", "budget_growths", "drift_meV_per_atom_per_ps",
            "max_deviation_meV_per_atom", "intact")
    out = {"engine": "ase", "replicas": 1, **{k: r[k] for k in keys}}
    out["steps_done"] = r["steps"]
    out["trajectory_steps_per_s"] = r["steps_per_s"]
    out["atom_steps_per_s"] = r["steps_per_s"] * r["n_atoms"]
    out["compile_seconds"] = r["setup_seconds"]  # the first force call: compile + one step
    return out


def _jax_md_summary(r: dict) -> dict:
    keys = ("n_atoms", "replicas", "steps", "steps_done", "seconds", "steps_per_s",
            "atom_steps_per_s", "compiles", "compile_seconds", "neighbor_growths",
            "neighbor_capacity", "drift_meV_per_atom_per_ps", "max_deviation_meV_per_atom",
            "stopped", "dtype")
    out = {"engine": "jax-md", **{k: r[k] for k in keys}}
    out["trajectory_steps_per_s"] = r["steps_per_s"] * r["replicas"]
    out["final_temperature_K"] = r["temperature_K"][-1]
    return out


def run_ethanol(pot, atoms, *, drift_ps: float, timestep_fs: float, temperature_K: float,
                replicas: int, seed: int, log_every: int) -> dict:
    """NVE of ``atoms`` for ``drift_ps``: the ASE path, JAX-MD, JAX-MD with ``replicas``.

    Returns:
        ``{"steps", "ase", "jax_md", "jax_md_replicas"}`` (summaries: speed, compiles,
        drift; the replicas' drift and excursion are lists, one per replica).
    """
    from mpattn.ase import Calculator
    from mpattn.md import ForceField, run_md, run_nve

    steps = max(1, round(drift_ps * 1000.0 / timestep_fs))
    common = {"timestep_fs": timestep_fs, "steps": steps, "temperature_K": temperature_K,
              "seed": seed, "log_every": log_every, "progress": False}
    out = {"steps": steps}
    out["ase"] = _ase_summary(run_nve(Calculator.from_potential(pot), atoms, **common))
    ff = ForceField(pot, atoms)
    for key, r in (("jax_md", 1), ("jax_md_replicas", replicas)):
        out[key] = _jax_md_summary(run_md(ff, atoms, ensemble="nve", replicas=r, **common))
    return out


def run_water(pot, n_atoms: int, *, engine: str, steps: int, timestep_fs: float,
              temperature_K: float, seed: int, log_every: int, warmup: bool = True) -> dict:
    """One row of the water table: NVE steps/s of a box of about ``n_atoms`` atoms (JAX-MD:
    after a warm-up run of one block unless not ``warmup``; ``compile_seconds`` is then the
    measured run's own)."""
    from mpattn.md import ForceField, run_md, run_nve

    atoms = water_atoms(n_atoms, seed=seed)
    common = {"timestep_fs": timestep_fs, "temperature_K": temperature_K, "seed": seed,
              "progress": False}
    if engine == "ase":
        from mpattn.ase import Calculator

        row = _ase_summary(run_nve(Calculator.from_potential(pot), atoms, steps=steps,
                                   log_every=log_every, **common))
        row["stopped"] = None
    elif engine == "jax-md":
        ff = ForceField(pot, atoms)
        warm = run_md(ff, atoms, ensemble="nve", steps=log_every, log_every=log_every,
                      **common, **WATER_LIMITS) if warmup else None
        row = _jax_md_summary(run_md(ff, atoms, ensemble="nve", steps=steps,
                                     log_every=log_every, **common, **WATER_LIMITS))
        row["warmup"] = warmup
        row["measured_run_compile_seconds"] = row["compile_seconds"]
        if warm is not None:
            row["warmup_compile_seconds"] = warm["compile_seconds"]
            row["compile_seconds"] = warm["compile_seconds"]
            row["compiles"] += warm["compiles"]
            row["neighbor_growths"] += warm["neighbor_growths"]
            row["warmup_stopped"] = warm["stopped"]
        row["drift_meV_per_atom_per_ps"] = row["drift_meV_per_atom_per_ps"][0]
        row["max_deviation_meV_per_atom"] = row["max_deviation_meV_per_atom"][0]
    else:
        raise ValueError(f"engine must be 'ase' or 'jax-md', got {engine!r}")
    row["atoms"] = len(atoms)
    row["box_A"] = float(atoms.cell[0, 0])
    row["ms_per_step"] = 1000.0 / row["steps_per_s"] if row["steps_per_s"] > 0 else None
    return row


def fit_rows(rows: list[dict]) -> dict:
    """``t ∝ N^p`` (t = 1 / steps/s) over ``rows`` that ran steps, every size (log-log least
    squares, :func:`benchmarks.scaling.fit_exponent`); ``exponent`` None with ``error`` if
    fewer than two sizes."""
    from benchmarks.scaling import fit_exponent

    good = [r for r in rows if r.get("steps_done") and r["steps_per_s"] > 0]
    sizes = [r["atoms"] for r in good]
    try:
        p, c = fit_exponent(sizes, [1.0 / r["steps_per_s"] for r in good], min_atoms=0)
    except ValueError as err:
        return {"exponent": None, "prefactor_s": None, "sizes": sizes, "error": str(err)}
    return {"exponent": p, "prefactor_s": c, "sizes": sizes}


# ------------------------------------------------------------------ output

_HEAD = (f"{'engine':8s} {'atoms':>6s} {'R':>3s} {'steps':>6s} {'steps/s':>9s} "
         f"{'traj-steps/s':>12s} {'ms/step':>8s} {'compiles':>8s} {'compile s':>9s} "
         f"{'drift':>9s} {'max dev':>8s}")


def _line(r: dict) -> str:
    drift = r["drift_meV_per_atom_per_ps"]
    dev = r["max_deviation_meV_per_atom"]
    drift = float(np.mean(drift)) if isinstance(drift, list) else drift
    dev = float(np.max(dev)) if isinstance(dev, list) else dev
    ms = 1000.0 / r["steps_per_s"] if r["steps_per_s"] > 0 else math.nan
    line = (f"{r['engine']:8s} {r['n_atoms']:6d} {r['replicas']:3d} {r['steps_done']:6d} "
            f"{r['steps_per_s']:9.1f} {r['trajectory_steps_per_s']:12.1f} {ms:8.2f} "
            f"{r['compiles']!s:>8s} {r['compile_seconds']:9.2f} {drift:9.3g} {dev:8.3g}")
    if r.get("stopped"):
        line += f"  stopped at step {r['stopped']['step']}: {r['stopped']['reason']}"
    return line


def plot(payload: dict, path) -> Path:
    """Water: steps/s against atoms (log-log) per engine with the fitted lines; ethanol: bars
    of one-trajectory and summed trajectory steps/s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    eth, water = payload.get("ethanol"), payload.get("water")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    ax = axes[0]
    if water:
        for engine, color in (("jax-md", "C0"), ("ase", "C1")):
            rows = [r for r in water["rows"] if r["engine"] == engine and r["steps_per_s"] > 0]
            if not rows:
                continue
            a = np.array([r["atoms"] for r in rows], float)
            ax.loglog(a, [r["steps_per_s"] for r in rows], "o", color=color, label=engine)
            f = water["fits"][engine]
            if f["exponent"] is not None:
                xs = np.geomspace(a.min(), a.max(), 20)
                ax.loglog(xs, 1.0 / (f["prefactor_s"] * xs ** f["exponent"]), "-", color=color,
                          alpha=0.7, label=f"{engine} fit: t ∝ N^{f['exponent']:.2f}")
        ax.set_xlabel("atoms (periodic water, 1.0 g/cm³)")
        ax.set_ylabel("NVE steps/s (one trajectory)")
        ax.set_title(f"water, {water['workdir']}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    else:
        ax.set_axis_off()
    ax = axes[1]
    if eth:
        labels = ["ASE", "JAX-MD", f"JAX-MD ×{eth['jax_md_replicas']['replicas']}\n(summed)"]
        values = [eth["ase"]["steps_per_s"], eth["jax_md"]["steps_per_s"],
                  eth["jax_md_replicas"]["trajectory_steps_per_s"]]
        bars = ax.bar(labels, values, color=["C1", "C0", "C2"])
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
        ax.set_ylabel("NVE steps/s")
        ax.set_title(f"ethanol ({eth['atoms']} atoms), {eth['workdir']}")
    else:
        ax.set_axis_off()
    fig.suptitle(f"MD on {payload['machine_device']}, {payload['timestep_fs']} fs")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def versions() -> dict:
    """Versions of the packages behind the numbers (None where not installed)."""
    out = {}
    for pkg in ("mpattn", "jax", "jaxlib", "jax-md", "ase", "flax"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.md",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default="runs/ethanol", help="the ethanol potential's run")
    ap.add_argument("--water-workdir", default="runs/spice_like_xtb",
                    help="the water boxes' potential's run (must know H and O)")
    ap.add_argument("--drift-ps", type=float, default=10.0,
                    help="ps of ethanol NVE per engine (speed and drift)")
    ap.add_argument("--timestep-fs", type=float, default=0.5)
    ap.add_argument("--temperature", type=float, default=300.0, help="K (initial momenta)")
    ap.add_argument("--replicas", type=int, default=8, help="JAX-MD replicas of ethanol")
    ap.add_argument("--water-sizes", type=int, nargs="+", default=[1000, 2000, 5000, 10000])
    ap.add_argument("--water-steps", type=int, default=200,
                    help="measured NVE steps per water box (after a warm-up block)")
    ap.add_argument("--ase-max-atoms", type=int, default=2000,
                    help="the ASE path runs the water boxes up to this many atoms")
    ap.add_argument("--no-warmup", action="store_true",
                    help="no JAX-MD warm-up run before each water box's measured one")
    ap.add_argument("--log-every", type=int, default=20, help="steps per JAX-MD block")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip", nargs="+", choices=("ethanol", "water"), default=[],
                    help="leave a part out")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: " + ", ".join(f"{k.replace('_', '-')} {v}"
                                                   for k, v in _QUICK.items()))
    ap.add_argument("--results-dir", type=Path, default=RESULTS)
    ap.add_argument("--no-save", action="store_true")
    if ap.parse_known_args(argv)[0].quick:  # smaller defaults; options given still win
        ap.set_defaults(**_QUICK)
    args = ap.parse_args(argv)
    if args.replicas < 1 or args.water_steps < 1 or args.log_every < 1:
        ap.error("--replicas, --water-steps and --log-every must be >= 1")
    info = machine_info()
    payload = {
        "command": "python -m benchmarks.md " + " ".join(sys.argv[1:] if argv is None else argv),
        "versions": versions(), "machine_device": info["device"], "quick": args.quick,
        "timestep_fs": args.timestep_fs, "temperature_K": args.temperature, "seed": args.seed,
        "log_every": args.log_every, "notes": [],
    }
    summary = {}
    if "ethanol" not in args.skip:
        atoms = ethanol_atoms()
        eth = run_ethanol(load_potential(args.workdir), atoms, drift_ps=args.drift_ps,
                          timestep_fs=args.timestep_fs, temperature_K=args.temperature,
                          replicas=args.replicas, seed=args.seed, log_every=args.log_every)
        eth.update({"workdir": str(args.workdir), "atoms": len(atoms),
                    "drift_ps": args.drift_ps})
        print(f"-- ethanol NVE, {args.drift_ps:g} ps ({eth['steps']} steps of "
              f"{args.timestep_fs:g} fs), {args.workdir}; drift and max dev in meV/atom(/ps)")
        print(_HEAD)
        for key in ("ase", "jax_md", "jax_md_replicas"):
            print(_line(eth[key]))
        a, j, jr = eth["ase"], eth["jax_md"], eth["jax_md_replicas"]
        eth["speedup_jax_md_over_ase"] = j["steps_per_s"] / a["steps_per_s"]
        eth["speedup_replicas_over_ase"] = jr["trajectory_steps_per_s"] / a["steps_per_s"]
        print(f"JAX-MD / ASE: {eth['speedup_jax_md_over_ase']:.1f}x steps/s; "
              f"{jr['replicas']} replicas: {eth['speedup_replicas_over_ase']:.1f}x "
              "trajectory-steps/s")
        payload["ethanol"] = eth
        summary.update({
            "ethanol_ase_steps_per_s": a["steps_per_s"],
            "ethanol_jax_md_steps_per_s": j["steps_per_s"],
            "ethanol_jax_md_replicas": jr["replicas"],
            "ethanol_jax_md_replicas_trajectory_steps_per_s": jr["trajectory_steps_per_s"],
            "ethanol_speedup_jax_md_over_ase": eth["speedup_jax_md_over_ase"],
            "ethanol_ase_drift_meV_per_atom_per_ps": a["drift_meV_per_atom_per_ps"],
            "ethanol_jax_md_drift_meV_per_atom_per_ps": j["drift_meV_per_atom_per_ps"][0],
            "ethanol_jax_md_replicas_drift_meV_per_atom_per_ps":
                jr["drift_meV_per_atom_per_ps"],
            "ethanol_compiles": {"ase": a["compiles"], "jax_md": j["compiles"],
                                 "jax_md_replicas": jr["compiles"]},
        })
    if "water" not in args.skip:
        pot = load_potential(args.water_workdir)
        note = (f"water: lenient explosion limits {WATER_LIMITS} (unequilibrated boxes, a "
                "potential trained on molecules: timed, not judged; drift not meaningful)")
        payload["notes"].append(note)
        print(f"-- water NVE, {args.water_steps} steps of {args.timestep_fs:g} fs, "
              f"{args.water_workdir}; JAX-MD "
              f"{'without' if args.no_warmup else 'after'} a warm-up block, ASE up to "
              f"{args.ase_max_atoms} atoms\n   {note}")
        print(_HEAD)
        rows = []
        for n in sorted(args.water_sizes):
            for engine in ("jax-md", "ase"):
                if engine == "ase" and n > args.ase_max_atoms:
                    continue
                row = run_water(pot, n, engine=engine, steps=args.water_steps,
                                timestep_fs=args.timestep_fs, temperature_K=args.temperature,
                                seed=args.seed, log_every=args.log_every,
                                warmup=not args.no_warmup)
                rows.append(row)
                print(_line(row), flush=True)
        fits = {e: fit_rows([r for r in rows if r["engine"] == e]) for e in ("jax-md", "ase")}
        for engine, f in fits.items():
            if f["exponent"] is None:
                print(f"{engine}: no exponent ({f['error']})")
            else:
                print(f"{engine}: time per step ∝ N^{f['exponent']:.2f} over {f['sizes']} atoms")
        payload["water"] = {"workdir": str(args.water_workdir), "steps": args.water_steps,
                            "warmup": not args.no_warmup,
                            "sizes": sorted(args.water_sizes),
                            "ase_max_atoms": args.ase_max_atoms, "limits": WATER_LIMITS,
                            "rows": rows, "fits": fits}
        summary["water_jax_md_exponent"] = fits["jax-md"]["exponent"]
        summary["water_ase_exponent"] = fits["ase"]["exponent"]
        summary["water_steps_per_s"] = {f"{r['engine']} {r['atoms']}": r["steps_per_s"]
                                        for r in rows}
        stopped = [r for r in rows if r.get("stopped") or r.get("warmup_stopped")]
        if stopped:
            payload["notes"].append(f"{len(stopped)} water run(s) stopped early (see rows)")
            print(payload["notes"][-1])
    payload["summary"] = summary
    save_result_and_figure("md", payload, lambda p: plot(payload, p), save=not args.no_save,
                           directory=args.results_dir)
    return 0


if __name__ == "__main__":
    from mpattn.runtime import restart_with_hugepages

    restart_with_hugepages()  # before any work: huge pages for XLA's CPU buffers
    raise SystemExit(main())
