"""Reading source checkpoints into lazy {key: float32 numpy array} mappings.

Each array is read when a converter looks it up (`LazyArrays`). safetensors files
are memory-mapped and read without torch, bfloat16 included; .pth / .pt / .bin /
.ckpt need torch (the `torch` extra) and are loaded with `weights_only=True` unless
pickles are explicitly allowed.
"""

from __future__ import annotations

import functools
import json
import math
import os
import pickle
import re
import struct
import types
import zipfile

import numpy as np

from seed_jax.convert.lazy_arrays import LazyArrays, as_float32

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
LFS_POINTER = b"version https://git-lfs"  # what a repository cloned without git-lfs holds for each weights file
WRAPPER_KEYS = ("model", "state_dict", "module")
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP, torch.compile
# What transformers and diffusers load from a model folder, in their order of preference.
WEIGHT_NAMES = ("model.safetensors", "diffusion_pytorch_model.safetensors", "pytorch_model.bin",
                "diffusion_pytorch_model.bin")
# safetensors dtype names -> little-endian numpy dtypes; BF16 is widened to float32 by hand.
SAFETENSORS_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8", "I32": "<i4",
                      "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "?"}


def read_file(path: str, *, allow_pickle: bool = False) -> LazyArrays:
    """One checkpoint file -> lazy {key: float32 array}; {"model": state_dict}
    (or "state_dict", "module") wrappers are unwrapped, and a `module.` (DDP) or `_orig_mod.`
    (torch.compile) prefix that every key has is removed."""
    if os.path.isdir(path):
        raise ValueError(f"checkpoint {path!r} is a folder: expected a checkpoint file ({', '.join(TORCH_SUFFIXES)} "
                         "or .safetensors)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file {path!r} does not exist")
    if _head(path, len(LFS_POINTER)) == LFS_POINTER:
        raise ValueError(f"{path}: a Git LFS pointer, not the weights (a clone without git-lfs?): fetch them with "
                         "`git lfs pull` or `huggingface-cli download`")
    if path.endswith(".safetensors"):
        arrays = read_safetensors(path)
    elif path.endswith(TORCH_SUFFIXES):
        arrays = _read_with_torch(path, allow_pickle)
    else:
        raise ValueError(f"checkpoint {path!r}: expected a .safetensors, .pth, .pt, .bin or .ckpt file")
    return _without_wrapper_prefixes(arrays)


def _without_wrapper_prefixes(arrays: LazyArrays) -> LazyArrays:
    """Keys without the WRAPPER_PREFIXES every key has (`module._orig_mod.x` -> `x`)."""
    while arrays:
        shared = [p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in arrays)]
        if not shared:
            break
        arrays = arrays.rekeyed(lambda k, n=len(shared[0]): k[n:])
    return arrays


def read_safetensors(path: str) -> LazyArrays:
    """A .safetensors file (an 8-byte header length, a JSON header of dtype, shape and
    byte range per tensor, then the data); each tensor is copied out of a memory map
    of its bytes when it is looked up, and the map closed."""
    file_size = os.path.getsize(path)
    with open(path, "rb") as f:
        try:
            (header_size,) = struct.unpack("<Q", f.read(8))
            if header_size > file_size - 8:
                raise ValueError(f"a {header_size}-byte header")
            header = json.loads(f.read(header_size))
        except (struct.error, ValueError) as e:  # JSON and UTF-8 errors are ValueErrors
            raise ValueError(f"{path}: not a safetensors file (unreadable header: {e})") from None
    header.pop("__metadata__", None)
    data_size = file_size - 8 - header_size
    entries = {}
    for key, info in header.items():
        dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        if dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {key!r} has dtype {dtype}; supported: {', '.join(SAFETENSORS_DTYPES)}")
        if end - begin != math.prod(shape) * np.dtype(SAFETENSORS_DTYPES[dtype]).itemsize or end > data_size:
            raise ValueError(f"{path}: tensor {key!r} ({dtype}, shape {shape}) has a byte range "
                             f"[{begin}, {end}) that does not fit it or the file (truncated?)")
        entries[key] = (shape, functools.partial(_safetensors_tensor, path, 8 + header_size + begin, dtype, shape))
    return LazyArrays(entries)


