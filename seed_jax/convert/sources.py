"""Reading source checkpoints into {key: float32 numpy array}.

safetensors files are read without torch; .pth / .pt / .bin / .ckpt need torch
(the `torch` extra) and are loaded with `weights_only=True` unless pickles are
explicitly allowed.
"""

from __future__ import annotations

import glob
import json
import os
import re
import zipfile

import numpy as np

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
WRAPPER_KEYS = ("model", "state_dict", "module")


def read_file(path: str, *, allow_pickle: bool = False) -> dict[str, np.ndarray]:
    """One checkpoint file -> {key: float32 array}; a {"model": state_dict} (or
    "state_dict") wrapper is unwrapped."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file {path!r} does not exist")
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file
        try:
            return {k: _float32(v) for k, v in load_file(path).items()}
        except TypeError:  # bfloat16 tensors have no numpy dtype in safetensors.numpy
            return _read_with_torch(path, allow_pickle)
    if path.endswith(TORCH_SUFFIXES):
        return _read_with_torch(path, allow_pickle)
    raise ValueError(f"checkpoint {path!r}: expected a .safetensors, .pth, .pt, .bin or .ckpt file")


def read_folder(folder: str, *, allow_pickle: bool = False) -> dict[str, np.ndarray]:
    """A Hugging Face / diffusers model folder (*.safetensors or *pytorch_model*.bin,
    sharded or not; reduced-precision variants such as *.fp16.safetensors are used
    only when they are all there is)."""
    if not os.path.isdir(folder):
        raise NotADirectoryError(f"checkpoint {folder!r}: expected a Hugging Face model folder")
    for pattern in ("*.safetensors", "*pytorch_model*.bin"):
        files = sorted(glob.glob(os.path.join(folder, pattern)))
        full_precision = [f for f in files if not re.search(r"\.(fp16|bf16)\.", os.path.basename(f))]
        files = full_precision or files
        if files:
            out: dict[str, np.ndarray] = {}
            for f in files:
                out.update(read_file(f, allow_pickle=allow_pickle))
            return out
    raise FileNotFoundError(f"{folder}: no *.safetensors or pytorch_model*.bin weights")


def read_hf_config(folder: str) -> dict:
    path = os.path.join(folder, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{folder}: no config.json (head counts and epsilons are read from it)")
    with open(path) as f:
        return json.load(f)


def _float32(x) -> np.ndarray:
    return np.asarray(x, np.float32) if np.issubdtype(np.asarray(x).dtype, np.floating) else np.asarray(x)


def _read_with_torch(path: str, allow_pickle: bool) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"reading {path} needs torch: pip install -e '.[torch]'") from e
    try:
        # Memory-mapped when the file is in torch's zip format: the tensors then live in the
        # page cache, which the kernel can reclaim; legacy-format files are read whole.
        obj = torch.load(path, map_location="cpu", weights_only=not allow_pickle, mmap=zipfile.is_zipfile(path))
    except Exception as e:
        if allow_pickle:
            raise
        raise ValueError(f"{path}: torch.load(weights_only=True) refused it ({type(e).__name__}: "
                         f"{str(e).splitlines()[0]}); if you trust the file, pass --allow_pickle") from e
    for key in WRAPPER_KEYS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(obj).__name__}")
    return {k: _float32(v.detach().float().numpy() if v.is_floating_point() else v.numpy())
            for k, v in obj.items() if isinstance(v, torch.Tensor)}
