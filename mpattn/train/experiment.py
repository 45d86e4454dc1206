"""A whole QM9 run: data, split (saved), training, best-checkpoint test evaluation, outputs.

``experiments/qm9_u0.py`` is the command-line face of :func:`run_qm9`.
"""

from __future__ import annotations

import dataclasses
import platform
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np

from mpattn.train.distributed import is_primary
from mpattn.train.loop import (
    TrainConfig,
    Trainer,
    calibrate_epochs,
    prepare,
    run_settings,
    with_training_heads,
)
from mpattn.train.report import (
    plot_curves,
    plot_parity,
    plot_per_size,
    write_json,
    write_predictions,
)

__all__ = ["DEFAULT_MODEL", "PRESETS", "STANDARD_ATTENTION", "STANDARD_DENOISE", "Preset",
           "preset_model_config",
           "run_qm9"]


@dataclass(frozen=True)
class Preset:
    """Split sizes and training settings of a named setup."""

    sizes: tuple[int, int, int | None]
    train: TrainConfig
    why: str
    #: model name -> config overrides of that model under this preset (``--model-config``
    #: and ``model_overrides`` apply on top)
    models: dict[str, dict] = field(default_factory=dict)
    #: model name -> :class:`TrainConfig` overrides of that model under this preset (the
    #: command line's options apply on top), e.g. a regulariser only that model has a head for
    trains: dict[str, dict] = field(default_factory=dict)

    def config_for(self, model: str) -> TrainConfig:
        """The preset's training settings for ``model``."""
        return dataclasses.replace(self.train, model=model, **self.trains.get(model, {}))


#: The model of the ``standard`` and ``cpu`` presets: multi-head attention over the atom pairs
#: within its cutoff, with distance filters and a smooth envelope, sum readout. On 2 CPU cores
#: it reached a far lower test MAE in 10 minutes than MH-MP (README, "Training on QM9"); the
#: ``thesis`` preset keeps the thesis' MH-MP.
DEFAULT_MODEL = "attention_potential"

#: MH-MP sized for a 2-core CPU: the edge network's cost grows as dim² x edge_hidden, so a
#: narrower model trains ~5x more molecules per second (README, "Training on QM9").
CPU_MHMP = {"dim": 48, "head_dim": 16, "edge_hidden": 32, "ff_dim": 96}

#: The attention potential under the ``cpu`` preset (``standard`` adds more on top):
#: unnormalised silu attention weights (``silu(logit) f(r) / 16``, messages summed). In
#: 10-minute cpu-preset runs on one core each (2026-11-24) they gave 64.8 and 57.9 meV test
#: MAE against the softmax weights' 72.1 and 63.1 (seeds 0 and 1), and with vector channels
#: 29.5 meV against 32.1 at convergence (README, "Toward 25 meV on the CPU"). The class
#: default stays ``"softmax"`` so that checkpoints of older runs, which do not record the
#: field, keep their meaning.
ATTENTION_PRESET = {"attention_weights": "silu"}

#: The attention potential under the ``standard`` preset (an accelerator's): PaiNN-style vector
#: channels with summed vector messages and the silu weights, trained with the denoising
#: regulariser (:data:`STANDARD_DENOISE`). With 15,000 training molecules on the CPU, to
#: convergence (150 epochs, 2026-11-24): 25.7, 26.2 and 25.9 meV test MAE in three runs
#: against 29.5 without denoising, 32.1 with softmax vector channels and 43.8 for the
#: scalar model (README, "Toward 25 meV on the CPU"). The ``cpu`` preset keeps the scalar
#: model: in its 10 minutes the vector channels, at 1.7x the cost per molecule, did not pay
#: (58.5 against 58.3 meV; README, step 7).
STANDARD_ATTENTION = ATTENTION_PRESET | {"vector_features": True, "vector_messages": "sum"}
#: noisy-nodes denoising (0.02 Å, weight 0.1) for the attention potential under ``standard``;
#: weight 0.3 gave a lower validation MAE (25.0 against 25.6) but no lower test MAE (25.9)
STANDARD_DENOISE = {"denoise_sigma": 0.02}

