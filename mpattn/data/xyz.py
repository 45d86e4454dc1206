"""Reader for QM9's original distribution: ``dsgdb9nsd.xyz.tar.bz2`` (or a folder of its files).

Each of the 133,885 files ``dsgdb9nsd_<id>.xyz`` holds, one item per line (tab separated)::

    n                                   number of atoms
    gdb <id> A B C mu alpha ... Cv      id tag, then the 15 properties of QM9_PROPERTIES
    <symbol> x y z q                    n atom lines: element, position (Å), Mulliken charge
    f1 f2 ...                           harmonic frequencies (1/cm)
    <GDB-17 SMILES> <relaxed SMILES>
    <InChI GDB-17> <InChI relaxed>

Numbers may use Mathematica's exponent notation (``2.1997*^-6``) and forms like ``0.``/``1.``.
Parsing is strict: any deviation raises ``ValueError`` naming the file and the line. The archive
reader does not raise for a bad file: it yields a ``BadRecord`` (the shared one of
``mpattn.data.records``, re-exported here) so that callers can count and report every file
that was not loaded.
"""

from __future__ import annotations

import math
import re
import tarfile
from collections.abc import Iterator
from functools import lru_cache
from importlib import resources
from pathlib import Path, PurePosixPath

import numpy as np
from ase.data import atomic_numbers

from mpattn.data.records import QM9_PROPERTIES, BadRecord, RawMolecule

__all__ = [
    "BadRecord",
    "parse_qm9_xyz",
    "iter_qm9_archive",
    "read_qm9_archive",
    "load_uncharacterized_ids",
]

_UNCHARACTERIZED_FILE = "qm9_uncharacterized.txt"
_NUMBER = re.compile(
    r"[+-]?(?:(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|nan|inf|infinity)", re.IGNORECASE
)
_FILE_ID = re.compile(r"dsgdb9nsd_(\d+)\.xyz")
_GDB_ID = re.compile(r"\s*gdb\s+(\d+)\b")


def _fail(source: str, lineno: int | None, problem: str, text: str | None = None) -> ValueError:
    where = f"{source}: line {lineno}" if lineno is not None else source
    shown = f": {text!r}" if text is not None else ""
    return ValueError(f"{where}: {problem}{shown}")


def _number(token: str, source: str, lineno: int, line: str, what: str) -> float:
    """Parses one number (``*^`` exponents allowed); finiteness is checked by the caller."""
    t = token.replace("*^", "e")
    if not _NUMBER.fullmatch(t):
        raise _fail(source, lineno, f"malformed number {token!r} in {what}", line)
    return float(t)


def _finite(value: float, source: str, lineno: int, line: str, what: str) -> float:
    if not math.isfinite(value):
        raise _fail(source, lineno, f"non-finite {what} ({value})", line)
    return value


def _is_atom_line(line: str) -> bool:
    fields = line.split()
    return bool(fields) and fields[0].isalpha() and len(fields) >= 2


