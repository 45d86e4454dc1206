"""Where a potential's force error is: the test frames it gets most wrong, and whether their
geometry lies inside the training frames'.

    python -m benchmarks.frame_errors runs/peers/ethanol_xtb_60      # every library there
    python -m benchmarks.frame_errors runs/peers/ethanol_xtb --top 5 --no-save

The argument is a work folder of ``benchmarks.peers_potentials``: ``parts/train.extxyz``,
``parts/<part>.extxyz`` and one ``<library>/predictions.npz`` per library trained there. Each
frame's geometry is summed up by the closest approach of every element pair (C-H, O-H, ...:
the shortest distance under :data:`CONTACT` Å, periodic images included). A frame whose closest
approach of some pair is shorter than in every training frame lies *outside the training
range*: a bond compressed further than the model ever saw, where it extrapolates. Per library
the table gives the force MAE and RMSE over all frames of the part and over those inside the
range, then the worst frames with their tightest pair against the training minimum. Writes
``benchmarks/results/frame_errors-<data>-<device>-<date>.json`` and ``.png`` (each frame's
force MAE against its margin to the training minimum) unless ``--no-save``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from benchmarks.common import save_result_and_figure

__all__ = ["CONTACT", "analyse", "closest_approach", "main", "plot", "table"]

#: Pairs further apart than this (Å) are not contacts; a pair never closer in a frame has no
#: closest approach there (NaN) and no say in the range.
CONTACT = 2.0


def _read(path: Path) -> list:
    import ase.io

    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such part (a work folder of "
                                "benchmarks.peers_potentials has parts/train.extxyz and "
                                "parts/<part>.extxyz)")
    return ase.io.read(str(path), index=":")


def closest_approach(images) -> dict[str, np.ndarray]:
    """``{"C-H": float[n_frames], ...}``: each element pair's shortest distance (Å) in each
    frame, NaN where the pair has no contact under :data:`CONTACT` Å."""
    from ase.data import chemical_symbols

    from mpattn.neighbors import radius_edges, structure_arrays

    out: dict[str, np.ndarray] = {}
    for k, atoms in enumerate(images):
        z, pos, cell, pbc = structure_arrays(atoms)
        s, r, shift = radius_edges(pos, CONTACT, cell, pbc, order="pairs")
        s, r, shift = s[0::2], r[0::2], shift[0::2]  # one direction of each pair
        d = np.linalg.norm(pos[s] - pos[r] + shift, axis=1)
        a, b = np.minimum(z[s], z[r]), np.maximum(z[s], z[r])
        for za, zb in set(zip(a.tolist(), b.tolist(), strict=True)):
            name = f"{chemical_symbols[zb]}-{chemical_symbols[za]}"  # heavier first: C-H
            column = out.setdefault(name, np.full(len(images), np.nan))
            column[k] = d[(a == za) & (b == zb)].min()
    return out


def _frame_id(atoms) -> int | None:
    i = atoms.info.get("frame_id")
    return None if i is None else int(i)


def _margins(train: dict, part: dict, n: int) -> tuple[np.ndarray, list[str]]:
    """Per frame of the part: the smallest (closest approach - training minimum) over its
    pairs, and that pair (negative: outside the training range)."""
    margin, pair = np.full(n, np.inf), [""] * n
    for name, d in part.items():
        low = np.nanmin(train[name]) if name in train and np.any(np.isfinite(train[name])) \
            else np.inf  # a pair training never had in contact: outside wherever it occurs
        m = d - low
        for k in np.nonzero(np.isfinite(d) & (m < margin))[0]:
            margin[k], pair[k] = m[k], name
    return margin, pair


def analyse(work: Path, part: str = "test", *, top: int = 10) -> dict:
    """The per-library errors of ``part`` inside and outside the training range and the
    ``top`` worst frames (module docstring)."""
    work = Path(work)
    train_images, images = _read(work / "parts" / "train.extxyz"), \
        _read(work / "parts" / f"{part}.extxyz")
    train, here = closest_approach(train_images), closest_approach(images)
    margin, pair = _margins(train, here, len(images))
    n_atoms = np.array([len(a) for a in images])
    ref = np.concatenate([a.arrays["REF_forces"] for a in images])
    starts = np.concatenate([[0], np.cumsum(n_atoms)])
    outside = margin < 0
    libraries = {}
    for path in sorted(work.glob("*/predictions.npz")):
        pred = np.load(path)
        if f"{part}_forces" not in pred:
            continue
        if not np.array_equal(pred[f"{part}_n_atoms"], n_atoms):
            raise ValueError(f"{path}: its {part} predictions are of other frames than "
                             f"{work / 'parts' / f'{part}.extxyz'} (atoms per frame differ)")
        err = 1000.0 * np.abs(pred[f"{part}_forces"] - ref)  # meV/Å per component
        sq = err ** 2
        frame_mae = np.add.reduceat(err.sum(1), starts[:-1]) / (3 * n_atoms)
        inside = np.repeat(~outside, n_atoms)
        worst = np.argsort(frame_mae)[::-1][:top]
        libraries[path.parent.name] = {
            "force_mae_mev_ang": float(err.mean()),
            "force_rmse_mev_ang": float(np.sqrt(sq.mean())),
            "inside_force_mae_mev_ang": float(err[inside].mean()),
            "inside_force_rmse_mev_ang": float(np.sqrt(sq[inside].mean())),
            "frame_force_mae_mev_ang": frame_mae.tolist(),
            "worst": [{"frame": int(k), "frame_id": _frame_id(images[k]),
                       "force_mae_mev_ang": float(frame_mae[k]), "pair": pair[k],
                       "closest_approach_ang": float(here[pair[k]][k]) if pair[k] else None,
                       "margin_ang": float(margin[k])} for k in worst]}
    if not libraries:
        raise FileNotFoundError(f"{work}: no <library>/predictions.npz with {part} forces")
    return {"work": str(work), "part": part, "frames": len(images),
            "train_frames": len(train_images),
            "outside": [int(k) for k in np.nonzero(outside)[0]],
            "training_minimum_ang": {k: float(np.nanmin(v)) for k, v in train.items()
                                     if np.any(np.isfinite(v))},
            "margin_ang": margin.tolist(), "libraries": libraries}


def table(result: dict) -> str:
    n_out = len(result["outside"])
    lines = [f"{result['part']}: {result['frames']} frames, {n_out} outside the training range "
             f"of {result['train_frames']} frames (a pair closer than in any training frame)",
             f"{'library':24s} {'MAE':>7s} {'RMSE':>7s} {'MAE in':>7s} {'RMSE in':>8s}  meV/Å"]
    for lib, r in result["libraries"].items():
        lines.append(f"{lib:24s} {r['force_mae_mev_ang']:7.2f} {r['force_rmse_mev_ang']:7.2f} "
                     f"{r['inside_force_mae_mev_ang']:7.2f} {r['inside_force_rmse_mev_ang']:8.2f}")
    low = result["training_minimum_ang"]
    for lib, r in result["libraries"].items():
        lines.append(f"worst frames of {lib}: frame, force MAE meV/Å, tightest pair "
                     "(closest approach / training minimum Å)")
        for w in r["worst"]:
            where = "outside" if w["margin_ang"] < 0 else "inside"
            lines.append(f"  {w['frame']:5d} {w['force_mae_mev_ang']:8.1f}  {w['pair']:5s} "
                         f"{w['closest_approach_ang']:.3f} / {low.get(w['pair'], np.nan):.3f}"
                         f"  {where}")
    return "\n".join(lines)


def plot(result: dict, path: str | Path) -> Path:
    """Each frame's force MAE against its margin to the training range, per library."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    margin = np.asarray(result["margin_ang"])
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for lib, r in result["libraries"].items():
        ax.scatter(margin, r["frame_force_mae_mev_ang"], s=6, alpha=0.6, label=lib)
    ax.axvline(0.0, color="k", lw=0.8, ls="--")
    ax.set_yscale("log")
    ax.set_xlabel("closest approach - training minimum, tightest pair (Å); < 0: outside")
    ax.set_ylabel("frame force MAE (meV/Å)")
    ax.set_title(f"{Path(result['work']).name}: {result['part']} frames")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return Path(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.frame_errors",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("work", type=Path, help="a work folder of benchmarks.peers_potentials")
    ap.add_argument("--part", default="test")
    ap.add_argument("--top", type=int, default=10)
    ap.add_argument("--out", type=Path, default=None, help="the figure's path")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args(argv)
    try:
        result = analyse(args.work, args.part, top=args.top)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table(result))
    save_result_and_figure(f"frame_errors-{args.work.name}", result, lambda p: plot(result, p),
                           out=args.out, save=not args.no_save)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
