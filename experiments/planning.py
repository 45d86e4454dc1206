"""Fitting a run's epochs into a time budget: the experiments' planning policy.

A cosine schedule that a time budget cuts short never reaches its low learning rates. So a
budgeted run (the ``cpu`` preset's 10 minutes, the ethanol experiment's) first times whole
epochs on a throwaway trainer (:func:`plan_epochs`), sets the schedule to the epochs that fit,
and while it runs re-fits that plan to the pace it actually gets (:class:`Replan`, during the
first half of the run). The library only offers the hooks: ``Trainer.fit(after_epoch=...)``
and ``Trainer.set_epochs``.
"""

from __future__ import annotations

import bisect
import dataclasses
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np

__all__ = ["LOG_CHANGE", "PACE_WINDOW_S", "EpochPlan", "Replan", "plan_epochs"]

#: :class:`Replan` measures the pace over the epochs of the last this many seconds (at least
#: 3 epochs and twice the checkpoint interval): long enough to hold the checkpoint saves at
#: their real frequency (a save cut off at the window's edge is then under 1 % of it). Over
#: the last 3 epochs alone, a window that held a save made short epochs look 1.5x slower,
#: and a plan fixed there (2026-12-02, ethanol, 40 min) trained for 34 of the 40 minutes.
PACE_WINDOW_S = 300.0

#: :class:`Replan` logs a new plan when it differs from the last one logged by this fraction.
LOG_CHANGE = 0.05


class EpochPlan(NamedTuple):
    """What :func:`plan_epochs` planned: the epochs that fit the budget, and the trial
    trainer whose compiled steps the run reuses (None unless ``reuse_trial``)."""

    epochs: int
    trial: object | None


def plan_epochs(make_trainer, config, minutes: float, *, epochs: int = 3,
                reuse_trial: bool = False) -> EpochPlan:
    """Epochs that fit ``minutes`` of training, timed on the whole epoch loop.

    ``make_trainer(config, workdir)`` builds a throwaway :class:`~mpattn.train.Trainer` in a
    temporary folder; it runs one epoch (compiling), then ``epochs`` more, through ``fit``
    itself and saving after each, so the time holds everything an epoch costs: the train
    steps, the validation pass, metrics.csv and the checkpoint (timing bare steps alone
    missed the last two and planned too many epochs, cutting the cosine short). A save is
    counted once per ``config.checkpoint_every_s`` (every epoch if 0). The real run compiles
    again: the first epoch's extra time is reserved for that, unless ``reuse_trial`` keeps
    the trial, whose compiled steps the run then reuses (``Trainer(..., compiled_from=
    plan.trial)``).

    No safety margin: if the epochs run slower than timed, the budget drops the schedule's
    last epoch, whose learning rate is near zero anyway, while a margin wastes whole epochs.
    """
    with tempfile.TemporaryDirectory(prefix="mpattn-calibrate-") as tmp:
        trial = make_trainer(dataclasses.replace(config, epochs=1, time_budget_min=None,
                                                 checkpoint_every_s=0.0), Path(tmp))
        t0 = time.perf_counter()
        trial.fit(progress=False)
        first_s = time.perf_counter() - t0
        trial.config = dataclasses.replace(trial.config, epochs=1 + epochs)
        t0 = time.perf_counter()
        trial.fit(progress=False)
        loop_s = (time.perf_counter() - t0) / epochs  # an epoch and its save
        row_s = float(np.mean([r["seconds"] for r in trial.history[1:]]))  # the epoch alone
    save_s = max(loop_s - row_s, 0.0)
    every = config.checkpoint_every_s
    saves_per_epoch = 1.0 if every <= 0 else min(1.0, row_s / every)
    compile_s = 0.0 if reuse_trial else max(first_s - loop_s, 0.0)
    planned = max(1, round((60 * minutes - compile_s - save_s)
                           / (row_s + saves_per_epoch * save_s)))
    return EpochPlan(planned, trial if reuse_trial else None)


class Replan:
    """``Trainer.fit(after_epoch=Replan(...))``: after each epoch of the run's first half,
    re-fit the number of epochs (and the cosine's length) to the time left at the pace of
    the last epochs of this call (those within :data:`PACE_WINDOW_S`, at least 3), saves
    included, so that a plan timed on a trial
    epoch follows the pace the run gets (e.g. beside other runs on one machine). Early in a
    cosine a change of length barely changes the rate; the second half keeps the plan. It
    runs before the epoch's checkpoint, so every checkpoint holds the plan the run goes on
    with and a resumed run follows it. Single-process runs only. It logs a new plan only
    when it moved by :data:`LOG_CHANGE` or more since the last one it logged (the pace
    wobbles by an epoch or two every epoch).
    """

    def __init__(self, log=print):
        self.log = log
        self.ends: list[float] = []
        self.logged: int | None = None  # the plan last logged

    def __call__(self, trainer, stopping: bool) -> None:
        self.ends.append(time.perf_counter())
        c = trainer.config
        if (stopping or c.time_budget_min is None or len(self.ends) < 2
                or 2 * trainer.epoch > c.epochs or jax.process_count() > 1):
            return
        last, window = self.ends[-1], max(PACE_WINDOW_S, 2.0 * c.checkpoint_every_s)
        inside = len(self.ends) - 1 - bisect.bisect_left(self.ends, last - window)
        n = max(min(3, len(self.ends) - 1), inside)  # intervals: epochs with their saves
        pace = (last - self.ends[-1 - n]) / n
        left = 60 * c.time_budget_min - trainer.elapsed_s()
        epochs = trainer.epoch + max(1, int(left // pace))
        was = c.epochs if self.logged is None else self.logged
        if epochs != c.epochs and trainer.set_epochs(epochs) \
                and abs(epochs - was) >= LOG_CHANGE * was:
            self.log(f"re-planned: {epochs} epochs fit the budget at {pace:.1f} s per epoch "
                     f"(was {was})")
            self.logged = epochs
