"""Meshes from config and logical-to-mesh sharding rules."""

import dataclasses

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from helpers import assert_same_gradients, split_over_fsdp_and_tensor, stage_gradients
from seed_jax import parallel
from seed_jax.models.conv_layers import Conv


def test_make_mesh_fills_minus_one():
    mesh = parallel.make_mesh({"data": 2, "fsdp": -1})
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert (mesh.devices == np.asarray(jax.devices()).reshape(2, 4, 1)).all()  # CPU devices keep their order


def test_make_mesh_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown axis"):
        parallel.make_mesh({"model": 8})
    with pytest.raises(ValueError, match="need 6 devices"):
        parallel.make_mesh({"data": 2, "fsdp": 3})
    for sizes in ({"data": 0, "fsdp": -1}, {"data": -2, "fsdp": -4}, {"fsdp": 2.5, "data": -1}):
        with pytest.raises(ValueError, match="must be positive integers"):
            parallel.make_mesh(sizes)
    with pytest.raises(ValueError, match="at most one axis may be -1"):
        parallel.make_mesh({"data": -1, "fsdp": -1})
    with pytest.raises(ValueError, match=r"^tokenizer\.mesh: 8 devices do not divide by 3, the product of the axis "
                                         r"sizes \{'fsdp': 3, 'tensor': 1\} besides the -1 one \(data\)"):
        parallel.make_mesh({"data": -1, "fsdp": 3, "tensor": 1}, field="tokenizer.mesh")


@dataclasses.dataclass(frozen=True)
class FakeDevice:
    """A stand-in accelerator with the attributes jax's mesh_utils reads (as jax's own tests fake them)."""
    id: int
    process_index: int
    coords: tuple[int, int, int] = (0, 0, 0)
    slice_index: int = 0
    core_on_chip: int = 0
    platform: str = "tpu"
    device_kind: str = "TPU v4"


