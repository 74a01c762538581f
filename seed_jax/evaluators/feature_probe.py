"""How much of a shapes-world caption a tokenizer's intermediates carry.

An MLP probe per intermediate (flattened (L,F) features -> 9 grid cells, each empty
or one of size x colour x shape) is trained on a finished tokenizer run's training
images and scored on its held-out images: exact caption match and the per-attribute
scores of `shapes_captions`. `quantized` are the codes' codebook vectors: what a
simple reader of the codes gets out of them from this much data. With `--num_train`
above the run's training images, the probes also read further images of the same
shapes world (its first images are the run's own), written once to `--extra_data_dir`:
whether a reader is short of data or the features are short of information.

  python -m seed_jax.evaluators.feature_probe --tokenizer_workdir=workdirs/tokenizer_demo
  python -m seed_jax.evaluators.feature_probe --tokenizer_workdir=workdirs/tokenizer_demo --num_train=100000
"""

from __future__ import annotations

import itertools
import json
import os
import sys
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags, logging

from seed_jax import api, command_line
from seed_jax.api.checks import check_count
from seed_jax.data import pipeline, preprocess, records, synthetic
from seed_jax.evaluators import shapes_captions
from seed_jax.trainers import tokenizer as tokenizer_trainer

OBJECT_CLASSES = tuple(itertools.product(synthetic.SIZES, synthetic.COLOURS, synthetic.SHAPES))
NUM_CELLS = len(synthetic.POSITIONS)
NUM_LABELS = 1 + len(OBJECT_CLASSES)  # 0 = empty cell
DEFAULT_INTERMEDIATES = ("vit_features", "causal_embeddings", "quant_input", "quantized")


def cell_labels(captions: Sequence[str]) -> np.ndarray:
    """Shapes captions -> int32 (N,9): 0 for an empty cell, else 1 + the object's class."""
    labels = np.zeros((len(captions), NUM_CELLS), np.int32)
    for row, text in enumerate(captions):
        objects = synthetic.parse_caption(text)
        if objects is None:
            raise ValueError(f"captions: {text!r} is not a shapes-world caption")
        for obj in objects:
            labels[row, obj.cell] = 1 + OBJECT_CLASSES.index((obj.size, obj.colour, obj.shape))
    return labels


def labels_caption(labels: np.ndarray) -> str:
    """int (9,) cell labels -> the caption they describe ("" for an empty grid)."""
    objects = tuple(synthetic.SceneObject(shape=OBJECT_CLASSES[k - 1][2], colour=OBJECT_CLASSES[k - 1][1],
                                          size=OBJECT_CLASSES[k - 1][0], cell=cell)
                    for cell, k in enumerate(labels) if k > 0)
    return synthetic.objects_caption(objects)


def read_split(paths: Sequence[str], num_examples: int, image_size: int) -> tuple[np.ndarray, list[str]]:
    """The first `num_examples` decodable images of `paths` -> (pixels (N,S,S,3) float32,
    CLIP-normalised, captions); undecodable records are skipped and their count logged.
    An image is read once, with the caption of its first record (`records.image_id`: COCO's
    shards hold a record per caption, so 5 of each image)."""
    source = pipeline.RecordSource(paths)
    pixels = np.zeros((min(num_examples, len(source)), image_size, image_size, 3), np.float32)
    captions, skipped, images = [], 0, set()
    for i in range(len(source)):
        if len(captions) == len(pixels):
            break
        item = preprocess.eval_record(source[i], image_size)
        if item["pixels"] is None:
            skipped += 1
        elif records.image_id(item["id"]) not in images:
            images.add(records.image_id(item["id"]))
            pixels[len(captions)] = item["pixels"]
            captions.append(item["caption"])
    if skipped:
        logging.warning("skipped %d undecodable records of %s", skipped, paths[0])
    return pixels[:len(captions)], captions


def encode_split(tokenizer: api.SeedTokenizer, paths: Sequence[str], num_examples: int,
                 intermediates: Sequence[str]) -> tuple[dict[str, np.ndarray], list[str]]:
    """The first `num_examples` decodable images of `paths` -> ({name: (N,L,F) float32,
    or (N,L) int for codes}, captions)."""
    pixels, captions = read_split(paths, num_examples, tokenizer.image_size)
    features = {name: [] for name in intermediates}
    for start in range(0, len(pixels), 1024):
        out = tokenizer.encode(pixels[start:start + 1024], return_intermediates=True)
        for name in intermediates:
            array = np.asarray(out[name])
            features[name].append(array if np.issubdtype(array.dtype, np.integer) else array.astype(np.float32))
    return {k: np.concatenate(v) for k, v in features.items()}, captions


def _mlp_logits(params, x):
    hidden = jax.nn.gelu(x @ params["w1"] + params["b1"])
    return (hidden @ params["w2"] + params["b2"]).reshape(x.shape[0], NUM_CELLS, NUM_LABELS)


