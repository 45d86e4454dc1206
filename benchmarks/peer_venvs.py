"""The peers' own virtual environments, and their workers run there.

A peer library that pins other versions of torch or JAX than ours never enters our
environment: :func:`ensure_venv` makes ``<root>/<peer>`` with the pinned requirements of
:data:`REQUIREMENTS` on first use (``python -m venv`` + ``pip install``; a marker file
records what it holds, so that later runs reuse it), and :func:`run_worker` runs a script
of ``benchmarks/peer_workers/`` with that venv's python and none of our environment
variables. The default root is ``~/.cache/mpattn/peer-venvs``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

__all__ = ["DEFAULT_ROOT", "REQUIREMENTS", "WORKERS", "ensure_venv", "run_worker",
           "worker_env"]

WORKERS = Path(__file__).resolve().parent / "peer_workers"
DEFAULT_ROOT = Path.home() / ".cache" / "mpattn" / "peer-venvs"

#: peer -> the pinned requirements of its venv (torch 2.13.0: the CPU build where the machine
#: has it on disk; schnetpack 2.1.1 is the newest for Python 3.11 and pins its own torch)
REQUIREMENTS: dict[str, list[str]] = {
    "mace": ["torch==2.13.0", "mace-torch==0.3.16"],
    "apax": ["apax==0.14.0"],
    "schnetpack": ["schnetpack==2.1.1"],
}


def ensure_venv(peer: str, root: Path = DEFAULT_ROOT, *, log=print, run=subprocess.run) -> Path:
    """The python of ``root/<peer>``, made unless its marker says it holds the requirements.

    Raises:
        KeyError: an unknown peer (the known ones named).
        subprocess.CalledProcessError: venv or pip failed (pip's own message above it).
    """
    if peer not in REQUIREMENTS:
        raise KeyError(f"unknown peer {peer!r}; known: {', '.join(REQUIREMENTS)}")
    requirements = REQUIREMENTS[peer]
    venv = Path(root) / peer
    python = venv / "bin" / "python"
    marker = venv / "mpattn-peer.json"
    if python.is_file() and marker.is_file() and \
            json.loads(marker.read_text()).get("requirements") == requirements:
        return python
    log(f"{peer}: making its virtual environment {venv} ({' '.join(requirements)})")
    if not python.is_file():
        run([sys.executable, "-m", "venv", str(venv)], check=True)
    run([str(python), "-m", "pip", "install", "-q", *requirements], check=True)
    marker.write_text(json.dumps({"requirements": requirements}) + "\n")
    return python


def worker_env(environ=None) -> dict:
    """The peer's environment: ours less what would steer its python or its malloc
    (``PYTHONPATH``, ``VIRTUAL_ENV``, our huge-page ``GLIBC_TUNABLES``)."""
    environ = os.environ if environ is None else environ
    return {k: v for k, v in environ.items()
            if k not in ("PYTHONPATH", "VIRTUAL_ENV", "GLIBC_TUNABLES")}


def run_worker(python: Path, script: str, args: list[str], out: Path, *, log=print) -> dict:
    """``python peer_workers/<script> *args`` run in ``out`` (paths in ``args`` must be
    absolute), its output in ``out/worker.log``; its ``out/report.json``.

    Raises:
        RuntimeError: the worker failed, with the end of its log.
    """
    cmd = [str(python), str(WORKERS / script), *map(str, args)]
    log(" ".join(cmd))
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "worker.log", "w") as fh:
        done = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=worker_env(),
                              cwd=out)  # what a library leaves in its cwd stays in out
    if done.returncode:
        tail = (out / "worker.log").read_text().splitlines()[-15:]
        raise RuntimeError(f"{script} failed ({done.returncode}); the end of "
                           f"{out / 'worker.log'}:\n" + "\n".join(tail))
    return json.loads((out / "report.json").read_text())
