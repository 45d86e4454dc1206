"""The one trainer: a task, its prepared data and a :class:`~mpattn.train.config.TrainConfig`
in; metrics, orbax checkpoints and exact resumption out.

The device sees only what the task puts in the graphs (standardised residual targets,
float32 by default); decoding and metrics run on the host in float64. Checkpoints are
written at epoch ends; each epoch's batch order is a function of (seed, epoch), so a run
killed mid-epoch resumes from the last epoch end and replays the same batches: the final
metrics equal those of an uninterrupted run.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mpattn.data.loader import BatchLoader, derive_budgets
from mpattn.models import create_model, default_config
from mpattn.train.checkpoint import CHECKPOINT_FORMAT, Checkpointer
from mpattn.train.config import TrainConfig
from mpattn.train.distributed import agree, is_primary, process_positions
from mpattn.train.schedules import CosineState, current_lr, ema_init, make_optimizer
from mpattn.train.steps import data_mesh, make_train_step, stack_batches, stack_steps

__all__ = ["Trainer", "TrainingDiverged", "build_state"]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the step."""


def readout_labels(params) -> dict:
    """``"train"`` for the parameters under a ``readout`` module, ``"frozen"`` for the others
    (the labels of ``TrainConfig.trainable = "readout"``)."""
    def label(path, _leaf):
        return "train" if any(getattr(k, "key", None) == "readout" for k in path) else "frozen"

    labels = jax.tree_util.tree_map_with_path(label, params)
    if "train" not in jax.tree.leaves(labels):
        raise ValueError("--train-only-readout: the model has no parameters under a 'readout' "
                         "module")
    return labels


def _replace_scalar(old: jax.Array, value) -> jax.Array:
    """``value`` as an array like ``old``: its dtype, and its placement only if ``old`` was
    committed to one. A committed copy of an uncommitted leaf changes the train step's
    signature, and the next call recompiles it (and the step after that once more: its
    outputs are committed then), about 20 s for a potential on 2 CPU cores."""
    new = jnp.asarray(value, old.dtype)
    return jax.device_put(new, old.sharding) if old.committed else new


def build_state(config: TrainConfig, task, data, model_config, *, steps_per_epoch: int,
                init_params=None):
    """A fresh module and training state for ``config`` and ``task`` (also the restore
    template of a run's checkpoints); ``init_params`` (an ``nnx.State`` of the module's
    ``nnx.Param``s, e.g. a trained run's for fine-tuning) replaces the initial parameters.

    Returns:
        ``(module, graphdef, rest, optimizer, carry)``: ``carry`` is the pytree the train step
        updates and checkpoints hold, ``{"params", "opt", "step"[, "ema"]}`` (float64 with
        ``config.x64``); ``rest`` is the module's non-trainable state (a potential's
        reference table), rebuilt from the task's data, never updated.
    """
    model = create_model(config.model, rngs=nnx.Rngs(config.seed), config=model_config)
    module = task.module(model, data)
    if init_params is not None:  # copies: the train step donates its buffers
        nnx.update(module, jax.tree.map(lambda x: jnp.array(x, copy=True), init_params))
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    if config.x64:
        def wide(x):
            return x.astype(jnp.float64) if jnp.issubdtype(x.dtype, jnp.floating) else x
        params, rest = jax.tree.map(wide, params), jax.tree.map(wide, rest)
        nnx.update(module, params, rest)
    optimizer = make_optimizer(config.lr, schedule=config.schedule,
                               steps_per_epoch=steps_per_epoch, epochs=config.epochs,
                               clip_norm=config.clip_norm, weight_decay=config.weight_decay)
    if config.trainable == "readout":
        optimizer = optax.multi_transform({"train": optimizer, "frozen": optax.set_to_zero()},
                                          readout_labels(params))
    carry = {"params": params, "opt": optimizer.init(params), "step": jnp.zeros((), jnp.int32)}
    if config.ema_decay:
        carry["ema"] = ema_init(params)
    return module, graphdef, rest, optimizer, carry


