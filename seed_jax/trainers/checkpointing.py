"""Checkpoints of a stage (orbax): train state, data iterator and counts; reading a checkpoint directory."""

from __future__ import annotations

import functools
import os

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

from seed_jax import command_line, weights


@functools.cache  # once per process: orbax logs a warning at each registration
def _copy_whole_arrays_to_host_on_cpu() -> None:
    """On CPU, saves copy each replicated array to the host whole. orbax's default,
    replica-parallel saving, first slices such an array into one piece per replica on
    the devices, which compiles a slicing program per array shape: 9-12 s of a tiny
    run's first checkpoint on 8 CPU devices, for nothing where the device-to-host copy
    is a memcpy. On GPU and TPU orbax's default stands. (Its handler also records the
    type of PRNG key arrays; the train state holds none: the step's key derives from
    the step.)"""
    if jax.default_backend() == "cpu":
        ocp.type_handlers.register_type_handler(
            jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)


def _align_orbax_operation_ids() -> None:
    """Brings orbax's save counter (its "operation id") on every process to the highest
    one. orbax keys the signals of a save across processes by it (e.g. "the primary host
    has created the checkpoint's directories"), and each save advances it, also a save by
    one process alone, such as process 0 writing an export (`weights.save`): then the
    next save of the run was keyed apart on process 0 and the others, whose processes did
    not wait for the directories and crashed writing into them (FileNotFoundError for the
    grain iterator's state; process 0 then waited out the coordination timeout)."""
    if jax.process_count() == 1:
        return
    from orbax.checkpoint._src.futures.synchronization import OperationIdGenerator

    highest = int(multihost_utils.process_allgather(np.asarray(int(OperationIdGenerator.get_current_operation_id())))
                  .max())
    while int(OperationIdGenerator.get_current_operation_id()) < highest:
        OperationIdGenerator.next_operation_id()


class CheckpointMismatch(ValueError):
    """A checkpoint's arrays differ from those the config builds; who reads it adds what to do
    (resume with another config, export with the run's own)."""


class Checkpointer:
    """orbax CheckpointManager holding the train state, the grain iterator state,
    the run's counts (summed over processes, e.g. skipped records) and the metrics of the
    steps since the last log line (`unlogged`). `read_alone`: only
    reads parameters (`restore_params`), on this process alone (e.g. to export on
    process 0 of a multi-host run)."""

    def __init__(self, directory: str, *, keep: int, read_alone: bool = False):
        _copy_whole_arrays_to_host_on_cpu()
        processes = weights.this_process_only() if read_alone else ocp.options.MultiprocessingOptions()
        # Reading a part of the train state takes the PyTree handler (the Standard one
        # restores whole trees); both read the same files.
        state_handler = ocp.PyTreeCheckpointHandler if read_alone else ocp.StandardCheckpointHandler
        self.manager = ocp.CheckpointManager(
            os.path.abspath(directory),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_alone, read_only=read_alone,
                                                 multiprocessing_options=processes),
            item_handlers={"state": state_handler(multiprocessing_options=processes),
                           "data": grain.checkpoint.CheckpointHandler(),
                           "counts": ocp.JsonCheckpointHandler(multiprocessing_options=processes),
                           "unlogged": ocp.JsonCheckpointHandler(multiprocessing_options=processes)})

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_iterator, counts: dict[str, float],
             unlogged: list[dict[str, np.ndarray]] = ()) -> None:
        """`unlogged`: each step's host metrics since the last log line (values of any float
        dtype), restored as they were."""
        _align_orbax_operation_ids()
        dtypes = {k: str(v.dtype) for k, v in unlogged[0].items()} if unlogged else {}
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iterator),
            counts=ocp.args.JsonSave(counts),
            unlogged=ocp.args.JsonSave({"dtypes": dtypes,
                                        "steps": [{k: float(v) for k, v in m.items()} for m in unlogged]})),
                          force=True)

    def check_fits(self, step: int, abstract_state, part: str | None = None) -> None:
        """Raises CheckpointMismatch naming each array of the train state whose shape differs between the
        checkpoint at `step` and `abstract_state` (or that only one of them has), before
        orbax would fail naming none. `part`: `abstract_state` holds that key of the
        train state alone (e.g. "params"), and only it is compared."""
        def flat_shapes(tree):
            return {k: tuple(v.shape) for k, v in ocp.tree.to_flat_dict(tree, sep=".").items() if v is not None}

        stored = flat_shapes(self.manager.item_metadata(step)["state"].tree)
        if part is not None:
            stored = {k: v for k, v in stored.items() if k.startswith(f"{part}.")}
            abstract_state = {part: abstract_state}
        try:
            weights.check_shapes(stored, flat_shapes(ocp.tree.serialize_tree(abstract_state, keep_empty_nodes=True)),
                                 what=f"{self.manager.directory} step {step}: the train state's arrays")
        except ValueError as e:
            raise CheckpointMismatch(f"{e}\n(expected, missing: what the config builds; got, unexpected: what the "
                                     "checkpoint holds.) The checkpoint was written with another model config or "
                                     "`trainable` list") from None

    def restore_params(self, step: int, abstract_params):
        """The train state's parameters alone, e.g. to export them: its optimizer state
        (twice the parameters' bytes under AdamW) and the data iterator are not read."""
        self.check_fits(step, abstract_params, part="params")
        item = {"params": abstract_params}
        restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True)))
        return restored["state"]["params"]

    def restore(self, step: int, abstract_state, data_iterator) -> tuple[dict, dict[str, float], list[dict]]:
        """(train state, counts, unlogged step metrics); sets `data_iterator`'s state (None:
        a finished stage, which reads no more data). Checkpoints written before counts
        (unlogged metrics) were saved give none.
        A checkpoint written by another number of processes (a run resumed on fewer or
        more hosts) holds no position in this process's slice of the data: the iterator
        then starts afresh, with a warning. Any other error reading it is raised again
        naming the checkpoint and that removing it resumes from the one before (on the
        processes that met it, as before: no process waits on another for it), with its first
        cause (tensorstore's, naming the array and file): orbax's own traceback may be buried
        under the "Event loop is closed" lines of the array reads still in flight."""
        try:
            return self._restore(step, abstract_state, data_iterator)
        except CheckpointMismatch as e:
            raise CheckpointMismatch(f"{e}: resume with the config that wrote it, or train into a new "
                                     "workdir") from None
        except Exception as e:
            earlier = [s for s in self.manager.all_steps() if s < step]
            since = f"its checkpoint of step {max(earlier)}" if earlier else "step 0 (no earlier checkpoint is kept)"
            cause = e
            while cause.__cause__ is not None:
                cause = cause.__cause__
            raise RuntimeError(f"{self.manager.directory / str(step)}: the checkpoint the run resumes from could not "
                               f"be read ({type(cause).__name__}: {cause}); if it is damaged, remove that folder and "
                               f"the stage resumes from {since}") from e

    def _restore(self, step: int, abstract_state, data_iterator) -> tuple[dict, dict[str, float], list[dict]]:
        self.check_fits(step, abstract_state)
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        directory = self.manager.directory / str(step)  # epath: local or cloud storage
        data_file = f"process_{jax.process_index()}-of-{jax.process_count()}.json"  # grain's naming
        if data_iterator is not None and (directory / "data" / data_file).exists():
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        elif data_iterator is not None:
            written = sorted(p.name for p in (directory / "data").glob("process_*.json"))
            whose = (f"was written by other processes ({', '.join(written)}), not for this one ({data_file})"
                     if written else "was not saved")
            logging.warning("%s step %d: the data iterator's state %s: the train data starts afresh for this "
                            "process's slice", self.manager.directory, step, whose)
        for item in ("counts", "unlogged"):
            if (directory / item).exists():
                items[item] = ocp.args.JsonRestore()
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        unlogged = restored.get("unlogged") or {"dtypes": {}, "steps": []}
        return (restored["state"], dict(restored.get("counts") or {}),
                [{k: np.asarray(v, unlogged["dtypes"][k]) for k, v in m.items()} for m in unlogged["steps"]])

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.close()


