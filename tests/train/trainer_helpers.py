"""What the trainer's tests share: the tiny SchNet of these tests on the 500-molecule QM9
slice, its settings, and a whole run through ``experiments.qm9_u0.run``."""

from __future__ import annotations

from pathlib import Path

from mpattn.data.qm9 import make_split
from mpattn.train import (
    PropertyTask,
    TrainConfig,
    Trainer,
)

ROOT = Path(__file__).resolve().parents[2]
TINY = {"interactions": 2, "dim": 32, "num_filters": 32, "num_rbf": 16, "cutoff": 5.0}
SIZES = (300, 60, 100)  # seed 1 puts the slice's only F molecule in train
TASK = PropertyTask()  # U0 with the per-element reference


def quiet(*_):
    return None


def _config(**kw) -> TrainConfig:
    """The settings these tests were written for: the old TrainConfig's defaults where the
    new ones differ (no EMA, batch 32) and a tiny SchNet on a short cosine."""
    base = dict(model="schnet", loss="l1", epochs=3, batch_size=32, lr=1e-3,
                schedule="cosine", seed=1, ema_decay=None)
    return TrainConfig(**(base | kw))


def _data(molset, cfg: TrainConfig, task: PropertyTask = TASK):
    return task.prepare(molset, make_split(molset.ids, sizes=SIZES, seed=1), cfg)


def _trained(molset, workdir, epochs: int = 2) -> Trainer:
    """A tiny SchNet trained for ``epochs`` in-process (seed 1: QM9 id 184, the slice's only
    F molecule, lands in the training split)."""
    from mpattn.models import default_config

    cfg = _config(epochs=epochs)
    trainer = Trainer(cfg, TASK, _data(molset, cfg), workdir,
                      model_config=default_config("schnet", **TINY), log=quiet)
    trainer.fit(progress=False)
    return trainer


def _run(cache_file, workdir, epochs=3, resume=False, plan=False, task=None,
         model_overrides=TINY, **kw):
    from experiments.qm9_u0 import run
    from mpattn.models import default_config

    config = _config(epochs=epochs, **kw)
    return run(config, task, workdir=workdir, sizes=SIZES, resume=resume,
               dataset_cache=cache_file,
               model_config=default_config(config.model, **model_overrides),
               progress=False, plan=plan, log=quiet)


