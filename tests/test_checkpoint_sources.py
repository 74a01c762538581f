"""Reading source checkpoints: safetensors memory-mapped (every dtype, bfloat16
without torch), torch files, corrupt files named, no array read before a converter
looks it up, layer stacks built one layer at a time, gaps in layers named, DDP /
compile prefixes removed, and folders read file by file as transformers and diffusers
read them (shard indexes, variants)."""

import json
import sys
import types

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from seed_jax.convert import sources
from seed_jax.convert.lazy_arrays import LazyArrays
from seed_jax.convert.rules import Source, apply, heads_bias, linear, rule

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


def test_in_memory_arrays_are_read_as_float32_bfloat16_included():
    arrays = {"half": np.ones(2, np.float16), "brain": np.ones(2, jnp.bfloat16), "ids": np.arange(2)}
    read = {k: v for k, v in LazyArrays.of(arrays).items()}
    assert {k: v.dtype for k, v in read.items()} == {"half": np.float32, "brain": np.float32, "ids": np.int64}


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


def test_a_hook_that_does_not_fit_names_the_target_and_the_source_key():
    """A reshape that does not fit raised numpy's bare 'cannot reshape array of size 6
    into shape (4,newaxis)', naming neither the parameter nor the checkpoint key."""
    source = Source({"attn.qkv.bias": np.zeros(6), "l.0.b": np.zeros(4), "l.1.b": np.zeros(6)}, "ckpt")
    with pytest.raises(ValueError, match=r"^q\.bias: converting attn\.qkv\.bias \(6,\) failed: cannot reshape"):
        apply({"q.bias": rule("attn.qkv.bias", hook=heads_bias(4))}, source)
    with pytest.raises(ValueError, match=r"^layers\.bias: converting l\.1\.b \(6,\) failed: cannot reshape"):
        apply({"layers.bias": rule("l.{i}.b", hook=heads_bias(4), layers=[0, 1])}, source)


def test_a_source_array_of_another_shape_than_the_models_is_named():
    """A source array whose result does not fit the model failed only when the export was
    written, naming our parameter ("ln_vision.scale: expected (48,), got (7,)") but not
    the checkpoint key; the key and its shape are now named, in a stack the layer's."""
    source = Source({"ln.weight": np.zeros(7), "l.1.w": np.zeros((4, 2)), "l.3.w": np.zeros((4, 3))}, "ckpt")
    with pytest.raises(ValueError, match=r"^ln\.scale: converting ln\.weight \(7,\) gives shape \(7,\); the "
                                         r"model's is \(48,\)"):
        apply({"ln.scale": rule("ln.weight")}, source, {"ln.scale": (48,)})
    table = {"layers.kernel": rule("l.{i}.w", hook=linear, layers=[1, 3])}
    with pytest.raises(ValueError, match=r"^layers\.kernel: converting l\.3\.w \(4, 3\) gives shape \(3, 4\); "
                                         r"the model's is \(2, 4\)"):
        apply(table, source, {"layers.kernel": (2, 2, 4)})


def test_a_missing_middle_layer_is_named_not_counted_as_the_end():
    layers = {f"p.l.{i}.{name}": np.zeros(1) for i in range(4) for name in ("a", "b")}
    assert Source(layers, "ckpt").count("p.l.{i}.a") == 4
    del layers["p.l.1.a"], layers["p.l.1.b"]
    with pytest.raises(KeyError, match=r"ckpt: missing key 'p.l.1.a', though layer 3 has keys"):
        Source(layers, "ckpt").count("p.l.{i}.a")
    del layers["p.l.2.a"], layers["p.l.2.b"], layers["p.l.3.a"]  # layer 3 partly there
    with pytest.raises(KeyError, match=r"missing key 'p.l.1.a', though layer 3 has keys"):
        Source(layers, "ckpt").count("p.l.{i}.a")
    del layers["p.l.3.b"]
    layers.update({"q.p.l.5.a": np.zeros(1), "p.l.x": np.zeros(1)})  # other prefixes, no layer index
    assert Source(layers, "ckpt").count("p.l.{i}.a") == 1


