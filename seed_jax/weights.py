"""Inference exports: a model's parameters (orbax) plus its config as JSON.

    OUT/model.json   {"kind": "seed_tokenizer" | "blip2" | "clip_text" | "stable_diffusion" | "opt", "config": {...}, "info": {...}}
    OUT/params/      orbax checkpoint, a nested dict of float32 arrays keyed like the
                     model's nnx state (stacked layers keep their leading axis)

Converters, `seed_jax.export` and training workdirs all write this format; the API
and the trainer's `config.init.*` read it. Parameters are addressed by dotted paths
("qformer.groups.layers.0.self_attn.query").
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils

from seed_jax import parallel
from seed_jax.data import records
from seed_jax.models.blip2 import Blip2Config, Blip2QFormer
from seed_jax.models.clip_text import CLIPTextConfig, CLIPTextEncoder
from seed_jax.models.opt import OPT, OPTConfig
from seed_jax.models.stable_diffusion import StableDiffusion, StableDiffusionConfig
from seed_jax.models.tokenizer import SeedTokenizer, SeedTokenizerConfig

MODEL_KINDS = {
    "seed_tokenizer": (SeedTokenizerConfig.from_dict, SeedTokenizer),
    "blip2": (Blip2Config.from_dict, Blip2QFormer),
    "clip_text": (lambda d: CLIPTextConfig(**d), CLIPTextEncoder),
    "stable_diffusion": (StableDiffusionConfig.from_dict, StableDiffusion),
    "opt": (OPTConfig.from_dict, OPT),
}
SCANNED_KINDS = ("seed_tokenizer", "blip2", "opt")  # the kinds whose layer stacks take `remat`
CONFIG_FILE = "model.json"
PARAMS_DIR = "params"


def config_from_dict(kind: str, config: dict):
    if kind not in MODEL_KINDS:
        raise ValueError(f"kind: expected one of {sorted(MODEL_KINDS)}, got {kind!r}")
    return MODEL_KINDS[kind][0](config)


def build(kind: str, config, *, dtype=jnp.float32, remat: bool = False, abstract: bool = False, seed: int = 0):
    """The model of `kind` (abstract: shapes only, no memory)."""
    cls = MODEL_KINDS[kind][1]
    kwargs = {"remat": remat} if kind in SCANNED_KINDS else {}
    make = lambda: cls(config, dtype=dtype, rngs=nnx.Rngs(seed), **kwargs)  # noqa: E731
    return nnx.eval_shape(make) if abstract else make()


def flat_params(module: nnx.Module) -> dict[str, Any]:
    """Dotted path -> parameter value (array or ShapeDtypeStruct)."""
    return {".".join(str(k) for k in path): var.get_value()
            for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param))}


def _nest(flat: dict[str, Any]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return tree


def flatten_nested(tree: dict, prefix: str = "") -> dict[str, Any]:
    """A nested dict as {dotted path: leaf} (empty dicts hold no leaf)."""
    out = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        out.update(flatten_nested(value, path + ".") if isinstance(value, dict) else {path: value})
    return out


def this_process_only() -> ocp.options.MultiprocessingOptions:
    """orbax options for checkpoints that this process reads or writes alone (e.g. an
    export by process 0 of a multi-host run): their barriers wait for no other process."""
    index = jax.process_index()
    return ocp.options.MultiprocessingOptions(primary_host=index, active_processes={index})


def check_free(out: str) -> None:
    """Raises if `out` cannot be a new export directory: "" (which named the current
    directory), a file at or above it, or an export already there."""
    if not out:
        raise ValueError("out is empty: expected a new export directory")
    existing = os.path.abspath(out)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise FileExistsError(f"out: {existing} is a file, not a directory; choose a new directory")
    if os.path.exists(os.path.join(out, PARAMS_DIR)):
        partial = not os.path.exists(os.path.join(out, CONFIG_FILE))  # written last: the writing stopped
        raise FileExistsError(f"out: {os.path.abspath(out)} already holds "
                              + (f"a partial export ({PARAMS_DIR}/ without {CONFIG_FILE}: its writing stopped); "
                                 "remove it, or choose a new directory" if partial else
                                 "an export; choose a new directory"))


def model_shapes(kind: str, config) -> dict[str, tuple]:
    """Dotted path -> shape of every parameter of the model `kind` builds from `config`."""
    return shapes(flat_params(build(kind, config, abstract=True)))


def save(out: str, kind: str, config, params: dict[str, Any], info: dict | None = None,
         expected_shapes: dict[str, tuple] | None = None) -> None:
    """Writes `params` (dotted path -> array, all of the model's parameters) and the
    config to the export directory `out`, which must not hold an export yet. One
    process writes it: in a multi-host run, the others do not call this, and `params`
    hold this process's whole copies (see `gathered`). `expected_shapes`: the model's
    (`model_shapes`), where the caller has them already."""
    check_shapes(shapes(params), expected_shapes or model_shapes(kind, config), what="params")
    out = os.path.abspath(out)
    check_free(out)
    os.makedirs(out, exist_ok=True)
    # In a multi-host run orbax writes jax.Arrays only as global arrays, from all processes:
    # this process's copies go as numpy arrays.
    to_host = host_array if jax.process_count() == 1 else lambda v: np.asarray(v, np.float32)
    arrays = {k: to_host(v) for k, v in params.items()}
    # Uncompressed: orbax's default, zstd, took SEED v1's random float32 weights from
    # 4.3 to 4.0 GB but 14 s to write instead of 5, 19 s to read instead of 9.
    # Exports written compressed still load.
    alone = this_process_only()
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False, multiprocessing_options=alone),
                          multiprocessing_options=alone) as checkpointer:
        checkpointer.save(os.path.join(out, PARAMS_DIR), args=ocp.args.PyTreeSave(_nest(arrays)))
    # Last and whole (renamed into place): model.json marks a complete export (`write_unless_current`).
    write_config(out, kind, config, info)


def write_config(out: str, kind: str, config, info: dict | None = None) -> None:
    """Writes the export's model.json {kind, config, info} into the folder `out`, whole
    (renamed into place). Alone, without params, it describes a model `read_config` can
    read but not load (e.g. a plan of a model whose weights are not here)."""
    records.write_json(os.path.join(out, CONFIG_FILE),
                       {"kind": kind, "config": dataclasses.asdict(config), "info": info or {}}, indent=2)


def gathered(params: dict[str, Any]) -> dict[str, Any]:
    """`params` with each array that spans processes gathered whole to every process (as
    numpy), the others as they are. In a multi-host run all processes call this (a
    collective per such array), then one of them `save`s."""
    return {k: np.asarray(multihost_utils.process_allgather(v, tiled=True))
            if isinstance(v, jax.Array) and not v.is_fully_addressable else v for k, v in params.items()}


def host_array(value) -> jax.Array:
    """`value` as a float32 JAX array on this host's first CPU device; no copy when it
    is one already. orbax writes these with less memory than numpy arrays (about 0.7x
    the array's size on top of it, against 1.75x)."""
    cpu = jax.local_devices(backend="cpu")[0]
    if isinstance(value, jax.Array):
        return jax.device_put(value if value.dtype == jnp.float32 else value.astype(jnp.float32), cpu)
    return jax.device_put(np.asarray(value, np.float32), cpu)


def write_unless_current(out: str, steps: dict[str, int], write: Callable[[], None]) -> bool:
    """Calls `write()` to write the export of a finished run to `out` (its info["steps"]
    = `steps`, stage -> training steps) unless `out` holds one trained at least as far
    in every stage: a run resumed with more steps replaces its older export, while a
    rerun, or one with fewer steps (whose checkpoints are the later ones), keeps it.
    Returns whether it wrote."""
    if os.path.exists(os.path.join(out, CONFIG_FILE)):
        held = read_config(out)[2].get("steps")
        if isinstance(held, dict) and all((held.get(k) or 0) >= v for k, v in steps.items()):
            return False
    shutil.rmtree(out, ignore_errors=True)  # an older export, or one cut short
    write()
    return True


def fingerprint(out: str) -> str:
    """A hash of the export at `out`'s files (model.json and params/, names and bytes):
    what was made from one export (e.g. pre-tokenized codes) can tell when it was
    replaced, by another training run or a resumed one."""
    digest = hashlib.blake2b(digest_size=16)
    files = [os.path.join(out, CONFIG_FILE)] + sorted(
        os.path.join(root, name) for root, _, names in os.walk(os.path.join(out, PARAMS_DIR)) for name in names)
    for path in files:
        digest.update(os.path.relpath(path, out).encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def read_config(out: str, kind: str | None = None) -> tuple[str, Any, dict]:
    """(kind, config, info) of the export at `out` (a ValueError unless it holds a
    `kind` model, where given); config fields its model.json lacks (an export written
    before they existed) take the config class's defaults."""
    meta = _read_meta(out)
    if kind is not None and meta["kind"] != kind:
        raise ValueError(f"{out}: holds a {meta['kind']!r} model, expected {kind!r}")
    return meta["kind"], config_from_dict(meta["kind"], meta["config"]), meta.get("info", {})


def read_config_named(field: str, out: str, kind: str) -> tuple[str, Any, dict]:
    """`read_config(out, kind)` of the export the config `field` names: a missing export,
    or one of another kind, is a ValueError naming `field`."""
    try:
        return read_config(out, kind)
    except (ValueError, FileNotFoundError) as error:
        raise ValueError(f"{field}: {error}") from None


def stored_config_fields(out: str) -> set[str]:
    """The config fields the export at `out` wrote (older exports lack newer fields)."""
    return set(_read_meta(out)["config"])


def _read_meta(out: str) -> dict:
    """The export's model.json: {kind, config, info}."""
    path = os.path.join(out, CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{out}: not an export ({CONFIG_FILE} missing); {_why_no_export(out)}")
    with open(path) as f:
        return json.load(f)


def _why_no_export(out: str) -> str:
    """What to do about the folder `out`, which holds no export."""
    if os.path.isfile(out):
        return "a file, not a folder: an export is the folder holding model.json and params/"
    if not os.path.isdir(out):
        return "no such folder" + (" (Python does not expand ~: os.path.expanduser(path) does)"
                                   if out.startswith("~") else "")
    if os.path.exists(os.path.join(out, "export", CONFIG_FILE)):  # a training workdir (the trainers export there)
        return f"it holds one in {os.path.join(out, 'export')}"
    return "write one with `python -m seed_jax.convert ...` or `python -m seed_jax.export ...`"


def check_shapes(found: dict[str, tuple], expected: dict[str, tuple], *, what: str) -> None:
    """Raises naming every missing, unexpected or mis-shaped parameter (dotted path -> shape)."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = [f"{k}: expected {expected[k]}, got {found[k]}"
             for k in sorted(set(expected) & set(found)) if found[k] != expected[k]]
    problems = ([f"missing {k}" for k in missing] + [f"unexpected {k}" for k in unexpected] + wrong)
    if problems:
        raise ValueError(f"{what} do not match the model ({len(problems)} problems):\n  " + "\n  ".join(problems))


def shapes(params: dict[str, Any]) -> dict[str, tuple]:
    return {k: tuple(np.shape(v)) for k, v in params.items()}


def load_params(out: str, keys: dict[str, Any] | None = None, shardings: dict | None = None) -> dict[str, Any]:
    """Dotted path -> array from the export at `out`.

    `keys` (dotted path -> shape holder) selects parameters and checks their shapes
    first; `shardings` (same keys) places them on a mesh directly; the others are read
    to host numpy arrays. Where all land on this process's devices, it reads alone: in a
    multi-host run, one process may call it (e.g. to export) or all may.
    """
    path = os.path.join(os.path.abspath(out), PARAMS_DIR)
    shardings = shardings or {}
    stored = stored_shapes(out)
    if keys is not None:
        absent = sorted(set(keys) - set(stored))
        if absent:
            raise KeyError(f"{out}: export has no parameter(s) {absent}")
        wrong = [f"{k}: model {tuple(keys[k].shape)}, export {stored[k]}"
                 for k in keys if tuple(keys[k].shape) != stored[k]]
        if wrong:
            raise ValueError(f"{out}: parameter shapes do not match the model:\n  " + "\n  ".join(wrong))
    host = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
    target = {k: jax.ShapeDtypeStruct(shape, np.float32, sharding=shardings.get(k, host))
              for k, shape in stored.items()}
    alone = all(s.is_fully_addressable for s in shardings.values())
    processes = this_process_only() if alone else ocp.options.MultiprocessingOptions()
    with ocp.StandardCheckpointer(multiprocessing_options=processes) as checkpointer:
        tree = checkpointer.restore(path, _nest(target))
    restored = {k: v if k in shardings else np.asarray(v) for k, v in flatten_nested(tree).items()}
    return restored if keys is None else {k: restored[k] for k in keys}


def stored_shapes(out: str) -> dict[str, tuple[int, ...]]:
    """Dotted path -> shape of every parameter in the export at `out` (nothing is read)."""
    path, stored = os.path.join(os.path.abspath(out), PARAMS_DIR), None
    if os.path.isdir(path):
        with ocp.StandardCheckpointer() as checkpointer:
            stored = checkpointer.metadata(path).item_metadata  # None where orbax finds no checkpoint
    if stored is None:  # e.g. a model.json written alone (`write_config`)
        raise FileNotFoundError(f"{out}: holds no parameters ({PARAMS_DIR}/ missing or no orbax checkpoint), "
                                f"only {CONFIG_FILE}; write the export again with `python -m seed_jax.convert ...` "
                                "or `python -m seed_jax.export ...`")
    return {k: tuple(m.shape) for k, m in flatten_nested(dict(stored)).items()}


def materialize(abstract: nnx.Module, params: dict[str, Any]) -> nnx.Module:
    """The abstract model (from `build(..., abstract=True)`) with every parameter set
    from `params` (dotted path -> array)."""
    graphdef, state = nnx.split(abstract)
    for path, var in nnx.to_flat_state(state):
        name = ".".join(str(k) for k in path)
        if name not in params:
            raise KeyError(f"{name}: no value given for this parameter of {type(abstract).__name__}")
        var.set_value(jnp.asarray(params[name], var.get_value().dtype))
    return nnx.merge(graphdef, state)


def assign(module: nnx.Module, params: dict[str, Any]) -> None:
    """Sets the listed parameters of `module` (dotted paths) in place."""
    state = nnx.state(module, nnx.Param)
    flat = {".".join(str(k) for k in path): var for path, var in nnx.to_flat_state(state)}
    for name, value in params.items():
        if name not in flat:
            raise KeyError(f"{name}: not a parameter of {type(module).__name__}")
        flat[name].set_value(jnp.asarray(value, flat[name].get_value().dtype))
    nnx.update(module, state)


def flat_shardings(shardings: nnx.State) -> dict:
    """Dotted path -> sharding, from `parallel.state_shardings` of a module's state."""
    return {".".join(str(k) for k in path): var for path, var in nnx.to_flat_state(shardings)}


def load_model(out: str, *, dtype=jnp.float32, kind: str | None = None, mesh: jax.sharding.Mesh | None = None,
               rules: parallel.Rules = parallel.DEFAULT_RULES):
    """(model, kind, config) from the export at `out`, every parameter checked; with
    `mesh`, each read straight into its sharding there (split by `rules`), else to host."""
    found, config, _ = read_config(out, kind)
    abstract = build(found, config, dtype=dtype, abstract=True)
    check_shapes(stored_shapes(out), shapes(flat_params(abstract)), what=f"{out} parameters")
    shardings = None if mesh is None else flat_shardings(parallel.state_shardings(nnx.state(abstract), mesh, rules))
    return materialize(abstract, load_params(out, shardings=shardings)), found, config
