"""The stage loop every trainer shares: the jitted train step, then step / log / evaluate / checkpoint,
resuming from the last checkpoint and stopping on preemption."""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx

from seed_jax import parallel
from seed_jax.api.checks import check_count, is_integer
from seed_jax.trainers import checkpointing, coordination, global_batches, optim, reporting

LOOP_SETTINGS = ("log_every_steps", "eval_every_steps", "checkpoint_every_steps", "keep_checkpoints")
# As `eval_every_steps`: evaluate at the last step of each stage only, however many steps
# it is given (a number fixed in the config would also evaluate mid-run once `num_steps`
# is raised past it on the command line).
AT_STAGE_END = 0


def check_loop_settings(config, prefix: str = "") -> None:
    """Raises naming the field (after `prefix`, e.g. "tokenizer." for a trainer's nested
    tokenizer config) unless each of `LOOP_SETTINGS` is an integer >= 1
    (`eval_every_steps` >= 0: AT_STAGE_END): an interval of 0 failed at the first step,
    after compiling, as a bare modulo by zero, and orbax keeps no checkpoint at all with
    `keep_checkpoints` 0 (each save deleted at once), so a preempted run started again
    from step 0. `seed` is an integer in [0, 2**32 - 1): the data of stage k shuffle with
    seed + k, a 32-bit seed (grain failed on a negative one once the model was built)."""
    seed = config.seed
    if not is_integer(seed) or not 0 <= seed < 2**32 - 1:
        raise ValueError(f"{prefix}seed: expected an integer in [0, 2**32 - 1) (stage k's data shuffle with seed + k, "
                         f"a 32-bit seed), got {seed!r}")
    for name in LOOP_SETTINGS:
        value, least = config[name], AT_STAGE_END if name == "eval_every_steps" else 1
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
            meaning = f" ({AT_STAGE_END}: at the last step of each stage only)" if least == AT_STAGE_END else ""
            raise ValueError(f"{prefix}{name}: expected an integer >= {least}{meaning}, got {value!r}")


def check_read_options(data, prefix: str = "") -> None:
    """`data.num_threads` and `data.prefetch` (where `data` has it) as grain's ReadOptions
    takes them: integers >= 0 (0 threads read in the training loop's thread, 0 prefetch
    reads nothing ahead), else a ValueError naming the field after `prefix`. grain refuses
    a negative only once the training data are opened, after a nested tokenizer trained."""
    for name in ("num_threads", "prefetch"):
        if name in data:
            check_count(f"{prefix}data.{name}", data[name], 0)


def step_key(seed: int, step: jax.Array, stage_index: int | None = None) -> jax.Array:
    """The key of the train step at `step` (the state's step: a resumed run draws the
    keys of an uninterrupted one): `step` folded into `seed`'s key, into that key's
    `stage_index` fold where given, so that stages training one model with dropout
    (SEED-OPT's phases) draw their own masks, not the same ones at the same step. None:
    the seed's key alone, as the decoder's one stage and the tokenizer's stages draw
    (stage I's Q-Former drops with a split of the step's loss key, stage II's reverse
    Q-Former with that key itself, so their masks differ; a stage index would change the
    code restarts, and so the figures, of the tokenizer demo)."""
    key = jax.random.key(seed)
    if stage_index is not None:
        key = jax.random.fold_in(key, stage_index)
    return jax.random.fold_in(key, step)


def make_gradients(graphdef, loss_fn: Callable, seed: int, mesh, rules, stage_index: int | None = None):
    """The train step's loss and gradients: (state, frozen, batch) ->
    ((loss, (metrics, aux)), grads, update_rng), `loss_fn` differentiated at
    state["params"] under `rules` on `mesh`, with the loss key of `step_key(seed,
    state["step"], stage_index)` (split in two: the loss's and `update_rng`)."""

    def gradients(state, frozen, batch):
        with parallel.axis_rules(mesh, rules):
            loss_rng, update_rng = jax.random.split(step_key(seed, state["step"], stage_index))

            def loss_of(params):
                return loss_fn(nnx.merge(graphdef, params, frozen), batch, loss_rng)

            return (*jax.value_and_grad(loss_of, has_aux=True)(state["params"]), update_rng)

    return gradients


def make_train_step(graphdef, loss_fn: Callable, tx: optax.GradientTransformation, seed: int, mesh, rules,
                    post_update: Callable | None = None, stage_index: int | None = None):
    """A pure step (state, frozen, batch) -> (state, metrics).

    state = {"params", "opt_state", "step"}; `frozen` holds the parameters that do
    not train. Each step's key is `step_key(seed, step, stage_index)`.
    `loss_fn(model, batch, rng) -> (loss, (metrics, aux))`;
    `post_update(params, aux, rng, step) -> params` may edit parameters after the
    optimizer update (e.g. restart unused codes). metrics["finite"] is True when the
    loss, the gradient norm and the new state are all finite.
    """
    gradients = make_gradients(graphdef, loss_fn, seed, mesh, rules, stage_index)

    def step_fn(state, frozen, batch):
        (loss, (metrics, aux)), grads, update_rng = gradients(state, frozen, batch)
        with parallel.axis_rules(mesh, rules):
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


