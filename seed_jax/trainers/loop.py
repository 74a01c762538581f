"""Pieces every trainer shares: optimizer, sharded state, checkpoints with the data
iterator, preemption (SIGTERM), metrics (jsonl + TensorBoard) and progress lines."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import time
from typing import Callable

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

from seed_jax import parallel, weights

NO_DECAY_NAMES = ("bias", "scale", "q_bias", "k_bias", "v_bias", "out_bias", "patch_bias", "temp")


def decay_mask(params: nnx.State):
    """True for parameters that take weight decay: matrices and embeddings, not
    biases, norm scales or the temperature (as LAVIS does)."""
    def decays(path, _):
        name = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)][-1]
        return name not in NO_DECAY_NAMES

    return jax.tree.map_with_path(decays, params)


LOOP_SETTINGS = ("log_every_steps", "eval_every_steps", "checkpoint_every_steps", "keep_checkpoints")
# As `eval_every_steps`: evaluate at the last step of each stage only, however many steps
# it is given (a number fixed in the config would also evaluate mid-run once `num_steps`
# is raised past it on the command line).
AT_STAGE_END = 0


def check_loop_settings(config) -> None:
    """Raises naming the field unless each of `LOOP_SETTINGS` is an integer >= 1
    (`eval_every_steps` >= 0: AT_STAGE_END): an interval of 0 failed at the first step,
    after compiling, as a bare modulo by zero, and orbax keeps no checkpoint at all with
    `keep_checkpoints` 0 (each save deleted at once), so a preempted run started again
    from step 0."""
    for name in LOOP_SETTINGS:
        value, least = config[name], AT_STAGE_END if name == "eval_every_steps" else 1
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
            meaning = f" ({AT_STAGE_END}: at the last step of each stage only)" if least == AT_STAGE_END else ""
            raise ValueError(f"{name}: expected an integer >= {least}{meaning}, got {value!r}")


def check_batch_sizes(config, batch_sizes: dict[str, int]) -> None:
    """Raises naming the field unless each of `batch_sizes` (config field -> global batch
    size) splits evenly over the batch axes of `config.mesh` (`parallel.check_batch_size`)."""
    mesh = parallel.make_mesh(config.mesh.to_dict())
    for field, size in batch_sizes.items():
        parallel.check_batch_size(field, size, mesh, config.axis_rules)


def make_schedule(stage) -> optax.Schedule:
    """Linear warm-up from `init_lr` to `lr`, then cosine to `end_lr`."""
    return optax.warmup_cosine_decay_schedule(
        init_value=stage.init_lr, peak_value=stage.lr, warmup_steps=stage.warmup_steps,
        decay_steps=max(stage.num_steps, stage.warmup_steps + 1), end_value=stage.end_lr)


def make_optimizer(stage) -> optax.GradientTransformation:
    """AdamW on `make_schedule(stage)`."""
    return optax.adamw(make_schedule(stage), b1=stage.b1, b2=stage.b2, weight_decay=stage.weight_decay, mask=decay_mask)


def warn_if_warmup_outlasts(name: str, stage) -> None:
    """Logs a warning when `stage.warmup_steps` >= `stage.num_steps`: the learning rate
    then rises for the whole stage and never reaches `lr` (e.g. `num_steps` lowered on
    the command line below a preset's warm-up)."""
    if stage.warmup_steps >= stage.num_steps:
        logging.warning("%s: warmup_steps %d is not below num_steps %d, so the learning rate never reaches "
                        "lr %g (it ends at %g); lower warmup_steps with num_steps", name, stage.warmup_steps,
                        stage.num_steps, stage.lr, float(make_schedule(stage)(stage.num_steps - 1)))


def global_batch(local: dict[str, np.ndarray], mesh, rules) -> dict[str, jax.Array]:
    """This process's rows -> global arrays sharded on the batch axis."""
    def one(x):
        global_shape = (x.shape[0] * jax.process_count(), *x.shape[1:])
        sharding = parallel.batch_sharding(mesh, rules, x.ndim, global_shape[0])
        if jax.process_count() > 1:
            _check_rows_per_process(mesh, sharding.spec[0], global_shape[0])
        return jax.make_array_from_process_local_data(sharding, x, global_shape)

    return {k: one(v) for k, v in local.items()}


@functools.lru_cache  # once per mesh and batch layout, not every step
def _check_rows_per_process(mesh, batch_axes: str | tuple[str, ...] | None, global_size: int) -> None:
    """Each process feeds rows of its own, so the devices holding one batch shard must
    belong to one process: the batch is sharded (over `batch_axes`), and no other mesh
    axis spans processes."""
    if batch_axes is None:
        raise ValueError(f"batch size {global_size} is not sharded over mesh {dict(mesh.shape)} (its batch axes "
                         f"have size 1 or do not divide it), but {jax.process_count()} processes each feed rows "
                         "of their own: choose batch_size / eval.batch_size or the mesh accordingly")
    processes = np.vectorize(lambda d: d.process_index)(mesh.devices)
    spanning = parallel.axes_spanning_processes(processes, mesh.axis_names, batch_axes)
    if spanning:
        raise ValueError(
            f"mesh {dict(mesh.shape)}: axes {spanning} span processes but do not shard the batch, so processes "
            f"feeding different rows would share batch shards; expected the mesh axes other than {batch_axes} "
            f"to fit within one process's {jax.local_device_count()} devices")


def to_host(x: jax.Array) -> np.ndarray:
    """A global array gathered on every host as numpy."""
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


class Preemption:
    """Records SIGTERM (how SLURM and TPU maintenance announce preemption)."""

    def __init__(self):
        self._requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: will checkpoint and exit")
        self._requested = True

    def requested(self, sync: bool) -> bool:
        """Whether to stop now. With several processes they agree (one collective),
        only when `sync` is True, so that all stop at the same step."""
        if jax.process_count() == 1:
            return self._requested
        return sync and bool(multihost_utils.process_allgather(np.asarray(self._requested)).any())

    def close(self):
        signal.signal(signal.SIGTERM, self._previous)


class MetricsWriter:
    """One JSON object per line in WORKDIR/metrics.jsonl, plus TensorBoard under WORKDIR/tb."""

    def __init__(self, workdir: str):
        self.enabled = jax.process_index() == 0
        if self.enabled:
            from tensorboardX import SummaryWriter

            self.path = os.path.join(workdir, "metrics.jsonl")
            self.tb = SummaryWriter(os.path.join(workdir, "tb"))

    def write(self, step: int, stage: str, split: str, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "stage": stage, "split": split,
                  **{k: float(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for k, v in metrics.items():
            self.tb.add_scalar(f"{stage}/{split}/{k}", float(v), int(step))
        self.tb.flush()

    def _lines(self) -> list[tuple[str, dict | None]]:
        """metrics.jsonl's lines with their records (None for a line cut short by a kill)."""
        if not self.enabled or not os.path.exists(self.path):
            return []
        with open(self.path) as f:
            lines = f.readlines()
        parsed = []
        for line in lines:
            try:
                parsed.append((line, json.loads(line)))
            except json.JSONDecodeError:
                parsed.append((line, None))
        return parsed

    def forget_after(self, stage: str, step: int) -> None:
        """Drops the lines of `stage` past `step` (the step a run resumes from): a run that
        stopped without a checkpoint at its last logged step (a crash, a kill) logged steps
        that the resumed run logs again. A line cut short by a kill goes too. (TensorBoard's
        event files stay as they are.)"""
        lines = self._lines()
        kept = [line for line, record in lines
                if record is not None and not (record["stage"] == stage and record["step"] > step)]
        if len(kept) < len(lines):
            logging.info("%s: dropped %d lines of metrics.jsonl past step %d", stage, len(lines) - len(kept), step)
            with open(self.path + ".tmp", "w") as f:
                f.writelines(kept)
            os.replace(self.path + ".tmp", self.path)

    def holds(self, stage: str, step: int, split: str) -> bool:
        """Whether metrics.jsonl has a `split` line of `stage` at `step`: process 0 reads
        it, every process gets its answer."""
        found = any(record is not None and (record["stage"], record["step"], record["split"]) == (stage, step, split)
                    for _, record in self._lines())
        if jax.process_count() > 1:
            found = bool(multihost_utils.broadcast_one_to_all(np.asarray(found)))
        return found

    def close(self):
        if self.enabled:
            self.tb.close()


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


class Checkpointer:
    """orbax CheckpointManager holding the train state, the grain iterator state and
    the run's counts (summed over processes, e.g. skipped records). `read_alone`: only
    restores, on this process alone (e.g. to export on process 0 of a multi-host run)."""

    def __init__(self, directory: str, *, keep: int, read_alone: bool = False):
        _copy_whole_arrays_to_host_on_cpu()
        processes = weights.this_process_only() if read_alone else ocp.options.MultiprocessingOptions()
        self.manager = ocp.CheckpointManager(
            os.path.abspath(directory),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_alone, read_only=read_alone,
                                                 multiprocessing_options=processes),
            item_handlers={"state": ocp.StandardCheckpointHandler(multiprocessing_options=processes),
                           "data": grain.checkpoint.CheckpointHandler(),
                           "counts": ocp.JsonCheckpointHandler(multiprocessing_options=processes)})

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_iterator, counts: dict[str, float]) -> None:
        _align_orbax_operation_ids()
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iterator),
            counts=ocp.args.JsonSave(counts)), force=True)

    def check_fits(self, step: int, abstract_state) -> None:
        """Raises naming each array of the train state whose shape differs between the
        checkpoint at `step` and `abstract_state` (or that only one of them has), before
        orbax would fail naming none."""
        def flat_shapes(tree):
            return {k: tuple(v.shape) for k, v in ocp.tree.to_flat_dict(tree, sep=".").items() if v is not None}

        stored = flat_shapes(self.manager.item_metadata(step)["state"].tree)
        try:
            weights.check_shapes(stored, flat_shapes(ocp.tree.serialize_tree(abstract_state, keep_empty_nodes=True)),
                                 what=f"{self.manager.directory} step {step}: the train state's arrays")
        except ValueError as e:
            raise ValueError(f"{e}\n(expected, missing: what the config builds; got, unexpected: what the "
                             "checkpoint holds.) The checkpoint was written with another model config or "
                             "`trainable` list: resume with the config that wrote it, or train into a new "
                             "workdir") from None

    def restore_state(self, step: int, abstract_state):
        """The train state alone (no data iterator), e.g. to export parameters."""
        self.check_fits(step, abstract_state)
        restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
        return restored["state"]

    def restore(self, step: int, abstract_state, data_iterator) -> tuple[dict, dict[str, float]]:
        """(train state, counts); sets `data_iterator`'s state (None: a finished stage,
        which reads no more data). Checkpoints written before counts were saved give none.
        A checkpoint written by another number of processes (a run resumed on fewer or
        more hosts) holds no position in this process's slice of the data: the iterator
        then starts afresh, with a warning."""
        self.check_fits(step, abstract_state)
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        directory = self.manager.directory / str(step)  # epath: local or cloud storage
        data_file = f"process_{jax.process_index()}-of-{jax.process_count()}.json"  # grain's naming
        if data_iterator is not None and (directory / "data" / data_file).exists():
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        elif data_iterator is not None:
            written = sorted(p.name for p in (directory / "data").glob("process_*.json"))
            logging.warning("%s step %d: the data iterator's state was written by other processes (%s), not for "
                            "this one (%s): the train data starts afresh for this process's slice",
                            self.manager.directory, step, ", ".join(written), data_file)
        if (directory / "counts").exists():
            items["counts"] = ocp.args.JsonRestore()
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return restored["state"], dict(restored.get("counts") or {})

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.close()


