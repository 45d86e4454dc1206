"""A trained potential, or an ensemble of them, as a JAX-MD force field for one system.

jax-md (Schoenholz & Cubuk, NeurIPS 2020) supplies the space (free or periodic displacement
and shift functions) and the neighbour list (cell list, skin, overflow bit). This module turns
jax-md's ``OrderedSparse`` list into the padded ``jraph.GraphsTuple`` the models read (the
layout of :func:`mpattn.neighbors.neighbor_graph`) *inside* the jit-compiled step, so an MD or
relaxation step is one XLA call without a host round trip:

- each unordered pair of the list becomes edges ``2k`` and ``2k + 1`` (both directions), so
  ``edges["pair"] = arange // 2`` needs no matching; jax-md compacts real pairs first and fills
  the rest with index ``N``, which is our padding node (the graph has ``N + 1`` nodes), so the
  ``n_edge`` masks hold;
- periodic images: ``edges["shift"]`` is the minimum-image correction
  ``displacement(R_s, R_r) - (R_s - R_r)``, a constant under the gradient (it only changes
  when an atom is wrapped back into the cell);
- the list holds pairs within ``cutoff + skin``. Models whose contributions vanish smoothly at
  the cutoff (the envelope attention, SchNet's cosine filter) give the same energy with those
  extra edges as with the exact radius graph (tests/test_jax_md.py pins it); the plain-softmax
  attention (``smooth=False``) does not and is refused.

The per-element reference ``Σ_e n_e E_e`` is a constant of the system (atoms are neither made
nor destroyed in MD): forces never see it, and :attr:`ForceField.reference_energy` adds it in
float64 on the host when energies are logged, as the ASE calculator does.

An ensemble (several potentials) is driven by its mean energy; :meth:`ForceField.member_forces`
gives every member's energy and forces for the spread (query by committee).
"""

from __future__ import annotations

import numpy as np

from mpattn.elements import symbols

__all__ = ["ForceField", "check_structure", "perpendicular_widths"]


def _jax_md():
    """jax-md's space and partition modules (imported late: ``import jax_md`` takes seconds)."""
    try:
        from jax_md import partition, space
    except ImportError as err:  # pragma: no cover - the md extra is part of dev
        raise ImportError("JAX-MD dynamics need the jax-md package: pip install -e '.[md]'"
                          ) from err
    return space, partition


