"""The training engine: one jit-compiled train step over ``(graphdef, state)``, epochs,
validation in physical units, orbax checkpoints and exact resumption.

The device only sees standardised residual targets (float32); references, decoding and
metrics run on the host in float64 (:mod:`mpattn.train.targets`). Checkpoints are written at
epoch ends; each epoch's batch order is a function of (seed, epoch), so a run killed mid-epoch
resumes from the last epoch end and replays the same batches: the final metrics equal those
of an uninterrupted run.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mpattn.data.graphset import GraphSet
from mpattn.data.loader import BatchLoader, derive_budgets
from mpattn.data.molecules import MoleculeSet
from mpattn.data.qm9 import Split
from mpattn.featurize import FeaturizeOptions
from mpattn.graph import graph_mask, node_mask
from mpattn.models import create_model, default_config
from mpattn.train.checkpoint import (
    Checkpointer,
    recorded_config,
    recorded_model_config,
)
from mpattn.train.distributed import agree, is_primary, process_positions
from mpattn.train.losses import cap_per_size, graph_weights, loss_value, size_range
from mpattn.train.metrics import error_report
from mpattn.train.schedules import (
    CosineState,
    current_lr,
    ema_init,
    ema_update,
    make_optimizer,
)
from mpattn.train.targets import TargetTransform, element_counts

__all__ = [
    "EpochLoop",
    "EpochPlan",
    "Prepared",
    "TrainConfig",
    "Trainer",
    "TrainingDiverged",
    "add_position_noise",
    "build_carry",
    "calibrate_epochs",
    "data_mesh",
    "dipole_error",
    "jit_carry",
    "make_train_step",
    "masked_node_mean",
    "prepare",
    "run_settings",
    "stack_batches",
    "stack_steps",
    "with_training_heads",
]

ELEMENTS = (1, 6, 7, 8, 9)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the step."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run depends on besides the data and the model's own config."""

    model: str = "mhmp"
    target: str = "U0"
    reference: bool = True  # per-element linear reference subtracted before standardising
    loss: str = "l1"
    weighting: str = "none"
    weight_r: float = 1.0
    lr: float = 1e-3
    schedule: str = "step"
    epochs: int = 200
    batch_size: int = 32
    eval_batch_size: int = 256
    clip_norm: float | None = 10.0
    weight_decay: float = 0.0  # AdamW's decoupled decay of the weight matrices (0: Adam)
    ema_decay: float | None = None
    seed: int = 0
    time_budget_min: float | None = None
    edge_set: str = "complete"
    cutoff: float | None = None
    keep_checkpoints: int = 3
    checkpoint_every_s: float = 0.0  # >0: save after epochs this long after the last save
    num_devices: int | None = None  # data parallelism over this many devices (None: all)
    steps_per_call: int = 1  # >1: that many train steps per jit call (lax.scan), one budget
    min_atoms: int | None = None  # train only on molecules of this size range
    max_atoms: int | None = None
    cap_per_size: int | None = None  # at most this many training molecules per atom count
    # with a time budget and the cosine schedule: after each epoch of the run's first half,
    # re-fit the schedule's length to the epochs that still fit the budget at the measured
    # pace (run_qm9 sets it for runs whose epochs it planned; see EpochLoop.fit)
    replan: bool = False
    # > 0: denoising auxiliary ("noisy nodes", Godwin et al., ICLR 2022): every training batch
    # gets Gaussian noise of this many Å on its positions, the energy loss reads the noisy
    # batch, and the model also predicts the noise (in units of sigma) with weight
    # denoise_weight on the mean squared error; needs a model with a denoising head
    # (attention_potential with vector_features; build_carry turns its head on)
    denoise_sigma: float = 0.0
    denoise_weight: float = 0.1
    # > 0: dipole auxiliary (PhysNet's): the model's atomic charges (attention_potential with
    # electrostatics) give a dipole Σ q_i r_i per molecule whose length is fitted to QM9's
    # dipole moment mu, with this weight on the absolute error in Debye; it teaches the
    # charges of the Coulomb term in e, which energies alone did not (README)
    dipole_weight: float = 0.0


@dataclass
class Split3:
    """One part of a split, ready to batch: graphs with standardised targets + host truth."""

    graphs: GraphSet
    true: np.ndarray  # float64 [G], target units
    counts: np.ndarray  # float64 [G, elements]
    n_atoms: np.ndarray  # int [G]
    ids: np.ndarray | None = None  # int64 [G] dataset ids (QM9 indices), when known


