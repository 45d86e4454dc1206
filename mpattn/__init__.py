"""mpattn: message-passing neural networks with multi-head attention for molecules (JAX/Flax).

The package is importable without JAX being initialised: submodules are imported on demand,
and ``mpattn.load_predictor`` imports JAX only on first use.
"""

__version__ = "0.1.0.dev0"

__all__ = ["__version__", "load_predictor"]


def __getattr__(name: str):
    """Lazy attributes: ``mpattn.load_predictor`` (see :mod:`mpattn.predict`)."""
    if name == "load_predictor":
        from mpattn.predict import load_predictor

        return load_predictor
    raise AttributeError(f"module 'mpattn' has no attribute {name!r}")
