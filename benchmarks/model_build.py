"""Seconds to build SD v1 abstractly (`nnx.eval_shape`, as converters, loaders and
trainers do), side by side in one run: parameter keys drawn by `layers.next_key`
against flax's own `rngs.params()`, which compares the new count's sharding on every
draw, and inside a trace that walks the trace so far.

  python benchmarks/model_build.py [--iters=2]
"""

from __future__ import annotations

import argparse
import os
import sys

# benchmarks/tokenize.py shadows the standard library's `tokenize` while this folder
# is first on sys.path: take the folder off, put the repository root on.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [os.path.dirname(_HERE)] + [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

from flax import nnx  # noqa: E402

from benchmarks.timing import count, median_seconds  # noqa: E402
from seed_jax.models import layers  # noqa: E402
from seed_jax.models.stable_diffusion import StableDiffusion, StableDiffusionConfig  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=count, default=2)
    args = parser.parse_args()
    config = StableDiffusionConfig()

    def build():
        return nnx.eval_shape(lambda: StableDiffusion(config, rngs=nnx.Rngs(0)))

    print(f"SD v1 abstract build, keys from layers.next_key: {median_seconds(build, args.iters):.1f} s")
    ours, layers.next_key = layers.next_key, lambda rngs: rngs.params()
    try:
        print(f"SD v1 abstract build, keys from rngs.params(): {median_seconds(build, args.iters):.1f} s")
    finally:
        layers.next_key = ours


if __name__ == "__main__":
    main()