def test_pickled_objects_of_modules_not_installed_load_with_allow_pickle(tmp_path, monkeypatch):
    """A CompVis/Lightning .ckpt pickles pytorch_lightning callbacks and numpy scalars
    beside the state dict: weights_only refuses it, naming them; --allow_pickle used to
    fail with ModuleNotFoundError where pytorch_lightning is not installed."""
    lightning = types.ModuleType("not_installed_lightning")

    class ModelCheckpoint:
        def __init__(self):
            self.best_model_path = "last.ckpt"

    class Hparams(dict):
        pass

    for cls in (ModelCheckpoint, Hparams):
        cls.__module__, cls.__qualname__ = lightning.__name__, cls.__name__
        setattr(lightning, cls.__name__, cls)
    monkeypatch.setitem(sys.modules, lightning.__name__, lightning)
    state = {"a.weight": torch.ones(2, 3), "b": torch.zeros(1).half()}
    checkpoint = {"state_dict": state, "global_step": np.int64(470000), "hparams": Hparams(lr=1e-4),
                  "callbacks": {ModelCheckpoint: {"best": ModelCheckpoint(), "score": np.float64(0.5)}}}
    torch.save(checkpoint, tmp_path / "new.ckpt")
    torch.save(checkpoint, tmp_path / "legacy.ckpt", _use_new_zipfile_serialization=False)
    monkeypatch.delitem(sys.modules, lightning.__name__)
    with pytest.raises(ValueError, match=r"refused it \(it pickles .*not_installed_lightning.ModelCheckpoint.*"
                                         r"pass --allow_pickle"):
        sources.read_file(str(tmp_path / "new.ckpt"))
    for name in ("new.ckpt", "legacy.ckpt"):
        with pytest.raises(ValueError, match="pass --allow_pickle"):
            sources.read_file(str(tmp_path / name))
        arrays = sources.read_file(str(tmp_path / name), allow_pickle=True)
        assert sorted(arrays) == ["a.weight", "b"]
        np.testing.assert_array_equal(arrays["a.weight"], np.ones((2, 3), np.float32))


