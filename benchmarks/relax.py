"""Geometry relaxation of many QM9 molecules: batched FIRE in JAX against ASE's FIRE.

    python -m benchmarks.relax --workdir runs/spice_like_xtb --molecules 1000
    python -m benchmarks.relax --workdir runs/spice_like_xtb --molecules 1000 \
        --ase-molecules 200        # ASE on a subset, its time per molecule extrapolated
    python -m benchmarks.relax --quick --workdir runs/spice_like_xtb   # smoke run

``--molecules`` molecules are drawn (seeded) from QM9 (the qm9pack CSV files read as they are,
no bond perception; or ``--dataset-cache``); those with an element the potential does not know
(F for a potential trained on H C N O S) are skipped and counted. Every position gets Gaussian
noise of ``--sigma`` Å per coordinate (seeded; redrawn for a molecule where it brings two atoms
within 0.7 Å), then all structures are relaxed by batched FIRE
(:func:`mpattn.md.relax.relax`, ``--batch-size`` per batch) and the same structures one at a
time by ``ase.optimize.FIRE`` through :class:`mpattn.ase.Calculator` (one calculator for all,
:func:`experiments.relax.relax_with_ase`), with the same ``--fmax`` and ``--max-steps``.
Both wall times include their compiles. ``--ase-molecules K`` runs the ASE side on the first
K structures only and extrapolates its time per molecule to all of them (the output says so).

The final energies of the structures both relaxed are compared: median and 95th percentile of
``|ΔE|`` (meV) over those both converged, and the count above ``--energy-tolerance`` (1 meV):
the batched FIRE is ASE's FIRE step in JAX (same settings, same 0.2 Å cap on a structure's
whole step), so both take the same path up to float32 rounding of the forces; where a path
passes near a saddle of a soft torsion, rounding can still send the two into different
conformers: another minimum, not a disagreement of the potentials. ``intact``
counts the molecules whose covalent bonds (ASE radii, x1.25) at the end are those of the QM9
geometry: a molecule that fell apart or rearranged on the way is no relaxation. Prints the
table and writes ``benchmarks/results/relax-<device>-<date>.json`` and ``.png`` (histogram of
``|ΔE|``).
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from benchmarks.common import (
    RESULTS,
    add_dataset_cache_argument,
    machine_info,
    save_result_and_figure,
)
from benchmarks.md import load_potential, versions

__all__ = ["energy_agreement", "intact", "load_molecules", "main", "perturb", "split_known"]

_QUICK = {"molecules": 16, "ase_molecules": 8, "max_steps": 200, "first_rows": 2000}


def load_molecules(n: int, *, seed: int = 0, dataset_cache: Path | None = None,
                   first_rows: int | None = None) -> tuple[list, np.ndarray]:
    """A seeded random draw of ``n`` QM9 molecules as ``ase.Atoms`` (elements, 3-D positions).

    From the ``dataset_cache`` file if given, else qm9pack's CSV files read as raw records
    (``first_rows``: only the first rows of the first file, QM9's smallest molecules).

    Returns:
        ``(atoms list, QM9 ids)`` in draw order.
    """
    from ase import Atoms

    if dataset_cache is not None:
        from mpattn.data.cache import load_molset

        ms = load_molset(Path(dataset_cache))
        if first_rows is not None:
            ms = ms.subset(np.arange(min(first_rows, len(ms))))
        pick = np.random.default_rng(seed).choice(len(ms), size=min(n, len(ms)), replace=False)
        return ms.to_atoms(pick), np.asarray(ms.ids)[pick]
    from mpattn.data.qm9 import read_qm9pack

    raw, _ = read_qm9pack(nrows=first_rows)
    pick = np.random.default_rng(seed).choice(len(raw), size=min(n, len(raw)), replace=False)
    return ([Atoms(numbers=raw[i].z.astype(int), positions=raw[i].positions) for i in pick],
            np.array([raw[i].id for i in pick]))


def split_known(structures, elements) -> tuple[np.ndarray, dict]:
    """Indices of the structures made only of ``elements`` (atomic numbers) and, per unknown
    element symbol, how many structures it excluded."""
    from mpattn.elements import symbols

    known = set(int(e) for e in elements)
    keep, skipped = [], Counter()
    for i, a in enumerate(structures):
        unknown = sorted(set(a.get_atomic_numbers().tolist()) - known)
        if unknown:
            skipped.update(symbols(unknown))
        else:
            keep.append(i)
    return np.asarray(keep, np.int64), dict(sorted(skipped.items()))


def perturb(structures, sigma: float, seed: int = 0, *, min_distance: float = 0.7,
            max_draws: int = 100) -> tuple[list, int]:
    """Copies of molecules with Gaussian noise of ``sigma`` Å on every coordinate (one seeded
    stream over all structures, in order); a structure whose noise brings two atoms closer
    than ``min_distance`` Å gets a new draw (the relaxation refuses overlapping atoms).

    Returns:
        ``(perturbed copies, number of redrawn structures)``.
    """
    rng = np.random.default_rng(seed)
    out, redrawn = [], 0
    for a in structures:
        pos, draws = a.get_positions(), 0
        while True:
            new = pos + rng.normal(0.0, sigma, pos.shape)
            draws += 1
            d = np.linalg.norm(new[:, None] - new[None], axis=-1)
            if len(a) < 2 or d[np.triu_indices(len(a), 1)].min() >= min_distance:
                break
            if draws == max_draws:
                raise RuntimeError(f"perturb: no draw of sigma {sigma} Å kept the atoms of "
                                   f"{a.get_chemical_formula()} {min_distance} Å apart in "
                                   f"{max_draws} tries")
        redrawn += draws > 1
        b = a.copy()
        b.set_positions(new)
        out.append(b)
    return out, redrawn


def energy_agreement(e_batched, e_ase, converged, tolerance_meV: float = 1.0) -> dict:
    """``|ΔE|`` statistics (meV) of two relaxations of the same structures.

    Args:
        e_batched, e_ase: final energies (eV), one per structure.
        converged: True where both relaxations converged (only those enter the statistics).
        tolerance_meV: ``over_tolerance`` counts those above it.

    Returns:
        ``n``, ``median_meV``, ``p95_meV``, ``max_meV``, ``over_tolerance``,
        ``tolerance_meV`` and ``abs_meV`` (the list, for the histogram); None statistics if
        no structure converged in both.
    """
    d = 1000.0 * np.abs(np.asarray(e_batched, np.float64) - np.asarray(e_ase, np.float64))
    d = d[np.asarray(converged, bool)]
    out = {"n": int(d.size), "tolerance_meV": tolerance_meV,
           "over_tolerance": int(np.sum(d > tolerance_meV)), "abs_meV": d.tolist()}
    if d.size:
        out.update(median_meV=float(np.median(d)), p95_meV=float(np.percentile(d, 95)),
                   max_meV=float(d.max()))
    else:
        out.update(median_meV=None, p95_meV=None, max_meV=None)
    return out


def intact(references, relaxed) -> np.ndarray:
    """bool per structure: the covalent-bond graph of ``relaxed`` is that of ``references``
    (the unperturbed QM9 geometries; :func:`mpattn.data.frames.covalent_bonds`)."""
    from mpattn.data.frames import covalent_bonds

    return np.array([np.array_equal(covalent_bonds(r.numbers, r.positions),
                                    covalent_bonds(r.numbers, x.positions))
                     for r, x in zip(references, relaxed, strict=False)], bool)


def _side(result: dict, n: int, references) -> dict:
    steps, conv = np.asarray(result["steps"]), np.asarray(result["converged"], bool)
    return {"molecules": n, "seconds": result["seconds"],
            "ms_per_molecule": 1000.0 * result["seconds"] / n,
            "compiles": result["compiles"], "converged": int(conv.sum()),
            "intact": int(intact(references, result["atoms"]).sum()),
            "mean_steps": float(steps.mean()), "median_steps": float(np.median(steps)),
            "max_steps_taken": int(steps.max())}


def plot(agreement: dict, path, title: str) -> Path:
    """Histogram of ``|ΔE|`` (meV, log bins) with the tolerance marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = np.asarray(agreement["abs_meV"], np.float64)
    fig, ax = plt.subplots(figsize=(6, 4))
    if d.size:
        lo = max(float(d[d > 0].min()) if (d > 0).any() else 1e-4, 1e-5)
        hi = max(float(d.max()), 10 * agreement["tolerance_meV"])
        ax.hist(np.maximum(d, lo), bins=np.geomspace(lo, hi * 1.01, 40), color="C0")
        ax.set_xscale("log")
    ax.axvline(agreement["tolerance_meV"], color="C3", ls="--",
               label=f"{agreement['tolerance_meV']:g} meV: {agreement['over_tolerance']} of "
                     f"{agreement['n']} above")
    ax.set_xlabel("|E(batched FIRE) − E(ASE FIRE)| at the minimum (meV)")
    ax.set_ylabel("molecules")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def main(argv=None) -> int:
    from experiments.relax import relax_with_ase
    from mpattn.md.relax import relax

    ap = argparse.ArgumentParser(prog="python -m benchmarks.relax",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default="runs/spice_like_xtb", help="the potential's run")
    ap.add_argument("--molecules", type=int, default=1000, help="QM9 molecules drawn")
    ap.add_argument("--ase-molecules", type=int, default=None,
                    help="relax only the first K with ASE and extrapolate (default: all)")
    ap.add_argument("--sigma", type=float, default=0.1, help="Å of Gaussian noise")
    ap.add_argument("--fmax", type=float, default=0.05, help="eV/Å")
    ap.add_argument("--max-steps", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--energy-tolerance", type=float, default=1.0, help="meV")
    ap.add_argument("--seed", type=int, default=0, help="of the draw and of the noise")
    ap.add_argument("--first-rows", type=int, default=None, help=argparse.SUPPRESS)
    add_dataset_cache_argument(ap)
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 16 molecules from QM9's first 2,000, 8 with ASE, "
                         "200 steps at most")
    ap.add_argument("--results-dir", type=Path, default=RESULTS)
    ap.add_argument("--no-save", action="store_true")
    if ap.parse_known_args(argv)[0].quick:  # smaller defaults; options given still win
        ap.set_defaults(**_QUICK)
    args = ap.parse_args(argv)
    if args.molecules < 1 or (args.ase_molecules is not None and args.ase_molecules < 1):
        ap.error("--molecules and --ase-molecules must be >= 1")

    pot = load_potential(args.workdir)
    drawn, ids = load_molecules(args.molecules, seed=args.seed,
                                dataset_cache=args.dataset_cache, first_rows=args.first_rows)
    keep, skipped = split_known(drawn, pot.elements)
    if not len(keep):
        print(f"error: none of the {len(drawn)} molecules has only elements the potential "
              "knows", file=sys.stderr)
        return 2
    structures, redrawn = perturb([drawn[i] for i in keep], args.sigma, seed=args.seed)
    n = len(structures)
    k = n if args.ase_molecules is None else min(args.ase_molecules, n)
    skipped_text = ", ".join(f"{c} with {el}" for el, c in skipped.items()) or "none"
    print(f"{len(drawn)} QM9 molecules drawn (seed {args.seed}), {len(drawn) - n} skipped "
          f"(elements the potential does not know: {skipped_text}); {n} relaxed, "
          f"{np.mean([len(a) for a in structures]):.1f} atoms on average, noise "
          f"{args.sigma:g} Å ({redrawn} redrawn: atoms closer than 0.7 Å); fmax "
          f"{args.fmax:g} eV/Å, at most {args.max_steps} steps")

    settings = {"fmax": args.fmax, "max_steps": args.max_steps, "progress": False}
    batched = relax(pot, structures, batch_size=args.batch_size, **settings)
    by_ase = relax_with_ase(pot, structures[:k], **settings)
    references = [drawn[i] for i in keep]
    b, a = _side(batched, n, references), _side(by_ase, k, references)
    b["batch_size"] = args.batch_size
    a["extrapolated"] = k < n
    a["seconds_all"] = a["seconds"] * n / k  # = seconds when not extrapolated
    speedup = a["seconds_all"] / b["seconds"]
    both = np.asarray(batched["converged"][:k], bool) & np.asarray(by_ase["converged"], bool)
    agree = energy_agreement(batched["energies"][:k], by_ase["energies"], both,
                             args.energy_tolerance)

    print(f"{'engine':14s} {'molecules':>9s} {'seconds':>9s} {'ms/mol':>8s} {'compiles':>8s} "
          f"{'converged':>9s} {'intact':>7s} {'mean steps':>10s} {'median':>7s}")
    for name, s in (("batched FIRE", b), ("ASE FIRE", a)):
        print(f"{name:14s} {s['molecules']:9d} {s['seconds']:9.1f} {s['ms_per_molecule']:8.1f} "
              f"{s['compiles']:8d} {s['converged']:9d} {s['intact']:7d} {s['mean_steps']:10.1f} "
              f"{s['median_steps']:7.0f}")
    print("(intact: the covalent bonds of the QM9 geometry unchanged at the end)")
    if a["extrapolated"]:
        print(f"ASE ran {k} of {n} molecules: its time for all {n} is extrapolated from its "
              f"time per molecule ({a['seconds_all']:.1f} s)")
    print(f"speed-up of batched FIRE: {speedup:.1f}x (wall times include compiles)")
    if agree["n"]:
        print(f"final energies, {agree['n']} molecules converged in both: |ΔE| median "
              f"{agree['median_meV']:.3g} meV, 95th percentile {agree['p95_meV']:.3g} meV, "
              f"max {agree['max_meV']:.3g} meV; {agree['over_tolerance']} above "
              f"{args.energy_tolerance:g} meV (a soft torsion can end in another conformer: "
              "another minimum, not a disagreement)")
    else:
        print("final energies: no molecule converged in both")

    payload = {
        "command": "python -m benchmarks.relax " + " ".join(
            sys.argv[1:] if argv is None else argv),
        "versions": versions(),
        "workdir": str(args.workdir), "quick": args.quick, "seed": args.seed,
        "sigma_A": args.sigma, "fmax": args.fmax, "max_steps": args.max_steps,
        "molecules": {"drawn": len(drawn), "relaxed": n, "skipped": len(drawn) - n,
                      "skipped_by_element": skipped, "noise_redrawn": redrawn,
                      "mean_atoms": float(np.mean([len(s) for s in structures])),
                      "ids": np.asarray(ids)[keep].tolist()},
        "batched": b, "ase": a, "speedup": speedup, "energy_agreement": agree,
        "summary": {"molecules": n, "skipped": len(drawn) - n,
                    "batched_seconds": b["seconds"], "ase_seconds": a["seconds_all"],
                    "ase_extrapolated": a["extrapolated"], "speedup": speedup,
                    "batched_converged": b["converged"], "ase_converged": a["converged"],
                    "batched_intact": b["intact"], "ase_intact": a["intact"],
                    "batched_mean_steps": b["mean_steps"], "ase_mean_steps": a["mean_steps"],
                    "median_abs_dE_meV": agree["median_meV"], "p95_abs_dE_meV": agree["p95_meV"],
                    "over_tolerance": agree["over_tolerance"]},
    }
    title = (f"{agree['n']} QM9 molecules converged in both ({args.workdir}, noise "
             f"{args.sigma:g} Å) on {machine_info()['device']}")
    save_result_and_figure("relax", payload, lambda p: plot(agree, p, title),
                           save=not args.no_save, directory=args.results_dir)
    return 0


if __name__ == "__main__":
    from mpattn.runtime import restart_with_hugepages

    restart_with_hugepages()  # before any work: huge pages for XLA's CPU buffers
    raise SystemExit(main())
