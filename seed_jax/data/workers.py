"""Work spread over spawned processes, results in input order: what the shard writers
(the shapes world, `make_records`) run their per-example work on."""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
from typing import Callable, Iterable, Iterator


def usable_cpus() -> int:
    """CPUs this process may run on (the shard writers' default worker count)."""
    if hasattr(os, "sched_getaffinity"):  # Linux; not macOS
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def chunks(items: Iterable, size: int) -> Iterator[list]:
    """`items` in lists of `size` (the last may be shorter)."""
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def map_in_order(fn: Callable, tasks: Iterable, num_workers: int) -> Iterator:
    """`fn(task)` for each of `tasks`, in order: in this process when `num_workers` <= 1,
    else on that many spawned processes (safe in a process that already runs threads,
    e.g. JAX's), at most 4 * num_workers tasks in flight so that memory stays flat
    however many there are. `fn` must pickle (a module-level function or a partial of one)."""
    if num_workers <= 1:
        yield from map(fn, tasks)
        return
    pool = concurrent.futures.ProcessPoolExecutor(num_workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        for window in chunks(tasks, 4 * num_workers):
            yield from pool.map(fn, window)
    finally:
        pool.shutdown(cancel_futures=True)
