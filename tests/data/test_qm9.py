"""QM9 sources, targets and units, the cached loader, splits and the command line.

Real data throughout: rows of qm9pack's CSV (the same DFT data as QM9's original archive),
copied as they are into small CSV files, or written back in the original ``.xyz`` format
with the helpers of ``tests/data/test_xyz.py``.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
from ase.units import Hartree

import mpattn.data.qm9 as qm9
import mpattn.data.xyz
from mpattn.data.qm9 import (
    SPLIT_PRESETS,
    TARGETS,
    Split,
    load_qm9,
    load_split,
    make_split,
    qm9pack_csv_paths,
    read_qm9pack,
    save_split,
)
from mpattn.data.records import QM9_PROPERTIES, BadRecord
from tests.data.test_xyz import CSV_PROPERTIES, _name, _xyz_text

pd = pytest.importorskip("pandas")

N_QM9 = 130_831
ENERGIES = ("homo", "lumo", "gap", "zpve", "U0", "U", "H", "G")


# ---------------------------------------------------------------------------- targets


def test_targets_names_units_and_factors():
    assert list(TARGETS) == [name for name, _ in QM9_PROPERTIES]
    assert len(TARGETS) == 15
    for name, (unit, factor, description) in TARGETS.items():
        assert description
        if name in ENERGIES:
            assert (unit, factor) == ("eV", Hartree), name
        else:
            assert factor == 1.0, name
            assert unit == dict(QM9_PROPERTIES)[name], name
    assert TARGETS["mu"][0] == "Debye" and TARGETS["Cv"][0] == "cal/(mol K)"


def test_energies_converted_once_to_ev(qm9_raw, qm9_molset):
    ms = qm9_molset
    methane, ammonia = ms.index_of([1, 2])
    np.testing.assert_allclose(ms.targets["U0"][methane], -40.47893 * Hartree, rtol=1e-12)
    np.testing.assert_allclose(ms.targets["U0"][ammonia], -56.525887 * Hartree, rtol=1e-12)
    assert ms.targets["mu"][methane] == 0.0
    assert ms.targets["mu"][ammonia] == 1.6256
    # every target of every molecule: raw value (QM9 units) times the factor of TARGETS
    assert sorted(ms.targets) == sorted(TARGETS)
    np.testing.assert_array_equal(ms.ids, [m.id for m in qm9_raw])
    for name, (_, factor, _) in TARGETS.items():
        assert ms.targets[name].dtype == np.float64
        raw = np.array([m.properties[name] for m in qm9_raw])
        np.testing.assert_allclose(ms.targets[name], raw * factor, rtol=1e-15, err_msg=name)
    # the raw records themselves stay in QM9's units
    assert qm9_raw[0].properties["U0"] == -40.47893


# ---------------------------------------------------------------------------- qm9pack CSV


def _real_rows(n: int) -> tuple[list[str], list[dict[str, str]]]:
    with open(qm9pack_csv_paths()[0], newline="") as f:
        reader = csv.DictReader(f)
        rows = [row for _, row in zip(range(n), reader, strict=False)]
        return list(reader.fieldnames), rows


def _write_csv(path: Path, header: list[str], rows: list[dict[str, str]]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=header, quoting=csv.QUOTE_MINIMAL)
        w.writeheader()
        w.writerows(rows)
    return path


def test_read_qm9pack_small_real_csv(tmp_path, qm9_raw):
    header, rows = _real_rows(10)
    path = _write_csv(tmp_path / "part.csv", header, rows)
    mols, bad = read_qm9pack([path])
    assert bad == []
    assert [m.id for m in mols] == list(range(1, 11))
    for m, ref, row in zip(mols, qm9_raw[:10], rows, strict=True):
        assert m.source == f"part.csv row {m.id + 1}"
        assert m.smiles == row["SMILES"] == ref.smiles
        assert m.z.dtype == np.int8 and len(m.z) == int(row["N_atoms"])
        np.testing.assert_array_equal(m.z, ref.z)
        np.testing.assert_array_equal(m.positions, ref.positions)
        for (name, _), col in zip(QM9_PROPERTIES, CSV_PROPERTIES, strict=True):
            assert m.properties[name] == float(row[col]), (m.id, name)
    # methane, by hand
    np.testing.assert_array_equal(mols[0].z, [6, 1, 1, 1, 1])
    np.testing.assert_array_equal(mols[0].positions[0], [-0.0126981359, 1.0858041578, 0.0080009958])


def test_read_qm9pack_nrows_is_a_prefix_of_part1(qm9_raw):
    mols, bad = read_qm9pack(nrows=7)
    assert bad == []
    assert [m.id for m in mols] == [m.id for m in qm9_raw[:7]]
    assert mols[6].source == "qm9_part1.csv row 8"


def _first_number(s: str) -> str:
    return re.search(r"-?\d+\.\d*", s).group(0)


# row index (0-based, id = index + 1) -> (column, mutation, reason as a regex)
CORRUPTIONS = {
    1: ("Elements", lambda s: s.replace("'N'", "'Qq'", 1), r"unknown element symbol\(s\) \['Qq'\]"),
    3: ("XYZ_Ang", lambda s: s.replace(_first_number(s), "nan", 1),
        r"^NaN or infinite coordinates$"),
    4: ("N_atoms", lambda s: str(int(s) + 1), r"^N_atoms says 4 but 3 elements are listed$"),
    6: ("XYZ_Ang", lambda s: s.replace(_first_number(s), "1.08.58", 1),
        r"^malformed coordinates: could not convert string to float: '\s*1\.08\.58'$"),
    8: ("InternalEnergy_0K_au", lambda s: "", r"^missing or non-finite target\(s\) \['U0'\]$"),
}


def test_read_qm9pack_bad_rows_reported_not_dropped(tmp_path):
    header, rows = _real_rows(10)
    assert rows[1]["Elements"] == "['N','H','H','H']" and rows[4]["N_atoms"] == "3"
    for i, (col, mutate, _) in CORRUPTIONS.items():
        rows[i][col] = mutate(rows[i][col])
    path = _write_csv(tmp_path / "bad.csv", header, rows)

    mols, bad = read_qm9pack([path])
    assert len(mols) + len(bad) == len(rows)
    good_ids = [i + 1 for i in range(len(rows)) if i not in CORRUPTIONS]
    assert [m.id for m in mols] == good_ids
    assert all(isinstance(b, BadRecord) for b in bad)
    assert [b.id for b in bad] == [i + 1 for i in CORRUPTIONS]
    for b, (i, (_, _, reason)) in zip(bad, CORRUPTIONS.items(), strict=True):
        assert b.source == f"bad.csv row {i + 2}"
        assert re.search(reason, b.reason), (b, reason)


def test_read_qm9pack_bad_index_and_unreadable_file(tmp_path):
    header, rows = _real_rows(3)
    rows[1]["Index"] = "two"
    path = _write_csv(tmp_path / "idx.csv", header, rows)
    mols, bad = read_qm9pack([path])
    assert [m.id for m in mols] == [1, 3]
    assert bad == [BadRecord("idx.csv row 3", None, "missing or malformed Index")]

    missing_col = tmp_path / "nocol.csv"
    _write_csv(missing_col, [h for h in header if h != "XYZ_Ang"],
               [{k: v for k, v in r.items() if k != "XYZ_Ang"} for r in rows])
    with pytest.raises(ValueError, match=re.escape(f"cannot read QM9 CSV {missing_col}: ")):
        read_qm9pack([missing_col])
    nowhere = tmp_path / "nowhere.csv"
    with pytest.raises(ValueError, match=re.escape(f"cannot read QM9 CSV {nowhere}: ")):
        read_qm9pack([nowhere])


# ---------------------------------------------------------------------------- load_qm9

N_FOLDER = 12


@pytest.fixture(scope="module")
def text_rows():
    """The first rows of qm9pack's part 1, every column as text."""
    df = pd.read_csv(qm9pack_csv_paths()[0], nrows=N_FOLDER + 1, dtype=str,
                     keep_default_na=False)
    return list(df.itertuples(index=False))


