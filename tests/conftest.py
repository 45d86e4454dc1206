"""Shared fixtures: small slices of real QM9 (from the qm9pack package's CSV files)."""

from __future__ import annotations

import numpy as np
import pytest

from mpattn.data.graphset import GraphSet

N_SMALL = 500


@pytest.fixture(scope="session")
def qm9_graphset() -> GraphSet:
    """The first 500 QM9 molecules, featurized, complete edge set (PROVISIONAL body)."""
    import pandas as pd

    from mpattn.data.qm9 import qm9pack_csv_paths

    df = pd.read_csv(qm9pack_csv_paths()[0], nrows=N_SMALL, usecols=["Index", "Elements", "XYZ_Ang"])
    sym = {"H": 1, "C": 6, "N": 7, "O": 8, "F": 9}
    zs, ps, snd, rcv, ne = [], [], [], [], []
    for el, xyz in zip(df.Elements, df.XYZ_Ang):
        z = np.array([sym[e] for e in el[1:-1].replace("'", "").split(",")], np.int32)
        p = np.array(xyz.replace("[", "").replace("]", "").split(","), np.float32).reshape(-1, 3)
        n = len(z)
        i, j = np.nonzero(~np.eye(n, dtype=bool))
        zs.append(z), ps.append(p), snd.append(i), rcv.append(j), ne.append(len(i))
    z = np.concatenate(zs)
    feats = (z[:, None] == np.array([1, 6, 7, 8, 9])[None]).astype(np.float32)
    return GraphSet(
        n_node=[len(a) for a in zs],
        n_edge=ne,
        nodes={"z": z, "positions": np.concatenate(ps), "features": feats},
        edges={"bond": np.full(sum(ne), 4, np.int32)},
        senders=np.concatenate(snd),
        receivers=np.concatenate(rcv),
        globals={"U0": np.arange(len(zs), dtype=np.float32)},
        ids=df.Index.to_numpy(np.int64),
    )
