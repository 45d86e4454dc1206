"""experiments.planning.Replan: the pace it plans with counts checkpoint saves at the
frequency they happen (the uniform-clock cases: tests/test_qm9_experiment.py and
tests/train/test_forces_task.py)."""

from __future__ import annotations

import types

import pytest

import experiments.planning as planning
from experiments.planning import Replan


class _Trainer:
    """What ``Replan`` reads of a trainer: its config, epoch and clock, and set_epochs."""

    def __init__(self, clock, epochs: int, minutes: float, every_s: float):
        self.clock, self.epoch = clock, 0
        self.config = types.SimpleNamespace(epochs=epochs, time_budget_min=minutes,
                                            checkpoint_every_s=every_s)

    def elapsed_s(self) -> float:
        return self.clock[0]

    def set_epochs(self, epochs: int) -> bool:
        self.config.epochs = epochs
        return True


@pytest.mark.parametrize("save_s", [0.0, 1.2])
def test_replan_counts_saves_at_their_frequency(monkeypatch, save_s):
    """0.6-s epochs and a save of ``save_s`` every 50 epochs (every 30 s): the plan fixed at
    half time is the budget over the true mean pace, 0.6 + save_s / 50 s, to 1 %. (Over the
    last 3 epochs alone the pace was 0.6 s, or 1.0 s when they held a save: 4 % too many
    epochs or 35 % too few.)"""
    clock = [0.0]
    monkeypatch.setattr(planning, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    trainer = _Trainer(clock, epochs=10_000, minutes=40.0, every_s=30.0)
    replan = Replan(log=lambda _msg: None)
    while 2 * trainer.epoch <= trainer.config.epochs:
        trainer.epoch += 1
        clock[0] += 0.6 + (save_s if trainer.epoch % 50 == 1 and trainer.epoch > 1 else 0.0)
        replan(trainer, False)
    assert trainer.config.epochs == pytest.approx(2400.0 / (0.6 + save_s / 50), rel=0.01)


def test_replan_logs_only_plans_that_moved(monkeypatch):
    """Epochs alternating 1.2 and 1.3 s move the plan by an epoch or two each epoch: every
    move is applied, but only moves of LOG_CHANGE or more since the last logged plan are
    logged, each saying which plan it replaces."""
    clock = [0.0]
    monkeypatch.setattr(planning, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    trainer = _Trainer(clock, epochs=400, minutes=10.0, every_s=0.0)
    logged, applied = [], []
    replan = Replan(log=logged.append)
    for epoch in range(1, 120):
        trainer.epoch = epoch
        clock[0] += 1.2 + 0.1 * (epoch % 2) + (0.5 if epoch == 60 else 0.0)
        before = trainer.config.epochs
        replan(trainer, False)
        if trainer.config.epochs != before:
            applied.append(trainer.config.epochs)
    assert len(applied) > 5 * len(logged) > 0
    plans = [int(m.split()[1]) for m in logged]
    wases = [int(m.rsplit("(was ", 1)[1].rstrip(")")) for m in logged]
    assert wases[0] == 400 and wases[1:] == plans[:-1]
    assert all(abs(p - w) >= planning.LOG_CHANGE * w for p, w in zip(plans, wases, strict=True))