def _qm9_folder(folder: Path, rows, corrupt_id: int) -> Path:
    """Original-format files of the rows, id 58 (uncharacterized) and one corrupt file."""
    folder.mkdir()
    for i, r in enumerate(rows[:N_FOLDER]):
        text = _xyz_text(r, int(r.Index), rows[i + 1].SMILES)
        if int(r.Index) == corrupt_id:
            lines = text.split("\n")
            fields = lines[3].split("\t")
            fields[2] = "nan"  # y coordinate of the second atom (line 4)
            lines[3] = "\t".join(fields)
            text = "\n".join(lines)
        (folder / _name(int(r.Index))).write_text(text)
    (folder / _name(58)).write_text(_xyz_text(rows[0], 58, rows[1].SMILES))
    return folder


def test_load_qm9_from_original_files_and_cache(tmp_path, text_rows, monkeypatch):
    corrupt = 7
    folder = _qm9_folder(tmp_path / "qm9", text_rows, corrupt)
    cache = tmp_path / "cache"
    messages: list[str] = []
    ms = load_qm9(folder, cache_directory=cache, workers=1, progress=False, log=messages.append)

    expected = [int(r.Index) for r in text_rows[:N_FOLDER] if int(r.Index) != corrupt]
    np.testing.assert_array_equal(ms.ids, expected)
    assert 58 not in ms.ids and ms.excluded == 1
    assert len(ms.rejected) == 1
    bad = ms.rejected[0]
    assert bad.id == corrupt and bad.source == str(folder.resolve() / _name(corrupt))
    assert re.search(r"line 4: non-finite y coordinate", bad.reason), bad.reason
    by_id = {int(r.Index): r for r in text_rows}
    for i, mol_id in enumerate(ms.ids):
        np.testing.assert_allclose(ms.targets["U0"][i],
                                   float(by_id[mol_id].InternalEnergy_0K_au) * Hartree,
                                   rtol=1e-12)
        assert ms.smiles[i] == by_id[mol_id].SMILES
    files = sorted(cache.iterdir())
    assert len(files) == 1 and re.fullmatch(r"qm9-[0-9a-f]{20}\.npz", files[0].name)
    assert messages[0].startswith(f"QM9: read {len(expected)} molecules in ")
    assert messages[0].endswith("; 1 rejected")
    assert messages[1].startswith(f"cached {len(expected)} molecules in {files[0]}")

    # second call: from the cache, nothing is read or perceived again
    def boom(*args, **kwargs):
        raise AssertionError("rebuilt instead of loading the cache")

    with monkeypatch.context() as m:
        m.setattr(qm9, "build_qm9", boom)
        m.setattr(mpattn.data.xyz, "read_qm9_archive", boom)
        again = load_qm9(folder, cache_directory=cache, workers=1, progress=False, log=None)
    for k in ("ids", "z", "positions", "bonds", "bond_type", "path"):
        np.testing.assert_array_equal(getattr(again, k), getattr(ms, k))
    for k in ms.targets:
        np.testing.assert_array_equal(again.targets[k], ms.targets[k])
    assert again.rejected == ms.rejected and again.excluded == 1 and again.smiles == ms.smiles

    # refresh=True rebuilds; so does a file fixed in place (same folder size and mtime)
    calls = []
    real_build = qm9.build_qm9
    monkeypatch.setattr(qm9, "build_qm9", lambda *a, **k: calls.append(1) or real_build(*a, **k))
    load_qm9(folder, refresh=True, cache_directory=cache, workers=1, progress=False, log=None)
    assert len(calls) == 1
    good = _xyz_text(text_rows[corrupt - 1], corrupt, text_rows[corrupt].SMILES)
    before = folder.stat()
    (folder / _name(corrupt)).write_text(good)
    assert (folder.stat().st_mtime_ns, folder.stat().st_size) == (before.st_mtime_ns,
                                                                   before.st_size)
    fixed = load_qm9(folder, cache_directory=cache, workers=1, progress=False, log=None)
    assert len(calls) == 2
    assert fixed.rejected == [] and corrupt in fixed.ids and len(fixed) == N_FOLDER


