"""How well a SEED-OPT export captions the code records of a split.

Greedy captions from each record's codes (as many as the export's codes per image),
scored against the record's caption: exact match (any caption of the record's image
counts) and, on the shapes world, per part (`shapes_captions`). Scoring the training
split beside the held-out one tells underfitting (both low) from overfitting (training
far higher).

  python -m seed_jax.evaluators.caption_codes --export=WORKDIR/export --codes_dir=WORKDIR/codes --split=train
"""

from __future__ import annotations

import json
import sys
from typing import Sequence

import numpy as np
from absl import app, flags

from seed_jax import api, command_line, weights
from seed_jax.api.checks import check_count
from seed_jax.data import pipeline, records, sequences
from seed_jax.evaluators import shapes_captions
from seed_jax.evaluators.retrieval import groups_in_order


def exact_match(generated: Sequence[str], references: Sequence[str], images: Sequence[str] | None = None) -> float:
    """Fraction of generated captions equal to one of their image's references, both
    without surrounding whitespace (captions are generated stripped): `images` names each
    row's image (`records.image_id`: an image's several caption records share one, and
    the codes of its records give one greedy caption); None: each row its own."""
    row_images = range(len(references)) if images is None else images
    if len(row_images) != len(references):
        raise ValueError(f"images: expected one per reference ({len(references)}), got {len(row_images)}")
    captions_of = {}  # image -> its references
    for image, reference in zip(row_images, references):
        captions_of.setdefault(image, set()).add(reference.strip())
    return float(np.mean([g.strip() in captions_of[image] for g, image in zip(generated, row_images)]))


def score_captions(generated: Sequence[str], references: Sequence[str],
                   images: Sequence[str] | None = None) -> dict[str, float]:
    """`caption/exact_match` (`exact_match`), plus `caption/{part}` scores against each
    row's own reference when every reference is a shapes caption."""
    if len(generated) != len(references):
        raise ValueError(f"generated: {len(generated)} captions for {len(references)} references")
    scores = {"caption/exact_match": exact_match(generated, references, images)}
    if shapes_captions.all_shapes_captions(references):
        parts = shapes_captions.attribute_scores(generated, references)
        scores.update({f"caption/{name}": value for name, value in parts.items()})
    return scores


def caption_all(model: api.SeedOPT, codes: np.ndarray, *, batch_size: int, max_new_tokens: int | None) -> list[str]:
    """Greedy captions of int codes (N,Q), Q = `model.num_queries`, `batch_size` rows at a
    time (`max_new_tokens` None: `caption_codes`' default). Rows with the same codes (the
    records of an image's several captions) are captioned once, in order of their first
    row: greedy decoding gives them one caption anyway."""
    first, group = groups_in_order([row.tobytes() for row in np.ascontiguousarray(codes)])
    distinct = codes[first]
    captions = []
    for start in range(0, len(distinct), batch_size):
        captions += model.caption_codes(distinct[start:start + batch_size], max_new_tokens=max_new_tokens)
    return [captions[g] for g in group]


def read_split(model: api.SeedOPT, codes_dir: str, split: str, num_examples: int,
               name: str = "num_examples") -> tuple[list[dict], pipeline.SkipCounter]:
    """The first `num_examples` readable records of `codes_dir`'s `split` shards (corrupt
    records, those of other than the model's codes per image and those of codes outside its
    codebook skipped and counted), and the counter of those skipped; errors about the count
    name it `name`."""
    skipped = pipeline.SkipCounter()
    rows = sequences.read_code_records(records.shard_paths(codes_dir, split, "codes_dir"), num_examples, skipped,
                                       codes_per_image=model.num_queries, num_codes=model.builder.image.num_codes,
                                       name=name)
    return rows, skipped


def score_records(model: api.SeedOPT, rows: list[dict], skipped: pipeline.SkipCounter, *, batch_size: int = 128,
                  max_new_tokens: int | None = None) -> dict[str, float]:
    """Caption scores of `model` on `read_split`'s records, with their count and that of
    the records skipped."""
    captions = caption_all(model, np.stack([r["codes"] for r in rows]), batch_size=batch_size,
                           max_new_tokens=max_new_tokens)
    scores = score_captions(captions, [r["caption"] for r in rows], [records.image_id(r["id"]) for r in rows])
    return {**scores, "num_examples": float(len(rows)), "skipped_records": float(skipped.count)}


def score_split(model: api.SeedOPT, codes_dir: str, split: str, *, num_examples: int = 256,
                batch_size: int = 128, max_new_tokens: int | None = None) -> dict[str, float]:
    """Caption scores of `model` on the first `num_examples` readable records of
    `codes_dir`'s `split` shards (`read_split`, `score_records`)."""
    return score_records(model, *read_split(model, codes_dir, split, num_examples), batch_size=batch_size,
                         max_new_tokens=max_new_tokens)


FLAGS = flags.FLAGS


def _define_flags():
    """The CLI's flags (defined only when run as a program)."""
    flags.DEFINE_string("export", None, "A SEED-OPT export (WORKDIR/export of configs/seed_opt.py).")
    flags.DEFINE_string("codes_dir", None, "Code-record shards (WORKDIR/codes, or configs/pretokenize.py's out_dir).")
    flags.DEFINE_string("split", "eval", "Shard prefix: `eval` (held out) or `train`.")
    flags.DEFINE_integer("num_examples", 256, "Records captioned (-1: all).")
    flags.DEFINE_integer("max_new_tokens", None, "Longest caption, in tokens (default: SeedOPT.caption_codes' "
                         "30, or fewer where the model's positions end; the demo's training evaluation: 24).")
    flags.mark_flags_as_required(["export", "codes_dir"])


def main(argv):
    command_line.refuse_positional_arguments(argv)
    export, codes_dir = command_line.user_path(FLAGS.export), command_line.user_path(FLAGS.codes_dir)
    with command_line.flag_checks():  # a count, folder or export it cannot take fails before the export loads
        sequences.check_num_examples("--num_examples", FLAGS.num_examples)
        if FLAGS.max_new_tokens is not None:
            check_count("--max_new_tokens", FLAGS.max_new_tokens, 1)
        records.shard_paths(codes_dir, FLAGS.split, "--codes_dir")
        weights.read_config_named("--export", export, "opt")  # its model.json: a workdir or a tokenizer's is named
    model = api.SeedOPT.load(export)
    with command_line.flag_checks():  # what the loaded model bounds, before any caption is generated
        try:
            model.check_caption_options(max_new_tokens=FLAGS.max_new_tokens)
        except ValueError as error:  # "max_new_tokens: expected an integer in 1..N ...": the flag's
            raise ValueError(f"--{error}") from None
        rows, skipped = read_split(model, codes_dir, FLAGS.split, FLAGS.num_examples, name="--num_examples")
    scores = score_records(model, rows, skipped, max_new_tokens=FLAGS.max_new_tokens)
    json.dump(scores, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    _define_flags()
    app.run(main)