def train_probe(features: np.ndarray, labels: np.ndarray, *, epochs: int, hidden: int = 512, batch_size: int = 128,
                lr: float = 1e-3, seed: int = 0):
    """features (N,L,F), labels (N,9) -> predict(features) -> labels (M,9)."""
    mean, std = features.mean((0, 1)), features.std((0, 1)) + 1e-6
    flat = lambda x: ((x - mean) / std).reshape(len(x), -1)  # noqa: E731
    x = flat(features)
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    params = {"w1": jax.random.normal(k1, (x.shape[1], hidden)) / np.sqrt(x.shape[1]), "b1": jnp.zeros(hidden),
              "w2": jax.random.normal(k2, (hidden, NUM_CELLS * NUM_LABELS)) / np.sqrt(hidden),
              "b2": jnp.zeros(NUM_CELLS * NUM_LABELS)}
    optimizer = optax.adamw(lr, weight_decay=0.05)
    state = optimizer.init(params)

    @jax.jit
    def step(params, state, x, y):
        loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(_mlp_logits(p, x), y).mean()  # noqa: E731
        grads = jax.grad(loss)(params)
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    rng = np.random.default_rng(seed)
    batch_size = min(batch_size, len(x))
    for _ in range(epochs):
        order = rng.permutation(len(x))
        for start in range(0, len(order) - batch_size + 1, batch_size):
            rows = order[start:start + batch_size]
            params, state = step(params, state, x[rows], labels[rows])
    return lambda f: np.asarray(jnp.argmax(_mlp_logits(params, flat(f)), -1))


def probe_scores(predict, features: np.ndarray, captions: Sequence[str]) -> dict[str, float]:
    """Exact caption match and attribute scores of the probe's captions."""
    generated = [labels_caption(row) for row in predict(features)]
    scores = {"exact_match": float(np.mean([g == c for g, c in zip(generated, captions)]))}
    return {**scores, **shapes_captions.attribute_scores(generated, captions)}


def shapes_run_config(tokenizer_workdir: str, needed_by: str) -> ml_collections.ConfigDict:
    """The run's config; a run not trained on the synthetic shapes world is refused,
    naming `needed_by` (what needs it)."""
    path = os.path.join(tokenizer_workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"tokenizer_workdir: {tokenizer_workdir} holds no tokenizer run ({path} missing)")
    with open(path) as f:
        config = ml_collections.ConfigDict(json.load(f))
    if config.data.source != "synthetic":
        raise ValueError(f"tokenizer_workdir: {tokenizer_workdir} trained on {config.data.source!r} data; "
                         f"{needed_by} need the synthetic shapes world")
    return config


def check_run(tokenizer_workdir: str, needed_by: str, splits: Sequence[str] = (),
              finished: bool = True) -> ml_collections.ConfigDict:
    """The run's config; refuses, naming tokenizer_workdir, a folder without a shapes-world
    tokenizer run, without the shards of `splits`, or (`finished`) one whose run has not
    finished: the evaluators' command lines check it before any work, to print the message alone."""
    config = shapes_run_config(tokenizer_workdir, needed_by)
    if finished and not os.path.exists(os.path.join(tokenizer_workdir, "DONE.json")):
        raise ValueError(f"tokenizer_workdir: {tokenizer_workdir} holds no finished tokenizer run (no DONE.json): "
                         "run its training command again to finish it")
    for split in splits:
        run_shards(tokenizer_workdir, split)
    return config


def load_run_tokenizer(tokenizer_workdir: str, needed_by: str) -> api.SeedTokenizer:
    """The finished shapes-world run's tokenizer, from TOKENIZER_WORKDIR/export, which
    is written first when the run has none yet (or an older one: a run resumed with more
    steps), as the trainers built on a tokenizer run do."""
    check_run(tokenizer_workdir, needed_by)
    out, _ = tokenizer_trainer.export_finished_run(os.path.abspath(tokenizer_workdir))
    return api.SeedTokenizer.load(out, batch_size=256)


def run_shards(tokenizer_workdir: str, split: str) -> list[str]:
    """The shards of the run's `split` ("train" or "eval") in TOKENIZER_WORKDIR/data; an
    error naming tokenizer_workdir where they are missing."""
    return records.shard_paths(os.path.join(tokenizer_workdir, "data"), split, "tokenizer_workdir")


def extra_shards_dir(tokenizer_workdir: str, extra_data_dir: str = "", name: str = "extra_data_dir") -> str:
    """The folder `training_shards` writes further images to: `extra_data_dir`, default
    WORKDIR/probe_data; a ValueError naming it `name` where they would replace the run's
    own training images or shards the shapes world did not write."""
    folder = extra_data_dir or os.path.join(tokenizer_workdir, "probe_data")
    if os.path.realpath(folder) == os.path.realpath(os.path.join(tokenizer_workdir, "data")):
        raise ValueError(f"{name}: {folder} is the run's own data folder, whose training shards the probes' "
                         "would replace: give another folder")
    try:
        synthetic.check_can_write(folder, "train")
    except ValueError as error:
        raise ValueError(f"{name}: {error}") from None
    return folder


