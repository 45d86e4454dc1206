"""mpattn.potential: forces = -dE/dR (finite differences, periodic cells), invariances,
padding, pair slots, the per-element reference and its state; and the energy+forces loss and
metrics (mpattn.train.losses.energy_force_loss, mpattn.train.metrics.force_metrics).

The attention model's own behaviour (smoothness at the cutoff, vector channels, heads) is
tested in tests/models/test_attention_model.py, the electrostatics functions in
tests/nn/test_electrostatics.py.
"""

from __future__ import annotations

import functools
import json

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from ase.build import molecule
from flax import nnx

from mpattn.models.attention import AttentionModel
from mpattn.potential import (
    Potential,
    Reference,
    ReferenceState,
    energy_and_forces,
    fit_reference,
)
from mpattn.testing import random_rotation
from tests.potential_helpers import (
    CFG,
    MOL,
    PBC,
    REF,
    crystals,
    ethanol,
    fd_forces,
    pad,
    potentials,
    radius_graph,
    run,
    with_pairs,
)


@pytest.fixture(scope="module")
def pots():
    """Small potentials, built once (tests/potential_helpers.py)."""
    return potentials()


# ------------------------------------------------------------------ forces and invariances


@pytest.mark.parametrize("kind", ["attention", "schnet", "vector", "vector_sum", "silu",
                                  "coulomb", "so3krates"])
def test_forces_equal_finite_differences(x64, pots, kind):
    """Potential(AttentionModel), Potential(SchNet) and Potential(So3krates) on width-0
    features, float64."""
    a = ethanol()
    graph = pad([radius_graph(a.numbers, a.positions, 5.0)], dtype=np.float64)
    energy, forces = run(pots[kind], graph)
    assert energy.dtype == forces.dtype == np.float64
    fd = fd_forces(pots[kind], graph)
    np.testing.assert_allclose(forces[:9], fd, rtol=1e-6, atol=1e-6 * np.abs(fd).max())
    np.testing.assert_array_equal(forces[9:], 0.0)
    np.testing.assert_array_less(1e-3, np.abs(fd).max())  # not trivially zero


def test_forces_equal_finite_differences_periodic(x64, pots):
    """Rattled bulk Si: edges through periodic images (constant shifts), float64."""
    si, _ = crystals()
    g = radius_graph(si.numbers, si.positions, CFG.cutoff, np.asarray(si.cell), si.pbc)
    np.testing.assert_array_less(1.0, np.abs(g.edges["shift"]).max())  # image edges exist
    graph = pad([g], PBC, dtype=np.float64)
    _, forces = run(pots["crystal"], graph)
    fd = fd_forces(pots["crystal"], graph)
    np.testing.assert_allclose(forces[:8], fd, rtol=1e-6, atol=1e-6 * np.abs(fd).max())


def test_periodic_supercell_is_extensive(x64, pots):
    """A 2x1x1 supercell of rattled fcc Cu: twice the energy, the same forces per image."""
    _, cu = crystals()
    graph = pad([radius_graph(x.numbers, x.positions, CFG.cutoff, np.asarray(x.cell), x.pbc)
                 for x in (cu, cu.repeat((2, 1, 1)))], PBC, dtype=np.float64)
    energy, forces = run(pots["crystal"], graph)
    np.testing.assert_allclose(energy[1], 2 * energy[0], rtol=1e-12)
    np.testing.assert_allclose(forces[4:12], np.tile(forces[:4], (2, 1)), atol=1e-12)


@pytest.mark.parametrize("kind", ["attention", "schnet", "vector", "vector_sum", "silu",
                                  "coulomb", "so3krates"])
def test_rotation_translation_permutation(x64, pots, kind):
    """Energy invariant, forces rotate with the structure and follow atom permutations."""
    rng = np.random.default_rng(0)
    a = ethanol()
    n = len(a)
    rot = random_rotation(rng)
    perm = rng.permutation(n)
    z, pos = a.numbers, a.positions
    variants = [pos, pos @ rot.T, pos + np.array([3.0, -7.0, 11.0])]
    graph = pad([radius_graph(z, p, 5.0) for p in variants]
                + [radius_graph(z[perm], pos[perm], 5.0)], dtype=np.float64)
    energy, forces = run(pots[kind], graph)
    f = forces[:4 * n].reshape(4, n, 3)
    np.testing.assert_allclose(energy[1:4], np.full(3, energy[0]), rtol=1e-12)
    np.testing.assert_allclose(f[1], f[0] @ rot.T, atol=1e-10)
    np.testing.assert_allclose(f[2], f[0], atol=1e-10)
    np.testing.assert_allclose(f[3], f[0][perm], atol=1e-10)



