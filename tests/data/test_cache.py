"""The on-disk cache of perceived datasets: round trip, build-once, recovery, atomic writes."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest

import mpattn.data.cache as cache
from mpattn.data.cache import (
    CACHE_FORMAT,
    cache_dir,
    cache_key,
    cached,
    load_molset,
    save_molset,
)
from mpattn.data.molecules import MoleculeSet
from mpattn.data.records import BadRecord

ARRAYS = ("ids", "n_atoms", "z", "positions", "aromatic", "hybridization", "n_bonds", "bonds",
          "bond_type", "path")
DTYPES = {"ids": np.int64, "n_atoms": np.int32, "z": np.int8, "positions": np.float32,
          "aromatic": np.int8, "hybridization": np.int8, "n_bonds": np.int32,
          "bonds": np.int16, "bond_type": np.int8, "path": np.int8}


def assert_molsets_equal(a: MoleculeSet, b: MoleculeSet) -> None:
    for k in ARRAYS:
        x, y = getattr(a, k), getattr(b, k)
        assert x.dtype == y.dtype, k
        np.testing.assert_array_equal(x, y, err_msg=k)
    assert list(a.targets) == list(b.targets)
    for k in a.targets:
        assert b.targets[k].dtype == np.float64
        np.testing.assert_array_equal(a.targets[k], b.targets[k], err_msg=k)
    assert a.smiles == b.smiles
    assert a.rejected == b.rejected
    assert a.excluded == b.excluded
    np.testing.assert_array_equal(a.atom_offsets, b.atom_offsets)
    np.testing.assert_array_equal(a.bond_offsets, b.bond_offsets)


@pytest.fixture(scope="module")
def small(qm9_molset) -> MoleculeSet:
    """40 real molecules, with a rejected record and an excluded count to carry along."""
    ms = qm9_molset.subset(np.arange(40))
    return dataclasses.replace(
        ms, rejected=[BadRecord("qm9_part1.csv row 9", 8, "NaN or infinite coordinates"),
                      BadRecord("x.tar:README", None, "x.tar:README: not a .xyz file")],
        excluded=3)


def test_round_trip_of_real_molset(tmp_path, qm9_molset):
    ms = dataclasses.replace(qm9_molset, rejected=[BadRecord("a.xyz", 7, "why ü")], excluded=2)
    path = tmp_path / "deep" / "qm9.npz"
    save_molset(ms, path, key="abc")
    back = load_molset(path, key="abc")
    assert_molsets_equal(ms, back)
    for k, dtype in DTYPES.items():
        assert getattr(back, k).dtype == dtype, k
    assert back.rejected == [BadRecord("a.xyz", 7, "why ü")] and back.excluded == 2
    assert len(back.smiles) == len(back) == 500 and back.smiles[0] == "C"
    assert load_molset(path).ids.size == 500  # no key: not checked
    # compact: well under the size of the float64 raw positions alone
    assert path.stat().st_size < qm9_molset.positions.size * 8


def test_round_trip_empty_and_one_molecule(tmp_path, qm9_molset):
    for index in ([], [0]):
        ms = qm9_molset.subset(index)
        save_molset(ms, tmp_path / "m.npz")
        back = load_molset(tmp_path / "m.npz")
        assert_molsets_equal(ms, back)
        assert len(back) == len(index)


def test_cached_builds_once(tmp_path, small):
    calls = []

    def build():
        calls.append(1)
        return small

    logs: list[str] = []
    first = cached("qm9", "k1", build, directory=tmp_path, log=logs.append)
    path = tmp_path / "qm9-k1.npz"
    assert len(calls) == 1 and path.is_file()
    assert first is small
    assert logs == [f"cached 40 molecules in {path} ({path.stat().st_size / 1e6:.1f} MB)"]
    second = cached("qm9", "k1", build, directory=tmp_path, log=logs.append)
    assert len(calls) == 1 and len(logs) == 1
    assert_molsets_equal(second, small)
    cached("qm9", "k1", build, directory=tmp_path, refresh=True, log=None)
    assert len(calls) == 2
    cached("qm9", "k2", build, directory=tmp_path, log=None)  # another key, another file
    assert len(calls) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["qm9-k1.npz", "qm9-k2.npz"]


def _flip_middle(data: bytes) -> bytes:
    """Random bytes over the middle of the file: a damaged compressed stream."""
    mid = len(data) // 2
    noise = np.random.default_rng(0).bytes(64)
    return data[:mid] + noise + data[mid + 64:]


DAMAGE = {
    "truncated": lambda good: good[: len(good) // 2],
    "random bytes": lambda good: np.random.default_rng(1).bytes(len(good)),
    "damaged middle": _flip_middle,
    "empty": lambda good: b"",
}


@pytest.mark.parametrize("damage", [*DAMAGE, "other key", "inconsistent"])
def test_damaged_cache_is_reported_and_rebuilt(tmp_path, small, damage):
    path = tmp_path / "qm9-k1.npz"
    save_molset(small, path, "k1")
    good = path.read_bytes()
    if damage == "other key":
        save_molset(small, path, "k0")
        problem = "is unusable: key 'k0' (expected 'k1')"
    elif damage == "inconsistent":
        broken = dataclasses.replace(small)
        broken.n_atoms = small.n_atoms.copy()
        broken.n_atoms[0] += 1  # arrays no longer match: as a cache written by a buggy version
        save_molset(broken, path, "k1")
        problem = "is inconsistent: MoleculeSet: atom arrays do not match n_atoms"
    else:
        path.write_bytes(DAMAGE[damage](good))
        problem = "is unusable: "
    with pytest.raises(ValueError, match=re.escape(f"cache file {path} {problem}")):
        load_molset(path, "k1")

    calls = []

    def build():
        calls.append(1)
        return small

    warning = re.escape(f"cache file {path} ") + r".*; rebuilding it$"
    with pytest.warns(RuntimeWarning, match=warning):
        rebuilt = cached("qm9", "k1", build, directory=tmp_path, log=None)
    assert len(calls) == 1
    assert_molsets_equal(rebuilt, small)
    assert_molsets_equal(load_molset(path, "k1"), small)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_interrupted_save_keeps_the_previous_cache(tmp_path, small, monkeypatch):
    path = tmp_path / "qm9-k1.npz"
    save_molset(small, path, "k1")
    good = path.read_bytes()

    def killed(f, **arrays):
        f.write(b"PK\x03\x04 half a zip file")
        raise KeyboardInterrupt

    monkeypatch.setattr(cache.np, "savez_compressed", killed)
    other = small.subset(np.arange(10))
    with pytest.raises(KeyboardInterrupt):
        save_molset(other, path, "k1")
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no *.tmp left

    # the same through cached(refresh=True); and a first build leaves nothing at all
    with pytest.raises(KeyboardInterrupt):
        cached("qm9", "k1", lambda: other, directory=tmp_path, refresh=True, log=None)
    assert path.read_bytes() == good
    with pytest.raises(KeyboardInterrupt):
        cached("qm9", "k2", lambda: other, directory=tmp_path, log=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    monkeypatch.undo()
    assert_molsets_equal(load_molset(path, "k1"), small)


def test_cache_dir_from_environment(tmp_path, monkeypatch, small):
    monkeypatch.setenv("MPATTN_CACHE", str(tmp_path / "here"))
    assert cache_dir() == tmp_path / "here"
    cached("t", "k", lambda: small, log=None)
    assert (tmp_path / "here" / "t-k.npz").is_file()
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("MPATTN_CACHE", "~/elsewhere")
    assert cache_dir() == tmp_path / "elsewhere"
    monkeypatch.delenv("MPATTN_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "mpattn"
    monkeypatch.setenv("MPATTN_CACHE", "")  # empty: as unset
    assert cache_dir() == tmp_path / "xdg" / "mpattn"


def test_cache_key_depends_on_every_part(monkeypatch):
    base = dict(dataset="qm9", source="qm9pack", sizes=[1, 2, 3])
    key = cache_key(**base)
    assert re.fullmatch(r"[0-9a-f]{20}", key)
    assert cache_key(**base) == key
    assert cache_key(sizes=[1, 2, 3], source="qm9pack", dataset="qm9") == key  # order-free
    variants = [
        dict(base, dataset="md17"),
        dict(base, source="/data/qm9.tar.bz2"),
        dict(base, sizes=[1, 2, 4]),
        dict(base, extra=None),
        {k: v for k, v in base.items() if k != "sizes"},
        dict(base, sizes="[1, 2, 3]"),
    ]
    keys = {cache_key(**v) for v in variants}
    assert len(keys) == len(variants) and key not in keys
    monkeypatch.setattr(cache, "__version__", "99.0")
    assert cache_key(**base) != key
    monkeypatch.undo()
    assert cache_key(**base) == key
    monkeypatch.setattr(cache, "CACHE_FORMAT", CACHE_FORMAT + 1)
    assert cache_key(**base) != key


def test_cache_of_another_format_is_rebuilt(tmp_path, small, monkeypatch):
    path = tmp_path / "qm9-k.npz"
    monkeypatch.setattr(cache, "CACHE_FORMAT", CACHE_FORMAT + 1)
    save_molset(small, path, "k")
    monkeypatch.undo()
    with pytest.raises(ValueError, match=re.escape(
            f"cache file {path} is unusable: format {CACHE_FORMAT + 1} (expected {CACHE_FORMAT})")):
        load_molset(path, "k")
    with pytest.warns(RuntimeWarning, match=re.escape(str(path))):
        assert len(cached("qm9", "k", lambda: small, directory=tmp_path, log=None)) == 40
    assert_molsets_equal(load_molset(path, "k"), small)


def test_missing_cache_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_molset(Path(tmp_path / "none.npz"))
