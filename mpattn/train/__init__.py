"""The training engine: one trainer over tasks.

* :mod:`mpattn.train.config`: :class:`TrainConfig`, what every run shares (checked before
  any data is read).
* :mod:`mpattn.train.property`, :mod:`mpattn.train.forces`: the tasks, what runs differ in
  (a per-molecule target; energies and forces of a potential) and their data preparation.
* :mod:`mpattn.train.terms`: the loss as named, weighted terms (target, energy, forces,
  denoising, dipole); :mod:`mpattn.train.losses`: the masked loss functions behind them.
* :mod:`mpattn.train.trainer`: :class:`Trainer` (epochs, validation in physical units,
  checkpoints, exact resumption); :mod:`mpattn.train.steps`: the jit-compiled step.
* :mod:`mpattn.train.targets`: the float64 host-side target transform;
  :mod:`mpattn.train.metrics`: error reports; :mod:`mpattn.train.schedules`: optax
  optimisers, schedules, EMA; :mod:`mpattn.train.checkpoint`: orbax checkpoints;
  :mod:`mpattn.train.runs`: reading runs back (:func:`load_run`);
  :mod:`mpattn.train.report`: results files and plots.
"""

from mpattn.train import checkpoint, losses, metrics, schedules, targets, terms
from mpattn.train.checkpoint import Checkpointer
from mpattn.train.config import TrainConfig
from mpattn.train.forces import EnergyForceTask, ForceData
from mpattn.train.property import PropertyData, PropertyTask
from mpattn.train.runs import load_run
from mpattn.train.targets import TargetTransform
from mpattn.train.terms import Denoising, Dipole
from mpattn.train.trainer import Trainer, TrainingDiverged

__all__ = [
    "Checkpointer",
    "Denoising",
    "Dipole",
    "EnergyForceTask",
    "ForceData",
    "PropertyData",
    "PropertyTask",
    "TargetTransform",
    "TrainConfig",
    "Trainer",
    "TrainingDiverged",
    "checkpoint",
    "load_run",
    "losses",
    "metrics",
    "schedules",
    "targets",
    "terms",
]
