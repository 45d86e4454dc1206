"""The molecules of the SPICE-like GFN2-xTB set (``python -m experiments.make_xtb_dataset --set``).

``SPICE_LIKE`` maps a lowercase snake_case name to ``(smiles, group)``. Group ``"sulfur"``:
neutral C/H/N/O/S molecules with at least one sulfur atom and at most 25 atoms (thiols,
sulfides, a disulfide, thiophenes, sulfoxide/sulfone, thioesters, thioamides, cysteine and
methionine fragments). Group ``"qm9"``: QM9-like neutral C/H/N/O molecules with at most 9
heavy atoms. Amino acids are written in their neutral (non-zwitterionic) gas-phase form.
"""

from __future__ import annotations

__all__ = ["GROUPS", "SPICE_LIKE"]

GROUPS = ("sulfur", "qm9")

_SULFUR = {
    "methanethiol": "CS",
    "ethanethiol": "CCS",
    "dimethyl_sulfide": "CSC",
    "diethyl_sulfide": "CCSCC",
    "dimethyl_disulfide": "CSSC",
    "tetrahydrothiophene": "C1CCSC1",
    "thiophene": "c1ccsc1",
    "2_methylthiophene": "Cc1cccs1",
    "dimethyl_sulfoxide": "CS(C)=O",
    "dimethyl_sulfone": "CS(C)(=O)=O",
    "thioacetic_acid": "CC(=O)S",
    "methyl_thioacetate": "CC(=O)SC",
    "thioacetamide": "CC(N)=S",
    "thiourea": "NC(N)=S",
    "methyl_isothiocyanate": "CN=C=S",
    "thiazole": "c1cscn1",
    "2_mercaptoethanol": "OCCS",
    "cysteamine": "NCCS",
    "thiophenol": "Sc1ccccc1",
    "thioanisole": "CSc1ccccc1",
    "cysteine": "NC(CS)C(=O)O",
    "methionine": "CSCCC(N)C(=O)O",
    "n_acetylcysteine_methylamide": "CC(=O)NC(CS)C(=O)NC",
}

_QM9 = {
    "ethanol": "CCO",
    "propan_1_ol": "CCCO",
    "acetone": "CC(C)=O",
    "acetonitrile": "CC#N",
    "methyl_acetate": "CC(=O)OC",
    "urea": "NC(N)=O",
    "acetamide": "CC(N)=O",
    "n_methylacetamide": "CC(=O)NC",
    "glycine": "NCC(=O)O",
    "alanine": "CC(N)C(=O)O",
    "tetrahydrofuran": "C1CCOC1",
    "furan": "c1ccoc1",
    "pyrrole": "c1cc[nH]c1",
    "imidazole": "c1c[nH]cn1",
    "oxazole": "c1cocn1",
    "isoxazole": "c1cnoc1",
    "pyridine": "c1ccncc1",
    "pyrimidine": "c1cncnc1",
    "phenol": "Oc1ccccc1",
    "aniline": "Nc1ccccc1",
    "benzaldehyde": "O=Cc1ccccc1",
}

SPICE_LIKE: dict[str, tuple[str, str]] = {
    **{name: (smiles, "sulfur") for name, smiles in _SULFUR.items()},
    **{name: (smiles, "qm9") for name, smiles in _QM9.items()},
}
assert len(SPICE_LIKE) == len(_SULFUR) + len(_QM9), "a name is in both groups"
