"""Predictions of a trained run for users: ``ase.Atoms`` in, values in the target's unit out.

>>> predict = mpattn.load_run("runs/qm9_u0")   # a property run's best checkpoint
>>> predict([atoms_a, atoms_b])                 # float64 [2], e.g. U0 in eV

Command line: ``python -m mpattn.predict WORKDIR molecules.xyz [--out predictions.csv]
[--which best|latest] [--batch-size N] [--no-progress]`` (every frame of an xyz/extxyz file;
progress bars on stderr).

Several runs of one target: ``mpattn.load_ensemble([wd_a, wd_b, wd_c])`` gives their mean
prediction and, with ``.predict``, their spread (an uncertainty); on the command line, name
several workdirs before the molecules file (the CSV gains a ``<target>_std`` column).

Model, configs and target transform come from the checkpoint's metadata
(:func:`mpattn.train.runs.load_run`); predictions are
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

__all__ = ["Ensemble", "Predictor", "load_ensemble", "main"]


def _level(x: int) -> int:
    """The smallest ``64 * 2**k >= x`` (at least 64): few distinct budgets, 2x headroom."""
    units = max(1, -(-int(x) // 64))
    return 64 * (1 << (units - 1).bit_length())


def _molecules(atoms_list, batch_size: int) -> list:
    """``atoms_list`` as a list (one ``ase.Atoms`` becomes a list of one); checks the batch."""
    from ase import Atoms

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return [atoms_list] if isinstance(atoms_list, Atoms) else list(atoms_list)


class Predictor:
    """A trained property model ready to predict; :func:`mpattn.load_run` builds it.

    Attributes:
        target: the target's name (e.g. ``"U0"``); unit: its unit (e.g. ``"eV"``).
        task: the run's :class:`~mpattn.train.property.PropertyTask`; config: its
            ``TrainConfig``; model_config: the model's typed config.
        transform: the run's :class:`~mpattn.train.targets.TargetTransform`.
        options: the :class:`~mpattn.featurize.FeaturizeOptions` graphs are built with.
        step, epoch: the training step and epoch of the restored checkpoint.
        budgets_used: the padding budgets seen so far (one compilation each).
    """

    def __init__(self, task, config, model_config, graphdef, params, rest, transform, *,
                 step: int | None = None, epoch: int | None = None):
        import jax
        from flax import nnx

        from mpattn.data.qm9 import TARGETS

        self.task, self.config, self.model_config = task, config, model_config
        self.transform = transform
        self.graphdef, self.params, self.rest = graphdef, params, rest
        self.step, self.epoch = step, epoch
        self.target = task.target
        self.unit = TARGETS[task.target][0] if task.target in TARGETS else ""
        self.options = task.options()
        self.elements = tuple(sorted(set(transform.elements)
                                     & {int(z) for z in self.options.element_z}))
        self.budgets_used: set = set()
        self._model = nnx.merge(graphdef, params, rest)  # for the eager size checks

        @jax.jit
        def forward(params, rest, graph):
            return nnx.merge(graphdef, params, rest)(graph)["energy"]

        self._forward = forward

    def __repr__(self) -> str:
        return (f"Predictor(model={self.config.model!r}, target={self.target!r}, "
                f"unit={self.unit!r}, step={self.step}, epoch={self.epoch})")

    def _graphs(self, atoms_list: list, progress: bool = False):
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
        from tqdm.auto import tqdm

        graphs = [from_atoms(a, options=self.options,
                             name=f"molecule {i} ({a.get_chemical_formula()})")
                  for i, a in enumerate(tqdm(atoms_list, desc="featurize", unit="mol",
                                             disable=not progress, leave=False))]
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

    def __call__(self, atoms_list, *, batch_size: int = 64,
                 progress: bool = False) -> np.ndarray:
        """Predict the target of each molecule.

        Args:
            atoms_list: ``ase.Atoms`` or a sequence of them (any elements the model saw).
            batch_size: molecules per padded batch.
            progress: tqdm bars for featurization and prediction (on stderr).

        Returns:
            float64 [num_molecules] in :attr:`unit` (a single Atoms gives shape [1]).

        Raises:
            ValueError: a molecule holds an element the model never saw (named with the
                molecule's index and formula), or cannot be featurized.
        """
        atoms_list = _molecules(atoms_list, batch_size)
        if not atoms_list:
            return np.zeros(0, np.float64)
        return self._predict(self._graphs(atoms_list, progress), batch_size, progress)

    def _predict(self, gs, batch_size: int, progress: bool = False) -> np.ndarray:
        """Decoded predictions [len(gs)] of featurized molecules (from :meth:`_graphs`)."""
        from tqdm.auto import tqdm

        from mpattn.elements import element_counts
        from mpattn.graph import Budget, pad_batch

        out = np.empty(len(gs), np.float64)
        for lo in tqdm(range(0, len(gs), batch_size), desc=f"predict {self.target}",
                       unit="batch", disable=not progress, leave=False):
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
    """:func:`mpattn.load_run` for a property run; ValueError naming the workdir if it is
    another kind of run (a potential: use ``mpattn.load_run`` or ``mpattn.ase.Calculator``)."""
    from mpattn.train.runs import load_run

    run = load_run(workdir, which=which)
    if not isinstance(run, Predictor):
        raise ValueError(f"{workdir} is a potential's run, not a property model's: load it "
                         "with mpattn.load_run or mpattn.ase.Calculator")
    return run


class Ensemble:
    """Several trained runs of one target as one predictor: the mean of their predictions,
    and their spread as an uncertainty; build it with :func:`load_ensemble`.

    The mean of a few runs is more accurate than any of them (docs/results.md, "QM9 U0").
    Molecules are featurized once per distinct featurization of the members (most ensembles
    share one).

    Attributes:
        members: the :class:`Predictor` of each run; target, unit: theirs (all equal).
    """

    def __init__(self, members, *, names=None):
        members = list(members)
        if not members:
            raise ValueError("an ensemble needs at least one member")
        names = [str(n) for n in names] if names is not None else \
            [f"member {i}" for i in range(len(members))]
        if len(names) != len(members):
            raise ValueError(f"{len(names)} names for {len(members)} members")
        first = members[0]
        for name, m in zip(names[1:], members[1:], strict=True):
            if (m.target, m.unit) != (first.target, first.unit):
                raise ValueError(f"{name} predicts {m.target!r} [{m.unit}], {names[0]} "
                                 f"{first.target!r} [{first.unit}]: an ensemble needs one "
                                 "target")
        self.members, self.names = members, names
        self.target, self.unit = first.target, first.unit

    def __repr__(self) -> str:
        return f"Ensemble({len(self.members)} members, target={self.target!r})"

    def predict_all(self, atoms_list, *, batch_size: int = 64,
                    progress: bool = False) -> np.ndarray:
        """Every member's predictions: float64 [num_members, num_molecules] (``progress``:
        tqdm bars, as :meth:`Predictor.__call__`).

        Raises:
            ValueError: as :meth:`Predictor.__call__` (a molecule with an element some
                member never saw is named).
        """
        atoms_list = _molecules(atoms_list, batch_size)
        out = np.zeros((len(self.members), len(atoms_list)), np.float64)
        if not atoms_list:
            return out
        graphs: dict = {}  # (options, elements) -> GraphSet: featurize once per kind
        for i, m in enumerate(self.members):
            key = (m.options, m.elements)
            if key not in graphs:
                graphs[key] = m._graphs(atoms_list, progress)
            out[i] = m._predict(graphs[key], batch_size, progress)
        return out

    def predict(self, atoms_list, *, batch_size: int = 64,
                progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """``(mean, spread)``, each float64 [num_molecules] in :attr:`unit`: the members'
        mean and their standard deviation (``ddof=0``; 0 for a single member)."""
        every = self.predict_all(atoms_list, batch_size=batch_size, progress=progress)
        return every.mean(axis=0), every.std(axis=0)

    def __call__(self, atoms_list, *, batch_size: int = 64,
                 progress: bool = False) -> np.ndarray:
        """The members' mean prediction [num_molecules] (like :meth:`Predictor.__call__`)."""
        return self.predict(atoms_list, batch_size=batch_size, progress=progress)[0]


