"""The data side of ``python -m experiments.potential``: which file, which frames, which split.

- :func:`resolve_data`: a bundled set's name (``ethanol_xtb``, ``spice_like_xtb``) or a path,
  and the split protocol that goes with it (``experiments/configs/potential.py``).
- :func:`read_checked`: frames in eV and Å with the keys and units asked for; a refused frame
  is an error naming the file, the frame and the problem unless ``--skip-bad-frames``, and
  the counts read / used / refused are returned for the results.
- :func:`split`: whole molecules held out (``test_unseen``), then a seeded split of the other
  molecules' frames into train / val / test; separate ``--val``/``--test`` files replace the
  parts drawn from ``--data``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from experiments.configs import potential as preset

__all__ = ["count", "read_checked", "resolve_data", "split"]


def resolve_data(data: str | None) -> tuple[Path, dict, str]:
    """``(path, split protocol, name)`` of ``--data`` (default: the bundled ethanol set)."""
    from mpattn.data import frames as frames_module

    name = data or "ethanol_xtb"
    if name in preset.DATASETS:
        func, protocol = preset.DATASETS[name]
        path = getattr(frames_module, func)()
        if not path.is_file():
            raise ValueError(f"--data {name}: the bundled set is missing at {path}; make it "
                             "with python -m experiments.make_xtb_dataset (see its docstring)")
        return path, dict(protocol), name
    path = Path(name)
    if not path.is_file():
        raise ValueError(f"--data {name}: no such file (or bundled set: "
                         f"{', '.join(preset.DATASETS)})")
    return path, dict(preset.FILE_SPLIT), path.name


def read_checked(path: Path, args, role: str, log=print):
    """The frames of ``path`` read with the key and unit options of ``args``; ``(frames,
    counts)`` with ``counts = {"read", "used", "refused", "refused_frames"}``.

    Raises:
        ValueError: a refused frame (no energy, forces of the wrong shape, a non-finite
            value), naming the file, the frame and the problem, unless
            ``args.skip_bad_frames``; a key in no frame; no forces at all.
    """
    import warnings

    from mpattn.data.frames import read_frames

    kwargs = {k: getattr(args, f"{k}") for k in ("energy_key", "forces_key", "stress_key")
              if getattr(args, k) is not None}
    if path.suffix.lower() != ".npz":
        kwargs["molecule_key"] = args.molecule_key
    units = {"energy_unit": args.energy_unit, "length_unit": args.length_unit}
    if path.suffix.lower() == ".npz" and units == {"energy_unit": "eV", "length_unit": "Ang"}:
        units = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the refused frames are reported below
        frames = read_frames(path, **units, **kwargs)
    refused = frames.rejected
    if refused and not args.skip_bad_frames:
        shown = "; ".join(f"frame {i}: {why}" for i, why in refused[:5])
        more = f" (and {len(refused) - 5} more)" if len(refused) > 5 else ""
        raise ValueError(f"{path}: {len(refused)} frame(s) cannot be used: {shown}{more}; fix "
                         "the file, name the right keys (--energy-key, --forces-key), or train "
                         "on the others with --skip-bad-frames")
    if frames.forces is None:
        raise ValueError(f"{path}: no frame has forces ({args.forces_key or 'forces'}); name "
                         "the per-atom array with --forces-key")
    counts = {"read": len(frames) + len(refused), "used": len(frames),
              "refused": len(refused),
              "refused_frames": [[int(i), why] for i, why in refused]}
    log(f"{role} {path}: {counts['read']} frames read, {counts['used']} used, "
        f"{counts['refused']} refused" + ("" if not refused else " (--skip-bad-frames): " +
                                          "; ".join(f"frame {i}: {w}" for i, w in refused[:3])))
    return frames, counts


def count(size, n: int, what: str) -> int:
    """A part's size: an int count, or a float share in (0, 1) of ``n``."""
    if size is None:
        return 0
    if isinstance(size, float) and 0 < size < 1:
        return int(round(size * n))
    if float(size) != int(size) or size < 0:
        raise ValueError(f"--{what} {size}: a number of frames (>= 0) or a share in (0, 1)")
    return int(size)


def split(frames, sizes: dict, seed: int, *, val_file: bool, test_file: bool) -> dict:
    """Index arrays ``{"train", "val", "test", "test_unseen"}`` into ``frames``.

    ``sizes``: ``train_size``, ``val_size``, ``test_size`` (counts or shares of the frames
    of the molecules not held out; ``None``: the rest) and ``unseen_molecules`` (the share of
    molecules whose frames all go to ``test_unseen``). With a validation or test file the
    part it replaces is empty here and the training part defaults to all other frames.
    """
    from mpattn.data.frames import split_frames, split_molecules

    seen, unseen = split_molecules(frames.molecules, sizes["unseen_molecules"] or 0.0, seed)
    n = len(seen)
    n_val = 0 if val_file else count(sizes["val_size"], n, "val-size")
    n_test = 0 if test_file else count(sizes["test_size"], n, "test-size")
    n_train = (n - n_val - n_test if sizes["train_size"] is None
               else count(sizes["train_size"], n, "train-size"))
    if sizes["test_size"] is None and not test_file:
        n_test = None  # the rest
    try:
        train, val, test = split_frames(n, n_train, n_val, seed, n_test=n_test)
    except ValueError as err:
        raise ValueError(f"--train-size/--val-size/--test-size: {err} (of the {n} frames of "
                         f"{len(np.unique(frames.molecules[seen]))} molecule(s) not held "
                         "out)") from None
    for name, part, file in (("train", train, False), ("val", val, val_file),
                             ("test", test, test_file)):
        if not len(part) and not file:
            raise ValueError(f"--train-size/--val-size/--test-size: no {name} frames left of "
                             f"the {n} frames of the molecules not held out (give --{name} "
                             "FILE or other sizes)" if name != "train" else
                             f"--train-size {sizes['train_size']}: no training frames")
    return {"train": seen[train], "val": seen[val], "test": seen[test], "test_unseen": unseen}