@dataclass
class Prepared:
    train: Split3
    val: Split3
    test: Split3
    transform: TargetTransform
    elements: tuple[int, ...] = ELEMENTS
    extra: dict = field(default_factory=dict)


def prepare(ms: MoleculeSet, split: Split, config: TrainConfig) -> Prepared:
    """Graphs of each split part; the target transform is fitted on the training part."""
    if config.target not in ms.targets:
        raise ValueError(f"unknown target {config.target!r}; choose from {sorted(ms.targets)}")
    options = FeaturizeOptions(edge_set=config.edge_set, cutoff=config.cutoff)
    parts = {}
    for name in ("train", "val", "test"):
        sub = ms.subset(ms.index_of(getattr(split, name)))
        if name == "train":  # sampling options of the size study apply to training only
            keep = size_range(sub.n_atoms, config.min_atoms, config.max_atoms)
            sub = sub.subset(keep)
            if config.cap_per_size:
                sub = sub.subset(cap_per_size(sub.n_atoms, config.cap_per_size, config.seed))
            if len(sub) == 0:
                raise ValueError("no training molecules left after --min-atoms/--max-atoms/"
                                 "--cap-per-size")
        counts = element_counts(sub.z, sub.n_atoms, ELEMENTS)
        parts[name] = (sub, counts)
    seen = parts["train"][1].sum(axis=0) > 0
    for name in ("val", "test") if config.reference else ():
        unseen = (parts[name][1].sum(axis=0) > 0) & ~seen
        if unseen.any():
            from ase.data import chemical_symbols

            missing = [chemical_symbols[ELEMENTS[i]] for i in np.nonzero(unseen)[0]]
            raise ValueError(f"element(s) {missing} occur in the {name} split but not in the "
                             "training split: the per-element reference cannot be fitted")
    sub, counts = parts["train"]
    transform = TargetTransform.fit(sub.targets[config.target], counts,
                                    reference=config.reference, elements=ELEMENTS)
    out = {}
    for name, (sub, counts) in parts.items():
        gs = sub.to_graphset(options, targets=[])
        true = sub.targets[config.target].astype(np.float64)
        gs.globals["y"] = transform.encode(true, counts).astype(np.float32)
        if config.dipole_weight > 0:  # the dipole loss's target, Debye
            if "mu" not in sub.targets:
                raise ValueError("dipole_weight needs the dipole moment 'mu' of every "
                                 "molecule (QM9's)")
            gs.globals["mu"] = sub.targets["mu"].astype(np.float32)
        out[name] = Split3(gs, true, counts, sub.n_atoms.astype(np.int64),
                           np.asarray(sub.ids, np.int64))
    return Prepared(out["train"], out["val"], out["test"], transform)


def run_settings(meta: dict):
    """``(TrainConfig, model config)`` a run was started with, from its checkpoint metadata.
    A model config field a run of an older version did not record takes its class's default,
    which is the value the model had before the field existed (the presets, not those
    classes, choose newer settings such as ``attention_weights``)."""
    config = recorded_config(TrainConfig, meta["config"])
    return config, recorded_model_config(config.model, meta["model_config"])


def with_training_heads(config: TrainConfig, model_config):
    """``model_config`` with its denoising head on when ``config.denoise_sigma`` > 0 (the
    model config unchanged otherwise); ValueError for bad settings, or for a model without the
    head (denoising) or the charges (``dipole_weight``) that they need."""
    if config.denoise_sigma < 0 or config.denoise_weight < 0:
        raise ValueError(f"denoise_sigma and denoise_weight must be >= 0, got "
                         f"{config.denoise_sigma}, {config.denoise_weight}")
    if config.dipole_weight < 0:
        raise ValueError(f"dipole_weight must be >= 0, got {config.dipole_weight}")
    if config.dipole_weight > 0 and not getattr(model_config, "electrostatics", False):
        raise ValueError(f"dipole_weight={config.dipole_weight} needs a model with atomic "
                         "charges: attention_potential with electrostatics (--model-config "
                         f"'{{\"electrostatics\": true}}'), got {config.model} without")
    if config.denoise_sigma == 0:
        return model_config
    if not getattr(model_config, "vector_features", False):
        raise ValueError(f"denoise_sigma={config.denoise_sigma} needs a model with a denoising "
                         "head: attention_potential with vector_features (--model-config "
                         f"'{{\"vector_features\": true}}'), got {config.model} without "
                         "vector channels (--denoise-sigma 0 turns denoising off)")
    return dataclasses.replace(model_config, denoise=True)


