"""ASE calculator for trained potentials: energy, free energy, forces and (periodic cells)
stress of any structure.

``Calculator(workdir)`` loads a trained potential with :func:`mpattn.load_run`;
:meth:`Calculator.from_potential` wraps one in
memory. Each evaluation builds the structure's radius graph with
:func:`mpattn.neighbors.neighbor_graph` (vesin; periodic cells included), padded to a budget
with headroom from :class:`mpattn.neighbors.BudgetPolicy`, and calls one jit-compiled
:func:`mpattn.potential.energy_forces_stress` per budget (energy, forces and stress come
from one gradient, so every property is computed at once): MD steps, cell relaxations and
structures of other sizes that fit the budget reuse the compiled function; a structure that
overflows it grows the budget once (counted in :attr:`Calculator.budget_growths`, logged on
``"mpattn"``).

Stress (``σ = (1/V) ∂E/∂ε``, the strain derivative of the energy, ASE's sign and Voigt order,
eV/Å³) is reported for cells periodic in all three directions (what ``FrechetCellFilter``
relaxations and NPT dynamics ask for); asking it of a molecule raises ASE's
``PropertyNotImplementedError``.

The per-element reference energy ``Σ_e n_e E_e`` is added on the host in float64 (the network
part is computed in the model's dtype): in float32 a total energy of a few thousand eV would
otherwise be rounded to ~0.5 meV, which is visible in NVE energy-conservation tests. It
depends on the atom counts only, not on the strain, so the stress needs no correction.

Example::

    from ase.build import molecule
    from mpattn.ase import Calculator

    atoms = molecule("CH3CH2OH")
    atoms.calc = Calculator("runs/ethanol")
    atoms.get_potential_energy(), atoms.get_forces()
    # atoms.get_stress() (Voigt [6], eV/Å³) once atoms has a cell and pbc=True
"""

from __future__ import annotations

import numpy as np
from ase.calculators.calculator import Calculator as _AseCalculator
from ase.calculators.calculator import PropertyNotImplementedError, all_changes
from ase.stress import full_3x3_to_voigt_6_stress

from mpattn.elements import symbols
from mpattn.neighbors import BudgetPolicy, neighbor_graph

__all__ = ["Calculator"]


