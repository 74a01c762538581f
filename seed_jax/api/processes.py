"""On a mesh that spans processes, every process must pass the same inputs: each computes
its own rows of a batch and gets the others' back, so inputs that differ would come back
as a mix of both. `check_same_on_every_process` compares them (one small collective)."""

from __future__ import annotations

import functools
import zlib

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def check_same_on_every_process(mesh: Mesh | None, **values) -> None:
    """Raises a ValueError naming the first of `values` (numpy arrays, numbers, strings,
    None, and tuples or lists of them) that a process of `mesh` passed otherwise than the
    process of its first device; nothing runs for `mesh` None or within one process.
    Every process of `mesh` must call it with the same names."""
    if mesh is None:
        return
    devices = mesh.devices.reshape(-1)
    if len({d.process_index for d in devices}) < 2:
        return
    names = list(values)
    local = np.stack([fingerprint(values[name]) for name in names])  # (N, 2)
    every_device = fingerprints_of_every_device(local, Mesh(devices, ("devices",)))  # (devices, N, 2)
    for device, seen in zip(devices, every_device):
        differ = (seen != every_device[0]).any(axis=1)
        if differ.any():
            name = names[int(np.argmax(differ))]
            raise ValueError(
                f"{name}: process {device.process_index} passed other values than process "
                f"{devices[0].process_index}; on a mesh that spans processes every process makes the same calls "
                "with the same inputs (and seed), and gets every row back")


def fingerprint(value) -> np.ndarray:
    """int32 (2,): CRC-32 checksums of `value`'s description (an array's dtype and shape,
    else its repr) and of an array's contents. A difference goes unnoticed with odds of
    about 2**-32; CRC-32 reads a batch of pixels a few times as fast as a cryptographic
    hash, and the inputs compared are no adversary's."""
    if isinstance(value, np.ndarray):
        described = f"{value.dtype.str}{value.shape}"
        contents = zlib.crc32(np.ascontiguousarray(value).view(np.uint8).reshape(-1))
    else:
        described, contents = repr(value), 0
    return np.array([zlib.crc32(described.encode()), contents], np.uint32).view(np.int32)


def fingerprints_of_every_device(local: np.ndarray, mesh: Mesh) -> np.ndarray:
    """(devices,) + `local`'s shape: each device of the 1-D `mesh` contributes its process's
    `local`, and every process reads back all of them."""
    sharding = NamedSharding(mesh, PartitionSpec("devices"))
    rows = jax.make_array_from_callback((mesh.size, *local.shape), sharding, lambda index: local[None])
    return np.asarray(_replicate(mesh)(rows))


@functools.lru_cache(maxsize=None)
def _replicate(mesh: Mesh):
    """One compiled all-gather per mesh (and shape)."""
    return jax.jit(lambda x: x, out_shardings=NamedSharding(mesh, PartitionSpec()))
