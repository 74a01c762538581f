"""Images/s of our `SeedTokenizer.encode` against the PyTorch reference, side by side
in one run: same random weights (the reference's state dict goes through
`python -m seed_jax.convert seed_v1`), same batch, same device kind.

  python benchmarks/tokenize.py                      # tiny and full size, float32
  python benchmarks/tokenize.py --sizes=full --batch=32 --bf16   # on a GPU: also bf16 and MFU

Both sides are timed host to host (numpy pixels in, codes back on the host), after
a warm-up call, as the median of `--iters` calls; on a CPU torch runs as many threads
as XLA (`timing.torch_threads_as_xla`). On a GPU, `--bf16` adds bf16
compute on both sides (torch autocast; ours `dtype="bfloat16"`) and the fraction of
peak FLOP/s that our bf16 encode reaches (model FLOPs counted from the config,
over the datasheet's dense bf16 peak).
"""

from __future__ import annotations

import os
import sys

# This file's name shadows the standard library's `tokenize` when Python puts its
# folder first on sys.path: take the folder off, put the repository root on.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [os.path.dirname(_HERE)] + [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
# JAX and torch share the GPU here: JAX's default, taking 75% of its memory up front,
# would leave torch a quarter of it. Both now allocate as they go.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.flops import encode_flops, peak_bf16_flops  # noqa: E402
from benchmarks.timing import count, median_seconds, name_list, torch_threads_as_xla  # noqa: E402
from seed_jax.api import SeedTokenizer  # noqa: E402
from seed_jax.convert.__main__ import convert  # noqa: E402
from seed_jax.torch_reference.seed_v1 import TINY, ReferenceConfig, SeedV1Reference, randomize  # noqa: E402

THREADS = torch_threads_as_xla()  # on CPUs, both sides run this many threads
SIZES = {"tiny": TINY, "full": ReferenceConfig()}


def torch_encode(model, pixels: np.ndarray, device: str, autocast: bool):
    def run():
        x = torch.from_numpy(pixels).permute(0, 3, 1, 2).to(device)
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=autocast):
            codes = model.encode(x)["codes"]
        return codes.cpu().numpy()
    return run


def bench(name: str, config: ReferenceConfig, batch: int, iters: int, bf16: bool, workdir: str) -> list[dict]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = randomize(SeedV1Reference(config), 0).eval()
    path = os.path.join(workdir, f"{name}.pth")
    torch.save({"model": model.state_dict()}, path)
    heads = [f"--vit_heads={config.vit_heads}", f"--qformer_heads={config.qformer_heads}",
             f"--blocks_heads={config.blocks_heads}"]
    out = os.path.join(workdir, name)
    convert(["seed_v1", f"--checkpoint={path}", f"--out={out}", *heads])
    os.remove(path)
    model = model.to(device)
    pixels = np.random.default_rng(0).standard_normal((batch, config.image_size, config.image_size, 3),
                                                      dtype=np.float32)
    rows = []
    for dtype in ("float32", "bfloat16") if bf16 else ("float32",):
        ours = SeedTokenizer.load(out, dtype=dtype, batch_size=batch)
        ref_fn = torch_encode(model, pixels, device, autocast=dtype == "bfloat16")
        ours_fn = lambda: np.asarray(ours.encode(pixels))  # noqa: E731
        agreement = float(np.mean(ours_fn() == ref_fn()))
        t_ref, t_ours = median_seconds(ref_fn, iters), median_seconds(ours_fn, iters)
        row = {"size": name, "dtype": dtype, "batch": batch, "ours_img_s": batch / t_ours,
               "torch_img_s": batch / t_ref, "speedup": t_ref / t_ours, "code_agreement": agreement}
        peak = peak_bf16_flops(jax.devices()[0].device_kind)
        if dtype == "bfloat16" and peak:
            row["mfu"] = batch * encode_flops(ours.config) / t_ours / peak
        rows.append(row)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=name_list(SIZES), default="tiny,full", help=f"comma-separated, of {sorted(SIZES)}")
    p.add_argument("--batch", type=count, default=8)
    p.add_argument("--iters", type=count, default=5)
    p.add_argument("--bf16", action="store_true", help="also bf16 compute (meant for GPUs)")
    args = p.parse_args()
    torch.set_grad_enabled(False)
    # float32 is float32 on both sides: ours runs at "highest" matmul precision, and on
    # GPUs PyTorch's cuDNN convolutions would round float32 inputs to TF32 by default.
    torch.backends.cudnn.allow_tf32 = False
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; torch {torch.__version__} on "
          f"{'cuda: ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}; CPU threads {THREADS}",
          flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.sizes:
            rows += bench(name, SIZES[name], args.batch, args.iters, args.bf16, workdir)
    print(f"{'size':5} {'dtype':9} {'batch':>5} {'ours img/s':>11} {'torch img/s':>12} {'ours/torch':>10} "
          f"{'codes equal':>11} {'MFU':>6}")
    for r in rows:
        mfu = f"{r['mfu']:.1%}" if "mfu" in r else "-"
        print(f"{r['size']:5} {r['dtype']:9} {r['batch']:5d} {r['ours_img_s']:11.2f} {r['torch_img_s']:12.2f} "
              f"{r['speedup']:10.2f} {r['code_agreement']:11.3f} {mfu:>6}")


if __name__ == "__main__":
    main()
