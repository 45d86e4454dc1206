"""Reading trained runs back: the settings a checkpoint records, and the one loader,
:func:`load_run`, which gives a property predictor or a potential as the run's task says.

Checkpoints written before the one-engine change (no ``meta["format"]``) recorded one of two
configs (the QM9 trainer's ``TrainConfig`` or the potential trainer's ``PotentialConfig``),
under older model names and class defaults. :data:`OLD_TRAIN_DEFAULTS`,
:data:`OLD_POTENTIAL_DEFAULTS`, :data:`RENAMED_MODELS` and :data:`OLD_MODEL_DEFAULTS` are the
one table that keeps their meaning: a field an old run did not record takes the default it
had then, not today's.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from mpattn.train.checkpoint import Checkpointer, json_tuples, read_meta
from mpattn.train.config import TrainConfig
from mpattn.train.task import task_from_dict

__all__ = [
    "OLD_MODEL_DEFAULTS",
    "OLD_POTENTIAL_DEFAULTS",
    "OLD_TRAIN_DEFAULTS",
    "RENAMED_MODELS",
    "current_meta",
    "load_run",
    "model_config_of",
    "run_settings",
]

#: Registry names that changed: old name -> today's.
RENAMED_MODELS = {"attention_potential": "attention"}

#: Model config fields whose class default changed: model -> {field: the default before}.
#: A checkpoint that does not record such a field was trained with the old default.
OLD_MODEL_DEFAULTS = {"attention": {"attention_weights": "softmax"}}

#: The QM9 trainer's TrainConfig defaults before the change (format 1 property runs).
OLD_TRAIN_DEFAULTS = dict(
    model="mhmp", target="U0", reference=True, loss="l1", weighting="none", weight_r=1.0,
    lr=1e-3, schedule="step", epochs=200, batch_size=32, eval_batch_size=256, clip_norm=10.0,
    weight_decay=0.0, ema_decay=None, seed=0, time_budget_min=None, edge_set="complete",
    cutoff=None, keep_checkpoints=3, checkpoint_every_s=0.0, num_devices=None,
    steps_per_call=1, min_atoms=None, max_atoms=None, cap_per_size=None, replan=False,
    denoise_sigma=0.0, denoise_weight=0.1, dipole_weight=0.0)

#: The potential trainer's PotentialConfig defaults before the change (format 1 potentials).
OLD_POTENTIAL_DEFAULTS = dict(
    model="attention_potential", cutoff=5.0, beta=0.99, loss="mse", lr=3e-3,
    schedule="cosine", epochs=100, batch_size=8, eval_batch_size=64, ema_decay=0.99,
    clip_norm=10.0, weight_decay=0.0, seed=0, time_budget_min=None, replan=False, x64=False,
    keep_checkpoints=3, checkpoint_every_s=0.0)


def model_config_of(model: str, fields: dict):
    """The typed config of ``model`` from the fields a checkpoint recorded (lists back to
    tuples; renamed models and changed defaults through the table above; fields a newer
    version wrote are an error naming them)."""
    from mpattn.models import default_config

    model = RENAMED_MODELS.get(model, model)
    values = {**OLD_MODEL_DEFAULTS.get(model, {}),
              **{k: json_tuples(v) for k, v in fields.items()}}
    return default_config(model, **values)


def _train_config(fields: dict) -> TrainConfig:
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: json_tuples(v) for k, v in fields.items() if k in known}
    if "model" in values:
        values["model"] = RENAMED_MODELS.get(values["model"], values["model"])
    return TrainConfig(**values)


def _legacy(meta: dict) -> dict:
    """A format-1 checkpoint's metadata in today's layout."""
    from mpattn.train.forces import EnergyForceTask
    from mpattn.train.property import PropertyTask
    from mpattn.train.terms import Denoising, Dipole

    if "reference" in meta:  # a potential run
        old = {**OLD_POTENTIAL_DEFAULTS, **meta["config"]}
        task = EnergyForceTask(cutoff=old["cutoff"], beta=old["beta"])
        state = {"reference": meta["reference"], "dtype": meta.get("dtype", "float32")}
        model = meta.get("model", old["model"])
    else:
        old = {**OLD_TRAIN_DEFAULTS, **meta["config"]}
        aux = ((Denoising(old["denoise_sigma"], old["denoise_weight"]),)
               if old["denoise_sigma"] > 0 else ())
        aux += (Dipole(old["dipole_weight"]),) if old["dipole_weight"] > 0 else ()
        task = PropertyTask(**{k: json_tuples(old[k]) for k in (
            "target", "reference", "weighting", "weight_r", "edge_set", "cutoff",
            "min_atoms", "max_atoms", "cap_per_size")}, aux=aux)
        state = {"transform": meta.get("transform")}  # results.json files have none
        model = old["model"]
    return {**meta, "config": {**old, "model": model}, "task": task.to_dict(),
            "task_state": state, "run_info": {"planned": bool(old["replan"])}, "format": 1}


def current_meta(meta: dict) -> dict:
    """A checkpoint's metadata in today's layout (format-1 metadata converted, marked
    ``"format": 1``)."""
    return _legacy(meta) if "format" not in meta else meta


def run_settings(meta: dict):
    """``(TrainConfig, task, model config, run_info)`` a run was started with, from its
    checkpoint metadata (either format). The model config is the one the run built."""
    meta = current_meta(meta)
    config = _train_config(meta["config"])
    task = task_from_dict(meta["task"])
    model_config = task.model_config(model_config_of(config.model, meta["model_config"]))
    return config, task, model_config, dict(meta.get("run_info") or {})


def _fitted(task, state: dict):
    """The fitted per-run state a task's module and reports need, from ``task_state``."""
    from mpattn.potential import Reference
    from mpattn.train.targets import TargetTransform

    if "reference" in state:
        return SimpleNamespace(reference=Reference.from_dict(state["reference"]))
    return SimpleNamespace(transform=TargetTransform.from_dict(state["transform"]))


