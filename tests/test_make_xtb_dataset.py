"""experiments.make_xtb_dataset: the SPICE-like SMILES set, its start geometries and its file."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from experiments.make_xtb_dataset import (
    GROUPS,
    SPICE_LIKE,
    generate,
    generate_set,
    main,
    parse,
    smiles_geometry,
)

SET_FILE = Path(__file__).resolve().parents[1] / "mpattn/data/files/spice_like_xtb.extxyz.gz"
FRAMES_PER_MOLECULE = 100  # the --frames-per-molecule of the command in the module docstring
ALLOWED = {"C", "H", "N", "O", "S"}


def _formula_counts(smiles: str) -> Counter:
    """Element counts from RDKit's molecular formula string (independent of the embedding)."""
    from rdkit import Chem
    from rdkit.Chem.rdMolDescriptors import CalcMolFormula

    formula = CalcMolFormula(Chem.MolFromSmiles(smiles))
    assert re.fullmatch(r"([A-Z][a-z]?\d*)+", formula), formula  # neutral: no +/- suffix
    return Counter({el: int(n or 1) for el, n in re.findall(r"([A-Z][a-z]?)(\d*)", formula)})


def test_molecule_list():
    import experiments.spice_like_molecules as sl

    assert len(SPICE_LIKE) >= 36
    # unique across both groups (a dict would silently merge a name given twice)
    assert len(SPICE_LIKE) == len(sl._SULFUR) + len(sl._QM9)
    assert len(set(SPICE_LIKE)) == len(SPICE_LIKE)
    assert len({s for s, _ in SPICE_LIKE.values()}) == len(SPICE_LIKE)
    for name in SPICE_LIKE:
        assert re.fullmatch(r"[a-z0-9]+(_[a-z0-9]+)*", name), name
    groups = Counter(g for _, g in SPICE_LIKE.values())
    assert set(groups) == set(GROUPS) and min(groups.values()) >= 15, groups


@pytest.mark.parametrize("name", list(SPICE_LIKE))
def test_smiles_geometry_every_molecule(name):
    from rdkit import Chem

    smiles, group = SPICE_LIKE[name]
    atoms = smiles_geometry(name, smiles)
    counts = Counter(atoms.get_chemical_symbols())
    assert counts == _formula_counts(smiles), (name, counts)
    assert set(counts) <= ALLOWED
    assert Chem.GetFormalCharge(Chem.MolFromSmiles(smiles)) == 0
    heavy = len(atoms) - counts["H"]
    if group == "sulfur":
        assert counts["S"] >= 1 and len(atoms) <= 25
    else:
        assert group == "qm9" and counts["S"] == 0 and heavy <= 9
    d = atoms.get_all_distances()[np.triu_indices(len(atoms), 1)]
    assert d.min() > 0.85, (name, d.min())  # MMFF-optimised: no clashes
    np.testing.assert_array_equal(smiles_geometry(name, smiles).positions, atoms.positions)


def test_bad_smiles_names_molecule_and_smiles():
    with pytest.raises(ValueError, match=r"molecule 'broken'.*'C1CC\('"):
        smiles_geometry("broken", "C1CC(")
    with pytest.raises(ValueError, match=r"molecule 'valence'.*'C\(C\)\(C\)\(C\)\(C\)C'"):
        smiles_geometry("valence", "C(C)(C)(C)(C)C")  # five-valent carbon: parse fails
    with pytest.raises(ValueError, match=r"molecule 'bad'.*'C1CC\('"):
        generate_set(["bad"], 1, molecules={"bad": ("C1CC(", "qm9")}, progress=False)
    with pytest.raises(ValueError, match="unknown molecule.*'unobtainium'"):
        generate_set(["unobtainium"], 1, progress=False)


def test_command_line():
    args = parse(["--set", "spice_like", "--molecules", "urea,thiourea"])
    assert args.set == "spice_like" and args.frames_per_molecule == 100
    assert parse([]).molecule == "ethanol" and parse([]).set is None
    with pytest.raises(SystemExit):
        parse(["--molecules", "urea"])  # needs --set
    with pytest.raises(SystemExit):
        parse(["--set", "spice_like", "--molecule", "ethanol"])


