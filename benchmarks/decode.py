"""Images/s of our Stable Diffusion sampling against diffusers' StableDiffusionPipeline,
side by side in one run: the same random weights (the pipeline is saved and converted
with `python -m seed_jax.convert sd`), prompt embeddings, initial latents, sampler,
steps and guidance.

  python benchmarks/decode.py                                   # CPU: a small model, 64x64 images
  python benchmarks/decode.py --size=sd_v1 --steps=50 --batch=4 --bf16   # GPU: SD v1 at 512x512

Both sides are timed host to host (embeddings in, decoded images on the host) after a
warm-up call, as the median of `--iters` calls; on a CPU torch runs as many threads as
XLA (`timing.torch_threads_as_xla`). `--bf16` runs both sides in bfloat16
(ours `dtype="bfloat16"`, the pipeline's modules cast to torch.bfloat16). The largest
difference between the two sides' images is printed as a sanity check.
"""

from __future__ import annotations

import os
import sys

# benchmarks/tokenize.py shadows the standard library's `tokenize` while this folder
# is first on sys.path: take the folder off, put the repository root and tests/ on.
_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
sys.path[:] = [_ROOT, os.path.join(_ROOT, "tests")] + [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
# JAX and torch share the GPU here: JAX's default, taking 75% of its memory up front,
# would leave torch a quarter of it. Both now allocate as they go.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import tempfile  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402
from sd_fixtures import diffusers_scheduler, randomize, tiny_tokenizer, write_sd_v1_scheduler  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

from benchmarks.timing import count, median_seconds, torch_threads_as_xla  # noqa: E402
from seed_jax.api import StableDiffusion  # noqa: E402
from seed_jax.convert.__main__ import convert  # noqa: E402

THREADS = torch_threads_as_xla()  # on CPUs, both sides run this many threads
SIZES = {
    # name: (UNet block channels, attention levels, heads, latent side, VAE channels, text width, text layers)
    "small": ((64, 128), (True, True), 4, 16, (32, 64, 64), 128, 2),
    "sd_v1": ((320, 640, 1280, 1280), (True, True, True, False), 8, 64, (128, 256, 512, 512), 768, 12),
}


def build_pipeline(size: str) -> StableDiffusionPipeline:
    channels, attention, heads, side, vae_channels, width, layers = SIZES[size]
    unet = UNet2DConditionModel(
        sample_size=side, block_out_channels=channels, layers_per_block=2, cross_attention_dim=width,
        attention_head_dim=heads, norm_num_groups=32,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)))
    vae = AutoencoderKL(block_out_channels=vae_channels, latent_channels=4, layers_per_block=2,
                        down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
                        up_block_types=("UpDecoderBlock2D",) * len(vae_channels))
    text = CLIPTextModel(CLIPTextConfig(vocab_size=64, hidden_size=width, intermediate_size=4 * width,
                                        num_hidden_layers=layers, num_attention_heads=max(width // 64, 2),
                                        max_position_embeddings=77, bos_token_id=62, eos_token_id=63,
                                        pad_token_id=63))
    tokenizer = tiny_tokenizer(tempfile.mkdtemp())
    pipe = StableDiffusionPipeline(vae=randomize(vae, 1).eval(), text_encoder=randomize(text, 2).eval(),
                                   tokenizer=tokenizer, unet=randomize(unet, 0).eval(),
                                   scheduler=diffusers_scheduler("plms"), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe



def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="small")
    p.add_argument("--batch", type=count, default=2)
    p.add_argument("--steps", type=count, default=20)
    p.add_argument("--sampler", choices=("plms", "ddim", "dpm++2m"), default="plms")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--iters", type=count, default=3)
    p.add_argument("--bf16", action="store_true")
    args = p.parse_args()
    # float32 is float32 on both sides: ours runs at "highest" matmul precision, and on
    # GPUs PyTorch's cuDNN convolutions would round float32 inputs to TF32 by default.
    torch.backends.cudnn.allow_tf32 = False

    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = build_pipeline(args.size)
    folder = tempfile.mkdtemp()
    pipe.save_pretrained(os.path.join(folder, "pipeline"))
    write_sd_v1_scheduler(os.path.join(folder, "pipeline"))  # no timestep_spacing: dpm++2m spaces "linspace"
    convert(["sd", f"--checkpoint={folder}/pipeline", f"--out={folder}/export"])
    ours = StableDiffusion.load(f"{folder}/export", dtype="bfloat16" if args.bf16 else "float32",
                                batch_size=args.batch)
    pipe.scheduler = diffusers_scheduler(args.sampler)
    pipe = pipe.to(device, torch.bfloat16 if args.bf16 else torch.float32)

    rng = np.random.default_rng(0)
    length, width = ours.context_shape
    prompt = rng.standard_normal((args.batch, length, width)).astype(np.float32)
    latents = ours.initial_noise(args.batch, seed=0)
    negative = ours.empty_prompt_embeds(args.batch)
    options = dict(num_steps=args.steps, guidance_scale=args.guidance, sampler=args.sampler)
    torch_dtype = torch.bfloat16 if args.bf16 else torch.float32

    def run_ours():
        return ours.sample(prompt, negative, latents=latents, **options)

    @torch.no_grad()
    def run_torch():
        return pipe(prompt_embeds=torch.from_numpy(prompt).to(device, torch_dtype),
                    negative_prompt_embeds=torch.from_numpy(negative).to(device, torch_dtype),
                    latents=torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()).to(device, torch_dtype),
                    num_inference_steps=args.steps, guidance_scale=args.guidance, output_type="np").images

    seconds_ours = median_seconds(run_ours, args.iters)
    seconds_torch = median_seconds(run_torch, args.iters)
    difference = float(np.abs((run_ours() + 1) / 2 - run_torch()).max())
    side = ours.config.image_size
    print(f"size={args.size} ({side}x{side}) batch={args.batch} steps={args.steps} sampler={args.sampler} "
          f"guidance={args.guidance} dtype={'bf16' if args.bf16 else 'f32'} device={device} CPU threads={THREADS}")
    print(f"  ours     {args.batch / seconds_ours:8.3f} images/s ({seconds_ours:.3f} s per batch)")
    print(f"  diffusers {args.batch / seconds_torch:7.3f} images/s ({seconds_torch:.3f} s per batch)")
    print(f"  ratio ours/diffusers {seconds_torch / seconds_ours:.2f}; largest pixel difference {difference:.2e}")


if __name__ == "__main__":
    main()