@functools.partial(jax.jit, static_argnums=0)
def _outputs(graphdef, state, graph):
    pot = nnx.merge(graphdef, state)
    plain = energy_and_forces(lambda g: {"energy": pot(g)["energy"] * 2}, graph)
    return pot(graph), pot(graph, reference=False), pot.model(graph), plain


def test_potential_returns_the_model_outputs_in_ev(pots):
    """``potential(graph)`` is the model's output mapping with "energy" and "per_atom" in eV
    (scaled, plus the reference; padding 0) and the model's other outputs as they are;
    energy_and_forces also takes a plain callable returning a mapping with "energy"."""
    a = ethanol()
    graph = pad([radius_graph(a.numbers, a.positions, 5.0)])
    pot = pots["coulomb"]
    out, no_ref, model_out, plain = _outputs(*nnx.split(pot), graph)
    out, no_ref, model_out = ({k: np.asarray(v, np.float64) for k, v in o.items()}
                              for o in (out, no_ref, model_out))
    assert set(out) == set(no_ref) == set(model_out) == {"energy", "per_atom", "charges"}
    assert out["energy"].shape == (MOL[2],) and out["per_atom"].shape == (MOL[0],)
    np.testing.assert_allclose(out["per_atom"][:9], REF.scale * model_out["per_atom"][:9]
                               + REF.energies[np.searchsorted(REF.elements, a.numbers)],
                               rtol=1e-6)
    np.testing.assert_allclose(no_ref["per_atom"][:9], REF.scale * model_out["per_atom"][:9],
                               rtol=1e-6)
    np.testing.assert_array_equal(out["per_atom"][9:], 0.0)
    np.testing.assert_allclose(out["energy"][0], out["per_atom"][:9].sum(), rtol=1e-6)
    np.testing.assert_array_equal(out["energy"][1:], 0.0)
    np.testing.assert_allclose(out["energy"][0] - no_ref["energy"][0],
                               REF.energy(a.numbers, [9])[0], rtol=1e-6)
    np.testing.assert_array_equal(out["charges"], model_out["charges"])
    energy, forces = run(pot, graph)
    np.testing.assert_allclose(plain[0], 2 * energy, rtol=1e-6)
    np.testing.assert_allclose(plain[1], 2 * forces, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ padding


@pytest.mark.parametrize("kind", ["attention", "vector", "vector_sum", "silu", "coulomb",
                                  "coulomb_long", "so3krates"])
def test_padding_never_changes_real_graphs(pots, kind):
    """Ethanol + water padded with extra nodes, edges and graphs (junk padding positions)
    equal each molecule padded alone; padding graphs get energy 0, padding nodes force 0."""
    graphs = [radius_graph(m.numbers, m.positions, 5.0) for m in map(molecule, ("CH3CH2OH",
                                                                                "H2O"))]
    batch = pad(graphs)
    batch.nodes["positions"][12:] = np.random.default_rng(0).normal(size=(36, 3)) * 10
    energy, forces = run(pots[kind], batch)
    assert energy.dtype == forces.dtype == np.float32  # the default
    alone = [run(pots[kind], pad([g])) for g in graphs]
    np.testing.assert_allclose(energy[:2], [e[0] for e, _ in alone], rtol=1e-6)
    np.testing.assert_allclose(forces[:12], np.concatenate([f[:n] for (_, f), n in
                                                           zip(alone, (9, 3), strict=True)]),
                               atol=1e-6)
    np.testing.assert_array_equal(forces[12:], 0.0)
    np.testing.assert_array_equal(energy[2:], 0.0)


# ------------------------------------------------------------------ reference and state


def test_fit_reference_recovers_synthetic_energies():
    """Linear synthetic data (by nature): exact E_e; nitrogen never occurs and gets 0."""
    rng = np.random.default_rng(4)
    true = {1: -13.6, 6: -1029.5, 8: -2042.6}
    z_list = [rng.choice([1, 6, 8], size=rng.integers(3, 20)) for _ in range(40)]
    energies = [sum(true[int(z)] for z in zs) for zs in z_list]
    forces = rng.normal(size=(sum(len(zs) for zs in z_list), 3)) * 0.5
    ref = fit_reference(z_list, energies, ("H", "C", "N", "O"), forces=forces)
    assert ref.elements == (1, 6, 7, 8)
    np.testing.assert_allclose(ref.energies, [-13.6, -1029.5, 0.0, -2042.6], rtol=1e-10)
    assert ref.energies[2] == 0.0
    np.testing.assert_allclose(ref.scale, np.sqrt(np.mean(forces**2)), rtol=1e-12)
    counts = np.array([[np.sum(zs == e) for e in (1, 6, 7, 8)] for zs in z_list])
    np.testing.assert_allclose(fit_reference(counts, energies, (1, 6, 7, 8)).energies,
                               ref.energies, rtol=1e-10)
    np.testing.assert_allclose(ref.energy(np.concatenate(z_list), [len(z) for z in z_list]),
                               energies, rtol=1e-12)
    back = Reference.from_dict(json.loads(json.dumps(ref.to_dict())))
    np.testing.assert_array_equal(back.energies, ref.energies)
    assert (back.elements, back.scale) == (ref.elements, ref.scale)
    with pytest.raises(ValueError, match=r"atomic numbers 9 \(F\) not in elements 1 \(H\), "
                                         r"6 \(C\) \(first in structure 1\)"):
        fit_reference([np.array([1, 6]), np.array([9, 1])], [1.0, 2.0], (1, 6))
    with pytest.raises(ValueError, match=r"counts must have shape \(1, 2\), got \(1, 3\)"):
        fit_reference(np.ones((1, 3)), [1.0], (1, 6))


def test_potential_reference_state_survives_split_merge_and_checkpoint(tmp_path, pots):
    a = ethanol()
    graph = pad([radius_graph(a.numbers, a.positions, 5.0)])
    pot = pots["attention"]
    energy, _ = run(pot, graph)
    no_ref = Potential(pot.model, reference=Reference((1, 6, 8), np.zeros(3), scale=0.7))
    np.testing.assert_allclose(energy[0] - run(no_ref, graph)[0][0],
                               REF.energy(a.numbers, [9])[0], rtol=1e-6)
    assert "table" not in nnx.state(pot, nnx.Param)  # not trained
    assert set(nnx.state(pot, ReferenceState)) == {"table", "scale"}
    np.testing.assert_array_equal(run(nnx.merge(*nnx.split(pot)), graph)[0], energy)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp_path / "ckpt", nnx.state(pot))
    ckpt.wait_until_finished()
    graphdef, state = nnx.split(pot)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    restored = nnx.merge(graphdef, ckpt.restore(tmp_path / "ckpt", abstract))
    np.testing.assert_array_equal(run(restored, graph)[0], energy)
    np.testing.assert_allclose(restored.reference.energies, REF.energies, rtol=1e-7)
    assert restored.reference.scale == pytest.approx(0.7)


