"""QM9: sources, targets with units, splits, and ``python -m mpattn.data.qm9 --summary``.

Sources:

- **qm9pack** (default, offline): the MIT-licensed PyPI package ships all 130,831
  characterized molecules as CSV files; they are read directly, located with
  ``importlib.util.find_spec`` (importing ``qm9pack`` itself needs ``pkg_resources``, which
  modern setuptools and Python 3.12+ venvs lack).
- **the original archive** ``dsgdb9nsd.xyz.tar.bz2`` or a folder of its ``.xyz`` files
  (:mod:`mpattn.data.xyz`), with the 3,054 uncharacterized molecules excluded.

Targets are converted once, at load time, to library units: energies (``homo lumo gap zpve
U0 U H G``) from Hartree to eV; the others keep QM9's units (see :data:`TARGETS`). Note
that ``U0`` is the *total* internal energy at 0 K, not the atomization energy.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ase.data import atomic_numbers
from ase.units import Hartree

from mpattn.data.cache import cache_key, cached
from mpattn.data.molecules import MoleculeSet, perceive_many
from mpattn.data.records import QM9_PROPERTIES, BadRecord, RawMolecule

__all__ = [
    "SPLIT_PRESETS",
    "TARGETS",
    "Split",
    "build_qm9",
    "load_qm9",
    "load_split",
    "make_split",
    "qm9pack_csv_paths",
    "read_qm9pack",
    "save_split",
]

#: name -> (unit in the library, factor from QM9's unit, description)
TARGETS: dict[str, tuple[str, float, str]] = {
    "A": ("GHz", 1.0, "rotational constant A"),
    "B": ("GHz", 1.0, "rotational constant B"),
    "C": ("GHz", 1.0, "rotational constant C"),
    "mu": ("Debye", 1.0, "dipole moment"),
    "alpha": ("Bohr^3", 1.0, "isotropic polarizability"),
    "homo": ("eV", Hartree, "HOMO energy"),
    "lumo": ("eV", Hartree, "LUMO energy"),
    "gap": ("eV", Hartree, "HOMO-LUMO gap"),
    "r2": ("Bohr^2", 1.0, "electronic spatial extent"),
    "zpve": ("eV", Hartree, "zero-point vibrational energy"),
    "U0": ("eV", Hartree, "internal energy at 0 K"),
    "U": ("eV", Hartree, "internal energy at 298.15 K"),
    "H": ("eV", Hartree, "enthalpy at 298.15 K"),
    "G": ("eV", Hartree, "free energy at 298.15 K"),
    "Cv": ("cal/(mol K)", 1.0, "heat capacity at 298.15 K"),
}
assert tuple(TARGETS) == tuple(name for name, _ in QM9_PROPERTIES)

_CSV_COLUMNS = {
    "A": "RotA_GHz", "B": "RotB_GHz", "C": "RotC_GHz", "mu": "Dipole_debye",
    "alpha": "Polarizability_bohr3", "homo": "HOMO_au", "lumo": "LUMO_au",
    "gap": "HOMO_LUMO_gap_au", "r2": "R2_bohr2", "zpve": "ZPVE_au",
    "U0": "InternalEnergy_0K_au", "U": "InternalEnergy_298K_au", "H": "Enthalphy_298K_au",
    "G": "GibbsFreeEnergy_298K_au", "Cv": "Heatcapacity_Cv_cal_mol_K",
}

#: named split sizes (train, val, test); ``None`` test = all remaining molecules
SPLIT_PRESETS: dict[str, tuple[int, int, int | None]] = {
    "thesis": (15_000, 4_300, 2_200),
    "standard": (110_000, 10_000, None),
}

# ---------------------------------------------------------------------------- sources


def qm9pack_data_dir() -> Path:
    """Folder of the qm9pack package's CSV files, found without importing qm9pack."""
    spec = importlib.util.find_spec("qm9pack")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "QM9's default source is the 'qm9pack' package, which is not installed: "
            "pip install -e '.[qm9]' (or pip install qm9pack)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def qm9pack_csv_paths() -> list[Path]:
    """The three CSV files that hold QM9 in the qm9pack package."""
    d = qm9pack_data_dir()
    paths = [d / f"qm9_part{i}.csv" for i in (1, 2, 3)]
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"qm9pack is installed but {p} is missing; reinstall it")
    return paths


