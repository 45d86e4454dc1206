"""Molecular dynamics and relaxation with a trained potential.

- :mod:`mpattn.md.ase_nve`: NVE through any ASE calculator, with drift diagnostics
  (:func:`run_nve`, :func:`energy_drift`, :func:`plot_energy`).
- :mod:`mpattn.md.force_field`: a potential (or an ensemble) as a JAX-MD force field
  (:class:`ForceField`).
- :mod:`mpattn.md.dynamics`: MD in JAX with jax-md (:func:`run_md`): NVE, Langevin and
  Nosé-Hoover NVT, replicas, neighbour-list growth, explosion and uncertainty stops.

jax-md is imported only when a JAX-MD function runs (``pip install -e '.[md]'``).
"""

from mpattn.md.ase_nve import energy_drift, plot_energy, run_nve
from mpattn.md.dynamics import ENSEMBLES, run_md
from mpattn.md.force_field import ForceField

__all__ = ["ENSEMBLES", "ForceField", "energy_drift", "plot_energy", "run_md", "run_nve"]
