"""Config files (`configs/*.py`) loaded by path, as `--config=FILE:ARG` loads them:
the configs directory is not an installed package, so a config that builds on
another, or a notebook, loads it from its file."""

from __future__ import annotations

import importlib.util
import os
import types

import ml_collections


def load_module(path: str) -> types.ModuleType:
    """The config file at `path` as a module (its `get_config`, presets, ...)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} does not exist")
    name = "seed_jax_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sibling(config_file: str, name: str) -> types.ModuleType:
    """The config file `name` in the same directory as `config_file` (a `__file__`)."""
    return load_module(os.path.join(os.path.dirname(os.path.abspath(config_file)), name))


def default_workdir(trainer: str, preset: str) -> str:
    """Where `python -m seed_jax.main` writes a run given no --workdir, relative to the
    current directory: workdirs/<trainer>_<preset>."""
    return os.path.join("workdirs", f"{trainer}_{preset}")


def load(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """`get_config(arg)` of the config file at `path`, e.g. ("configs/tokenizer.py", "tiny")."""
    return load_module(path).get_config(arg)
