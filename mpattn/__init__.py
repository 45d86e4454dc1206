"""mpattn: message-passing neural networks with multi-head attention for molecules (JAX/Flax).

The package is importable without JAX being initialised: submodules are imported on demand,
and ``mpattn.load_predictor`` / ``mpattn.load_ensemble`` import JAX only on first use.
"""

__version__ = "0.1.0.dev0"

__all__ = ["__version__", "load_ensemble", "load_predictor"]


def __getattr__(name: str):
    """Lazy attributes: ``mpattn.load_predictor``, ``mpattn.load_ensemble`` (see
    :mod:`mpattn.predict`)."""
    if name in ("load_predictor", "load_ensemble"):
        from mpattn import predict

        return getattr(predict, name)
    raise AttributeError(f"module 'mpattn' has no attribute {name!r}")
