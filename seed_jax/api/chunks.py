"""Runs a jitted function over a batch of any size in chunks of fixed size, results joined on the host."""

from __future__ import annotations

import jax
import numpy as np


def run_in_chunks(fn, inputs: tuple, batch_size: int):
    """Runs `fn(*chunk)` over chunks of `batch_size` rows of every array in `inputs`
    (the last chunk padded with copies of its first row, so one program serves all) and
    joins the results as numpy arrays. A batch smaller than `batch_size` runs as one
    chunk of the next power of two rows (at most `batch_size`): a compiled `fn` serves
    every batch with a few programs, not one per batch size. A chunk's outputs are copied to the host
    while the next chunk runs, so the device holds two chunks' outputs at most,
    whatever the batch."""
    n = inputs[0].shape[0]
    if n == 0:
        raise ValueError("inputs: the batch is empty")
    size = min(batch_size, 1 << (n - 1).bit_length())
    joined, pending = None, None
    for start in range(0, n, size):
        running = (start, fn(*_padded_chunk(inputs, start, size)))  # dispatched: runs while `pending` is copied
        if pending is not None:
            joined = _copy_to_host(joined, n, *pending)
        pending = running
    return _copy_to_host(joined, n, *pending)


def _padded_chunk(inputs: tuple, start: int, size: int) -> tuple:
    """Rows [start, start + size) of every array in `inputs`, past the end copies of the chunk's first row."""
    chunk = tuple(x[start:start + size] for x in inputs)
    missing = size - chunk[0].shape[0]
    return tuple(np.concatenate([x, np.repeat(x[:1], missing, axis=0)]) for x in chunk) if missing else chunk


def _copy_to_host(joined, n: int, start: int, outputs):
    """Copies a chunk's `outputs` (a pytree of arrays with leading chunk size) into
    rows `start`... of `joined` (numpy arrays of n rows, made at the first chunk),
    leaving out the padding rows; returns `joined`."""
    host = jax.device_get(outputs)
    if joined is None:
        joined = jax.tree.map(lambda x: np.empty((n, *x.shape[1:]), x.dtype), host)

    def copy(into, chunk):
        into[start:start + len(chunk)] = chunk[:n - start]

    jax.tree.map(copy, joined, host)
    return joined