class Trainer:
    """Trains ``config.model`` on a task's prepared data, writing ``metrics.csv`` and
    checkpoints into ``workdir``.

    Args:
        config: the run's :class:`~mpattn.train.config.TrainConfig` (checked here).
        task: a :class:`~mpattn.train.property.PropertyTask` or
            :class:`~mpattn.train.forces.EnergyForceTask` (or a task of yours).
        data: ``task.prepare(...)``'s output.
        workdir: output folder (created; an existing file there is an error).
        model_config: the model's typed config (default: its registry default); the task
            switches on heads its terms need.
        log: where one-line messages go.
        compiled_from: a trainer of the same data, model and settings but for the run's
            length, budget and checkpointing (e.g. a trial that timed an epoch): its compiled
            steps are reused, nothing is compiled again. The cosine schedule's length is in
            the optimizer state, not in the compiled step.
        run_info: JSON-able notes recorded in every checkpoint (e.g. how the epochs were
            planned), read back by :func:`mpattn.load_run` and ``--resume``.
        init_params: start from these parameters (an ``nnx.State`` of the module's
            ``nnx.Param``s; fine-tuning) instead of a fresh initialisation.
    """

    compiled_steps = ("train_step", "train_steps", "predict_step")

    def __init__(self, config: TrainConfig, task, data, workdir: str | Path, *,
                 model_config=None, log: Callable[[str], None] = print,
                 compiled_from: Trainer | None = None, run_info: dict | None = None,
                 init_params=None):
        config.check()
        task.check()
        task.check_data(data)
        if config.x64 and not jax.config.jax_enable_x64:
            raise ValueError("x64=True needs jax.config.update('jax_enable_x64', True) first")
        self.config, self.task, self.data = config, task, data
        self.log = log if is_primary() else (lambda _msg: None)
        self.run_info = dict(run_info or {})
        self.workdir = Path(workdir)
        if self.workdir.exists() and not self.workdir.is_dir():
            raise ValueError(f"--workdir {self.workdir}: exists and is not a folder")
        default = default_config(config.model)
        if model_config is not None and type(model_config) is not type(default):
            raise ValueError(f"model_config is a {type(model_config).__name__}, but --model "
                             f"{config.model!r} takes a {type(default).__name__}")
        self.model_config = task.model_config(model_config or default)
        # with several devices every batch of a step must have the same shape, and the steps
        # of one call too: one budget (greedy packing cuts by the largest budget either way,
        # so the batches hold the same structures; only their padding grows)
        budgets = None
        if (config.num_devices or jax.device_count()) > 1 or config.steps_per_call > 1:
            budgets = derive_budgets(data.train.graphs, config.batch_size, num_budgets=1)
        self.loader = BatchLoader(data.train.graphs, config.batch_size, seed=config.seed,
                                  budgets=budgets)
        self.steps_per_epoch = len(self.loader)
        self.module, self.graphdef, self.rest, self.optimizer, self.carry = build_state(
            config, task, data, self.model_config, steps_per_epoch=self.steps_per_epoch,
            init_params=init_params)
        self._eval_loaders: dict[int, BatchLoader] = {}
        self._check_batches()
        self.num_params = int(sum(x.size for x in jax.tree.leaves(self.carry["params"])))
        self.epoch = 0
        self.history: list[dict] = []
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.checkpoints = Checkpointer(self.workdir / "checkpoints",
                                        max_to_keep=config.keep_checkpoints)
        self.mesh = data_mesh(config.num_devices)
        self._bar = None
        if compiled_from is not None:
            self._reuse_steps(compiled_from)
            return
        # the steps take and return the carry's flat leaves (self.leaves)
        self.train_step = make_train_step(self.graphdef, self.optimizer, config, task,
                                          treedef=self.carry_def)
        # K steps per call; an epoch's last steps_per_epoch % K steps go through train_step
        self.train_steps = (make_train_step(self.graphdef, self.optimizer, config, task,
                                            scan=True, treedef=self.carry_def)
                            if config.steps_per_call > 1 else None)
        # over the graphdef, not self: a run built on a trial's steps does not keep the trial
        graphdef = self.graphdef
        self.predict_step = jax.jit(
            lambda params, rest, graph: task.predictions(nnx.merge(graphdef, params, rest),
                                                         graph))

    def _check_batches(self) -> None:
        """Eager checks of every batch against the module (elements it knows, the sizes of a
        static layout): errors inside ``jax.jit`` could not name the problem."""
        if not hasattr(self.module, "check"):
            return
        for b in BatchLoader(self.data.train.graphs, self.config.batch_size, prefetch=0,
                             shuffle=False):
            self.module.check(b)
        for part in (self.data.val, self.data.test):
            if len(part.graphs):
                for b in self._eval_loader(part):
                    self.module.check(b)

    def _reuse_steps(self, other: Trainer) -> None:
        """Take over ``other``'s compiled steps if nothing they read differs: settings but
        for the run's length, budget and checkpointing, the task, the model config, the data,
        the batches per epoch, the carry's structure and the devices."""
        def same_steps(c):  # the fields no compiled step reads
            return dataclasses.replace(c, epochs=1, time_budget_min=None,
                                       checkpoint_every_s=0.0, keep_checkpoints=1)

        differ = [what for what, same in (
            ("settings", same_steps(self.config) == same_steps(other.config)),
            ("task", self.task == other.task),
            ("model config", self.model_config == other.model_config),
            ("data", self.data is other.data),
            ("batches per epoch", self.steps_per_epoch == other.steps_per_epoch),
            ("training state structure", self.carry_def == other.carry_def),
            ("devices", self.mesh == other.mesh)) if not same]
        if differ:
            raise ValueError(f"compiled_from: that trainer differs in {', '.join(differ)}; "
                             "its compiled steps do not fit this run")
        for name in self.compiled_steps:
            setattr(self, name, getattr(other, name))

    # ------------------------------------------------------------------ state

    @property
    def carry(self) -> dict:
        """The training state as a dict of nnx ``State`` s, rebuilt from :attr:`leaves` (the
        flat list of arrays the jit-compiled steps take and return)."""
        return jax.tree.unflatten(self.carry_def, self.leaves)

    @carry.setter
    def carry(self, value: dict) -> None:
        self.leaves, self.carry_def = jax.tree.flatten(value)

    def eval_params(self):
        """The evaluated parameters: the EMA copy if kept, else the raw ones."""
        return self.carry.get("ema", self.carry["params"])

    # ------------------------------------------------------------------ batches

    def _groups(self, epoch: int):
        """The epoch's batches, D at a time (lists of numpy batches, one per device)."""
        d = self.mesh.size
        keep = None
        if jax.process_count() > 1:  # assemble only this process's devices' batches
            mine = set(process_positions(self.mesh))
            keep = lambda i: i % d in mine  # noqa: E731
        group = []
        for batch in self.loader.epoch(epoch, keep=keep):
            group.append(batch)
            if len(group) == d:
                yield group
                group = []
        if group:  # fill the last group with batches of padding only (weight 0)
            yield group + [self.loader.empty_batch()] * (d - len(group))

    def _calls(self, epoch: int):
        """``(k, stacked)`` per train-step call of the epoch: K groups stacked for the scanned
        step (k = K), or one group for the plain step (k = 1: K = 1, or the epoch's last
        steps when fewer than K are left)."""
        k = self.config.steps_per_call
        pending = []
        for group in self._groups(epoch):
            if k == 1:
                yield 1, stack_batches(group, self.mesh)
                continue
            pending.append(group)
            if len(pending) == k:
                yield k, stack_steps(pending, self.mesh)
                pending = []
        for group in pending:
            yield 1, stack_batches(group, self.mesh)

    def _eval_loader(self, part) -> BatchLoader:
        key = id(part.graphs)
        if key not in self._eval_loaders:
            self._eval_loaders[key] = BatchLoader(part.graphs, self.config.eval_batch_size,
                                                  shuffle=False, prefetch=2)
        return self._eval_loaders[key]

    # ------------------------------------------------------------------ evaluation

    def _part(self, part):
        return getattr(self.data, part) if isinstance(part, str) else part

    def predict(self, part) -> dict[str, np.ndarray]:
        """The task's raw predictions for every structure of ``part`` (``"train"``,
        ``"val"``, ``"test"`` or a part object), float64, in the part's order: per-graph
        outputs [G], per-node outputs [N, ...]."""
        part = self._part(part)
        gs = part.graphs
        where = {int(i): k for k, i in enumerate(gs.ids)}
        offsets = np.concatenate([[0], np.cumsum(gs.n_node)]).astype(np.int64)
        kinds = self.task.prediction_kinds
        out: dict[str, np.ndarray] = {}
        params = self.eval_params()
        for b in self._eval_loader(part):
            pred = {k: np.asarray(v, np.float64) for k, v in
                    self.predict_step(params, self.rest, b).items()}
            ids = np.asarray(b.globals["id"])
            real = np.nonzero(ids >= 0)[0]
            places = np.array([where[int(i)] for i in ids[real]], np.int64)
            start = np.concatenate([[0], np.cumsum(b.n_node)])
            for name, value in pred.items():
                if name not in out:
                    rows = len(gs) if kinds[name] == "graph" else int(offsets[-1])
                    out[name] = np.zeros((rows,) + value.shape[1:], np.float64)
                if kinds[name] == "graph":
                    out[name][places] = value[real]
                    continue
                for k, p in zip(real, places, strict=True):
                    out[name][offsets[p]:offsets[p + 1]] = value[start[k]:start[k + 1]]
        return out

    def report(self, part) -> dict:
        """Errors of ``part`` in physical units (the task's report; its predictions under
        keys starting with ``_``)."""
        part = self._part(part)
        return self.task.report(self.data, part, self.predict(part))

    # ------------------------------------------------------------------ loop

    def _run_epoch(self, epoch: int) -> list:
        losses = []
        for k, stacked in self._calls(epoch):
            step = self.train_step if k == 1 else self.train_steps
            self.leaves, loss = step(self.leaves, self.rest, stacked)
            losses.append(loss)
        return losses

    def _epoch_row(self, losses: np.ndarray, t0: float, train_s: float) -> dict:
        val = self.report(self.data.val)
        srt = np.sort(losses)
        return {
            "epoch": self.epoch + 1,
            "step": int(self.carry["step"]),
            "train_loss": float(losses.mean()),
            "train_loss_low5": float(srt[:5].mean()),
            "train_loss_high5": float(srt[-5:].mean()),
            **self.task.row(val),
            "lr": float(current_lr(self.carry["opt"])),
            "seconds": time.perf_counter() - t0,
            self.task.rate_key: len(self.data.train.graphs) / train_s,
        }

    def elapsed_s(self) -> float:
        """Seconds of training so far (the time budget's clock): earlier runs' epochs (from
        the history) plus this ``fit`` call's wall time."""
        return self._spent + time.perf_counter() - self._t_start

    def fit(self, progress: bool = True,
            after_epoch: Callable[[Trainer, bool], None] | None = None) -> list[dict]:
        """Train until ``config.epochs`` or the time budget; returns the per-epoch rows.

        Each epoch: the train steps, a NaN/inf check naming the step, a metrics row (the
        validation errors) into ``metrics.csv``, then a checkpoint scored by the task's
        ``score_key``. With ``config.checkpoint_every_s`` > 0 only epochs ending at least that
        long after the previous save are saved, besides the first and the last (the run's end
        or its time budget): for short epochs, where a save costs as much as the epoch.

        Args:
            progress: a tqdm bar of epochs.
            after_epoch: ``after_epoch(trainer, stopping)`` after each epoch's row, before its
                checkpoint: a planner may change the run's length there with
                :meth:`set_epochs` (the checkpoint then holds the new plan).
        """
        from tqdm.auto import tqdm

        budget_s = None if self.config.time_budget_min is None \
            else 60 * self.config.time_budget_min
        every_s = self.config.checkpoint_every_s
        self._t_start = time.perf_counter()
        self._spent = sum(r["seconds"] for r in self.history)
        last_save = -math.inf
        with tqdm(total=self.config.epochs, initial=self.epoch, desc="epochs", unit="epoch",
                  disable=not progress or not is_primary()) as bar:
            self._bar = bar
            while self.epoch < self.config.epochs:
                t0 = time.perf_counter()
                step0 = int(self.carry["step"])
                losses = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in
                                         jax.device_get(self._run_epoch(self.epoch))])
                if not np.all(np.isfinite(losses)):
                    bad = int(np.nonzero(~np.isfinite(losses))[0][0])
                    raise TrainingDiverged(
                        f"loss is {losses[bad]} at step {step0 + bad + 1} (epoch "
                        f"{self.epoch + 1}); the last good checkpoint (step "
                        f"{self.checkpoints.latest_step()}) is kept")
                row = self._epoch_row(losses, t0, time.perf_counter() - t0)
                self.history.append(row)
                self.epoch += 1
                self._write_metrics()
                # every process stops together (a lone one would leave the others waiting)
                stop = budget_s is not None and agree(
                    self.elapsed_s() + row["seconds"] > budget_s)
                if after_epoch is not None:
                    after_epoch(self, stop)
                # orbax saves are collective: the processes agree on whether one is due
                if (stop or self.epoch >= self.config.epochs or every_s <= 0
                        or agree(time.perf_counter() - last_save >= every_s)):
                    self.save(row[self.task.score_key])
                    last_save = time.perf_counter()
                bar.update(1)
                bar.set_postfix(**self.task.postfix(row))
                if stop:
                    self.log(f"time budget of {self.config.time_budget_min:g} min reached "
                             f"after {self.epoch} epochs")
                    break
        self._bar = None
        return self.history

    def set_epochs(self, epochs: int) -> bool:
        """Change the run's length to ``epochs`` (its config and the cosine schedule's length
        in the optimizer state); False (nothing changed) if the optimizer holds no cosine
        schedule, whose length is fixed in the compiled step."""
        carry, found = self.carry, []

        def one(x):
            if not isinstance(x, CosineState):
                return x
            found.append(x)
            total = epochs * self.steps_per_epoch
            warm = min(int(x.warmup_steps), total // 2)
            return x._replace(total_steps=_replace_scalar(x.total_steps, total),
                              warmup_steps=_replace_scalar(x.warmup_steps, warm))

        carry["opt"] = jax.tree.map(one, carry["opt"],
                                    is_leaf=lambda x: isinstance(x, CosineState))
        if not found:
            return False
        self.carry = carry
        self.config = dataclasses.replace(self.config, epochs=epochs)
        if self._bar is not None:
            self._bar.total = epochs
        return True

    def _write_metrics(self) -> None:
        if not is_primary():
            return
        with (self.workdir / "metrics.csv").open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(self.history[0]))
            w.writeheader()
            w.writerows(self.history)

    # ------------------------------------------------------------------ persistence

    def meta(self) -> dict:
        """Checkpoint metadata: everything :func:`mpattn.load_run` needs, no data."""
        return json.loads(json.dumps({
            "format": CHECKPOINT_FORMAT,
            "epoch": self.epoch,
            "history": self.history,
            "config": dataclasses.asdict(self.config),
            "task": self.task.to_dict(),
            "task_state": self.task.state(self.data),
            "model_config": dataclasses.asdict(self.model_config),
            "run_info": self.run_info,
        }, default=lambda o: o.item() if hasattr(o, "item") else str(o)))

    def save(self, score: float) -> dict:
        """Checkpoint the current step; ``score`` (the task's validation score) ranks
        "best"."""
        return self.checkpoints.save(int(self.carry["step"]), self.carry, meta=self.meta(),
                                     val_mae=score if math.isfinite(score) else None)

    def restore(self, which: str = "latest") -> None:
        """Load the workdir's latest checkpoint (to continue training exactly: metrics.csv
        is cut back to it) or its best one (to evaluate: the training state stays as it
        was)."""
        self.carry, meta = self.checkpoints.restore(self.carry, which=which)
        self.epoch = int(meta["epoch"])
        if which == "latest":
            self.history = list(meta["history"])
            if self.history:
                self._write_metrics()