def build_carry(config: TrainConfig, model_config, *, steps_per_epoch: int):
    """A fresh model and training state for ``config``.

    Returns:
        ``(model, graphdef, optimizer, carry)`` where ``carry`` is the pytree the train step
        updates and checkpoints hold: ``{"params", "rest", "opt", "step"[, "ema"]}``. Its
        structure depends only on the configs, so it is also the restore template.
    """
    model_config = with_training_heads(config, model_config)
    model = create_model(config.model, rngs=nnx.Rngs(config.seed), config=model_config)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    optimizer = make_optimizer(config.lr, schedule=config.schedule,
                               steps_per_epoch=steps_per_epoch, epochs=config.epochs,
                               clip_norm=config.clip_norm, weight_decay=config.weight_decay)
    carry = {"params": params, "rest": rest, "opt": optimizer.init(params),
             "step": jnp.zeros((), jnp.int32)}
    if config.ema_decay:
        carry["ema"] = ema_init(params)
    return model, graphdef, optimizer, carry


def data_mesh(num_devices: int | None = None):
    """A 1-d ``jax.sharding.Mesh`` named ``"data"`` over the first ``num_devices`` devices
    (default: all); multi-host runs call ``jax.distributed.initialize()`` first."""
    from jax.sharding import Mesh

    devices = jax.devices()
    n = len(devices) if num_devices is None else num_devices
    if not 1 <= n <= len(devices):
        raise ValueError(f"num_devices={num_devices}, but {len(devices)} device(s) are visible")
    return Mesh(np.array(devices[:n]), ("data",))


def stack_batches(batches: list, mesh=None):
    """Stack D equally shaped padded batches along a new leading axis (one per device) and,
    with a mesh, shard that axis over its ``"data"`` devices (parameters stay replicated).

    In a multi-process run only this process's positions of ``batches``
    (:func:`~mpattn.train.distributed.process_positions`) are read, the others may be
    ``None``: every process contributes its own devices' batches to the global array.
    """
    return _stacked([batches], mesh, steps=False)


def stack_steps(groups: list, mesh=None):
    """K groups of D equally shaped batches (one group per train step) stacked to arrays of
    shape ``[K, D, ...]`` for the scanned train step (``make_train_step(..., scan=True)``);
    with a mesh, the D axis is sharded as in :func:`stack_batches`."""
    return _stacked(groups, mesh, steps=True)


def _stacked(groups: list, mesh, *, steps: bool):
    k, d = len(groups), len(groups[0])
    multi = mesh is not None and mesh.size > 1 and jax.process_count() > 1
    if multi and d != mesh.size:
        raise ValueError(f"{d} batches for a mesh of {mesh.size} devices")
    positions = process_positions(mesh) if multi else range(d)
    picked = [group[i] for group in groups for i in positions]
    lead = (k, len(positions)) if steps else (len(positions),)
    stacked = jax.tree.map(lambda *xs: np.stack(xs).reshape(*lead, *xs[0].shape), *picked)
    if mesh is None or mesh.size == 1:
        return stacked
    from jax.sharding import NamedSharding, PartitionSpec

    sharding = NamedSharding(mesh, PartitionSpec(None, "data") if steps
                             else PartitionSpec("data"))
    if not multi:
        return jax.device_put(stacked, sharding)
    full = (k, mesh.size) if steps else (mesh.size,)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(
        sharding, x, (*full, *x.shape[len(lead):])), stacked)


def apply_gradients(carry: dict, grads, loss, optimizer, ema_decay: float | None) -> dict:
    """One optimizer update of ``carry["params"]`` (and of the EMA weights, if kept).

    Used inside the jit-compiled train steps of :class:`Trainer` and of
    ``mpattn.train.potential.PotentialTrainer``; ``loss`` feeds reduce-on-plateau schedules.
    """
    updates, opt = optimizer.update(grads, carry["opt"], carry["params"], value=loss)
    params = optax.apply_updates(carry["params"], updates)
    out = {**carry, "params": params, "opt": opt, "step": carry["step"] + 1}
    if ema_decay:
        out["ema"] = ema_update(carry["ema"], params, ema_decay, step=carry["step"])
    return out


