"""What a training task is to the trainer, and how tasks are recorded in checkpoints.

A task is a small frozen dataclass of the settings in which runs differ (the property task:
target, reference, size weighting, auxiliary terms; the energy+forces task: cutoff, force
weight). Besides preparing its data (``task.prepare(...)``) it tells the one
:class:`~mpattn.train.trainer.Trainer`:

- ``check()`` / ``check_data(data)``: settings that cannot work, data prepared otherwise;
- ``model_config(config)``: the model config as built (heads its terms need switched on;
  ValueError for a model that cannot serve the task);
- ``module(model, data)``: the module trained (the model, or a potential around it);
- ``terms(train_config)``: ``(main, aux)``, the named, weighted loss terms;
- ``outputs(module, graph)``: the mapping the terms read (inside the jit-compiled step);
- ``predictions(module, graph)``: what evaluation keeps, and ``prediction_kinds`` (per
  ``"graph"`` or per ``"node"``);
- ``graph_weights(graph)``: per-graph weights that combine batches across devices;
- ``report(data, part, raw)``: errors in physical units; ``row(report)``: the validation
  columns of an epoch's metrics row (``score_key`` ranks checkpoints);
- ``state(data)`` / ``to_dict()``: what a checkpoint records to rebuild the run
  (:func:`task_from_dict`).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

__all__ = ["Task", "task_from_dict"]


class Task:
    """Shared behaviour of the tasks (subclasses are frozen dataclasses)."""

    kind: ClassVar[str]
    #: the epoch-row column that ranks checkpoints (lower is better)
    score_key: ClassVar[str]
    #: the epoch-row column of the training throughput (structures per second)
    rate_key: ClassVar[str]
    #: evaluation outputs: name -> "graph" or "node"
    prediction_kinds: ClassVar[dict[str, str]]

    def check(self) -> Task:
        """ValueError naming the setting that cannot work; ``self`` otherwise."""
        return self

    def check_data(self, data) -> None:
        """ValueError if ``data`` was not prepared for this task's settings."""

    def aux_terms(self) -> tuple:
        return getattr(self, "aux", ())

    def main_terms(self, config) -> list:
        raise NotImplementedError

    def terms(self, config) -> tuple[list, list]:
        """``(main, aux)`` loss terms for the run's :class:`~mpattn.train.config.TrainConfig`."""
        return self.main_terms(config), list(self.aux_terms())

    def model_config(self, config):
        """The model config as built for this task (heads its terms need switched on)."""
        for term in self.aux_terms():
            config = term.model_config(config)
        return config

    def data_keys(self) -> tuple[str, ...]:
        """Per-graph data the auxiliary terms read (``graph.globals``)."""
        return tuple(k for term in self.aux_terms() for k in term.data_keys)

    def postfix(self, row: dict) -> dict:
        """The progress bar's summary of an epoch row."""
        return {"val": f"{row[self.score_key]:.1f}", "per_s": f"{row[self.rate_key]:.0f}"}

    def to_dict(self) -> dict:
        """``{"kind": ..., **settings}`` (JSON-able; auxiliary terms as dicts)."""
        from mpattn.train.terms import aux_to_dict

        out = {"kind": self.kind}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = [aux_to_dict(t) for t in value] if f.name == "aux" else value
        return out


def task_from_dict(d: dict) -> Task:
    """Inverse of :meth:`Task.to_dict` (lists back to tuples; fields a newer version wrote are
    left out, fields it did not record take their defaults)."""
    from mpattn.train.checkpoint import json_tuples
    from mpattn.train.forces import EnergyForceTask
    from mpattn.train.property import PropertyTask
    from mpattn.train.terms import aux_from_dict

    kinds = {cls.kind: cls for cls in (PropertyTask, EnergyForceTask)}
    fields = dict(d)
    kind = fields.pop("kind", None)
    if kind not in kinds:
        raise ValueError(f"unknown task kind {kind!r}; known: {sorted(kinds)}")
    cls = kinds[kind]
    known = {f.name for f in dataclasses.fields(cls)}
    values = {k: json_tuples(v) for k, v in fields.items() if k in known}
    if "aux" in values:
        values["aux"] = tuple(aux_from_dict(t) for t in fields["aux"])
    return cls(**values)
