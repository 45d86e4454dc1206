"""Presets of ``python -m experiments.qm9_u0``: split sizes, training settings and model
options, by hardware and purpose.

- ``cpu``: 15,000 training molecules and 10 minutes of training on 2 CPU cores; the epochs
  are planned to fill the budget (``experiments/planning.py``). The library's defaults are
  this preset's settings: it adds only the budget and the checkpoint interval.
- ``standard`` (an accelerator's): the literature's split (110,000 / 10,000 / rest), batch
  64, 300 epochs, the attention model with vector channels and the denoising term (the best
  single model on 15,000 molecules, docs/results.md).
- ``thesis``: the MH-MP thesis' setup: 15,000 / 4,300 / 2,200, batch 8, MSE, no reference,
  Adam 1e-3 x0.7 every 5 epochs, 200 epochs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from mpattn.models import default_config
from mpattn.train import Denoising, PropertyTask, TrainConfig

__all__ = ["CPU_MHMP", "PRESETS", "Preset", "SAVE_EVERY_S", "STANDARD_ATTENTION"]


@dataclass(frozen=True)
class Preset:
    """Split sizes and the settings of a named setup."""

    sizes: tuple[int, int, int | None]
    train: TrainConfig
    why: str
    task: PropertyTask = PropertyTask()
    #: model name -> model config overrides under this preset (``--model-config`` on top)
    models: dict[str, dict] = field(default_factory=dict)
    #: model name -> auxiliary loss terms under this preset (a regulariser only that model
    #: has a head for)
    aux: dict[str, tuple] = field(default_factory=dict)
    #: plan the epochs to fill ``train.time_budget_min`` (unless --epochs is given)
    plan: bool = False

    def train_for(self, model: str) -> TrainConfig:
        return dataclasses.replace(self.train, model=model)

    def task_for(self, model: str) -> PropertyTask:
        return dataclasses.replace(self.task, aux=self.aux.get(model, ()))

    def model_config(self, model: str, overrides: dict | None = None):
        """``model``'s typed config under this preset, ``overrides`` on top."""
        return default_config(model, **{**self.models.get(model, {}), **(overrides or {})})


#: MH-MP sized for a 2-core CPU: the edge network's cost grows as dim² x edge_hidden, so a
#: narrower model fits ~5x more molecules per second into the cpu preset's 10 minutes.
CPU_MHMP = {"dim": 48, "head_dim": 16, "edge_hidden": 32, "ff_dim": 96}

#: The attention model under ``standard``: PaiNN-style vector channels with summed vector
#: messages (at 1.7x the CPU cost per molecule they do not pay within the cpu preset's 10
#: minutes, but give the lowest error at convergence; docs/results.md).
STANDARD_ATTENTION = {"vector_features": True, "vector_messages": "sum"}

#: Checkpoint at most every 30 s (and after the first and last epoch): a save costs about
#: as much as a short epoch.
SAVE_EVERY_S = 30.0

PRESETS: dict[str, Preset] = {
    "cpu": Preset(
        (15_000, 1_000, 5_000),
        TrainConfig(time_budget_min=10.0, checkpoint_every_s=SAVE_EVERY_S),
        "15,000 training molecules, 10 minutes of training on 2 CPU cores (MH-MP, if chosen, "
        "narrowed to dim 48, head_dim 16, edge_hidden 32 to fit more epochs)",
        models={"mhmp": CPU_MHMP, "mhmp_pe": CPU_MHMP}, plan=True),
    "standard": Preset(
        (110_000, 10_000, None),
        TrainConfig(batch_size=64, epochs=300, checkpoint_every_s=SAVE_EVERY_S),
        "the literature's split: 110,000/10,000/rest (the attention model with vector "
        "channels and denoising)",
        models={"attention": STANDARD_ATTENTION},
        aux={"attention": (Denoising(sigma=0.02, weight=0.1),)}),
    "thesis": Preset(
        (15_000, 4_300, 2_200),
        TrainConfig(model="mhmp", loss="mse", batch_size=8, lr=1e-3, schedule="step",
                    epochs=200, ema_decay=None, checkpoint_every_s=SAVE_EVERY_S),
        "the MH-MP thesis: 15,000/4,300/2,200, batch 8, MSE, Adam 1e-3 x0.7 every 5 epochs",
        task=PropertyTask(reference=False)),
}
