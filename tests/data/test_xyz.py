"""Tests of the reader of QM9's original .xyz distribution, on real molecules.

The files are rebuilt in the original format from the first rows of qm9pack's CSV (the same
DFT data as the original archive), keeping the CSV's number text (``0.``, ``1.``) and writing
small values with Mathematica's ``*^`` exponents, as the original files do.
"""

from __future__ import annotations

import importlib.util
import io
import os
import re
import tarfile
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest

from mpattn.data.records import QM9_PROPERTIES
from mpattn.data.xyz import (
    BadRecord,
    iter_qm9_archive,
    load_uncharacterized_ids,
    parse_qm9_xyz,
    read_qm9_archive,
)

pd = pytest.importorskip("pandas")

N_ROWS = 20
UNCHARACTERIZED_ID = 58
# CSV columns of the 15 properties, in QM9_PROPERTIES order.
CSV_PROPERTIES = (
    "RotA_GHz RotB_GHz RotC_GHz Dipole_debye Polarizability_bohr3 HOMO_au LUMO_au "
    "HOMO_LUMO_gap_au R2_bohr2 ZPVE_au InternalEnergy_0K_au InternalEnergy_298K_au "
    "Enthalphy_298K_au GibbsFreeEnergy_298K_au Heatcapacity_Cv_cal_mol_K"
).split()
Z = {"H": 1, "C": 6, "N": 7, "O": 8, "F": 9}


