"""Checkpoints with orbax: the latest few plus the best by validation MAE.

One ``orbax.checkpoint.CheckpointManager`` holds every checkpoint of a run in
``directory/<step>/`` with two items: ``state`` (a pytree of arrays written with
``StandardSave``: ``nnx.state(model)``, the optax state, PRNG keys, counters) and ``meta``
(a JSON dict written with ``JsonSave``: epoch, data-order position, normalisation
statistics, config, split file...). The validation MAE goes into orbax's per-step metrics.

Why one manager with a combined ``preservation_policy`` rather than two managers
(``latest/`` and ``best/``): orbax 0.12 composes policies (``AnyPreservationPolicy`` of
``LatestN(max_to_keep)`` and ``BestN(n=1)``), so the best checkpoint is simply *kept* when
it falls out of the latest N. Nothing is written twice (a second full copy of the state at
every improvement, which is most epochs early in training), there is one place to look, and
"the best is never overwritten" holds by construction: a kept step is never rewritten. The
best key is ``(val_mae, step)``: the lowest MAE wins and, among equal MAEs, the older step,
so the best is only replaced by a *strictly* lower MAE. Steps saved without a finite MAE
carry no metrics and can never become the best.

Safety: a state holding NaN or inf is refused before anything is written; orbax writes
each step into ``<step>.orbax-checkpoint-tmp`` and renames it on finalisation, so a save
killed mid-write leaves the previous checkpoints intact (the partial folder is ignored by
readers and removed by the next writer). Saves are synchronous so that a returned ``save``
means the checkpoint is on disk.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import warnings
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

__all__ = ["CHECKPOINT_FORMAT", "Checkpointer", "json_tuples", "latest_meta", "read_meta"]

_TMP_MARK = ".orbax-checkpoint-tmp"

#: The metadata layout this version writes (``meta["format"]``); checkpoints without the key
#: were written before the one-engine change and are read through
#: :mod:`mpattn.train.runs`' table of old defaults.
CHECKPOINT_FORMAT = 2


def _best_key(metrics: dict) -> tuple[float, int]:
    return (metrics["val_mae"], metrics["step"])


def _is_key(x: Any) -> bool:
    return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _encode(x: Any) -> Any:
    """Typed PRNG keys (``jax.random.key``) are stored as their raw key data."""
    return jax.random.key_data(x) if _is_key(x) else x


def _abstract(x: Any) -> Any:
    """Template leaf -> the shape/dtype(/sharding) orbax restores into."""
    x = _encode(x)
    if isinstance(x, np.generic):
        x = np.asarray(x)
    if isinstance(x, (jax.Array, np.ndarray)):
        return ocp.utils.to_shape_dtype_struct(x)
    return x


def _decode(template: Any, restored: Any) -> Any:
    if _is_key(template):
        return jax.random.wrap_key_data(restored, impl=jax.random.key_impl(template))
    if isinstance(template, np.generic):
        return np.asarray(restored, dtype=template.dtype)[()]
    return restored


def _first_bad_leaf(tree: Any) -> str | None:
    """Path of the first floating leaf holding NaN or inf, or None if all are finite."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if _is_key(leaf) or isinstance(leaf, (bool, int, str)):
            continue
        if isinstance(leaf, float):
            finite = math.isfinite(leaf)
        elif isinstance(leaf, jax.Array) and jnp.issubdtype(leaf.dtype, jnp.inexact):
            finite = bool(jnp.isfinite(leaf).all())
        elif isinstance(leaf, (np.ndarray, np.generic)) and np.issubdtype(leaf.dtype, np.inexact):
            finite = bool(np.isfinite(leaf).all())
        else:
            continue
        if not finite:
            return jax.tree_util.keystr(path, simple=True, separator="/") or "<root>"
    return None


def _to_builtin(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, (np.ndarray, jax.Array)):
        return np.asarray(x).tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"{type(x).__name__} is not JSON-serialisable")


def _describe(err: BaseException) -> str:
    text = " ".join(line.strip() for line in str(err).strip().splitlines()[:4])
    return f"{type(err).__name__}: {text[:300]}"


