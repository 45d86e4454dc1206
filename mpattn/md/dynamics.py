"""Molecular dynamics in JAX with jax-md: NVE, Langevin and Nosé-Hoover NVT, many replicas.

:func:`run_md` integrates a :class:`~mpattn.md.force_field.ForceField` with jax-md's
integrators (``simulate.nve``, ``nvt_langevin``, ``nvt_nose_hoover``) in *blocks*: one
jit-compiled call runs ``log_every`` steps in a ``lax.fori_loop`` (integrator step, then
``neighbor.update``), and returns the energies the host logs. So the host is visited once per
block, not once per step as in the ASE path (:func:`mpattn.md.ase_nve.run_nve`).

- **Replicas**: the block is ``vmap``-ped over ``R`` copies of the system (momenta drawn with
  seeds ``seed .. seed + R - 1``): many short trajectories for the price of one compile.
- **Neighbour-list overflow**: jax-md's list has a static capacity. When a block reports an
  overflow, the list is re-allocated with at least 1.5x the capacity, the block function is
  compiled once more for the new shape, and the block is redone from its saved start (the
  overflowed block is discarded, so the trajectory stays exact); counted in
  ``neighbor_growths``.
- **Explosions** (a time step too large, a potential that fails): a block ending with a
  non-finite energy or position, atoms closer than ``min_distance`` or a temperature above
  ``max_temperature_K`` stops the run, reported with the step; the trajectory so far is kept.
- **Uncertainty**: for an ensemble force field the members' energy and force spread is logged
  at every block; above ``max_force_std`` the run stops (``stopped`` says why).

Units: Å, eV, amu; ASE's time unit inside (``timestep_fs * ase.units.fs``). Initial momenta
are ASE's (Maxwell-Boltzmann, then centre-of-mass motion and rotation removed), so an NVE run
starts exactly as :func:`~mpattn.md.ase_nve.run_nve` with the same seed does.
"""

from __future__ import annotations

import functools
import time

import numpy as np

from mpattn.md.ase_nve import energy_drift

__all__ = ["ENSEMBLES", "initial_momenta", "run_md"]

ENSEMBLES = ("nve", "langevin", "nose-hoover")


def initial_momenta(atoms, temperature_K: float, seed: int) -> np.ndarray:
    """Maxwell-Boltzmann momenta (amu·Å/ASE time) at ``temperature_K`` without centre-of-mass
    motion or rigid rotation, rescaled to the temperature (as ``run_nve`` draws them)."""
    from ase.md.velocitydistribution import Stationary, ZeroRotation, thermalize_momenta

    a = atoms.copy()
    thermalize_momenta(a, temperature_K, rng=np.random.default_rng(seed))
    if len(a) > 1:
        Stationary(a)
        ZeroRotation(a)
    return a.get_momenta()


def _integrator(ff, ensemble: str, dt: float, kT: float, friction: float, tau: float):
    from jax_md import simulate

    if ensemble == "nve":
        return simulate.nve(ff.energy, ff.shift, dt)
    if ensemble == "langevin":
        return simulate.nvt_langevin(ff.energy, ff.shift, dt, kT, gamma=friction)
    return simulate.nvt_nose_hoover(ff.energy, ff.shift, dt, kT, tau=tau)