class ForceField:
    """Energies and forces of one system (fixed atoms and cell) for jax-md.

    Args:
        potentials: an :class:`~mpattn.potential.Potential` or a sequence of them (an
            ensemble: the force field is their mean).
        atoms: the system: ``ase.Atoms`` (molecule, or a cell periodic in all three
            directions).
        cutoff: graph radius in Å (default: the largest of the members' ``graph_cutoff`` /
            ``cutoff``).
        skin: the neighbour list holds pairs within ``cutoff + skin`` and is rebuilt when an
            atom has moved more than ``skin / 2`` (jax-md's ``dr_threshold``).
        capacity_multiplier: headroom of the list's static capacity. Every listed pair costs
            the model as much as a pair within the cutoff, so a small skin and headroom pay:
            on 1,000 waters (2 CPU cores) 0.5 Å / 1.25 took 96 ms per step, 0.3 Å / 1.1 77 ms
            (rebuilds included); an overflow costs one recompile.
        dtype: compute dtype (default the parameters', float32; ``"float64"`` needs
            ``jax.config.update("jax_enable_x64", True)`` first).
        min_distance: atoms closer than this (Å) are refused as overlapping.

    Raises:
        ValueError: an element some member never saw, overlapping atoms, mixed periodicity, a
            cell too small for ``cutoff + skin`` (minimum image), or a non-smooth model.
    """

    def __init__(self, potentials, atoms, *, cutoff: float | None = None, skin: float = 0.3,
                 capacity_multiplier: float = 1.15, dtype=None, min_distance: float = 0.5):
        import jax
        import jax.numpy as jnp
        from flax import nnx

        from mpattn.potential import Potential

        space, partition = _jax_md()
        members = [potentials] if isinstance(potentials, Potential) else list(potentials)
        if not members or not all(isinstance(p, Potential) for p in members):
            raise TypeError("ForceField needs a Potential or a sequence of Potentials")
        if not skin >= 0 or not capacity_multiplier >= 1:
            raise ValueError(f"need skin >= 0 and capacity_multiplier >= 1, got {skin}, "
                             f"{capacity_multiplier}")
        self.members = members
        self.z = np.asarray(atoms.get_atomic_numbers(), np.int32)
        self.n = len(self.z)
        if self.n < 1:
            raise ValueError("ForceField needs at least one atom")
        self.masses = np.asarray(atoms.get_masses(), np.float64)
        known = set(members[0].elements).intersection(*(p.elements for p in members[1:]))
        cutoffs = []
        for p in members:
            config = getattr(p.model, "config", None)
            if getattr(config, "smooth", True) is False:
                raise ValueError("this attention model has smooth=False: its plain softmax "
                                 "depends on every edge of the graph, but a JAX-MD neighbour "
                                 "list also holds pairs in the skin beyond the cutoff; use the "
                                 "ASE engine (mpattn.ase.Calculator)")
            c = getattr(config, "graph_cutoff", getattr(config, "cutoff", None))
            if c is not None:
                cutoffs.append(float(c))
        if cutoff is None:
            if not cutoffs:
                raise ValueError("the potential's model has no config.cutoff: pass cutoff=")
            cutoff = max(cutoffs)
        self.cutoff, self.skin = float(cutoff), float(skin)

        check_structure(atoms, known, self.cutoff + self.skin, min_distance)
        pbc = np.asarray(atoms.get_pbc(), bool)
        self.periodic = bool(pbc.all())
        self.cell = np.asarray(atoms.get_cell(), np.float64) if self.periodic else None

        # parameters cast to the compute dtype, merged inside the traced functions
        self._graphdefs, self._leaves, self._treedefs = [], [], []
        for p in members:
            graphdef, state = nnx.split(p)
            leaves, treedef = jax.tree.flatten(state)
            floats = [x for x in leaves if jnp.issubdtype(x.dtype, jnp.floating)]
            if dtype is None:
                dtype = floats[0].dtype if floats else jnp.float32
            self._graphdefs.append(graphdef)
            self._treedefs.append(treedef)
            self._leaves.append([x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating)
                                 else x for x in leaves])
        self.dtype = np.dtype(dtype)
        if self.dtype == np.float64 and not jax.config.jax_enable_x64:
            raise ValueError("dtype float64 needs jax.config.update('jax_enable_x64', True) "
                             "before the ForceField is made")
        # float64 host reference of each member; the ensemble's is their mean
        self.member_reference = np.array([float(p.reference.energy(self.z, [self.n])[0])
                                          for p in members])
        self.reference_energy = float(self.member_reference.mean())

        if self.periodic:
            orthorhombic = np.allclose(self.cell, np.diag(np.diag(self.cell)), atol=1e-10)
            if orthorhombic:
                side = np.diag(self.cell).astype(self.dtype)
                self.displacement, self.shift = space.periodic(jnp.asarray(side))
                box, cell_list = jnp.asarray(side), True
            else:  # jax-md's cell list wants fractional coordinates there: all pairs instead
                box = jnp.asarray(self.cell.T.astype(self.dtype))
                self.displacement, self.shift = space.periodic_general(
                    box, fractional_coordinates=False)
                cell_list = False
        else:
            self.displacement, self.shift = space.free()
            box, cell_list = 1.0, False
        self.neighbor_fn = partition.neighbor_list(
            self.displacement, box, self.cutoff, dr_threshold=self.skin,
            capacity_multiplier=capacity_multiplier, disable_cell_list=not cell_list,
            format=partition.OrderedSparse)
        self._z_padded = np.concatenate([self.z, [0]]).astype(np.int32)

    # ------------------------------------------------------------------ neighbour list

    def wrap(self, positions):
        """Positions as the jax-md space keeps them (wrapped into the cell if periodic)."""
        import jax.numpy as jnp

        r = jnp.asarray(np.asarray(positions, np.float64), self.dtype)
        if not self.periodic:
            return r
        return self.shift(r, jnp.zeros_like(r))

    def allocate(self, positions, extra_capacity: int = 0):
        """A new jax-md neighbour list for ``positions`` (host call; sizes its capacity)."""
        return self.neighbor_fn.allocate(self.wrap(positions), extra_capacity=extra_capacity)

    # ------------------------------------------------------------------ traced functions

    def graph(self, positions, neighbor):
        """The padded graph of ``positions`` [N, 3] from a jax-md OrderedSparse ``neighbor``
        list (jit-able; see the module docstring)."""
        import jax
        import jax.numpy as jnp
        import jraph

        n, dtype = self.n, positions.dtype
        recv, send = neighbor.idx[0], neighbor.idx[1]
        capacity = recv.shape[0]
        senders = jnp.stack([send, recv], axis=1).reshape(-1)
        receivers = jnp.stack([recv, send], axis=1).reshape(-1)
        real = senders < n
        num_real = jnp.sum(real).astype(jnp.int32)
        pos = jnp.concatenate([positions, jnp.zeros((1, 3), dtype)])
        if self.periodic:
            diff = pos[senders] - pos[receivers]
            image = jax.vmap(self.displacement)(pos[senders], pos[receivers])
            shift = jax.lax.stop_gradient(jnp.where(real[:, None], image - diff, 0))
        else:
            shift = jnp.zeros((2 * capacity, 3), dtype)
        cells = np.zeros((2, 3, 3), self.dtype)
        if self.periodic:
            cells[0] = self.cell
        return jraph.GraphsTuple(
            nodes={"z": jnp.asarray(self._z_padded), "positions": pos,
                   "features": jnp.zeros((n + 1, 0), jnp.float32)},
            edges={"bond": jnp.where(real, 4, 0).astype(jnp.int32), "shift": shift,
                   "pair": jnp.arange(2 * capacity, dtype=jnp.int32) // 2},
            senders=senders.astype(jnp.int32), receivers=receivers.astype(jnp.int32),
            n_node=jnp.array([n, 1], jnp.int32),
            n_edge=jnp.stack([num_real, 2 * capacity - num_real]).astype(jnp.int32),
            globals={"cell": jnp.asarray(cells)})

    def _member_energy(self, m: int, graph):
        import jax
        from flax import nnx

        pot = nnx.merge(self._graphdefs[m], jax.tree.unflatten(self._treedefs[m],
                                                                self._leaves[m]))
        return pot(graph, reference=False)["energy"][0]

    def energy(self, positions, neighbor=None, **unused):
        """The network energy (eV, without the constant reference): the members' mean.
        jax-md's integrators call it with ``neighbor=``."""
        if neighbor is None:
            raise TypeError("ForceField.energy needs neighbor= (a jax-md neighbour list)")
        graph = self.graph(positions, neighbor)
        total = sum(self._member_energy(m, graph) for m in range(len(self.members)))
        return total / len(self.members)

    def member_forces(self, positions, neighbor):
        """``(energies [M], forces [M, N, 3])`` of every member (network part; jit-able)."""
        import jax
        import jax.numpy as jnp

        out = [jax.value_and_grad(lambda r, m=m: self._member_energy(
            m, self.graph(r, neighbor)))(positions) for m in range(len(self.members))]
        return jnp.stack([e for e, _ in out]), -jnp.stack([g for _, g in out])

    def needs_rebuild(self, positions, neighbor):
        """Whether some atom moved more than ``skin / 2`` since the list was built (jax-md's
        criterion; jit-able). Under ``vmap`` jax-md's own ``update`` turns its ``lax.cond``
        into a select that rebuilds every step: callers decide with this outside the vmap."""
        import jax
        import jax.numpy as jnp

        d = jax.vmap(self.displacement)(positions, neighbor.reference_position)
        return jnp.max(jnp.sum(d * d, axis=-1)) > (self.skin / 2) ** 2

    def min_distance(self, positions, neighbor):
        """The shortest distance between listed pairs (``inf`` if none; jit-able)."""
        import jax
        import jax.numpy as jnp

        recv, send = neighbor.idx[0], neighbor.idx[1]
        real = send < self.n
        pos = jnp.concatenate([positions, jnp.zeros((1, 3), positions.dtype)])
        d = jnp.linalg.norm(jax.vmap(self.displacement)(pos[send], pos[recv]), axis=-1)
        return jnp.min(jnp.where(real, d, jnp.inf))

    # ------------------------------------------------------------------ eager helpers

    def energy_forces(self, positions=None, *, members: bool = False):
        """Eager ``(energy eV incl. the reference, forces [N, 3])`` in float64 numpy; with
        ``members=True`` also ``(energies [M], forces [M, N, 3])`` of each member (with its
        own reference). A fresh neighbour list is allocated: for tests and one-off checks."""
        import jax

        r = self.wrap(positions)
        nbr = self.allocate(r)
        e, f = jax.jit(self.member_forces)(r, nbr)
        e = np.asarray(e, np.float64) + self.member_reference
        f = np.asarray(f, np.float64)
        if members:
            return float(e.mean()), f.mean(axis=0), e, f
        return float(e.mean()), f.mean(axis=0)


def perpendicular_widths(cell) -> np.ndarray:
    """The distances between opposite faces of a cell [3, 3] (rows = lattice vectors), Å."""
    cell = np.asarray(cell, np.float64)
    volume = abs(np.linalg.det(cell))
    return np.array([volume / np.linalg.norm(np.cross(cell[(i + 1) % 3], cell[(i + 2) % 3]))
                     for i in range(3)])



def check_structure(atoms, elements, reach: float, min_distance: float = 0.5,
                    name: str = "the structure") -> None:
    """Refuses what a potential cannot run: an element outside ``elements``, mixed
    periodicity, a periodic cell whose perpendicular widths are not above ``2 * reach``
    (minimum image), atoms closer than ``min_distance`` Å. ``name`` starts the messages."""
    from mpattn.neighbors import radius_edges

    z = np.asarray(atoms.get_atomic_numbers())
    unknown = sorted(set(z.tolist()) - set(elements))
    if unknown:
        raise ValueError(f"{name}: element(s) {symbols(unknown)} unknown to the potential "
                         f"(it knows {symbols(sorted(elements))})")
    pbc = np.asarray(atoms.get_pbc(), bool)
    if pbc.any() and not pbc.all():
        raise ValueError(f"{name}: mixed periodicity (pbc={pbc.tolist()}) is not supported: "
                         "use a molecule (no pbc) or a cell periodic in all three directions")
    cell = np.asarray(atoms.get_cell(), np.float64) if pbc.all() else None
    if cell is not None:
        widths = perpendicular_widths(cell)
        if not np.all(reach < widths / 2):
            raise ValueError(
                f"{name}: cell too small for the cutoff: cutoff + skin = {reach:.3g} Å must "
                f"be below half of each of the cell's perpendicular widths "
                f"{np.round(widths, 3).tolist()} Å (minimum image); make a supercell "
                "(atoms.repeat) or use the ASE engine")
    if min_distance > 0 and len(z) > 1:
        pos = np.asarray(atoms.get_positions(), np.float64)
        s, r, sh = radius_edges(pos, min_distance, cell, None if cell is None else pbc)
        if len(s):
            d = np.linalg.norm(pos[s] - pos[r] + sh, axis=1)
            k = int(np.argmin(d))
            raise ValueError(f"{name}: atoms {int(r[k])} and {int(s[k])} overlap: {d[k]:.3f} Å "
                             f"apart (below min_distance={min_distance} Å)")