def test_errors():
    """Potential's errors (the attention model's config errors: tests/models/
    test_attention_model.py::test_config_errors)."""
    model = AttentionModel(CFG, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="Potential needs elements or a reference"):
        Potential(model)
    pot = Potential(model, elements=("H", "C"))
    with pytest.raises(ValueError, match=r"reference elements \(1, 6, 8\) differ"):
        pot.set_reference(REF)
    a = molecule("CH3CH2OH")
    graph = pad([radius_graph(a.numbers, a.positions, 5.0)])
    with pytest.raises(ValueError, match=r"elements \['O'\] unknown to this potential"):
        pot.check(graph)
    table = np.asarray(pot.table[...])  # unchecked unknown elements give NaN energies
    assert table[0] == table[1] == table[6] == 0.0 and np.isnan(table[[2, 3, 4, 5]]).all()
    # the potential's check runs the model's own
    with pytest.raises(ValueError, match="attention: atomic number 108 above max_z=100"):
        Potential(model, elements=(1, 6, 8, 101, 106, 108)).check(
            graph._replace(nodes={**graph.nodes, "z": graph.nodes["z"] + 100}))


# ------------------------------------------------------------------ radial terms per edge pair


@pytest.mark.parametrize("kind", ["attention", "schnet", "crystal", "vector", "coulomb",
                                  "coulomb_long", "so3krates"])
def test_pair_slots_give_the_same_energy_and_exact_forces(x64, pots, kind):
    """Radial networks once per pair: same energies/forces as per edge, forces = -dE/dx (FD)."""
    if kind == "crystal":
        si, _ = crystals()
        g = radius_graph(si.numbers, si.positions, CFG.cutoff, np.asarray(si.cell), si.pbc)
        graph, n = pad([g], PBC, dtype=np.float64), len(si)
    else:
        a = ethanol()
        graph, n = pad([radius_graph(a.numbers, a.positions, 5.0)], dtype=np.float64), len(a)
    paired = with_pairs(graph)
    energy, forces = run(pots[kind], paired)
    ref_energy, ref_forces = run(pots[kind], graph)
    np.testing.assert_allclose(energy, ref_energy, rtol=1e-12)
    np.testing.assert_allclose(forces, ref_forces, rtol=1e-9, atol=1e-12)
    fd = fd_forces(pots[kind], paired)
    np.testing.assert_allclose(forces[:n], fd, rtol=1e-6, atol=1e-6 * np.abs(fd).max())
