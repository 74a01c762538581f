"""The optimizer every stage trains with: AdamW on a warm-up + cosine schedule, no decay on biases and scales."""

from __future__ import annotations

import jax
import optax
from absl import logging
from flax import nnx

NO_DECAY_NAMES = ("bias", "scale", "q_bias", "k_bias", "v_bias", "out_bias", "patch_bias", "temp")


def decay_mask(params: nnx.State):
    """True for parameters that take weight decay: matrices and embeddings, not
    biases, norm scales or the temperature (as LAVIS does)."""
    def decays(path, _):
        name = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)][-1]
        return name not in NO_DECAY_NAMES

    return jax.tree.map_with_path(decays, params)


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