def _safetensors_tensor(path: str, offset: int, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    numpy_dtype = SAFETENSORS_DTYPES[dtype]
    if math.prod(shape) == 0:  # nothing to map
        raw = np.zeros(shape, numpy_dtype)
    else:  # unmapped again once the copy below is made
        raw = np.memmap(path, numpy_dtype, mode="r", offset=offset, shape=shape)
    if dtype == "BF16":  # bfloat16 is the top half of a float32
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return as_float32(raw)


def read_folder(folder: str, *, allow_pickle: bool = False, variant: str | None = None) -> LazyArrays:
    """The weights of a Hugging Face / diffusers model folder, chosen as transformers and
    diffusers choose them: the first of WEIGHT_NAMES there, one file or the shards its
    `.index.json` lists. A variant (`model.fp16.safetensors`, ...) is read when asked for,
    or when it is the only one there; variants are never merged."""
    variant = variant_read(folder, variant)
    files = _weight_files(folder, variant)
    if not files:
        wanted = [_variant_name(name, variant) for name in WEIGHT_NAMES]
        pipeline = ""
        if os.path.exists(os.path.join(folder, "model_index.json")):
            parts = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
            pipeline = (f" (a diffusers pipeline folder: give the folder of one of its models, {', '.join(parts)}; "
                        "the `sd` layout converts the whole pipeline)")
        raise FileNotFoundError(f"{folder}: no {' or '.join(wanted)}, nor a sharded .index.json of one{pipeline}")
    return LazyArrays.merged(*(read_file(f, allow_pickle=allow_pickle) for f in files))


def variant_read(folder: str, variant: str | None) -> str | None:
    """The variant `read_folder(folder, variant=variant)` reads: `variant`, else None (the
    main weights) when they are there, else the folder's only variant."""
    if not os.path.isdir(folder):
        raise NotADirectoryError(f"checkpoint {folder!r}: expected a Hugging Face model folder")
    if variant is not None or _weight_files(folder, None):
        return variant
    variants = weight_variants(folder)
    if len(variants) > 1:
        raise ValueError(f"{folder}: no {' or '.join(WEIGHT_NAMES)} (or index), but the variants "
                         f"{', '.join(variants)}: choose one with --variant")
    return variants[0] if variants else None


def _variant_name(name: str, variant: str | None) -> str:
    """model.safetensors -> model.fp16.safetensors; the same for an index's .json."""
    if not variant:
        return name
    stem, ext = name.rsplit(".", 1)
    return f"{stem}.{variant}.{ext}"


def _weight_files(folder: str, variant: str | None) -> list[str]:
    """The files of the first of WEIGHT_NAMES (as `variant`) in `folder`: the file,
    or the shards its index lists, each of which must be there."""
    for name in WEIGHT_NAMES:
        path = os.path.join(folder, _variant_name(name, variant))
        index = os.path.join(folder, _variant_name(f"{name}.index.json", variant))
        if os.path.isfile(path):
            return [path]
        if os.path.isfile(index):
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index}: expected a sharded checkpoint's index, a JSON object whose 'weight_map' "
                                 f"maps each key to its shard file, got weight_map={weight_map!r}")
            shards = sorted(set(weight_map.values()))
            missing = [s for s in shards if not os.path.isfile(os.path.join(folder, s))]
            if missing:
                raise FileNotFoundError(f"{index} lists shards that are missing: {', '.join(missing)}")
            return [os.path.join(folder, s) for s in shards]
    return []


def weight_variants(folder: str) -> list[str]:
    """Variants of WEIGHT_NAMES in `folder`: `model.fp16.safetensors` and
    `model.safetensors.index.fp16.json` are the variant fp16."""
    found = set()
    for name in WEIGHT_NAMES:
        stem, ext = (re.escape(part) for part in name.rsplit(".", 1))
        pattern = re.compile(rf"{stem}\.(\w+)\.{ext}|{stem}\.{ext}\.index\.(\w+)\.json")
        for file in os.listdir(folder):
            if m := pattern.fullmatch(file):
                found.add(m[1] or m[2])
    return sorted(found)