class Checkpointer:
    """The latest ``max_to_keep`` checkpoints of a run plus the best by validation MAE.

    Args:
        directory: folder of the checkpoints (created on the first ``save``; reading never
            creates it).
        max_to_keep: number of most recent checkpoints kept; the best one is kept besides.

    Example:
        >>> ckpt = Checkpointer(workdir / "checkpoints")
        >>> ckpt.save(step, {"model": nnx.state(model), "opt": opt_state, "rng": key},
        ...           meta={"epoch": epoch}, val_mae=val_mae)
        >>> state, meta = ckpt.restore(template, which="latest")  # --resume
    """

    def __init__(self, directory: str | Path, *, max_to_keep: int = 3):
        if max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}")
        self.directory = Path(directory).absolute()
        self.max_to_keep = max_to_keep
        self._mngr: ocp.CheckpointManager | None = None
        self._writable = False
        self._damaged: set[int] = set()

    def _manager(self, *, write: bool) -> ocp.CheckpointManager:
        """A read-only manager for reading (never deletes a concurrent writer's temporary
        folders), upgraded to a writer (creates the folder, cleans partial saves) on save."""
        if self._mngr is not None and (self._writable or not write):
            return self._mngr
        if self._mngr is not None:
            self._mngr.close()
        policy = policies.AnyPreservationPolicy([
            policies.LatestN(n=self.max_to_keep),
            policies.BestN(get_metric_fn=_best_key, reverse=True, n=1,
                           keep_checkpoints_without_metrics=False),
        ])
        with _quiet_readers(not write):
            options = ocp.CheckpointManagerOptions(
                best_fn=_best_key, best_mode="min", preservation_policy=policy,
                enable_async_checkpointing=False, create=write, read_only=not write,
                cleanup_tmp_directories=write, save_interval_steps=int(write),
            )
            self._mngr = ocp.CheckpointManager(self.directory, options=options)
        self._writable = write
        return self._mngr

    def _reader(self) -> ocp.CheckpointManager | None:
        if not self.directory.is_dir():
            return None
        self._manager(write=False).reload()  # see saves of other processes
        return self._mngr

    def steps(self) -> list[int]:
        """Saved (finalised) steps, ascending; ``[]`` if the directory is missing."""
        mngr = self._reader()
        return [] if mngr is None else sorted(mngr.all_steps())

    def latest_step(self) -> int | None:
        """The newest saved step, or None."""
        return (self.steps() or [None])[-1]

    def best_step(self) -> int | None:
        """The step with the lowest finite validation MAE (oldest among ties), or None."""
        mngr = self._reader()
        return None if mngr is None else mngr.best_step()

    def listing(self, which: str = "best") -> tuple[list[int], int | None]:
        """``(steps, best)`` for a reader: ``best`` is None unless ``which == "best"``.

        Raises:
            ValueError: naming the directory, if orbax cannot list it (e.g. a garbled
                metadata or metrics file).
        """
        try:
            steps = self.steps()
            return steps, (self.best_step() if steps and which == "best" else None)
        except (ValueError, OSError) as err:
            raise ValueError(f"{self.directory} is damaged: cannot list its checkpoints "
                             f"({type(err).__name__}: {err})") from err

    def best_val_mae(self) -> float | None:
        """The validation MAE of the best step, or None."""
        step = self.best_step()
        return None if step is None else float(self._mngr.metrics(step)["val_mae"])

    def save(self, step: int, state: Any, *, meta: dict, val_mae: float | None = None) -> dict:
        """Save ``state`` and ``meta`` as checkpoint ``step`` (synchronously).

        Args:
            step: training step; must exceed every saved step.
            state: pytree of arrays (flax nnx ``State``, optax states, PRNG keys, scalars).
            meta: JSON-able dict (numpy scalars/arrays are converted). The key
                ``"checkpoint"`` is reserved: ``{"step": step, "val_mae": val_mae}`` is added.
            val_mae: validation MAE of this state; a finite value makes the step a candidate
                for the best checkpoint, which it becomes only if strictly lower.

        Returns:
            ``{"latest": True, "best": bool}``: whether the step is now the best one.

        Raises:
            ValueError: a leaf of ``state`` holds NaN/inf (nothing is written), ``meta`` is
                not JSON-able, or ``step`` does not exceed the latest saved step.
        """
        step = int(step)
        bad = _first_bad_leaf(state)
        if bad is not None:
            raise ValueError(
                f"refusing to save step {step} in {self.directory}: state leaf '{bad}' holds "
                "NaN or inf (the previous checkpoints are kept)"
            )
        finite = val_mae is not None and math.isfinite(val_mae)
        if val_mae is not None and not finite:
            warnings.warn(
                f"step {step}: val_mae={val_mae} is not finite; saved as a latest checkpoint "
                "only, never as the best", stacklevel=2,
            )
        record = {"step": step, "val_mae": float(val_mae) if finite else None}
        try:
            meta = json.loads(json.dumps({**meta, "checkpoint": record}, default=_to_builtin))
        except (TypeError, ValueError) as err:
            raise ValueError(f"meta of step {step} is not JSON-serialisable: {err}") from err

        mngr = self._manager(write=True)
        mngr.reload()
        for s in sorted(self._damaged & set(mngr.all_steps())):
            warnings.warn(f"deleting damaged checkpoint step {s} in {self.directory}",
                          stacklevel=2)
            mngr.delete(s)
        self._damaged.clear()
        latest = mngr.latest_step()
        if latest is not None and step <= latest:
            raise ValueError(
                f"cannot save step {step} in {self.directory}: step {latest} is already saved "
                "(steps must increase)"
            )
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(jax.tree.map(_encode, state)),
            meta=ocp.args.JsonSave(meta),
        )
        mngr.save(step, args=args, metrics=record if finite else None, force=True)
        mngr.wait_until_finished()
        return {"latest": True, "best": finite and mngr.best_step() == step}

    def restore(
        self, template: Any, *, which: Literal["latest", "best"] = "latest",
        step: int | None = None,
    ) -> tuple[Any, dict]:
        """Restore a checkpoint into the structure, dtypes and shardings of ``template``.

        Args:
            template: a pytree like the saved state (e.g. a freshly initialised one); its
                arrays give the shapes/dtypes/shardings, typed PRNG keys are re-wrapped.
            which: ``"latest"`` (falls back to the newest intact checkpoint with a warning
                naming the damaged ones, which this object's next ``save`` deletes) or
                ``"best"`` (lowest validation MAE).
            step: restore exactly this step instead (no fallback).

        Returns:
            ``(state, meta)``; ``meta["checkpoint"]`` holds the restored step and val_mae.

        Raises:
            ValueError: the directory is missing or holds no checkpoint, the requested
                checkpoint does not exist or is damaged (all of them for ``"latest"``), or
                ``template`` does not match what was saved (no fallback then).
        """
        if which not in ("latest", "best"):
            raise ValueError(f"which must be 'latest' or 'best', got {which!r}")
        where = f"checkpoint directory {self.directory}"
        mngr = self._reader()
        if mngr is None:
            raise ValueError(f"{where} does not exist (nothing to restore)")
        steps = sorted(mngr.all_steps())
        if not steps:
            partial = any(_TMP_MARK in p.name for p in self.directory.iterdir())
            raise ValueError(f"{where} holds no checkpoint" + (
                " (only an unfinished save)" if partial else " (it is empty)"))
        if step is not None:
            if step not in steps:
                raise ValueError(f"{where} has no step {step} (saved steps: {steps})")
            candidates = [step]
        elif which == "best":
            best = mngr.best_step()
            if best is None:
                raise ValueError(f"{where} has no checkpoint with a validation MAE "
                                 f"(saved steps: {steps})")
            candidates = [best]
        else:
            candidates = steps[::-1]

        abstract = jax.tree.map(_abstract, template)
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
        )
        errors = []
        for s in candidates:
            try:
                out = mngr.restore(s, args=args)
            except Exception as err:  # any orbax/tensorstore/json failure
                if self._readable(mngr, s):  # intact on disk: the template is wrong
                    raise ValueError(
                        f"{where}: step {s} does not match the template: {_describe(err)}"
                    ) from err
                self._damaged.add(s)
                errors.append(f"step {s}: {_describe(err)}")
                continue
            if errors:
                warnings.warn(
                    f"{where}: damaged checkpoint(s) skipped ({'; '.join(errors)}); "
                    f"restored step {s} instead", stacklevel=2,
                )
            return jax.tree.map(_decode, template, out["state"]), dict(out["meta"])
        raise ValueError(f"{where}: damaged checkpoint, nothing restored: {'; '.join(errors)}")

    @staticmethod
    def _readable(mngr: ocp.CheckpointManager, step: int) -> bool:
        """Whether ``step`` restores as saved (without a template): tells a damaged
        checkpoint from a template mismatch."""
        args = ocp.args.Composite(state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore())
        try:
            mngr.restore(step, args=args)
        except Exception:
            return False
        return True