def training_shards(tokenizer_workdir: str, num_train: int, extra_data_dir: str = "") -> list[str]:
    """The run's training shards; for more than its `data.synthetic.num_train` images,
    the shapes world's training split extended to `num_train` examples, written once to
    `extra_data_dir` (default WORKDIR/probe_data). Example i is the same image in both."""
    world = shapes_run_config(tokenizer_workdir, "the probes").data.synthetic
    if num_train <= world.num_train:
        return run_shards(tokenizer_workdir, "train")
    return synthetic.write_shapes_dataset(extra_shards_dir(tokenizer_workdir, extra_data_dir), split="train",
                                          num_examples=num_train, seed=world.seed, image_size=world.image_size,
                                          num_shards=world.num_shards)


def probe_run(tokenizer_workdir: str, intermediates: Sequence[str] = DEFAULT_INTERMEDIATES, *,
              num_train: int = 20_000, num_eval: int = 1024, epochs: int = 20,
              extra_data_dir: str = "") -> dict[str, dict]:
    """{intermediate: {"train": scores on up to 2000 training images, "eval": held-out scores}}."""
    tokenizer = load_run_tokenizer(tokenizer_workdir, "the probes")
    train_paths = training_shards(tokenizer_workdir, num_train, extra_data_dir)
    train, train_captions = encode_split(tokenizer, train_paths, num_train, intermediates)
    held_out, eval_captions = encode_split(tokenizer, run_shards(tokenizer_workdir, "eval"), num_eval, intermediates)
    labels = cell_labels(train_captions)
    results = {}
    for name in intermediates:
        predict = train_probe(train[name], labels, epochs=epochs)
        results[name] = {"train": probe_scores(predict, train[name][:2000], train_captions[:2000]),
                         "eval": probe_scores(predict, held_out[name], eval_captions)}
    return results


def report(results: dict[str, dict], out: str = "") -> None:
    """Prints {name: {split: scores}} a line per split, and writes it to `out` as JSON if given."""
    for name, splits in results.items():
        for split, scores in splits.items():
            print(f"{name:18s} {split:5s} " + " ".join(f"{k}={v:.3f}" for k, v in scores.items()))
    if out:
        with open(out, "w") as f:
            json.dump(results, f, indent=1)


FLAGS = flags.FLAGS


def _define_flags():
    """The CLI's flags (defined only when run as a program: other tools import this module)."""
    flags.DEFINE_string("tokenizer_workdir", None, "A finished tokenizer run on the shapes world (data/; "
                        "exported to export/ first when it holds none).")
    flags.DEFINE_list("intermediates", list(DEFAULT_INTERMEDIATES), "api.INTERMEDIATES to probe.")
    flags.DEFINE_integer("num_train", 20_000, "Training images for the probes; beyond the run's own, more "
                         "images of its shapes world are generated.")
    flags.DEFINE_string("extra_data_dir", "", "Where those are written (default TOKENIZER_WORKDIR/probe_data).")
    flags.DEFINE_integer("epochs", 20, "Probe training epochs.")
    flags.DEFINE_string("out", "", "Optional JSON file for the scores.")
    flags.mark_flag_as_required("tokenizer_workdir")


def main(argv):
    command_line.refuse_positional_arguments(argv)
    allowed = [name for name in api.INTERMEDIATES if name != "codes"]
    unknown = sorted(set(FLAGS.intermediates) - set(allowed))
    if unknown:
        raise app.UsageError(f"--intermediates: {unknown} are not among {allowed}")
    if not FLAGS.intermediates:  # `--intermediates=` probed nothing and printed nothing
        raise app.UsageError(f"--intermediates: expected one or more of {allowed}, got none")
    tokenizer_workdir = command_line.user_path(FLAGS.tokenizer_workdir)
    with command_line.flag_checks():  # counts and the run, before any work (its own training images where they suffice)
        check_count("--num_train", FLAGS.num_train, 1)
        check_count("--epochs", FLAGS.epochs, 1)
        extra_data_dir = command_line.user_path(FLAGS.extra_data_dir)
        if FLAGS.num_train <= check_run(tokenizer_workdir, "the probes", ("eval",)).data.synthetic.num_train:
            run_shards(tokenizer_workdir, "train")
        else:
            extra_shards_dir(tokenizer_workdir, extra_data_dir, "--extra_data_dir")
        out = command_line.checked_out_file("--out", FLAGS.out)
    results = probe_run(tokenizer_workdir, FLAGS.intermediates, num_train=FLAGS.num_train, epochs=FLAGS.epochs,
                        extra_data_dir=extra_data_dir)
    report(results, out)


if __name__ == "__main__":
    _define_flags()
    app.run(main, argv=sys.argv)