class Calculator(_AseCalculator):
    """An ``ase`` calculator for an :class:`mpattn.potential.Potential`.

    Results: ``energy`` = ``free_energy`` (eV, float), ``forces`` (eV/Å, float64 [n, 3]) and,
    for cells periodic in all three directions, ``stress`` (eV/Å³, float64 Voigt [6]: xx, yy,
    zz, yz, xz, xy, as ASE orders it).

    Args:
        workdir: a training run's directory (read by
            :func:`mpattn.load_run`).
        which: which checkpoint, ``"best"`` (lowest validation force MAE) or ``"latest"``.
        dtype: compute dtype of the network (``None``: the parameters' dtype, float32;
            ``"float64"`` needs ``jax.config.update("jax_enable_x64", True)`` first).
        cutoff: radius-graph cutoff in Å (default the model config's ``graph_cutoff`` if it
            has one, else its ``cutoff``).
        policy: the :class:`~mpattn.neighbors.BudgetPolicy` (default headroom otherwise).
        **kwargs: passed to ``ase.calculators.calculator.Calculator``.

    Attributes:
        potential: the wrapped potential.
        cutoff: the radius in Å.
        elements: atomic numbers the potential knows (others raise ValueError).
        dtype: numpy dtype of positions and parameters in the compiled function.
        compiles: number of distinct shapes compiled so far (1 for an MD run that never
            outgrows its first budget).
        budget_growths: how many times the padding budget grew.
    """

    implemented_properties = ["energy", "free_energy", "forces", "stress"]

    def __init__(self, workdir=None, *, which: str = "best", dtype=None,
                 cutoff: float | None = None, policy: BudgetPolicy | None = None,
                 potential=None, **kwargs):
        if (workdir is None) == (potential is None):
            raise TypeError("Calculator needs a workdir (or use Calculator.from_potential)")
        _AseCalculator.__init__(self, **kwargs)
        if potential is None:
            from mpattn.potential import Potential
            from mpattn.train.runs import load_run

            potential = load_run(workdir, which=which)
            if not isinstance(potential, Potential):
                raise ValueError(f"{workdir} is a property model's run, not a potential's: "
                                 "predict with mpattn.load_run(workdir)(atoms)")
        self._setup(potential, dtype, cutoff, policy)

    @classmethod
    def from_potential(cls, potential, *, dtype=None, cutoff: float | None = None,
                       policy: BudgetPolicy | None = None, **kwargs) -> Calculator:
        """A calculator for an in-memory :class:`~mpattn.potential.Potential`."""
        return cls(potential=potential, dtype=dtype, cutoff=cutoff, policy=policy, **kwargs)

    # ------------------------------------------------------------------ setup

    def _setup(self, potential, dtype, cutoff, policy) -> None:
        import jax
        import jax.numpy as jnp
        from flax import nnx

        from mpattn.potential import Potential, energy_forces_stress

        if not isinstance(potential, Potential):
            raise TypeError(f"Calculator needs an mpattn Potential, got {type(potential)}")
        if cutoff is None:
            config = getattr(potential.model, "config", None)
            cutoff = getattr(config, "graph_cutoff", getattr(config, "cutoff", None))
            if cutoff is None:
                raise ValueError("the potential's model has no config.cutoff: pass cutoff=")
        self.potential = potential
        self.cutoff = float(cutoff)
        self.policy = policy or BudgetPolicy()
        self.elements = tuple(int(e) for e in potential.elements)
        ref = potential.reference  # float64 host copy: the reference is added on the host
        self._ref_table = np.zeros(max(self.elements) + 1, np.float64)
        self._ref_table[list(self.elements)] = ref.energies

        graphdef, state = nnx.split(potential)
        leaves, treedef = jax.tree.flatten(state)
        floats = [x for x in leaves if jnp.issubdtype(x.dtype, jnp.floating)]
        if dtype is None:
            dtype = floats[0].dtype if floats else jnp.float32
        dtype = jnp.dtype(dtype)
        if dtype == jnp.float64 and not jax.config.jax_enable_x64:
            raise ValueError("dtype float64 needs jax.config.update('jax_enable_x64', True) "
                             "before the Calculator is made")
        self.dtype = np.dtype(dtype)
        self._leaves = [x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
                        for x in leaves]

        def mpattn_energy_forces_stress(leaves, graph):
            pot = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
            return energy_forces_stress(pot, graph, reference=False)

        self._fn = jax.jit(mpattn_energy_forces_stress)
        self._shapes: set = set()

    @property
    def compiles(self) -> int:
        """Number of distinct graph shapes the energy function was compiled for."""
        return len(self._shapes)

    @property
    def budget_growths(self) -> int:
        """How many times the padding budget grew (each one recompiled once)."""
        return self.policy.growths

    @property
    def budget(self):
        """The current :class:`~mpattn.graph.Budget` (``None`` before the first call)."""
        return self.policy.budget

    # ------------------------------------------------------------------ evaluation

    def check_elements(self, numbers) -> None:
        """Raises ValueError naming elements the potential never saw (no JAX call)."""
        z = np.unique(np.asarray(numbers, np.int64))
        unknown = [int(v) for v in z if int(v) not in self.elements]
        if unknown:
            raise ValueError(f"mpattn Calculator: element(s) {symbols(unknown)} unknown to "
                             f"this potential, which knows {symbols(self.elements)}")

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        """Energy, free energy (equal), forces and, for a periodic cell, stress of ``atoms``
        (ase calls this).

        Raises:
            PropertyNotImplementedError: ``"stress"`` asked of a structure that is not
                periodic in all three directions.
        """
        _AseCalculator.calculate(self, atoms, properties, system_changes)
        atoms = self.atoms
        periodic = bool(np.all(atoms.pbc))
        if "stress" in properties and not periodic:
            raise PropertyNotImplementedError(
                "mpattn Calculator: stress needs a cell periodic in all three directions "
                f"(pbc={atoms.pbc.tolist()}); a molecule or slab has no volume to divide by")
        z = atoms.get_atomic_numbers()
        self.check_elements(z)
        graph, budget = neighbor_graph(atoms, self.cutoff, self.policy.budget,
                                       policy=self.policy, dtype=self.dtype)
        self._shapes.add((budget.n_node, budget.n_edge, budget.n_graph))
        energy, forces, stress = self._fn(self._leaves, graph)
        n = len(atoms)
        e = float(np.asarray(energy)[0]) + float(self._ref_table[z].sum())
        self.results = {
            "energy": e,
            "free_energy": e,
            "forces": np.asarray(forces, np.float64)[:n].copy(),
        }
        if periodic:
            self.results["stress"] = full_3x3_to_voigt_6_stress(
                np.asarray(stress, np.float64)[0])
