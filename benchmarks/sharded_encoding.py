"""`SeedTokenizer.encode` of a tokenizer whose weights are split over a device mesh as
the tokenizer's training splits them (`parallel.DEFAULT_RULES`), two ways side by side
in one run, their codes checked equal:

- rows apart: `SeedTokenizer(model, mesh=mesh)` (`SeedTokenizer.load(..., mesh=)`). Each
  device encodes its own rows, the weights gathered over fsdp once per call
  (`parallel.rows_apart`);
- weights left split: `SeedTokenizer(model)`. XLA's partitioner chooses how to split
  the work between the devices holding the weights.

  python benchmarks/sharded_encoding.py                     # 8 CPU stand-in devices, data=2 fsdp=4
  python benchmarks/sharded_encoding.py --size=seed1 --mesh=data=1,fsdp=8 --batch=64 --bf16   # 8 GPUs

Random weights and pixels, `--batch` images a call (one chunk); the median of `--iters`
calls after a warm-up, timed host to host (pixels in, codes back on the host). On a CPU
the stand-in devices share its cores: the ratio there shows what the exchanges cost in
programs and synchronisation, not what an interconnect would.
"""

from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
sys.path[:] = [_ROOT] + [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import argparse  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.sharded_decoding import add_mesh_arguments, built_on_mesh  # noqa: E402
from benchmarks.timing import count, print_rows_apart_against_left_split  # noqa: E402
from configs.tokenizer import get_config  # noqa: E402
from seed_jax.api import SeedTokenizer  # noqa: E402
from seed_jax.models.tokenizer import SeedTokenizerConfig  # noqa: E402

SIZES = ("tiny", "demo", "seed1")  # the tokenizers of configs/tokenizer.py's presets


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="demo", choices=SIZES)
    parser.add_argument("--batch", type=count, default=32)
    add_mesh_arguments(parser)
    args = parser.parse_args()
    config = SeedTokenizerConfig.from_dict(get_config(args.size).model.to_dict())
    model, mesh = built_on_mesh("seed_tokenizer", config, args)
    dtype = "bfloat16" if args.bf16 else "float32"
    size = config.vit.image_size
    pixels = np.random.default_rng(0).standard_normal((args.batch, size, size, 3)).astype(np.float32)
    ways = {"rows apart": SeedTokenizer(model, dtype=dtype, batch_size=args.batch, mesh=mesh),
            "weights left split": SeedTokenizer(model, dtype=dtype, batch_size=args.batch)}
    print(f"{jax.devices()[0].device_kind} x{len(jax.devices())}, mesh {dict(mesh.shape)}, {args.size} tokenizer "
          f"{dtype}, {args.batch} images of {size}x{size}")
    print_rows_apart_against_left_split(ways, lambda way: way.encode(pixels), args.iters, args.batch, "images")


if __name__ == "__main__":
    main()