def latest_checkpoint_step(checkpoint_dir: str) -> int | None:
    """The last step saved in `checkpoint_dir` (None: none), read on this process alone."""
    if not os.path.isdir(checkpoint_dir):
        return None
    checkpointer = Checkpointer(checkpoint_dir, keep=1, read_alone=True)
    try:
        return checkpointer.latest_step()
    finally:
        checkpointer.close()


def trained_steps(checkpoint_root: str, stages: list[tuple[str, str]]) -> dict[str, int]:
    """`stages`: (checkpoint folder name, config key). Config key -> the step of that
    stage's latest checkpoint (0: none, a stage of no steps): the step a finished run's
    parameters were trained to, which its `num_steps` does not name once lowered below
    it (the stage then resumes from that checkpoint as it is)."""
    return {key: latest_checkpoint_step(os.path.join(checkpoint_root, name)) or 0 for name, key in stages}


def check_stage_order(checkpoint_root: str, stages: list[tuple[str, str, int]],
                      new_workdir: str = "--workdir=DIR") -> None:
    """`stages`: (checkpoint folder name, config key, num_steps) in training order.
    Raises when a stage would train further (its last checkpoint is below its
    `num_steps`, e.g. raised on the command line) while a later stage already has
    checkpoints: that stage would resume from them, trained after the earlier end, and
    the new training would be dropped (SEED-OPT's phases train the same parameters) or
    paired with parameters fit to the old ones (the tokenizer's codebook). The error
    names the flags that avoid it: the config key's (--config.KEY.num_steps) and
    `new_workdir`."""
    for i, (name, key, num_steps) in enumerate(stages):
        latest = latest_checkpoint_step(os.path.join(checkpoint_root, name)) or 0
        if latest >= num_steps:
            continue
        later = [os.path.join(checkpoint_root, n) for n, _, _ in stages[i + 1:]
                 if latest_checkpoint_step(os.path.join(checkpoint_root, n)) is not None]
        if later:
            since = (f"would train on from step {latest}, but the later stages' checkpoints {later} were trained "
                     "after it ended there" if latest else
                     f"has no checkpoint and would train from step 0, but the later stages' checkpoints {later} were "
                     "trained after an earlier run of it")
            keep = (f", or keep {key}.num_steps at {latest} ({command_line.override_flag(f'{key}.num_steps', latest)})"
                    if latest else "")
            raise ValueError(f"{key}.num_steps {num_steps}: {name} {since} and would be resumed as they are; remove "
                             f"them to train those stages again{keep} (or train into a new workdir: {new_workdir})")
        return


def restore_trained_params(model: nnx.Module, trainable, checkpoint_dir: str) -> int | None:
    """Sets the parameters a stage trains from its latest checkpoint in `checkpoint_dir`;
    returns that step (None, model untouched, if there is no checkpoint). Reads on this
    process alone (in a multi-host run, one process exports)."""
    if not os.path.isdir(checkpoint_dir):
        return None
    checkpointer = Checkpointer(checkpoint_dir, keep=1, read_alone=True)
    try:
        step = checkpointer.latest_step()
        if step is None:
            return None
        _, params, _ = nnx.split(model, trainable, ...)
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), params)
        nnx.update(model, checkpointer.restore_params(step, abstract))
        return step
    finally:
        checkpointer.close()
