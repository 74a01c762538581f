"""WORKDIR/config.json: the settings a run trains with. Exports and the trainers built
on a finished run (`tokenizer.ensure_trained`, the decoder, SEED-OPT) rebuild its models
from it, so a run resumed or rerun in the same workdir may change how long and how it
trains, but not the settings that define what it trained."""

from __future__ import annotations

import json
import os
from typing import Sequence

import jax
import ml_collections

from seed_jax import command_line, weights
from seed_jax.data import records
from seed_jax.trainers import checkpointing


def write(workdir: str, config: ml_collections.ConfigDict, defining: Sequence[str], paths: Sequence[str] = (),
          prefix: str = "") -> None:
    """Writes `config` to WORKDIR/config.json (process 0), once `check` finds it may: else
    its ValueError, and config.json stays as it was."""
    check(workdir, config, defining, paths, prefix)
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
        records.write_json(os.path.join(workdir, "config.json"), _absolute_paths(json.loads(config.to_json()), paths),
                           indent=2)


def check(workdir: str, config: ml_collections.ConfigDict, defining: Sequence[str], paths: Sequence[str] = (),
          prefix: str = "") -> None:
    """Once the workdir holds a checkpoint, the settings under the dotted keys `defining`
    (e.g. "model", "seed") must equal those of its config.json: else a ValueError naming
    each that differs (`changed_settings`). The keys and flags the error names start with
    `prefix`: "tokenizer." where `config` is a trainer's nested `config.tokenizer`, whose
    fields its command line sets as --config.tokenizer.KEY. The trainers check this before
    the order of their stages' steps, whose error would otherwise come first for a run
    given another model, proposing steps with which it is still refused."""
    path = os.path.join(workdir, "config.json")
    if os.path.exists(path) and _has_checkpoints(workdir):
        changed = changed_settings(workdir, config, defining, paths)
        if changed:
            preset = _read_recorded(path).get("preset")
            raise ValueError(f"workdir {workdir}: its checkpoints were trained with other settings than this run's "
                             f"({listed(changed, prefix)}); its config.json records what they are and is kept. "
                             f"Train into a new workdir ({new_workdir_flag(prefix)}), or resume with the settings "
                             f"it was trained with: {_flags(changed, prefix, preset)}")


def changed_settings(workdir: str, config: ml_collections.ConfigDict, defining: Sequence[str],
                     paths: Sequence[str] = ()) -> dict[str, tuple]:
    """Dotted key -> (WORKDIR/config.json's value, `config`'s) for each setting under the
    dotted keys `defining` that differs. Keys only one side has (settings added or
    removed since) are not compared. Settings under `paths` name files or directories:
    they are compared as absolute paths (one recorded relative is taken from the current
    directory), so that one directory named two ways ('workdirs/x' in /repo and
    '/repo/workdirs/x', as a notebook names it) is one setting; `write` records them so."""
    trained = _absolute_paths(_read_recorded(os.path.join(workdir, "config.json")), paths)
    return _differing(trained, _absolute_paths(json.loads(config.to_json()), paths), defining)


def new_workdir_flag(prefix: str = "") -> str:
    """The flag naming another workdir for the run whose fields start with `prefix`:
    --workdir, or --config.tokenizer_workdir for a trainer's nested `config.tokenizer`."""
    return f"--{command_line.CONFIG_FLAG}.{prefix[:-1]}_workdir=DIR" if prefix else "--workdir=DIR"


def listed(changed: dict[str, tuple], prefix: str = "") -> str:
    """`changed` (`changed_settings`) as "PREFIXKEY: recorded -> given, ..."."""
    return ", ".join(f"{prefix}{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())


def _read_recorded(path: str) -> dict:
    """The settings a workdir's config.json at `path` records, else a ValueError naming it
    (it may have been edited by hand)."""
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not JSON ({error}); it records the settings the workdir's checkpoints "
                             "were trained with, to compare with this run's: correct it, or train into a new "
                             "workdir") from None


def _flags(changed: dict[str, tuple], prefix: str = "", preset: str | None = None) -> str:
    """The command-line flags that set each changed key (after `prefix`) back to its
    trained value; a None, which no flag sets, as the flag to leave out where the
    preset's default is None (the run's `preset`, if recorded, named)."""
    flags = [command_line.override_flag(f"{prefix}{k}", old) for k, (old, _) in changed.items() if old is not None]
    unset = [f"--{command_line.CONFIG_FLAG}.{prefix}{k}" for k, (old, _) in changed.items() if old is None]
    if not unset:
        return " ".join(flags)
    run_preset = f"; the run's preset was {preset!r}" if preset else ""
    return " ".join(flags) + (f" (and None for {', '.join(unset)}, which no flag sets: leave the flag out, with a "
                              f"preset whose default is None{run_preset})")


def _has_checkpoints(workdir: str) -> bool:
    root = os.path.join(workdir, "checkpoints")
    return os.path.isdir(root) and any(
        checkpointing.latest_checkpoint_step(os.path.join(root, name)) is not None for name in sorted(os.listdir(root)))


def _under(key: str, prefixes: Sequence[str]) -> bool:
    """Whether the dotted `key` is one of `prefixes` or lies under one."""
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _absolute_paths(settings, paths: Sequence[str], key: str = ""):
    """`settings` (nested dicts) with each non-empty string under the dotted keys `paths`
    made absolute ("" stays: it names no file; so does a URL, e.g. gs://bucket/run)."""
    if isinstance(settings, dict):
        return {k: _absolute_paths(v, paths, f"{key}.{k}" if key else k) for k, v in settings.items()}
    if isinstance(settings, str) and settings and "://" not in settings and _under(key, paths):
        return os.path.abspath(settings)
    return settings


def _differing(trained: dict, settings: dict, defining: Sequence[str]) -> dict[str, tuple]:
    """Dotted key -> (trained value, this run's) for the leaves under `defining` that
    both configs hold and that differ."""
    old, new = weights.flatten_nested(trained), weights.flatten_nested(settings)
    return {k: (old[k], new[k]) for k in sorted(old.keys() & new.keys()) if _under(k, defining) and old[k] != new[k]}
