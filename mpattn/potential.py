"""Any per-atom model as an interatomic potential: energy, forces by ``jax.grad``, and the
per-element reference energies.

- :class:`Potential` wraps a model whose outputs hold ``"per_atom"`` [num_nodes]
  (docs/design.md, "Output contract") and adds a per-element reference:
  ``E(R) = scale · Σ_i o_i(R) + Σ_e n_e E_e`` (the linear energy correction of SO3krates and
  apax, fitted by least squares with :func:`fit_reference` before training). ``E_e`` and
  ``scale`` are non-trainable ``nnx.Variable`` state: they survive ``nnx.split``/``merge`` and
  checkpoints of ``nnx.state(potential)``, and stay out of ``nnx.split(m, nnx.Param, ...)``.
- :func:`energy_and_forces`: ``F = -∂E/∂R`` by ``jax.grad`` through ``nodes["positions"]``;
  models recompute distances from positions (and the constant ``edges["shift"]``).
- :func:`energy_forces_stress`: the same forces and the stress ``σ = (1/V) ∂E/∂ε`` from one
  gradient through the positions and a per-graph symmetric strain ``ε`` that deforms the
  positions and the image shifts alike (``r -> r (I + ε)``); the volume from
  ``globals["cell"]``, stress 0 where it is 0 (molecules, padding).

Graphs must be padded as jraph does (every batch of the library is): the last graph holding
nodes is the padding graph, whose energy is 0 and whose nodes get zero force.

Reference: Frank, Unke & Müller, "So3krates", NeurIPS 2022 (linear energy correction);
Schütt et al., J. Chem. Phys. 148, 241722 (2018) (per-atom energies); Nielsen & Martin,
Phys. Rev. B 32, 3780 (1985) (stress as the strain derivative of the energy).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import jraph
import numpy as np
from flax import nnx
from jaxtyping import Array, Float

from mpattn.elements import as_atomic_numbers, element_counts, fit_linear_reference, symbols
from mpattn.graph import graph_mask, node_mask
from mpattn.nn.readout import sum_readout
from mpattn.ops import graph_index

__all__ = [
    "Potential",
    "Reference",
    "ReferenceState",
    "energy_and_forces",
    "energy_forces_stress",
    "fit_reference",
]


@dataclass(frozen=True, eq=False)
class Reference:
    """Per-element reference energies ``E_e`` (eV) and the output scale of a potential.

    Attributes:
        elements: atomic numbers.
        energies: float64 [len(elements)] reference energy of each element (eV per atom).
        scale: factor on the network's per-atom outputs (eV per output unit).
    """

    elements: tuple[int, ...]
    energies: np.ndarray
    scale: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "elements", as_atomic_numbers(self.elements))
        object.__setattr__(self, "energies", np.asarray(self.energies, np.float64).ravel())
        if self.energies.shape != (len(self.elements),) or not self.scale > 0:
            raise ValueError(f"Reference: {self.energies.shape[0]} energies for "
                             f"{len(self.elements)} elements, scale {self.scale}")

    def energy(self, z, n_node) -> np.ndarray:
        """Host-side float64 ``Σ_e n_e E_e`` [num_structures] (z concatenated, no padding)."""
        return element_counts(z, n_node, self.elements) @ self.energies

    def to_dict(self) -> dict:
        """JSON-able form (exact: JSON writes float64 by round-trip ``repr``)."""
        return {"elements": list(self.elements), "energies": self.energies.tolist(),
                "scale": float(self.scale)}

    @classmethod
    def from_dict(cls, d: dict) -> Reference:
        """Inverse of :meth:`to_dict`."""
        return cls(tuple(d["elements"]), np.asarray(d["energies"]), d["scale"])


def fit_reference(z_list_or_counts, energies, elements, *, forces=None) -> Reference:
    """Least-squares per-element energies ``E ≈ Σ_e n_e E_e`` (numpy float64, no intercept:
    a per-molecule constant is not size-extensive and is collinear with the counts whenever
    the composition is fixed, as in an MD trajectory).

    Args:
        z_list_or_counts: a list (or tuple) of int arrays, the atomic numbers of each
            structure, or a 2-d array of counts [num_structures, len(elements)].
        energies: float [num_structures] (eV).
        elements: atomic numbers (or symbols), the columns of the counts.
        forces: optional float [total_atoms, 3] of the same structures.

    Returns:
        A :class:`Reference` whose ``scale`` (network output units) is the RMS force component
        if ``forces`` are given (as NequIP/MACE scale), else the standard deviation of the
        residual energies; 1 if that is 0. An element no structure holds gets ``E_e = 0``.
    """
    elements = as_atomic_numbers(elements)
    y = np.asarray(energies, np.float64).ravel()
    if isinstance(z_list_or_counts, (list, tuple)):
        zs = [np.asarray(z, np.int64).ravel() for z in z_list_or_counts]
        counts = element_counts(np.concatenate(zs) if zs else [], [len(z) for z in zs],
                                elements)
    else:
        counts = np.asarray(z_list_or_counts, np.float64)
        if counts.shape != (len(y), len(elements)):
            raise ValueError(f"counts must have shape ({len(y)}, {len(elements)}), got "
                             f"{counts.shape}; pass atomic numbers as a list of 1-d arrays")
    coef, _ = fit_linear_reference(counts, y, intercept=False)
    if forces is not None:
        scale = float(np.sqrt(np.mean(np.square(np.asarray(forces, np.float64)))))
    else:
        scale = float(np.std(y - counts @ coef))
    return Reference(elements, coef, scale if scale > 1e-12 else 1.0)


class ReferenceState(nnx.Variable):
    """Non-trainable state of a :class:`Potential` (reference energies, output scale)."""


class Potential(nnx.Module):
    """Any per-atom model as a potential: ``E = scale · Σ_i o_i + Σ_e n_e E_e``.

    Args:
        model: an NNX module whose ``model(graph)`` returns the output mapping with
            ``"per_atom"`` [num_nodes] (docs/design.md).
        elements: atomic numbers (or symbols) the potential knows; default the reference's.
        reference: a :class:`Reference` (default: ``E_e = 0``, ``scale = 1``).

    The per-element energies live in a table indexed by Z (NaN for elements outside
    ``elements``: such atoms give NaN energies; :meth:`check` raises eagerly). In float32 the
    reference sum is rounded at ~1e-7 relative; for meV-exact absolute energies compute it on
    the host with ``potential.reference.energy(z, n_node)`` (float64) and call the potential
    with ``reference=False``, as the trainer and the ASE calculator do.
    """

    def __init__(self, model: nnx.Module, *, elements: Sequence[int | str] | None = None,
                 reference: Reference | None = None):
        if elements is None and reference is None:
            raise ValueError("Potential needs elements or a reference")
        self.model = model
        self.elements = as_atomic_numbers(reference.elements if elements is None else elements)
        table = np.full(max(self.elements) + 1, np.nan)
        table[0] = 0.0  # what jraph padding nodes (z = 0) read
        table[list(self.elements)] = 0.0
        self.table = ReferenceState(jnp.asarray(table))
        self.scale = ReferenceState(jnp.asarray(1.0))
        if reference is not None:
            self.set_reference(reference)

    def set_reference(self, reference: Reference) -> None:
        """Install fitted reference energies and scale (elements must match)."""
        if as_atomic_numbers(reference.elements) != self.elements:
            raise ValueError(f"reference elements {reference.elements} differ from the "
                             f"potential's {self.elements}")
        table = np.asarray(self.table[...], np.float64).copy()
        table[list(self.elements)] = reference.energies
        self.table[...] = jnp.asarray(table, self.table[...].dtype)
        self.scale[...] = jnp.asarray(reference.scale, self.scale[...].dtype)

    @property
    def reference(self) -> Reference:
        """The installed reference (float64 copies of the stored values)."""
        table = np.asarray(self.table[...], np.float64)
        return Reference(self.elements, table[list(self.elements)], float(self.scale[...]))

    def check(self, graph: jraph.GraphsTuple) -> None:
        """Eager checks: elements known to the potential (and the model's own checks)."""
        z = np.asarray(graph.nodes["z"])[np.asarray(node_mask(graph))]
        unknown = sorted(set(np.unique(z).tolist()) - set(self.elements))
        if unknown:
            raise ValueError(f"elements {symbols(unknown)} unknown to this potential (trained "
                             f"on {symbols(self.elements)})")
        if hasattr(self.model, "check"):
            self.model.check(graph)

    def __call__(self, graph: jraph.GraphsTuple, *, reference: bool = True
                 ) -> dict[str, Array]:
        """The output mapping: ``"energy"`` [num_graphs] and ``"per_atom"`` [num_nodes] in eV
        (padding gives 0), and any other output of the model (``"charges"``, ``"noise"``).

        ``reference=False`` leaves out ``Σ_e n_e E_e`` (the scaled network part only).
        """
        out = self.model(graph)
        atom = out.get("per_atom")
        if atom is None or atom.ndim != 1:
            raise ValueError("a potential needs a model whose outputs hold 'per_atom' "
                             f"[num_nodes] (a sum readout), got {sorted(out)}")
        atom = atom * self.scale[...].astype(atom.dtype)
        if reference:
            z = jnp.asarray(graph.nodes["z"]).astype(jnp.int32)
            atom = atom + jnp.take(self.table[...], z, mode="fill", fill_value=jnp.nan)
        atom = jnp.where(node_mask(graph), atom, 0)
        return {**out, "energy": sum_readout(atom, jnp.asarray(graph.n_node)), "per_atom": atom}


def energy_and_forces(potential, graph: jraph.GraphsTuple, *, reference: bool = True
                      ) -> tuple[Float[Array, " num_graphs"], Float[Array, "num_nodes 3"]]:
    """Energies and forces ``F = -∂E/∂R`` of a padded batch (pure; jit it as you like).

    The gradient is taken of the sum of the real graphs' energies with respect to
    ``nodes["positions"]``; ``edges["shift"]`` (periodic images) is a constant. Padding
    graphs report energy 0 and padding nodes force 0. Dtype follows the positions (float64
    with ``jax_enable_x64`` and float64 positions).

    Args:
        potential: a :class:`Potential`, or any ``fn(graph)`` returning an output mapping
            with ``"energy"`` [num_graphs].
        graph: a jraph-padded batch.
        reference: passed to a :class:`Potential` (add the per-element reference).
    """
    energy, forces, _ = _energy_gradients(potential, graph, reference=reference, strain=False)
    return energy, forces


def energy_forces_stress(potential, graph: jraph.GraphsTuple, *, reference: bool = True
                         ) -> tuple[Float[Array, " num_graphs"], Float[Array, "num_nodes 3"],
                                    Float[Array, "num_graphs 3 3"]]:
    """Energies, forces and stress ``σ = (1/V) ∂E/∂ε`` of a padded batch (pure, jit-able).

    One gradient pass, with respect to the positions and to a symmetric strain ``ε_g``
    [num_graphs, 3, 3] at 0 applied to each graph as ``r -> r (I + ε_g)`` on the positions
    of its nodes *and* on the image shifts of its edges (the cell deforms with the atoms, as
    ASE's ``set_cell(cell @ (I + ε), scale_atoms=True)``). The sign is ASE's: positive
    stress is tensile, ``atoms.get_stress()`` (without the ideal-gas term) is the Voigt form
    of ``σ`` in eV/Å³. Forces equal :func:`energy_and_forces`'.

    ``V = |det cell_g|`` from ``graph.globals["cell"]`` [num_graphs, 3, 3] (as
    :func:`mpattn.neighbors.neighbor_graph` gives it). Graphs of volume 0 (molecules, whose
    cell is zero, and padding graphs) get stress 0.

    Args:
        potential: a :class:`Potential`, or any ``fn(graph)`` returning an output mapping
            with ``"energy"`` [num_graphs].
        graph: a jraph-padded batch with ``globals["cell"]``.
        reference: passed to a :class:`Potential` (add the per-element reference; it does not
            depend on the strain).

    Returns:
        ``(energy [num_graphs], forces [num_nodes, 3], stress [num_graphs, 3, 3])``.

    Raises:
        ValueError: if the graph has no ``globals["cell"]`` of shape [num_graphs, 3, 3].
    """
    glob = graph.globals if isinstance(graph.globals, dict) else {}
    num_graphs = jnp.shape(graph.n_node)[0]
    if "cell" not in glob or jnp.shape(glob["cell"]) != (num_graphs, 3, 3):
        raise ValueError("energy_forces_stress needs graph.globals['cell'] of shape "
                         f"({num_graphs}, 3, 3) (zeros for molecules; "
                         "mpattn.neighbors.neighbor_graph adds it), got "
                         f"{jnp.shape(glob['cell']) if 'cell' in glob else 'none'}")
    energy, forces, de_deps = _energy_gradients(potential, graph, reference=reference,
                                                strain=True)
    volume = jnp.abs(jnp.linalg.det(jnp.asarray(glob["cell"]).astype(de_deps.dtype)))
    ok = graph_mask(graph) & (volume > 0)
    safe = jnp.where(ok, volume, 1)  # no 0/0 in either branch
    stress = jnp.where(ok[:, None, None], de_deps / safe[:, None, None], 0)
    return energy, forces, stress


def _energy_gradients(potential, graph: jraph.GraphsTuple, *, reference: bool, strain: bool):
    """``(energy [G], forces [N, 3], ∂E/∂ε [G, 3, 3] or None)`` from one ``value_and_grad``.

    The strain (``strain=True``) is symmetrised inside (``(ε + εᵀ)/2``), so its gradient is
    the symmetric part of the Cartesian one, the derivative for symmetric strains that ASE's
    finite differences take.
    """
    gmask = graph_mask(graph)
    pos = jnp.asarray(graph.nodes["positions"])
    shift = graph.edges.get("shift") if isinstance(graph.edges, dict) else None
    num_graphs = jnp.shape(graph.n_node)[0]
    if strain:  # the graph of each node and edge (static lengths: jit-able)
        node_graph = graph_index(jnp.asarray(graph.n_node), pos.shape[0])
        edge_graph = graph_index(jnp.asarray(graph.n_edge), jnp.shape(graph.senders)[0])

    def total(positions, eps=None):
        nodes, edges = {**graph.nodes, "positions": positions}, graph.edges
        if eps is not None:
            eps = 0.5 * (eps + jnp.swapaxes(eps, -1, -2))
            nodes["positions"] = positions + jnp.einsum("ni,nij->nj", positions,
                                                        eps[node_graph])
            if shift is not None:
                sh = jnp.asarray(shift)
                edges = {**edges, "shift": sh + jnp.einsum(
                    "ei,eij->ej", sh, eps[edge_graph].astype(sh.dtype))}
        g = graph._replace(nodes=nodes, edges=edges)
        out = potential(g, reference=reference) if isinstance(potential, Potential) \
            else potential(g)
        e = jnp.where(gmask, out["energy"], 0)
        return jnp.sum(e), e

    args = (pos, jnp.zeros((num_graphs, 3, 3), pos.dtype)) if strain else (pos,)
    (_, energy), grads = jax.value_and_grad(total, argnums=tuple(range(len(args))),
                                            has_aux=True)(*args)
    forces = jnp.where(node_mask(graph)[:, None], -grads[0], 0)
    return energy, forces, grads[1] if strain else None
