"""Seconds to build SD v1 abstractly (`nnx.eval_shape`, as converters, loaders and
trainers do), side by side in one run: parameter keys drawn eagerly
(`layers.seeded_rngs`, what `weights.build` uses) against a plain `nnx.Rngs`, whose
draws are traced.

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
    for name, make_rngs in (("eager keys (seeded_rngs)", layers.seeded_rngs), ("traced keys (nnx.Rngs)", nnx.Rngs)):
        seconds = median_seconds(lambda: nnx.eval_shape(lambda: StableDiffusion(config, rngs=make_rngs(0))),
                                 args.iters)
        print(f"SD v1 abstract build, {name}: {seconds:.1f} s")


if __name__ == "__main__":
    main()
