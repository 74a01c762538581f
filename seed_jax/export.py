"""Exports a tokenizer training workdir to the inference format (orbax params +
model.json), the same format the converters write.

  python -m seed_jax.export --workdir=workdirs/tokenizer_demo --out=exports/demo [--stage=stage2]

The model is rebuilt as training built it (config.json of the workdir, its
`init.*` exports), then each stage's latest checkpoint sets what that stage
trained. `--stage=stage1` exports after stage I (to start stage II elsewhere with
`--config.init.stage1`); the default takes every stage that has a checkpoint.
"""

from __future__ import annotations

import json
import os
import sys

import jax
import ml_collections
from absl import app, flags, logging

from seed_jax import command_line, parallel, weights
from seed_jax.trainers import checkpointing
from seed_jax.trainers import tokenizer as tokenizer_trainer


def read_workdir_config(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, "config.json")
    if os.path.exists(os.path.join(workdir, weights.CONFIG_FILE)) and not os.path.exists(path):
        raise FileNotFoundError(f"workdir {workdir}: an export ({weights.CONFIG_FILE}), not a training workdir: "
                                "load it as it is")
    if not os.path.exists(path):
        raise FileNotFoundError(f"workdir {workdir}: no config.json (is it a training workdir?)")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def export(workdir: str, out: str, last_stage: str = "stage2") -> dict:
    """Writes the tokenizer of `workdir` to `out`; returns {stage: restored step or None}.
    Runs on this process alone (in a multi-host run, one process calls it). A workdir or
    stage it cannot export is a `command_line.ConfigError`."""
    with command_line.config_checks():
        config = read_workdir_config(workdir)
        if config.trainer != "tokenizer":
            raise ValueError(f"workdir {workdir}: trainer {config.trainer!r}, expected 'tokenizer'"
                             + (f" (the {config.trainer} trainer exports to {os.path.join(workdir, 'export')} itself)"
                                if config.trainer in ("decoder", "seed_opt") else ""))
        stages = tokenizer_trainer.stages_to_run(config)
        if last_stage not in stages:
            raise ValueError(f"stage: {last_stage!r} was not trained in workdir {workdir} (it trained {stages}, "
                             f"starting from init.stage1={config.init.stage1!r})")
    stages = stages[:stages.index(last_stage) + 1]
    mesh = parallel.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.local_devices()[:1])
    model = tokenizer_trainer.create_model(config, mesh)
    restored = {}
    for name in stages:
        trainable = tokenizer_trainer.trainable(model, config[name])
        try:
            restored[name] = checkpointing.restore_trained_params(model, trainable,
                                                                  os.path.join(workdir, "checkpoints", name))
        except checkpointing.CheckpointMismatch as e:
            raise command_line.ConfigError(
                f"{e} than {os.path.join(workdir, 'config.json')}, which the export builds the model from: export "
                "with the config the run was trained with (that file as its training wrote it)") from None
    if all(step is None for step in restored.values()):
        raise command_line.ConfigError(f"workdir {workdir}: no checkpoints under checkpoints/{'|'.join(stages)}")
    for name, step in restored.items():
        if step is not None and step < config[name].num_steps:
            logging.warning("workdir %s: %s trained %d of its %d steps (the run is unfinished): the export holds "
                            "that step's parameters", workdir, name, step, config[name].num_steps)
    tokenizer = model.tokenizer
    weights.save(out, "seed_tokenizer", tokenizer.config, weights.flat_params(tokenizer),
                 info={"workdir": os.path.abspath(workdir), "steps": restored})
    return restored


def define_flags() -> None:
    """Flags of the command line (defined only there: trainers import `export`)."""
    flags.DEFINE_string("workdir", None, "Training workdir (holds config.json and checkpoints/).")
    flags.DEFINE_string("out", None, "New export directory.")
    flags.DEFINE_enum("stage", "stage2", ["stage1", "stage2"], "Last stage to take parameters from.")


def main(argv):
    command_line.refuse_positional_arguments(argv)
    workdir, out = command_line.user_path(flags.FLAGS.workdir), command_line.user_path(flags.FLAGS.out)
    if not workdir or not out:
        raise app.UsageError("--workdir and --out are required")
    try:
        weights.check_free(out)  # before the model is built and restored
        restored = export(workdir, out, flags.FLAGS.stage)
    except (command_line.ConfigError, FileExistsError) as error:  # its message says what to change: no traceback
        sys.exit(f"FATAL export error: {error}")
    for name, step in restored.items():
        if step is None:
            logging.warning("%s has no checkpoint: its parameters are the initial ones", name)
    print(f"exported {workdir} ({', '.join(f'{k} step {v}' for k, v in restored.items())}) to {out}")
    return 0


if __name__ == "__main__":
    define_flags()
    sys.exit(app.run(main))
