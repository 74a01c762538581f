"""De-tokenizer demo: a small text-conditioned diffusion model for the SEED demo tokenizer.

Run (the default preset is `demo`):

  python -m seed_jax.main --config=configs/decoder.py [--workdir=workdirs/decoder_demo]

It reuses the tokenizer demo's run (`--config.tokenizer_workdir`, default
workdirs/tokenizer_demo, where `python -m seed_jax.main --config=configs/tokenizer.py`
writes it; trained there first when it holds no finished run), trains a
pixel-space UNet on the synthetic shapes at 16x16 (each 2x2 patch
one 12-channel position, so the UNet runs at 8x8; in the CPU budget a small, fast
model that takes many steps learns the text conditioning, a larger or higher-resolution
one does not) conditioned on the demo's frozen
CLIP text encoder (the space the tokenizer's reverse Q-Former distils into), then
reconstructs held-out images from their SEED codes. WORKDIR/metrics.jsonl gets
recon/similarity (image vs its reconstruction from 32 codes), recon/text_to_image_similarity
(image vs an image generated from its true caption: the upper bound) and
recon/unrelated_similarity (image vs another image's reconstruction), all cosine
similarities of the tokenizer's stage-I image features; WORKDIR/samples.png shows
originals / reconstructions / text-to-image rows. The model is exported to
WORKDIR/export (`StableDiffusion.load`, `SeedTokenizer.load(..., diffusion=...)`).
Measured on a 2-core CPU: see README.md.
"""

import ml_collections

from seed_jax import config_files
from seed_jax.parallel import DEFAULT_RULES
from seed_jax.trainers.loop import AT_STAGE_END

PRESETS = ("demo", "tiny")


def _unet(block_channels, attention_levels, num_heads, sample_size, norm_groups, pixel_patch):
    channels = 3 * pixel_patch ** 2
    return ml_collections.ConfigDict(dict(
        in_channels=channels, out_channels=channels, sample_size=sample_size, block_channels=block_channels, layers_per_block=1,
        attention_levels=attention_levels, num_heads=num_heads, norm_groups=norm_groups))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = arg or "demo"
    if preset not in PRESETS:
        raise ValueError(f"config arg {arg!r}: expected one of {PRESETS}")
    c = ml_collections.ConfigDict()
    c.trainer = "decoder"
    c.preset = preset
    c.seed = 0
    c.dtype = "float32"
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.axis_rules = DEFAULT_RULES
    c.tokenizer = config_files.sibling(__file__, "tokenizer.py").get_config(preset)
    # "" = WORKDIR/tokenizer; trained there first when it holds no finished run
    c.tokenizer_workdir = config_files.default_workdir("tokenizer", "demo") if preset == "demo" else ""
    c.schedule = ml_collections.ConfigDict(dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                                beta_schedule="scaled_linear", steps_offset=1, set_alpha_to_one=False,
                                                # v is bounded at high noise, where a briefly trained
                                                # noise predictor's image estimate is not
                                                prediction_type="v_prediction"))
    # grain's threads reading and decoding the training records, and the batches read ahead
    c.data = ml_collections.ConfigDict(dict(num_threads=2, prefetch=4))
    c.uncond_probability = 0.1  # captions dropped to the empty prompt, for classifier-free guidance
    c.log_every_steps = 50
    c.checkpoint_every_steps = 500
    c.keep_checkpoints = 2
    c.eval = ml_collections.ConfigDict(dict(num_examples=128, batch_size=64, grid_examples=8, sampler="ddim",
                                            num_steps=25, guidance_scale=3.0))
    if preset == "demo":
        c.pixel_patch = 2
        c.unet = _unet((64, 128), (True, True), (4, 4), sample_size=8, norm_groups=32, pixel_patch=2)
        c.train = _train(num_steps=1500, batch_size=32, lr=2e-3)
    else:  # tiny: tests
        c.pixel_patch = 2
        c.unet = _unet((16, 32), (False, True), (2, 2), sample_size=8, norm_groups=8, pixel_patch=2)
        c.train = _train(num_steps=4, batch_size=8, lr=1e-3)
        c.log_every_steps = 2
        c.checkpoint_every_steps = 2
        c.eval.update(num_examples=8, batch_size=8, grid_examples=4, num_steps=3)
    c.eval_every_steps = AT_STAGE_END  # one evaluation, at the end (also of a run given more steps)
    return c


def _train(num_steps, batch_size, lr):
    return ml_collections.ConfigDict(dict(num_steps=num_steps, batch_size=batch_size, lr=lr, init_lr=lr / 100,
                                          end_lr=lr / 10, warmup_steps=100 if num_steps > 100 else 1,
                                          weight_decay=0.0, b1=0.9, b2=0.999, trainable=("unet",)))