class Progress:
    """Log lines with step, loss, steps/s and ETA."""

    def __init__(self, name: str, start_step: int, num_steps: int):
        self.name, self.num_steps = name, num_steps
        self.last_step, self.last_time = start_step, time.perf_counter()

    def log(self, step: int, metrics: dict[str, float]) -> float:
        now = time.perf_counter()
        rate = (step - self.last_step) / max(now - self.last_time, 1e-9)
        self.last_step, self.last_time = step, now
        eta = (self.num_steps - step) / max(rate, 1e-9)
        shown = " ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        logging.info("%s step %d/%d %s | %.2f steps/s | ETA %dm%02ds", self.name, step, self.num_steps, shown,
                     rate, eta // 60, eta % 60)
        return rate


def on_process_0_while_all_wait(write: Callable[[], None]) -> None:
    """Calls `write()` (e.g. writing the run's export) on process 0 alone; every process
    returns once it is done. The others returned at once before: they exited, and JAX's
    distributed shutdown, which waits `shutdown_timeout_seconds` (300 s) for all
    processes to exit, then aborted every process, process 0 in the middle of a write
    that took longer (an export cut short, no DONE.json)."""
    if jax.process_index() == 0:
        write()
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("written_on_process_0")


def summed_over_processes(counts: dict[str, float]) -> dict[str, float]:
    """`counts` (the same keys on every process) summed over processes."""
    if jax.process_count() == 1 or not counts:
        return counts
    keys = sorted(counts)
    totals = multihost_utils.process_allgather(np.asarray([counts[k] for k in keys], np.float32)).sum(axis=0)
    return {k: float(v) for k, v in zip(keys, totals)}


