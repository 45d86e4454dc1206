"""NVE molecular dynamics through any ASE calculator, with energy-conservation diagnostics.

:func:`run_nve` integrates Newton's equations with ASE's velocity Verlet from
Maxwell-Boltzmann velocities and reports the total-energy drift (meV/atom/ps: the slope of
a least-squares line through ``E_tot(t)``, divided by the number of atoms), the largest
excursion of ``E_tot`` from its start, whether the covalent bonds survived
(:func:`mpattn.data.frames.covalent_bonds`) and the speed. :func:`plot_energy` draws the
energies against time. Drift and conservation are the standard sanity checks of a machine-
learned potential: a conservative, smooth potential (forces = -dE/dR, no jumps at the
cutoff) shows no systematic drift at a stable time step.
"""

from __future__ import annotations

import os
import time

import numpy as np

__all__ = ["energy_drift", "plot_energy", "run_nve"]


def energy_drift(times_ps, total_energy_eV, n_atoms: int) -> tuple[float, float]:
    """``(slope, max_dev)`` of a total-energy series, both in meV per atom (slope per ps).

    ``slope`` is that of the least-squares line ``E_tot ≈ a + b t`` (``b / n_atoms``, in
    meV/atom/ps); ``max_dev`` is ``max_t |E_tot(t) - E_tot(0)| / n_atoms`` in meV/atom.
    """
    t = np.asarray(times_ps, np.float64).ravel()
    e = np.asarray(total_energy_eV, np.float64).ravel()
    if t.shape != e.shape or len(t) < 2 or n_atoms < 1:
        raise ValueError(f"need >= 2 times and as many energies and n_atoms >= 1; got "
                         f"{t.shape}, {e.shape}, {n_atoms}")
    tc = t - t.mean()
    slope = float(np.sum(tc * (e - e.mean())) / np.sum(tc * tc))
    return 1000.0 * slope / n_atoms, 1000.0 * float(np.max(np.abs(e - e[0]))) / n_atoms