def test_load_qm9_missing_source(tmp_path):
    with pytest.raises(ValueError, match=re.escape(f"QM9 source {tmp_path / 'nope'} does not")):
        load_qm9(tmp_path / "nope", cache_directory=tmp_path, log=None)


# ---------------------------------------------------------------------------- splits

IDS = np.arange(1, N_QM9 + 1)


@pytest.mark.parametrize("preset", ["thesis", "standard"])
def test_make_split_presets(preset):
    s = make_split(IDS, preset, seed=0)
    expected = {"thesis": (15_000, 4_300, 2_200), "standard": (110_000, 10_000, 10_831)}[preset]
    assert s.sizes() == expected
    assert (s.seed, s.preset) == (0, preset)
    allof = np.concatenate([s.train, s.val, s.test])
    assert np.unique(allof).size == allof.size  # disjoint
    assert np.isin(allof, IDS).all()
    assert all(a.dtype == np.int64 for a in (s.train, s.val, s.test))
    assert SPLIT_PRESETS[preset][:2] == expected[:2]


def test_make_split_deterministic_and_seeded():
    a, b = make_split(IDS, "thesis", seed=3), make_split(IDS, "thesis", seed=3)
    for x, y in ((a.train, b.train), (a.val, b.val), (a.test, b.test)):
        np.testing.assert_array_equal(x, y)
    # the order of the ids given does not matter, only the set and the seed
    shuffled = np.random.default_rng(1).permutation(IDS)
    np.testing.assert_array_equal(make_split(shuffled, "thesis", seed=3).train, a.train)
    c = make_split(IDS, "thesis", seed=4)
    assert not np.array_equal(a.train, c.train)
    assert np.intersect1d(a.test, c.test).size < 100  # nearly independent draws


