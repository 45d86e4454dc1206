"""Predictions of a trained run for users: ``ase.Atoms`` in, values in the target's unit out.

>>> predict = mpattn.load_predictor("runs/qm9_u0")   # the run's best checkpoint
>>> predict([atoms_a, atoms_b])                       # float64 [2], e.g. U0 in eV

Command line: ``python -m mpattn.predict WORKDIR molecules.xyz [--out predictions.csv]
[--which best|latest] [--batch-size N]`` (every frame of an xyz/extxyz file).

Model, configs and target transform come from the checkpoint's metadata; predictions are
decoded in float64 with each molecule's element counts: the full target (e.g. U0 including
the per-element reference), not the residual the model learned.

**Bonds come from the geometry.** QM9 training graphs were perceived with the dataset's SMILES
as a bond-order template; a predictor only has coordinates, so RDKit perceives bonds from the
geometry (xyz2mol; connectivity alone if that fails). For a few molecules (charged or
zwitterionic forms, unusual valences) the bond categories and hybridizations can then differ
from what the training pipeline would give, which changes the inputs of bond-aware models
(MH-MP, MPNN). Models that use only elements and distances (SchNet) are unaffected.

Batches are padded to a few static budgets (node and edge totals rounded up to 64 times a
power of two, ``batch_size + 1`` graphs), so the jitted forward compiles once per budget and
is reused across calls.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

__all__ = ["Predictor", "load_predictor", "main"]


def _level(x: int) -> int:
    """The smallest ``64 * 2**k >= x`` (at least 64): few distinct budgets, 2x headroom."""
    units = max(1, -(-int(x) // 64))
    return 64 * (1 << (units - 1).bit_length())


class Predictor:
    """A trained model ready to predict; build it with :func:`load_predictor`.

    Attributes:
        target: the target's name (e.g. ``"U0"``); unit: its unit (e.g. ``"eV"``).
        config: the run's ``TrainConfig``; model_config: the model's typed config.
        transform: the run's :class:`~mpattn.train.targets.TargetTransform`.
        options: the :class:`~mpattn.featurize.FeaturizeOptions` graphs are built with.
        step, epoch: the training step and epoch of the restored checkpoint.
        budgets_used: the padding budgets seen so far (one compilation each).
    """

    def __init__(self, config, model_config, graphdef, params, rest, transform, *,
                 step: int | None = None, epoch: int | None = None):
        import jax
        from flax import nnx

        from mpattn.data.qm9 import TARGETS
        from mpattn.featurize import FeaturizeOptions

        self.config, self.model_config, self.transform = config, model_config, transform
        self.graphdef, self.params, self.rest = graphdef, params, rest
        self.step, self.epoch = step, epoch
        self.target = config.target
        self.unit = TARGETS[config.target][0] if config.target in TARGETS else ""
        self.options = FeaturizeOptions(edge_set=config.edge_set, cutoff=config.cutoff)
        self.elements = tuple(sorted(set(transform.elements)
                                     & {int(z) for z in self.options.element_z}))
        self.budgets_used: set = set()
        self._model = nnx.merge(graphdef, params, rest)  # for the eager size checks

        @jax.jit
        def forward(params, rest, graph):
            return nnx.merge(graphdef, params, rest)(graph)

        self._forward = forward

    def __repr__(self) -> str:
        return (f"Predictor(model={self.config.model!r}, target={self.target!r}, "
                f"unit={self.unit!r}, step={self.step}, epoch={self.epoch})")

    def _graphs(self, atoms_list: list):
        """Checked, featurized molecules as one GraphSet (geometry-path bond perception)."""
        from ase import Atoms
        from ase.data import chemical_symbols

        from mpattn.data.graphset import GraphSet
        from mpattn.featurize import from_atoms

        known = set(self.elements)
        for i, atoms in enumerate(atoms_list):  # all checked before the slow perception
            if not isinstance(atoms, Atoms):
                raise TypeError(f"molecule {i}: expected ase.Atoms, got {type(atoms).__name__}")
            unseen = sorted(set(atoms.numbers.tolist()) - known)
            if unseen:
                raise ValueError(
                    f"molecule {i} ({atoms.get_chemical_formula()}): element(s) "
                    f"{', '.join(chemical_symbols[z] for z in unseen)} never seen by the model "
                    f"(it knows {', '.join(chemical_symbols[z] for z in self.elements)})")
        graphs = [from_atoms(a, options=self.options,
                             name=f"molecule {i} ({a.get_chemical_formula()})")
                  for i, a in enumerate(atoms_list)]
        cat = np.concatenate
        edge_fields = {}
        for g in graphs:
            edge_fields.update({k: v for k, v in g.edges.items() if k not in edge_fields})

        def edge(g, k):  # a periodic molecule's "shift" field: zeros for the others
            ref = edge_fields[k]
            return g.edges.get(k, np.zeros((len(g.senders),) + ref.shape[1:], ref.dtype))

        return GraphSet(
            n_node=cat([g.n_node for g in graphs]), n_edge=cat([g.n_edge for g in graphs]),
            nodes={k: cat([g.nodes[k] for g in graphs]) for k in graphs[0].nodes},
            edges={k: cat([edge(g, k) for g in graphs]) for k in edge_fields},
            senders=cat([g.senders for g in graphs]),
            receivers=cat([g.receivers for g in graphs]))

    def __call__(self, atoms_list, *, batch_size: int = 64) -> np.ndarray:
        """Predict the target of each molecule.

        Args:
            atoms_list: ``ase.Atoms`` or a sequence of them (any elements the model saw).
            batch_size: molecules per padded batch.

        Returns:
            float64 [num_molecules] in :attr:`unit` (a single Atoms gives shape [1]).

        Raises:
            ValueError: a molecule holds an element the model never saw (named with the
                molecule's index and formula), or cannot be featurized.
        """
        from ase import Atoms

        from mpattn.graph import Budget, pad_batch
        from mpattn.train.targets import element_counts

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        atoms_list = [atoms_list] if isinstance(atoms_list, Atoms) else list(atoms_list)
        if not atoms_list:
            return np.zeros(0, np.float64)
        gs = self._graphs(atoms_list)
        out = np.empty(len(gs), np.float64)
        for lo in range(0, len(gs), batch_size):
            index = np.arange(lo, min(lo + batch_size, len(gs)))
            budget = Budget(_level(int(gs.n_node[index].sum()) + 1),
                            _level(int(gs.n_edge[index].sum())), batch_size + 1)
            batch = pad_batch(gs, index, budget)
            self._model.check(batch)
            self.budgets_used.add(budget)
            pred = self._forward(self.params, self.rest, batch)
            out[index] = np.asarray(pred, np.float64)[: len(index)]
        counts = element_counts(gs.nodes["z"], gs.n_node, self.transform.elements)
        return self.transform.decode(out, counts)


def load_predictor(workdir: str | Path, *, which: str = "best") -> Predictor:
    """Rebuild a training run's model from its checkpoint (EMA weights when it kept them).

    Args:
        workdir: the run's folder (the one holding ``checkpoints/``).
        which: ``"best"`` (lowest validation MAE) or ``"latest"``.

    Raises:
        ValueError: ``which`` is invalid, or the workdir holds no (intact) checkpoint; the
            message names the workdir.
    """
    from mpattn.train.checkpoint import Checkpointer, read_meta
    from mpattn.train.loop import build_carry, run_settings
    from mpattn.train.targets import TargetTransform

    if which not in ("best", "latest"):
        raise ValueError(f"which must be 'best' or 'latest', got {which!r}")
    workdir = Path(workdir)
    try:
        ckpt = Checkpointer(workdir / "checkpoints")
        steps, best = ckpt.listing(which)
        if not steps:
            raise ValueError(f"{ckpt.directory} holds no checkpoint (is this a training "
                             "run's workdir?)")
        meta = read_meta(ckpt.directory, [best] if best is not None else steps[::-1])
        config, model_config = run_settings(meta)
        _, graphdef, _, template = build_carry(config, model_config, steps_per_epoch=1)
        carry, meta = ckpt.restore(template, which=which)
        transform = TargetTransform.from_dict(meta["transform"])
    except (ValueError, KeyError, TypeError) as err:
        what = f"missing metadata {err}" if isinstance(err, KeyError) else str(err)
        raise ValueError(f"cannot load a predictor from {workdir}: {what}") from err
    params = carry.get("ema", carry["params"])
    return Predictor(config, model_config, graphdef, params, carry["rest"], transform,
                     step=meta.get("checkpoint", {}).get("step"), epoch=meta.get("epoch"))


def main(argv: list[str] | None = None) -> int:
    """``python -m mpattn.predict WORKDIR molecules.xyz``; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m mpattn.predict",
        description="Predict a trained run's target for every frame of an xyz/extxyz file.")
    parser.add_argument("workdir", type=Path, help="the training run's folder")
    parser.add_argument("molecules", type=Path, help="(multi-frame) xyz or extxyz file")
    parser.add_argument("--out", type=Path, help="write a CSV here instead of printing")
    parser.add_argument("--which", choices=("best", "latest"), default="best",
                        help="which checkpoint (default: best by validation MAE)")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)

    import logging

    logging.getLogger("absl").setLevel(logging.ERROR)  # orbax's read-only notices

    def fail(message: str) -> int:
        print(f"error: {message}", file=sys.stderr)
        return 2

    if not args.molecules.is_file():
        return fail(f"molecules file {args.molecules} does not exist")
    try:
        import ase.io

        frames = ase.io.read(args.molecules, index=":")
    except Exception as err:  # noqa: BLE001 - ASE raises many types for malformed files
        return fail(f"cannot read molecules from {args.molecules}: {type(err).__name__}: {err}")
    if not frames:
        return fail(f"{args.molecules} holds no molecules")
    try:
        predictor = load_predictor(args.workdir, which=args.which)
        values = predictor(frames, batch_size=args.batch_size)
    except ValueError as err:
        return fail(str(err))
    header = ["index", "formula", predictor.target, "unit"]
    rows = [[i, a.get_chemical_formula(), repr(float(v)), predictor.unit]
            for i, (a, v) in enumerate(zip(frames, values, strict=True))]
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("w", newline="") as f:
            csv.writer(f).writerows([header, *rows])
        print(f"wrote {len(rows)} predictions of {predictor.target} to {args.out}")
    else:
        print(f"{'index':>6}  {'formula':<16} {predictor.target} [{predictor.unit}]")
        for i, formula, v, _ in rows:
            print(f"{i:>6}  {formula:<16} {float(v):.6f}")
    return 0


if __name__ == "__main__":
    from mpattn.runtime import restart_with_hugepages

    restart_with_hugepages()  # before any work: huge pages for XLA's CPU buffers
    sys.exit(main())