def _tpu_v4(x: int, y: int, z: int, slices: int = 1) -> list[FakeDevice]:
    """`slices` slices of x*y*z TPU v4 chips in jax.devices()' order (slice, z, y, x), a process per 4."""
    n = x * y * z
    return [FakeDevice(i, i // 4, (i % x, i // x % y, i // (x * y) % z), slice_index=i // n)
            for i in range(slices * n)]


def test_tpu_meshes_follow_the_torus_and_cpu_or_stand_in_devices_keep_their_order():
    """The mesh was jax.devices() reshaped, blind to the ICI torus; now jax's mesh_utils
    lays TPU devices out (tensor, then fsdp on rings/planes) and GPU devices by id."""
    from jax.experimental import mesh_utils

    devices = _tpu_v4(2, 2, 4)  # a v4-32: 16 chips, 4 hosts of 2x2 along z
    mesh = parallel.make_mesh({"data": 2, "fsdp": 4, "tensor": 2}, devices)
    expected = mesh_utils.create_device_mesh((2, 4, 2), devices, allow_split_physical_axes=True)
    assert (mesh.devices == expected).all()
    assert not (mesh.devices == np.asarray(devices).reshape(2, 4, 2)).all()
    processes = np.vectorize(lambda d: d.process_index)(mesh.devices)
    assert parallel.axes_spanning_processes(processes, parallel.MESH_AXES, ("data", "fsdp")) == []
    # 3 of a tray's 4 chips are no cuboid of the torus
    with pytest.raises(ValueError, match=r"^mesh: jax cannot lay out the mesh .* over these 3 tpu devices"):
        parallel.make_mesh({"data": -1}, devices[:3])
    gpus = [FakeDevice(i, i // 4, platform="gpu", device_kind="NVIDIA H100") for i in (4, 5, 6, 7, 0, 1, 2, 3)]
    assert [d.id for d in parallel.device_grid({"data": 2, "fsdp": 4}, gpus).flat] == list(range(8))
    stand_ins = [FakeDevice(i, 0, platform="cpu") for i in (3, 1, 2, 0)]
    assert (parallel.device_grid({"data": -1}, stand_ins).ravel() == np.asarray(stand_ins)).all()


def test_tpu_slices_are_laid_out_along_data_then_fsdp_never_tensor():
    from jax.experimental import mesh_utils

    devices = _tpu_v4(2, 2, 1, slices=2)

    def slices_change_along(axis_sizes):
        grid = parallel.device_grid(axis_sizes, devices, "tokenizer.mesh")
        return parallel.axes_spanning_processes(np.vectorize(lambda d: d.slice_index)(grid), parallel.MESH_AXES, ())

    assert slices_change_along({"data": 2, "fsdp": 2, "tensor": 2}) == ["data"]
    assert slices_change_along({"data": 4, "fsdp": 1, "tensor": 2}) == ["data"]
    assert slices_change_along({"data": 1, "fsdp": 4, "tensor": 2}) == ["fsdp"]
    grid = parallel.device_grid({"data": 2, "fsdp": 2, "tensor": 2}, devices)
    assert (grid[1] == mesh_utils.create_device_mesh((2, 2), devices[4:])).all()  # slice 1: one ICI mesh
    with pytest.raises(ValueError, match=r"^tokenizer\.mesh: 2 TPU slices do not split the mesh \{'data': 1, "
                                         r"'fsdp': 1, 'tensor': 8\}: .*tensor never crosses slices"):
        slices_change_along({"tensor": -1})


def test_logical_to_mesh_rules_and_fallbacks():
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    rules = parallel.DEFAULT_RULES
    assert parallel.logical_to_mesh(("embed", "mlp"), (64, 128), mesh, rules) == P("fsdp", "tensor")
    assert parallel.logical_to_mesh(("batch", None), (8, 3), mesh, rules) == P(("data", "fsdp"), None)
    # 33 does not divide by 2: replicated instead of failing
    assert parallel.logical_to_mesh(("vocab", "embed"), (33, 64), mesh, rules) == P(None, "fsdp")
    # a mesh axis is used once per array
    assert parallel.logical_to_mesh(("embed", "embed"), (64, 64), mesh, rules) == P("fsdp", None)


def test_rows_apart_rules_keep_the_batchs_axes_for_the_batch_alone():
    apart = dict(parallel.rows_apart_rules(parallel.DEFAULT_RULES))
    assert apart["batch"] == ("data", "fsdp") and apart["embed"] is None  # weights no longer split over fsdp
    assert apart["mlp"] == apart["heads"] == apart["vocab"] == "tensor"
    rules = [("batch", "data"), ("embed", ("data", "tensor")), ("mlp", ("fsdp", "data")), ("kv", None)]
    assert parallel.rows_apart_rules(rules) == (("batch", "data"), ("embed", "tensor"), ("mlp", "fsdp"), ("kv", None))


def test_constrain_is_noop_outside_rules_and_shards_inside():
    x = np.ones((8, 4), np.float32)
    assert parallel.constrain(x, ("batch", None)) is x
    mesh = parallel.make_mesh({"data": -1})

    @jax.jit
    def f(x):
        with parallel.axis_rules(mesh, parallel.DEFAULT_RULES):
            return parallel.constrain(x * 2, ("batch", None))

    assert f(x).sharding.spec[0] == "data"


def test_axes_spanning_processes_from_the_device_to_process_map():
    axes = parallel.MESH_AXES
    # 2 processes x 2 devices, mesh data 2 x tensor 2: each tensor pair sits in one process
    assert parallel.axes_spanning_processes(np.array([0, 0, 1, 1]).reshape(2, 1, 2), axes, "data") == []
    # 4 processes x 1 device: a tensor pair spans 2 processes, which feed different rows
    assert parallel.axes_spanning_processes(np.arange(4).reshape(2, 1, 2), axes, "data") == ["tensor"]
    assert parallel.axes_spanning_processes(np.arange(4).reshape(2, 2, 1), axes, ("data", "fsdp")) == []
    assert parallel.axes_spanning_processes(np.arange(4).reshape(1, 1, 4), axes, ()) == ["tensor"]


def test_a_batch_that_does_not_split_over_the_batch_axes_is_refused_naming_its_field():
    """Such a batch was left replicated by `logical_to_mesh`, silently: every device
    computed all of it. Parameters of odd sizes stay replicated as before."""
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    rules = parallel.DEFAULT_RULES
    with pytest.raises(ValueError, match=r"^stage1\.batch_size: 6 does not divide by 4, the devices along the mesh "
                                         r"axes \['data', 'fsdp'\] .*\(mesh \{'data': 2, 'fsdp': 2, 'tensor': 2\}\)"):
        parallel.check_batch_size("stage1.batch_size", 6, mesh, rules)
    parallel.check_batch_size("batch_size", 12, mesh, rules)
    parallel.check_batch_size("batch_size", 6, mesh, (("batch", "data"),))  # the batch split over data alone
    parallel.check_batch_size("batch_size", 3, parallel.make_mesh({"tensor": -1}), rules)  # no batch axis
    assert parallel.logical_to_mesh(("vocab", "embed"), (33, 64), mesh, rules) == P(None, "fsdp")


def test_rules_naming_anything_but_mesh_axes_are_refused_naming_the_field():
    parallel.check_rules(parallel.DEFAULT_RULES)
    parallel.check_rules((("batch", ["data", "fsdp"]), ("embed", None)))
    for bad in (("batch", "dat"), ("batch", ("data", "model")), ("batch",), "batch", (1, "data")):
        with pytest.raises(ValueError, match=r"^tokenizer\.axis_rules: .* is not a \(logical name, mesh axes\) rule"):
            parallel.check_rules((("embed", "fsdp"), bad), "tokenizer.axis_rules")


def test_chained_convolutions_get_their_1_device_gradients_on_a_data_fsdp_tensor_mesh():
    """A 3x3 Conv from 3 channels (its kernel split over tensor alone: 3 does not split over
    fsdp) then one split (fsdp, tensor): on a 2x2x2 mesh XLA's partitioner (Shardy's and
    GSPMD's alike, jax 0.10.2; einsums and 1x1 convolutions are spared) computed the first
    Conv's kernel and bias gradients 60-70 % off unless each Conv pins its input to the batch split."""

    class Convs(nnx.Module):
        def __init__(self):
            rngs = nnx.Rngs(0)
            self.conv_in, self.conv = Conv(3, 32, rngs=rngs), Conv(32, 32, rngs=rngs)

        def __call__(self, x):
            return self.conv(jax.numpy.tanh(self.conv_in(x)))

    def loss_fn(model, batch, rng):
        return jax.numpy.mean(model(batch["image"]) ** 2), ({}, None)

    run = ml_collections.ConfigDict(dict(axis_rules=parallel.DEFAULT_RULES, seed=0))
    batch = {"image": np.random.default_rng(0).standard_normal((8, 8, 8, 3)).astype(np.float32)}

    def gradients(mesh):
        return stage_gradients(Convs(), nnx.Param, loss_fn, run, mesh, batch)

    grads = gradients(parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}))
    assert split_over_fsdp_and_tensor(grads) == ["conv/kernel"]
    assert_same_gradients(grads, gradients(parallel.make_mesh({"data": 1}, devices=jax.devices()[:1])))


def test_a_batch_several_processes_cannot_feed_is_refused_before_the_run(monkeypatch):
    """With several processes, a batch left unsharded (its mesh axes of size 1) was refused
    at the first batch, after the model was built and its weights loaded; the config
    check now refuses it, naming the field."""
    from configs.tokenizer import get_config
    from seed_jax.trainers import global_batches

    config = get_config("tiny")
    config.mesh.update(data=1, fsdp=1, tensor=-1)
    global_batches.check_batch_sizes(config, {"batch_size": 16})  # one process feeds every row
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(ValueError, match=r"^tokenizer\.eval\.batch_size: 32 is not sharded over mesh \{'data': 1, "
                                         r"'fsdp': 1, 'tensor': 8\} .* 2 processes each feed rows of their own"):
        global_batches.check_batch_sizes(config, {"eval.batch_size": 32}, "tokenizer.")


def test_a_mesh_axis_spanning_processes_outside_the_batch_axes_is_refused_before_the_run(monkeypatch):
    """The config check, on 8 stand-in devices of 4 processes (2 each, in jax.devices()'
    order): a mesh axis along which the process changes but that does not shard the batch
    would have processes feeding different rows share a batch shard."""
    import dataclasses

    from configs.tokenizer import get_config
    from seed_jax.trainers import global_batches

    @dataclasses.dataclass(frozen=True)
    class Device:
        id: int
        process_index: int

    monkeypatch.setattr(jax, "devices", lambda: [Device(i, i // 2) for i in range(8)])
    monkeypatch.setattr(jax, "process_count", lambda: 4)
    monkeypatch.setattr(jax, "local_device_count", lambda: 2)
    config = get_config("tiny")
    config.mesh.update(data=2, fsdp=2, tensor=2)
    global_batches.check_batch_sizes(config, {"batch_size": 16})  # tensor pairs within a process
    config.axis_rules = (("batch", "data"),)  # fsdp spans processes, the batch is split over data alone
    with pytest.raises(ValueError, match=r"^mesh \{'data': 2, 'fsdp': 2, 'tensor': 2\}: axes \['fsdp'\] span "
                                         r"processes but do not shard the batch, .* expected the mesh axes other "
                                         r"than data to fit within one process's 2 devices"):
        global_batches.check_batch_sizes(config, {"batch_size": 16})
    config.axis_rules = parallel.DEFAULT_RULES
    config.mesh.update(data=2, fsdp=1, tensor=4)  # a tensor quadruple spans 2 processes
    with pytest.raises(ValueError, match=r"axes \['tensor'\] span processes"):
        global_batches.check_batch_sizes(config, {"batch_size": 16})
