"""Batched geometry relaxation: FIRE on many structures at once, each with its own convergence.

:func:`relax` pads structures into batches of one shape and runs FIRE (Bitzek et al., PRL 97,
170201, 2006) ``vmap``-ped over the structures of a batch, ``block`` steps per jit-compiled
call. The update is ASE's ``ase.optimize.FIRE`` step written in JAX, with ASE's settings
(``dt`` 0.1, ``dtmax`` 1.0, ``Nmin`` 5, ``finc`` 1.1, ``fdec`` 0.5, ``astart`` 0.1, ``fa``
0.99, ``maxstep`` 0.2 Å on the norm of the whole step; unit masses, Euler steps), so a batch
takes the steps ASE would take one structure at a time and reaches the same minima (up to
float32 rounding; jax-md's ``fire_descent`` integrates with velocity Verlet and has no
``maxstep``, and lands in other basins of a rough surface). Each structure keeps its own FIRE
state and stops once its largest atomic force is below ``fmax`` (its state is frozen, its
step count stops); the batch ends when all have converged or after ``max_steps``.

The graph of each structure is built inside the step by
:func:`mpattn.neighbors.dense_radius_graph` (all pairs of its padded slots: meant for
molecules and small cells, as QM9 is), so a step never leaves the device.
"""

from __future__ import annotations

import time

import numpy as np

from mpattn.graph import round_up

__all__ = ["FIRE_SETTINGS", "relax"]

# ase.optimize.FIRE's defaults
FIRE_SETTINGS = {"dt": 0.1, "dtmax": 1.0, "Nmin": 5, "finc": 1.1, "fdec": 0.5, "astart": 0.1,
                 "fa": 0.99}