def parse_qm9_xyz(text: str, source: str) -> RawMolecule:
    """Parses one QM9 ``.xyz`` file of the original distribution.

    Args:
        text: the whole file content.
        source: name used in error messages and stored in the record (file name or
            archive member). If it looks like ``dsgdb9nsd_<id>.xyz`` its id must match the
            ``gdb <id>`` tag.

    Returns:
        The molecule: ``id`` from the ``gdb`` tag, ``z`` (int32) from the element symbols,
        ``positions`` (float64, Å), ``smiles`` = the GDB-17 SMILES, ``properties`` = the 15
        values of line 2 keyed by the names of ``QM9_PROPERTIES``, in the file's units.

    Raises:
        ValueError: on any deviation from the format; the message names ``source``, the
            line number and the offending text.
    """
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise _fail(source, None, "empty file")

    # Line 1: atom count.
    head = lines[0].strip()
    if not re.fullmatch(r"\d+", head):
        raise _fail(source, 1, "atom count is not a non-negative integer", lines[0])
    n = int(head)
    if n == 0:
        raise _fail(source, 1, "zero atoms", lines[0])

    # Line 2: "gdb <id>" then the 15 properties.
    if len(lines) < 2:
        raise _fail(source, None, "truncated file: missing line 2 ('gdb <id>' and properties)")
    fields = lines[1].split()
    if len(fields) < 2 or fields[0] != "gdb" or not re.fullmatch(r"\d+", fields[1]):
        raise _fail(source, 2, "missing 'gdb <id>' tag at the start of the line", lines[1])
    mol_id = int(fields[1])
    values = fields[2:]
    if len(values) != len(QM9_PROPERTIES):
        raise _fail(
            source,
            2,
            f"expected {len(QM9_PROPERTIES)} properties after 'gdb {mol_id}' "
            f"({' '.join(name for name, _ in QM9_PROPERTIES)}), got {len(values)}",
            lines[1],
        )
    properties: dict[str, float] = {}
    for (name, _), tok in zip(QM9_PROPERTIES, values, strict=True):
        value = _number(tok, source, 2, lines[1], f"property {name}")
        properties[name] = _finite(value, source, 2, lines[1], f"property {name}")
    m = _FILE_ID.search(PurePosixPath(source.replace("\\", "/")).name)
    if m is not None and int(m.group(1)) != mol_id:
        raise _fail(
            source,
            2,
            f"id {mol_id} of the 'gdb' tag differs from the file name's id {int(m.group(1))}",
            lines[1],
        )

    # Atom lines: count the consecutive element-symbol lines, to report a count mismatch
    # (rather than a confusing error on the first misread line).
    n_atom_lines = 0
    while 2 + n_atom_lines < len(lines) and _is_atom_line(lines[2 + n_atom_lines]):
        n_atom_lines += 1
    if n_atom_lines != n:
        after = 2 + n_atom_lines
        if after >= len(lines):
            raise _fail(
                source,
                None,
                f"truncated file: line 1 declares {n} atoms, the file ends after "
                f"{n_atom_lines} atom lines (line {len(lines)})",
            )
        raise _fail(
            source,
            1,
            f"atom count mismatch: line 1 declares {n} atoms but {n_atom_lines} atom "
            f"lines follow (lines 3-{after}); line {after + 1} is not an atom line: "
            f"{lines[after]!r}",
            lines[0],
        )
    z = np.empty(n, np.int32)
    positions = np.empty((n, 3), np.float64)
    for i in range(n):
        lineno, line = 3 + i, lines[2 + i]
        f = line.split()
        if len(f) != 5:
            raise _fail(
                source, lineno, f"expected 5 fields (symbol x y z charge), got {len(f)}", line
            )
        number = atomic_numbers.get(f[0], 0)
        if number <= 0:
            raise _fail(source, lineno, f"unknown element symbol {f[0]!r}", line)
        z[i] = number
        for k, axis in enumerate("xyz"):
            value = _number(f[1 + k], source, lineno, line, f"{axis} coordinate")
            positions[i, k] = _finite(value, source, lineno, line, f"{axis} coordinate")
        _finite(
            _number(f[4], source, lineno, line, "Mulliken charge"),
            source,
            lineno,
            line,
            "Mulliken charge",
        )

    # Trailer: frequencies, SMILES, InChI.
    rest = lines[2 + n :]
    names = ("harmonic frequencies", "SMILES", "InChI")
    if len(rest) < len(names):
        raise _fail(
            source,
            None,
            f"truncated file: missing the {names[len(rest)]} line "
            f"(line {3 + n + len(rest)}); the file ends at line {len(lines)}",
        )
    if len(rest) > len(names):
        lineno = 3 + n + len(names)
        raise _fail(source, lineno, "unexpected extra line after the InChI line", lines[lineno - 1])
    freq_no, smiles_no, inchi_no = 3 + n, 4 + n, 5 + n
    freqs = rest[0].split()
    if not freqs:
        raise _fail(source, freq_no, "empty harmonic frequencies line", rest[0])
    for tok in freqs:
        _finite(
            _number(tok, source, freq_no, rest[0], "harmonic frequencies"),
            source,
            freq_no,
            rest[0],
            "harmonic frequency",
        )
    smiles = rest[1].split()
    if len(smiles) != 2:
        raise _fail(
            source, smiles_no, f"expected 2 SMILES (GDB-17, relaxed), got {len(smiles)}", rest[1]
        )
    inchis = rest[2].split()
    if len(inchis) != 2 or not all(s.startswith("InChI=") for s in inchis):
        raise _fail(source, inchi_no, "expected 2 InChI strings (GDB-17, relaxed)", rest[2])

    return RawMolecule(
        id=mol_id,
        z=z,
        positions=positions,
        smiles=smiles[0],
        properties=properties,
        source=source,
    )


@lru_cache(maxsize=1)
def load_uncharacterized_ids() -> frozenset[int]:
    """Ids of the 3,054 QM9 molecules that failed the geometry consistency check.

    The list (Ramakrishnan et al. 2014) ships as ``mpattn/data/qm9_uncharacterized.txt``; it is
    exactly the ids 1..133,885 missing from the ``qm9pack`` package.

    Returns:
        The ids, as a frozenset.
    """
    text = resources.files("mpattn.data").joinpath(_UNCHARACTERIZED_FILE).read_text("utf-8")
    return frozenset(
        int(s) for s in (line.strip() for line in text.splitlines()) if s and not s.startswith("#")
    )


def _guess_id(name: str, data: bytes | str | None) -> int | None:
    m = _FILE_ID.search(PurePosixPath(name).name)
    if m is not None:
        return int(m.group(1))
    if data is not None:
        text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
        lines = text.splitlines()
        m = _GDB_ID.match(lines[1]) if len(lines) > 1 else None
        if m is not None:
            return int(m.group(1))
    return None


def _load(data: bytes, source: str, name: str) -> RawMolecule | BadRecord:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        return BadRecord(source, _guess_id(name, None), f"{source}: not valid UTF-8 text ({e})")
    try:
        return parse_qm9_xyz(text, source)
    except ValueError as e:
        return BadRecord(source, _guess_id(name, text), str(e))


