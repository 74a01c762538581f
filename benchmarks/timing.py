"""Timing, and argument types, shared by the benchmarks."""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable

import numpy as np


def count(text: str) -> int:
    """argparse `type` of a count (--iters, --batch, --steps): an integer >= 1, else argparse's
    usage error naming the flag, before the benchmark builds and converts its models
    (`--iters=0` failed after them, in statistics.median)."""
    value = int(text)  # argparse reports a ValueError as "invalid count value"
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def name_list(allowed) -> Callable[[str], list[str]]:
    """argparse `type` of a comma-separated list of names from `allowed` ("tiny,full" ->
    ["tiny", "full"]); a name not among them is a usage error naming it, before the
    benchmark runs the names before it."""
    def parse(text: str) -> list[str]:
        names = text.split(",")
        unknown = [name for name in names if name not in allowed]
        if unknown:
            raise argparse.ArgumentTypeError(f"{unknown} are not among {sorted(allowed)}")
        return names

    return parse


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


def print_rows_apart_against_left_split(ways: dict, call, iters: int, per_call: int, unit: str) -> None:
    """`call(way)` -> outputs, for the two `ways` of running on a mesh ("rows apart",
    "weights left split"): exits unless their outputs are equal, then prints each way's
    median seconds a call (`median_seconds`) and `unit`/s (`per_call` of them a call),
    and the rows-apart way's speed over the other's."""
    outputs = [call(way) for way in ways.values()]
    if not np.array_equal(*outputs):
        raise SystemExit(f"the two ways gave different {unit}")
    seconds = {name: median_seconds(lambda way=way: call(way), iters) for name, way in ways.items()}
    for name, s in seconds.items():
        print(f"  {name:>18}: {s:.3f} s a call, {per_call / s:.1f} {unit}/s")
    print(f"  rows apart: {seconds['weights left split'] / seconds['rows apart']:.2f}x the {unit}/s")


def torch_threads_as_xla() -> int:
    """Gives torch as many intra-op threads as XLA:CPU runs, one per CPU this process
    may run on (torch's default counts physical cores: half as many on SMT CPUs, and
    OMP_NUM_THREADS, which XLA ignores), and returns the count."""
    import torch

    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(threads)
    return threads