def load_ensemble(workdirs, *, which: str = "best") -> Ensemble:
    """:func:`load_predictor` on each workdir, as one :class:`Ensemble`.

    Raises:
        ValueError: no workdir, a workdir given twice, one that cannot be loaded (named), or
            runs of different targets.
    """
    workdirs = [Path(w) for w in workdirs]
    if not workdirs:
        raise ValueError("load_ensemble needs at least one workdir")
    seen = set()
    for w in workdirs:
        if w.resolve() in seen:
            raise ValueError(f"{w} is given twice: its predictions would count double")
        seen.add(w.resolve())
    return Ensemble([load_predictor(w, which=which) for w in workdirs],
                    names=[str(w) for w in workdirs])


def main(argv: list[str] | None = None) -> int:
    """``python -m mpattn.predict WORKDIR [WORKDIR ...] molecules.xyz``; returns the exit
    code. Several workdirs predict as an :class:`Ensemble`: the mean and its spread."""
    parser = argparse.ArgumentParser(
        prog="python -m mpattn.predict",
        description="Predict a trained run's target for every frame of an xyz/extxyz file "
                    "(several runs: their mean and spread).")
    parser.add_argument("workdirs", type=Path, nargs="+", metavar="workdir",
                        help="the training run's folder (several: an ensemble)")
    parser.add_argument("molecules", type=Path, help="(multi-frame) xyz or extxyz file")
    parser.add_argument("--out", type=Path, help="write a CSV here instead of printing")
    parser.add_argument("--which", choices=("best", "latest"), default="best",
                        help="which checkpoint (default: best by validation MAE)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bars (they go to stderr)")
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
    several = len(args.workdirs) > 1
    try:
        if several:
            predictor = load_ensemble(args.workdirs, which=args.which)
            values, spread = predictor.predict(frames, batch_size=args.batch_size,
                                               progress=not args.no_progress)
        else:
            predictor = load_predictor(args.workdirs[0], which=args.which)
            values = predictor(frames, batch_size=args.batch_size,
                               progress=not args.no_progress)
    except ValueError as err:
        return fail(str(err))
    target, unit = predictor.target, predictor.unit
    header = ["index", "formula", target] + ([f"{target}_std"] if several else []) + ["unit"]
    rows = [[i, a.get_chemical_formula(), repr(float(v))]
            + ([repr(float(spread[i]))] if several else []) + [unit]
            for i, (a, v) in enumerate(zip(frames, values, strict=True))]
    what = f"the mean of {len(args.workdirs)} runs' " if several else ""
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("w", newline="") as f:
            csv.writer(f).writerows([header, *rows])
        runs = f" (the mean of {len(args.workdirs)} runs, with their spread)" if several else ""
        print(f"wrote {len(rows)} predictions of {target}{runs} to {args.out}")
    else:
        extra = f"  {'std':>10}" if several else ""
        print(f"{'index':>6}  {'formula':<16} {what}{target} [{unit}]{extra}")
        for row in rows:
            std = f"  {float(row[3]):10.6f}" if several else ""
            print(f"{row[0]:>6}  {row[1]:<16} {float(row[2]):.6f}{std}")
    return 0


if __name__ == "__main__":
    from mpattn.runtime import restart_with_hugepages

    restart_with_hugepages()  # before any work: huge pages for XLA's CPU buffers
    sys.exit(main())
