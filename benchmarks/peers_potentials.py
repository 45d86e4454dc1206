"""Potentials side by side: ours, MACE and apax trained on the same frames for the same
wall-clock minutes on the same machine; test errors, training speed, MD speed through ASE.

    python -m benchmarks.peers_potentials --minutes 10                 # ethanol: ours, MACE, apax
    python -m benchmarks.peers_potentials --minutes 10 --data spice_like_xtb
    python -m benchmarks.peers_potentials --minutes 10 --peers apax --ours      # apax alone
    python -m benchmarks.peers_potentials --minutes 10 --ours attention so3krates --peers

**Data**: a bundled set by name (``ethanol_xtb``: 950 / 50 / 1000 frames, rMD17 protocol;
``spice_like_xtb``: a fifth of the molecules unseen, then 80 / 5 / 15 %) split exactly as
``python -m experiments.potential`` splits it (its own functions, seed 0:
:func:`split_parts`), written to ``train.extxyz``, ``val.extxyz``, ``test.extxyz`` (and
``test_unseen.extxyz``) in eV and Å under ``--work`` (default ``runs/peers/<data>``), energy
and forces both as ASE's calculator results and as ``REF_energy`` / ``REF_forces``. After our
run, its ``split.json`` is checked against these parts (the run stops if they differ).

**Each library** trains on ``train`` with ``val`` for its own model selection and schedule,
for ``--minutes`` of training (ours: ``experiments.potential`` with its default potential
settings and the budget, for each model of ``--ours``, default its default model, labelled
``mpattn`` for ``attention`` (the label of every result before so3krates became the default)
and ``mpattn-<model>`` otherwise; the peers: their own training commands,
epochs sized by a short calibration run, as their workers in ``benchmarks/peer_workers/``
explain, with why each is configured as it is). Then, through each library's ASE
calculator and the same code (``benchmarks/peer_workers/ase_side.py``): energies and forces
of every test frame, one call each, and NVE steps/s (velocity Verlet, 0.5 fs, after 5
warm-up steps) on the first test frame and on a periodic box of ``--water-atoms`` water
atoms (``benchmarks.md.water_atoms``, speed only: no library was trained on water). Errors
are computed here, for all libraries, by :func:`mpattn.train.metrics.force_metrics` against
the written reference.

**Peers' environments**: each peer runs in a virtual environment of its own under
``--venvs`` (default ``~/.cache/mpattn/peer-venvs/<peer>``), made on first use with pinned
requirements (``benchmarks/peer_venvs.py``); our environment is never changed. ``--reuse``
keeps the libraries already finished in ``--work`` (a run resumed after a failure).
``--beside RESULT.json`` adds the rows and curves of an earlier result of the same data,
split and minutes (e.g. the peers' run, beside a new model of ours), each marked with the
file and machine it came from.

Writes ``peers_potentials-<data>-<minutes>min-<device>-<date>.json`` and ``.png`` (validation
force MAE against training minutes, one curve per library; test force MAE bars) under ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

from benchmarks.common import RESULTS, write_result
from benchmarks.peer_venvs import DEFAULT_ROOT, ensure_venv, run_worker

__all__ = ["PEERS", "beside_rows", "check_same_split", "curve_from_metrics", "format_rows", "main",
           "md_structures", "plot", "reference", "run_ours", "run_peer", "score", "split_parts",
           "summary_rows", "write_parts"]

#: peer -> its worker script (``benchmarks/peer_workers/``; its venv: ``peer_venvs``)
PEERS: dict[str, str] = {"mace": "mace_worker.py", "apax": "apax_worker.py"}
PARTS = ("train", "val", "test", "test_unseen")


# ----------------------------------------------------------------------------- data


def split_parts(data: str, seed: int = 0):
    """``(frames, {part: frame indices}, name)``: the frames of bundled set ``data`` and the
    split ``python -m experiments.potential --data data --seed seed`` makes of them."""
    from experiments import potential as experiment
    from experiments import potential_data

    args = experiment.parser().parse_args(["--data", data, "--seed", str(seed)])
    path, protocol, name = potential_data.resolve_data(args.data)
    frames, _ = potential_data.read_checked(path, args, "data", log=lambda _m: None)
    parts = potential_data.split(frames, experiment._sizes(args, protocol), seed,
                                 val_file=False, test_file=False)
    return frames, parts, name


def write_parts(frames, parts: dict, folder: Path) -> dict[str, list[int]]:
    """Each non-empty part as ``<part>.extxyz`` in ``folder`` (energy/forces as calculator
    results and as ``REF_energy``/``REF_forces``, the frame id as ``frame_id``); returns the
    frame ids per part."""
    import ase.io

    folder.mkdir(parents=True, exist_ok=True)
    ids = {}
    for part in PARTS:
        index = np.asarray(parts.get(part, []), dtype=np.int64)
        path = folder / f"{part}.extxyz"
        if not len(index):
            path.unlink(missing_ok=True)
            continue
        images = []
        for i in index:
            atoms = frames.atoms(int(i))
            atoms.info["REF_energy"] = float(frames.energy[i])
            atoms.arrays["REF_forces"] = frames.forces[frames.atom_index(int(i))].copy()
            atoms.info["frame_id"] = int(frames.ids[i])
            images.append(atoms)
        ase.io.write(str(path), images, format="extxyz")
        ids[part] = [int(frames.ids[i]) for i in index]
    (folder / "parts.json").write_text(json.dumps(ids) + "\n")
    return ids


def reference(path: Path) -> dict:
    """``{"energy", "forces", "n_atoms"}`` (eV, eV/Å) of a written part."""
    import ase.io

    images = ase.io.read(str(path), index=":")
    return {"energy": np.array([a.info["REF_energy"] for a in images], np.float64),
            "forces": np.concatenate([a.arrays["REF_forces"] for a in images]),
            "n_atoms": np.array([len(a) for a in images])}


def check_same_split(split_json: Path, parts_json: Path) -> None:
    """Raise RuntimeError unless our run's ``split.json`` holds, for every part written to
    ``parts.json``, the same frame ids in the same order."""
    split = json.loads(Path(split_json).read_text())
    written = json.loads(Path(parts_json).read_text())
    for part, ids in written.items():
        if split.get(part) != ids:
            raise RuntimeError(f"{split_json}: the {part} frames differ from those of "
                               f"{parts_json} (the comparison would not be on the same split)")


def score(ref: dict, pred: dict) -> dict:
    """Test errors of ``pred`` against ``ref`` (both ``{"energy", "forces", "n_atoms"}``, eV
    and eV/Å): :func:`mpattn.train.metrics.force_metrics`; refuses predictions of other
    frames (a different atom count per frame)."""
    from mpattn.train.metrics import force_metrics

    if not np.array_equal(np.asarray(ref["n_atoms"]), np.asarray(pred["n_atoms"])):
        raise ValueError(f"predictions of {len(pred['n_atoms'])} frames do not match the "
                         f"{len(ref['n_atoms'])} reference frames (atoms per frame differ)")
    return force_metrics(pred["energy"], ref["energy"], pred["forces"], ref["forces"],
                         ref["n_atoms"])


# ----------------------------------------------------------------------------- runs


def run_peer(peer: str, python: Path, parts: Path, out: Path, minutes: float, md: list[Path],
             md_steps: int, *, log=print) -> dict:
    """The peer's worker in its venv: its ``report.json`` (predictions beside it)."""
    return run_worker(python, PEERS[peer], ["--parts", parts, "--minutes", minutes, "--out", out,
                                            "--md", *md, "--md-steps", md_steps], out, log=log)


