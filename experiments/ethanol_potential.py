"""The ethanol potential, kept as a name: ``python -m experiments.potential`` on the bundled
xTB ethanol set (rMD17 protocol: 950 / 50 / 1000 frames), workdir ``runs/ethanol``.

    python -m experiments.ethanol_potential [--train 950 --val 50] [any option of
        experiments.potential]

``--train``/``--val`` are the old names of ``--train-size``/``--val-size``; ``--data`` may
be a revised MD17 ``.npz`` as before.
"""

from __future__ import annotations

import sys

from experiments import potential

__all__ = ["main", "translate"]

_RENAMED = {"--train": "--train-size", "--val": "--val-size"}


def translate(argv: list[str]) -> list[str]:
    """The options as ``experiments.potential`` takes them (old names renamed; the ethanol
    workdir unless one is given)."""
    out = []
    for arg in argv:
        key, eq, value = arg.partition("=")
        out.append(_RENAMED.get(key, key) + eq + value)
    if not any(a == "--workdir" or a.startswith("--workdir=") for a in out):
        out += ["--workdir", "runs/ethanol"]
    return out


def main(argv: list[str] | None = None) -> int:
    return potential.main(translate(sys.argv[1:] if argv is None else list(argv)))


if __name__ == "__main__":
    from mpattn.runtime import restart_with_hugepages

    restart_with_hugepages()  # before any work: huge pages for XLA's CPU buffers
    sys.exit(main())
