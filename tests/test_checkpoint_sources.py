"""Reading source checkpoints: safetensors memory-mapped (every dtype, bfloat16
without torch), torch files, corrupt files named, no array read before a converter
looks it up, and layer stacks built one layer at a time."""

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from seed_jax.convert import sources
from seed_jax.convert.lazy_arrays import LazyArrays
from seed_jax.convert.rules import Source, apply, linear, rule

pytestmark = pytest.mark.torch


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"f32": torch.randn(3, 4, generator=g), "f64": torch.randn(2, generator=g).double(),
            "f16": torch.randn(5, generator=g).half(), "bf16": torch.randn(2, 3, generator=g).bfloat16(),
            "i64": torch.arange(6).reshape(2, 3), "i8": torch.tensor([-3, 7], dtype=torch.int8),
            "u8": torch.tensor([0, 255], dtype=torch.uint8), "bool": torch.tensor([True, False]),
            "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4)}


def _assert_read_as_torch_gives(arrays, tensors):
    assert sorted(arrays) == sorted(tensors)
    for key, tensor in tensors.items():
        expected = tensor.float().numpy() if tensor.is_floating_point() else tensor.numpy()
        assert arrays.shape(key) == tuple(tensor.shape), key
        np.testing.assert_array_equal(arrays[key], expected, err_msg=key)
        assert arrays[key].dtype == expected.dtype, key


def test_safetensors_read_as_torch_reads_them_for_every_dtype(tmp_path):
    tensors = _tensors()
    save_file(tensors, tmp_path / "w.safetensors", metadata={"format": "pt"})
    _assert_read_as_torch_gives(sources.read_file(str(tmp_path / "w.safetensors")), tensors)


def test_torch_files_read_the_same(tmp_path):
    tensors = _tensors()
    torch.save({"model": tensors}, tmp_path / "w.pth")
    _assert_read_as_torch_gives(sources.read_file(str(tmp_path / "w.pth")), tensors)


def test_a_corrupt_safetensors_file_names_the_problem(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(4), "b": torch.ones(1000)}, path)
    data = path.read_bytes()
    path.write_bytes(data[:-8])
    with pytest.raises(ValueError, match=r"tensor 'b' \(F32, shape \(1000,\)\).*truncated"):
        sources.read_file(str(path))
    path.write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="not a safetensors file"):
        sources.read_file(str(path))
    save_file({"fp8": torch.zeros(4, dtype=torch.float8_e4m3fn)}, path)
    with pytest.raises(ValueError, match="tensor 'fp8' has dtype F8_E4M3; supported: F64"):
        sources.read_file(str(path))


def test_nothing_is_read_until_looked_up():
    reads = []

    def reader(key):
        return lambda: reads.append(key) or np.full(2, len(reads), np.float32)

    lazy = LazyArrays({f"layer.{i}.w": ((2,), reader(i)) for i in range(3)})
    source = Source(LazyArrays.merged(lazy.rekeyed(lambda k: f"part.{k}"), {"extra": np.ones(3)}), "ckpt")
    assert source.count("part.layer.{i}.w") == 3 and source.shape("part.layer.1.w") == (2,)
    assert "extra" in source and "layer.0.w" not in source
    assert reads == []
    np.testing.assert_array_equal(source["part.layer.2.w"], [1, 1])
    assert reads == [2] and source.unused() == ["extra", "part.layer.0.w", "part.layer.1.w"]
    with pytest.raises(KeyError, match="ckpt: missing key 'layer.0.w'"):
        source.shape("layer.0.w")


def test_stacked_layers_are_written_in_order_and_a_misfit_is_named():
    rng = np.random.default_rng(0)
    weights = [rng.standard_normal((2, 3)).astype(np.float16) for _ in range(3)]
    source = Source({f"l.{i}.w": w for i, w in enumerate(weights)}, "ckpt")
    stacked = apply({"layers.kernel": rule("l.{i}.w", hook=linear, layers=[2, 0])}, source)["layers.kernel"]
    assert stacked.dtype == np.float32
    np.testing.assert_array_equal(stacked, np.stack([weights[2].T, weights[0].T]).astype(np.float32))
    source = Source({"l.0.w": np.zeros((2, 3)), "l.1.w": np.zeros((2, 4))}, "ckpt")
    with pytest.raises(ValueError, match=r"layers.kernel: layer 1 gives shape \(4, 2\), layer 0 gave \(3, 2\)"):
        apply({"layers.kernel": rule("l.{i}.w", hook=linear, layers=[0, 1])}, source)