def mean_metrics(history: list[dict[str, jax.Array]]) -> dict[str, float]:
    """Averages per-step device metrics after one transfer to host."""
    host = jax.device_get(history)
    return {k: float(np.mean([h[k] for h in host])) for k in host[0]}


def make_train_step(graphdef, loss_fn: Callable, tx: optax.GradientTransformation, seed: int, mesh, rules,
                    post_update: Callable | None = None):
    """A pure step (state, frozen, batch) -> (state, metrics).

    state = {"params", "opt_state", "step"}; `frozen` holds the parameters that do
    not train. `loss_fn(model, batch, rng) -> (loss, (metrics, aux))`;
    `post_update(params, aux, rng, step) -> params` may edit parameters after the
    optimizer update (e.g. restart unused codes). metrics["finite"] is True when the
    loss, the gradient norm and the new state are all finite.
    """

    def step_fn(state, frozen, batch):
        with parallel.axis_rules(mesh, rules):
            rng = jax.random.fold_in(jax.random.key(seed), state["step"])
            loss_rng, update_rng = jax.random.split(rng)

            def loss_of(params):
                return loss_fn(nnx.merge(graphdef, params, frozen), batch, loss_rng)

            (loss, (metrics, aux)), grads = jax.value_and_grad(loss_of, has_aux=True)(state["params"])
            updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
            params = optax.apply_updates(state["params"], updates)
            step = state["step"] + 1
            if post_update is not None:
                params = post_update(params, aux, update_rng, step)
            grad_norm = optax.global_norm(grads)
            finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & all_finite((params, opt_state))
            metrics = {"loss": loss, "grad_norm": grad_norm, **metrics, "finite": finite}
            return {"params": params, "opt_state": opt_state, "step": step}, metrics

    return step_fn


