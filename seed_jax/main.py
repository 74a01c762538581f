"""Trains what a config file describes (or pre-tokenizes image shards):

  python -m seed_jax.main --config=configs/CONFIG.py[:PRESET[,LAYOUT]] [--workdir=DIR] [--config.KEY=VALUE ...]

  configs/tokenizer.py    the SEED tokenizer; PRESET demo (default), seed1 or tiny
  configs/decoder.py      the demo de-tokenizer (codes -> images); PRESET demo (default) or tiny
  configs/seed_opt.py     SEED-OPT; PRESET demo (default), seed_opt_2.7b or tiny
  configs/pretokenize.py  image-caption shards -> SEED code records; no presets
  LAYOUT (tokenizer.py, seed_opt.py): cpu, gpu8, gpu8x8 or tpu_v4_32

Every field of the config can be set, e.g. --config.stage1.num_steps=100, a tuple as
--config.data.crop_scale="(1.0, 1.0)". The same command again resumes its workdir
(README.md).
"""

from __future__ import annotations

import os
import sys

from seed_jax import host_memory

if __name__ == "__main__":  # before JAX loads, so that the restart costs a fraction of a second
    host_memory.restart_with_huge_pages()

import jax  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from seed_jax import command_line, config_files  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/tokenizer.py:demo.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and exports go "
                               "(default: ./workdirs/<trainer>_<preset>).")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize (multi-host); "
                                 "coordinator and process ids come from the flags below or the cluster (SLURM, TPU).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's id.")


@flags.multi_flags_validator(["distributed", "coordinator_address", "num_processes", "process_id"])
def _processes_only_with_distributed(values) -> bool:
    """The process flags without --distributed were ignored: each process trained alone,
    all of them into the same workdir."""
    given = [f"--{name}" for name in ("coordinator_address", "num_processes", "process_id")
             if values[name] is not None]
    if given and not values["distributed"]:
        raise flags.ValidationError(f"{', '.join(given)} given without --distributed, which they are read with: "
                                    "add --distributed (else each process would train alone, into the same workdir)")
    return True


def _trainers():
    from seed_jax.trainers import decoder, pretokenize, seed_opt, tokenizer

    return {"tokenizer": tokenizer.train, "decoder": decoder.train, "pretokenize": pretokenize.run,
            "seed_opt": seed_opt.train}


def _quiet_libraries(record) -> bool:
    """Keeps orbax's and grain's per-save INFO chatter out of the log (warnings stay)."""
    noisy = ("/orbax/", "/grain/", "/jax/_src/")
    return record.levelno >= 30 or not any(part in record.pathname for part in noisy)


def _check_trainer_is_the_files(trainer: str) -> None:
    """A UsageError unless `trainer` (config.trainer) is the one the --config file sets:
    `--config.trainer=decoder` on the tokenizer's config ran the decoder's trainer on it,
    which failed on the first field it lacks, in ml_collections' traceback."""
    path, *arg = config_flags.get_config_filename(flags.FLAGS[_CONFIG.name]).split(":", 1)
    own = config_files.load(path, *arg).trainer  # of the preset given, as a config file may need one
    if trainer != own:
        raise app.UsageError(f"config.trainer: {path} configures the {own!r} trainer, got {trainer!r}: give the "
                             f"{trainer!r} trainer's config file instead (--config=configs/FILE.py)")


def main(argv):
    command_line.refuse_positional_arguments(argv)
    logging.get_absl_handler().addFilter(_quiet_libraries)
    if "GLIBC_TUNABLES" in os.environ:  # set by host_memory.restart_with_huge_pages, or by the caller
        logging.info("GLIBC_TUNABLES=%s", os.environ["GLIBC_TUNABLES"])
    if _DISTRIBUTED.value:
        jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config is required, e.g. --config=configs/tokenizer.py")
    command_line.expand_user_paths(config)
    workdir = os.path.abspath(command_line.checked_workdir(_WORKDIR.value) or
                              config_files.default_workdir(config.trainer, config.preset))
    trainers = _trainers()
    if config.trainer not in trainers:
        raise app.UsageError(f"config.trainer: expected one of {sorted(trainers)}, got {config.trainer!r}")
    _check_trainer_is_the_files(config.trainer)
    logging.info("workdir: %s", workdir)
    print(f"workdir: {workdir}", flush=True)
    try:
        completed = trainers[config.trainer](config, workdir)
    except command_line.ConfigError as error:  # its message says what to change: no traceback
        # unless asked for (--verbosity=1): a bug inside a check also raises a ValueError
        logging.debug("where the config error was raised:", exc_info=error)
        sys.exit(f"FATAL config error: {error}")
    print("done" if completed else "preempted: checkpoint saved; re-run the same command to resume", flush=True)


if __name__ == "__main__":
    app.run(main, flags_parser=command_line.parse_config_flags)
