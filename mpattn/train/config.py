"""The one training config: what every run shares, whatever its task.

Task-specific settings (the QM9 target, the force weight, auxiliary loss terms) live in the
task object (:class:`~mpattn.train.property.PropertyTask`,
:class:`~mpattn.train.forces.EnergyForceTask`); model sizes in the model's own config.
The defaults are the settings of the main job (``python -m experiments.qm9_u0``); presets
that change them live with the experiments (``experiments/configs``).

:meth:`TrainConfig.check` refuses settings that cannot work before any data is read or any
file written, with a one-line message that names the option.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mpattn.train.losses import LOSSES
from mpattn.train.schedules import SCHEDULES

__all__ = ["TrainConfig"]


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on besides its task, its data and the model sizes.

    Attributes:
        model: registry name (:func:`mpattn.models.model_names`).
        loss: elementwise loss of every term: ``"l1"``, ``"mse"`` or ``"huber"``.
        lr: peak learning rate (> 0).
        schedule: ``"cosine"`` (warmup, then cosine to 1e-6 over ``epochs``), ``"step"``
            (the thesis' ×0.7 every 5 epochs), ``"plateau"`` or ``"constant"``.
        epochs: epochs to train (the cosine schedule spans them).
        batch_size: structures per training batch; eval_batch_size: per evaluation batch.
        clip_norm: global gradient-norm clip (None: none).
        weight_decay: AdamW's decoupled decay of the weight matrices (0: Adam).
        ema_decay: evaluate and keep an exponential moving average of the weights with this
            decay (None: the raw weights).
        seed: parameter initialisation, batch order and the noise of noisy terms.
        time_budget_min: stop after the epoch that would overrun it (None: no limit).
        keep_checkpoints: latest checkpoints kept (the best is kept besides).
        checkpoint_every_s: > 0: checkpoint only after epochs ending at least this long after
            the previous save (and after the first and last epoch); 0: every epoch.
        num_devices: data parallelism over this many devices (None: all visible).
        steps_per_call: > 1: that many train steps per jit call (``lax.scan``, one padding
            budget): fewer host round trips where steps are short (GPU).
        x64: train in float64 (needs ``jax.config.update("jax_enable_x64", True)`` first).
        trainable: ``"all"`` parameters, or only the ``"readout"``'s (the rest frozen: for
            fine-tuning a trained model on little data).
    """

    model: str = "attention"
    loss: str = "l1"
    lr: float = 1e-3
    schedule: str = "cosine"
    epochs: int = 24
    batch_size: int = 16
    eval_batch_size: int = 256
    clip_norm: float | None = 10.0
    weight_decay: float = 0.0
    ema_decay: float | None = 0.999
    seed: int = 0
    time_budget_min: float | None = None
    keep_checkpoints: int = 3
    checkpoint_every_s: float = 0.0
    num_devices: int | None = None
    steps_per_call: int = 1
    x64: bool = False
    trainable: str = "all"

    def check(self) -> TrainConfig:
        """Raise ``ValueError("<option>: <problem>")`` for a setting that cannot work; return
        ``self`` otherwise. The option is named as on the command line (``--lr``)."""
        from mpattn.models import model_names

        def bad(name: str, problem: str):
            return ValueError(f"--{name.replace('_', '-')} {getattr(self, name)!r}: {problem}")

        if self.model not in model_names():
            raise bad("model", f"unknown model; choose from {', '.join(model_names())} (or "
                      "register your own with mpattn.models.register_model)")
        if self.loss not in LOSSES:
            raise bad("loss", f"choose one of {', '.join(LOSSES)}")
        if self.schedule not in SCHEDULES:
            raise bad("schedule", f"choose one of {', '.join(SCHEDULES)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise bad("lr", "the learning rate must be a positive number")
        for name in ("epochs", "batch_size", "eval_batch_size", "keep_checkpoints",
                     "steps_per_call"):
            if getattr(self, name) < 1:
                raise bad(name, "must be at least 1")
        if self.num_devices is not None and self.num_devices < 1:
            raise bad("num_devices", "must be at least 1")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise bad("clip_norm", "must be positive (or None: no clipping)")
        if not self.weight_decay >= 0:
            raise bad("weight_decay", "must be >= 0")
        if self.ema_decay is not None and not 0 <= self.ema_decay < 1:
            raise bad("ema_decay", "must be in [0, 1) (or None: no EMA)")
        if self.time_budget_min is not None and not self.time_budget_min > 0:
            raise bad("time_budget_min", "must be positive (or None: no limit)")
        if self.trainable not in ("all", "readout"):
            raise bad("trainable", "choose 'all' or 'readout'")
        if not self.checkpoint_every_s >= 0:
            raise bad("checkpoint_every_s", "must be >= 0")
        return self
