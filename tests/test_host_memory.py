"""`python -m seed_jax.main` restarts itself with glibc's huge-page tunable where it helps."""

import os
import platform
import subprocess
import sys

import pytest

from seed_jax import host_memory

HUGE = f"{host_memory.TUNABLE}=1"


@pytest.mark.parametrize("environ, glibc, mode, expected", [
    ({}, (2, 36), "madvise", HUGE),
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, (2, 35), "madvise", f"glibc.malloc.arena_max=2:{HUGE}"),
    ({"GLIBC_TUNABLES": ""}, (3, 0), "madvise", HUGE),
    # the caller's own setting of the tunable is kept: =0 turns the restart off
    ({"GLIBC_TUNABLES": f"{host_memory.TUNABLE}=0"}, (2, 36), "madvise", None),
    ({"GLIBC_TUNABLES": f"glibc.malloc.arena_max=2:{host_memory.TUNABLE}=2"}, (2, 36), "madvise", None),
    ({}, (2, 34), "madvise", None),  # the tunable came with glibc 2.35
    ({}, None, "madvise", None),  # another C library
    ({}, (2, 36), "always", None),  # the kernel backs large blocks with huge pages unasked
    ({}, (2, 36), "never", None),
    ({}, (2, 36), None, None),  # no transparent huge pages in this kernel
])
def test_the_restart_adds_the_tunable_only_where_it_helps(environ, glibc, mode, expected):
    assert host_memory.huge_page_tunables(environ, glibc, mode) == expected


@pytest.mark.parametrize("text, mode", [("always [madvise] never\n", "madvise"), ("[always] madvise never\n", "always"),
                                        ("always madvise [never]\n", "never"), ("", None)])
def test_the_kernels_huge_page_mode_is_the_bracketed_word(tmp_path, text, mode):
    path = tmp_path / "enabled"
    path.write_text(text)
    assert host_memory.thp_mode(str(path)) == mode
    assert host_memory.thp_mode(str(tmp_path / "missing")) is None


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="reads glibc's version")
def test_the_glibc_version_is_the_one_this_python_runs_on():
    major, minor = platform.libc_ver()[1].split(".")[:2]
    assert host_memory.glibc_version() == (int(major), int(minor))


_PRINTS_ITS_PID_AND_TUNABLES = """
from seed_jax import host_memory
host_memory.restart_with_huge_pages()
import os, sys
print(os.getpid(), os.environ.get("GLIBC_TUNABLES"), *sys.argv[1:])
"""


@pytest.mark.parametrize("tunables", [None, f"{host_memory.TUNABLE}=0", "glibc.malloc.arena_max=2"])
def test_a_process_restarts_as_itself_with_the_tunable_where_it_helps(repo_root, tunables):
    """On this machine's glibc and kernel, the restart happens or not as `huge_page_tunables`
    decides; a restarted process keeps its pid (a launcher waiting on it or sending it
    SIGTERM sees no change), its arguments and the rest of its environment."""
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    env.update({"PYTHONPATH": repo_root, **({"GLIBC_TUNABLES": tunables} if tunables is not None else {})})
    proc = subprocess.Popen([sys.executable, "-c", _PRINTS_ITS_PID_AND_TUNABLES, "--an=argument"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    restarted = (host_memory.huge_page_tunables(env, host_memory.glibc_version(), host_memory.thp_mode())
                 if sys.platform == "linux" else None)
    assert out.split() == [str(proc.pid), str(restarted or tunables), "--an=argument"]
