"""Transparent huge pages for XLA:CPU's per-step buffers, through glibc's malloc tunable.

XLA:CPU allocates each execution's temporaries afresh (1.6 GB per train step on the `small`
benchmark shape) with malloc, which maps them anew every step; faulting them in 4 KiB pages
cost ~390,000 page faults and 8 % of the step (benchmarks/NOTES.md, change 8). glibc >= 2.35
puts large blocks on transparent huge pages when `GLIBC_TUNABLES` holds
`glibc.malloc.hugetlb=1`, but reads it only at process start: so the CLI re-executes itself once
with it set. Nothing changes where it is already set, on other C libraries or kernels without
transparent huge pages, or with `MAXLM_HUGE_PAGES=0`.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

TUNABLE = "glibc.malloc.hugetlb"
OPT_OUT = "MAXLM_HUGE_PAGES"
THP_MODES = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def wanted(environ: dict[str, str] | os._Environ[str] = os.environ) -> bool:
    """Whether this process should restart with huge-page malloc."""
    if environ.get(OPT_OUT) == "0" or TUNABLE in environ.get("GLIBC_TUNABLES", ""):
        return False
    libc, version = platform.libc_ver()
    if sys.platform != "linux" or libc != "glibc":
        return False
    major_minor = version.split(".")[:2]
    if not all(part.isdigit() for part in major_minor) or tuple(map(int, major_minor)) < (2, 35):
        return False
    try:
        return "[never]" not in THP_MODES.read_text()
    except OSError:
        return False


def tunables(environ: dict[str, str] | os._Environ[str] = os.environ) -> str:
    """GLIBC_TUNABLES with huge-page malloc added to whatever the user set."""
    return ":".join(filter(None, [environ.get("GLIBC_TUNABLES", ""), f"{TUNABLE}=1"]))


def environment(environ: dict[str, str] | os._Environ[str] = os.environ) -> dict[str, str]:
    """A copy of `environ` with huge-page malloc added when `wanted`: what a child process
    needs to start as `python -m maxlm.train` would restart itself."""
    return {**environ, "GLIBC_TUNABLES": tunables(environ)} if wanted(environ) else dict(environ)


def restart_with_huge_pages() -> None:
    """Re-execute this command (same pid, arguments and environment) with huge-page malloc,
    when `wanted`; returns only when not."""
    if not wanted():
        return
    os.environ["GLIBC_TUNABLES"] = tunables()
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