def _parse_row(idx, n_atoms, elements, xyz, smiles, props, source) -> RawMolecule:
    syms = [s.strip().strip("'\"") for s in str(elements).strip()[1:-1].split(",")]
    unknown = [s for s in syms if s not in atomic_numbers]
    if unknown:
        raise ValueError(f"unknown element symbol(s) {unknown}")
    try:
        pos = np.array(str(xyz).replace("[", " ").replace("]", " ").split(","), np.float64)
    except ValueError as err:
        raise ValueError(f"malformed coordinates: {err}") from None
    if pos.size != 3 * len(syms):
        raise ValueError(f"{len(syms)} elements but {pos.size} coordinates (expected 3 each)")
    if int(n_atoms) != len(syms):
        raise ValueError(f"N_atoms says {n_atoms} but {len(syms)} elements are listed")
    pos = pos.reshape(-1, 3)
    if not np.all(np.isfinite(pos)):
        raise ValueError("NaN or infinite coordinates")
    bad = [k for k, v in props.items() if not np.isfinite(v)]
    if bad:
        raise ValueError(f"missing or non-finite target(s) {bad}")
    return RawMolecule(id=int(idx), z=np.array([atomic_numbers[s] for s in syms], np.int8),
                       positions=pos, smiles=smiles if isinstance(smiles, str) and smiles else None,
                       properties=props, source=source)


def read_qm9pack(paths: list[Path] | None = None, *, nrows: int | None = None,
                 ) -> tuple[list[RawMolecule], list[BadRecord]]:
    """All molecules of qm9pack's CSV files (properties in QM9 units); bad rows reported.

    ``nrows`` reads only the first rows of the first file (small real slices for tests).
    """
    import pandas as pd

    mols: list[RawMolecule] = []
    bad: list[BadRecord] = []
    cols = ["Index", "N_atoms", "Elements", "XYZ_Ang", "SMILES", *_CSV_COLUMNS.values()]
    for path in (paths or qm9pack_csv_paths())[: 1 if nrows else None]:
        try:
            df = pd.read_csv(path, usecols=cols, nrows=nrows)
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot read QM9 CSV {path}: {err}") from None
        values = {k: pd.to_numeric(df[c], errors="coerce").to_numpy(np.float64)
                  for k, c in _CSV_COLUMNS.items()}
        ids = pd.to_numeric(df["Index"], errors="coerce").to_numpy()
        for row, (idx, n, el, xyz, smi) in enumerate(
                zip(ids, df["N_atoms"], df["Elements"], df["XYZ_Ang"], df["SMILES"],
                    strict=True)):
            source = f"{path.name} row {row + 2}"
            try:
                if not np.isfinite(idx):
                    raise ValueError("missing or malformed Index")
                props = {k: float(v[row]) for k, v in values.items()}
                mols.append(_parse_row(idx, n, el, xyz, smi, props, source))
            except (ValueError, TypeError) as err:
                rid = int(idx) if np.isfinite(idx) else None
                bad.append(BadRecord(source=source, id=rid, reason=str(err)))
    return mols, bad


def build_qm9(raw: list[RawMolecule], bad=(), excluded: int = 0, *, workers: int | None = None,
              progress: bool = True) -> MoleculeSet:
    """Perceive raw QM9 records and convert their targets, once, to library units."""
    kept, perceptions, rejected = perceive_many(raw, workers=workers, progress=progress)
    ms = MoleculeSet.from_perceptions(kept, perceptions, rejected=[*bad, *rejected],
                                      excluded=excluded)
    for name, (_, factor, _) in TARGETS.items():
        if name in ms.targets and factor != 1.0:
            ms.targets[name] = ms.targets[name] * factor
    return ms


