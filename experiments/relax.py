"""Relax many structures at once with a trained potential, from the shell.

    python -m experiments.relax WORKDIR structures.xyz --fmax 0.05 --out relaxed.extxyz

Every frame of ``structures.xyz`` (any file ase.io reads) is relaxed by batched FIRE
(:func:`mpattn.md.relax.relax`: structures padded into batches, each with its own
convergence); ``--engine ase`` relaxes them one at a time with ASE's FIRE through the ASE
calculator, for comparison. The output holds every frame in input order with its energy and
forces, and ``relax_steps``, ``converged`` and ``fmax`` in its info, and
``<out>.json`` the summary. Exit status 0 when all converged, 3 when some did not (they are
written, flagged), 2 for bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

__all__ = ["main", "parser"]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.relax",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("workdir", help="a trained potential's run folder")
    p.add_argument("structures", help="structures to relax (any file ase.io reads)")
    p.add_argument("--fmax", type=float, default=0.05, help="eV/Å")
    p.add_argument("--max-steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--out", default="relaxed.extxyz")
    p.add_argument("--engine", choices=("jax-md", "ase"), default="jax-md")
    p.add_argument("--x64", action="store_true", help="float64 throughout")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        summary = run(args)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    n, ok = summary["structures"], summary["converged"]
    print(f"{args.engine}: relaxed {n} structures in {summary['seconds']:.1f} s "
          f"({ok} converged to fmax {args.fmax} eV/Å, median {summary['median_steps']:.0f} "
          f"steps); wrote {args.out} and {args.out}.json")
    if ok < n:
        print(f"{n - ok} structure(s) did not converge in {args.max_steps} steps: "
              f"{summary['not_converged'][:20]}", file=sys.stderr)
        return 3
    return 0


def run(args) -> dict:
    import ase.io
    import numpy as np

    from mpattn.potential import Potential
    from mpattn.train.runs import load_run

    if args.x64:
        import jax

        jax.config.update("jax_enable_x64", True)
    path = Path(args.structures)
    if not path.is_file():
        raise ValueError(f"{path}: no such structure file")
    structures = ase.io.read(path, index=":")
    if not structures:
        raise ValueError(f"{path} holds no structures")
    pot = load_run(args.workdir)
    if not isinstance(pot, Potential):
        raise ValueError(f"{args.workdir} is a property model's run, not a potential's")
    dtype = "float64" if args.x64 else None
    if args.engine == "ase":
        result = relax_with_ase(pot, structures, fmax=args.fmax, max_steps=args.max_steps,
                                dtype=dtype, progress=not args.no_progress)
    else:
        from mpattn.md.relax import relax

        result = relax(pot, structures, fmax=args.fmax, max_steps=args.max_steps,
                       batch_size=args.batch_size, dtype=dtype,
                       progress=not args.no_progress)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    ase.io.write(out, result["atoms"], format="extxyz")
    summary = {
        "engine": args.engine, "workdir": str(args.workdir), "input": str(path),
        "structures": len(structures), "converged": int(np.sum(result["converged"])),
        "not_converged": np.flatnonzero(~result["converged"]).tolist(),
        "fmax": args.fmax, "max_steps": args.max_steps, "seconds": result["seconds"],
        "median_steps": float(np.median(result["steps"])),
        "mean_steps": float(np.mean(result["steps"])),
        "steps": result["steps"].tolist(), "energies_eV": result["energies"].tolist(),
    }
    Path(f"{out}.json").write_text(json.dumps(summary, indent=1))
    return summary


def relax_with_ase(potential, structures, *, fmax: float, max_steps: int, dtype=None,
                   progress: bool = True) -> dict:
    """The same job one structure at a time: ``ase.optimize.FIRE`` through the ASE calculator
    (one compiled function for every structure that fits its padding budget)."""
    import numpy as np
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.optimize import FIRE
    from tqdm.auto import tqdm

    from mpattn.ase import Calculator

    calc = Calculator.from_potential(potential, dtype=dtype)
    out, energies, steps, conv, fm = [], [], [], [], []
    t0 = time.perf_counter()
    for atoms in tqdm(structures, disable=not progress, desc="relax (ase)", leave=False):
        a = atoms.copy()
        a.calc = calc
        opt = FIRE(a, logfile=None)
        ok = bool(opt.run(fmax=fmax, steps=max_steps))
        e, f = a.get_potential_energy(), a.get_forces()
        a.calc = SinglePointCalculator(a, energy=e, forces=f)
        largest = float(np.linalg.norm(f, axis=1).max()) if len(a) else 0.0
        a.info.update(relax_steps=opt.nsteps, converged=ok, fmax=largest)
        out.append(a)
        energies.append(e)
        steps.append(opt.nsteps)
        conv.append(ok)
        fm.append(largest)
    return {"atoms": out, "energies": np.asarray(energies), "steps": np.asarray(steps),
            "converged": np.asarray(conv), "fmax": np.asarray(fm),
            "seconds": time.perf_counter() - t0, "compiles": calc.compiles}


if __name__ == "__main__":
    from mpattn.runtime import restart_with_hugepages

    restart_with_hugepages()
    sys.exit(main())
