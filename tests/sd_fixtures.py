"""Tiny diffusers Stable Diffusion components with random weights, and a pipeline
folder saved from them (what `python -m seed_jax.convert sd` reads)."""

import json
import os

import torch
from diffusers import (AutoencoderKL, DDIMScheduler, DPMSolverMultistepScheduler, PNDMScheduler,
                       StableDiffusionPipeline, UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

# SD v1's scheduler_config.json
SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                   steps_offset=1, set_alpha_to_one=False)
# SD v1.5's scheduler/scheduler_config.json as the hub holds it: saved before diffusers wrote
# timestep_spacing, so a scheduler built from it spaces timesteps as that scheduler's default.
SD_V1_SCHEDULER_FILE = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", **SD_SCHEDULE,
                        "skip_prk_steps": True, "trained_betas": None, "clip_sample": False}
CONTEXT_WIDTH = 32


def diffusers_scheduler(name: str):
    """The diffusers scheduler our sampler `name` must match, configured like SD v1."""
    if name == "plms":
        return PNDMScheduler(**SD_SCHEDULE, skip_prk_steps=True)
    if name == "ddim":
        return DDIMScheduler(**SD_SCHEDULE, clip_sample=False)
    if name == "dpm++2m":
        return DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                           beta_schedule="scaled_linear", algorithm_type="dpmsolver++",
                                           solver_order=2)
    raise ValueError(name)


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter drawn at random: norm scales near 1, biases and zero-initialised
    output convs non-zero, so a dropped, swapped or transposed tensor shows."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.ndim == 1 and "norm" in name and name.endswith("weight"):
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
        elif p.ndim == 1:
            p.copy_(0.05 * torch.randn(p.shape, generator=g))
        else:
            fan_in = p[0].numel()
            p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
    return model


def tiny_unet(seed=0, sample_size=8, context=CONTEXT_WIDTH):
    return randomize(UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=2, cross_attention_dim=context, attention_head_dim=2, norm_num_groups=8), seed).eval()


def tiny_vae(seed=1):
    return randomize(AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, latent_channels=4, norm_num_groups=8), seed).eval()


def tiny_text_encoder(seed=2, vocab_size=64, width=CONTEXT_WIDTH):
    return randomize(CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=width, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)), seed).eval()


def tiny_tokenizer(folder: str, vocab_size=64) -> CLIPTokenizer:
    """A CLIP BPE tokenizer over a few letters; start/end of text are the last two ids."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {c: i for i, c in enumerate(letters)}
    vocab.update({c + "</w>": len(letters) + i for i, c in enumerate(letters)})
    vocab = {k: v for k, v in vocab.items() if v < vocab_size - 2}
    vocab.update({"<|startoftext|>": vocab_size - 2, "<|endoftext|>": vocab_size - 1})
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    return CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"),
                         pad_token="<|endoftext|>")


def tiny_pipeline(folder: str, sampler: str = "plms") -> StableDiffusionPipeline:
    """A StableDiffusionPipeline of tiny random components, saved to `folder` (with
    plms, SD v1.5's scheduler_config.json)."""
    pipe = StableDiffusionPipeline(vae=tiny_vae(), text_encoder=tiny_text_encoder(),
                                   tokenizer=tiny_tokenizer(os.path.join(folder, "_tokenizer_src")),
                                   unet=tiny_unet(), scheduler=diffusers_scheduler(sampler), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(folder)
    if sampler == "plms":
        write_sd_v1_scheduler(folder)
    return pipe


def write_sd_v1_scheduler(folder: str) -> None:
    """Replaces the saved pipeline `folder`'s scheduler config with SD v1.5's."""
    with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(SD_V1_SCHEDULER_FILE, f)