def all_finite(tree) -> jax.Array:
    """Whether every floating-point value in `tree` is finite (a scalar bool)."""
    leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return functools.reduce(jnp.logical_and, leaves, jnp.asarray(True))


def _raise_if_non_finite(name: str, step: int, finite: list[jax.Array]) -> None:
    """`finite`: the steps' "finite" flags up to `step`; raises at the first False one."""
    flags = np.asarray(jax.device_get(finite))
    if not flags.all():
        bad = step - len(flags) + 1 + int(np.argmin(flags))
        raise FloatingPointError(f"{name} step {bad}: non-finite loss, gradients, parameters or optimizer "
                                 f"state; stopped at step {step} without a checkpoint (the earlier ones are kept)")


def jit_train_step(step_fn, state_sharding, frozen_sharding, mesh):
    """Jits a step with explicit state shardings (the batch keeps its own) and donated state."""
    return jax.jit(step_fn, in_shardings=(state_sharding, frozen_sharding, None),
                   out_shardings=(state_sharding, parallel.replicated(mesh)), donate_argnums=(0,))


def init_state(params: nnx.State, tx: optax.GradientTransformation) -> dict:
    return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}


def trainable_filter(model: nnx.Module, prefix: tuple[str, ...], names) -> Callable:
    """nnx filter: Params under `prefix + (name,)` for any name in `names`; each name
    must exist in `model` (a typo would silently freeze a module)."""
    names = tuple(names)
    present = {str(path[len(prefix)]) for path, _ in nnx.iter_graph(model)
               if len(path) > len(prefix) and tuple(str(k) for k in path[:len(prefix)]) == prefix}
    missing = [n for n in names if n not in present]
    if missing:
        raise ValueError(f"trainable: {missing} are not modules of the model under {'/'.join(prefix)}; "
                         f"expected names from {sorted(present)}")

    def accept(path, value):
        keys = tuple(str(k) for k in path)
        return (isinstance(value, nnx.Param) and keys[:len(prefix)] == prefix
                and len(keys) > len(prefix) and keys[len(prefix)] in names)

    return accept


@dataclasses.dataclass
class StageSetup:
    train_step: Callable  # (state, frozen, batch) -> (state, metrics), jitted, state donated
    state: dict  # {"params", "opt_state", "step"}, sharded
    frozen: nnx.State  # parameters that do not train, sharded