def trainable_filter(model: nnx.Module, prefix: tuple[str, ...], names, field: str = "trainable") -> Callable:
    """nnx filter: Params under `prefix + (name,)` for any name in `names`; each name
    must hold parameters in `model` (a typo would silently freeze a module), else a
    ValueError naming the config `field` and the names that do."""
    names = tuple(names)
    present = {str(path[len(prefix)]) for path, value in nnx.iter_graph(model)
               if isinstance(value, nnx.Param) and len(path) > len(prefix)
               and tuple(str(k) for k in path[:len(prefix)]) == prefix}
    missing = [n for n in names if n not in present]
    if missing:
        # the command line reads an unquoted `=(a,b)` as the one string "(a,b)"
        unquoted = any(c in name for name in missing for c in "(),[]")
        raise ValueError(f"{field}: {missing} are not modules of the model under {'/'.join(prefix)}; "
                         f"expected names from {sorted(present)}"
                         + (f"; on the command line, quote each name: --config.{field}=\"('a','b')\""
                            if unquoted else ""))

    def accept(path, value):
        keys = tuple(str(k) for k in path)
        return (isinstance(value, nnx.Param) and keys[:len(prefix)] == prefix
                and len(keys) > len(prefix) and keys[len(prefix)] in names)

    return accept


@dataclasses.dataclass
class StageSetup:
    train_step: Callable  # (state, frozen, batch) -> (state, metrics), jitted, state donated
    state: dict | None  # {"params", "opt_state", "step"}, sharded; None once `run_stage` took it
    frozen: nnx.State  # parameters that do not train, sharded


def stage_shardings(params: nnx.State, frozen: nnx.State, tx: optax.GradientTransformation, mesh,
                    rules) -> tuple[dict, nnx.State]:
    """(train state sharding {"params", "opt_state", "step"}, frozen parameters'
    sharding) for the trainable `params` and the `frozen` rest (arrays or shapes alone)."""
    state_sharding = {"params": parallel.state_shardings(params, mesh, rules),
                      "opt_state": parallel.state_shardings(jax.eval_shape(tx.init, params), mesh, rules),
                      "step": parallel.replicated(mesh)}
    return state_sharding, parallel.state_shardings(frozen, mesh, rules)


def prepare_stage(model: nnx.Module, trainable, loss_fn: Callable, stage, config, mesh,
                  post_update: Callable | None = None, stage_index: int | None = None) -> StageSetup:
    """Splits `model` into trainable and frozen parameters, builds the optimizer
    state (for trainable parameters only) and the jitted, sharded train step (its keys:
    `step_key` of `config.seed` and `stage_index`). `model`'s trainable parameters
    become the train state's arrays, so that they are held once (the first step
    donates them: `run_stage` sets the trained ones before evaluating and at the end)."""
    rules = config.axis_rules
    graphdef, params, frozen = nnx.split(model, trainable, ...)
    tx = optim.make_optimizer(stage)
    state_sharding, frozen_sharding = stage_shardings(params, frozen, tx, mesh, rules)
    state = jax.jit(lambda p: init_state(p, tx), out_shardings=state_sharding)(params)
    del params
    nnx.update(model, state["params"])  # its own copies are freed
    step_fn = make_train_step(graphdef, loss_fn, tx, config.seed, mesh, rules, post_update, stage_index)
    return StageSetup(jit_train_step(step_fn, state_sharding, frozen_sharding, mesh), state,
                      jax.device_put(frozen, frozen_sharding))