def curve_from_metrics(path: Path) -> list[list[float]]:
    """``[[seconds since training began, val force MAE meV/Å], ...]`` from our run's
    ``metrics.csv`` (its ``seconds`` column is each epoch's own)."""
    with open(path) as fh:
        rows = list(csv.DictReader(fh))
    t, curve = 0.0, []
    for r in rows:
        t += float(r["seconds"])
        curve.append([t, float(r["val_force_mae_mev_ang"])])
    return curve


def ours_label(model: str) -> str:
    """The library label (and work folder) of our ``model``: ``mpattn`` for ``attention``, the
    default model when the first results were written (``--beside`` joins on the label)."""
    return "mpattn" if model == "attention" else f"mpattn-{model}"


def run_ours(data: str, parts_dir: Path, out: Path, minutes: float, md: list[Path],
             md_steps: int, *, model: str, log=print) -> dict:
    """``experiments.potential --model model`` for ``minutes`` in ``out``, then the same
    predictions and MD speed through :class:`mpattn.ase.Calculator` as the peers' workers
    do."""
    import jax

    from benchmarks.peer_workers.ase_side import md_speed, predict, write_report
    from experiments import potential as experiment
    from mpattn import __version__
    from mpattn.ase import Calculator

    args = experiment.parser().parse_args([
        "--data", data, "--model", model, "--seed", "0", "--time-budget-min", str(minutes),
        "--workdir", str(out), "--no-md", "--no-progress"])
    results = experiment.run(args, log=log)
    check_same_split(out / "split.json", parts_dir / "parts.json")
    calc = Calculator(out)
    predictions = {p: predict(calc, parts_dir / f"{p}.extxyz") for p in ("test", "test_unseen")
                   if (parts_dir / f"{p}.extxyz").is_file()}
    curve = curve_from_metrics(out / "metrics.csv")
    report = {
        "library": ours_label(model), "minutes": minutes,
        "versions": {"mpattn": __version__, "jax": jax.__version__},
        "model": f"{results['model']} {json.dumps(results['model_config'])}",
        "params": results["params"], "epochs": results["epochs"],
        "train_seconds": results["train_seconds"], "wall_seconds": results["train_seconds"],
        "train_frames_per_s": results["frames_per_s"], "curve": curve,
        "curve_unit": "meV/Å", "md": [md_speed(calc, s, steps=md_steps) for s in md],
        "model_file": str(out),
    }
    write_report(out, report, predictions)
    return json.loads((out / "report.json").read_text())