def _iter_folder(folder: Path) -> Iterator[RawMolecule | BadRecord]:
    files = sorted(p for p in folder.iterdir() if p.suffix == ".xyz" and p.is_file())
    if not files:
        raise ValueError(f"{folder}: folder holds no .xyz files")
    for p in files:
        try:
            data = p.read_bytes()
        except OSError as e:
            yield BadRecord(str(p), _guess_id(p.name, None), f"{p}: cannot read ({e})")
            continue
        yield _load(data, str(p), p.name)


def _iter_tar(path: Path) -> Iterator[RawMolecule | BadRecord]:
    # Decompression errors differ by codec (tarfile.ReadError, OSError from bz2/gzip, EOFError
    # on truncation, zlib.error, lzma.LZMAError); all are fatal for the archive.
    import lzma
    import zlib

    fatal = (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError)
    n_xyz, last = 0, None
    try:
        tar = tarfile.open(path, mode="r|*")
    except fatal as e:
        raise ValueError(f"{path}: not a readable tar archive ({type(e).__name__}: {e})") from e
    with tar:
        while True:
            try:
                member = tar.next()
                if member is None:
                    break
                data = None
                if member.isfile() and member.name.endswith(".xyz"):
                    fh = tar.extractfile(member)
                    data = fh.read() if fh is not None else None
            except fatal as e:
                after = f" after member {last!r}" if last else ""
                raise ValueError(
                    f"{path}: corrupt or truncated archive{after} ({type(e).__name__}: {e})"
                ) from e
            last = member.name
            source = f"{path}:{member.name}"
            if member.isdir():
                continue
            if data is None:
                what = "not a .xyz file" if member.isfile() else "not a regular file (a link?)"
                yield BadRecord(source, _guess_id(member.name, None), f"{source}: {what}")
                continue
            n_xyz += 1
            yield _load(data, source, member.name)
    if n_xyz == 0:
        raise ValueError(f"{path}: archive holds no .xyz files")


def iter_qm9_archive(
    path: str | Path, *, exclude_uncharacterized: bool = True
) -> Iterator[RawMolecule | BadRecord]:
    """Streams the molecules of QM9's original distribution.

    Args:
        path: ``dsgdb9nsd.xyz.tar.bz2`` (any tar: ``.tar``, ``.tar.gz``, ``.tar.bz2``,
            ``.tar.xz``; compression is detected, members are read in archive order,
            streaming) or a folder of ``.xyz`` files (read in file-name order).
        exclude_uncharacterized: skip the molecules of ``load_uncharacterized_ids()``
            (nothing is yielded for them; ``read_qm9_archive`` counts them).

    Yields:
        A ``RawMolecule`` per good file and a ``BadRecord`` per file that could not be
        parsed (or a duplicate id, or an archive member that is not a ``.xyz`` file): no
        file is dropped silently.

    Raises:
        ValueError: the path is missing, holds no ``.xyz`` file, or is not a readable
            archive (also mid-stream: a truncated or corrupt archive is fatal).
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: QM9 archive or folder not found")
    excluded = load_uncharacterized_ids() if exclude_uncharacterized else frozenset()
    records = _iter_folder(path) if path.is_dir() else _iter_tar(path)
    first_seen: dict[int, str] = {}
    for rec in records:
        if isinstance(rec, RawMolecule):
            if rec.id in first_seen:
                yield BadRecord(
                    rec.source,
                    rec.id,
                    f"{rec.source}: duplicate id {rec.id} (first seen in {first_seen[rec.id]})",
                )
                continue
            first_seen[rec.id] = rec.source
            if rec.id in excluded:
                continue
        yield rec


def read_qm9_archive(
    path: str | Path, *, exclude_uncharacterized: bool = True, progress: bool = True
) -> tuple[list[RawMolecule], list[BadRecord], int]:
    """Reads all of QM9's original distribution, with a progress bar.

    Args:
        path: as for ``iter_qm9_archive``.
        exclude_uncharacterized: leave out (and count) the 3,054 molecules of
            ``load_uncharacterized_ids()``.
        progress: show a tqdm progress bar.

    Returns:
        ``(molecules, bad_records, n_excluded)``: the good molecules in archive order,
        the files that could not be loaded, and how many good molecules were left out as
        uncharacterized.

    Raises:
        ValueError: as ``iter_qm9_archive``.
    """
    from tqdm import tqdm

    excluded = load_uncharacterized_ids() if exclude_uncharacterized else frozenset()
    molecules: list[RawMolecule] = []
    bad: list[BadRecord] = []
    n_excluded = 0
    records = iter_qm9_archive(path, exclude_uncharacterized=False)
    with tqdm(records, desc=f"QM9 {Path(path).name}", unit="file", disable=not progress) as bar:
        for rec in bar:
            if isinstance(rec, BadRecord):
                bad.append(rec)
            elif rec.id in excluded:
                n_excluded += 1
            else:
                molecules.append(rec)
            bar.set_postfix(bad=len(bad), excluded=n_excluded, refresh=False)
    return molecules, bad, n_excluded