def prepare_stage(model: nnx.Module, trainable, loss_fn: Callable, stage, config, mesh,
                  post_update: Callable | None = None) -> StageSetup:
    """Splits `model` into trainable and frozen parameters, builds the optimizer
    state (for trainable parameters only) and the jitted, sharded train step."""
    rules = config.axis_rules
    graphdef, params, frozen = nnx.split(model, trainable, ...)
    tx = make_optimizer(stage)
    state_sharding = {"params": parallel.state_shardings(params, mesh, rules),
                      "opt_state": parallel.state_shardings(jax.eval_shape(tx.init, params), mesh, rules),
                      "step": parallel.replicated(mesh)}
    frozen_sharding = parallel.state_shardings(frozen, mesh, rules)
    state = jax.jit(lambda p: init_state(p, tx), out_shardings=state_sharding)(params)
    step_fn = make_train_step(graphdef, loss_fn, tx, config.seed, mesh, rules, post_update)
    return StageSetup(jit_train_step(step_fn, state_sharding, frozen_sharding, mesh), state,
                      jax.device_put(frozen, frozen_sharding))


def latest_checkpoint_step(checkpoint_dir: str) -> int | None:
    """The last step saved in `checkpoint_dir` (None: none), read on this process alone."""
    if not os.path.isdir(checkpoint_dir):
        return None
    checkpointer = Checkpointer(checkpoint_dir, keep=1, read_alone=True)
    try:
        return checkpointer.latest_step()
    finally:
        checkpointer.close()


def check_stage_order(checkpoint_root: str, stages: list[tuple[str, str, int]]) -> None:
    """`stages`: (checkpoint folder name, config key, num_steps) in training order.
    Raises when a stage would train further (its last checkpoint is below its
    `num_steps`, e.g. raised on the command line) while a later stage already has
    checkpoints: that stage would resume from them, trained after the earlier end, and
    the new training would be dropped (SEED-OPT's phases train the same parameters) or
    paired with parameters fit to the old ones (the tokenizer's codebook)."""
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
            keep = f", or keep {key}.num_steps at {latest}" if latest else ""
            raise ValueError(f"{key}.num_steps {num_steps}: {name} {since} and would be resumed as they are; remove "
                             f"them to train those stages again{keep} (or train into a new workdir)")
        return


def restore_trained_params(model: nnx.Module, trainable, stage, checkpoint_dir: str, *, keep: int = 1) -> int | None:
    """Sets the parameters a stage trains from its latest checkpoint in `checkpoint_dir`;
    returns that step (None, model untouched, if there is no checkpoint). Reads on this
    process alone (in a multi-host run, one process exports)."""
    if not os.path.isdir(checkpoint_dir):
        return None
    checkpointer = Checkpointer(checkpoint_dir, keep=keep, read_alone=True)
    try:
        step = checkpointer.latest_step()
        if step is None:
            return None
        _, params, _ = nnx.split(model, trainable, ...)
        tx = make_optimizer(stage)
        first = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])  # optimizer state is read, then dropped
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                               sharding=getattr(x, "sharding", None) or first),
                                {"params": params, "opt_state": jax.eval_shape(tx.init, params),
                                 "step": jnp.zeros((), jnp.int32)})
        nnx.update(model, checkpointer.restore_state(step, abstract)["params"])
        return step
    finally:
        checkpointer.close()


def run_stage(*, name: str, model: nnx.Module, trainable, loss_fn: Callable, stage, config, mesh,
              train_iter, evaluate: Callable[[nnx.Module, int], dict | None], writer: MetricsWriter,
              preemption: Preemption, checkpoint_dir: str, counters: dict | None = None,
              post_update: Callable | None = None) -> bool:
    """Trains `trainable` parameters of `model` for `stage.num_steps`, resuming from
    `checkpoint_dir`. Updates `model` in place. Returns False if preempted (after
    saving), True when the stage is complete; raises FloatingPointError, before any checkpoint
    of a non-finite state, at the first log or checkpoint step after a non-finite step.
    `evaluate(model, step)` runs every `config.eval_every_steps` and at the last step
    (there alone with AT_STAGE_END), after that step's checkpoint is saved; the metrics
    it returns are written as the stage's "eval" line. A run resumed at an evaluation step without that line (the run
    before crashed or was preempted while evaluating) evaluates it first.
    `counters` (name -> `pipeline.SkipCounter` of this process) join each train log line
    summed over processes; their sums are saved with each checkpoint and set again on
    resume (on process 0's counters), so they count the whole run. `post_update` is
    passed to the train step (see `make_train_step`)."""
    check_loop_settings(config)
    warn_if_warmup_outlasts(name, stage)
    setup = prepare_stage(model, trainable, loss_fn, stage, config, mesh, post_update)
    state = setup.state
    checkpointer = Checkpointer(checkpoint_dir, keep=config.keep_checkpoints)
    try:
        state, completed = _train_loop(name, setup, state, checkpointer, model, stage, config, mesh, train_iter,
                                       evaluate, writer, preemption, counters or {})
    finally:
        checkpointer.wait()
        checkpointer.close()
    nnx.update(model, state["params"])
    return completed


