"""How different a tokenizer's 32 causal queries, and so its 32 codes, are.

Two numbers per query position, on images of any ArrayRecord split (each image once:
with a record per caption, as COCO's shards, held-out copies of fitted images would
inflate R^2):
- `r2_from_last`: held-out R^2 of a least-squares map from the last query's causal
  embedding to this query's (each query centred on its mean over the images). Near 1
  means the query repeats what the last one says: its code adds little information.
- `codes_used`: distinct codes chosen at this position; and, over the codebook, at how
  many positions each used code is chosen. Codes chosen at one position only mean the
  codebook is split between positions rather than shared.

  python -m seed_jax.evaluators.query_redundancy --export=workdirs/tokenizer_demo/export \\
      --data_dir=workdirs/tokenizer_demo/data --prefix=train
"""

from __future__ import annotations

import json
import sys

import grain
import numpy as np
from absl import app, flags

from seed_jax import api, command_line, weights
from seed_jax.api.checks import check_count
from seed_jax.data import records
from seed_jax.evaluators import feature_probe


def r2_from_query(features: np.ndarray, source: int = -1, train_fraction: float = 0.75) -> np.ndarray:
    """features (N,Q,D) -> (Q,) held-out R^2 of each query's features predicted
    linearly from query `source`'s, fitted on the first `train_fraction` of the rows."""
    features = np.asarray(features, np.float64)
    n, _, width = features.shape
    problem = too_few_rows(n, width, train_fraction)
    if problem:
        raise ValueError(f"features: {problem}")
    num_fit = int(n * train_fraction)
    centred = features - features[:num_fit].mean(0)
    fit, held_out = centred[:num_fit], centred[num_fit:]
    design = lambda x: np.concatenate([x, np.ones((len(x), 1))], axis=1)  # noqa: E731
    weights, *_ = np.linalg.lstsq(design(fit[:, source]), fit.reshape(num_fit, -1), rcond=None)
    residual = (design(held_out[:, source]) @ weights).reshape(held_out.shape) - held_out
    return 1.0 - np.sum(residual ** 2, axis=(0, 2)) / np.sum(held_out ** 2, axis=(0, 2))


def too_few_rows(n: int, width: int, train_fraction: float = 0.75) -> str | None:
    """Why `n` rows are too few for `r2_from_query` on features `width` wide, else None."""
    num_fit = int(n * train_fraction)
    if num_fit <= width + 1 or num_fit == n:
        return (f"{n} rows with train_fraction {train_fraction} leave {num_fit} to fit a map from {width} features "
                f"(need more than {width + 1}) and {n - num_fit} to score it")
    return None


def check_rows(export: str, paths: list[str], num_examples: int, flag: str = "") -> None:
    """Refuses, naming `export` or `num_examples` (after `flag`: "--" on the command line), an
    export other than a tokenizer's, or a count of images (at most the records of `paths`) too
    few for the R^2 of its causal embeddings: from its model.json, before it loads."""
    _, config, _ = weights.read_config_named(f"{flag}export", command_line.user_path(export), "seed_tokenizer")
    available = len(grain.sources.ArrayRecordDataSource(paths))
    problem = too_few_rows(min(num_examples, available), config.qformer.width)
    if problem:
        raise ValueError(f"{flag}num_examples: {num_examples} images, of {available} records in the shards: {problem}")


def code_sharing(codes: np.ndarray) -> dict:
    """codes int (N,Q) -> {"codes_used": per position (Q,), "positions_per_code":
    {k: how many used codes are chosen at exactly k positions}}."""
    codes = np.asarray(codes)
    per_position = [np.unique(codes[:, q]) for q in range(codes.shape[1])]
    positions = np.bincount(np.concatenate(per_position))
    histogram = np.bincount(positions[positions > 0])
    return {"codes_used": [len(s) for s in per_position],
            "positions_per_code": {k: int(v) for k, v in enumerate(histogram) if v}}


def measure(export: str, data_dir: str, prefix: str, num_examples: int) -> dict:
    """Encodes the first `num_examples` images of the `prefix` shards in `data_dir` with
    the tokenizer `export`: {"num_examples", "r2_from_last", **code_sharing}."""
    paths = records.shard_paths(data_dir, prefix, "data_dir")  # a mistyped folder fails before the export loads
    check_rows(export, paths, num_examples)
    tokenizer = api.SeedTokenizer.load(export, batch_size=256)
    features, _ = feature_probe.encode_split(tokenizer, paths, num_examples, ("causal_embeddings", "codes"))
    return {"num_examples": len(features["codes"]),
            "r2_from_last": r2_from_query(features["causal_embeddings"]).round(3).tolist(),
            **code_sharing(features["codes"])}


FLAGS = flags.FLAGS


def _define_flags():
    """The CLI's flags (defined only when run as a program)."""
    flags.DEFINE_string("export", None, "A SEED tokenizer export (converted or from seed_jax.export).")
    flags.DEFINE_string("data_dir", None, "Folder of image-caption ArrayRecord shards.")
    flags.DEFINE_string("prefix", "eval", "Shard name prefix in --data_dir.")
    flags.DEFINE_integer("num_examples", 4096, "Images to encode (a quarter are held out for R^2).")
    flags.DEFINE_string("out", "", "Optional JSON file for the results.")
    flags.mark_flags_as_required(["export", "data_dir"])


def main(argv):
    command_line.refuse_positional_arguments(argv)
    data_dir = command_line.user_path(FLAGS.data_dir)
    with command_line.flag_checks():  # a count, export or folder it cannot take fails before the export loads
        check_count("--num_examples", FLAGS.num_examples, 1)
        paths = records.shard_paths(data_dir, FLAGS.prefix, "--data_dir")
        check_rows(command_line.user_path(FLAGS.export), paths, FLAGS.num_examples, "--")
        out = command_line.checked_out_file("--out", FLAGS.out)
    result = measure(command_line.user_path(FLAGS.export), data_dir, FLAGS.prefix, FLAGS.num_examples)
    print(f"{result['num_examples']} images")
    print("R^2 of each query from the last:", " ".join(f"{v:.2f}" for v in result["r2_from_last"]))
    print("codes used per position:", " ".join(str(v) for v in result["codes_used"]))
    print("used codes by how many positions choose them:", result["positions_per_code"])
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    _define_flags()
    app.run(main, argv=sys.argv)
