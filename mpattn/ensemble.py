"""An ensemble of trained potentials as one ASE calculator, with their spread as an
uncertainty (query by committee).

A single potential gives no hint that a structure lies outside what it was trained on: its
forces there are as confident as anywhere. Several potentials trained on the same data from
different random initialisations (or data orders, or subsets) agree where the data pinned
them down and disagree where it did not: the spread of their predictions is a cheap,
useful warning of extrapolation, as apax and MACE users run their ensembles in active
learning and MD. :class:`EnsembleCalculator` reports the members' mean energy, forces and
(fully periodic cells) stress, which are also usually more accurate than any one member's,
and their spread: ``energy_std`` (eV), ``forces_std`` per atom and its maximum
``max_forces_std`` (eV/Å), the usual selection criterion.

With ``threshold`` (eV/Å) set, a structure whose ``max_forces_std`` exceeds it is logged as
a WARNING on the ``"mpattn"`` logger and flagged ``results["extrapolating"] = True``, so a
simulation can stop before it trusts a made-up force field::

    from ase import units
    from ase.md.verlet import VelocityVerlet
    from mpattn.ensemble import EnsembleCalculator

    calc = EnsembleCalculator(["runs/a", "runs/b", "runs/c"], threshold=0.5)
    atoms.calc = calc
    dyn = VelocityVerlet(atoms, timestep=0.5 * units.fs)
    for _ in dyn.irun(10_000):  # ASE's step-by-step run: stop when the members disagree
        if calc.results["extrapolating"]:
            print(f"stopped at step {dyn.nsteps}: force spread "
                  f"{calc.results['max_forces_std']:.2f} eV/Å")
            break

Implementation: one :class:`mpattn.ase.Calculator` per member (each with its own radius
graph, padding budget and jit-compiled function), evaluated one after the other. It is
simple and correct for members of different cutoffs, sizes or architectures; the neighbour
list, built once per member, costs little next to the network for molecules.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from ase.calculators.calculator import Calculator as _AseCalculator
from ase.calculators.calculator import PropertyNotImplementedError, all_changes

from mpattn.elements import symbols

__all__ = ["EnsembleCalculator"]

logger = logging.getLogger("mpattn")


class EnsembleCalculator(_AseCalculator):
    """An ``ase`` calculator over M >= 2 trained potentials: their mean and their spread.

    Results (members ``m = 1..M``, atoms ``i``):

    - ``energy`` = ``free_energy``: the members' mean energy (eV, float);
      ``forces``: their mean forces (eV/Å, float64 [n, 3]); ``stress``: their mean stress
      (eV/Å³, Voigt [6]) for cells periodic in all three directions (a molecule raises
      ASE's ``PropertyNotImplementedError``, as :class:`mpattn.ase.Calculator` does).
    - ``energy_std``: the standard deviation of the members' energies (eV, ``ddof=0``).
    - ``forces_std``: float64 [n], per atom ``sqrt(mean_m |F_mi - mean_m F_mi|²)`` (eV/Å);
      ``max_forces_std``: its maximum over the atoms (0 for no atoms).
    - ``energies``: float64 [M], each member's energy; ``forces_members``: float64
      [M, n, 3], each member's forces.
    - ``extrapolating``: ``max_forces_std > threshold`` (always False without a threshold).

    Args:
        workdirs: training runs' directories (each read by :func:`mpattn.load_run`), or
        potentials: in-memory :class:`~mpattn.potential.Potential` s (one of the two).
        which: which checkpoint of each run, ``"best"`` or ``"latest"``.
        dtype: compute dtype of every member (see :class:`mpattn.ase.Calculator`).
        cutoff: radius-graph cutoff in Å for every member (default: each member's own).
        threshold: force spread (eV/Å) above which a structure is flagged as extrapolating
            and a WARNING is logged on ``"mpattn"`` (default None: never).
        **kwargs: passed to ``ase.calculators.calculator.Calculator``.

    Attributes:
        members: the :class:`mpattn.ase.Calculator` of each member; names: their workdirs
            (or ``"member i"``).
        elements: the atomic numbers every member knows (the intersection); an atom of
            another element raises ValueError naming it.
        threshold: as given.

    Raises:
        TypeError: neither or both of ``workdirs`` and ``potentials``.
        ValueError: fewer than two members, a workdir given twice, a workdir that is not a
            potential's run, or members sharing no element.
    """

    implemented_properties = ["energy", "free_energy", "forces", "stress", "energy_std",
                              "forces_std", "max_forces_std", "energies", "forces_members",
                              "extrapolating"]

    def __init__(self, workdirs=None, *, potentials=None, which: str = "best", dtype=None,
                 cutoff: float | None = None, threshold: float | None = None, **kwargs):
        from mpattn.ase import Calculator

        if (workdirs is None) == (potentials is None):
            raise TypeError("EnsembleCalculator needs workdirs or potentials= (one of them)")
        sources = list(workdirs if workdirs is not None else potentials)
        if len(sources) < 2:
            raise ValueError(f"an ensemble needs at least 2 members, got {len(sources)}: "
                             "its spread is the uncertainty (use mpattn.ase.Calculator for "
                             "one potential)")
        if threshold is not None and not threshold > 0:
            raise ValueError(f"threshold must be a force spread > 0 eV/Å, got {threshold}")
        _AseCalculator.__init__(self, **kwargs)
        if workdirs is not None:
            seen: set = set()
            for w in sources:
                if Path(w).resolve() in seen:
                    raise ValueError(f"{w} is given twice: it would count double in the "
                                     "mean and shrink the spread")
                seen.add(Path(w).resolve())
            self.names = [str(w) for w in sources]
            self.members = [Calculator(w, which=which, dtype=dtype, cutoff=cutoff)
                            for w in sources]
        else:
            self.names = [f"member {i}" for i in range(len(sources))]
            self.members = [Calculator.from_potential(p, dtype=dtype, cutoff=cutoff)
                            for p in sources]
        common = set(self.members[0].elements)
        for m in self.members[1:]:
            common &= set(m.elements)
        if not common:
            raise ValueError("the members share no element: " + "; ".join(
                f"{n} knows {symbols(m.elements)}" for n, m in zip(self.names, self.members,
                                                                   strict=True)))
        self.elements = tuple(sorted(common))
        self.threshold = None if threshold is None else float(threshold)

    def __repr__(self) -> str:
        return (f"EnsembleCalculator({len(self.members)} members, elements "
                f"{symbols(self.elements)}, threshold={self.threshold})")

    def check_elements(self, numbers) -> None:
        """Raises ValueError naming elements not every member knows (no JAX call)."""
        z = np.unique(np.asarray(numbers, np.int64))
        unknown = [int(v) for v in z if int(v) not in self.elements]
        if unknown:
            who = "; ".join(f"{n} knows {symbols(m.elements)}"
                            for n, m in zip(self.names, self.members, strict=True)
                            if set(unknown) - set(m.elements))
            raise ValueError(f"mpattn EnsembleCalculator: element(s) {symbols(unknown)} "
                             f"not known to every member (the ensemble knows "
                             f"{symbols(self.elements)}; {who})")

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        """Every member's energy, forces (and stress) of ``atoms``, their mean and spread
        (ase calls this).

        Raises:
            ValueError: an element not every member knows (named).
            PropertyNotImplementedError: ``"stress"`` asked of a structure that is not
                periodic in all three directions.
        """
        _AseCalculator.calculate(self, atoms, properties, system_changes)
        atoms = self.atoms
        periodic = bool(np.all(atoms.pbc))
        if "stress" in properties and not periodic:
            raise PropertyNotImplementedError(
                "mpattn EnsembleCalculator: stress needs a cell periodic in all three "
                f"directions (pbc={atoms.pbc.tolist()})")
        self.check_elements(atoms.numbers)
        asked = ["energy", "forces"] + (["stress"] if periodic else [])
        results = []
        for m in self.members:
            m.calculate(atoms, asked, all_changes)
            results.append(m.results)
        energies = np.array([r["energy"] for r in results], np.float64)
        forces_members = np.stack([r["forces"] for r in results]).astype(np.float64)
        forces = forces_members.mean(axis=0)
        forces_std = np.sqrt(np.mean(np.sum((forces_members - forces) ** 2, axis=-1),
                                     axis=0))
        max_forces_std = float(forces_std.max()) if len(forces_std) else 0.0
        energy = float(energies.mean())
        extrapolating = self.threshold is not None and max_forces_std > self.threshold
        self.results = {
            "energy": energy,
            "free_energy": energy,
            "forces": forces,
            "energy_std": float(energies.std()),
            "forces_std": forces_std,
            "max_forces_std": max_forces_std,
            "energies": energies,
            "forces_members": forces_members,
            "extrapolating": bool(extrapolating),
        }
        if periodic:
            self.results["stress"] = np.mean([r["stress"] for r in results], axis=0)
        if extrapolating:
            logger.warning(
                "EnsembleCalculator: max force spread %.3f eV/Å (atom %d, %s) exceeds the "
                "threshold %.3f eV/Å: %s is outside what the members agree on "
                "(extrapolating)", max_forces_std, int(np.argmax(forces_std)),
                atoms.get_chemical_symbols()[int(np.argmax(forces_std))], self.threshold,
                atoms.get_chemical_formula())