def _summed_counts(counters: dict) -> dict[str, float]:
    return summed_over_processes({k: c.count for k, c in counters.items()})


def _restore_counts(counters: dict, totals: dict[str, float]) -> None:
    """Sets `counters` so that their sums over processes equal the saved `totals`; what
    this run counted before (e.g. records skipped while reading the eval split, which
    `totals` hold already) is replaced. Process 0's counters take the difference. A
    counter the checkpoint lacks (one written before counts were saved) stays as it is."""
    now = _summed_counts(counters)
    if jax.process_index() == 0:
        for k, counter in counters.items():
            if k in totals:
                counter.add(int(totals[k] - now[k]))


def _train_loop(name, setup, state, checkpointer, model, stage, config, mesh, train_iter, evaluate, writer,
                preemption, counters):
    """The body of `run_stage`: restore, then step / log / eval / checkpoint until done
    or preempted. Returns (state, completed)."""
    latest = checkpointer.latest_step()
    if latest is not None:
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
        finished = latest >= stage.num_steps
        state, totals = checkpointer.restore(latest, abstract, None if finished else train_iter)
        _restore_counts(counters, totals)
        logging.info("%s: resumed from step %d", name, latest)
    start = int(state["step"])
    writer.forget_after(name, start)
    if start and evaluates_at(start, stage, config) and not writer.holds(name, start, "eval"):
        logging.info("%s: evaluating step %d, saved but not evaluated by the run before", name, start)
        _evaluate(name, model, state, start, evaluate, writer)
    if start >= stage.num_steps:
        return state, True

    progress = Progress(name, start, stage.num_steps)
    history: list[dict] = []
    unchecked: list[jax.Array] = []  # the "finite" flags of the steps since the last check
    for step in range(start + 1, stage.num_steps + 1):
        batch = global_batch(next(train_iter), mesh, config.axis_rules)
        state, metrics = setup.train_step(state, setup.frozen, batch)
        unchecked.append(metrics.pop("finite"))
        history.append(metrics)
        last = step == stage.num_steps
        logged = step % config.log_every_steps == 0
        if logged or last:
            _raise_if_non_finite(name, step, unchecked)
            unchecked = []
            summary = mean_metrics(history)
            history = []
            rate = progress.log(step, summary)
            writer.write(step, name, "train", {**summary, "steps_per_sec": rate, **_summed_counts(counters)})
        preempted = preemption.requested(sync=logged)
        if step % config.checkpoint_every_steps == 0 or last or preempted:
            _raise_if_non_finite(name, step, unchecked)
            unchecked = []
            checkpointer.save(step, state, train_iter, _summed_counts(counters))
        if preempted:  # an evaluation due at this step runs when the run resumes
            logging.warning("%s: preempted at step %d; checkpoint saved", name, step)
            return state, False
        if evaluates_at(step, stage, config):
            _evaluate(name, model, state, step, evaluate, writer)
    return state, True


def evaluates_at(step: int, stage, config) -> bool:
    """Whether `run_stage` evaluates after `step`: every `config.eval_every_steps` and at
    the stage's last step (only there with AT_STAGE_END)."""
    every = config.eval_every_steps
    return step == stage.num_steps or (every != AT_STAGE_END and step % every == 0)


def _evaluate(name: str, model: nnx.Module, state, step: int, evaluate: Callable, writer: MetricsWriter) -> None:
    nnx.update(model, state["params"])
    metrics = evaluate(model, step)
    if metrics:
        writer.write(step, name, "eval", metrics)