def test_generate_set_tiny(tmp_path):
    pytest.importorskip("tblite")
    import ase.io

    frames = generate_set(["methanethiol"], 2, 500.0, interval=2, equilibration=2, seed=1,
                          progress=False)
    assert len(frames) == 2
    for f, step in zip(frames, (4, 6), strict=True):
        assert f.info["molecule"] == "methanethiol" and f.info["smiles"] == "CS"
        assert f.info["group"] == "sulfur" and f.info["method"] == "GFN2-xTB"
        assert f.info["step"] == step and f.info["interval"] == 2 and f.info["seed"] == 1
        assert {"temperature_K", "timestep_fs", "tblite_version", "rdkit_version"} <= set(f.info)
        assert np.isfinite(f.get_potential_energy())
        assert f.get_forces().shape == (6, 3) and np.isfinite(f.get_forces()).all()
    # the command line, two molecules into one file, molecule after molecule
    out = tmp_path / "two.extxyz.gz"
    rc = main(["--set", "spice_like", "--molecules", "urea,methanethiol",
               "--frames-per-molecule", "2", "--interval", "2", "--equilibration", "2",
               "--seed", "1", "--output", str(out), "--no-progress"])
    assert rc == 0
    back = ase.io.read(out, ":")
    assert [f.info["molecule"] for f in back] == ["urea"] * 2 + ["methanethiol"] * 2
    assert [f.info["group"] for f in back] == ["qm9"] * 2 + ["sulfur"] * 2
    np.testing.assert_allclose(back[2].get_forces(), frames[0].get_forces(), atol=1e-6)


def test_xtb_failure_names_molecule_and_step(monkeypatch):
    pytest.importorskip("tblite")
    from ase.calculators.calculator import CalculationFailed, Calculator

    import experiments.make_xtb_dataset as mx

    class FailsOnThirdCall(Calculator):
        implemented_properties = ["energy", "forces"]
        calls = 0

        def calculate(self, atoms=None, properties=("energy",), system_changes=()):
            super().calculate(atoms, properties, system_changes)
            FailsOnThirdCall.calls += 1
            if FailsOnThirdCall.calls == 3:
                raise CalculationFailed("SCF not converged in 250 cycles")
            self.results = {"energy": 0.0, "forces": np.zeros((len(self.atoms), 3))}

    monkeypatch.setattr(mx, "_tblite_calculator", FailsOnThirdCall)
    atoms = smiles_geometry("urea", "NC(N)=O")
    with pytest.raises(RuntimeError, match=r"molecule 'urea' at MD step 2: SCF not conv"):
        generate("urea", 2, 300.0, interval=2, equilibration=2, atoms=atoms, progress=False)


def _read_set_file() -> list:
    """All frames of SET_FILE, decompressed first: ``ase.io.read(path, ":")`` on the .gz path
    takes 90 s instead of 1 s (the extxyz reader seeks back in the gzip stream per frame)."""
    import gzip
    import io

    import ase.io

    if not SET_FILE.exists():
        pytest.skip(f"{SET_FILE} not generated yet")
    with gzip.open(SET_FILE, "rt") as fh:
        return ase.io.read(io.StringIO(fh.read()), ":", format="extxyz")


@pytest.mark.slow
def test_generated_set_file_reads_with_ase_path():
    """Plain ``ase.io.read(path, ":")`` gives the same frames (about 90 s on 2 cores)."""
    import ase.io

    frames = _read_set_file()
    by_path = ase.io.read(SET_FILE, ":")
    assert len(by_path) == len(frames)
    np.testing.assert_array_equal([f.get_potential_energy() for f in by_path],
                                  [f.get_potential_energy() for f in frames])
    assert [f.info["molecule"] for f in by_path] == [f.info["molecule"] for f in frames]


def test_generated_set_file():
    """The file written by the command of the module docstring (skipped while it is absent)."""
    frames = _read_set_file()
    order = [f.info["molecule"] for f in frames]
    per_molecule = Counter(order)
    assert len(per_molecule) >= 30
    assert set(per_molecule.values()) == {FRAMES_PER_MOLECULE}, per_molecule
    # molecule after molecule: each name is one contiguous block
    blocks = [n for i, n in enumerate(order) if i == 0 or order[i - 1] != n]
    assert len(blocks) == len(per_molecule)
    groups = set()
    for f in frames:
        name = f.info["molecule"]
        smiles, group = SPICE_LIKE[name]
        assert f.info["smiles"] == smiles and f.info["group"] == group
        groups.add(group)
        e, forces = f.get_potential_energy(), f.get_forces()
        assert np.isfinite(e) and forces.shape == (len(f), 3) and np.isfinite(forces).all()
        has_s = 16 in f.numbers
        assert has_s == (group == "sulfur"), name
        assert set(f.get_chemical_symbols()) <= ALLOWED
    assert groups == set(GROUPS)
    for name in per_molecule:  # the atoms are those of the SMILES start geometry, same order
        first = frames[order.index(name)]
        np.testing.assert_array_equal(first.numbers,
                                      smiles_geometry(name, SPICE_LIKE[name][0]).numbers)