def jit_carry(fn: Callable, treedef=None) -> Callable:
    """``jax.jit`` of a step ``fn(carry, *args) -> (carry, out)``, the carry donated.

    With ``treedef`` (the carry's ``jax.tree.structure``) the compiled function takes and
    returns the carry as its flat list of leaves instead (``(leaves, *args) -> (leaves,
    out)``): the host then hands XLA a list of arrays, where an nnx ``State`` carry is
    flattened and rebuilt through Python at every call. Measured on 2 CPU cores for the
    default model's carry (301 arrays, EMA on): 3.5 ms of host time per call as ``State``
    dicts, 0.5 ms as a list. Trainers keep the leaves (:class:`EpochLoop`'s ``carry``
    property rebuilds the dict on demand).
    """
    if treedef is None:
        return jax.jit(fn, donate_argnums=0)

    def flat(leaves, *args):
        carry, out = fn(jax.tree.unflatten(treedef, leaves), *args)
        new, new_def = jax.tree.flatten(carry)
        if new_def != treedef:
            raise ValueError(f"{fn.__name__} changed the carry's structure: {new_def} "
                             f"!= {treedef}")
        return new, out

    flat.__name__ = flat.__qualname__ = fn.__name__  # compile logs name the step
    return jax.jit(flat, donate_argnums=0)


def add_position_noise(graph, key, sigma: float):
    """``graph`` with ``sigma`` (Å) times standard normal noise on the real atoms' positions,
    and the noise in units of ``sigma`` [num_nodes, 3] (0 on padding nodes)."""
    pos = jnp.asarray(graph.nodes["positions"])
    noise = jnp.where(node_mask(graph)[:, None],
                      jax.random.normal(key, pos.shape, pos.dtype), 0.0)
    return graph._replace(nodes={**graph.nodes, "positions": pos + sigma * noise}), noise


def dipole_error(q, graph):
    """Mean over the real graphs of ``| |Σ q_i r_i| / DEBYE - mu |`` (Debye): the length of
    the charges' dipole against ``graph.globals["mu"]`` (QM9 gives the length only)."""
    from mpattn.models.potential import DEBYE, dipole_moment

    mu = dipole_moment(q, jnp.asarray(graph.nodes["positions"]), graph.n_node)
    length = jnp.sqrt(jnp.sum(mu * mu, axis=-1) + 1e-12) / DEBYE
    mask = graph_mask(graph)
    err = jnp.where(mask, jnp.abs(length - graph.globals["mu"]), 0.0)
    return jnp.sum(err) / jnp.maximum(jnp.sum(mask), 1)


