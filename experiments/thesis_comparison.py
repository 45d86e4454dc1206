"""The MH-MP thesis' comparison (its figure 28), re-run: MH-MP, MH-MP+PE and MPNN-GRU with
the thesis' setup, and our best variant beside them.

    python -m experiments.thesis_comparison                      # thesis setup, 200 epochs each
    python -m experiments.thesis_comparison --time-budget-min 10 # each model gets 10 minutes
    python -m experiments.thesis_comparison --resume             # go on after a stop

Each model trains with ``preset thesis`` (15,000 / 4,300 / 2,200 molecules, one shared split,
batch 8, MSE, Adam 1e-3 x0.7 every 5 epochs) in ``<workdir>/<name>/``; then
``comparison.json``, ``comparison.md`` (a table) and ``comparison.png`` (test MAE per model,
with chemical accuracy marked) are written to ``<workdir>``. With ``--resume`` a model whose
folder holds ``results.json`` is not trained again and one stopped mid-run continues from its
last checkpoint, so a comparison of several hours survives being stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from experiments.configs.qm9 import PRESETS, STANDARD_ATTENTION
from experiments.qm9_u0 import resume_conflicts, run
from mpattn.train.metrics import KCAL_MOL_MEV
from mpattn.train.report import write_json

#: name -> (registry model, model-config overrides, training overrides, task overrides)
VARIANTS: dict[str, tuple[str, dict, dict, dict]] = {
    "MH-MP": ("mhmp", {}, {}, {}),
    "MH-MP+PE": ("mhmp_pe", {}, {}, {}),
    "MPNN-GRU": ("mpnn", {}, {}, {}),
    # the standard preset's model and regulariser, with our loss, reference and EMA, on the
    # thesis' split, batch and schedule
    "Attention (ours: vector channels, silu attention, denoising, L1, reference, EMA)": (
        "attention", STANDARD_ATTENTION, {"loss": "l1", "ema_decay": 0.999},
        {"reference": True, "aux": PRESETS["standard"].aux["attention"]}),
}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    names = [r["name"].split(" (")[0] + (" (ours)" if "ours" in r["name"] else "") for r in rows]
    ax.bar(names, [r["test_mae_mev"] for r in rows], color=["C0", "C1", "C2", "C3"][:len(rows)])
    ax.axhline(KCAL_MOL_MEV, color="k", ls="--", lw=1, label="chemical accuracy (43 meV)")
    ax.set_ylabel("test MAE on U0 (meV)")
    ax.set_yscale("log")
    ax.legend()
    fig.autofmt_xdate(rotation=15)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.thesis_comparison",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default="runs/thesis_comparison")
    ap.add_argument("--epochs", type=int, help="per model (thesis: 200)")
    ap.add_argument("--time-budget-min", type=float, help="per model")
    ap.add_argument("--train-size", type=int)
    ap.add_argument("--val-size", type=int)
    ap.add_argument("--test-size", type=int)
    ap.add_argument("--seed", type=int, default=0, help="split and initialisation seed")
    ap.add_argument("--models", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    ap.add_argument("--dataset-cache", help="featurized QM9 cache file (no RDKit/qm9pack)")
    ap.add_argument("--model-config", default="{}", help="JSON overrides for every model")
    ap.add_argument("--resume", action="store_true",
                    help="reuse finished models' results.json, continue stopped ones")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    preset = PRESETS["thesis"]
    sizes = [v if v is not None else d for v, d in zip(
        (args.train_size, args.val_size, args.test_size), preset.sizes, strict=True)]
    workdir = Path(args.workdir)
    rows, split_file = [], None
    for name in args.models:
        model, model_overrides, train_overrides, task_overrides = VARIANTS[name]
        fields = {"model": model, "epochs": args.epochs, "time_budget_min": args.time_budget_min,
                  "seed": args.seed}
        config = dataclasses.replace(preset.train, **train_overrides,
                                     **{k: v for k, v in fields.items() if v is not None})
        task = dataclasses.replace(preset.task, **task_overrides)
        sub = workdir / model if not train_overrides else workdir / f"{model}_ours"
        overrides = model_overrides | json.loads(args.model_config)
        # the model config as built (with the heads its terms need), as results.json has it
        model_config = task.model_config(preset.model_config(model, overrides))
        if args.resume and (sub / "results.json").is_file():
            res = json.loads((sub / "results.json").read_text())
            differ = resume_conflicts(res, config, task, model_config)
            if differ:
                raise SystemExit(f"--resume: {sub / 'results.json'} is of a run with other "
                                 f"settings ({'; '.join(differ)}); use another --workdir")
            print(f"{name}: finished before ({sub / 'results.json'}), not trained again")
        else:
            res = run(config, task, workdir=sub, sizes=tuple(sizes), split_file=split_file,
                      dataset_cache=args.dataset_cache, preset="thesis",
                      model_config=model_config,
                      resume=args.resume and (sub / "checkpoints").is_dir(),
                      progress=not args.no_progress)
        split_file = sub / "split.json"  # every model on the same split
        rows.append({"name": name, "model": model, "test_mae_mev": res["test"]["mae_mev"],
                     "val_mae_mev": res["val"]["mae_mev"], "epochs": res["epochs"],
                     "train_seconds": res["train_seconds"], "params": res["params"],
                     "workdir": str(sub)})
        print(f"{name}: test MAE {res['test']['mae_mev']:.1f} meV")
    write_json(workdir / "comparison.json", {"rows": rows, "split_sizes": sizes})
    lines = ["| model | test MAE (meV) | val MAE (meV) | epochs | training time (s) | "
             "parameters |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['test_mae_mev']:.1f} | {r['val_mae_mev']:.1f} | "
              f"{r['epochs']} | {r['train_seconds']:.0f} | {r['params']:,} |" for r in rows]
    (workdir / "comparison.md").write_text("\n".join(lines) + "\n")
    plot(rows, workdir / "comparison.png")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    from mpattn.runtime import restart_with_hugepages

    restart_with_hugepages()  # before any work: huge pages for XLA's CPU buffers
    raise SystemExit(main())
