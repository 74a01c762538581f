"""This process's rows -> global arrays sharded over the mesh's batch axes, and back to every host."""

from __future__ import annotations

import functools

import jax
import numpy as np
from jax.experimental import multihost_utils

from seed_jax import parallel


def check_batch_sizes(config, batch_sizes: dict[str, int], prefix: str = "") -> None:
    """Raises naming the field (after `prefix`, e.g. "tokenizer." for a trainer's nested
    tokenizer config) unless `config.mesh` is a mesh of the devices, `config.axis_rules`
    name its axes (`parallel.check_rules`) and each of `batch_sizes` (config field ->
    global batch size) splits evenly over its batch axes (`parallel.check_batch_size`) and,
    with several processes, is one they can feed (`global_batch`'s check, before the run
    starts rather than at its first batch)."""
    mesh = parallel.make_mesh(config.mesh.to_dict(), field=f"{prefix}mesh")
    parallel.check_rules(config.axis_rules, f"{prefix}axis_rules")
    for field, size in batch_sizes.items():
        parallel.check_batch_size(f"{prefix}{field}", size, mesh, config.axis_rules)
        if jax.process_count() > 1:
            batch_axes = parallel.batch_sharding(mesh, config.axis_rules, 1, size).spec[0]
            _check_rows_per_process(mesh, batch_axes, size, f"{prefix}{field}")


def global_batch(local: dict[str, np.ndarray], mesh, rules) -> dict[str, jax.Array]:
    """This process's rows -> global arrays sharded on the batch axis."""
    def one(x):
        global_shape = (x.shape[0] * jax.process_count(), *x.shape[1:])
        sharding = parallel.batch_sharding(mesh, rules, x.ndim, global_shape[0])
        if jax.process_count() > 1:
            _check_rows_per_process(mesh, sharding.spec[0], global_shape[0])
        return jax.make_array_from_process_local_data(sharding, x, global_shape)

    return {k: one(v) for k, v in local.items()}


@functools.lru_cache  # once per mesh and batch layout, not every step
def _check_rows_per_process(mesh, batch_axes: str | tuple[str, ...] | None, global_size: int,
                            field: str = "batch_size / eval.batch_size") -> None:
    """Each process feeds rows of its own, so the devices holding one batch shard must
    belong to one process: the batch is sharded (over `batch_axes`), and no other mesh
    axis spans processes. Errors name the config `field` that gave `global_size`."""
    if batch_axes is None:
        raise ValueError(f"{field}: {global_size} is not sharded over mesh {dict(mesh.shape)} (its batch axes "
                         f"have size 1 or do not divide it), but {jax.process_count()} processes each feed rows "
                         f"of their own: choose {field} or the mesh accordingly")
    processes = np.vectorize(lambda d: d.process_index)(mesh.devices)
    spanning = parallel.axes_spanning_processes(processes, mesh.axis_names, batch_axes)
    if spanning:
        raise ValueError(
            f"mesh {dict(mesh.shape)}: axes {spanning} span processes but do not shard the batch, so processes "
            f"feeding different rows would share batch shards; expected the mesh axes other than {batch_axes} "
            f"to fit within one process's {jax.local_device_count()} devices")


def to_host(x: jax.Array) -> np.ndarray:
    """A global array gathered on every host as numpy."""
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
