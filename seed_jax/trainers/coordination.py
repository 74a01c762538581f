"""What a run's processes agree on: when to stop (SIGTERM), and waiting for process 0's writes
(the final export and DONE.json)."""

from __future__ import annotations

import itertools
import os
import signal
from typing import Callable

import jax
import numpy as np
from absl import logging
from jax._src import distributed
from jax.experimental import multihost_utils

from seed_jax import weights
from seed_jax.data import records


# Calls of `Preemption.requested` in this process: every process makes the same calls
# (one per train step), so the count names the same step on all of them.
_steps_asked = itertools.count(1)


class Preemption:
    """Records SIGTERM (how SLURM and TPU maintenance announce preemption).

    With several processes, JAX's preemption service (on unless
    `jax_enable_preemption_service` is off) takes SIGTERM on whichever process gets it
    and brings every process to one agreed step without a collective per step; then no
    Python handler is installed, since it would take SIGTERM from the service."""

    def __init__(self):
        self._requested = False
        self._service = jax.process_count() > 1 and distributed.global_state.preemption_sync_manager is not None
        self._previous = None if self._service else signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: will checkpoint and exit")
        self._requested = True

    def requested(self, sync: bool) -> bool:
        """Whether to stop now; call it once per train step on every process. With
        several processes all stop at the same step: through the preemption service at
        any step, else (one collective) only when `sync` is True."""
        step = next(_steps_asked)
        if jax.process_count() == 1:
            return self._requested
        if self._service:
            if multihost_utils.reached_preemption_sync_point(step):
                logging.warning("preemption notice (SIGTERM on a process): all processes checkpoint and exit")
                return True
            return False
        return sync and bool(multihost_utils.process_allgather(np.asarray(self._requested)).any())

    def close(self):
        if not self._service:
            signal.signal(signal.SIGTERM, self._previous)


def on_process_0_while_all_wait(write: Callable[[], None]) -> None:
    """Calls `write()` (e.g. writing the run's export) on process 0 alone; every process
    returns once it is done. The others returned at once before: they exited, and JAX's
    distributed shutdown, which waits `shutdown_timeout_seconds` (300 s) for all
    processes to exit, then aborted every process, process 0 in the middle of a write
    that took longer (an export cut short, no DONE.json)."""
    if jax.process_index() == 0:
        write()
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("written_on_process_0")


def export_and_mark_done(workdir: str, out: str, steps: dict[str, int], write: Callable[[], None],
                         done: dict) -> None:
    """On process 0 while all wait: the run's export (`write()` to `out`, unless `out`
    holds one trained as far: `weights.write_unless_current`), then WORKDIR/DONE.json
    holding `done`, written when the export was or when DONE.json is missing: a run
    killed between its whole export and DONE.json finishes on its rerun (it wrote none
    then, the export being current). DONE.json is written whole (renamed into place), so
    a kill while writing it leaves none, not an empty one the rerun would keep."""
    done_path = os.path.join(workdir, "DONE.json")

    def write_both() -> None:
        if weights.write_unless_current(out, steps, write) or not os.path.exists(done_path):
            records.write_json(done_path, done)

    on_process_0_while_all_wait(write_both)
