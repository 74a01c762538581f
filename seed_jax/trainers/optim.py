"""The optimizer every stage trains with: AdamW on a warm-up + cosine schedule, no decay on biases and scales."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax
from absl import logging
from flax import nnx

from seed_jax.api.checks import check_count, check_finite_number

NO_DECAY_NAMES = ("bias", "scale", "q_bias", "k_bias", "v_bias", "out_bias", "patch_bias", "temp")


def decay_mask(params: nnx.State):
    """True for parameters that take weight decay: matrices and embeddings, not
    biases, norm scales or the temperature (as LAVIS does)."""
    def decays(path, _):
        name = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)][-1]
        return name not in NO_DECAY_NAMES

    return jax.tree.map_with_path(decays, params)


def check_schedule(stage, field: str = "") -> None:
    """Raises naming the fields (after `field`, e.g. "stage1.") unless `stage`'s `num_steps`
    and `warmup_steps` are integers >= 0 (a negative `num_steps` skipped the stage without a
    word, the next one training on its untrained start; a negative warm-up started mid-cosine),
    its `steps_per_epoch` and `num_epochs` are >= 0 and, with both set, `num_steps` stays
    within those epochs: past LAVIS's last epoch (which LAVIS never trains) the epoch-wise
    cosine rose again, back towards `lr`. The learning rates (`init_lr`, `lr`, `end_lr`) are
    finite and >= 0 (a negative one ascended the loss, without a word)."""
    check_count(f"{field}num_steps", stage.num_steps, 0, "0: the stage trains no step")
    check_count(f"{field}warmup_steps", stage.warmup_steps, 0, "0: none")
    for name in ("init_lr", "lr", "end_lr"):
        _check_not_negative(f"{field}{name}", getattr(stage, name))
    steps_per_epoch, num_epochs = getattr(stage, "steps_per_epoch", 0), getattr(stage, "num_epochs", 0)
    if steps_per_epoch < 0:
        raise ValueError(f"{field}steps_per_epoch: expected >= 0 (0 = a smooth cosine), got {steps_per_epoch}")
    if num_epochs < 0:
        raise ValueError(f"{field}num_epochs: expected >= 0 (0 = ceil(num_steps / steps_per_epoch)), got {num_epochs}")
    if steps_per_epoch and num_epochs and stage.num_steps > num_epochs * steps_per_epoch:
        raise ValueError(f"{field}num_steps {stage.num_steps} runs past {field}num_epochs {num_epochs} of "
                         f"{field}steps_per_epoch {steps_per_epoch} ({num_epochs * steps_per_epoch} steps), after "
                         f"which the learning rate's cosine would rise again: raise {field}num_epochs (0: as many as "
                         f"num_steps spans)")


def check_optimizer(stage, field: str = "") -> None:
    """`check_schedule`, and `stage`'s AdamW settings: `weight_decay` finite and >= 0 (a
    negative one grew the weights), `b1` and `b2` in [0, 1) (at 1 its bias correction is 0,
    and every update NaN), else a ValueError naming the field after `field`."""
    check_schedule(stage, field)
    _check_not_negative(f"{field}weight_decay", stage.weight_decay)
    for name in ("b1", "b2"):
        if not 0 <= check_finite_number(f"{field}{name}", getattr(stage, name)) < 1:
            raise ValueError(f"{field}{name}: expected AdamW's decay rate in [0, 1), got {getattr(stage, name)!r}")


def _check_not_negative(name: str, value) -> None:
    if check_finite_number(name, value) < 0:
        raise ValueError(f"{name}: expected a number >= 0, got {value!r}")


def make_schedule(stage) -> optax.Schedule:
    """Linear warm-up from `init_lr` to `lr`, then cosine to `end_lr`: smooth, or LAVIS's
    epoch-wise steps when the stage sets `steps_per_epoch` > 0 (see `epoch_cosine_schedule`)."""
    check_schedule(stage)
    steps_per_epoch = getattr(stage, "steps_per_epoch", 0)
    if steps_per_epoch:
        return epoch_cosine_schedule(stage, steps_per_epoch)
    return optax.warmup_cosine_decay_schedule(
        init_value=stage.init_lr, peak_value=stage.lr, warmup_steps=stage.warmup_steps,
        decay_steps=max(stage.num_steps, stage.warmup_steps + 1), end_value=stage.end_lr)


def epoch_cosine_schedule(stage, steps_per_epoch: int) -> optax.Schedule:
    """LAVIS's `linear_warmup_cosine_lr` over epochs of `steps_per_epoch` steps (SEED's
    runner fixes 5000) and E = `stage.num_epochs` epochs (LAVIS's max_epoch; 0 or absent:
    ceil(num_steps / steps_per_epoch)): in epoch 0 a linear warm-up from `init_lr` over
    `warmup_steps`, then `lr` to the epoch's end; in epoch e >= 1 the cosine's value at e,
    end_lr + (lr - end_lr)(1 + cos(pi e / E)) / 2, for the whole epoch (so the last epoch
    stays above `end_lr`); `num_steps` may not run past those epochs (`make_schedule`
    checks it: `check_schedule`)."""
    num_epochs = getattr(stage, "num_epochs", 0) or max(1, math.ceil(stage.num_steps / steps_per_epoch))
    warmup = max(stage.warmup_steps, 1)

    def schedule(count):
        epoch = count // steps_per_epoch
        warming = jnp.minimum(stage.lr, stage.init_lr + (stage.lr - stage.init_lr) * count / warmup)
        cosine = stage.end_lr + (stage.lr - stage.end_lr) * 0.5 * (1.0 + jnp.cos(jnp.pi * epoch / num_epochs))
        return jnp.where(epoch == 0, warming, cosine)

    return schedule


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
