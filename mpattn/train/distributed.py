"""Several processes (hosts) training one model: start-up, who writes, and agreeing.

Every process runs the same program (SPMD). The train step's global batch holds one padded
batch per device of the mesh (:func:`mpattn.train.loop.data_mesh`); each process builds only
the batches of its own devices (:func:`process_positions`) and
``jax.make_array_from_process_local_data`` assembles the global array, so no host ever
collates the whole global batch. Parameters and optimizer state stay replicated; XLA
all-reduces the gradients (over NCCL on GPUs, gloo between CPU processes).

Only the primary process (index 0) writes files (metrics, results, plots, the split) and
prints; orbax checkpoints are written by every process together (they need a folder every
host can see). Decisions that depend on the clock (the time budget) are taken by
:func:`agree`, so that no process stops while the others wait for it in a collective.
"""

from __future__ import annotations

import jax
import numpy as np

__all__ = ["agree", "initialize", "is_primary", "process_positions"]


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """Join a multi-process run: ``jax.distributed.initialize`` before any other JAX call.

    With no arguments JAX detects the cluster (SLURM, Open MPI, Kubernetes, Cloud TPU) or
    reads ``JAX_COORDINATOR_ADDRESS``; otherwise pass all three, e.g. on two machines
    ``initialize("10.0.0.1:1234", 2, 0)`` and ``initialize("10.0.0.1:1234", 2, 1)``.
    CPU processes exchange gradients through gloo (selected here).
    """
    given = (coordinator, num_processes, process_id)
    if any(v is not None for v in given) and any(v is None for v in given):
        raise ValueError("give all of coordinator, num_processes and process_id, or none "
                         f"(to detect the cluster); got {given}")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes, process_id)


def is_primary() -> bool:
    """True in the process that writes files and prints (process index 0)."""
    return jax.process_index() == 0


def process_positions(mesh) -> list[int]:
    """Positions along the mesh's ``"data"`` axis of this process's devices (contiguous).

    Raises:
        ValueError: the process's devices are not one contiguous run of the axis (a mesh
            built from ``jax.devices()`` always is).
    """
    me = jax.process_index()
    mine = [i for i, d in enumerate(mesh.devices.flat) if d.process_index == me]
    if not mine or mine != list(range(mine[0], mine[0] + len(mine))):
        raise ValueError(f"process {me} owns positions {mine} of the data axis: they must be "
                         "one non-empty contiguous run (build the mesh from jax.devices())")
    return mine


def agree(flag: bool) -> bool:
    """True on every process if ``flag`` is True on any (identity with one process)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.asarray(bool(flag)))
    return bool(np.any(flags))