def masked_node_mean(values, graph):
    """Mean over the real nodes of ``values`` [num_nodes, ...] summed over trailing axes."""
    per_node = jnp.sum(values.reshape(values.shape[0], -1), axis=1)
    mask = node_mask(graph)
    return jnp.sum(jnp.where(mask, per_node, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


def make_train_step(graphdef, optimizer, config: TrainConfig, *, scan: bool = False,
                    treedef=None):
    """The jit-compiled train step ``(carry, graphs) -> (carry, loss)`` (carry donated).

    ``graphs`` holds D padded batches stacked on a leading axis (:func:`stack_batches`); the
    loss is the weighted mean over the real graphs of all D batches,
    ``Σ_d w_d L_d / Σ_d w_d`` with ``w_d`` the batch's summed graph weights, so that D
    batches on D devices give the same step as one batch holding them all. With the stacked
    axis sharded over a mesh, XLA runs each batch on its device and all-reduces the
    gradients; parameters stay replicated.

    With ``scan=True`` it is ``(carry, steps) -> (carry, losses)``: ``steps`` holds K such
    stacks on a further leading axis (:func:`stack_steps`, all of one padding budget) and K
    train steps run inside one call through ``jax.lax.scan``, ``losses`` of shape [K]. The
    result equals K calls of the plain step; the host dispatches (and transfers batches) once
    per K steps, which matters where a step is short enough to wait on the host (a GPU).

    With ``treedef`` the carry travels as its flat list of leaves (:func:`jit_carry`).
    """
    c = config

    def batch_loss(params, rest, graph, key):
        model = nnx.merge(graphdef, params, rest)
        mask = graph_mask(graph)
        aux = 0.0
        heads = {"denoise": c.denoise_sigma > 0, "charges": c.dipole_weight > 0}
        if heads["denoise"]:
            graph, noise = add_position_noise(graph, key, c.denoise_sigma)
        pred, *extra = model(graph, **heads) if any(heads.values()) else (model(graph),)
        if heads["denoise"]:
            guess = extra.pop(0)
            aux = c.denoise_weight * masked_node_mean(jnp.square(guess - noise), graph)
        if heads["charges"]:
            aux = aux + c.dipole_weight * dipole_error(extra.pop(0), graph)
        loss = loss_value(c.loss, pred, graph.globals["y"], mask, graph.n_node,
                          weighting=c.weighting, r=c.weight_r) + aux
        weight = jnp.sum(jnp.where(mask, graph_weights(c.weighting, graph.n_node,
                                                       r=c.weight_r), 0.0))
        return loss * weight, weight

    def loss_fn(params, rest, graphs, step):
        # the noise of step s, batch d: a key of (seed, s, d), so resuming repeats it exactly
        keys = jax.random.split(jax.random.fold_in(jax.random.key(c.seed), step),
                                graphs.n_node.shape[0])
        if graphs.n_node.shape[0] == 1:  # one batch: no vmap (a vmapped step of one batch
            # runs its scatters batched, 40% slower on a CPU)
            total, weight = batch_loss(params, rest, jax.tree.map(lambda x: x[0], graphs),
                                       keys[0])
            return total / jnp.maximum(weight, 1e-12)
        totals, weights = jax.vmap(batch_loss, in_axes=(None, None, 0, 0))(params, rest,
                                                                         graphs, keys)
        return jnp.sum(totals) / jnp.maximum(jnp.sum(weights), 1e-12)

    def train_step(carry, graphs):
        loss, grads = jax.value_and_grad(loss_fn)(carry["params"], carry["rest"], graphs,
                                                  carry["step"])
        return apply_gradients(carry, grads, loss, optimizer, c.ema_decay), loss

    def train_steps(carry, steps):
        return jax.lax.scan(train_step, carry, steps)

    return jit_carry(train_steps if scan else train_step, treedef)


def _to_builtin(obj):
    return json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item")
                                 else str(o)))


