"""mpattn.runtime: when the huge-page restart applies, and that it restarts exactly once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from mpattn.runtime import HUGETLB, _thp_mode, hugepage_env

LINUX = dict(system="Linux", libc=("glibc", "2.36"), thp="madvise")


def test_hugepage_env_adds_the_tunable_once_and_keeps_others():
    assert hugepage_env({}, **LINUX)["GLIBC_TUNABLES"] == HUGETLB
    env = hugepage_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "X": "1"}, **LINUX)
    assert env["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{HUGETLB}" and env["X"] == "1"
    assert hugepage_env(env, **LINUX) is None  # already set: no second restart


def test_hugepage_env_declines_where_it_would_not_help():
    assert hugepage_env({"MPATTN_HUGEPAGES": "0"}, **LINUX) is None
    assert hugepage_env({}, **{**LINUX, "system": "Darwin"}) is None
    assert hugepage_env({}, **{**LINUX, "libc": ("glibc", "2.31")}) is None  # tunable unknown
    assert hugepage_env({}, **{**LINUX, "libc": ("", "")}) is None  # musl and others
    assert hugepage_env({}, **{**LINUX, "thp": "never"}) is None
    assert hugepage_env({}, **{**LINUX, "thp": "always"}) is not None
    assert hugepage_env({}, **{**LINUX, "libc": ("glibc", "2.40")}) is not None


def test_thp_mode_reads_the_selected_mode(tmp_path):
    p = tmp_path / "enabled"
    p.write_text("always [madvise] never\n")
    assert _thp_mode(p) == "madvise"
    p.write_text("[always] madvise never\n")
    assert _thp_mode(p) == "always"
    assert _thp_mode(tmp_path / "missing") is None


CHILD = ("import os; from mpattn.runtime import restart_with_hugepages; "
         "restart_with_hugepages(); print('pid', os.getpid(), os.environ.get('GLIBC_TUNABLES'))")


def _run(env):
    root = Path(__file__).resolve().parents[1]
    return subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True,
                          env=env, cwd=root, timeout=60, check=True)


def test_restart_re_executes_once_with_the_tunable():
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "MPATTN_HUGEPAGES")}
    out = _run(env)
    if hugepage_env(env) is None:  # not a glibc >= 2.35 Linux with THP: nothing happens
        assert out.stdout.split()[2] == "None" and out.stderr == ""
    else:
        assert out.stdout.count("pid") == 1  # the code after the call ran once, restarted
        assert out.stdout.split()[2] == HUGETLB
        assert "restarting with GLIBC_TUNABLES=glibc.malloc.hugetlb=1" in out.stderr
    off = _run({**env, "MPATTN_HUGEPAGES": "0"})
    assert off.stdout.split()[2] == "None" and off.stderr == ""
