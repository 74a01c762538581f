"""launch/local_multiprocess.sh with a stand-in `python` on PATH: when one process
fails, the others are killed at once and the script exits with its status (they used
to wait in their next collective until JAX's coordination timeout)."""

import os
import subprocess
import sys
import time

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "launch", "local_multiprocess.sh")

# Records its pid, then exits a second later with the status EXIT_<process id> gives
# (so that the others have started), or without one waits ten minutes.
STAND_IN = """#!/usr/bin/env bash
for arg in "$@"; do
  case $arg in --process_id=*) id=${arg#--process_id=} ;; esac
done
echo $$ > "$PIDS/$id"
status_var=EXIT_$id
if [ -n "${!status_var:-}" ]; then sleep 1; exit "${!status_var}"; fi
exec sleep 600
"""


# Sourced by every bash the test starts (BASH_ENV): `kill` also writes its arguments to $KILL_LOG.
LOGGED_KILL = 'kill() { echo "$*" >> "$KILL_LOG"; builtin kill "$@"; }\n'


def _launch(tmp_path, n: int, **exit_statuses) -> tuple[subprocess.CompletedProcess, float]:
    bin_dir, pids = tmp_path / "bin", tmp_path / "pids"
    bin_dir.mkdir()
    pids.mkdir()
    (bin_dir / "python").write_text(STAND_IN)
    (bin_dir / "python").chmod(0o755)
    (tmp_path / "logged_kill.sh").write_text(LOGGED_KILL)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PIDS": str(pids), **exit_statuses,
           "BASH_ENV": str(tmp_path / "logged_kill.sh"), "KILL_LOG": str(tmp_path / "kill.log")}
    start = time.perf_counter()
    done = subprocess.run(["bash", SCRIPT, str(n)], env=env, capture_output=True, text=True, timeout=60)
    return done, time.perf_counter() - start


def _signalled(tmp_path) -> set[int]:
    """The process ids the script passed to `kill`."""
    log = tmp_path / "kill.log"
    return {int(word) for word in log.read_text().split() if word.isdigit()} if log.exists() else set()


def _running(pid: int) -> bool:
    """Whether `pid` runs (a killed process this container's init has not reaped yet is a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_one_failed_process_stops_the_others(tmp_path):
    done, seconds = _launch(tmp_path, 3, EXIT_1="3")
    assert done.returncode == 3, done.stderr
    assert "a process exited with status 3: stopping the others" in done.stderr
    assert seconds < 60  # the others' stand-ins wait 600 s
    waiting = [int((tmp_path / "pids" / str(i)).read_text()) for i in (0, 2)]
    time.sleep(0.5)
    assert not any(_running(pid) for pid in waiting)
    # the failed process was waited for: its id may be another process's by now
    assert _signalled(tmp_path) == set(waiting)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_processes_that_all_succeed_exit_0(tmp_path):
    done, _ = _launch(tmp_path, 2, EXIT_0="0", EXIT_1="0")
    assert done.returncode == 0, done.stderr
    assert not _signalled(tmp_path)  # every process was waited for: their ids may be others' by now
