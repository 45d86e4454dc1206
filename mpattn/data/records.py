"""The raw molecule record that every QM9 source (qm9pack CSV, original .xyz archive) yields."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["BadRecord", "RawMolecule", "QM9_PROPERTIES"]

# Canonical names of QM9's 15 scalar properties, in the order of the original .xyz files'
# second line (after the "gdb <id>" tag), with the units those files use.
QM9_PROPERTIES: tuple[tuple[str, str], ...] = (
    ("A", "GHz"),
    ("B", "GHz"),
    ("C", "GHz"),
    ("mu", "Debye"),
    ("alpha", "Bohr^3"),
    ("homo", "Hartree"),
    ("lumo", "Hartree"),
    ("gap", "Hartree"),
    ("r2", "Bohr^2"),
    ("zpve", "Hartree"),
    ("U0", "Hartree"),
    ("U", "Hartree"),
    ("H", "Hartree"),
    ("G", "Hartree"),
    ("Cv", "cal/(mol K)"),
)


@dataclass
class RawMolecule:
    """One molecule as read from a source, before featurization.

    Attributes:
        id: the dataset's identifier (QM9: the integer index of ``dsgdb9nsd_<id>.xyz``).
        z: int array [num_atoms], atomic numbers in file order.
        positions: float64 array [num_atoms, 3] in Å, file order.
        smiles: SMILES used as bond-order template (QM9: the GDB-17 SMILES), or None.
        properties: canonical property name (see ``QM9_PROPERTIES``) -> value in the
            source's original units (Hartree, Debye, ...); converted later, once.
        source: where it came from (file name, archive member), for error messages.
    """

    id: int
    z: np.ndarray
    positions: np.ndarray
    smiles: str | None = None
    properties: dict[str, float] = field(default_factory=dict)
    source: str = ""


@dataclass
class BadRecord:
    """A record that could not be used: where it came from, its id if known, and why.

    Loaders report these (and count them in summaries) instead of crashing or dropping
    records silently.
    """

    source: str
    id: int | None
    reason: str
