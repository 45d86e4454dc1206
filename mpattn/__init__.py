"""mpattn: message-passing neural networks with multi-head attention for molecules (JAX/Flax).

The package is importable without JAX being initialised: submodules are imported on demand.
"""

__version__ = "0.1.0.dev0"

__all__ = ["__version__"]
