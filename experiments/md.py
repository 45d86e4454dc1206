"""Molecular dynamics with a trained potential, from the shell.

    python -m experiments.md WORKDIR structure.xyz --steps 20000 --ensemble nve \\
        --temperature 300 --timestep-fs 0.5 --out traj.extxyz

JAX-MD by default (:func:`mpattn.md.run_md`: the integrator loop compiled over blocks of
``--log-every`` steps); ``--engine ase`` runs the same NVE through the ASE calculator
(:func:`mpattn.md.run_nve`), for comparison. ``--ensemble nvt`` uses ``--thermostat
langevin`` (default) or ``nose-hoover``; ``--replicas R`` runs R copies at once (seeds
``seed .. seed + R - 1``); ``--committee W2 W3 ...`` adds ensemble members: the dynamics
follows their mean and ``--max-force-std`` stops the run where they disagree.

Writes the trajectory (extxyz: energy, forces, momenta, time and temperature per frame), and
beside it ``<out>.json`` (the summary: steps/s, drift, compiles, why it stopped) and
``<out>.png`` (the energies against time). Prints steps/s and drift. Exit status 0 when the run
finished, 3 when it was stopped (exploded or extrapolating; the trajectory so far is kept),
2 for bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["main", "parser"]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.md",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("workdir", help="a trained potential's run folder")
    p.add_argument("structure", help="the starting structure (any file ase.io reads)")
    p.add_argument("--frame", type=int, default=0, help="which frame of the file (default 0)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--ensemble", choices=("nve", "nvt"), default="nve")
    p.add_argument("--thermostat", choices=("langevin", "nose-hoover"), default="langevin")
    p.add_argument("--temperature", type=float, default=300.0,
                   help="K: initial momenta and the thermostat")
    p.add_argument("--timestep-fs", type=float, default=0.5)
    p.add_argument("--friction-per-ps", type=float, default=10.0, help="Langevin friction")
    p.add_argument("--tau-fs", type=float, help="Nosé-Hoover time (default 100 steps)")
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=20, help="steps per block and frame")
    p.add_argument("--out", default="traj.extxyz", help="trajectory file (extxyz)")
    p.add_argument("--engine", choices=("jax-md", "ase"), default="jax-md")
    p.add_argument("--committee", nargs="+", default=[], metavar="WORKDIR",
                   help="more trained potentials: an ensemble with WORKDIR")
    p.add_argument("--max-force-std", type=float,
                   help="eV/Å: stop where the committee's force spread exceeds this")
    p.add_argument("--skin", type=float, default=0.3, help="neighbour-list skin (Å)")
    p.add_argument("--x64", action="store_true", help="float64 throughout")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        atoms, potentials = _inputs(args)
        summary = _run(args, atoms, potentials)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    stopped = summary.get("stopped")
    drift = summary["drift_meV_per_atom_per_ps"]
    drift = drift if isinstance(drift, list) else [drift]
    print(f"{summary['engine']} {summary.get('ensemble', 'nve')}: {summary['n_atoms']} atoms, "
          f"{summary.get('steps_done', summary['steps'])} steps x {summary.get('replicas', 1)} "
          f"replica(s) at {summary['steps_per_s']:.0f} steps/s "
          f"(compiles {summary['compiles']}); drift "
          + ", ".join(f"{d:.4g}" for d in drift) + " meV/atom/ps")
    print(f"wrote {out}, {out}.json, {out}.png")
    if stopped:
        print(f"stopped at step {stopped['step']} (replica {stopped['replica']}): "
              f"{stopped['reason']}", file=sys.stderr)
        return 3
    return 0


def _inputs(args):
    import ase.io

    from mpattn.potential import Potential
    from mpattn.train.runs import load_run

    if args.x64:
        import jax

        jax.config.update("jax_enable_x64", True)
    if args.steps < 1 or args.replicas < 1 or not args.timestep_fs > 0:
        raise ValueError(f"need --steps, --replicas >= 1 and --timestep-fs > 0; got "
                         f"{args.steps}, {args.replicas}, {args.timestep_fs}")
    if args.engine == "ase" and (args.ensemble != "nve" or args.replicas != 1
                                 or args.committee):
        raise ValueError("--engine ase runs NVE of one replica of one potential; use the "
                         "jax-md engine for nvt, --replicas and --committee")
    path = Path(args.structure)
    if not path.is_file():
        raise ValueError(f"{path}: no such structure file")
    try:
        atoms = ase.io.read(path, index=args.frame)
    except IndexError:
        raise ValueError(f"{path} has no frame {args.frame}") from None
    potentials = []
    for w in [args.workdir, *args.committee]:
        pot = load_run(w)
        if not isinstance(pot, Potential):
            raise ValueError(f"{w} is a property model's run, not a potential's")
        potentials.append(pot)
    return atoms, potentials


def _run(args, atoms, potentials) -> dict:
    import numpy as np

    from mpattn.md import ForceField, plot_energy, run_md, run_nve

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    dtype = "float64" if args.x64 else None
    if args.engine == "ase":
        from mpattn.ase import Calculator

        summary = run_nve(Calculator.from_potential(potentials[0], dtype=dtype), atoms,
                          timestep_fs=args.timestep_fs, steps=args.steps,
                          temperature_K=args.temperature, seed=args.seed,
                          log_every=args.log_every, progress=not args.no_progress,
                          trajectory=out)
        summary["engine"] = "ase"
        plot = summary
    else:
        ensemble = args.ensemble if args.ensemble == "nve" else args.thermostat
        ff = ForceField(potentials, atoms, skin=args.skin, dtype=dtype)
        summary = run_md(ff, atoms, ensemble=ensemble, steps=args.steps,
                         timestep_fs=args.timestep_fs, temperature_K=args.temperature,
                         friction_per_ps=args.friction_per_ps, tau_fs=args.tau_fs,
                         seed=args.seed, replicas=args.replicas, log_every=args.log_every,
                         trajectory=out, progress=not args.no_progress,
                         max_force_std=args.max_force_std)
        first = {k: np.asarray(v)[:, 0].tolist() for k, v in summary.items()
                 if k.endswith(("_eV", "_K")) and isinstance(v, list) and v}
        plot = {**summary, **first,
                "drift_meV_per_atom_per_ps": summary["drift_meV_per_atom_per_ps"][0],
                "max_deviation_meV_per_atom": summary["max_deviation_meV_per_atom"][0]}
    summary.update(workdir=str(args.workdir), committee=list(args.committee),
                   structure=str(args.structure), frame=args.frame)
    Path(f"{out}.json").write_text(json.dumps(summary, indent=1))
    if len(plot["times_ps"]) > 1:
        plot_energy(plot, f"{out}.png")
    return summary


if __name__ == "__main__":
    from mpattn.runtime import restart_with_hugepages

    restart_with_hugepages()
    sys.exit(main())