@contextlib.contextmanager
def _quiet_readers(quiet: bool = True):
    """Silence orbax's warnings about read-only managers (expected for every reader)."""
    absl = logging.getLogger("absl")
    level = absl.level
    if quiet:
        absl.setLevel(logging.ERROR)
    try:
        yield
    finally:
        absl.setLevel(level)


def json_tuples(x):
    """JSON gives lists where frozen configs hold tuples."""
    return tuple(json_tuples(v) for v in x) if isinstance(x, list) else x


def latest_meta(directory: Path) -> dict:
    """The JSON metadata of the newest readable checkpoint in ``directory`` (e.g. the plan a
    run resumes with); ValueError naming the folder if it holds none."""
    steps = Checkpointer(directory).listing("latest")[0]
    if not steps:
        raise ValueError(f"{directory} holds no checkpoint")
    return read_meta(directory, steps[::-1])


def read_meta(directory: Path, steps: list[int]) -> dict:
    """The JSON metadata of the first readable of ``steps`` (the state is restored later,
    into a template built from this metadata); ValueError naming the folder if none is."""
    errors = []
    with _quiet_readers():
        mngr = ocp.CheckpointManager(
            directory, options=ocp.CheckpointManagerOptions(read_only=True, create=False))
    with mngr:
        for s in steps:
            try:
                return dict(mngr.restore(s, args=ocp.args.Composite(
                    meta=ocp.args.JsonRestore()))["meta"])
            except Exception as err:  # noqa: BLE001 - any orbax/json failure: try the next
                errors.append(f"step {s}: {type(err).__name__}: {str(err)[:200]}")
    raise ValueError(f"no readable checkpoint metadata in {directory} ({'; '.join(errors)})")
