"""Process settings that make JAX faster on CPU hosts: huge pages for malloc.

XLA's CPU runtime allocates its buffers with ``malloc`` on every call of a compiled function,
and glibc hands large blocks back to the kernel when they are freed; the next call faults the
same amount of fresh memory in again, 4 KiB page by page: a large MD step can spend most of
its time in the kernel's page faults. Transparent huge pages for malloc
(``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``, glibc >= 2.35 with the kernel's THP in
``madvise`` or ``always`` mode) remove most of them; training steps run faster too
(docs/results.md, "Speed").

The tunable is read when a process starts, so :func:`restart_with_hugepages` re-executes the
running command (same PID, same arguments) once with it set. The command-line entry points
(``experiments.*``, ``benchmarks.*``, ``mpattn.predict``) call it first thing; in your own
scripts (an ASE MD loop, say) start Python with the variable set instead::

    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python md.py

``MPATTN_HUGEPAGES=0`` turns the restart off.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping
from pathlib import Path

__all__ = ["HUGETLB", "hugepage_env", "restart_with_hugepages"]

#: The glibc tunable that backs malloc's arenas and large blocks with transparent huge pages.
HUGETLB = "glibc.malloc.hugetlb=1"
_THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _glibc_at_least(version: str, need=(2, 35)) -> bool:
    try:
        return tuple(int(p) for p in version.split(".")[:2]) >= need
    except ValueError:
        return False


def _thp_mode(path: Path = _THP) -> str | None:
    """The kernel's selected THP mode (``always``/``madvise``/``never``), None if unknown."""
    try:
        text = path.read_text()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def hugepage_env(environ: Mapping[str, str], *, system: str | None = None,
                 libc: tuple[str, str] | None = None,
                 thp: str | None = "unknown") -> dict[str, str] | None:
    """The environment to restart with for huge-page malloc, or None where it would not help.

    None when: ``MPATTN_HUGEPAGES=0``; the tunable is already in ``GLIBC_TUNABLES``; not Linux;
    not glibc >= 2.35 (musl, older glibc ignore it); the kernel's THP mode is ``never``.
    ``system``, ``libc`` and ``thp`` default to this machine's (arguments for tests).
    """
    if environ.get("MPATTN_HUGEPAGES", "1").strip() in ("0", "false", "no", "off"):
        return None
    tunables = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in tunables:
        return None
    if (system or platform.system()) != "Linux":
        return None
    name, version = libc or platform.libc_ver()
    if name != "glibc" or not _glibc_at_least(version):
        return None
    if (_thp_mode() if thp == "unknown" else thp) == "never":
        return None
    env = dict(environ)
    env["GLIBC_TUNABLES"] = f"{tunables}:{HUGETLB}" if tunables else HUGETLB
    return env


def restart_with_hugepages(*, quiet: bool = False) -> None:
    """Re-execute this process with :data:`HUGETLB` set, once; returns if not needed.

    Call it before any work (the process image is replaced: nothing after the call runs in
    this one). It does nothing where :func:`hugepage_env` returns None or where the original
    command line is unknown.
    """
    env = hugepage_env(os.environ)
    argv = getattr(sys, "orig_argv", None)
    if env is None or not argv:
        return
    if not quiet:
        print(f"mpattn: restarting with GLIBC_TUNABLES={env['GLIBC_TUNABLES']} (huge pages "
              "for XLA's CPU buffers: fewer page faults, faster steps; MPATTN_HUGEPAGES=0 "
              "skips this)", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os.execve(sys.executable, list(argv), env)
