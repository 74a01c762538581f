"""Pre-tokenization: image-caption ArrayRecord shards -> SEED code records.

  python -m seed_jax.main --config=configs/pretokenize.py \
      --config.tokenizer_export=/ckpt/seed_v1_converted \
      --config.splits.train.dir=/data/cc3m/array_record --config.out_dir=/data/cc3m/seed_codes

On several hosts add `--distributed`: process p writes `train-{p:05d}-of-{P:05d}`.
Each split is `{dir, prefix, out_prefix}`: the image shards `DIR/PREFIX-*-of-*` become code
shards named `OUT_PREFIX-*-of-*` ("" keeps PREFIX; records made with make_records' default
--prefix=train for both splits need --config.splits.eval.out_prefix=eval).
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The one config (no presets: `configs/pretokenize.py:NAME` is refused, not ignored)."""
    if arg:
        raise ValueError(f"config arg {arg!r}: configs/pretokenize.py has no presets (it splits each batch over "
                         "the local devices); set its fields with --config.FIELD=VALUE")
    c = ml_collections.ConfigDict()
    c.trainer = "pretokenize"
    c.preset = "default"
    c.tokenizer_export = ""
    c.out_dir = ""  # "" = WORKDIR/codes
    c.splits = ml_collections.ConfigDict(dict(
        train=ml_collections.ConfigDict(dict(dir="", prefix="train", out_prefix="")),
        eval=ml_collections.ConfigDict(dict(dir="", prefix="eval", out_prefix=""))))
    c.batch_size = 256  # per process, split over its local devices
    c.dtype = "float32"
    c.num_threads = 8
    return c
