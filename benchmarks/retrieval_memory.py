"""Peak memory and time of recall@K on a whole retrieval split, side by side in one run:
queries ranked `retrieval.CHUNK_ROWS` at a time against all of them at once (one
similarity matrix and its argsorts, as `recall_at_k` ranked before).

  python benchmarks/retrieval_memory.py [--images=5000 --captions_per_image=5 --dim=256]

The defaults are Karpathy's COCO test split as `configs/tokenizer.py:seed1` evaluates
it (5000 images, a record per caption) with the Q-Former's 256-d features. Peaks are
what numpy allocates during the call, traced by tracemalloc, on random features.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

# benchmarks/tokenize.py shadows the standard library's `tokenize` while this folder
# is first on sys.path: take the folder off, put the repository root on.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [os.path.dirname(_HERE)] + [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import tracemalloc  # noqa: E402  (imports tokenize)

import numpy as np  # noqa: E402

from benchmarks.timing import count  # noqa: E402
from seed_jax.evaluators import retrieval  # noqa: E402


def measure(images, texts, captions, names, chunk_rows: int) -> tuple[dict, float, float]:
    """(scores, peak GiB, seconds) of one recall_at_k call ranking `chunk_rows` queries at a time."""
    retrieval.CHUNK_ROWS = chunk_rows
    tracemalloc.start()
    start = time.perf_counter()
    scores = retrieval.recall_at_k(images, texts, captions, images=names)
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1] / 2**30
    tracemalloc.stop()
    return scores, peak, seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=count, default=5000)
    parser.add_argument("--captions_per_image", type=count, default=5)
    parser.add_argument("--dim", type=count, default=256)
    args = parser.parse_args()
    n = args.images * args.captions_per_image
    rng = np.random.default_rng(0)
    per_image = rng.normal(size=(args.images, args.dim)).astype(np.float32)
    images = np.repeat(per_image, args.captions_per_image, axis=0)
    texts = (images + 6 * rng.normal(size=images.shape)).astype(np.float32)  # recall well below 1
    names = [f"{i}.jpg" for i in range(args.images) for _ in range(args.captions_per_image)]
    captions = [f"caption {r}" for r in range(n)]
    chunk_rows = retrieval.CHUNK_ROWS
    chunked, chunked_peak, chunked_s = measure(images, texts, captions, names, chunk_rows)
    whole, whole_peak, whole_s = measure(images, texts, captions, names, n)
    print(f"{args.images} images, {n} captions, {args.dim}-d features")
    print(f"  {chunk_rows} queries at a time: peak {chunked_peak:.2f} GiB, {chunked_s:.1f} s")
    print(f"  all queries at once:   peak {whole_peak:.2f} GiB, {whole_s:.1f} s")
    print(f"  memory ratio {whole_peak / chunked_peak:.1f}x, time ratio {whole_s / chunked_s:.2f}x, "
          f"same scores: {chunked == whole} {chunked}")


if __name__ == "__main__":
    main()
