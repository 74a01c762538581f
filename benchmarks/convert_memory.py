"""Peak memory of `python -m seed_jax.convert hf_opt`, side by side in one run: source
arrays read as the converter looks them up (what the CLI does) against the whole
state dict read into float32 first (how conversions read checkpoints before).

  python benchmarks/convert_memory.py [--width=2048 --depth=24 --dtype=float16]

The defaults are OPT-1.3B's shape (random weights, a 2.6 GB half-precision
safetensors folder). Each conversion runs in its own process; its peak resident
memory (ru_maxrss) is printed in GiB and as a multiple of the float32 parameters it
writes, once when the parameters are converted and ready to write, and once more
after orbax has written them.
"""

from __future__ import annotations

import argparse
import gc
import os
import subprocess
import sys
import tempfile

# benchmarks/tokenize.py shadows the standard library's `tokenize` while this folder
# is first on sys.path: take the folder off, put the repository root on.
_HERE = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(_HERE)
sys.path[:] = [_REPO] + [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

# Runs one conversion and prints its peak RSS in KiB before and after the write;
# "whole" reads every array first.
_CONVERT = """
import resource, sys
from seed_jax import weights
from seed_jax.convert import sources
from seed_jax.convert.__main__ import convert
from seed_jax.convert.lazy_arrays import LazyArrays
mode, folder, out = sys.argv[1:]
save, peaks = weights.save, []
def save_after_noting_the_peak(*args, **kwargs):
    peaks.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    save(*args, **kwargs)
weights.save = save_after_noting_the_peak
if mode == "whole":
    read_folder = sources.read_folder
    def read_whole(*args, **kwargs):
        arrays = {k: v for k, v in read_folder(*args, **kwargs).items()}
        return LazyArrays({k: (v.shape, lambda v=v: v) for k, v in arrays.items()})
    sources.read_folder = read_whole
report = convert(["hf_opt", f"--checkpoint={folder}", f"--out={out}"])
print(report["num_params"], peaks[0], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def _save_random_opt(folder: str, width: int, depth: int, dtype: str) -> None:
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(hidden_size=width, num_hidden_layers=depth, ffn_dim=4 * width,
                       num_attention_heads=width // 64, word_embed_proj_dim=width)
    model = OPTForCausalLM._from_config(config, torch_dtype=getattr(torch, dtype))
    model.save_pretrained(folder)
    del model
    gc.collect()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--depth", type=int, default=24)
    parser.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        folder = os.path.join(root, "hf")
        _save_random_opt(folder, args.width, args.depth, args.dtype)
        size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)) / 2**30
        print(f"OPT width {args.width}, depth {args.depth}: {size:.2f} GiB of {args.dtype} safetensors")
        for mode, label in (("lazy", "read as looked up"), ("whole", "whole state dict first")):
            result = subprocess.run([sys.executable, "-c", _CONVERT, mode, folder, os.path.join(root, mode)],
                                    cwd=_REPO, capture_output=True, text=True)
            if result.returncode:
                sys.exit(f"the {mode} conversion failed:\n{result.stderr}")
            num_params, *peaks_kib = map(int, result.stdout.split()[-3:])
            params_gib = 4 * num_params / 2**30
            converted, written = (p / 2**20 for p in peaks_kib)
            print(f"{label}: peak {converted:.2f} GiB ({converted / params_gib:.2f}x the {params_gib:.2f} GiB of "
                  f"float32 parameters) until they are converted, {written:.2f} GiB "
                  f"({written / params_gib:.2f}x) once orbax has written them")


if __name__ == "__main__":
    main()