#: The presets checkpoint at most every 30 s (and after the first and last epoch): an orbax save
#: of the default model took 0.55 s on 2 CPU cores, and on one H100 validation, metrics and the
#: save took ~0.6 s of each 2.5-second epoch (README, "Training on QM9").
SAVE_EVERY_S = 30.0

PRESETS: dict[str, Preset] = {
    "thesis": Preset((15_000, 4_300, 2_200), TrainConfig(
        loss="mse", reference=False, batch_size=8, lr=1e-3, schedule="step", epochs=200,
        checkpoint_every_s=SAVE_EVERY_S),
        "the MH-MP thesis: 15,000/4,300/2,200, batch 8, MSE, Adam 1e-3 x0.7 every 5 epochs"),
    "standard": Preset((110_000, 10_000, None), TrainConfig(
        model=DEFAULT_MODEL, loss="l1", batch_size=64, lr=1e-3, schedule="cosine", epochs=300,
        ema_decay=0.999, checkpoint_every_s=SAVE_EVERY_S),
        "the literature's split: 110,000/10,000/rest (the attention potential with vector "
        "channels and denoising)",
        models={DEFAULT_MODEL: STANDARD_ATTENTION}, trains={DEFAULT_MODEL: STANDARD_DENOISE}),
    "cpu": Preset((15_000, 1_000, 5_000), TrainConfig(
        model=DEFAULT_MODEL, loss="l1", batch_size=16, lr=1e-3, schedule="cosine", epochs=24,
        ema_decay=0.999, time_budget_min=10.0, checkpoint_every_s=SAVE_EVERY_S),
        "15,000 training molecules, 10 minutes of training on 2 CPU cores (MH-MP, if chosen, "
        "narrowed to dim 48, head_dim 16, edge_hidden 32 to fit more epochs)",
        models={"mhmp": CPU_MHMP, "mhmp_pe": CPU_MHMP, DEFAULT_MODEL: ATTENTION_PRESET}),
}


