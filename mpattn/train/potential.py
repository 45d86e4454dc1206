"""Training interatomic potentials on energies and forces; loading them back.

The contract other modules (``mpattn.ase``, ``mpattn.md``) build on::

    load_potential(workdir, which="best") -> mpattn.models.potential.Potential
    energy, forces = energy_and_forces(potential, graph)  # eV (absolute), eV/Å
    potential.model.config.cutoff                        # Å: build radius graphs with it
    potential.elements                                   # tuple of the Z seen in training

The returned potential holds the trained parameters (the EMA copy when the run kept one) and
the fitted per-element :class:`~mpattn.models.potential.Reference`; feed it jraph-padded
radius graphs (``FrameSet.to_graphset(cutoff)`` + ``mpattn.graph.pad_batch``).

Training (:class:`PotentialTrainer`) follows :class:`mpattn.train.loop.Trainer`: one
jit-compiled step with a donated carry ``{"params", "rest", "opt", "step"[, "ema"]}``,
batches from :class:`~mpattn.data.loader.BatchLoader` (order a function of (seed, epoch), so
``restore("latest")`` continues exactly), :class:`~mpattn.train.checkpoint.Checkpointer`
checkpoints at epoch ends. The step takes forces inside the loss (a gradient of a gradient):
``L = (1-β) ℓ((E - Σ n_e E_e)/s - ŷ) + β/(3N) Σ ℓ(F/s - F̂/s)`` with ``s`` the RMS force
component of the training set (:func:`~mpattn.models.potential.fit_reference`). Residual
energies are formed on the host in float64 (absolute xTB ethanol energies are about -309 eV,
DFT ones thousands of eV: float32 would round them at the meV level) and reach the device as
float32 ``residual / s``. Validation reports energy MAE (meV) and force MAE (meV/Å) each
epoch; the best checkpoint is the one with the lowest validation force MAE (forces are what
MD uses and dominate the loss at the default β).

Reference: Frank, Unke & Müller, "So3krates", NeurIPS 2022 (loss, linear energy correction).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mpattn.data.frames import FrameSet
from mpattn.data.graphset import GraphSet
from mpattn.data.loader import BatchLoader
from mpattn.models import create_model, default_config
from mpattn.models.potential import (
    Potential,
    Reference,
    energy_and_forces,
    energy_force_loss,
    fit_reference,
    force_metrics,
)
from mpattn.train.checkpoint import (
    Checkpointer,
    read_meta,
    recorded_config,
    recorded_model_config,
)
from mpattn.train.loop import EpochLoop, apply_gradients, jit_carry
from mpattn.train.schedules import current_lr, ema_init, make_optimizer

__all__ = [
    "FramePart",
    "PotentialConfig",
    "PotentialTrainer",
    "PreparedFrames",
    "build_potential",
    "load_potential",
    "prepare_frames",
]


@dataclass(frozen=True)
class PotentialConfig:
    """Everything a potential's training run depends on besides the data and model sizes.

    Attributes:
        model: registry name: ``"attention_potential"``, ``"schnet"`` or a model of yours
            registered with :func:`mpattn.models.register_model` (per-atom outputs needed).
        cutoff: radius of the neighbour graphs (Å); must equal the model config's cutoff.
        beta: force weight β of the loss. Energies and forces are both divided by the RMS
            force ``s`` (so β trades comparable numbers); 0.99 follows SO3krates and
            makes forces, which fix the energy surface up to a constant, the main signal.
        loss: ``"mse"``, ``"l1"`` or ``"huber"`` (per component, on standardised values).
        lr, schedule, clip_norm, weight_decay: :func:`~mpattn.train.schedules.make_optimizer`
            arguments (3e-3 with the cosine schedule beat 1e-3 and 5e-3 on the xTB ethanol
            set; ``weight_decay`` > 0 is AdamW on the weight matrices).
        epochs: epochs to train (the cosine schedule spans them).
        batch_size: frames per batch (8; 4 and 16 gave test force MAEs within ~1 meV/Å
            in 3-minute runs on 2 CPU cores); eval_batch_size: frames per evaluation batch.
        ema_decay: decay of the evaluated EMA weights (None: evaluate the raw weights).
        seed: parameter initialisation and batch order.
        time_budget_min: stop after the epoch that would overrun it (None: no limit).
        replan: with a time budget and the cosine schedule, re-fit the epochs (and the
            cosine's length) to the time left after each epoch of the run's first half, at
            the pace the run gets (see ``EpochLoop.fit``; set by the planned
            ``experiments.ethanol_potential`` run).
        x64: train in float64 (needs ``jax_enable_x64`` switched on beforehand).
        keep_checkpoints: latest checkpoints kept (the best is kept besides).
        checkpoint_every_s: checkpoint only after epochs that end at least this many seconds
            after the previous save (and after the first and last epoch); 0: every epoch. A
            save costs ~0.5 s on 2 CPU cores, as much as an epoch of a small data set.
    """

    model: str = "attention_potential"
    cutoff: float = 5.0
    beta: float = 0.99
    loss: str = "mse"
    lr: float = 3e-3
    schedule: str = "cosine"
    epochs: int = 100
    batch_size: int = 8
    eval_batch_size: int = 64
    ema_decay: float | None = 0.99
    clip_norm: float | None = 10.0
    weight_decay: float = 0.0
    seed: int = 0
    time_budget_min: float | None = None
    replan: bool = False
    x64: bool = False
    keep_checkpoints: int = 3
    checkpoint_every_s: float = 0.0

    def __post_init__(self) -> None:
        from mpattn.models import model_names

        if self.model not in model_names():  # built-ins and register_model()'s
            raise ValueError(f"unknown model {self.model!r}; choose from {model_names()} (or "
                             "register your own with mpattn.models.register_model)")
        if self.loss not in ("mse", "l1", "huber"):
            raise ValueError(f"unknown loss {self.loss!r}; choose one of mse, l1, huber")
        if not 0.0 <= self.beta <= 1.0 or not self.cutoff > 0:
            raise ValueError(f"need 0 <= beta <= 1 and cutoff > 0, got {self.beta}, "
                             f"{self.cutoff}")
        if self.epochs < 1 or self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError("epochs, batch_size and eval_batch_size must be >= 1")
        if not self.checkpoint_every_s >= 0:
            raise ValueError(f"checkpoint_every_s must be >= 0, got {self.checkpoint_every_s}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")


@dataclass
class FramePart:
    """One part of a split: device graphs with standardised targets, host truth in float64.

    ``graphs`` holds ``nodes["forces"]`` = F/s and ``globals["energy"]`` = (E - Σ n_e E_e)/s
    (float32, float64 with ``x64``); ``energy`` [F] and ``forces`` [N, 3] are the absolute
    references (eV, eV/Å, float64) and ``baseline`` [F] the float64 ``Σ n_e E_e``.
    """

    graphs: GraphSet
    energy: np.ndarray
    forces: np.ndarray
    baseline: np.ndarray
    n_atoms: np.ndarray
    frames: FrameSet


@dataclass
class PreparedFrames:
    """:func:`prepare_frames`' output: the three parts, the reference and the cutoff."""

    train: FramePart
    val: FramePart
    test: FramePart
    reference: Reference
    cutoff: float
    dtype: str = "float32"

    @property
    def elements(self) -> tuple[int, ...]:
        return self.reference.elements


def prepare_frames(frames: FrameSet, split, config: PotentialConfig) -> PreparedFrames:
    """Radius graphs of each part, the reference fitted on the training frames only.

    Args:
        frames: all frames (energies and forces required).
        split: ``(train, val, test)`` index arrays into ``frames`` (e.g. from
            :func:`~mpattn.data.frames.split_frames`).
        config: gives the cutoff and the dtype (``x64``).

    Raises:
        ValueError: frames without forces, an empty training part, or a validation/test frame
            holding an element absent from the training frames.
    """
    if frames.forces is None:
        raise ValueError(f"{frames.source or 'frames'}: no forces; a potential trains on "
                         "energies and forces")
    dtype = np.float64 if config.x64 else np.float32
    parts = dict(zip(("train", "val", "test"), (np.asarray(s, np.int64) for s in split),
                     strict=True))
    if not len(parts["train"]):
        raise ValueError("the training part is empty")
    train = frames.subset(parts["train"])
    elements = tuple(sorted(set(np.unique(train.z).tolist())))
    zs = [train.z[train.atom_index(i)] for i in range(len(train))]
    reference = fit_reference(zs, train.energy, elements, forces=train.forces)
    out = {}
    for name, index in parts.items():
        sub = frames.subset(index)
        try:
            baseline = reference.energy(sub.z, sub.n_atoms)
        except ValueError as err:
            raise ValueError(f"{name} part: {err} (seen in training: {elements})") from err
        gs = sub.to_graphset(config.cutoff)
        s = reference.scale
        gs.nodes["forces"] = (sub.forces / s).astype(dtype)
        gs.nodes["positions"] = sub.positions.astype(dtype)
        gs.globals = {"energy": ((sub.energy - baseline) / s).astype(dtype)}
        out[name] = FramePart(gs, sub.energy.astype(np.float64),
                              sub.forces.astype(np.float64), baseline,
                              sub.n_atoms.astype(np.int64), sub)
    return PreparedFrames(out["train"], out["val"], out["test"], reference, config.cutoff,
                          "float64" if config.x64 else "float32")


def _model_config(config: PotentialConfig, model_config):
    if model_config is None:
        return default_config(config.model, cutoff=config.cutoff)
    model_cutoff = getattr(model_config, "graph_cutoff", model_config.cutoff)
    if not math.isclose(model_cutoff, config.cutoff):
        raise ValueError(f"cutoff {config.cutoff} Å of the PotentialConfig differs from the "
                         f"model config's {model_cutoff} Å; the graphs and the model "
                         "must use one cutoff")
    return model_config


def build_potential(config: PotentialConfig, model_config, reference: Reference, *,
                    steps_per_epoch: int):
    """A fresh potential and its training state (also the restore template).

    Returns:
        ``(potential, graphdef, rest, optimizer, carry)``; ``carry`` = ``{"params", "opt",
        "step"[, "ema"]}``, in float64 when ``config.x64``. ``rest`` (the reference table and
        scale, LayerNorm-free non-parameter state) stays out of the carry: it is rebuilt from
        the reference in the metadata, and its NaN entries (elements the potential does not
        know) would make :class:`~mpattn.train.checkpoint.Checkpointer` refuse the state.
    """
    model = create_model(config.model, rngs=nnx.Rngs(config.seed), config=model_config)
    potential = Potential(model, reference=reference)
    graphdef, params, rest = nnx.split(potential, nnx.Param, ...)
    if config.x64:
        def wide(x):
            return x.astype(jnp.float64) if jnp.issubdtype(x.dtype, jnp.floating) else x
        params, rest = jax.tree.map(wide, params), jax.tree.map(wide, rest)
        nnx.update(potential, params, rest)
    optimizer = make_optimizer(config.lr, schedule=config.schedule,
                               steps_per_epoch=steps_per_epoch, epochs=config.epochs,
                               clip_norm=config.clip_norm, weight_decay=config.weight_decay)
    carry = {"params": params, "opt": optimizer.init(params), "step": jnp.zeros((), jnp.int32)}
    if config.ema_decay:
        carry["ema"] = ema_init(params)
    return potential, graphdef, rest, optimizer, carry


def _make_step(graphdef, optimizer, config: PotentialConfig, treedef=None):
    """The jit-compiled ``(carry, rest, graph) -> (carry, loss)`` (carry donated; with
    ``treedef``, the carry as its flat leaves: :func:`~mpattn.train.loop.jit_carry`)."""

    def loss_fn(params, rest, graph):
        potential = nnx.merge(graphdef, params, rest)
        energy, forces = energy_and_forces(potential, graph, reference=False)
        s = potential.scale[...].astype(energy.dtype)
        return energy_force_loss(energy / s, forces / s, graph.globals["energy"],
                                 graph.nodes["forces"], graph, beta=config.beta,
                                 loss=config.loss)

    def train_step(carry, rest, graph):
        loss, grads = jax.value_and_grad(loss_fn)(carry["params"], rest, graph)
        return apply_gradients(carry, grads, loss, optimizer, config.ema_decay), loss

    return jit_carry(train_step, treedef)


class PotentialTrainer(EpochLoop):
    """Trains a potential on prepared frames, writing ``metrics.csv`` and checkpoints.

    Args:
        config: the run's :class:`PotentialConfig`.
        prepared: :func:`prepare_frames`' output (same cutoff).
        workdir: output folder (created).
        model_config: the model's typed config (default: its registry default at
            ``config.cutoff``); its cutoff must equal ``config.cutoff``.
        log: where one-line messages go.
        compiled_from: a trainer of the same frames, model and settings but for the run's
            length, budget and checkpointing (e.g. the trial that planned the epochs): its
            compiled steps are reused (see :class:`~mpattn.train.loop.Trainer`).
    """

    score_key = "val_force_mae_mev_ang"  # the best checkpoint: lowest val force MAE
    compiled_steps = ("train_step", "eval_step")

    def __init__(self, config: PotentialConfig, prepared: PreparedFrames, workdir, *,
                 model_config=None, log: Callable[[str], None] = print,
                 compiled_from: PotentialTrainer | None = None):
        if config.x64 and not jax.config.jax_enable_x64:
            raise ValueError("x64=True needs jax.config.update('jax_enable_x64', True) first")
        if not math.isclose(prepared.cutoff, config.cutoff):
            raise ValueError(f"the frames were prepared with cutoff {prepared.cutoff} Å, the "
                             f"config asks for {config.cutoff} Å")
        self.config, self.data, self.log = config, prepared, log
        self.model_config = _model_config(config, model_config)
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.loader = BatchLoader(prepared.train.graphs, config.batch_size, seed=config.seed)
        self.steps_per_epoch = len(self.loader)
        self.potential, self.graphdef, self.rest, self.optimizer, self.carry = build_potential(
            config, self.model_config, prepared.reference, steps_per_epoch=self.steps_per_epoch)
        self.num_params = int(sum(x.size for x in jax.tree.leaves(self.carry["params"])))
        self._eval_loaders: dict[int, BatchLoader] = {}
        for part in (prepared.train, prepared.val, prepared.test):
            if len(part.graphs):
                self.potential.check(next(iter(self._eval_loader(part))))
        self.epoch = 0
        self.history: list[dict] = []
        self.checkpoints = Checkpointer(self.workdir / "checkpoints",
                                        max_to_keep=config.keep_checkpoints)
        if compiled_from is not None:
            self._reuse_steps(compiled_from)
            return
        self.train_step = _make_step(self.graphdef, self.optimizer, config,
                                     treedef=self.carry_def)
        graphdef = self.graphdef
        self.eval_step = jax.jit(lambda params, rest, graph: energy_and_forces(
            nnx.merge(graphdef, params, rest), graph, reference=False))

    # ------------------------------------------------------------------ evaluation

    def _eval_loader(self, part: FramePart) -> BatchLoader:
        key = id(part)
        if key not in self._eval_loaders:
            self._eval_loaders[key] = BatchLoader(part.graphs, self.config.eval_batch_size,
                                                  shuffle=False, prefetch=0)
        return self._eval_loaders[key]

    def eval_params(self):
        """The evaluated parameters: the EMA copy if kept, else the raw ones."""
        return self.carry.get("ema", self.carry["params"])

    def _part(self, part) -> FramePart:
        return getattr(self.data, part) if isinstance(part, str) else part

    def predict(self, part) -> tuple[np.ndarray, np.ndarray]:
        """Absolute energies [F] (eV) and forces [N, 3] (eV/Å), float64, in frame order."""
        part = self._part(part)
        gs = part.graphs
        where = {int(i): k for k, i in enumerate(gs.ids)}
        offsets = np.concatenate([[0], np.cumsum(part.n_atoms)])
        energy, forces = np.zeros(len(gs)), np.zeros((int(offsets[-1]), 3))
        params = self.eval_params()
        for b in self._eval_loader(part):
            e, f = self.eval_step(params, self.rest, b)
            e, f = np.asarray(e, np.float64), np.asarray(f, np.float64)
            start = np.concatenate([[0], np.cumsum(b.n_node)])
            for k in np.nonzero(np.asarray(b.globals["id"]) >= 0)[0]:
                p = where[int(b.globals["id"][k])]
                energy[p] = e[k]
                forces[offsets[p]:offsets[p + 1]] = f[start[k]:start[k + 1]]
        return energy + part.baseline, forces

    def report(self, part) -> dict:
        """:func:`~mpattn.models.potential.force_metrics` of ``part`` ("train", "val", "test"
        or a :class:`FramePart`), plus the predictions under ``"_energy"``/``"_forces"``."""
        part = self._part(part)
        e, f = self.predict(part)
        return force_metrics(e, part.energy, f, part.forces, part.n_atoms) | {
            "_energy": e, "_forces": f}

    # ------------------------------------------------------------------ training

    def _run_epoch(self, epoch: int) -> list:
        losses = []
        for batch in self.loader.epoch(epoch):
            self.leaves, loss = self.train_step(self.leaves, self.rest, batch)
            losses.append(loss)
        return losses

    def _epoch_row(self, losses: np.ndarray, t0: float, train_s: float) -> dict:
        val = self.report("val")
        return {
            "epoch": self.epoch + 1,
            "step": int(self.carry["step"]),
            "train_loss": float(losses.mean()),
            "val_energy_mae_mev": val["energy_mae_mev"],
            "val_force_mae_mev_ang": val["force_mae_mev_ang"],
            "lr": float(current_lr(self.carry["opt"])),
            "seconds": time.perf_counter() - t0,
            "frames_per_s": len(self.data.train.graphs) / train_s,
        }

    def _postfix(self, row: dict) -> dict:
        return {"epoch": self.epoch, "frames_s": f"{row['frames_per_s']:.0f}",
                "val_F_mae": f"{row['val_force_mae_mev_ang']:.1f}"}

    # ------------------------------------------------------------------ persistence

    def meta(self) -> dict:
        """Checkpoint metadata: everything :func:`load_potential` needs, no data."""
        return json.loads(json.dumps({
            "epoch": self.epoch,
            "history": self.history,
            "model": self.config.model,
            "config": dataclasses.asdict(self.config),
            "model_config": dataclasses.asdict(self.model_config),
            "reference": self.data.reference.to_dict(),
            "elements": list(self.data.elements),
            "cutoff": self.config.cutoff,
            "dtype": self.data.dtype,
        }, default=float))

    def save(self, val_score: float) -> dict:
        """Checkpoint the current step; ``val_score`` (val force MAE, meV/Å) ranks "best"."""
        return self.checkpoints.save(int(self.carry["step"]), self.carry, meta=self.meta(),
                                     val_mae=val_score if math.isfinite(val_score) else None)

    def restore(self, which: str = "latest") -> None:
        """Load the latest checkpoint (to continue training exactly: metrics.csv is cut back
        to it) or the best one (to evaluate)."""
        self.carry, meta = self.checkpoints.restore(self.carry, which=which)
        self.epoch = int(meta["epoch"])
        if which == "latest":
            self.history = list(meta["history"])
            if self.history:
                self._write_metrics()


def load_potential(workdir, which: str = "best") -> Potential:
    """The trained potential of a :class:`PotentialTrainer` run (EMA weights if kept).

    Args:
        workdir: the run's folder (holding ``checkpoints/``).
        which: ``"best"`` (lowest validation force MAE) or ``"latest"``.

    Returns:
        An ``nnx`` :class:`~mpattn.models.potential.Potential` with its reference installed:
        ``energy_and_forces(potential, graph)`` gives absolute energies (eV) and forces (eV/Å)
        for padded radius graphs built with ``potential.model.config.cutoff``;
        ``potential.elements`` are the atomic numbers seen in training.

    Raises:
        ValueError: ``which`` is invalid, or the workdir is missing, holds no intact
            checkpoint or lacks metadata (the message names the path and what is missing).
    """

    if which not in ("best", "latest"):
        raise ValueError(f"which must be 'best' or 'latest', got {which!r}")
    workdir = Path(workdir)
    if not workdir.is_dir():
        raise ValueError(f"{workdir}: no such workdir (expected a potential training run's "
                         "folder holding checkpoints/)")
    ckpt = Checkpointer(workdir / "checkpoints")
    steps, best = ckpt.listing(which)
    if not steps:
        raise ValueError(f"{ckpt.directory}: missing checkpoints (is {workdir} a potential "
                         "training run's workdir?)")
    meta = read_meta(ckpt.directory, [best] if best is not None else steps[::-1])
    missing = [k for k in ("model", "config", "model_config", "reference") if k not in meta]
    if missing:
        raise ValueError(f"{ckpt.directory}: checkpoint metadata lacks {', '.join(missing)} "
                         "(not a potential training run?)")
    try:
        config = recorded_config(PotentialConfig, meta["config"])
        model_config = recorded_model_config(meta["model"], meta["model_config"])
        reference = Reference.from_dict(meta["reference"])
        potential, _, rest, _, template = build_potential(config, model_config, reference,
                                                          steps_per_epoch=1)
        carry, _ = ckpt.restore(template, which=which)
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{workdir}: cannot rebuild the potential: {err}") from err
    nnx.update(potential, carry.get("ema", carry["params"]), rest)
    return potential
