"""A trained potential as one deployable file: a ``jax.export`` artefact that any program
with JAX (no mpattn, no flax, no vesin, no ASE) can load and run.

:func:`export_potential` traces the pure function::

    f(z int32[max_atoms], positions [max_atoms, 3] Å, cell [3, 3] Å)
        -> (energy [] eV, forces [max_atoms, 3] eV/Å, stress [3, 3] eV/Å³)

with the potential's parameters baked in as constants, and writes ``exported.serialize()``
to ``path`` and a JSON sidecar ``path + ".json"`` (elements, cutoff, units, inputs and
outputs). Load it back with :func:`load_exported` (checks its inputs eagerly), or with JAX
alone::

    exp = jax.export.deserialize(bytearray(open(path, "rb").read()))
    energy, forces, stress = exp.call(z, positions, cell)

Inputs. Atoms with ``z == 0`` are absent (padding) and must come after the real ones. The
cell's rows are the lattice vectors; a cell of volume 0 (zeros: a molecule, or any structure
not periodic in all three directions) has no images and zero stress; any other is
periodic in all three directions with minimum-image neighbours, which requires the cutoff
to be below half the cell's smallest perpendicular width (then each pair has at most one
image within the cutoff; :func:`check_cell`). The energy includes the per-element reference.

Inside, the graph is built without host code by :func:`mpattn.neighbors.dense_radius_graph`
(every pair of the ``max_atoms`` slots, real iff both atoms are real and closer than the
cutoff, minimum image in a cell). The cost is O(max_atoms²) per call: meant for structures of
up to a few hundred atoms.

Invalid inputs cannot raise inside the artefact: a real atom after padding, an element the
potential does not know, or a periodic cell too small for the cutoff give NaN energy, forces
and stress (the wrapper of :func:`load_exported` raises instead).

Precision. In float32 the absolute energy (reference included) is rounded at ~1e-7 relative
(~0.5 meV at -5000 eV); ``dtype="float64"`` (export and call with ``jax_enable_x64``) keeps
the float64 reference exact. Platforms: the CLI exports for ``cpu`` and ``cuda`` by default
(cuda lowering needs no GPU), so one file runs on either. Writing needs the ``flatbuffers``
package (jax's serializer); loading needs jax and numpy only.

CLI: ``python -m mpattn.export WORKDIR OUT --max-atoms N [--which best|latest]
[--cutoff R] [--x64] [--platforms cpu,cuda]``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

__all__ = ["ExportedPotential", "check_cell", "export_potential", "load_exported", "main"]

UNITS = {"positions": "Å", "cell": "Å", "energy": "eV", "forces": "eV/Å", "stress": "eV/Å³"}
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


def check_cell(cell, cutoff: float) -> bool:
    """Whether ``cell`` is periodic (nonzero volume); ValueError if it is too small for
    minimum-image neighbours (``cutoff >= min height / 2``) or singular but nonzero."""
    cell = np.asarray(cell, np.float64).reshape(3, 3)
    if not np.any(cell):
        return False
    if abs(np.linalg.det(cell)) <= 0:
        raise ValueError(f"cell {cell.tolist()} has volume 0: pass zeros for a molecule or "
                         "a cell periodic in all three directions")
    heights = 1.0 / np.linalg.norm(np.linalg.inv(cell), axis=0)
    if not cutoff < heights.min() / 2:
        raise ValueError(f"cell too small for the cutoff {cutoff} Å: minimum image needs the "
                         f"cutoff below half the smallest perpendicular width "
                         f"({heights.min():.4g} Å); use a supercell")
    return True


def _pure_function(potential, *, max_atoms: int, cutoff: float, dtype):
    """``f(z, positions, cell) -> (energy, forces, stress)`` with constant parameters."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from mpattn.neighbors import dense_radius_graph
    from mpattn.potential import energy_forces_stress

    graphdef, state = nnx.split(potential)
    leaves, treedef = jax.tree.flatten(state)
    leaves = [jnp.asarray(x, dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
              for x in leaves]
    elements = np.asarray(potential.elements, np.int64)
    table = np.zeros(int(elements.max()) + 1, np.float64)  # host float64 reference, eV
    table[elements] = potential.reference.energies
    known = np.zeros(len(table), bool)
    known[elements] = known[0] = True
    n = max_atoms

    def f(z, positions, cell):
        real = z > 0
        n_real = jnp.sum(real.astype(jnp.int32))
        ordered = jnp.all(real == (jnp.arange(n) < n_real))  # padding after the real atoms
        zi = jnp.clip(z, 0, len(table) - 1)
        ok_z = jnp.all(jnp.where((z >= 0) & (z < len(table)), jnp.asarray(known)[zi], False))
        graph, ok_cell = dense_radius_graph(z, positions, cell, cutoff)
        pot = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
        energy, forces, stress = energy_forces_stress(pot, graph, reference=False)
        reference = jnp.sum(jnp.asarray(table, dtype)[zi])
        valid = ordered & ok_z & ok_cell
        nan = jnp.asarray(jnp.nan, dtype)
        return (jnp.where(valid, energy[0] + reference, nan),
                jnp.where(valid, forces[:n], nan), jnp.where(valid, stress[0], nan))

    return f


def export_potential(potential, path, *, max_atoms: int, cutoff: float | None = None,
                     dtype=None, platforms=("cpu",), which: str = "best") -> dict:
    """Writes ``potential`` as a serialized ``jax.export`` artefact and its JSON sidecar.

    Args:
        potential: a :class:`~mpattn.potential.Potential`, or a potential run's workdir
            (read with :func:`mpattn.load_run` at ``which``).
        path: the artefact's file; the metadata goes to ``path + ".json"``.
        max_atoms: atom slots of the function (structures of up to this many atoms).
        cutoff: radius-graph cutoff, Å (default the model config's ``graph_cutoff``, else
            its ``cutoff``, as :class:`mpattn.ase.Calculator`).
        dtype: of positions, cell, parameters and outputs (default the parameters', float32;
            ``"float64"`` needs ``jax_enable_x64``, here and where it is called).
        platforms: lowering platforms (``("cpu", "cuda")`` runs on either; no GPU needed).

    Returns:
        The metadata written to the sidecar.

    Raises:
        ValueError: ``max_atoms < 1``, a bad cutoff or platform, float64 without x64, or a
            workdir that does not hold a potential run.
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from mpattn.potential import Potential

    if int(max_atoms) < 1:
        raise ValueError(f"max_atoms must be at least 1, got {max_atoms}")
    max_atoms = int(max_atoms)
    platforms = tuple(platforms)
    if not platforms or any(p not in PLATFORMS for p in platforms):
        raise ValueError(f"platforms must be some of {PLATFORMS}, got {platforms}")
    if cutoff is not None and not float(cutoff) > 0:
        raise ValueError(f"cutoff must be positive, got {cutoff}")
    source = None
    if isinstance(potential, (str, Path)):
        from mpattn.train.runs import load_run

        source = str(potential)
        potential = load_run(potential, which=which)
        if not isinstance(potential, Potential):
            raise ValueError(f"{source} is a property model's run, not a potential's: only "
                             "potentials (energy and forces) can be exported")
    if not isinstance(potential, Potential):
        raise TypeError(f"export_potential needs an mpattn Potential, got {type(potential)}")
    if cutoff is None:
        config = getattr(potential.model, "config", None)
        cutoff = getattr(config, "graph_cutoff", getattr(config, "cutoff", None))
        if cutoff is None:
            raise ValueError("the potential's model has no config.cutoff: pass cutoff=")
    if dtype is None:
        floats = [x for x in jax.tree.leaves(nnx.state(potential, nnx.Param))
                  if jnp.issubdtype(x.dtype, jnp.floating)]
        dtype = floats[0].dtype if floats else jnp.float32
    dtype = jnp.dtype(dtype)
    if dtype == jnp.float64 and not jax.config.jax_enable_x64:
        raise ValueError("dtype float64 needs jax.config.update('jax_enable_x64', True) "
                         "(the CLI's --x64)")
    f = _pure_function(potential, max_atoms=max_atoms, cutoff=float(cutoff), dtype=dtype)
    avals = (jax.ShapeDtypeStruct((max_atoms,), jnp.int32),
             jax.ShapeDtypeStruct((max_atoms, 3), dtype), jax.ShapeDtypeStruct((3, 3), dtype))
    exported = jax.export.export(jax.jit(f), platforms=platforms)(*avals)
    try:
        blob = exported.serialize()
    except ImportError as err:  # jax's serializer needs the flatbuffers package
        raise ImportError(f"{err} (pip install flatbuffers)") from err
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(blob))
    meta = _metadata(potential, max_atoms, float(cutoff), dtype.name, platforms, source)
    meta["bytes"] = len(blob)
    Path(str(path) + ".json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    return meta


def _metadata(potential, max_atoms, cutoff, dtype, platforms, source) -> dict:
    import jax

    from mpattn import __version__
    from mpattn.elements import symbols

    elements = [int(e) for e in potential.elements]
    return {
        "format": "mpattn-export/1", "mpattn_version": __version__,
        "jax_version": jax.__version__, "source": source,
        "model": type(potential.model).__name__, "elements": elements,
        "symbols": list(symbols(elements)), "cutoff": cutoff, "max_atoms": max_atoms,
        "dtype": dtype, "platforms": list(platforms), "units": UNITS,
        "reference_energies": dict(zip(symbols(elements),
                                       potential.reference.energies.tolist(), strict=True)),
        "inputs": [_io("z", "int32", [max_atoms], "atomic numbers; 0: no atom (padding), "
                       "after all real atoms"),
                   _io("positions", dtype, [max_atoms, 3], "Å"),
                   _io("cell", dtype, [3, 3], "Å; lattice vectors as rows, periodic in 3 "
                       "directions with minimum image (cutoff < half the smallest "
                       "perpendicular width); zeros: a molecule")],
        "outputs": [_io("energy", dtype, [], "eV, per-element reference included"),
                    _io("forces", dtype, [max_atoms, 3], "eV/Å, zero for padding slots"),
                    _io("stress", dtype, [3, 3], "eV/Å³, (1/V) dE/dstrain with ASE's sign; "
                        "zero for a zero cell")],
        "invalid_inputs": "NaN outputs (unknown element, real atom after padding, cell too "
                          "small for the cutoff)",
    }


def _io(name, dtype, shape, doc) -> dict:
    return {"name": name, "dtype": dtype, "shape": shape, "doc": doc}


class ExportedPotential:
    """A loaded artefact with eager input checks (needs only jax and numpy).

    Attributes:
        exported: the ``jax.export.Exported``.
        metadata: the sidecar's dict, or ``None`` when there is none (then elements and the
            cell are left to the artefact, which returns NaN for invalid inputs).
        max_atoms: atom slots; ``dtype``: numpy dtype of positions and cell.
    """

    def __init__(self, exported, metadata: dict | None = None):
        self.exported = exported
        self.metadata = metadata
        self.max_atoms = int(exported.in_avals[0].shape[0])
        self.dtype = np.dtype(exported.in_avals[1].dtype)

    def __call__(self, z, positions=None, cell=None) -> dict:
        """``{"energy": float, "forces": [n, 3], "stress": [3, 3]}`` (float64 numpy) of ``n``
        atoms (padded here to ``max_atoms``); ``z`` may be an ``ase.Atoms`` (its cell used
        when periodic in all three directions). ``cell=None``: a molecule.

        Raises:
            ValueError: too many atoms, a real atom after a ``z == 0`` one, an element
                unknown to the potential, a cell too small for the cutoff.
        """
        import jax

        if hasattr(z, "get_atomic_numbers"):
            atoms = z
            z, positions = atoms.get_atomic_numbers(), atoms.get_positions()
            cell = np.asarray(atoms.get_cell()) if np.all(atoms.get_pbc()) else None
        z = np.asarray(z).reshape(-1)
        n = len(z)
        positions = np.asarray(positions, np.float64)
        if n > self.max_atoms or positions.shape != (n, 3):
            raise ValueError(f"{n} atoms (positions {positions.shape}) for an artefact of "
                             f"max_atoms={self.max_atoms}")
        if np.any(z < 0) or np.any(np.diff((z > 0).astype(int)) > 0):
            raise ValueError("atomic numbers must be >= 0, with the absent atoms (z = 0) "
                             "after all real ones")
        meta = self.metadata or {}
        if "elements" in meta:
            unknown = sorted(set(z[z > 0].tolist()) - set(meta["elements"]))
            if unknown:
                raise ValueError(f"element(s) Z={unknown} unknown to this potential, which "
                                 f"knows {meta.get('symbols', meta['elements'])}")
        cell = np.zeros((3, 3)) if cell is None else np.asarray(cell, np.float64)
        if "cutoff" in meta:
            check_cell(cell, meta["cutoff"])
        if self.dtype == np.float64 and not jax.config.jax_enable_x64:
            raise ValueError("a float64 artefact needs jax.config.update('jax_enable_x64', "
                             "True) first")
        zz = np.zeros(self.max_atoms, np.int32)
        zz[:n] = z
        pos = np.zeros((self.max_atoms, 3), self.dtype)
        pos[:n] = positions
        energy, forces, stress = self.exported.call(zz, pos, cell.astype(self.dtype))
        return {"energy": float(energy), "forces": np.asarray(forces, np.float64)[:n],
                "stress": np.asarray(stress, np.float64)}


def load_exported(path) -> ExportedPotential:
    """The artefact at ``path`` (and its sidecar ``path + ".json"`` when present), callable
    as :meth:`ExportedPotential.__call__`. Uses only jax and numpy."""
    import jax

    path = Path(path)
    exported = jax.export.deserialize(bytearray(path.read_bytes()))
    side = Path(str(path) + ".json")
    return ExportedPotential(exported, json.loads(side.read_text()) if side.is_file() else None)


def main(argv=None) -> int:
    """``python -m mpattn.export WORKDIR OUT --max-atoms N``: 0 on success, 2 on bad input."""
    p = argparse.ArgumentParser(prog="python -m mpattn.export", description=(
        "Export a trained potential run as a jax.export artefact (energy, forces, stress)."))
    p.add_argument("workdir", help="a potential training run's folder")
    p.add_argument("out", help="the artefact's file (metadata in OUT.json)")
    p.add_argument("--max-atoms", type=int, required=True, help="atom slots of the function")
    p.add_argument("--which", choices=("best", "latest"), default="best")
    p.add_argument("--cutoff", type=float, help="radius, Å (default the model's)")
    p.add_argument("--x64", action="store_true", help="float64 artefact (callers need x64)")
    p.add_argument("--platforms", default="cpu,cuda", help="comma-separated (cpu,cuda)")
    args = p.parse_args(argv)
    platforms = tuple(s.strip() for s in args.platforms.split(",") if s.strip())
    try:
        if args.max_atoms < 1:  # before loading the run
            raise ValueError(f"--max-atoms must be at least 1, got {args.max_atoms}")
        import jax

        prev = jax.config.read("jax_enable_x64")
        jax.config.update("jax_enable_x64", prev or args.x64)
        try:  # restored: main() may run inside a bigger program (tests)
            meta = export_potential(args.workdir, args.out, max_atoms=args.max_atoms,
                                    cutoff=args.cutoff, which=args.which, platforms=platforms,
                                    dtype="float64" if args.x64 else None)
        finally:
            jax.config.update("jax_enable_x64", prev)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({meta['bytes']:,} bytes; {meta['dtype']}, max_atoms "
          f"{meta['max_atoms']}, cutoff {meta['cutoff']} Å, elements "
          f"{','.join(meta['symbols'])}, platforms {','.join(meta['platforms'])}) and "
          f"{args.out}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
