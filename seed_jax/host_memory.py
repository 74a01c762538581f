"""Transparent huge pages for glibc's malloc, turned on by restarting the process.

XLA:CPU allocates each train step's temporary buffer afresh (267 MiB for the SEED-OPT
demo's step). glibc maps a block that large anew with mmap at every step, and the kernel
faults it in and zero-fills it 4 KiB page by page: 133 ms of system time in a 354 ms
SEED-OPT demo step. glibc 2.35 and later can advise the kernel to back such blocks with
2 MiB pages (the `glibc.malloc.hugetlb=1` tunable): 44 ms in a 316 ms step
(`python benchmarks/allocator.py`, docs/cpu_memory.md). glibc reads its tunables from GLIBC_TUNABLES when a
process starts, so `python -m seed_jax.main` restarts itself once with it set, before
JAX loads. It does so only where it helps: glibc >= 2.35 on a kernel whose transparent
huge pages are in `madvise` mode (in `always` mode the kernel uses them unasked, in
`never` not at all). A GLIBC_TUNABLES that already sets `glibc.malloc.hugetlb` is kept as
it is: `GLIBC_TUNABLES=glibc.malloc.hugetlb=0` turns this off.
"""

from __future__ import annotations

import os
import sys

TUNABLE = "glibc.malloc.hugetlb"
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"
FIRST_GLIBC_WITH_TUNABLE = (2, 35)


def glibc_version() -> tuple[int, int] | None:
    """(major, minor) of the C library this process runs on, None if it is not glibc."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
        major, minor = version.split(".")[:2]
        return (int(major), int(minor)) if name == "glibc" else None
    except (AttributeError, OSError, TypeError, ValueError):  # no confstr, or not a glibc answer
        return None


def thp_mode(path: str = THP_MODE_FILE) -> str | None:
    """The kernel's transparent huge page mode ("always", "madvise" or "never"; None if unknown)."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def huge_page_tunables(environ: dict[str, str], glibc: tuple[int, int] | None, mode: str | None) -> str | None:
    """The GLIBC_TUNABLES value to restart with, or None where a restart would not help
    (not glibc, too old a glibc, THP not in madvise mode, or the tunable already set)."""
    current = environ.get("GLIBC_TUNABLES", "")
    if glibc is None or glibc < FIRST_GLIBC_WITH_TUNABLE or mode != "madvise":
        return None
    if any(setting.split("=")[0] == TUNABLE for setting in current.split(":")):
        return None
    return ":".join(filter(None, [current, f"{TUNABLE}=1"]))


def restart_with_huge_pages() -> None:
    """Replaces this process (same pid, arguments and environment, GLIBC_TUNABLES added)
    when `huge_page_tunables` says that helps; returns otherwise. Call it first thing,
    before any thread or file is opened. Silent: main logs GLIBC_TUNABLES once it runs."""
    if sys.platform != "linux":
        return
    tunables = huge_page_tunables(dict(os.environ), glibc_version(), thp_mode())
    if tunables is None:
        return
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**os.environ, "GLIBC_TUNABLES": tunables})
    except OSError as error:  # the interpreter cannot be started again: go on as we are
        print(f"seed_jax: could not restart ({error}); going on without huge pages", file=sys.stderr, flush=True)
