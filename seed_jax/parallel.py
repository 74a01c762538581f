"""Device meshes and logical-axis sharding, all driven by config.

Model code names the axes of its parameters and activations logically (`embed`,
`mlp`, `heads`, `batch`, ...); a config names the mesh axes and the rules mapping
logical names to mesh axes. This module turns those into `NamedSharding`s.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axes. Batch is split over every data-parallel axis; weights
# are split over `fsdp` along their embedding dimension and over `tensor` along
# heads / MLP width.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("codes", None),
    ("layers", None),
    ("length", None),
    ("patch", None),
)

Rules = Sequence[tuple[str, Any]]


def make_mesh(axis_sizes: Mapping[str, int], devices: Sequence[Any] | None = None, field: str = "mesh") -> Mesh:
    """A mesh over `devices` (default: all) with axes in MESH_AXES order, laid out by
    `device_grid`.

    `axis_sizes` maps axis name to size; one size may be -1 to take the remaining
    devices. Errors name the config `field` that gave `axis_sizes`.
    """
    devices = list(jax.devices() if devices is None else devices)
    return Mesh(device_grid(axis_sizes, devices, field), MESH_AXES)


def device_grid(axis_sizes: Mapping[str, int], devices: Sequence[Any], field: str = "mesh") -> np.ndarray:
    """`devices` as an array of `mesh_shape(axis_sizes, ...)`'s shape, laid out by the
    hardware's topology (MESH_AXES run from the least to the most communicating):

    - TPU: jax's `mesh_utils.create_device_mesh` maps `tensor`, then `fsdp`, then `data`
      onto rings and planes of the ICI torus (splitting physical axes where it must). The
      devices of several slices (`slice_index`) form one such mesh per slice, the slices
      laid out along `data`, then `fsdp` (`create_hybrid_device_mesh` with the slice grid
      (gcd(data, slices), slices / that, 1)): `tensor` never crosses slices, and a mesh
      whose slices do not split so is refused naming `field`.
    - GPU: sorted by device id (XLA's topology-aware numbering across processes).
    - Anything else (CPU, stand-in objects): `devices` in their order, reshaped.
    """
    sizes = tuple(mesh_shape(axis_sizes, len(devices), field).values())
    platform = getattr(devices[0], "platform", None) if devices else None
    if platform not in ("tpu", "gpu"):
        return np.asarray(devices).reshape(sizes)
    slices = len({d.slice_index for d in devices}) if platform == "tpu" else 1
    dcn = _slice_grid(sizes, slices, field)
    try:
        if slices == 1:
            return mesh_utils.create_device_mesh(sizes, devices, allow_split_physical_axes=True)
        ici = tuple(size // n for size, n in zip(sizes, dcn))
        return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, allow_split_physical_axes=True)
    except (AssertionError, ValueError) as e:  # e.g. a part of a slice that is not a whole cuboid of chips
        raise ValueError(f"{field}: jax cannot lay out the mesh {dict(zip(MESH_AXES, sizes))} over these "
                         f"{len(devices)} {platform} devices ({e}); expected whole slices") from e


def _slice_grid(sizes: tuple[int, ...], slices: int, field: str) -> tuple[int, ...]:
    """How `slices` TPU slices split the MESH_AXES `sizes`: along `data` as far as it
    divides, the rest along `fsdp`, never `tensor`; else a ValueError naming `field`."""
    data, fsdp, _ = sizes
    along_data = math.gcd(data, slices)
    if fsdp % (slices // along_data):
        raise ValueError(f"{field}: {slices} TPU slices do not split the mesh {dict(zip(MESH_AXES, sizes))}: "
                         f"the slices are laid out along data, then fsdp (tensor never crosses slices); "
                         f"expected data a multiple of {slices}, or fsdp a multiple of {slices // along_data} "
                         f"(the slices left once data takes {along_data})")
    return along_data, slices // along_data, 1


def mesh_shape(axis_sizes: Mapping[str, int], num_devices: int, field: str = "mesh") -> dict[str, int]:
    """Every MESH_AXES axis -> its size on `num_devices` devices (`make_mesh`'s `axis_sizes`,
    a -1 filled), else a ValueError naming the config `field`."""
    unknown = set(axis_sizes) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"{field}: unknown axis {sorted(unknown)}; expected names from {MESH_AXES}")
    bad = {k: v for k, v in axis_sizes.items() if not (isinstance(v, (int, np.integer)) and (v >= 1 or v == -1))}
    if bad:
        raise ValueError(f"{field}: axis sizes {bad} must be positive integers (or -1 for the remaining devices)")
    sizes = [int(axis_sizes.get(name, 1)) for name in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"{field}: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            fixed = {name: size for name, size in zip(MESH_AXES, sizes) if size != -1}
            raise ValueError(f"{field}: {num_devices} devices do not divide by {known}, the product of the axis "
                             f"sizes {fixed} besides the -1 one ({MESH_AXES[sizes.index(-1)]}); expected sizes "
                             f"whose product divides {num_devices}")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(
            f"{field}: axis sizes {dict(zip(MESH_AXES, sizes))} need {math.prod(sizes)} devices, "
            f"{num_devices} are available")
    return dict(zip(MESH_AXES, sizes))


def check_rules(rules: Rules, field: str = "axis_rules") -> None:
    """Raises naming the config `field` unless `rules` are (logical name, target) pairs,
    each target None, a mesh axis or a tuple of mesh axes from MESH_AXES (a typo'd axis
    failed later as a bare KeyError)."""
    for rule in rules:
        ok = isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)
        target = rule[1] if ok else None
        axes = () if target is None else (target,) if isinstance(target, str) else target
        if not ok or not isinstance(axes, (tuple, list)) or any(a not in MESH_AXES for a in axes):
            raise ValueError(f"{field}: {rule!r} is not a (logical name, mesh axes) rule; expected the mesh axes "
                             f"None, a name or a tuple of names from {MESH_AXES}")


def _target_axes(target) -> tuple[str, ...]:
    """A rule's target (None, a mesh axis or a tuple of them) as a tuple of mesh axes."""
    return () if target is None else (target,) if isinstance(target, str) else tuple(target)


def _mesh_axes_for(logical: str | None, rules: Rules) -> tuple[str, ...]:
    if logical is None:
        return ()
    for name, target in rules:
        if name == logical:
            return _target_axes(target)
    return ()


def logical_to_mesh(logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: Rules) -> PartitionSpec:
    """Maps logical axis names to a mesh PartitionSpec for an array of `shape`.

    A dimension stays replicated where its size does not divide by the mesh axes'
    product, or where those mesh axes are already used by an earlier dimension.
    """
    if len(logical_axes) != len(shape):
        raise ValueError(f"logical axes {tuple(logical_axes)} do not match shape {tuple(shape)}")
    used: set[str] = set()
    spec = []
    for logical, size in zip(logical_axes, shape):
        axes = tuple(a for a in _mesh_axes_for(logical, rules) if a not in used and mesh.shape[a] > 1)
        if axes and size % math.prod(mesh.shape[a] for a in axes) == 0:
            used.update(axes)
            spec.append(axes[0] if len(axes) == 1 else axes)
        else:
            spec.append(None)
    return PartitionSpec(*spec)


def state_shardings(tree: Any, mesh: Mesh, rules: Rules):
    """Shardings for a pytree mixing nnx Variables (sharded by their logical
    `out_sharding` names) and plain arrays (replicated): parameters, optimizer
    state, train state. Returned as a prefix tree usable as jit in/out shardings."""

    def one(leaf):
        if isinstance(leaf, nnx.Variable):
            names = leaf.get_metadata().get("out_sharding") or (None,) * np.ndim(leaf.value)
            return NamedSharding(mesh, logical_to_mesh(names, np.shape(leaf.value), mesh, rules))
        return replicated(mesh)

    return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def rows_apart_rules(rules: Rules) -> tuple[tuple[str, Any], ...]:
    """`rules` without the mesh axes that split the batch in any rule but `batch`'s (by
    DEFAULT_RULES, weights are no longer split over fsdp): under them each device computes
    its own rows with no exchange along those axes, once the weights are gathered."""
    batch_axes = set(_mesh_axes_for("batch", rules))
    apart = []
    for name, target in rules:
        if name != "batch":
            axes = tuple(a for a in _target_axes(target) if a not in batch_axes)
            target = None if not axes else axes[0] if len(axes) == 1 else axes
        apart.append((name, target))
    return tuple(apart)


def rows_apart(fn, state, mesh: Mesh | None, rules: Rules, row_args: int = 1):
    """`fn(state, *rows, ...)` with each device computing its own rows: the first `row_args`
    arguments after `state` (leading axis: the batch) are split over the mesh axes of
    `rules`' batch, and `state` (split as `rules` split it) is gathered along those axes
    once, at the start (`rows_apart_rules`; by DEFAULT_RULES over fsdp, so that each device
    holds 1/tensor of the weights during the call). Left split, the weights make XLA choose
    the layout: decoding then has every layer of every one-token step exchange activations
    across devices (benchmarks/sharded_decoding.py times both), and a forward pass gathers
    each weight once either way. Rows that do not split evenly (a chunk of 4 rows over 8
    devices) are computed whole on every device. `fn` itself for `mesh` None."""
    if mesh is None:
        return fn
    rules = rows_apart_rules(rules)
    gathered = state_shardings(state, mesh, rules)

    @functools.wraps(fn)
    def apart(state, *args, **kwargs):
        with axis_rules(mesh, rules):  # the model's activation constraints follow the rows too
            state = jax.lax.with_sharding_constraint(state, gathered)
            rows = [constrain(x, ("batch",) + (None,) * (x.ndim - 1)) for x in args[:row_args]]
            return fn(state, *rows, *args[row_args:], **kwargs)

    return apart


def batch_sharding(mesh: Mesh, rules: Rules, ndim: int, batch_size: int) -> NamedSharding:
    """Sharding for an array whose leading axis is the batch."""
    shape = (batch_size,) + (1,) * (ndim - 1)
    return NamedSharding(mesh, logical_to_mesh(("batch",) + (None,) * (ndim - 1), shape, mesh, rules))


def check_batch_size(field: str, batch_size: int, mesh: Mesh, rules: Rules) -> None:
    """Raises naming the config `field` unless `batch_size` is an integer >= 1 (grain refused
    a negative one with a traceback once the model was built) that divides by the mesh axes
    the logical `batch` axis maps to (`data` x `fsdp` by DEFAULT_RULES): `logical_to_mesh`
    would leave such a batch replicated, every device computing all of it."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"{field}: expected an integer >= 1, got {batch_size!r}")
    axes = [a for a in _mesh_axes_for("batch", rules) if mesh.shape[a] > 1]
    size = math.prod(mesh.shape[a] for a in axes)
    if batch_size % size:
        raise ValueError(f"{field}: {batch_size} does not divide by {size}, the devices along the mesh axes "
                         f"{axes} that split the batch (mesh {dict(mesh.shape)}): every device would compute "
                         f"the whole batch; choose a multiple of {size}, or another mesh")


def axes_spanning_processes(processes: np.ndarray, axis_names: Sequence[str],
                            sharded: str | Sequence[str]) -> list[str]:
    """The mesh axes, other than `sharded`, along which the process changes
    (`processes`: the process index of each mesh position): for an array sharded over
    `sharded` alone, the devices holding one shard then belong to several processes."""
    sharded = (sharded,) if isinstance(sharded, str) else tuple(sharded)
    return [name for i, name in enumerate(axis_names)
            if name not in sharded and np.any(np.diff(processes, axis=i))]


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


_ACTIVE = contextvars.ContextVar("seed_jax_axis_rules", default=None)


@contextlib.contextmanager
def axis_rules(mesh: Mesh, rules: Rules):
    """Within this context, `constrain` pins activations to the mesh by logical names."""
    token = _ACTIVE.set((mesh, tuple(rules)))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint by logical axis names; a no-op outside `axis_rules`."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    spec = logical_to_mesh(logical_axes, x.shape, mesh, rules)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def top_k_by_row(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """`jax.lax.top_k(x, k)` of (B,N) `x`, whose rows `constrain(x, ("batch", None))` splits:
    within `axis_rules` each device takes its own rows' (XLA's partitioner would gather
    every row to every device first)."""
    active = _ACTIVE.get()
    if active is None:
        return jax.lax.top_k(x, k)
    mesh, rules = active
    rows = logical_to_mesh(("batch", None), x.shape, mesh, rules)
    return jax.shard_map(lambda x: tuple(jax.lax.top_k(x, k)), mesh=mesh, in_specs=rows, out_specs=(rows, rows))(x)
