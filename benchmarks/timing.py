"""Timing shared by the benchmarks."""

from __future__ import annotations

import os
import statistics
import time


def median_seconds(fn, iters: int) -> float:
    """Median wall time of `iters` calls of `fn`, after one warm-up call (compilation,
    allocator, autotuning)."""
    fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def torch_threads_as_xla() -> int:
    """Gives torch as many intra-op threads as XLA:CPU runs, one per CPU this process
    may run on (torch's default counts physical cores: half as many on SMT CPUs, and
    OMP_NUM_THREADS, which XLA ignores), and returns the count."""
    import torch

    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(threads)
    return threads