def run_md(ff, atoms, *, ensemble: str = "nve", steps: int = 1000, timestep_fs: float = 0.5,
           temperature_K: float = 300.0, friction_per_ps: float = 10.0,
           tau_fs: float | None = None, seed: int = 0, replicas: int = 1,
           log_every: int = 20, trajectory=None, progress: bool = True,
           max_force_std: float | None = None, max_temperature_K: float | None = None,
           max_energy_error: float = 0.02, min_distance: float = 0.5, neighbor=None) -> dict:
    """Run MD of ``atoms`` with the force field ``ff`` in jax-md (see the module docstring).

    Args:
        ff: a :class:`~mpattn.md.force_field.ForceField` made for ``atoms``.
        atoms: the starting structure (not modified).
        ensemble: ``"nve"`` (velocity Verlet), ``"langevin"`` (BAOAB) or ``"nose-hoover"``
            (a chain of 5).
        steps: MD steps (rounded up to whole blocks of ``log_every``).
        timestep_fs: time step in fs.
        temperature_K: initial temperature (momenta drawn from it), and the thermostat's;
            ``None`` (NVE only) starts from the momenta ``atoms`` holds.
        friction_per_ps: Langevin friction (1/ps).
        tau_fs: Nosé-Hoover relaxation time (fs; default 100 time steps).
        seed: seed of the momenta (replica ``k`` uses ``seed + k``) and of the Langevin noise.
        replicas: independent copies run at once (``vmap``).
        log_every: steps per block: energies, temperature, checks and frames every block.
        trajectory: path of an extxyz file to write a frame per block (replica ``k > 0`` to
            ``<stem>-<k><suffix>``), with energy, forces, momenta, time and temperature.
        progress: a tqdm progress bar.
        max_force_std: stop when an ensemble's largest per-atom force spread exceeds it (eV/Å).
        max_temperature_K: stop above this temperature (default ``max(5000, 10 T)``).
        max_energy_error: NVE only: stop when the total energy has moved more than this
            (eV per atom) from its start (a stable run moves well under 1 meV/atom).
        min_distance: stop when two atoms come closer than this (Å).
        neighbor: a jax-md neighbour list to start from (default: allocated for ``atoms``);
            tests pass a too small one to exercise the overflow path.

    Returns:
        A JSON-able dict: per replica lists ``times_ps``, ``potential_energy_eV``,
        ``kinetic_energy_eV``, ``total_energy_eV``, ``temperature_K`` (one entry per block
        and the start), ``drift_meV_per_atom_per_ps`` and ``max_deviation_meV_per_atom``
        (:func:`energy_drift`; meaningful for NVE), and ``steps_done``, ``steps_per_s``
        (steps of one trajectory per second, after compilation), ``atom_steps_per_s``,
        ``compiles``, ``compile_seconds``, ``neighbor_growths``, ``neighbor_capacity``,
        ``seconds``, ``stopped`` (``None``, or ``{"step", "replica", "reason"}``), and for
        ensembles ``energy_std_eV`` / ``max_force_std_eV_per_A`` per block.
    """
    import jax
    import jax.numpy as jnp
    from ase import units
    from tqdm.auto import tqdm

    if ensemble not in ENSEMBLES:
        raise ValueError(f"ensemble must be one of {ENSEMBLES}, got {ensemble!r}")
    if steps < 1 or log_every < 1 or replicas < 1 or not timestep_fs > 0 \
            or not (temperature_K is None or temperature_K >= 0) or not friction_per_ps > 0:
        raise ValueError("need steps, log_every, replicas >= 1, timestep_fs > 0, "
                         f"temperature_K >= 0 and friction_per_ps > 0; got {steps}, "
                         f"{log_every}, {replicas}, {timestep_fs}, {temperature_K}, "
                         f"{friction_per_ps}")
    if len(atoms) != ff.n or not np.array_equal(atoms.get_atomic_numbers(), ff.z):
        raise ValueError("the force field was made for other atoms: ForceField(pot, atoms)")
    if temperature_K is None and ensemble != "nve":
        raise ValueError(f"{ensemble} needs temperature_K (the thermostat's temperature)")
    if max_temperature_K is None:
        max_temperature_K = max(5000.0, 10.0 * (temperature_K or 0.0))
    dtype = ff.dtype
    dt = timestep_fs * units.fs
    kT = units.kB * (temperature_K or 0.0)
    friction = friction_per_ps / 1000.0 / units.fs  # 1/ps -> 1/(ASE time unit)
    tau = (100 * timestep_fs if tau_fs is None else tau_fs) * units.fs
    init_fn, apply_fn = _integrator(ff, ensemble, dt, kT, friction, tau)
    n, members = ff.n, len(ff.members)
    masses = jnp.asarray(ff.masses, dtype)

    r0 = ff.wrap(atoms.get_positions())
    template = neighbor if neighbor is not None else ff.allocate(r0)
    batch_update = jax.jit(jax.vmap(lambda r, nb: ff.neighbor_fn.update(r, nb),
                                    in_axes=(0, None)))
    positions = jnp.broadcast_to(r0, (replicas, n, 3))
    nbrs = batch_update(positions, template)
    growths = 0
    if np.any(np.asarray(nbrs.did_buffer_overflow)):  # a given list too small to start
        nbrs = batch_update(positions, ff.allocate(r0))
        growths += 1
    if temperature_K is None:  # the structure's own momenta, as ase keeps them
        momenta = np.broadcast_to(atoms.get_momenta(), (replicas, n, 3))
    else:
        momenta = np.stack([initial_momenta(atoms, temperature_K, seed + k)
                            for k in range(replicas)])
    momenta = jnp.asarray(momenta, dtype)
    keys = jax.random.split(jax.random.PRNGKey(seed), replicas)
    state = jax.jit(jax.vmap(lambda key, r, p, nb: init_fn(key, r, kT=kT, mass=masses, momenta=p,
                                                            neighbor=nb)))(
        keys, positions, momenta, nbrs)

    def observe(st, nb):
        epot = ff.energy(st.position, neighbor=nb)
        ekin = 0.5 * jnp.sum(st.momentum ** 2 / masses[:, None])
        obs = {"epot": epot, "ekin": ekin, "dmin": ff.min_distance(st.position, nb),
               "finite": jnp.all(jnp.isfinite(st.position)) & jnp.isfinite(epot)}
        if members > 1:
            e, f = ff.member_forces(st.position, nb)
            spread = jnp.sqrt(jnp.mean(jnp.sum((f - f.mean(0)) ** 2, axis=-1), axis=0))
            obs["energy_std"], obs["force_std"] = jnp.std(e), jnp.max(spread)
        return obs

    def block(st, nb):  # st, nb: batched over replicas
        def body(_, carry):
            s, b = carry
            s = jax.vmap(lambda s1, b1: apply_fn(s1, neighbor=b1))(s, b)
            # rebuild the lists only when some replica needs it: jax-md's update under vmap
            # would rebuild at every step (its cond becomes a select)
            need = jnp.any(jax.vmap(ff.needs_rebuild)(s.position, b))
            b = jax.lax.cond(need, lambda: jax.vmap(lambda r, b1: b1.update(r))(s.position, b),
                             lambda: b)
            return s, b

        st, nb = jax.lax.fori_loop(0, log_every, body, (st, nb))
        return st, nb, jax.vmap(observe)(st, nb)

    def single_block(st, nb):  # one replica without vmap: a vmapped model is ~2x slower
        first = functools.partial(jax.tree.map, lambda x: x[0])
        batch = functools.partial(jax.tree.map, lambda x: x[None])

        def body(_, carry):
            s, b = carry
            s = apply_fn(s, neighbor=b)
            return s, b.update(s.position)

        st, nb = jax.lax.fori_loop(0, log_every, body, (first(st), first(nb)))
        return batch(st), batch(nb), batch(observe(st, nb))

    batched_block = block if replicas > 1 else single_block
    compiled: dict = {}
    compile_seconds = [0.0]

    def run_block(st, nb):
        key = nb.idx.shape
        if key not in compiled:
            t = time.perf_counter()
            compiled[key] = jax.jit(batched_block).lower(st, nb).compile()
            compile_seconds[0] += time.perf_counter() - t
        return compiled[key](st, nb)

    rec = {k: [] for k in ("times_ps", "potential_energy_eV", "kinetic_energy_eV",
                           "total_energy_eV", "temperature_K", "energy_std_eV",
                           "max_force_std_eV_per_A")}
    dof = 3 * n

    def record(step: int, obs) -> None:
        epot = np.asarray(obs["epot"], np.float64) + ff.reference_energy
        ekin = np.asarray(obs["ekin"], np.float64)
        rec["times_ps"].append(step * timestep_fs / 1000.0)
        rec["potential_energy_eV"].append(epot.tolist())
        rec["kinetic_energy_eV"].append(ekin.tolist())
        rec["total_energy_eV"].append((epot + ekin).tolist())
        rec["temperature_K"].append((2 * ekin / (dof * units.kB)).tolist())
        if members > 1:
            rec["energy_std_eV"].append(np.asarray(obs["energy_std"], np.float64).tolist())
            rec["max_force_std_eV_per_A"].append(
                np.asarray(obs["force_std"], np.float64).tolist())

    writer = _TrajectoryWriter(trajectory, atoms, replicas, ff)
    record(0, jax.jit(jax.vmap(observe))(state, nbrs))
    writer.write(0, state, rec, timestep_fs)
    blocks = -(-steps // log_every)
    stopped = None
    bar = tqdm(total=blocks * log_every, disable=not progress, desc=f"MD {ensemble}",
               unit="step", leave=False)
    t0 = time.perf_counter()
    done = 0
    try:
        while done < blocks:
            new_state, new_nbrs, obs = run_block(state, nbrs)
            overflow = np.asarray(jax.device_get(new_nbrs.did_buffer_overflow))
            if overflow.any():  # discard the block, grow the list once, redo it
                worst = int(np.argmax(overflow))
                target = int(1.5 * nbrs.idx.shape[-1])
                end = np.asarray(new_state.position[worst])
                if np.all(np.isfinite(end)):
                    target = max(target, ff.allocate(end).idx.shape[-1])
                template = ff.allocate(state.position[worst])
                extra = -(-(target - template.idx.shape[-1]) // n)
                if extra > 0:
                    template = ff.allocate(state.position[worst], extra_capacity=extra)
                nbrs = batch_update(state.position, template)
                growths += 1
                continue
            state, nbrs, done = new_state, new_nbrs, done + 1
            step = done * log_every
            record(step, obs)
            writer.write(step, state, rec, timestep_fs)
            bar.update(log_every)
            bar.set_postfix(T=f"{np.mean(rec['temperature_K'][-1]):.0f} K", refresh=False)
            stopped = _check(obs, rec, step, min_distance, max_temperature_K, max_force_std,
                             max_energy_error * n if ensemble == "nve" else np.inf)
            if stopped:
                break
    finally:
        bar.close()
        writer.close()
    seconds = time.perf_counter() - t0 - compile_seconds[0]
    steps_done = done * log_every
    out = {k: v for k, v in rec.items() if v or k in ("times_ps",)}
    drifts = [energy_drift(rec["times_ps"], [e[k] for e in rec["total_energy_eV"]], n)
              for k in range(replicas)] if len(rec["times_ps"]) > 1 else [(0.0, 0.0)] * replicas
    out.update({
        "engine": "jax-md",
        "ensemble": ensemble,
        "n_atoms": n,
        "replicas": replicas,
        "members": members,
        "steps": int(steps),
        "steps_done": steps_done,
        "timestep_fs": float(timestep_fs),
        "temperature_K_target": temperature_K,
        "dtype": str(dtype),
        "drift_meV_per_atom_per_ps": [d for d, _ in drifts],
        "max_deviation_meV_per_atom": [m for _, m in drifts],
        "compiles": len(compiled),
        "compile_seconds": compile_seconds[0],
        "neighbor_growths": growths,
        "neighbor_capacity": int(nbrs.idx.shape[-1]),
        "seconds": seconds,
        "steps_per_s": steps_done / seconds if seconds > 0 else float("inf"),
        "atom_steps_per_s": steps_done * n * replicas / seconds if seconds > 0 else 0.0,
        "stopped": stopped,
        "trajectory": None if trajectory is None else [str(p) for p in writer.paths],
    })
    return out


def _check(obs, rec, step, min_distance, max_temperature_K, max_force_std, max_error):
    """Why the run must stop after this block (``None``: go on). ``max_error``: largest
    total-energy change in eV (inf unless NVE)."""
    finite = np.asarray(obs["finite"])
    error = np.abs(np.asarray(rec["total_energy_eV"][-1]) - np.asarray(rec["total_energy_eV"][0]))
    temps = np.asarray(rec["temperature_K"][-1])
    dmin = np.asarray(obs["dmin"])
    for k in range(len(finite)):
        if not finite[k]:
            return {"step": step, "replica": k, "reason": "non-finite energy or positions "
                    "(the time step is too large or the potential failed)"}
        if dmin[k] < min_distance:
            return {"step": step, "replica": k, "reason": f"atoms {dmin[k]:.3f} Å apart (below "
                    f"min_distance={min_distance} Å): the system exploded"}
        if error[k] > max_error:
            return {"step": step, "replica": k, "reason": f"total energy moved by "
                    f"{error[k]:.3g} eV in NVE: the system exploded (time step too large?)"}
        if temps[k] > max_temperature_K:
            return {"step": step, "replica": k, "reason": f"temperature {temps[k]:.0f} K above "
                    f"{max_temperature_K:.0f} K: the system exploded (time step too large?)"}
    if max_force_std is not None and rec["max_force_std_eV_per_A"]:
        spread = np.asarray(rec["max_force_std_eV_per_A"][-1])
        k = int(np.argmax(spread))
        if spread[k] > max_force_std:
            return {"step": step, "replica": k, "reason": f"ensemble force spread "
                    f"{spread[k]:.3f} eV/Å above max_force_std={max_force_std} eV/Å "
                    "(extrapolating)"}
    return None


class _TrajectoryWriter:
    """Appends one extxyz frame per block and replica (energy, forces, momenta, time, T)."""

    def __init__(self, path, atoms, replicas: int, ff):
        from pathlib import Path

        self.paths = []
        self.atoms, self.ff, self.files = atoms, ff, []
        if path is None:
            return
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.paths = [path if k == 0 else path.with_name(f"{path.stem}-{k}{path.suffix}")
                      for k in range(replicas)]
        self.files = [open(p, "w") for p in self.paths]

    def write(self, step: int, state, rec, timestep_fs: float) -> None:
        if not self.files:
            return
        import ase.io
        from ase.calculators.singlepoint import SinglePointCalculator

        pos = np.asarray(state.position, np.float64)
        mom = np.asarray(state.momentum, np.float64)
        force = np.asarray(state.force, np.float64)
        for k, f in enumerate(self.files):
            a = self.atoms.copy()
            a.set_positions(pos[k])
            a.set_momenta(mom[k])
            a.calc = SinglePointCalculator(a, energy=rec["potential_energy_eV"][-1][k],
                                           forces=force[k])
            a.info.update(step=step, time_ps=step * timestep_fs / 1000.0,
                          temperature_K=rec["temperature_K"][-1][k],
                          total_energy_eV=rec["total_energy_eV"][-1][k])
            ase.io.write(f, a, format="extxyz")
            f.flush()

    def close(self) -> None:
        for f in self.files:
            f.close()
