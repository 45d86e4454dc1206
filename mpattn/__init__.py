"""mpattn: message-passing neural networks with multi-head attention for molecules (JAX/Flax).

The package is importable without JAX being initialised: submodules are imported on demand,
and the loaders below import JAX only on first use.

- ``mpattn.load_run(workdir)``: a trained run, as its task says: a property predictor
  (``ase.Atoms`` in, the target out) or a potential (for ``mpattn.ase.Calculator``).
- ``mpattn.load_ensemble([workdir, ...])``: several property runs as one predictor with a
  spread.
"""

__version__ = "0.1.0.dev0"

__all__ = ["__version__", "load_ensemble", "load_run"]


def __getattr__(name: str):
    """Lazy attributes: ``mpattn.load_run`` (:mod:`mpattn.train.runs`), ``mpattn.load_ensemble``
    (:mod:`mpattn.predict`)."""
    if name == "load_run":
        from mpattn.train.runs import load_run

        return load_run
    if name == "load_ensemble":
        from mpattn.predict import load_ensemble

        return load_ensemble
    raise AttributeError(f"module 'mpattn' has no attribute {name!r}")
