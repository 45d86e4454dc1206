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
        batch_size: structures per batch (every batch is padded to the largest structure,
            rounded up to a multiple of 8 atoms: one compile).
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
            done = largest_force(s, z) < fmax
            new = step_fn(s, z, cell)
            s = jax.tree.map(lambda old, nw: jnp.where(done, old, nw), s, new)
            return s, k + jnp.where(done, 0, 1)

        st, steps = jax.lax.fori_loop(0, block, body, (st, steps))
        return st, steps, largest_force(st, z)

    batched_init = jax.jit(jax.vmap(init_fn))
    batched_run = jax.jit(jax.vmap(run))
    shapes: set = set()

    n = len(structures)
    batch_size = min(batch_size, round_up(n, 8))  # no empty padding beyond the data
    width = round_up(max(len(a) for a in structures), 8)  # one shape: one compile
    out_energy, out_steps = np.zeros(n), np.zeros(n, np.int64)
    out_conv, out_fmax = np.zeros(n, bool), np.zeros(n)
    relaxed = [None] * n
    bar = tqdm(total=n, disable=not progress, desc="relax", unit="structure", leave=False)
    t0 = time.perf_counter()
    try:
        for start in range(0, n, batch_size):
            idx = list(range(start, min(n, start + batch_size)))
            z, r, cell = _pad([structures[i] for i in idx], width, batch_size, dtype)
            shapes.add(width)
            st = batched_init(r, z, cell)
            steps = jnp.zeros(batch_size, jnp.int32)
            taken = 0
            while True:
                st, steps, fm = batched_run(st, z, cell, steps)
                taken += block
                fm = np.asarray(fm)[:len(idx)]
                if np.all(fm < fmax) or taken >= max_steps:
                    break
            e = np.asarray(st["e"], np.float64)
            pos, force = np.asarray(st["r"], np.float64), np.asarray(st["f"], np.float64)
            for j, i in enumerate(idx):
                a = structures[i]
                e_i = float(e[j]) + float(reference.energy(a.get_atomic_numbers(), [len(a)])[0])
                relaxed[i] = _relaxed(a, pos[j, :len(a)], force[j, :len(a)], e_i,
                                      int(np.asarray(steps)[j]), bool(fm[j] < fmax),
                                      float(fm[j]))
                out_energy[i], out_steps[i] = e_i, relaxed[i].info["relax_steps"]
                out_conv[i], out_fmax[i] = fm[j] < fmax, fm[j]
            bar.update(len(idx))
    finally:
        bar.close()
    return {"atoms": relaxed, "energies": out_energy, "steps": out_steps,
            "converged": out_conv, "fmax": out_fmax, "seconds": time.perf_counter() - t0,
            "compiles": len(shapes)}


def _pad(structures, width: int, batch: int, dtype):
    """``(z int32 [batch, width], positions [batch, width, 3], cells [batch, 3, 3])``;
    missing structures of a short last batch are empty (all z = 0)."""
    import jax.numpy as jnp

    z = np.zeros((batch, width), np.int32)
    r = np.zeros((batch, width, 3), np.float64)
    cell = np.zeros((batch, 3, 3), np.float64)
    for j, a in enumerate(structures):
        z[j, :len(a)] = a.get_atomic_numbers()
        r[j, :len(a)] = a.get_positions()
        if np.all(a.get_pbc()):
            cell[j] = np.asarray(a.get_cell())
    return jnp.asarray(z), jnp.asarray(r, dtype), jnp.asarray(cell, dtype)


def _relaxed(atoms, positions, forces, energy, steps, converged, fmax):
    from ase.calculators.singlepoint import SinglePointCalculator

    a = atoms.copy()
    a.set_positions(positions)
    a.calc = SinglePointCalculator(a, energy=energy, forces=forces)
    a.info.update(relax_steps=steps, converged=converged, fmax=fmax)
    return a
