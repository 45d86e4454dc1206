"""``--config FILE``: command-line options of an experiment kept in a TOML file.

A config file holds any of the experiment's options under their long names with ``_`` for
``-`` (``time_budget_min = 10``, ``lr = 3e-3``) and the model overrides as a
``[model_config]`` table. Every key is checked against the experiment's own parser before
anything runs: an unknown key, or a value of the wrong type or outside the choices, is an
error naming the file and the key. Options given on the command line win over the file.
Each run writes its resolved options to ``WORKDIR/config.toml`` (:func:`write_config`), so
``--config WORKDIR/config.toml`` repeats it. Read with the standard library's ``tomllib``.
"""

from __future__ import annotations

import argparse
import json
import math
import tomllib
from pathlib import Path

__all__ = ["CONFIG_NAME", "parse_with_config", "write_config"]

CONFIG_NAME = "config.toml"
#: options that describe one invocation, not a run's settings: never read from or written
#: to a config file
NOT_IN_FILE = frozenset({"config", "help", "resume", "no_progress", "distributed",
                         "coordinator", "num_processes", "process_id"})


def _actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.dest not in NOT_IN_FILE}


def _checked(path: Path, key: str, value, action: argparse.Action):
    """``value`` as the option would parse it; ValueError naming the file and key."""
    where = f"{path}: {key} = {value!r}"
    if key == "model_config":
        if not isinstance(value, dict):
            raise ValueError(f"{where}: model_config must be a table ([model_config])")
        return json.dumps(value)
    if isinstance(value, dict):
        raise ValueError(f"{where}: a table where the option takes one value")
    if action.nargs == 0:  # store_true
        if not isinstance(value, bool):
            raise ValueError(f"{where}: must be true or false")
        return value
    if isinstance(value, bool) and action.type is not None:
        raise ValueError(f"{where}: must be a {action.type.__name__}, not a boolean")
    if action.type is None and not isinstance(value, str):
        raise ValueError(f"{where}: must be a string")
    if action.type is int and not isinstance(value, int):
        raise ValueError(f"{where}: must be an integer")
    if action.type is not None:
        try:
            value = action.type(value)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where}: {err}") from None
    if action.choices is not None and value not in action.choices:
        raise ValueError(f"{where}: choose one of {', '.join(map(str, action.choices))}")
    return value


def read_config(path, parser: argparse.ArgumentParser) -> dict:
    """The options of a TOML config file, checked against ``parser``."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--config {path}: no such file")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"--config {path}: not valid TOML: {err}") from None
    actions = _actions(parser)
    values = {}
    for key, value in raw.items():
        if key not in actions:
            near = [k for k in actions if k.split("_")[0] == key.split("_")[0]]
            hint = f" (did you mean {', '.join(near)}?)" if near else ""
            raise ValueError(f"{path}: unknown key {key!r}{hint}; the options of "
                             f"{parser.prog} are: {', '.join(sorted(actions))}")
        values[key] = _checked(path, key, value, actions[key])
    return values


def parse_with_config(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """``parser.parse_args(argv)`` with ``--config FILE`` (the parser must define it): the
    file's values become defaults, the command line wins. A bad file is a parser error
    (exit 2) naming the file and the key."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if known.config:
        try:
            parser.set_defaults(**read_config(known.config, parser))
        except ValueError as err:
            parser.error(str(err))
    return parser.parse_args(argv)


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return {math.inf: "inf", -math.inf: "-inf"}.get(value, "nan")
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string is a JSON string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} {value!r} to TOML")


def write_config(path, options: dict, *, header: str = "") -> Path:
    """Writes ``options`` (one value per option; ``None`` left out: the default applies;
    ``model_config`` as a JSON string or dict becomes the ``[model_config]`` table) as TOML
    that :func:`read_config` reads back."""
    lines = [f"# {line}" for line in header.splitlines()]
    model = {}
    for key, value in options.items():
        if key in NOT_IN_FILE or value is None:
            continue
        if key == "model_config":
            model = json.loads(value) if isinstance(value, str) else dict(value)
            continue
        lines.append(f"{key} = {_toml_value(value)}")
    if model:
        lines += ["", "[model_config]"]
        lines += [f"{k} = {_toml_value(v)}" for k, v in model.items() if v is not None]
    path = Path(path)
    path.write_text("\n".join(lines) + "\n")
    return path
