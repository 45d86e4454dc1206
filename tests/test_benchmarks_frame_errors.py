"""``benchmarks.frame_errors`` on real ethanol frames: closest approaches against a brute-force
count, the frames outside the training range, the errors inside and outside it by hand, and
clear errors for a folder without parts or with predictions of other frames."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks.frame_errors import analyse, closest_approach, main
from benchmarks.peers_potentials import split_parts, write_parts

#: the bundled ethanol set's frame with a C-H bond of 0.948 Å, shorter than in any frame of
#: the experiment's training part (their shortest: 0.980 Å)
COMPRESSED = 1872


def _brute_ch(atoms) -> float:
    z, pos = atoms.get_atomic_numbers(), atoms.get_positions()
    d = np.linalg.norm(pos[:, None] - pos[None], axis=-1)
    return float(d[np.ix_(z == 6, z == 1)].min())


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    frames, parts, _ = split_parts("ethanol_xtb")
    at = int(np.nonzero(frames.ids == COMPRESSED)[0][0])
    assert at in set(parts["test"].tolist())
    test = [at] + [int(i) for i in parts["test"][:9] if i != at][:9]
    folder = tmp_path_factory.mktemp("work")
    write_parts(frames, {"train": parts["train"][:60], "test": test}, folder / "parts")
    # library "base": 5 meV/Å off on every force component of the compressed frame, 1 elsewhere
    ref = np.concatenate([frames.forces[frames.atom_index(i)] for i in test])
    error = np.repeat(np.where(np.arange(len(test)) == 0, 0.005, 0.001), 9)[:, None]
    (folder / "base").mkdir()
    np.savez(folder / "base" / "predictions.npz", test_forces=ref + error,
             test_n_atoms=np.full(len(test), 9), test_energy=np.zeros(len(test)))
    return folder, frames, parts, test


def test_closest_approach_is_the_shortest_distance_of_each_pair(work):
    import ase.io

    folder = work[0]
    images = ase.io.read(str(folder / "parts" / "test.extxyz"), index=":")
    pairs = closest_approach(images)
    assert set(pairs) == {"C-H", "C-C", "O-C", "O-H", "H-H"}
    np.testing.assert_allclose(pairs["C-H"], [_brute_ch(a) for a in images], rtol=1e-12)
    assert pairs["C-H"][0] == pytest.approx(0.9483, abs=1e-4)


def test_errors_inside_and_outside_the_training_range(work):
    import ase.io

    folder, *_ = work
    train = ase.io.read(str(folder / "parts" / "train.extxyz"), index=":")
    images = ase.io.read(str(folder / "parts" / "test.extxyz"), index=":")
    train_ch = min(_brute_ch(a) for a in train)
    # 10 meV/Å on every component of the frames outside the range, 2 inside: by hand
    result0 = analyse_with(folder, images, lambda outside: np.where(outside, 0.010, 0.002))
    outside = np.zeros(len(images), bool)
    outside[result0["outside"]] = True
    assert outside[0] and _brute_ch(images[0]) < train_ch  # the compressed C-H bond
    lib = result0["libraries"]["lib"]
    n_out = outside.sum()
    assert lib["force_mae_mev_ang"] == pytest.approx((10 * n_out + 2 * (10 - n_out)) / 10)
    assert lib["inside_force_mae_mev_ang"] == pytest.approx(2.0)
    assert lib["inside_force_rmse_mev_ang"] == pytest.approx(2.0)
    worst = lib["worst"][0]
    assert worst["frame"] in result0["outside"] and worst["force_mae_mev_ang"] == \
        pytest.approx(10.0)
    first = [w for w in lib["worst"] if w["frame"] == 0][0]
    assert first["pair"] == "C-H" and first["frame_id"] == COMPRESSED
    assert first["margin_ang"] == pytest.approx(_brute_ch(images[0]) - train_ch, abs=1e-9)
    assert result0["margin_ang"][0] < 0


def analyse_with(folder, images, error_of):
    """Predictions = reference + ``error_of(outside)`` eV/Å per frame, written for library
    ``lib``; the analysis of them (outside taken from a first pass)."""
    n = np.array([len(a) for a in images])
    ref = np.concatenate([a.arrays["REF_forces"] for a in images])
    (folder / "lib").mkdir(exist_ok=True)
    np.savez(folder / "lib" / "predictions.npz", test_forces=ref, test_n_atoms=n,
             test_energy=np.zeros(len(n)))
    outside = np.zeros(len(n), bool)
    outside[analyse(folder)["outside"]] = True
    np.savez(folder / "lib" / "predictions.npz",
             test_forces=ref + np.repeat(error_of(outside), n)[:, None], test_n_atoms=n,
             test_energy=np.zeros(len(n)))
    return analyse(folder, top=3)


def test_clear_errors_and_the_command(work, tmp_path, capsys):
    folder, *_ = work
    with pytest.raises(FileNotFoundError, match=r"train\.extxyz: no such part"):
        analyse(tmp_path)
    (tmp_path / "parts").mkdir()
    for name in ("train.extxyz", "test.extxyz"):
        (tmp_path / "parts" / name).write_bytes((folder / "parts" / name).read_bytes())
    with pytest.raises(FileNotFoundError, match="no <library>/predictions.npz with test"):
        analyse(tmp_path)
    (tmp_path / "bad").mkdir()
    np.savez(tmp_path / "bad" / "predictions.npz", test_forces=np.zeros((18, 3)),
             test_n_atoms=np.array([9, 9]))
    with pytest.raises(ValueError, match=r"bad/predictions.npz: its test predictions are of "
                                         "other frames"):
        analyse(tmp_path)
    assert main([str(tmp_path), "--no-save"]) == 2
    assert "other frames" in capsys.readouterr().err
    figure = tmp_path / "fig.png"
    assert main([str(folder), "--no-save", "--out", str(figure), "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert "outside the training range of 60 frames" in out
    assert "    0      5.0  C-H   0.948 / " in out  # base's worst frame
    assert figure.stat().st_size > 10_000
    json.dumps(analyse(folder))  # the payload written to benchmarks/results is JSON
