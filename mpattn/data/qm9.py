"""QM9 (placeholder; being written)."""

from __future__ import annotations

import importlib.util
from pathlib import Path


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
    d = qm9pack_data_dir()
    return [d / f"qm9_part{i}.csv" for i in (1, 2, 3)]