def relax(potential, structures, *, fmax: float = 0.05, max_steps: int = 1000,
          batch_size: int = 256, maxstep: float = 0.2, block: int = 25, dtype=None,
          cutoff: float | None = None, min_distance: float = 0.5,
          progress: bool = True) -> dict:
    """Relax ``structures`` with ``potential`` by batched FIRE (see the module docstring).

    Args:
        potential: an :class:`~mpattn.potential.Potential`.
        structures: a sequence of ``ase.Atoms`` (molecules, or cells periodic in all three
            directions; the cell stays fixed).
        fmax: convergence: the largest atomic force below this (eV/Å).
        max_steps: FIRE steps at most per structure.
        batch_size: slots per batch. Structures are grouped by size (padded to a multiple of
            8 atoms: one compile per group); a slot whose structure has finished takes the
            next one of its group, so the batch stays full.
        maxstep: the largest norm of a structure's displacement in one step (Å).
        block: steps per jit-compiled call (the host checks convergence between calls).
        dtype: compute dtype (default the parameters', float32).
        cutoff: graph radius (default the model's).
        min_distance: structures with atoms closer than this (Å) are refused.
        progress: a tqdm progress bar over structures.

    Returns:
        A dict: ``atoms`` (relaxed copies; ``info`` holds ``relax_steps``, ``converged`` and
        ``fmax``, and a single-point calculator the energy (eV, with the float64 reference)
        and forces, which extxyz writes), ``energies``, ``steps``, ``converged``,
        ``fmax`` (numpy arrays, one entry per structure), ``seconds`` (wall time, compiles
        included) and ``compiles``.

    Raises:
        ValueError: a structure the potential cannot run (named by its index: an unknown
            element, overlapping atoms, a cell too small for the cutoff) or bad settings.
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from tqdm.auto import tqdm

    from mpattn.md.force_field import check_structure
    from mpattn.neighbors import dense_radius_graph

    structures = list(structures)
    if not fmax > 0 or max_steps < 1 or batch_size < 1 or not maxstep > 0 or block < 1:
        raise ValueError(f"need fmax > 0, max_steps, batch_size, block >= 1 and maxstep > 0; "
                         f"got {fmax}, {max_steps}, {batch_size}, {block}, {maxstep}")
    if not structures:
        raise ValueError("relax needs at least one structure")
    if cutoff is None:
        config = getattr(potential.model, "config", None)
        cutoff = getattr(config, "graph_cutoff", getattr(config, "cutoff", None))
        if cutoff is None:
            raise ValueError("the potential's model has no config.cutoff: pass cutoff=")
    cutoff = float(cutoff)
    for k, atoms in enumerate(structures):
        check_structure(atoms, potential.elements, cutoff, min_distance, name=f"structure {k}")

    graphdef, state = nnx.split(potential)
    leaves, treedef = jax.tree.flatten(state)
    floats = [x for x in leaves if jnp.issubdtype(x.dtype, jnp.floating)]
    dtype = jnp.dtype(dtype or (floats[0].dtype if floats else jnp.float32))
    leaves = [x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x for x in leaves]
    reference = potential.reference

    def energy(positions, z, cell):
        graph, _ = dense_radius_graph(z, positions, cell, cutoff)
        pot = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
        return pot(graph, reference=False)["energy"][0]

    force_fn = jax.value_and_grad(energy)
    c = FIRE_SETTINGS

    def init_fn(r, z, cell):
        e, g = force_fn(r, z, cell)
        zero = jnp.zeros((), r.dtype)
        return {"r": r, "v": jnp.zeros_like(r), "f": -g, "e": e, "dt": zero + c["dt"],
                "a": zero + c["astart"], "n": jnp.zeros((), jnp.int32),
                "started": jnp.zeros((), bool)}

    def step_fn(st, z, cell):  # ase.optimize.FIRE.step
        f, v, dt, a, n = st["f"], st["v"], st["dt"], st["a"], st["n"]
        vf = jnp.vdot(f, v)
        norm_f = jnp.maximum(jnp.sqrt(jnp.vdot(f, f)), 1e-30)
        up = st["started"] & (vf > 0)
        reset = st["started"] & ~(vf > 0)
        mixed = (1 - a) * v + a * f / norm_f * jnp.sqrt(jnp.vdot(v, v))
        v = jnp.where(up, mixed, jnp.where(reset, 0.0, v))
        grow = up & (n > c["Nmin"])
        dt = jnp.where(grow, jnp.minimum(dt * c["finc"], c["dtmax"]),
                       jnp.where(reset, dt * c["fdec"], dt))
        a = jnp.where(grow, a * c["fa"], jnp.where(reset, c["astart"], a))
        n = jnp.where(up, n + 1, jnp.where(reset, 0, n))
        v = v + dt * f
        dr = dt * v
        norm = jnp.sqrt(jnp.vdot(dr, dr))
        dr = jnp.where(norm > maxstep, maxstep * dr / jnp.maximum(norm, 1e-30), dr)
        r = st["r"] + dr
        e, g = force_fn(r, z, cell)
        return {"r": r, "v": v, "f": -g, "e": e, "dt": dt, "a": a, "n": n,
                "started": jnp.ones((), bool)}

    def largest_force(st, z):
        return jnp.max(jnp.where(z > 0, jnp.linalg.norm(st["f"], axis=-1), 0))

    def run(st, z, cell, steps):
        def body(_, carry):
            s, k = carry
            done = (largest_force(s, z) < fmax) | (k >= max_steps)
            new = step_fn(s, z, cell)
            s = jax.tree.map(lambda old, nw: jnp.where(done, old, nw), s, new)
            return s, k + jnp.where(done, 0, 1)

        st, steps = jax.lax.fori_loop(0, block, body, (st, steps))
        return st, steps, largest_force(st, z)

    batched_init = jax.jit(jax.vmap(init_fn))
    batched_run = jax.jit(jax.vmap(run))
    widths: set = set()

    n = len(structures)
    sizes = np.array([len(a) for a in structures])
    out_energy, out_steps = np.zeros(n), np.zeros(n, np.int64)
    out_conv, out_fmax = np.zeros(n, bool), np.zeros(n)
    relaxed = [None] * n
    bar = tqdm(total=n, disable=not progress, desc="relax", unit="structure", leave=False)
    t0 = time.perf_counter()
    try:
        # structures of one padded width share a batch of slots; a slot whose structure
        # converged (or ran out of steps) takes the next waiting one at the next block
        for width in sorted(set(round_up(int(k), 8) for k in sizes)):
            waiting = [int(i) for i in np.flatnonzero(round_up_array(sizes, 8) == width)]
            slots = min(batch_size, round_up(len(waiting), 8))
            widths.add((width, slots))
            owner = np.full(slots, -1)
            z = np.zeros((slots, width), np.int32)
            r = np.zeros((slots, width, 3))
            cell = np.zeros((slots, 3, 3))
            st = steps = None
            while waiting or np.any(owner >= 0):
                free = np.flatnonzero(owner < 0)
                if waiting and len(free):
                    new = np.zeros(slots, bool)
                    for j in free[:len(waiting)]:
                        i = waiting.pop(0)
                        owner[j], new[j] = i, True
                        _fill(structures[i], j, z, r, cell)
                    zj, rj, cj = (jnp.asarray(z), jnp.asarray(r, dtype),
                                  jnp.asarray(cell, dtype))
                    fresh = batched_init(rj, zj, cj)
                    if st is None:
                        st, steps = fresh, jnp.zeros(slots, jnp.int32)
                    else:
                        m = jnp.asarray(new)
                        st = jax.tree.map(lambda a, b, m=m: jnp.where(
                            m.reshape((-1,) + (1,) * (a.ndim - 1)), b, a), st, fresh)
                        steps = jnp.where(m, 0, steps)
                st, steps, fm = batched_run(st, zj, cj, steps)
                fm, k = np.asarray(fm), np.asarray(steps)
                finished = np.flatnonzero((owner >= 0) & ((fm < fmax) | (k >= max_steps)))
                if len(finished):
                    e = np.asarray(st["e"], np.float64)
                    pos, force = np.asarray(st["r"], np.float64), np.asarray(st["f"],
                                                                              np.float64)
                for j in finished:
                    i, a = int(owner[j]), structures[int(owner[j])]
                    e_i = float(e[j]) + float(reference.energy(a.get_atomic_numbers(),
                                                               [len(a)])[0])
                    relaxed[i] = _relaxed(a, pos[j, :len(a)], force[j, :len(a)], e_i,
                                          int(k[j]), bool(fm[j] < fmax), float(fm[j]))
                    out_energy[i], out_steps[i] = e_i, int(k[j])
                    out_conv[i], out_fmax[i] = fm[j] < fmax, fm[j]
                    owner[j] = -1
                    z[j] = 0  # an empty slot: no atoms, converged at once
                bar.update(len(finished))
    finally:
        bar.close()
    return {"atoms": relaxed, "energies": out_energy, "steps": out_steps,
            "converged": out_conv, "fmax": out_fmax, "seconds": time.perf_counter() - t0,
            "compiles": len(widths)}


def round_up_array(x, multiple: int) -> np.ndarray:
    """:func:`mpattn.graph.round_up` of every entry."""
    return -(-np.asarray(x) // multiple) * multiple


def _fill(atoms, j: int, z, r, cell) -> None:
    """Put ``atoms`` into slot ``j`` of the padded host arrays."""
    z[j] = 0
    r[j] = 0
    cell[j] = 0
    z[j, :len(atoms)] = atoms.get_atomic_numbers()
    r[j, :len(atoms)] = atoms.get_positions()
    if np.all(atoms.get_pbc()):
        cell[j] = np.asarray(atoms.get_cell())


def _relaxed(atoms, positions, forces, energy, steps, converged, fmax):
    from ase.calculators.singlepoint import SinglePointCalculator

    a = atoms.copy()
    a.set_positions(positions)
    a.calc = SinglePointCalculator(a, energy=energy, forces=forces)
    a.info.update(relax_steps=steps, converged=converged, fmax=fmax)
    return a
