"""Models, selectable by name through one registry.

>>> from flax import nnx
>>> from mpattn.models import create_model
>>> model = create_model("mhmp", rngs=nnx.Rngs(0), dim=64)   # config fields as overrides

Names: ``attention`` (the default: multi-head attention over the pairs within a cutoff with a
smooth envelope, :mod:`mpattn.models.attention`), ``mhmp`` (the thesis' MultiHead-Message
Passing), ``mhmp_pe`` (the same with a positional encoding of the atom index: not permutation
invariant), ``mpnn`` (Gilmer et al. 2017), ``schnet`` (Schütt et al. 2017), ``so3krates``
(equivariant attention with spherical-harmonic coordinates up to degree 3, Frank et al. 2022,
:mod:`mpattn.models.so3krates`). Every model maps
a padded ``jraph.GraphsTuple`` to one mapping of named outputs, ``{"energy": [num_graphs],
"per_atom": [num_nodes], ...}`` (docs/design.md, "Output contract"); a model's class defaults
are the settings it is trained with.
"""

from __future__ import annotations

import dataclasses

from flax import nnx

from mpattn.models.attention import AttentionConfig, AttentionModel
from mpattn.models.mhmp import MHMP, MHMPConfig
from mpattn.models.mpnn import MPNN, MPNNConfig
from mpattn.models.schnet import SchNet, SchNetConfig
from mpattn.models.so3krates import So3krates, So3kratesConfig

__all__ = [
    "AttentionConfig",
    "AttentionModel",
    "MHMP",
    "MODELS",
    "MPNN",
    "MHMPConfig",
    "MPNNConfig",
    "SchNet",
    "SchNetConfig",
    "So3krates",
    "So3kratesConfig",
    "create_model",
    "default_config",
    "model_names",
    "register_model",
]

#: name -> (model class, default config)
MODELS: dict[str, tuple[type, object]] = {
    "attention": (AttentionModel, AttentionConfig()),
    "mhmp": (MHMP, MHMPConfig()),
    "mhmp_pe": (MHMP, MHMPConfig(positional_encoding=True)),
    "mpnn": (MPNN, MPNNConfig()),
    "schnet": (SchNet, SchNetConfig()),
    "so3krates": (So3krates, So3kratesConfig()),
}
_BUILTIN = frozenset(MODELS)


def register_model(name: str, cls: type, config) -> None:
    """Make a model of your own available by name to the trainer, ``mpattn.load_run`` and the
    experiments' ``--model``: ``cls(config, rngs=...)`` must build it, ``config`` is its
    default config (a dataclass), and ``model(graph)`` must return the output mapping
    (docs/design.md). Register it again before loading a trained workdir.

    Raises:
        ValueError: ``name`` is taken by a built-in model, or ``config`` is not a dataclass.
    """
    if name in _BUILTIN:
        raise ValueError(f"{name!r} is a built-in model; choose another name")
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise ValueError(f"register_model({name!r}): config must be a dataclass instance, "
                         f"got {config!r}")
    MODELS[name] = (cls, config)


def model_names() -> list[str]:
    """The registered model names."""
    return list(MODELS)


def default_config(name: str, **overrides):
    """The default config of model ``name`` with ``overrides`` applied (typed fields)."""
    if name not in MODELS:
        hint = " (renamed 'attention')" if name == "attention_potential" else ""
        raise ValueError(f"unknown model {name!r}{hint}; choose from {model_names()}")
    config = MODELS[name][1]
    fields = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"{name}: unknown config field(s) {unknown}; fields: {sorted(fields)}")
    return dataclasses.replace(config, **overrides)


def create_model(name: str, *, rngs: nnx.Rngs, config=None, **overrides) -> nnx.Module:
    """Build model ``name`` from ``config`` (default: its default config) plus ``overrides``."""
    if config is None or name not in MODELS:
        config = default_config(name, **overrides)  # unknown names raise here
    elif overrides:
        config = dataclasses.replace(config, **overrides)
    return MODELS[name][0](config, rngs=rngs)
