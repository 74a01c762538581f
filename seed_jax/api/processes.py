"""On a mesh that spans processes, every process must pass the same inputs: each computes
its own rows of a batch and gets the others' back, so inputs that differ would come back
as a mix of both. `check_same_on_every_process` compares them (one small collective)."""

from __future__ import annotations

import functools
import hashlib

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
    """int32 (2,): a 64-bit hash of `value`: an array's dtype, shape and contents, else its repr."""
    digest = hashlib.blake2b(digest_size=8)
    if isinstance(value, np.ndarray):
        digest.update(f"{value.dtype.str}{value.shape}".encode())
        digest.update(np.ascontiguousarray(value).view(np.uint8).reshape(-1).data)
    else:
        digest.update(repr(value).encode())
    return np.frombuffer(digest.digest(), np.int32)


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
