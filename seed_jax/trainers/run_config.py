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

from seed_jax import weights
from seed_jax.data import records
from seed_jax.trainers import checkpointing


def write(workdir: str, config: ml_collections.ConfigDict, defining: Sequence[str]) -> None:
    """Writes `config` to WORKDIR/config.json (process 0). Once the workdir holds a
    checkpoint, the settings under the dotted keys `defining` (e.g. "model", "seed")
    must equal those of its config.json: else a ValueError naming each that differs,
    and config.json stays as it was. Keys only one side has (settings added or removed
    since) are not compared."""
    path = os.path.join(workdir, "config.json")
    settings = json.loads(config.to_json())
    if os.path.exists(path) and _has_checkpoints(workdir):
        with open(path) as f:
            trained = json.load(f)
        changed = _differing(trained, settings, defining)
        if changed:
            listed = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
            flags = " ".join(f"--config.{k}={old!r}" for k, (old, _) in changed.items())
            raise ValueError(f"workdir {workdir}: its checkpoints were trained with other settings than this run's "
                             f"({listed}); its config.json records what they are and is kept. Train into a new "
                             f"workdir, or resume with the settings it was trained with ({flags})")
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
        records.write_json(path, settings, indent=2)


def _has_checkpoints(workdir: str) -> bool:
    root = os.path.join(workdir, "checkpoints")
    return os.path.isdir(root) and any(
        checkpointing.latest_checkpoint_step(os.path.join(root, name)) is not None for name in sorted(os.listdir(root)))


def _differing(trained: dict, settings: dict, defining: Sequence[str]) -> dict[str, tuple]:
    """Dotted key -> (trained value, this run's) for the leaves under `defining` that
    both configs hold and that differ."""
    old, new = weights.flatten_nested(trained), weights.flatten_nested(settings)
    return {k: (old[k], new[k]) for k in sorted(old.keys() & new.keys())
            if any(k == d or k.startswith(d + ".") for d in defining) and old[k] != new[k]}