def _versions() -> dict:
    out = {}
    for pkg in ("mpattn", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def _device() -> str:
    import jax

    d = jax.devices()[0]
    hosts = f" ({jax.process_count()} processes)" if jax.process_count() > 1 else ""
    return f"{d.platform}:{d.device_kind} x{jax.device_count()}{hosts}"


def _planned(config: TrainConfig, data, model_config, *, resumed: dict | None,
             log) -> tuple[TrainConfig, Trainer | None]:
    """``config`` with the epochs that fit its time budget (see ``run_qm9(plan_epochs=...)``),
    and the trial trainer that timed them, whose compiled steps the run reuses (or None);
    ``resumed``: the checkpoint metadata of the run being resumed, whose plan stays."""
    import jax

    if resumed is not None:  # the schedule must stay the one the run started with
        epochs = int(resumed["config"]["epochs"])
        log(f"resuming the run's plan of {epochs} epochs")
        return dataclasses.replace(config, epochs=epochs, replan=True), None
    if jax.process_count() > 1:  # a throwaway trainer per process would need a shared folder
        log(f"{config.epochs} epochs (not planned from the budget in a multi-process run)")
        return config, None
    log(f"timing an epoch to plan the epochs of the {config.time_budget_min:g} min budget")
    plan = calibrate_epochs(
        lambda c, folder: Trainer(c, data, folder, model_config=model_config,
                                  log=lambda _msg: None),
        config, config.time_budget_min, epochs=1, reuse_trial=True)
    log(f"{plan.epochs} epochs fit the {config.time_budget_min:g} min budget (the "
        f"{config.schedule} schedule spans them; the run reuses the compiled steps)")
    return dataclasses.replace(config, epochs=plan.epochs, replan=True), plan.trial


#: TrainConfig fields a resumed run may change: its length, budget, checkpointing and how the
#: steps are laid out on the devices (the same arithmetic); any other field must stay the run's
RESUME_MAY_CHANGE = ("epochs", "time_budget_min", "replan", "checkpoint_every_s",
                     "keep_checkpoints", "num_devices", "steps_per_call", "eval_batch_size")


def resume_conflicts(meta: dict, config: TrainConfig, model_config) -> list[str]:
    """What ``config`` and ``model_config`` change of the run whose checkpoint metadata is
    ``meta``, as ``"name: run's value -> this one"`` lines (training fields the run did not
    record and :data:`RESUME_MAY_CHANGE` are not compared; model fields it did not record
    count as their defaults, see :func:`~mpattn.train.loop.run_settings`)."""
    stored, stored_model = run_settings(meta)
    out = [f"{f.name}: {getattr(stored, f.name)!r} -> {getattr(config, f.name)!r}"
           for f in dataclasses.fields(TrainConfig)
           if f.name not in RESUME_MAY_CHANGE and f.name in meta["config"]
           and getattr(stored, f.name) != getattr(config, f.name)]
    if stored.model == config.model:
        out += [f"{k}: {v!r} -> {getattr(model_config, k, None)!r}"
                for k, v in dataclasses.asdict(stored_model).items()
                if getattr(model_config, k, None) != v]
    return out


def preset_model_config(model: str, preset: str | None = None, overrides: dict | None = None):
    """``model``'s typed config under ``preset`` (a :data:`PRESETS` name, or None): its
    registry default, the preset's overrides of it, then ``overrides`` on top."""
    from mpattn.models import default_config

    preset_models = PRESETS[preset].models if preset in PRESETS else {}
    return default_config(model, **{**preset_models.get(model, {}), **(overrides or {})})


def run_qm9(config: TrainConfig, *, workdir: str | Path, sizes=None, split_file=None,
            resume: bool = False, dataset_cache: str | Path | None = None,
            model_overrides: dict | None = None, preset: str | None = None,
            plan_epochs: bool = False, progress: bool = True, log=print) -> dict:
    """Train and evaluate on QM9; writes results.json, metrics.csv, predictions.csv (val and test,
    per molecule), plots, checkpoints, split.

    Args:
        config: training settings (model name, target, loss, epochs, ...).
        workdir: output folder; with ``resume`` it must hold a previous run's checkpoints.
        sizes: (train, val, test) split sizes (test None: the rest).
        split_file: a split file of QM9 ids (overrides ``sizes``).
        resume: continue the run in ``workdir`` exactly where it stopped; ``config`` and the
            model config must be the run's but for :data:`RESUME_MAY_CHANGE` (ValueError
            listing what differs; :func:`~mpattn.train.loop.run_settings` reads them).
        dataset_cache: a featurized-QM9 cache file to load instead of qm9pack (no RDKit).
        model_overrides: model config fields (on top of the preset's, see :class:`Preset`).
        preset: a :data:`PRESETS` name: its model overrides apply; recorded in results.json.
        plan_epochs: with a time budget, replace ``config.epochs`` by the epochs that fit it,
            timed on a throwaway trainer (:func:`~mpattn.train.loop.calibrate_epochs`: a
            compiling epoch and a timed one), so that the schedule ends with the budget
            instead of being cut by it; the run reuses the trial's compiled steps and
            re-fits the plan to its own pace during its first half (``TrainConfig.replan``);
            with ``resume``, the epochs the run planned.
    """
    from mpattn.data.cache import load_molset
    from mpattn.data.qm9 import load_qm9, load_split, make_split, save_split

    t_start = time.perf_counter()
    workdir = Path(workdir)
    primary = is_primary()  # in a multi-process run only process 0 writes files and logs
    if not primary:
        log = lambda _msg: None  # noqa: E731
    if resume:
        if not (workdir / "checkpoints").is_dir():
            raise ValueError(f"--resume: {workdir} holds no checkpoints/ folder (nothing to "
                             "resume); run without --resume to start")
        split_file = split_file or workdir / "split.json"
    model_config = preset_model_config(config.model, preset, model_overrides)
    # the model config as built (its denoising head on if config asks); bad settings fail here,
    # before the data loads
    built_config = with_training_heads(config, model_config)
    resumed = None  # the checkpoint metadata of the run being resumed
    if resume:  # a model of the same parameters but other settings would restore silently
        from mpattn.train.checkpoint import latest_meta

        resumed = latest_meta(workdir / "checkpoints")
        conflicts = resume_conflicts(resumed, config, model_config)
        if conflicts:
            raise ValueError(f"--resume: the run in {workdir} was started with other "
                             f"settings ({'; '.join(conflicts)}); resume with the run's own "
                             "(leave those options out) or start a new --workdir")
    workdir.mkdir(parents=True, exist_ok=True)
    ms = load_molset(Path(dataset_cache)) if dataset_cache else load_qm9(progress=progress,
                                                                          log=log)
    if split_file is not None:
        split = load_split(split_file, available=ms.ids)
    else:
        split = make_split(ms.ids, sizes=sizes, seed=config.seed)
    if primary:
        save_split(split, workdir / "split.json")
    log(f"split: {len(split.train):,} train / {len(split.val):,} val / {len(split.test):,} test")
    data = prepare(ms, split, config)
    trial = None
    if plan_epochs and config.time_budget_min:
        config, trial = _planned(config, data, model_config, resumed=resumed, log=log)
    trainer = Trainer(config, data, workdir, model_config=model_config, log=log,
                      compiled_from=trial)
    del trial
    if resume:
        trainer.restore("latest")
        log(f"resumed at epoch {trainer.epoch} (step {int(trainer.carry['step'])})")
    log(f"model {config.model}: {trainer.num_params:,} parameters; "
        f"{trainer.steps_per_epoch} batches per epoch; device {_device()}")
    history = trainer.fit(progress=progress)
    config = trainer.config  # with the epochs re-planned during the run (config.replan)
    if trainer.checkpoints.best_step() is not None:
        trainer.restore("best")
    val, test = trainer.report(data.val), trainer.report(data.test)
    key = "mae_mev" if "mae_mev" in test else "mae"
    log(f"test MAE {test[key]:.2f} {'meV' if key == 'mae_mev' else ''} "
        f"(val {val[key]:.2f}); best epoch {trainer.epoch}")
    train_s = sum(r["seconds"] for r in history)
    results = {
        "target": config.target,
        "preset": preset,
        "test": {k: v for k, v in test.items() if not k.startswith("_")},
        "val": {k: v for k, v in val.items() if not k.startswith("_")},
        "epochs": len(history),
        "best_epoch": trainer.epoch,
        "train_seconds": train_s,
        "wall_seconds": time.perf_counter() - t_start,
        "train_mol_per_s": float(np.median([r["train_mol_per_s"] for r in history]))
        if history else None,
        "params": trainer.num_params,
        "device": _device(),
        "python": platform.python_version(),
        "versions": _versions(),
        "config": dataclasses.asdict(config),
        "model_config": dataclasses.asdict(built_config),
        "split_sizes": [len(split.train), len(split.val), len(split.test)],
    }
    if not primary:
        return results
    write_json(workdir / "results.json", results)
    write_predictions(workdir / "predictions.csv", {
        name: (part.ids, part.n_atoms, part.true, rep["_pred"])
        for name, part, rep in (("val", data.val, val), ("test", data.test, test))})
    if history:
        plot_curves(history, workdir / "curves.png")
    unit = "eV" if key == "mae_mev" else config.target
    offset, quantity = None, config.target
    if config.reference:
        offset = data.transform.reference(data.test.counts)
        quantity = f"{config.target} − Σ n_e E_e"
    plot_parity(test["_pred"], data.test.true, workdir / "parity.png", unit=unit,
                offset=offset, quantity=quantity)
    plot_per_size(test["per_size"], workdir / "per_size.png", key=key,
                  unit="meV" if key == "mae_mev" else unit)
    return results
