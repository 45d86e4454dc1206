"""Training engine: targets, losses, schedules, metrics (and the train state, loop, checkpoints).

* :mod:`mpattn.train.targets`: float64 host-side target transform (per-element linear
  reference + standardisation); the device only sees standardised residuals.
* :mod:`mpattn.train.losses`: masked per-graph MSE/L1/Huber with size weightings, and the
  size-balancing sampling helpers.
* :mod:`mpattn.train.schedules`: Adam + schedules (step decay, warmup-cosine, reduce on
  plateau) with gradient clipping; EMA weights.
* :mod:`mpattn.train.metrics`: MAE/RMSE in meV and kcal/mol, per size and per element.
* :mod:`mpattn.train.checkpoint`: orbax checkpoints (latest N + best by validation MAE).
* :mod:`mpattn.train.loop`: the jit-compiled train step, epochs, exact resumption.
* :mod:`mpattn.train.experiment`: a whole QM9 run and its outputs (``experiments.qm9_u0``).
"""

from mpattn.train.checkpoint import Checkpointer
from mpattn.train.loop import (
    EpochPlan,
    TrainConfig,
    Trainer,
    TrainingDiverged,
    calibrate_epochs,
    prepare,
)
from mpattn.train.losses import (
    LOSSES,
    WEIGHT_FLOOR,
    WEIGHTINGS,
    cap_per_size,
    elementwise_loss,
    graph_weights,
    loss_value,
    size_range,
)
from mpattn.train.metrics import KCAL_MOL_MEV, error_report
from mpattn.train.schedules import (
    SCHEDULES,
    current_lr,
    ema_init,
    ema_update,
    make_optimizer,
    make_schedule,
    step_decay,
    warmup_cosine,
)
from mpattn.train.targets import QM9_ELEMENTS, TargetTransform, element_counts

__all__ = [
    # checkpoint
    "Checkpointer",
    # loop
    "EpochPlan",
    "TrainConfig",
    "Trainer",
    "TrainingDiverged",
    "calibrate_epochs",
    "prepare",
    # losses
    "LOSSES",
    "WEIGHTINGS",
    "WEIGHT_FLOOR",
    "cap_per_size",
    "elementwise_loss",
    "graph_weights",
    "loss_value",
    "size_range",
    # metrics
    "KCAL_MOL_MEV",
    "error_report",
    # schedules
    "SCHEDULES",
    "current_lr",
    "ema_init",
    "ema_update",
    "make_optimizer",
    "make_schedule",
    "step_decay",
    "warmup_cosine",
    # targets
    "QM9_ELEMENTS",
    "TargetTransform",
    "element_counts",
]