def md_structures(parts_dir: Path, water_atoms: int) -> list[Path]:
    """The MD starting structures: the first test frame and a water box (0: none)."""
    import ase.io

    first = ase.io.read(str(parts_dir / "test.extxyz"), index=0)
    first.calc = None
    paths = [parts_dir / "md_first_test_frame.extxyz"]
    ase.io.write(str(paths[0]), first, format="extxyz")
    if water_atoms:
        from benchmarks.md import water_atoms as water_box

        paths.append(parts_dir / f"md_water_{water_atoms}.extxyz")
        ase.io.write(str(paths[-1]), water_box(water_atoms), format="extxyz")
    return paths


# ----------------------------------------------------------------------------- output


def summary_rows(reports: dict[str, dict], parts_dir: Path, out_root: Path,
                 parts=("test", "test_unseen")) -> list[dict]:
    """One row per library: its report's speed figures and its errors on ``parts`` (scored
    here from ``out_root/<library>/predictions.npz`` against ``parts_dir/<part>.extxyz``)."""
    import ase.io

    n_train = len(ase.io.read(str(parts_dir / "train.extxyz"), index=":"))
    rows = []
    for lib, rep in reports.items():
        pred = np.load(out_root / lib / "predictions.npz")
        row = {"library": lib, "model": rep["model"], "params": rep.get("params"),
               "epochs": rep["epochs"], "train_minutes": rep["train_seconds"] / 60.0,
               # the same rule for all: epochs of training frames over the training clock
               # (which includes each library's per-epoch validation)
               "train_frames_per_s": n_train * rep["epochs"] / rep["train_seconds"],
               "versions": rep.get("versions"),
               "md_steps_per_s": {m["structure"]: m["steps_per_s"] for m in rep["md"]},
               "md_atoms": {m["structure"]: m["atoms"] for m in rep["md"]}}
        for part in parts:
            if f"{part}_energy" in pred:
                row[part] = score(reference(parts_dir / f"{part}.extxyz"),
                                  {k: pred[f"{part}_{k}"] for k in ("energy", "forces",
                                                                     "n_atoms")})
        row["best_val_force_mae_mev_ang"] = min(f for _, f in rep["curve"])
        rows.append(row)
    return rows