def load_qm9(source: str | Path | None = None, *, refresh: bool = False,
             workers: int | None = None, progress: bool = True,
             cache_directory: Path | None = None, log=print) -> MoleculeSet:
    """QM9 perceived and cached; targets in library units (see :data:`TARGETS`).

    Args:
        source: None for the qm9pack package (default), or the path of the original
            ``dsgdb9nsd.xyz.tar.bz2`` / a folder of its ``.xyz`` files.
        refresh: rebuild the cache even if it exists.
        workers: processes for bond perception (default: all available cores).
        progress: show progress bars.
        cache_directory: overrides ``$MPATTN_CACHE`` / the user cache folder.
        log: where one-line reports go (``print``; None to silence).
    """
    if source is None:
        paths = qm9pack_csv_paths()
        fingerprint = {
            "source": "qm9pack",
            "qm9pack": importlib.metadata.version("qm9pack"),
            "sizes": [p.stat().st_size for p in paths],
        }
    else:
        source = Path(source).expanduser().resolve()
        if not source.exists():
            raise ValueError(f"QM9 source {source} does not exist")
        st = source.stat()
        fingerprint = {"source": str(source), "size": st.st_size, "mtime": st.st_mtime_ns}
        if source.is_dir():  # a file edited in place changes neither the folder's size nor mtime
            files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns)
                           for p in source.glob("*.xyz"))
            fingerprint["files"] = hashlib.sha256(json.dumps(files).encode()).hexdigest()
    key = cache_key(dataset="qm9", perception="template>geometry>connectivity", **fingerprint)

    def build() -> MoleculeSet:
        t0 = time.perf_counter()
        if source is None:
            raw, bad = read_qm9pack(paths)
            excluded = 0
        else:
            from mpattn.data.xyz import read_qm9_archive

            raw, bad, excluded = read_qm9_archive(source, progress=progress)
        t1 = time.perf_counter()
        ms = build_qm9(raw, bad, excluded, workers=workers, progress=progress)
        if log:
            log(f"QM9: read {len(raw):,} molecules in {t1 - t0:.1f} s, perceived bonds in "
                f"{time.perf_counter() - t1:.1f} s; {len(ms.rejected)} rejected")
        return ms

    return cached("qm9", key, build, refresh=refresh, directory=cache_directory, log=log)


# ---------------------------------------------------------------------------- splits


@dataclass
class Split:
    """Disjoint train/val/test sets of dataset ids (QM9 indices), and how they were made."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    seed: int | None = None
    preset: str | None = None

    def __post_init__(self) -> None:
        self.train, self.val, self.test = (np.asarray(a, dtype=np.int64)
                                           for a in (self.train, self.val, self.test))
        for name, a in (("train", self.train), ("val", self.val), ("test", self.test)):
            if np.unique(a).size != a.size:
                raise ValueError(f"split: {name} lists some ids more than once")
        for (n1, a), (n2, b) in ((("train", self.train), ("val", self.val)),
                                 (("train", self.train), ("test", self.test)),
                                 (("val", self.val), ("test", self.test))):
            common = np.intersect1d(a, b)
            if common.size:
                raise ValueError(f"split: {n1} and {n2} share {common.size} id(s), "
                                 f"e.g. {common[:5].tolist()}")

    def sizes(self) -> tuple[int, int, int]:
        return len(self.train), len(self.val), len(self.test)


def make_split(ids, preset: str | None = "standard", *, sizes: tuple | None = None,
               seed: int = 0) -> Split:
    """A random split of ``ids``, reproducible for a seed.

    Args:
        ids: all available ids.
        preset: ``"thesis"`` (15,000 / 4,300 / 2,200) or ``"standard"`` (110,000 / 10,000 /
            rest); ignored when ``sizes`` is given.
        sizes: (train, val, test), test may be None for "all the rest".
        seed: permutation seed.
    """
    ids = np.asarray(ids, dtype=np.int64)
    if sizes is None:
        if preset not in SPLIT_PRESETS:
            raise ValueError(f"unknown split preset {preset!r}; choose from {list(SPLIT_PRESETS)}")
        sizes = SPLIT_PRESETS[preset]
    else:
        preset = None
    n_train, n_val, n_test = sizes
    rest = len(ids) - n_train - n_val
    n_test = rest if n_test is None else n_test
    if min(n_train, n_val, n_test) < 0 or n_train + n_val + n_test > len(ids):
        raise ValueError(f"split sizes {n_train}/{n_val}/{n_test} do not fit {len(ids)} molecules")
    perm = np.random.default_rng(seed).permutation(np.sort(ids))
    return Split(train=perm[:n_train], val=perm[n_train:n_train + n_val],
                 test=perm[n_train + n_val:n_train + n_val + n_test], seed=seed, preset=preset)


def save_split(split: Split, path: str | Path) -> Path:
    """Write the split as JSON (``.json``) or npz (any other suffix); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".json":
        path.write_text(json.dumps({
            "train": split.train.tolist(), "val": split.val.tolist(), "test": split.test.tolist(),
            "seed": split.seed, "preset": split.preset}))
    else:
        with open(path, "wb") as f:  # a file name would get ".npz" appended to other suffixes
            np.savez(f, train=split.train, val=split.val, test=split.test)
    return path