def read_hf_config(folder: str) -> dict:
    path = os.path.join(folder, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{folder}: no config.json (head counts and epsilons are read from it)")
    return read_json(path)


def read_json(path: str) -> dict:
    """A JSON file holding an object; one that does not parse, or holds something else,
    is a ValueError naming the file."""
    with open(path, "rb") as f:
        try:
            value = json.load(f)
        except ValueError as e:  # JSON and UTF-8 errors
            raise ValueError(f"{path}: not a JSON file ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got a {type(value).__name__}")
    return value


def _read_with_torch(path: str, allow_pickle: bool) -> LazyArrays:
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"reading {path} needs torch: pip install -e '.[torch]'") from e
    try:
        # Memory-mapped when the file is in torch's zip format: the tensors then live in the
        # page cache, which the kernel can reclaim; legacy-format files are read whole.
        # Pickles are read with stand-ins for classes that are not installed (see _StandIn).
        obj = torch.load(path, map_location="cpu", weights_only=not allow_pickle, mmap=zipfile.is_zipfile(path),
                         **({"pickle_module": _STAND_IN_PICKLE} if allow_pickle else {}))
    except Exception as e:
        torch_file = _looks_like_torch_file(path)
        if not torch_file or isinstance(e, (RuntimeError, OSError, EOFError)):
            reason = _first_line(e) if torch_file else f"it begins with {_head(path)!r}"
            raise ValueError(f"{path}: not a readable torch checkpoint ({reason}); truncated or corrupt "
                             "(a partial download?)") from e
        if allow_pickle:  # an object it pickles failed to rebuild: torch's error says which
            raise
        raise ValueError(f"{path}: torch.load(weights_only=True) refused it ({_refusal(torch, path, e)}); "
                         "if you trust the file, pass --allow_pickle") from e
    while isinstance(obj, dict) and (key := next((k for k in WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)):
        obj = obj[key]  # {"state_dict": {"model": state_dict}} too
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(obj).__name__}")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ValueError(f"{path}: holds no tensors, nor a state dict under {', '.join(map(repr, WRAPPER_KEYS[:-1]))} "
                         f"or {WRAPPER_KEYS[-1]!r}; its entries: {', '.join(map(repr, list(obj)[:10]))}")
    return LazyArrays({k: (tuple(v.shape), functools.partial(_torch_to_numpy, v)) for k, v in tensors.items()})


def _looks_like_torch_file(path: str) -> bool:
    """A zip archive (a local file header first, even when truncated), or a legacy torch
    file (a pickle: its protocol opcode first). A damaged one fails to load with a
    RuntimeError, OSError or EOFError; weights_only refuses with an UnpicklingError."""
    head = _head(path, 4)
    return head == b"PK\x03\x04" or head[:1] == pickle.PROTO


def _head(path: str, size: int = 24) -> bytes:
    with open(path, "rb") as f:
        return f.read(size)


def _refusal(torch, path: str, error: Exception) -> str:
    """Why weights_only refused `path`: the classes and functions it pickles beyond
    tensors (numpy scalars, pytorch_lightning callbacks, ...), else torch's error."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # legacy (pre-zip) files are not inspected
        names = []
    if names:
        return f"it pickles {', '.join(names)}"
    return _first_line(error)


def _first_line(error: Exception) -> str:
    return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"


class _StandIn:
    """Unpickles as anything and holds nothing: what `--allow_pickle` reads in place of
    a class whose module is not installed. Such objects sit beside the weights (a CompVis
    .ckpt's pytorch_lightning ModelCheckpoint callbacks, OmegaConf or argparse configs)
    and are dropped with every other non-tensor entry."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):  # a dict subclass's items
        pass

    def append(self, value):  # a list subclass's items
        pass

    def extend(self, values):
        pass


class _StandInUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            return type(name, (_StandIn,), {"__module__": module})


_STAND_IN_PICKLE = types.SimpleNamespace(__name__="seed_jax_stand_in_pickle", Unpickler=_StandInUnpickler,
                                         load=pickle.load)


def _torch_to_numpy(tensor) -> np.ndarray:
    tensor = tensor.detach()
    return as_float32(tensor.float().numpy() if tensor.is_floating_point() else tensor.numpy())