def test_make_split_sizes_and_errors():
    ids = np.arange(100, 200)
    s = make_split(ids, sizes=(60, 25, None), seed=1)
    assert s.sizes() == (60, 25, 15) and s.preset is None
    np.testing.assert_array_equal(np.sort(np.concatenate([s.train, s.val, s.test])), ids)
    s = make_split(ids, "no such preset", sizes=(10, 5, 5))  # sizes win over the preset
    assert s.sizes() == (10, 5, 5)
    with pytest.raises(ValueError, match=r"^split sizes 90/10/1 do not fit 100 molecules$"):
        make_split(ids, sizes=(90, 10, 1))
    with pytest.raises(ValueError, match=r"split sizes 110000/10000/-119900 do not fit 100 mol"):
        make_split(ids, "standard")
    with pytest.raises(ValueError, match=r"^split sizes -1/10/1 do not fit"):
        make_split(ids, sizes=(-1, 10, 1))
    with pytest.raises(ValueError,
                       match=re.escape("unknown split preset 'paper'; choose from ['thesis', ")):
        make_split(ids, "paper")


def test_split_checks_itself():
    with pytest.raises(ValueError, match=r"^split: val lists some ids more than once$"):
        Split(train=[1, 2], val=[3, 3], test=[4])
    with pytest.raises(ValueError, match=r"^split: train and test share 2 id\(s\), e\.g\. \[1, 2"):
        Split(train=[1, 2, 3], val=[4], test=[2, 1])


@pytest.mark.parametrize("suffix", [".json", ".npz", ".split"])
def test_save_load_split_round_trip(tmp_path, suffix):
    s = make_split(np.arange(1, 501), sizes=(300, 100, 50), seed=7)
    path = save_split(s, tmp_path / "runs" / f"split{suffix}")
    assert path == tmp_path / "runs" / f"split{suffix}" and path.is_file()
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]
    t = load_split(path, available=np.arange(1, 501))
    for x, y in ((s.train, t.train), (s.val, t.val), (s.test, t.test)):
        np.testing.assert_array_equal(x, y)
        assert y.dtype == np.int64
    if suffix == ".json":
        assert (t.seed, t.preset) == (7, None)
        assert json.loads(path.read_text())["train"] == s.train.tolist()


def test_load_split_rejects_bad_files(tmp_path):
    def write(name: str, obj) -> Path:
        p = tmp_path / name
        p.write_text(json.dumps(obj))
        return p

    p = write("overlap.json", {"train": [1, 2, 3], "val": [3, 4], "test": [5]})
    with pytest.raises(ValueError, match=re.escape(f"split file {p}: split: train and val share "
                                                   "1 id(s), e.g. [3]")):
        load_split(p)
    p = write("nokey.json", {"train": [1], "val": [2]})
    with pytest.raises(ValueError, match=re.escape(f"split file {p} lacks the key 'test'; it "
                                                   "needs train, val, test")):
        load_split(p)
    p = tmp_path / "nokey.npz"
    with open(p, "wb") as f:
        np.savez(f, train=[1], test=[2])
    with pytest.raises(ValueError, match=re.escape(f"split file {p} lacks the key 'val'")):
        load_split(p)
    p = write("foreign.json", {"train": [1, 2], "val": [3], "test": [1000, 1001, 4]})
    load_split(p)  # fine without a dataset to check against
    with pytest.raises(ValueError, match=re.escape(f"split file {p}: 2 test id(s) are not in the "
                                                   "dataset, e.g. [1000, 1001]")):
        load_split(p, available=np.arange(1, 10))

    unreadable = {
        "random.npz": np.random.default_rng(0).bytes(300),
        "truncated.json": b'{"train": [1, 2], "val": [3',
        "list.json": b"[1, 2, 3]",
        "text.json": b'{"train": ["a"], "val": [2], "test": [3]}',
    }
    for name, data in unreadable.items():
        p = tmp_path / name
        p.write_bytes(data)
        with pytest.raises(ValueError, match=re.escape(f"split file {p} is unreadable: ")):
            load_split(p)
    p = tmp_path / "absent.npz"
    with pytest.raises(ValueError, match=re.escape(f"split file {p} is unreadable: ")):
        load_split(p)


# ---------------------------------------------------------------------------- command line


def test_cli_without_arguments_prints_help(capsys):
    assert qm9.main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m mpattn.data.qm9")
    for option in ("--summary", "--source", "--edge-set", "--cutoff", "--refresh", "--json"):
        assert option in out
    assert "{complete,bonds,radius}" in out


def test_cli_rejects_unknown_edge_set(capsys):
    with pytest.raises(SystemExit) as exc:
        qm9.main(["--summary", "--edge-set", "knn"])
    assert exc.value.code == 2
    assert "invalid choice: 'knn'" in capsys.readouterr().err


def test_load_split_rejects_non_integer_ids(tmp_path):
    import json

    from mpattn.data.qm9 import load_split

    p = tmp_path / "frac.json"
    p.write_text(json.dumps({"train": [1.5, 2], "val": [3], "test": [4]}))
    with pytest.raises(ValueError, match=r"frac.json is unreadable: train must hold integer ids"):
        load_split(p)