def load_run(workdir, which: str = "best"):
    """A trained run, ready to use: what its task makes of it.

    Args:
        workdir: the run's folder (holding ``checkpoints/``).
        which: ``"best"`` (lowest validation score) or ``"latest"``.

    Returns:
        For a property run, a :class:`~mpattn.predict.Predictor` (``ase.Atoms`` in, the
        target in its unit out); for an energy+forces run, the
        :class:`~mpattn.potential.Potential` with its reference installed (wrap it in
        :class:`mpattn.ase.Calculator` or call :func:`~mpattn.potential.energy_and_forces`).
        The EMA weights when the run kept them.

    Raises:
        ValueError: ``which`` is invalid, or the workdir is missing, holds no intact
            checkpoint or lacks metadata (the message names the path and what is missing).
    """
    from flax import nnx

    from mpattn.train.trainer import build_state

    if which not in ("best", "latest"):
        raise ValueError(f"which must be 'best' or 'latest', got {which!r}")
    workdir = Path(workdir)
    if not workdir.is_dir():
        raise ValueError(f"{workdir}: no such workdir (expected a training run's folder "
                         "holding checkpoints/)")
    ckpt = Checkpointer(workdir / "checkpoints")
    try:
        steps, best = ckpt.listing(which)
        if not steps:
            raise ValueError(f"{ckpt.directory}: missing checkpoints (is {workdir} a "
                             "training run's workdir?)")
        meta = current_meta(read_meta(ckpt.directory,
                                      [best] if best is not None else steps[::-1]))
        config, task, model_config, _ = run_settings(meta)
        fitted = _fitted(task, meta["task_state"])
        module, graphdef, rest, _, template = build_state(config, task, fitted, model_config,
                                                          steps_per_epoch=1)
        carry, meta = restore(ckpt, template, rest, meta, which=which)
    except (ValueError, KeyError, TypeError) as err:
        what = f"missing metadata {err}" if isinstance(err, KeyError) else str(err)
        raise ValueError(f"cannot load a run from {workdir}: {what}") from err
    params = carry.get("ema", carry["params"])
    if task.kind == "energy_forces":
        nnx.update(module, params, rest)
        _apply_energy_fit(module, workdir)
        return module
    from mpattn.predict import Predictor

    return Predictor(task, config, model_config, graphdef, params, rest, fitted.transform,
                     step=meta.get("checkpoint", {}).get("step"), epoch=meta.get("epoch"))


def _apply_energy_fit(potential, workdir: Path) -> None:
    """Adds a force-only run's post-hoc per-element energies (``energy_fit.json``, written by
    the experiment after training; :func:`~mpattn.train.forces.posthoc_energy_fit`) to the
    potential's reference."""
    from mpattn.potential import Reference
    from mpattn.train.forces import ENERGY_FIT_FILE

    path = workdir / ENERGY_FIT_FILE
    if not path.is_file():
        return
    fit = json.loads(path.read_text())
    ref = potential.reference
    if tuple(fit["elements"]) != tuple(ref.elements):
        raise ValueError(f"{path}: fitted for elements {fit['elements']}, the potential has "
                         f"{list(ref.elements)}")
    potential.set_reference(Reference(ref.elements, ref.energies + np.asarray(fit["delta"]),
                                      ref.scale))


def restore(ckpt: Checkpointer, template: dict, rest, meta: dict, *, which: str):
    """``ckpt.restore`` into ``template``, for either format (``meta`` from
    :func:`current_meta`): format-1 property runs kept the (empty) non-trainable state in the
    carry as ``"rest"``."""
    legacy = meta["format"] == 1 and meta["task"]["kind"] == "property"
    full = {**template, "rest": rest} if legacy else template
    carry, meta = ckpt.restore(full, which=which)
    if legacy:
        carry.pop("rest")
    return carry, meta