class EpochLoop:
    """The epoch loop the trainers share: epochs until ``config.epochs`` or the time budget,
    a NaN/inf check naming the step, a metrics row per epoch into ``metrics.csv``, a
    checkpoint per epoch scored by ``row[score_key]``, a tqdm bar.

    With ``config.checkpoint_every_s`` > 0 it checkpoints only after an epoch that ends at
    least that many seconds after the previous save, and always after the first and the last
    epoch (the run's end or its time budget): for short epochs, where a save costs as much as
    the epoch itself. "best" is then the best of the saved epochs.

    Subclasses hold ``config`` (``epochs``, ``time_budget_min``, ``checkpoint_every_s``),
    ``carry`` (with ``"step"``; stored as flat ``leaves`` + ``carry_def``), ``checkpoints``,
    ``history``, ``epoch``, ``workdir``, ``log`` and implement
    ``_run_epoch(epoch) -> losses`` (per-step losses: scalars, or arrays of several steps
    each, in step order), ``_epoch_row(losses, t0, train_s) -> row``,
    ``_postfix(row)`` and ``save(score)``.
    """

    score_key = "val_mae"
    #: the jit-compiled steps a trainer built with ``compiled_from`` takes over
    compiled_steps: tuple[str, ...] = ()

    def _reuse_steps(self, other: EpochLoop) -> None:
        """Take over ``other``'s compiled steps (:attr:`compiled_steps`) if nothing they read
        differs: settings but for the run's length, budget and checkpointing, the model
        config, the data, the batches per epoch, the carry's structure and the devices."""
        def same_steps(c):  # the fields no compiled step reads
            drop = {"epochs": 1, "time_budget_min": None, "replan": False,
                    "checkpoint_every_s": 0.0, "keep_checkpoints": 1}
            return dataclasses.replace(c, **{k: v for k, v in drop.items() if hasattr(c, k)})

        differ = [what for what, same in (
            ("settings", same_steps(self.config) == same_steps(other.config)),
            ("model config", self.model_config == other.model_config),
            ("data", self.data is other.data),
            ("batches per epoch", self.steps_per_epoch == other.steps_per_epoch),
            ("training state structure", self.carry_def == other.carry_def),
            ("devices", getattr(self, "mesh", None) == getattr(other, "mesh", None)))
            if not same]
        if differ:
            raise ValueError(f"compiled_from: that trainer differs in {', '.join(differ)}; "
                             "its compiled steps do not fit this run")
        for name in self.compiled_steps:
            setattr(self, name, getattr(other, name))

    @property
    def carry(self) -> dict:
        """The training state as a dict of nnx ``State`` s, rebuilt from :attr:`leaves` (the
        flat list of arrays the jit-compiled steps take and return, see :func:`jit_carry`)."""
        return jax.tree.unflatten(self.carry_def, self.leaves)

    @carry.setter
    def carry(self, value: dict) -> None:
        self.leaves, self.carry_def = jax.tree.flatten(value)

    def fit(self, progress: bool = True) -> list[dict]:
        """Train until ``config.epochs`` or the time budget; returns the per-epoch rows.

        With ``config.replan`` (and a time budget, a cosine schedule, one process), after
        each epoch of the first half of the run the number of epochs is re-fitted to the time
        left at the pace of the last (up to 3) epochs of this call, saves included, and the
        cosine schedule's length in the optimizer state with it: a plan timed on a trial
        epoch follows the pace the run actually gets (e.g. beside other runs on one GPU).
        Early in the cosine a change of length barely changes the rate (at 1 epoch of 24 it is
        0.995 of the peak, of 100: 0.9998); the second half keeps the plan. The re-plan comes
        before the epoch's checkpoint, so every checkpoint holds the plan the run goes on with
        and ``--resume`` follows the same schedule.
        """
        from tqdm.auto import tqdm

        c = self.config
        budget_s = None if c.time_budget_min is None else 60 * c.time_budget_min
        every_s = c.checkpoint_every_s
        t_start = time.perf_counter()
        last_save = -math.inf
        spent = sum(r["seconds"] for r in self.history)
        ends: list[float] = []  # wall clock at each epoch end, before its save
        with tqdm(total=c.epochs, initial=self.epoch, desc="epochs", unit="epoch",
                  disable=not progress or not is_primary()) as bar:
            while self.epoch < self.config.epochs:
                c = self.config
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
                elapsed = spent + time.perf_counter() - t_start
                # every process stops together (a lone one would leave the others waiting)
                stop = budget_s is not None and agree(elapsed + row["seconds"] > budget_s)
                ends.append(time.perf_counter())
                if (not stop and getattr(c, "replan", False) and budget_s is not None
                        and len(ends) >= 2 and 2 * self.epoch <= c.epochs
                        and jax.process_count() == 1):
                    # before this epoch's save, so that a checkpoint always holds the plan
                    # (epochs in its config, cosine length in its optimizer state) that the
                    # run continues with: a resumed run follows the same schedule
                    n = min(3, len(ends) - 1)
                    pace = (ends[-1] - ends[-1 - n]) / n  # each interval holds one save
                    left = budget_s - (spent + ends[-1] - t_start)
                    epochs = self.epoch + max(1, int(left // pace))
                    if epochs != c.epochs and self._set_schedule_length(epochs):
                        self.log(f"re-planned: {epochs} epochs fit the budget at "
                                 f"{pace:.1f} s per epoch (was {c.epochs})")
                        self.config = c = dataclasses.replace(c, epochs=epochs)
                        bar.total = epochs
                # orbax saves are collective: the processes agree on whether one is due
                if (stop or self.epoch >= c.epochs or every_s <= 0
                        or agree(time.perf_counter() - last_save >= every_s)):
                    self.save(row[self.score_key])
                    last_save = time.perf_counter()
                bar.update(1)
                bar.set_postfix(**self._postfix(row))
                if stop:
                    self.log(f"time budget of {c.time_budget_min} min reached after "
                             f"{self.epoch} epochs")
                    break
        return self.history

    def _set_schedule_length(self, epochs: int) -> bool:
        """Set the cosine schedule's length in the optimizer state to ``epochs`` epochs; False
        (nothing changed) if the optimizer holds no :class:`CosineState`."""
        carry, found = self.carry, []

        def one(x):
            if not isinstance(x, CosineState):
                return x
            found.append(x)
            total = epochs * self.steps_per_epoch
            warm = min(int(x.warmup_steps), total // 2)
            return x._replace(
                total_steps=jax.device_put(jnp.asarray(total, x.total_steps.dtype),
                                           x.total_steps.sharding),
                warmup_steps=jax.device_put(jnp.asarray(warm, x.warmup_steps.dtype),
                                            x.warmup_steps.sharding))

        carry["opt"] = jax.tree.map(one, carry["opt"],
                                    is_leaf=lambda x: isinstance(x, CosineState))
        if found:
            self.carry = carry
        return bool(found)

    def _write_metrics(self) -> None:
        if not is_primary():
            return
        with (self.workdir / "metrics.csv").open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(self.history[0]))
            w.writeheader()
            w.writerows(self.history)


class EpochPlan(NamedTuple):
    """What :func:`calibrate_epochs` planned: the epochs that fit the budget, and the trial
    trainer whose compiled steps the run reuses (None unless ``reuse_trial``)."""

    epochs: int
    trial: EpochLoop | None


def calibrate_epochs(make_trainer, config, minutes: float, *, epochs: int = 3,
                     reuse_trial: bool = False) -> EpochPlan:
    """Epochs that fit ``minutes`` of training, timed on the whole epoch loop.

    ``make_trainer(config, workdir)`` builds a throwaway trainer (:class:`Trainer`,
    ``PotentialTrainer``, any :class:`EpochLoop`) in a temporary folder; it runs one epoch
    (compiling), then ``epochs`` more, through ``fit`` itself and saving after each, so the time
    holds everything an epoch costs: the train steps, the validation pass, metrics.csv and the
    checkpoint (timing bare steps alone missed the last two and planned 13-40% too many epochs,
    cutting the cosine schedule short). A save is counted once per
    ``config.checkpoint_every_s`` (every epoch if 0). The real run compiles again: the first
    epoch's extra time is reserved for that. A schedule whose length is the number of epochs
    (cosine) then ends with the time budget instead of being cut by it.

    With ``reuse_trial`` the plan keeps the trial trainer and reserves no compile: the caller
    builds the real run on the trial's compiled steps (``Trainer(..., compiled_from=
    plan.trial)``).
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
    # no safety margin: if the epochs run slower than timed, the budget drops the schedule's
    # last epoch, whose learning rate is near zero anyway, while a margin wastes whole epochs
    # (a 0.9 margin left 126 of 600 s unused on QM9: 9 epochs, 64.9 meV, against 57.3 with
    # 12 epochs of a schedule that the budget cut at half)
    planned = max(1, round((60 * minutes - compile_s - save_s)
                           / (row_s + saves_per_epoch * save_s)))
    return EpochPlan(planned, trial if reuse_trial else None)


class Trainer(EpochLoop):
    """Trains ``config.model`` on prepared data, writing ``metrics.csv`` and checkpoints.

    Args:
        config: the run's :class:`TrainConfig`.
        data: :func:`prepare`'s output.
        workdir: output folder (created).
        model_config: the model's typed config (default: its registry default).
        log: where one-line messages go.
        compiled_from: a trainer of the same data, model and settings but for the run's
            length, budget and checkpointing (e.g. the trial that planned the epochs, see
            :func:`calibrate_epochs`): its compiled steps are reused, nothing is compiled
            again. The cosine schedule's length is in the optimizer state, not in the
            compiled step (:func:`~mpattn.train.schedules.scale_by_warmup_cosine`).
    """

    compiled_steps = ("train_step", "train_steps", "predict_step")

    def __init__(self, config: TrainConfig, data: Prepared, workdir: str | Path, *,
                 model_config=None, log: Callable[[str], None] = print,
                 compiled_from: Trainer | None = None):
        self.config, self.data = config, data
        self.log = log if is_primary() else (lambda _msg: None)
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.model_config = model_config or default_config(config.model)
        if config.steps_per_call < 1:
            raise ValueError(f"steps_per_call must be >= 1, got {config.steps_per_call}")
        # with several devices every batch of a step must have the same shape, and the steps
        # of one call too: one budget (greedy packing cuts by the largest budget either way,
        # so the batches hold the same molecules; only their padding grows)
        budgets = None
        if (config.num_devices or jax.device_count()) > 1 or config.steps_per_call > 1:
            budgets = derive_budgets(data.train.graphs, config.batch_size, num_budgets=1)
        self.loader = BatchLoader(data.train.graphs, config.batch_size, seed=config.seed,
                                  budgets=budgets)
        self.steps_per_epoch = len(self.loader)
        model, self.graphdef, self.optimizer, self.carry = build_carry(
            config, self.model_config, steps_per_epoch=self.steps_per_epoch)
        for b in BatchLoader(data.train.graphs, config.batch_size, prefetch=0, shuffle=False):
            model.check(b)
        self.num_params = int(sum(x.size for x in jax.tree.leaves(self.carry["params"])))
        self.epoch = 0
        self.history: list[dict] = []
        self.checkpoints = Checkpointer(self.workdir / "checkpoints",
                                        max_to_keep=config.keep_checkpoints)
        self.mesh = data_mesh(config.num_devices)
        if compiled_from is not None:
            self._reuse_steps(compiled_from)
            return
        # the steps take and return the carry's flat leaves (self.leaves)
        self.train_step = make_train_step(self.graphdef, self.optimizer, config,
                                          treedef=self.carry_def)
        # K steps per call; an epoch's last steps_per_epoch % K steps go through train_step
        self.train_steps = (make_train_step(self.graphdef, self.optimizer, config, scan=True,
                                            treedef=self.carry_def)
                            if config.steps_per_call > 1 else None)
        # over the graphdef, not self: a run built on a trial's steps does not keep the trial
        graphdef = self.graphdef
        self.predict_step = jax.jit(
            lambda params, rest, graph: nnx.merge(graphdef, params, rest)(graph))

    # ------------------------------------------------------------------ steps

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

    def eval_params(self):
        return self.carry.get("ema", self.carry["params"])

    def predict(self, part: Split3) -> np.ndarray:
        """Predictions in target units (float64) for every molecule of ``part``, in order."""
        gs = part.graphs
        out = np.empty(len(gs), np.float64)
        where = {int(i): k for k, i in enumerate(gs.ids)}
        loader = BatchLoader(gs, self.config.eval_batch_size, shuffle=False, prefetch=2)
        params = self.eval_params()
        for b in loader:
            pred = np.asarray(self.predict_step(params, self.carry["rest"], b), np.float64)
            ids = np.asarray(b.globals["id"])
            real = ids >= 0
            out[[where[int(i)] for i in ids[real]]] = pred[real]
        return self.data.transform.decode(out, part.counts)

    def report(self, part: Split3) -> dict:
        """Errors of ``part`` in physical units (see :func:`~mpattn.train.metrics.error_report`);
        the predictions themselves under ``"_pred"``."""
        from mpattn.data.qm9 import TARGETS

        pred = self.predict(part)
        unit = TARGETS[self.config.target][0] if self.config.target in TARGETS else "eV"
        return error_report(pred, part.true, n_atoms=part.n_atoms, counts=part.counts,
                            elements=list(self.data.elements), unit=unit) | {"_pred": pred}

    # ------------------------------------------------------------------ loop

    def _run_epoch(self, epoch: int) -> list:
        losses = []
        for k, stacked in self._calls(epoch):
            step = self.train_step if k == 1 else self.train_steps
            self.leaves, loss = step(self.leaves, stacked)
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
            "val_mae": float(val.get("mae_mev", val.get("mae"))),
            "lr": float(current_lr(self.carry["opt"])),
            "seconds": time.perf_counter() - t0,
            "train_mol_per_s": len(self.data.train.graphs) / train_s,
        }

    def _postfix(self, row: dict) -> dict:
        return {"val_mae": f"{row['val_mae']:.1f}", "mol_s": f"{row['train_mol_per_s']:.0f}"}

    # ------------------------------------------------------------------ persistence

    def meta(self) -> dict:
        return _to_builtin({
            "epoch": self.epoch,
            "history": self.history,
            "config": dataclasses.asdict(self.config),
            "model_config": dataclasses.asdict(self.model_config),
            "transform": self.data.transform.to_dict(),
        })

    def save(self, val_mae: float) -> dict:
        return self.checkpoints.save(int(self.carry["step"]), self.carry, meta=self.meta(),
                                     val_mae=val_mae if math.isfinite(val_mae) else None)

    def restore(self, which: str = "latest") -> None:
        """Load the workdir's latest checkpoint (to continue training: metrics.csv is cut back
        to it) or its best one (to evaluate: the training state stays as it was)."""
        self.carry, meta = self.checkpoints.restore(self.carry, which=which)
        self.epoch = int(meta["epoch"])
        if which == "latest":
            self.history = list(meta["history"])
            if self.history:
                self._write_metrics()