def run_stage(*, name: str, model: nnx.Module, trainable, loss_fn: Callable, stage, config, mesh,
              train_iter, evaluate: Callable[[nnx.Module, int], dict | None], writer: reporting.MetricsWriter,
              preemption: coordination.Preemption, checkpoint_dir: str, counters: dict | None = None,
              post_update: Callable | None = None, stage_index: int | None = None) -> bool:
    """Trains `trainable` parameters of `model` for `stage.num_steps`, resuming from
    `checkpoint_dir`. Updates `model` in place. Returns False if preempted (after
    saving), True when the stage is complete; raises FloatingPointError, before any checkpoint
    of a non-finite state, at the first log or checkpoint step after a non-finite step.
    `evaluate(model, step)` runs every `config.eval_every_steps` and at the last step
    (there alone with AT_STAGE_END), after a checkpoint of that step is saved (also
    between `checkpoint_every_steps`: a crash while evaluating costs no training); the metrics
    it returns are written as the stage's "eval" line. Its `model` holds the train state's
    arrays, which the next step frees (donates): what it keeps past the call, it copies
    to the host. A run resumed at an evaluation step without that line (the run
    before crashed or was preempted while evaluating) evaluates it first.
    `counters` (name -> `pipeline.SkipCounter` of this process) join each train log line
    summed over processes; their sums are saved with each checkpoint and set again on
    resume (on process 0's counters), so they count the whole run (a resumed run counts
    again the records its data loader had counted ahead of the checkpoint: those read
    ahead, and those a packer reads again to rebuild the rows it was packing). A checkpoint also
    saves the metrics of the steps since the last log line (one saved on preemption
    between log steps), and the resumed run's next train line averages them with its
    own, as the line of a run not stopped does. `post_update` and
    `stage_index` are passed to the train step (see `make_train_step`)."""
    check_loop_settings(config)
    optim.warn_if_warmup_outlasts(name, stage)
    setup = prepare_stage(model, trainable, loss_fn, stage, config, mesh, post_update, stage_index)
    checkpointer = checkpointing.Checkpointer(checkpoint_dir, keep=config.keep_checkpoints)
    try:
        state, completed = _train_loop(name, setup, checkpointer, model, stage, config, mesh, train_iter,
                                       evaluate, writer, preemption, counters or {})
    finally:
        checkpointer.wait()
        checkpointer.close()
    nnx.update(model, state["params"])
    return completed


def _summed_counts(counters: dict) -> dict[str, float]:
    return reporting.summed_over_processes({k: c.count for k, c in counters.items()})


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


def _train_loop(name, setup, checkpointer, model, stage, config, mesh, train_iter, evaluate, writer,
                preemption, counters):
    """The body of `run_stage`: restore, then step / log / eval / checkpoint until done
    or preempted. Returns (state, completed). Takes `setup.state` (held here alone): a
    restored state replaces it, and it is freed (its parameters, which `model` holds,
    once restored), as no step donates it then."""
    state, setup.state = setup.state, None
    history: list[dict] = []  # the metrics of the steps since the last log line (a checkpoint saves them)
    latest = checkpointer.latest_step()
    if latest is not None:
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
        del state
        finished = latest >= stage.num_steps
        state, totals, history = checkpointer.restore(latest, abstract, None if finished else train_iter)
        nnx.update(model, state["params"])  # the initial ones are freed
        _restore_counts(counters, totals)
        logging.info("%s: resumed from step %d", name, latest)
    start = int(state["step"])
    writer.forget_after(name, start)
    if start and evaluates_at(start, stage, config) and not writer.holds(name, start, "eval"):
        logging.info("%s: evaluating step %d, saved but not evaluated by the run before", name, start)
        _evaluate(name, model, state, start, evaluate, writer)
    if start >= stage.num_steps:
        return state, True

    progress = reporting.Progress(name, start, stage.num_steps)
    unchecked: list[jax.Array] = []  # the "finite" flags of the steps since the last check
    for step in range(start + 1, stage.num_steps + 1):
        batch = global_batches.global_batch(next(train_iter), mesh, config.axis_rules)
        state, metrics = setup.train_step(state, setup.frozen, batch)
        unchecked.append(metrics.pop("finite"))
        history.append(metrics)
        last = step == stage.num_steps
        logged = step % config.log_every_steps == 0
        if logged or last:
            _raise_if_non_finite(name, step, unchecked)
            unchecked = []
            summary = reporting.mean_metrics(history)
            history = []
            rate = progress.log(step, summary)
            writer.write(step, name, "train", {**summary, "steps_per_sec": rate, **_summed_counts(counters)})
        preempted = preemption.requested(sync=logged)
        evaluates = evaluates_at(step, stage, config)  # the last step too
        if step % config.checkpoint_every_steps == 0 or evaluates or preempted:
            _raise_if_non_finite(name, step, unchecked)
            unchecked = []
            checkpointer.save(step, state, train_iter, _summed_counts(counters), jax.device_get(history))
        if preempted:  # an evaluation due at this step runs when the run resumes
            logging.warning("%s: preempted at step %d; checkpoint saved", name, step)
            return state, False
        if evaluates:
            _evaluate(name, model, state, step, evaluate, writer)
    return state, True


def evaluates_at(step: int, stage, config) -> bool:
    """Whether `run_stage` evaluates after `step`: every `config.eval_every_steps` and at
    the stage's last step (only there with AT_STAGE_END)."""
    every = config.eval_every_steps
    return step == stage.num_steps or (every != AT_STAGE_END and step % every == 0)


def _evaluate(name: str, model: nnx.Module, state, step: int, evaluate: Callable,
              writer: reporting.MetricsWriter) -> None:
    nnx.update(model, state["params"])
    metrics = evaluate(model, step)
    if metrics:
        writer.write(step, name, "eval", metrics)
