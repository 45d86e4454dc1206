"""On-disk cache of perceived datasets (:class:`~mpattn.data.molecules.MoleculeSet`).

One compressed ``.npz`` per (source, featurization options, library version): int8
elements, float32 positions, int16 bonds; all of QM9 takes about 30 MB and needs neither
RDKit nor the source to load. Files are written under a temporary name and renamed, so a
killed run never leaves a partial cache; a cache that fails to load (truncated, bad CRC,
wrong key, inconsistent arrays) is reported, removed and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from mpattn import __version__
from mpattn.data.molecules import MoleculeSet
from mpattn.data.records import BadRecord

__all__ = ["CACHE_FORMAT", "cache_dir", "cache_key", "cached", "load_molset", "save_molset"]

CACHE_FORMAT = 1
_ARRAYS = ("ids", "n_atoms", "z", "positions", "aromatic", "hybridization", "n_bonds", "bonds",
           "bond_type", "path")


def cache_dir() -> Path:
    """``$MPATTN_CACHE`` if set, else the user's cache folder (e.g. ``~/.cache/mpattn``)."""
    env = os.environ.get("MPATTN_CACHE")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("mpattn"))


def cache_key(**parts) -> str:
    """A short hash of everything the cached content depends on (plus version and format)."""
    payload = {"format": CACHE_FORMAT, "version": __version__, **parts}
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def save_molset(ms: MoleculeSet, path: Path, key: str = "") -> None:
    """Write atomically: temporary file in the same folder, fsync, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": CACHE_FORMAT,
        "version": __version__,
        "key": key,
        "excluded": ms.excluded,
        "rejected": [[r.source, r.id, r.reason] for r in ms.rejected],
        "targets": list(ms.targets),
    }
    arrays = {k: getattr(ms, k) for k in _ARRAYS}
    arrays.update({f"target_{k}": v for k, v in ms.targets.items()})
    arrays["smiles"] = np.frombuffer("\n".join(ms.smiles).encode(), dtype=np.uint8)
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_molset(path: Path, key: str | None = None) -> MoleculeSet:
    """Read a cache file; ValueError naming the file if it is damaged or of another key."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            meta = json.loads(bytes(f["meta"]).decode())
            if meta.get("format") != CACHE_FORMAT:
                raise ValueError(f"format {meta.get('format')} (expected {CACHE_FORMAT})")
            if key is not None and meta.get("key") != key:
                raise ValueError(f"key {meta.get('key')!r} (expected {key!r})")
            arrays = {k: f[k] for k in _ARRAYS}
            targets = {k: f[f"target_{k}"] for k in meta["targets"]}
            text = bytes(f["smiles"]).decode()
    except FileNotFoundError:
        raise
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, json.JSONDecodeError,
            UnicodeDecodeError, zlib.error) as err:
        raise ValueError(f"cache file {path} is unusable: {err}") from None
    smiles = text.split("\n") if len(arrays["ids"]) else []
    try:
        return MoleculeSet(
            **arrays,
            targets=targets,
            smiles=smiles,
            rejected=[BadRecord(*r) for r in meta["rejected"]],
            excluded=int(meta["excluded"]),
        )
    except ValueError as err:
        raise ValueError(f"cache file {path} is inconsistent: {err}") from None


def cached(name: str, key: str, build: Callable[[], MoleculeSet], *, refresh: bool = False,
           directory: Path | None = None, log=print) -> MoleculeSet:
    """Load ``<dir>/<name>-<key>.npz`` or build, save and return it.

    A damaged cache is reported through ``warnings``, deleted and rebuilt.
    """
    path = Path(directory or cache_dir()) / f"{name}-{key}.npz"
    if path.exists() and not refresh:
        try:
            return load_molset(path, key)
        except ValueError as err:
            warnings.warn(f"{err}; rebuilding it", RuntimeWarning, stacklevel=2)
            path.unlink(missing_ok=True)
    ms = build()
    save_molset(ms, path, key)
    if log:
        log(f"cached {len(ms):,} molecules in {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return ms

