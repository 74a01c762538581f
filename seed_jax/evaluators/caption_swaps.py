"""Which caption parts a tokenizer's stage-I features tell apart, on the shapes world.

Each held-out image is scored (the stage-I image-text similarity that retrieval uses)
against its own caption and against a copy with one part of one object changed: its
size, colour or shape, or its grid cell (moved to a free one). Per part, the score is
how often the own caption wins (chance 0.5). It shows what stage I learned to see,
apart from how well a probe or a language model reads it out.

  python -m seed_jax.evaluators.caption_swaps --tokenizer_workdir=workdirs/tokenizer_demo
"""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import Sequence

import numpy as np
from absl import app, flags

from seed_jax import command_line
from seed_jax.api.checks import check_count
from seed_jax.data import synthetic
from seed_jax.evaluators import code_retrieval, feature_probe
from seed_jax.trainers import tokenizer as tokenizer_trainer

PARTS = ("size", "colour", "shape", "cell")
_CHOICES = {"size": tuple(synthetic.SIZES), "colour": tuple(synthetic.COLOURS), "shape": synthetic.SHAPES}


def swap_part(objects: Sequence[synthetic.SceneObject], part: str,
              rng: np.random.Generator) -> tuple[synthetic.SceneObject, ...]:
    """`objects` with `part` of one random object set to another random value (a
    moved object goes to a free cell), sorted by cell again."""
    if part not in PARTS:
        raise ValueError(f"part: expected one of {PARTS}, got {part!r}")
    index = int(rng.integers(len(objects)))
    obj = objects[index]
    if part == "cell":
        taken = {o.cell for o in objects}
        choices = [cell for cell in range(len(synthetic.POSITIONS)) if cell not in taken]
    else:
        choices = [value for value in _CHOICES[part] if value != getattr(obj, part)]
    changed = dataclasses.replace(obj, **{part: choices[int(rng.integers(len(choices)))]})
    rest = tuple(objects[:index]) + tuple(objects[index + 1:])
    return tuple(sorted(rest + (changed,), key=lambda o: o.cell))


def own_caption_wins(image_features: np.ndarray, caption_features: np.ndarray,
                     swapped_features: np.ndarray) -> float:
    """Fraction of rows whose image feature (N,F) is closer (dot product) to its
    caption's feature (N,F) than to the swapped caption's (N,F)."""
    own = np.sum(image_features * caption_features, axis=-1)
    swapped = np.sum(image_features * swapped_features, axis=-1)
    return float(np.mean(own > swapped))


def score_run(tokenizer_workdir: str, *, num_examples: int = 1024, split: str = "eval",
              seed: int = 0) -> dict[str, float]:
    """{part: own-caption win rate} on the first `num_examples` images of a finished
    shapes-world tokenizer run's `split`."""
    config = feature_probe.shapes_run_config(tokenizer_workdir, "caption swaps")
    tokenizer = feature_probe.load_run_tokenizer(tokenizer_workdir, "caption swaps")
    if not (tokenizer.config.qformer.with_text and tokenizer.config.with_itc_heads):
        raise ValueError(f"tokenizer_workdir: the export in {tokenizer_workdir} has no Q-Former text branch "
                         "and contrastive heads to score captions with")
    pixels, captions = feature_probe.read_split(feature_probe.run_shards(tokenizer_workdir, split), num_examples,
                                                tokenizer.image_size)
    image_features = tokenizer.image_features(pixels)
    caption_text, _ = tokenizer_trainer.text_tokenizers(config, tokenizer_workdir)
    embed = code_retrieval.CodeRetrieval(tokenizer.model, caption_text).caption_features

    objects = [synthetic.parse_caption(text) for text in captions]
    if any(o is None for o in objects):
        raise ValueError(f"tokenizer_workdir: {split} captions of {tokenizer_workdir} are not shapes-world captions")
    own = embed(captions)
    rng = np.random.default_rng(seed)
    return {part: own_caption_wins(image_features, own,
                                   embed([synthetic.objects_caption(swap_part(o, part, rng)) for o in objects]))
            for part in PARTS}


FLAGS = flags.FLAGS


def _define_flags():
    """The CLI's flags (defined only when run as a program)."""
    flags.DEFINE_string("tokenizer_workdir", None, "A finished tokenizer run on the shapes world (data/; "
                        "exported to export/ first when it holds none).")
    flags.DEFINE_enum("split", "eval", ["eval", "train"], "Held-out (`eval`) or training images.")
    flags.DEFINE_integer("num_examples", 1024, "Images scored.")
    flags.mark_flag_as_required("tokenizer_workdir")


def main(argv):
    command_line.refuse_positional_arguments(argv)
    tokenizer_workdir = command_line.user_path(FLAGS.tokenizer_workdir)
    with command_line.flag_checks():  # the count and the run, before any work
        check_count("--num_examples", FLAGS.num_examples, 1)
        feature_probe.check_run(tokenizer_workdir, "caption swaps", (FLAGS.split,))
    scores = score_run(tokenizer_workdir, num_examples=FLAGS.num_examples, split=FLAGS.split)
    json.dump(scores, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    _define_flags()
    app.run(main)