def _integer_ids(values, name: str) -> np.ndarray:
    a = np.asarray(values)
    if a.size and (a.dtype.kind not in "iuf" or np.any(a != np.round(a))):
        raise ValueError(f"{name} must hold integer ids, got e.g. {a.ravel()[:3].tolist()}")
    return a.astype(np.int64).reshape(-1)


def load_split(path: str | Path, available=None) -> Split:
    """Read a split file (npz or json with keys train, val, test; values are dataset ids).

    With ``available`` (the dataset's ids), every id in the file must be among them.
    """
    path = Path(path)
    try:
        if path.suffix == ".json":
            d = json.loads(path.read_text())
            if not isinstance(d, dict):
                raise ValueError(f"JSON holds a {type(d).__name__}, not an object")
            seed, preset = d.get("seed"), d.get("preset")
        else:
            with np.load(path, allow_pickle=False) as f:
                d = {k: f[k] for k in f.files}
            seed = preset = None
        parts = {k: _integer_ids(d[k], k) for k in ("train", "val", "test")}
    except KeyError as err:
        raise ValueError(f"split file {path} lacks the key {err}; it needs train, val, test") \
            from None
    except (OSError, ValueError, TypeError) as err:
        raise ValueError(f"split file {path} is unreadable: {err}") from None
    try:
        split = Split(**parts, seed=seed, preset=preset)
    except ValueError as err:
        raise ValueError(f"split file {path}: {err}") from None
    if available is not None:
        for name, a in parts.items():
            missing = np.setdiff1d(a, available)
            if missing.size:
                raise ValueError(f"split file {path}: {missing.size} {name} id(s) are not in the "
                                 f"dataset, e.g. {missing[:5].tolist()}")
    return split


# ---------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    from mpattn.featurize import EDGE_SETS, FeaturizeOptions

    ap = argparse.ArgumentParser(prog="python -m mpattn.data.qm9", description=__doc__.split(
        "\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--summary", action="store_true",
                    help="load (and cache) all of QM9, featurize it, print counts")
    ap.add_argument("--source", default=None,
                    help="original QM9 archive or folder (default: the qm9pack package)")
    ap.add_argument("--edge-set", default="complete", choices=EDGE_SETS)
    ap.add_argument("--cutoff", type=float, default=None, help="Å, for --edge-set radius")
    ap.add_argument("--refresh", action="store_true", help="rebuild the cache")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--json", default=None, help="also write the summary to this JSON file")
    args = ap.parse_args(argv)
    if not args.summary:
        ap.print_help()
        return 0
    t0 = time.perf_counter()
    ms = load_qm9(args.source, refresh=args.refresh, workers=args.workers)
    t1 = time.perf_counter()
    gs = ms.to_graphset(FeaturizeOptions(edge_set=args.edge_set, cutoff=args.cutoff))
    t2 = time.perf_counter()
    print(ms.format_summary())
    print(f"edge set {args.edge_set}: {int(gs.n_edge.sum()):,} edges, "
          f"{gs.nodes['features'].shape[1]} node features")
    print(f"load (cache or build): {t1 - t0:.1f} s; graph building: {t2 - t1:.1f} s")
    if args.json:
        summary = ms.summary() | {"edge_set": args.edge_set, "edges": int(gs.n_edge.sum()),
                                  "load_s": t1 - t0, "graphs_s": t2 - t1}
        Path(args.json).write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