def beside_rows(path: Path, data: str, minutes: float, split: dict[str, int],
                skip=()) -> tuple[list[dict], dict[str, list]]:
    """The rows and validation curves of the earlier result ``path`` (the libraries not in
    ``skip``), each row marked ``from``: the file and its machine. It must hold the same
    ``data``, ``minutes`` and split sizes as this run, or the comparison would not be one."""
    try:
        earlier = json.loads(Path(path).read_text())
        theirs = (earlier["data"], earlier["minutes"], earlier["split"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"--beside {path}: not a peers_potentials result ({e})") from None
    if theirs != (data, minutes, split):
        raise ValueError(f"--beside {path}: {theirs[0]}, {theirs[1]:g} min, split "
                         f"{theirs[2]}; this run: {data}, {minutes:g} min, split {split}")
    machine = earlier.get("machine", {})
    origin = f"{Path(path).name} ({machine.get('device', '?')}, {machine.get('date', '?')})"
    rows = [dict(r, **{"from": origin}) for r in earlier["rows"] if r["library"] not in skip]
    return rows, {r["library"]: earlier["curves"][r["library"]] for r in rows}


def format_rows(rows: list[dict], part: str = "test") -> list[str]:
    """The table printed at the end (errors on ``part``)."""
    lines = [f"{'library':16} {'params':>8} {'epochs':>6} {'min':>5} {'frames/s':>8} "
             f"{'E meV':>7} {'E meV/at':>8} {'F meV/Å':>8} {'MD st/s':>8} {'water st/s':>10}"]
    for r in rows:
        md = list(r["md_steps_per_s"].values())
        t = r.get(part, {})
        lines.append(
            f"{r['library']:16} {r['params'] or 0:8d} {r['epochs']:6d} {r['train_minutes']:5.1f} "
            f"{r['train_frames_per_s'] or 0:8.0f} {t.get('energy_mae_mev', float('nan')):7.2f} "
            f"{t.get('energy_mae_mev_per_atom', float('nan')):8.3f} "
            f"{t.get('force_mae_mev_ang', float('nan')):8.2f} "
            f"{md[0] if md else float('nan'):8.1f} "
            f"{md[1] if len(md) > 1 else float('nan'):10.2f}")
    return lines


def plot(curves: dict[str, list], rows: list[dict], path: Path, title: str,
         part: str = "test") -> Path:
    """Validation force MAE against training minutes per library (``curves``: library ->
    [(seconds, meV/Å)]), and ``part`` force MAE bars; rows from an earlier run are starred."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2),
                                 gridspec_kw={"width_ratios": [1.6, 1]})
    earlier = {r["library"] for r in rows if "from" in r}
    for k, (lib, curve) in enumerate(curves.items()):
        c = np.asarray(curve, np.float64)
        ax.plot(c[:, 0] / 60.0, c[:, 1], label=lib + ("*" if lib in earlier else ""),
                color=f"C{k}")
    ax.set_yscale("log")
    ax.set_xlabel("training minutes")
    ax.set_ylabel("validation force MAE (meV/Å)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(title="* an earlier run" if any("from" in r for r in rows) else None)
    names = [r["library"] + ("*" if "from" in r else "") for r in rows]
    maes = [r.get(part, {}).get("force_mae_mev_ang", np.nan) for r in rows]
    bars = bx.bar(names, maes, color=[f"C{k}" for k in range(len(rows))])
    bx.bar_label(bars, fmt="%.1f")
    bx.tick_params(axis="x", labelrotation=20)
    bx.set_ylabel(f"{part} force MAE (meV/Å)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- main


def main(argv=None) -> int:
    from experiments.configs.potential import MODEL
    from mpattn.models import model_names

    ap = argparse.ArgumentParser(prog="python -m benchmarks.peers_potentials",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="training minutes per library")
    ap.add_argument("--data", default="ethanol_xtb", choices=["ethanol_xtb", "spice_like_xtb"])
    ap.add_argument("--peers", nargs="*", default=list(PEERS), choices=list(PEERS))
    ap.add_argument("--ours", nargs="*", default=[MODEL], choices=model_names(),
                    help="our models, each beside the peers (none: the peers only)")
    ap.add_argument("--venvs", type=Path, default=DEFAULT_ROOT,
                    help="folder of the peers' virtual environments (made on first use)")
    ap.add_argument("--work", type=Path, help="default runs/peers/<data>")
    ap.add_argument("--md-steps", type=int, default=100, help="timed NVE steps per structure")
    ap.add_argument("--water-atoms", type=int, default=1000, help="0: no water box")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--reuse", action="store_true",
                    help="keep each library's finished run in --work (its report.json) "
                         "instead of training it again: a run resumed after a failure")
    ap.add_argument("--beside", type=Path, nargs="*", default=[], metavar="RESULT_JSON",
                    help="earlier results (same data, minutes and split) whose libraries "
                         "join the table and plot, marked as such")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args(argv)
    if not args.minutes > 0:
        ap.error(f"--minutes {args.minutes}: must be positive")
    if args.md_steps < 1:
        ap.error(f"--md-steps {args.md_steps}: must be at least 1")
    work = (args.work or Path("runs/peers") / args.data).resolve()  # workers run elsewhere
    pythons = {p: ensure_venv(p, args.venvs) for p in args.peers}  # before any training
    frames, parts, name = split_parts(args.data)
    parts_dir = work / "parts"
    written = write_parts(frames, parts, parts_dir)
    print(f"{name}: " + ", ".join(f"{k} {len(v)}" for k, v in written.items()) +
          f" frames in {parts_dir}")
    md = md_structures(parts_dir, args.water_atoms)
    reports = {}
    ours = {ours_label(m): m for m in args.ours}
    for lib in list(ours) + list(args.peers):
        done = work / lib / "report.json"
        if args.reuse and done.is_file():
            reports[lib] = json.loads(done.read_text())
            if reports[lib].get("minutes", args.minutes) != args.minutes:
                ap.error(f"--reuse: {done} was trained for {reports[lib]['minutes']} min")
            print(f"{lib}: reusing {done}")
        elif lib in ours:
            reports[lib] = run_ours(args.data, parts_dir, work / lib, args.minutes, md,
                                    args.md_steps, model=ours[lib])
        else:
            reports[lib] = run_peer(lib, pythons[lib], parts_dir, work / lib, args.minutes,
                                    md, args.md_steps)
    rows = summary_rows(reports, parts_dir, work)
    sizes = {k: len(v) for k, v in written.items()}
    curves = {lib: rep["curve"] for lib, rep in reports.items()}
    for path in args.beside:
        try:
            more, more_curves = beside_rows(path, args.data, args.minutes, sizes, skip=curves)
        except ValueError as e:
            ap.error(str(e))
        rows += more
        curves.update(more_curves)
    print("\n".join(format_rows(rows)))
    payload = {"data": args.data, "minutes": args.minutes, "split": sizes,
               "md_steps": args.md_steps, "water_atoms": args.water_atoms, "rows": rows,
               "curves": curves,
               "reports": {lib: {k: v for k, v in rep.items() if k != "curve"}
                           for lib, rep in reports.items()},
               "command": "python -m benchmarks.peers_potentials " + " ".join(
                   argv if argv is not None else sys.argv[1:])}
    title = f"{args.data}: {args.minutes:g} min of training each"
    if args.no_save:
        print(f"wrote {plot(curves, rows, work / 'peers_potentials.png', title)}")
    else:
        written_json = write_result(f"peers_potentials-{args.data}-{args.minutes:g}min",
                                    payload, args.out)
        print(f"wrote {written_json}")
        print(f"wrote {plot(curves, rows, written_json.with_suffix('.png'), title)}")
    return 0


if __name__ == "__main__":
    from mpattn.runtime import restart_with_hugepages

    restart_with_hugepages()  # as experiments.potential does: huge pages for XLA's buffers
    sys.exit(main())
