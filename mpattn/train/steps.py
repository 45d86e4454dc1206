"""The jit-compiled train step and what it runs on: devices, stacked batches, the carry.

One step ``(carry, rest, graphs) -> (carry, loss)``: ``graphs`` holds D padded batches
stacked on a leading axis (one per device of a ``"data"`` mesh); the task's loss terms are
summed per batch and the batches are combined as a weighted mean over their real graphs, so
D batches on D devices give the same step as one batch holding them all. The carry
``{"params", "opt", "step"[, "ema"]}`` is donated and travels as its flat list of leaves
(:func:`jit_carry`); ``rest`` (the module's non-trainable state, e.g. a potential's reference
energies) is an argument, never updated.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mpattn.graph import graph_mask
from mpattn.train.distributed import process_positions
from mpattn.train.schedules import ema_update

__all__ = [
    "apply_gradients",
    "batch_loss",
    "data_mesh",
    "jit_carry",
    "make_train_step",
    "stack_batches",
    "stack_steps",
]


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

    ``loss`` feeds reduce-on-plateau schedules.
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
    flattened and rebuilt through Python at every call (several ms of host time per call for
    the default model's ~300 arrays on a CPU; docs/results.md). The trainer keeps the leaves
    (its ``carry`` property rebuilds the dict on demand).
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


def batch_loss(task, terms, module, graph, key):
    """``(loss, weight)`` of one padded batch: ``terms = (main, aux)`` (lists of named,
    weighted terms, :mod:`mpattn.train.terms`) summed on the task's outputs of ``module``
    (the auxiliary sum added last), and the batch's summed graph weights (the number of real
    graphs without a size weighting). Terms that perturb the batch (denoising) do so first,
    in order."""
    main, aux = terms
    context = {}
    for i, term in enumerate(t for t in (*main, *aux) if t.perturbs):
        graph, context[term.name] = term.perturb(
            graph, key if i == 0 else jax.random.fold_in(key, i))
    outputs = task.outputs(module, graph)
    loss = _weighted_sum(main, outputs, graph, context)
    if aux:
        loss = loss + _weighted_sum(aux, outputs, graph, context)
    weight = jnp.sum(jnp.where(graph_mask(graph), task.graph_weights(graph), 0.0))
    return loss, weight


def _weighted_sum(terms, outputs, graph, context):
    total = None
    for term in terms:
        value = term(outputs, graph, context.get(term.name))
        value = value if term.weight == 1.0 else term.weight * value
        total = value if total is None else total + value
    return total


def make_train_step(graphdef, optimizer, config, task, *, scan: bool = False, treedef=None):
    """The jit-compiled train step ``(carry, rest, graphs) -> (carry, loss)`` (carry donated).

    ``graphs`` holds D padded batches stacked on a leading axis (:func:`stack_batches`); the
    loss is ``Σ_d w_d L_d / Σ_d w_d`` with ``w_d`` the batch's summed graph weights
    (:func:`batch_loss`). With the stacked axis sharded over a mesh, XLA runs each batch on
    its device and all-reduces the gradients; parameters stay replicated. The noise of noisy
    terms at step s, batch d comes from a key of (seed, s, d), so a resumed run repeats it.

    With ``scan=True`` it is ``(carry, rest, steps) -> (carry, losses)``: ``steps`` holds K
    such stacks on a further leading axis (:func:`stack_steps`, all of one padding budget)
    and K train steps run inside one call through ``jax.lax.scan``, ``losses`` of shape [K].
    The result equals K calls of the plain step; the host dispatches once per K steps.

    With ``treedef`` the carry travels as its flat list of leaves (:func:`jit_carry`).
    """

    terms = task.terms(config)

    def one(params, rest, graph, key):
        total, weight = batch_loss(task, terms, nnx.merge(graphdef, params, rest), graph, key)
        return total * weight, weight

    def loss_fn(params, rest, graphs, step):
        keys = jax.random.split(jax.random.fold_in(jax.random.key(config.seed), step),
                                graphs.n_node.shape[0])
        if graphs.n_node.shape[0] == 1:  # one batch: no vmap (a vmapped step of one batch
            # runs its scatters batched, 40% slower on a CPU)
            total, weight = one(params, rest, jax.tree.map(lambda x: x[0], graphs), keys[0])
            return total / jnp.maximum(weight, 1e-12)
        totals, weights = jax.vmap(one, in_axes=(None, None, 0, 0))(params, rest, graphs, keys)
        return jnp.sum(totals) / jnp.maximum(jnp.sum(weights), 1e-12)

    def train_step(carry, rest, graphs):
        loss, grads = jax.value_and_grad(loss_fn)(carry["params"], rest, graphs, carry["step"])
        return apply_gradients(carry, grads, loss, optimizer, config.ema_decay), loss

    def train_steps(carry, rest, steps):
        return jax.lax.scan(lambda c, g: train_step(c, rest, g), carry, steps)

    return jit_carry(train_steps if scan else train_step, treedef)
