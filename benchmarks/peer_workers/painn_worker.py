"""SchNetPack 2's PaiNN trained on QM9 U0 for a wall-clock budget on our split, run in
SchNetPack's own venv by ``python -m benchmarks.peers --models painn``; writes
``report.json`` + ``predictions.npz`` (test U0 in eV, by QM9 id).

    python benchmarks/peer_workers/painn_worker.py --data qm9_u0.npz --minutes 10 --out OUT

Input (written by ``benchmarks/peers_painn.py``): z, positions (Å), n_atoms, U0 (eV) and ids
of the molecules of our split, its ``train``/``val``/``test`` index arrays and our
per-element reference fitted on the training part (``atomrefs``, eV per atom of each Z).
The SchNetPack dataset (an ASE database) is built from it here: nothing is downloaded.

Settings: SchNetPack's own QM9 experiment (``schnetpack/configs/experiment/qm9_atomwise.yaml``
with the PaiNN representation): PaiNN 128 features, 3 interactions, 20 Gaussians, cosine
cutoff 5 Å, Atomwise sum readout; transforms SubtractCenterOfMass, RemoveOffsets (atom
references and mean removed), MatScipyNeighborList (5 Å), CastTo32; MSE loss, AdamW lr 5e-4,
ReduceLROnPlateau (factor 0.5, patience 75, cooldown 10), batch 100. The atom references
are ours (SchNetPack's QM9 class would download the dataset's own; the roles are the same).
Equal time: Lightning's own ``max_time``; the weights with the lowest validation loss
(SchNetPack's ``ModelCheckpoint``) are evaluated.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

PROPERTY = "energy_U0"


def build_database(data: dict, path: Path):
    """The SchNetPack dataset of all molecules of ``data`` (rows in file order)."""
    import ase
    from schnetpack.data import ASEAtomsData

    if path.exists():
        path.unlink()
    refs = np.zeros(100)
    refs[: len(data["atomrefs"])] = data["atomrefs"]
    db = ASEAtomsData.create(str(path), distance_unit="Ang",
                             property_unit_dict={PROPERTY: "eV"},
                             atomrefs={PROPERTY: refs.tolist()})
    starts = np.concatenate([[0], np.cumsum(data["n_atoms"])])
    atoms, props = [], []
    for g in range(len(data["n_atoms"])):
        a = slice(starts[g], starts[g + 1])
        atoms.append(ase.Atoms(numbers=data["z"][a], positions=data["positions"][a]))
        props.append({PROPERTY: np.array([data["energy"][g]], np.float64)})
    db.add_systems(props, atoms)
    return db


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--minutes", type=float, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    import pytorch_lightning as pl
    import schnetpack as spk
    import schnetpack.transform as trn
    import torch
    import torchmetrics

    pl.seed_everything(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    data = dict(np.load(args.data))
    build_database(data, args.out / "qm9_u0.db")
    np.savez(args.out / "split.npz", train_idx=data["train"], val_idx=data["val"],
             test_idx=data["test"])
    cutoff = 5.0
    module = spk.data.AtomsDataModule(
        str(args.out / "qm9_u0.db"), batch_size=100, num_train=len(data["train"]),
        num_val=len(data["val"]), num_test=len(data["test"]),
        split_file=str(args.out / "split.npz"), num_workers=0, pin_memory=False,
        transforms=[trn.SubtractCenterOfMass(),
                    trn.RemoveOffsets(PROPERTY, remove_mean=True, remove_atomrefs=True),
                    trn.MatScipyNeighborList(cutoff=cutoff), trn.CastTo32()],
        property_units={PROPERTY: "eV"}, distance_unit="Ang")
    module.prepare_data()
    module.setup()
    painn = spk.representation.PaiNN(
        n_atom_basis=128, n_interactions=3,
        radial_basis=spk.nn.GaussianRBF(n_rbf=20, cutoff=cutoff),
        cutoff_fn=spk.nn.CosineCutoff(cutoff))
    model = spk.model.NeuralNetworkPotential(
        representation=painn, input_modules=[spk.atomistic.PairwiseDistances()],
        output_modules=[spk.atomistic.Atomwise(n_in=128, output_key=PROPERTY,
                                               aggregation_mode="sum")],
        postprocessors=[trn.CastTo64(), trn.AddOffsets(PROPERTY, add_mean=True,
                                                       add_atomrefs=True)])
    output = spk.task.ModelOutput(name=PROPERTY, loss_fn=torch.nn.MSELoss(), loss_weight=1.0,
                                  metrics={"MAE": torchmetrics.MeanAbsoluteError()})
    task = spk.task.AtomisticTask(
        model=model, outputs=[output], optimizer_cls=torch.optim.AdamW,
        optimizer_args={"lr": 5e-4, "weight_decay": 0.0},
        scheduler_cls=spk.train.ReduceLROnPlateau, scheduler_monitor="val_loss",
        scheduler_args={"mode": "min", "factor": 0.5, "patience": 75, "threshold": 0.0,
                        "threshold_mode": "rel", "cooldown": 10, "min_lr": 0.0,
                        "smoothing_factor": 0.0})

    curve: list[list[float]] = []
    t_start = [None]

    class Clock(pl.Callback):
        """Validation MAE (meV) against seconds since training began."""

        def on_train_start(self, trainer, pl_module):
            t_start[0] = time.perf_counter()

        def on_validation_epoch_end(self, trainer, pl_module):
            if t_start[0] is None or trainer.sanity_checking:
                return
            mae = trainer.callback_metrics.get(f"val_{PROPERTY}_MAE")
            if mae is not None:
                curve.append([time.perf_counter() - t_start[0], 1000.0 * float(mae)])

    best_path = args.out / "best_model"
    trainer = pl.Trainer(
        max_time={"minutes": args.minutes}, max_epochs=-1, accelerator="cpu", devices=1,
        default_root_dir=str(args.out), num_sanity_val_steps=0, enable_progress_bar=False,
        logger=pl.loggers.CSVLogger(str(args.out / "logs")),
        callbacks=[Clock(), spk.train.ModelCheckpoint(model_path=str(best_path),
                                                      monitor="val_loss", save_top_k=1)])
    t0 = time.perf_counter()
    trainer.fit(task, datamodule=module)
    wall = time.perf_counter() - t0
    best = torch.load(best_path, weights_only=False, map_location="cpu")
    best.eval()
    ids, pred = [], []
    for batch in module.test_dataloader():
        out = best(batch)
        pred.append(out[PROPERTY].detach().double().numpy().ravel())
        ids.append(batch["_idx"].numpy().ravel())
    index = np.concatenate(ids)
    predicted = np.concatenate(pred)
    np.savez(args.out / "predictions.npz", test_id=data["ids"][index], test_energy=predicted)
    n_params = sum(p.numel() for p in best.parameters())
    steps_per_epoch = len(module.train_dataloader())
    train_s = curve[-1][0] if curve else wall
    report = {
        "library": "schnetpack", "model": "PaiNN 128 features, 3 interactions, cutoff 5 Å",
        "versions": {"schnetpack": spk.__version__ if hasattr(spk, "__version__") else None,
                     "torch": torch.__version__, "pytorch_lightning": pl.__version__},
        "params": int(n_params), "epochs": trainer.global_step / steps_per_epoch,
        "steps": int(trainer.global_step), "train_seconds": train_s, "wall_seconds": wall,
        "threads": torch.get_num_threads(),
        "train_mol_per_s": trainer.global_step * 100 / train_s if train_s else None,
        "curve": curve, "curve_unit": "meV",
    }
    (args.out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out / 'report.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