def test_a_damaged_torch_file_is_named_as_damaged_not_as_refused(tmp_path):
    """A partial download (zip or legacy format) or an HTML error page saved as .bin
    was reported as refused by weights_only, with advice to pass --allow_pickle, which
    then failed with torch's RuntimeError or UnpicklingError, uncaught by the CLI."""
    state = {"model": {"w": torch.ones(300, 100)}}
    torch.save(state, tmp_path / "zip.pth")
    torch.save(state, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    for name in ("zip.pth", "legacy.pth"):
        data = (tmp_path / name).read_bytes()
        (tmp_path / f"partial_{name}").write_bytes(data[:len(data) // 2])
    (tmp_path / "page.bin").write_text("<!DOCTYPE html><html><body>403 Forbidden</body></html>")
    for name in ("partial_zip.pth", "partial_legacy.pth", "page.bin"):
        for allow_pickle in (False, True):
            with pytest.raises(ValueError, match="not a readable torch checkpoint .*truncated or corrupt") as e:
                sources.read_file(str(tmp_path / name), allow_pickle=allow_pickle)
            assert "allow_pickle" not in str(e.value) and name in str(e.value)


def test_a_torch_file_whose_weights_sit_under_another_entry_names_its_entries(tmp_path):
    """A state dict under an entry other than model / state_dict / module read as no
    tensors at all, and the conversion failed on its first key as if the file lacked it."""
    torch.save({"ema": {"w": torch.ones(2)}, "epoch": 3}, tmp_path / "ema.pth")
    with pytest.raises(ValueError, match=r"ema.pth: holds no tensors, nor a state dict under 'model', 'state_dict' "
                                         r"or 'module'; its entries: 'ema', 'epoch'"):
        sources.read_file(str(tmp_path / "ema.pth"))
    torch.save({"state_dict": {"model": {"w": torch.ones(2)}}, "epoch": 3}, tmp_path / "twice.pth")  # wrapped twice
    assert list(sources.read_file(str(tmp_path / "twice.pth"))) == ["w"]


def test_a_folder_given_for_a_checkpoint_file_is_named(tmp_path):
    """`lavis_blip2 --checkpoint=HF_FOLDER` said the folder did not exist."""
    with pytest.raises(ValueError, match="is a folder: expected a checkpoint file"):
        sources.read_file(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sources.read_file(str(tmp_path / "absent.pth"))


def test_a_git_lfs_pointer_is_named(tmp_path):
    """A repository cloned without git-lfs holds a small text pointer for each weights
    file: it read as a safetensors file with a 2e18-byte header, or as a torch file."""
    pointer = "version https://git-lfs.github.com/spec/v1\noid sha256:4f1d0e2e\nsize 5312753599\n"
    for name in ("model.safetensors", "pytorch_model.bin"):
        folder = tmp_path / name.split(".")[0]
        folder.mkdir()
        (folder / name).write_text(pointer)
        with pytest.raises(ValueError, match=f"{name}: a Git LFS pointer, not the weights"):
            sources.read_folder(str(folder))


def test_ddp_and_compile_prefixes_every_key_has_are_removed(tmp_path):
    torch.save({"model": {"module._orig_mod.a": torch.ones(2), "module._orig_mod.b.c": torch.zeros(1)}},
               tmp_path / "ddp.pth")
    assert sorted(sources.read_file(str(tmp_path / "ddp.pth"))) == ["a", "b.c"]
    save_file({"module.a": torch.ones(2), "b": torch.zeros(1)}, tmp_path / "some.safetensors")
    assert sorted(sources.read_file(str(tmp_path / "some.safetensors"))) == ["b", "module.a"]


def _save(path, value: float):
    """A one-tensor file {"w": value} (safetensors or torch by suffix)."""
    tensors = {"w": torch.full((2,), float(value))}
    if str(path).endswith(".safetensors"):
        save_file(tensors, path)
    else:
        torch.save(tensors, path)


def test_a_folder_is_read_as_transformers_and_diffusers_read_it(tmp_path):
    """The first of model/diffusion_pytorch_model .safetensors, then .bin; a variant
    only when asked for or alone; never a merge of variants."""
    def w(folder, **kw):
        return sources.read_folder(str(folder), **kw)["w"][0]

    (unet := tmp_path / "unet").mkdir()
    for name, value in (("", 1), (".non_ema", 2), (".fp16", 3)):
        _save(unet / f"diffusion_pytorch_model{name}.bin", value)
    assert w(unet) == 1 and w(unet, variant="non_ema") == 2
    _save(unet / "diffusion_pytorch_model.fp16.safetensors", 4)
    assert w(unet) == 1 and w(unet, variant="fp16") == 4  # safetensors first, within a variant too
    _save(unet / "diffusion_pytorch_model.safetensors", 5)
    assert w(unet) == 5 and sources.variant_read(str(unet), None) is None
    with pytest.raises(FileNotFoundError, match=r"no model.bf16.safetensors or .* diffusion_pytorch_model.bf16.bin"):
        w(unet, variant="bf16")

    (variants := tmp_path / "variants").mkdir()
    _save(variants / "model.fp16.safetensors", 6)
    assert w(variants) == 6 and sources.variant_read(str(variants), None) == "fp16"  # the only variant there
    _save(variants / "pytorch_model.non_ema.bin", 7)
    with pytest.raises(ValueError, match="the variants fp16, non_ema: choose one with --variant"):
        w(variants)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no model.safetensors or"):
        w(tmp_path / "empty")


def test_a_sharded_folder_reads_the_shards_its_index_lists(tmp_path):
    shards = {"model-00001-of-00002.safetensors": {"a": torch.ones(2)},
              "model-00002-of-00002.safetensors": {"b": torch.zeros(3)}}
    for name, tensors in shards.items():
        save_file(tensors, tmp_path / name)
    save_file({"a": torch.full((2,), 9.0)}, tmp_path / "model.fp16-00001-of-00001.safetensors")  # a stray variant
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    arrays = sources.read_folder(str(tmp_path))
    assert sorted(arrays) == ["a", "b"] and arrays["a"].tolist() == [1, 1]
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model.safetensors.index.json lists shards that are missing: "
                                                r"model-00002-of-00002.safetensors"):
        sources.read_folder(str(tmp_path))


@pytest.mark.parametrize("index", [{}, {"weight_map": ["model-00001-of-00001.safetensors"]}])
def test_an_index_without_a_weight_map_fails_saying_what_it_lacks(tmp_path, index):
    """An index without its weight_map failed with a bare KeyError: 'weight_map'."""
    save_file({"a": torch.ones(2)}, tmp_path / "model-00001-of-00001.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"model.safetensors.index.json: expected a sharded checkpoint's index, a "
                                         r"JSON object whose 'weight_map' maps each key to its shard file"):
        sources.read_folder(str(tmp_path))


def test_a_json_file_that_does_not_parse_is_named(tmp_path):
    """A damaged config.json (an HTML error page, a partial download) failed with json's
    bare "Expecting value: line 1 column 1 (char 0)", naming no file."""
    (tmp_path / "config.json").write_text("<!DOCTYPE html><html>403 Forbidden</html>")
    with pytest.raises(ValueError, match=r"config.json: not a JSON file \(Expecting value: line 1"):
        sources.read_hf_config(str(tmp_path))
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"config.json: expected a JSON object, got a list"):
        sources.read_hf_config(str(tmp_path))
    (tmp_path / "model.safetensors.index.json").write_text("[1, 2]")  # failed with an AttributeError
    with pytest.raises(ValueError, match=r"model.safetensors.index.json: expected a JSON object, got a list"):
        sources.read_folder(str(tmp_path))