def run_nve(calc, atoms, *, timestep_fs: float = 0.5, steps: int = 20000,
            temperature_K: float = 300.0, seed: int = 0, log_every: int = 20,
            progress: bool = True, trajectory=None) -> dict:
    """NVE (velocity Verlet) MD of a copy of ``atoms`` with ``calc``.

    Velocities are drawn from the Maxwell-Boltzmann distribution at ``temperature_K`` with
    ``np.random.default_rng(seed)`` (:func:`ase.md.velocitydistribution.thermalize_momenta`),
    then the centre-of-mass momentum and the rigid rotation are removed
    (``Stationary``/``ZeroRotation``, rescaled back to the temperature). Every ``log_every``
    steps (and at step 0) time, potential, kinetic and total energy and temperature are
    recorded. The first force evaluation (where a jit-compiled calculator compiles) happens
    before the clock starts.

    Args:
        calc: an ASE calculator (e.g. :class:`mpattn.ase.Calculator`), or a training
            workdir (str or path), loaded as ``mpattn.ase.Calculator(calc)``.
        atoms: the initial structure (not modified).
        timestep_fs: time step in fs.
        steps: number of MD steps.
        temperature_K: initial temperature in K.
        seed: seed of the velocities.
        log_every: record every this many steps.
        progress: show a tqdm progress bar.
        trajectory: path of an extxyz file to write a frame at every record (energy,
            forces, momenta, ``step``, ``time_ps``, ``temperature_K``, ``total_energy_eV``).

    Returns:
        A JSON-able dict: ``times_ps``, ``total_energy_eV``, ``potential_energy_eV``,
        ``kinetic_energy_eV``, ``temperature_K`` (lists, one entry per record),
        ``drift_meV_per_atom_per_ps`` (see :func:`energy_drift`),
        ``max_deviation_meV_per_atom``, ``intact`` (covalent bonds at the end equal those at
        the start), ``n_atoms``, ``steps``, ``timestep_fs``, ``compiles`` (compilations of
        the calculator during this run, from its ``compiles`` counter; ``None`` for a
        calculator without one), ``recompiles`` (those beyond the calculator's first
        compilation), ``budget_growths`` (during the run), ``seconds`` (MD wall time),
        ``setup_seconds`` (first force call) and ``steps_per_s``.
    """
    from ase import units
    from ase.md.velocitydistribution import Stationary, ZeroRotation, thermalize_momenta
    from ase.md.verlet import VelocityVerlet
    from tqdm.auto import tqdm

    from mpattn.data.frames import covalent_bonds

    if steps < 1 or log_every < 1 or not timestep_fs > 0 or temperature_K < 0:
        raise ValueError(f"need steps, log_every >= 1, timestep_fs > 0, temperature_K >= 0; "
                         f"got {steps}, {log_every}, {timestep_fs}, {temperature_K}")
    if isinstance(calc, (str, os.PathLike)):
        from mpattn.ase import Calculator

        calc = Calculator(calc)
    atoms = atoms.copy()
    atoms.calc = calc
    thermalize_momenta(atoms, temperature_K, rng=np.random.default_rng(seed))
    if len(atoms) > 1:
        Stationary(atoms)
        ZeroRotation(atoms)
    z = atoms.get_atomic_numbers()
    bonds0 = covalent_bonds(z, atoms.get_positions())
    compiles0 = getattr(calc, "compiles", None)
    growths0 = getattr(calc, "budget_growths", None)

    t_setup = time.perf_counter()
    atoms.get_forces()  # compiles a jit-compiled calculator; ase caches the result
    setup_seconds = time.perf_counter() - t_setup

    dyn = VelocityVerlet(atoms, timestep=timestep_fs * units.fs)
    rec: dict[str, list[float]] = {k: [] for k in ("times_ps", "total_energy_eV",
                                                   "potential_energy_eV", "kinetic_energy_eV",
                                                   "temperature_K")}
    bar = tqdm(total=steps, disable=not progress, desc="NVE", unit="step", leave=False)
    frames = None if trajectory is None else open(trajectory, "w")

    def record() -> None:
        epot = float(atoms.get_potential_energy())
        ekin = float(atoms.get_kinetic_energy())
        rec["times_ps"].append(dyn.nsteps * timestep_fs / 1000.0)
        rec["potential_energy_eV"].append(epot)
        rec["kinetic_energy_eV"].append(ekin)
        rec["total_energy_eV"].append(epot + ekin)
        rec["temperature_K"].append(float(atoms.get_temperature()))
        if frames is not None:
            import ase.io

            atoms.info.update(step=dyn.nsteps, time_ps=rec["times_ps"][-1],
                              temperature_K=rec["temperature_K"][-1],
                              total_energy_eV=rec["total_energy_eV"][-1])
            ase.io.write(frames, atoms, format="extxyz")
            frames.flush()
        if dyn.nsteps:
            bar.update(dyn.nsteps - bar.n)
            bar.set_postfix(T=f"{rec['temperature_K'][-1]:.0f} K", refresh=False)

    dyn.attach(record, interval=log_every)
    t0 = time.perf_counter()
    try:
        dyn.run(steps)
        seconds = time.perf_counter() - t0
        if steps % log_every:  # the last step, for drift and plots
            record()
    finally:
        bar.close()
        if frames is not None:
            frames.close()

    n = len(atoms)
    drift, max_dev = energy_drift(rec["times_ps"], rec["total_energy_eV"], n)
    compiles = None if compiles0 is None else calc.compiles - compiles0
    return {
        **rec,
        "drift_meV_per_atom_per_ps": drift,
        "max_deviation_meV_per_atom": max_dev,
        "intact": bool(np.array_equal(bonds0, covalent_bonds(z, atoms.get_positions()))),
        "n_atoms": n,
        "steps": int(steps),
        "timestep_fs": float(timestep_fs),
        "temperature_initial_K": float(temperature_K),
        "compiles": compiles,
        "recompiles": None if compiles is None else calc.compiles - max(compiles0, 1),
        "budget_growths": None if growths0 is None else calc.budget_growths - growths0,
        "seconds": seconds,
        "setup_seconds": setup_seconds,
        "steps_per_s": steps / seconds if seconds > 0 else float("inf"),
    }


def plot_energy(result: dict, path) -> None:
    """Total, potential and kinetic energy vs time from :func:`run_nve` (matplotlib, Agg).

    Top: the three energies relative to the initial total energy (eV). Bottom: the total
    energy's deviation in meV/atom with the least-squares drift line. The title gives the
    drift in meV/atom/ps.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = np.asarray(result["times_ps"])
    tot = np.asarray(result["total_energy_eV"])
    e0, n = tot[0], result["n_atoms"]
    fig, (ax, dev) = plt.subplots(2, 1, figsize=(7, 6), sharex=True,
                                  gridspec_kw={"height_ratios": [2, 1]})
    ax.plot(t, np.asarray(result["potential_energy_eV"]) - e0, label="potential", lw=0.8)
    ax.plot(t, np.asarray(result["kinetic_energy_eV"]), label="kinetic", lw=0.8)
    ax.plot(t, tot - e0, label="total", lw=1.2, color="k")
    ax.set_ylabel("energy − E_tot(0) (eV)")
    ax.legend(loc="best")
    drift = result["drift_meV_per_atom_per_ps"]
    d = 1000.0 * (tot - e0) / n
    dev.plot(t, d, color="k", lw=0.8)
    fit = np.polyfit(t, d, 1) if len(t) > 1 else (0.0, d[0])
    dev.plot(t, np.polyval(fit, t), color="C3", lw=1.0, ls="--", label="least-squares line")
    dev.set_xlabel("time (ps)")
    dev.set_ylabel("ΔE_tot (meV/atom)")
    dev.legend(loc="best")
    fig.suptitle(f"NVE, {n} atoms, {result.get('timestep_fs', '?')} fs: drift "
                 f"{drift:.3g} meV/atom/ps, max |ΔE_tot| "
                 f"{result['max_deviation_meV_per_atom']:.3g} meV/atom")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