def _qm9pack_csv(part: int) -> Path:
    spec = importlib.util.find_spec("qm9pack")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("qm9pack (QM9 data) is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / f"qm9_part{part}.csv"


def _mathematica(s: str) -> str:
    """Writes small non-zero numbers as the original files do (``2.1997*^-6``), same decimal."""
    d = Decimal(s)
    return f"{d:E}".replace("E", "*^") if d != 0 and abs(d) < Decimal("0.001") else s


def _list(s: str) -> list[str]:
    return [t.strip().strip("'") for t in re.sub(r"[\[\]]", "", s).split(",")]


def _xyz_text(row, mol_id: int, relaxed_smiles: str) -> str:
    symbols, charges = _list(row.Elements), _list(row.Mulliken_pop)
    coords = np.array(_list(row.XYZ_Ang), dtype=object).reshape(-1, 3)
    props = "\t".join(getattr(row, c) for c in CSV_PROPERTIES)
    lines = [str(len(symbols)), f"gdb {mol_id}\t{props}\t"]
    for sym, xyz, q in zip(symbols, coords, charges, strict=True):
        lines.append("\t".join([sym, *(_mathematica(c) for c in xyz), _mathematica(q)]))
    lines.append("\t".join(_list(row.Harmonic_Freq_cmi)))
    lines.append(f"{row.SMILES}\t{relaxed_smiles}")
    lines.append(f"{row.InChi}\t{row.InChi}")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def qm9_rows():
    """The first rows of qm9pack's part 1, all columns as text, plus the texts of their files."""
    df = pd.read_csv(_qm9pack_csv(1), nrows=N_ROWS + 1, dtype=str, keep_default_na=False)
    rows = list(df.itertuples(index=False))
    # Relaxed-geometry SMILES (2nd field): the next molecule's, so that taking the wrong field
    # shows. Id 58 is uncharacterized (absent from qm9pack): real data of row 0 relabelled.
    texts = {
        int(r.Index): _xyz_text(r, int(r.Index), rows[i + 1].SMILES)
        for i, r in enumerate(rows[:N_ROWS])
    }
    texts[UNCHARACTERIZED_ID] = _xyz_text(rows[0], UNCHARACTERIZED_ID, rows[1].SMILES)
    all_text = "".join(texts.values())
    assert "*^" in all_text and re.search(r"\t-?\d+\.\t", all_text)  # the forms are exercised
    return rows[:N_ROWS], texts


def _name(mol_id: int) -> str:
    return f"dsgdb9nsd_{mol_id:06d}.xyz"


def _write_folder(folder: Path, texts: dict[int, str]) -> Path:
    folder.mkdir()
    for mol_id, text in texts.items():
        (folder / _name(mol_id)).write_text(text)
    return folder


def _write_tar(path: Path, members: dict[str, bytes]) -> Path:
    mode = {".bz2": "w:bz2", ".gz": "w:gz", ".tar": "w"}[path.suffix]
    with tarfile.open(path, mode) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _check_against_csv(molecules, rows) -> None:
    assert [m.id for m in molecules] == [int(r.Index) for r in rows]
    for m, r in zip(molecules, rows, strict=True):
        assert m.source.endswith(_name(m.id))
        np.testing.assert_array_equal(m.z, [Z[s] for s in _list(r.Elements)])
        expected = np.array([float(c) for c in _list(r.XYZ_Ang)]).reshape(-1, 3)
        assert m.positions.dtype == np.float64
        np.testing.assert_allclose(m.positions, expected, rtol=0, atol=1e-12)
        assert m.smiles == r.SMILES
        assert list(m.properties) == [name for name, _ in QM9_PROPERTIES]
        for (name, _), col in zip(QM9_PROPERTIES, CSV_PROPERTIES, strict=True):
            assert m.properties[name] == float(getattr(r, col)), (m.id, name)


@pytest.mark.parametrize("kind", ["folder", ".tar.bz2", ".tar.gz", ".tar"])
def test_reads_real_qm9_files(tmp_path, qm9_rows, kind):
    rows, texts = qm9_rows
    if kind == "folder":
        path = _write_folder(tmp_path / "qm9", texts)
    else:
        members = {_name(i): t.encode() for i, t in sorted(texts.items())}
        path = _write_tar(tmp_path / f"dsgdb9nsd.xyz{kind}", members)
    molecules, bad, n_excluded = read_qm9_archive(path, progress=False)
    assert bad == []
    assert n_excluded == 1  # id 58
    _check_against_csv(molecules, rows)

    assert UNCHARACTERIZED_ID not in [m.id for m in iter_qm9_archive(path)]
    everything = list(iter_qm9_archive(path, exclude_uncharacterized=False))
    assert sorted(m.id for m in everything) == sorted(texts)
    molecules, bad, n_excluded = read_qm9_archive(
        path, exclude_uncharacterized=False, progress=False
    )
    assert (len(molecules), bad, n_excluded) == (len(texts), [], 0)


def test_mathematica_exponents_and_short_forms():
    line2 = "gdb 7\t1.\t2.1997*^-6\t-3*^2\t0.\t.5" + "\t1" * 10
    text = f"1\n{line2}\nC\t0.\t1.*^0\t-2.5*^-3\t0.\n1.\nC\tC\nInChI=1S/C\tInChI=1S/C\n"
    m = parse_qm9_xyz(text, "x.xyz")
    assert (m.properties["A"], m.properties["B"], m.properties["C"]) == (1.0, 2.1997e-6, -300.0)
    assert (m.properties["mu"], m.properties["alpha"]) == (0.0, 0.5)
    np.testing.assert_array_equal(m.positions, [[0.0, 1.0, -2.5e-3]])


def _edit(text: str, lineno: int, old: str, new: str) -> str:
    lines = text.split("\n")
    assert old in lines[lineno - 1]
    lines[lineno - 1] = lines[lineno - 1].replace(old, new, 1)
    return "\n".join(lines)


def _set_field(text: str, lineno: int, index: int, value: str) -> str:
    lines = text.split("\n")
    fields = lines[lineno - 1].split("\t")
    fields[index] = value
    lines[lineno - 1] = "\t".join(fields)
    return "\n".join(lines)


# Real file of id 3 (water: O, H, H; 3 atoms, lines 3-5; frequencies, SMILES, InChI = 6-8).
BAD_CASES = {
    "unknown element": (lambda t: _set_field(t, 3, 0, "Qq"), r"line 3: unknown element .*'Qq'"),
    "dummy element": (lambda t: _set_field(t, 4, 0, "X"), r"line 4: unknown element .*'X'"),
    "NaN coordinate": (lambda t: _set_field(t, 4, 2, "nan"), r"line 4: non-finite y coordinate"),
    "inf coordinate": (lambda t: _set_field(t, 5, 3, "-inf"), r"line 5: non-finite z coord"),
    "zero atoms": (lambda t: _edit(t, 1, "3", "0"), r"line 1: zero atoms"),
    "count too high": (
        lambda t: _edit(t, 1, "3", "4"),
        r"line 1: atom count mismatch: line 1 declares 4 atoms but 3 .*line 6 is not an atom",
    ),
    "count too low": (
        lambda t: _edit(t, 1, "3", "2"),
        r"line 1: atom count mismatch: line 1 declares 2 atoms but 3",
    ),
    "malformed coordinate": (
        lambda t: _set_field(t, 5, 1, "0.87.2"),
        r"line 5: malformed number '0\.87\.2' in x coordinate",
    ),
    "malformed property": (
        lambda t: _set_field(t, 2, 11, "-76.40O702"),
        r"line 2: malformed number '-76\.40O702' in property U0",
    ),
    "malformed frequency": (
        lambda t: _set_field(t, 6, 1, "3803,6305"),
        r"line 6: malformed number '3803,6305' in harmonic frequencies",
    ),
    "missing property": (
        lambda t: _set_field(t, 2, 15, ""),
        r"line 2: expected 15 properties after 'gdb 3' .*got 14",
    ),
    "missing gdb tag": (lambda t: _edit(t, 2, "gdb 3", "3"), r"line 2: missing 'gdb <id>' tag"),
    "id differs from file name": (
        lambda t: _edit(t, 2, "gdb 3", "gdb 4"),
        r"line 2: id 4 of the 'gdb' tag differs from the file name's id 3",
    ),
    "missing charge": (
        lambda t: _set_field(t, 3, 4, ""),
        r"line 3: expected 5 fields \(symbol x y z charge\), got 4",
    ),
    "truncated after atoms": (
        lambda t: "\n".join(t.split("\n")[:5]),
        r"truncated file: missing the harmonic frequencies line \(line 6\)",
    ),
    "truncated in atoms": (
        lambda t: "\n".join(t.split("\n")[:4]),
        r"truncated file: line 1 declares 3 atoms, the file ends after 2 atom lines",
    ),
    "truncated InChI": (
        lambda t: "\n".join(t.split("\n")[:7]),
        r"truncated file: missing the InChI line \(line 8\)",
    ),
    "truncated header": (lambda t: t.split("\n")[0], r"truncated file: missing line 2"),
    "empty": (lambda t: "", r"empty file"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_file_raises_naming_file_and_problem(qm9_rows, case):
    _, texts = qm9_rows
    source = f"/some/where/{_name(3)}"
    parse_qm9_xyz(texts[3], source)  # the unedited file is good
    mutate, problem = BAD_CASES[case]
    with pytest.raises(ValueError, match=re.escape(source) + ": " + problem):
        parse_qm9_xyz(mutate(texts[3]), source)


def test_archive_with_bad_members_loses_nothing(tmp_path, qm9_rows):
    rows, texts = qm9_rows
    members = {_name(i): t.encode() for i, t in sorted(texts.items())}
    members[_name(5)] = _set_field(texts[5], 4, 0, "Qq").encode()  # corrupt member
    members[_name(99999)] = b"\xff\xfe not text"
    members["dsgdb9nsd_000001_copy.xyz"] = texts[1].encode()  # duplicate id 1
    members["README"] = b"not a molecule"
    path = _write_tar(tmp_path / "qm9.tar.bz2", members)

    molecules, bad, n_excluded = read_qm9_archive(path, progress=False)
    assert n_excluded == 1
    _check_against_csv(molecules, [r for r in rows if int(r.Index) != 5])
    assert len(molecules) + len(bad) + n_excluded == len(members)
    by_name = {b.source.rsplit(":", 1)[1]: b for b in bad}
    assert set(by_name) == {_name(5), _name(99999), "dsgdb9nsd_000001_copy.xyz", "README"}
    assert all(isinstance(b, BadRecord) and b.source.startswith(f"{path}:") for b in bad)
    assert by_name[_name(5)].id == 5
    assert re.search(
        re.escape(_name(5)) + r": line 4: unknown element .*'Qq'", by_name[_name(5)].reason
    )
    assert by_name[_name(99999)].id == 99999 and "not valid UTF-8" in by_name[_name(99999)].reason
    dup = by_name["dsgdb9nsd_000001_copy.xyz"]
    assert dup.id == 1 and "duplicate id 1" in dup.reason and _name(1) in dup.reason
    assert by_name["README"].id is None and "not a .xyz file" in by_name["README"].reason
    # iter_qm9_archive yields the same bad records, in archive order
    streamed = [r for r in iter_qm9_archive(path) if isinstance(r, BadRecord)]
    assert streamed == bad


def test_folder_with_bad_file(tmp_path, qm9_rows):
    rows, texts = qm9_rows
    folder = _write_folder(tmp_path / "qm9", texts)
    (folder / _name(7)).write_text(_set_field(texts[7], 3, 1, "nan"))
    (folder / "notes.txt").write_text("ignored: not .xyz")
    molecules, bad, n_excluded = read_qm9_archive(folder, progress=False)
    _check_against_csv(molecules, [r for r in rows if int(r.Index) != 7])
    assert n_excluded == 1
    assert len(bad) == 1 and bad[0].id == 7 and bad[0].source == str(folder / _name(7))
    assert re.search(r"line 3: non-finite x coordinate", bad[0].reason)


def test_corrupt_archive_raises_naming_path(tmp_path, qm9_rows):
    _, texts = qm9_rows
    rand = tmp_path / "random.tar.bz2"
    rand.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ValueError, match=re.escape(str(rand))):
        list(iter_qm9_archive(rand))

    # Partial downloads: fatal, also after some molecules have been streamed.
    members = {_name(i): t.encode() for i, t in sorted(texts.items())}
    for suffix in (".tar.bz2", ".tar"):
        good = _write_tar(tmp_path / f"good{suffix}", members)
        cut = tmp_path / f"cut{suffix}"
        cut.write_bytes(good.read_bytes()[: os.path.getsize(good) // 2])
        with pytest.raises(ValueError, match=re.escape(str(cut)) + ": "):
            read_qm9_archive(cut, progress=False)
    streamed = []
    with pytest.raises(
        ValueError,
        match=re.escape(str(cut)) + ": corrupt or truncated archive "
        r"after member 'dsgdb9nsd_0000\d\d\.xyz'",
    ):
        for rec in iter_qm9_archive(cut):
            streamed.append(rec)
    assert 0 < len(streamed) < len(members) - 1
    assert all(not isinstance(r, BadRecord) for r in streamed)


def test_missing_or_empty_path_raises_naming_path(tmp_path):
    missing = tmp_path / "nope" / "dsgdb9nsd.xyz.tar.bz2"
    with pytest.raises(ValueError, match=re.escape(str(missing)) + ": .*not found"):
        read_qm9_archive(missing, progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=re.escape(str(empty)) + ": folder holds no .xyz"):
        list(iter_qm9_archive(empty))
    no_xyz = _write_tar(tmp_path / "other.tar", {"README": b"hello"})
    with pytest.raises(ValueError, match=re.escape(str(no_xyz)) + ": archive holds no .xyz"):
        list(iter_qm9_archive(no_xyz))


def test_bad_record_is_the_shared_one():
    from mpattn.data import records

    assert BadRecord is records.BadRecord


def test_shipped_uncharacterized_list():
    ids = load_uncharacterized_ids()
    assert isinstance(ids, frozenset) and len(ids) == 3054
    assert min(ids) >= 1 and max(ids) <= 133885 and UNCHARACTERIZED_ID in ids
    qm9pack_ids: set[int] = set()
    for part in (1, 2, 3):
        qm9pack_ids |= set(pd.read_csv(_qm9pack_csv(part), usecols=["Index"])["Index"].tolist())
    assert ids.isdisjoint(qm9pack_ids)
    assert ids | qm9pack_ids == set(range(1, 133886))
