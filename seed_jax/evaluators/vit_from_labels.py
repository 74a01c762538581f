"""What a tokenizer run's ViT can learn of the shapes world in a budget when told the answer.

A fresh ViT of the run's `model.vit` config, with a LayerNorm and one linear layer over
all its tokens, trains from scratch on the run's training images (resized, no crops)
against their cell labels (`feature_probe.cell_labels`: each grid cell empty or one
size x colour x shape), AdamW with a linear warm-up and a cosine decay to a fifth of
`lr`, then captions the held-out images: the feature probes' scores. A budget in which
even the labels teach little shape leaves a stage-I loss, which names shape only through
captions, little hope of teaching more.

  python -m seed_jax.evaluators.vit_from_labels --tokenizer_workdir=workdirs/tokenizer_demo \\
      --steps=400 --batch_size=128 --lr=5e-4
"""

from __future__ import annotations

import sys

import jax
import numpy as np
import optax
from absl import app, flags
from flax import nnx

from seed_jax import command_line
from seed_jax.evaluators import feature_probe
from seed_jax.models.vit import VisionTransformer, ViTConfig


class LabelledViT(nnx.Module):
    """pixels (B,S,S,3) -> cell logits (B,9,NUM_LABELS)."""

    def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs):
        self.vit = VisionTransformer(config, rngs=rngs)
        self.norm = nnx.LayerNorm(config.width, rngs=rngs)
        self.head = nnx.Linear((1 + config.num_patches) * config.width,
                               feature_probe.NUM_CELLS * feature_probe.NUM_LABELS, rngs=rngs)

    def __call__(self, pixels: jax.Array) -> jax.Array:
        tokens = self.norm(self.vit(pixels))
        logits = self.head(tokens.reshape(tokens.shape[0], -1))
        return logits.reshape(-1, feature_probe.NUM_CELLS, feature_probe.NUM_LABELS)


def train_from_labels(config: ViTConfig, pixels: np.ndarray, labels: np.ndarray, *, steps: int, batch_size: int,
                      lr: float, warmup_steps: int = 50, seed: int = 0):
    """pixels (N,S,S,3), labels (N,9) -> predict(pixels) -> labels (M,9)."""
    model = LabelledViT(config, rngs=nnx.Rngs(seed))
    schedule = optax.warmup_cosine_decay_schedule(lr / 50, lr, min(warmup_steps, steps // 2), steps, lr / 5)
    optimizer = nnx.Optimizer(model, optax.adamw(schedule, weight_decay=0.05), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, x, y):
        loss = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()  # noqa: E731
        optimizer.update(model, nnx.grad(loss)(model))

    rng = np.random.default_rng(seed)
    for _ in range(steps):
        rows = rng.integers(0, len(pixels), batch_size)
        step(model, optimizer, pixels[rows], labels[rows])
    predict_batch = nnx.jit(lambda m, x: m(x).argmax(-1))
    return lambda x: np.concatenate([np.asarray(predict_batch(model, x[i:i + 256])) for i in range(0, len(x), 256)])


def run(tokenizer_workdir: str, *, steps: int, batch_size: int, lr: float, num_train: int = 20_000,
        num_eval: int = 1024, seed: int = 0) -> dict[str, dict]:
    """{"train": scores on up to 2000 training images, "eval": held-out scores}."""
    vit = ViTConfig(**feature_probe.shapes_run_config(tokenizer_workdir, "the cell labels").model.vit.to_dict())
    train, train_captions = feature_probe.read_split(feature_probe.run_shards(tokenizer_workdir, "train"), num_train,
                                                     vit.image_size)
    held_out, eval_captions = feature_probe.read_split(feature_probe.run_shards(tokenizer_workdir, "eval"), num_eval,
                                                       vit.image_size)
    predict = train_from_labels(vit, train, feature_probe.cell_labels(train_captions), steps=steps,
                                batch_size=batch_size, lr=lr, seed=seed)
    return {"train": feature_probe.probe_scores(predict, train[:2000], train_captions[:2000]),
            "eval": feature_probe.probe_scores(predict, held_out, eval_captions)}


FLAGS = flags.FLAGS


def _define_flags():
    """The CLI's flags (defined only when run as a program)."""
    flags.DEFINE_string("tokenizer_workdir", None, "A tokenizer run on the shapes world (config.json and data/).")
    flags.DEFINE_integer("steps", 400, "Training steps (the demo's stage I takes 400).")
    flags.DEFINE_integer("batch_size", 128, "Images per step (the demo's stage I takes 128).")
    flags.DEFINE_float("lr", 5e-4, "Peak learning rate (the demo's stage I takes 5e-4).")
    flags.DEFINE_integer("seed", 0, "Initialisation and batch order.")
    flags.DEFINE_string("out", "", "Optional JSON file for the scores.")
    flags.mark_flag_as_required("tokenizer_workdir")


def main(argv):
    command_line.refuse_positional_arguments(argv)
    for name in ("steps", "batch_size"):
        if getattr(FLAGS, name) < 1:
            raise app.UsageError(f"--{name}: expected a positive integer, got {getattr(FLAGS, name)}")
    if not FLAGS.lr > 0:  # 0 trains nothing, and a negative rate climbs the loss: either scores an untrained ViT
        raise app.UsageError(f"--lr: expected a positive learning rate, got {FLAGS.lr}")
    tokenizer_workdir = command_line.user_path(FLAGS.tokenizer_workdir)
    with command_line.flag_checks():  # the run and the results file, before any work (its images and captions only)
        feature_probe.check_run(tokenizer_workdir, "the cell labels", ("train", "eval"), finished=False)
        out = command_line.checked_out_file("--out", FLAGS.out)
    results = run(tokenizer_workdir, steps=FLAGS.steps, batch_size=FLAGS.batch_size, lr=FLAGS.lr, seed=FLAGS.seed)
    feature_probe.report({"vit_from_labels": results}, out)


if __name__ == "__main__":
    _define_flags()
    app.run(main, argv=sys.argv)
