"""Stable Diffusion's networks in one module: the UNet, the autoencoder (absent for
a pixel-space model) and the CLIP text encoder, plus what sampling needs to know
(noise schedule, the empty prompt's token ids for classifier-free guidance)."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from seed_jax.diffusion.schedule import NoiseSchedule
from seed_jax.models.clip_text import CLIPTextConfig, CLIPTextEncoder
from seed_jax.models.unet import UNet, UNetConfig
from seed_jax.models.vae import AutoencoderKL, VAEConfig


@dataclasses.dataclass(frozen=True)
class StableDiffusionConfig:
    unet: UNetConfig = UNetConfig()
    vae: VAEConfig | None = VAEConfig()  # None: the UNet works on pixels in [-1, 1] ...
    pixel_patch: int = 1  # ... rearranged into (patch x patch x 3)-channel latents (space-to-depth)
    text_encoder: CLIPTextConfig | None = CLIPTextConfig()
    schedule: NoiseSchedule = NoiseSchedule()
    empty_prompt_ids: tuple[int, ...] | None = None  # the unconditional prompt, tokenized

    def __post_init__(self):
        latent_channels = self.vae.latent_channels if self.vae else 3 * self.pixel_patch ** 2
        if latent_channels != self.unet.in_channels:
            raise ValueError(f"unet.in_channels {self.unet.in_channels} != the latent channels {latent_channels} "
                             "(vae.latent_channels, or 3 * pixel_patch**2 without a VAE)")
        if self.text_encoder is not None and self.text_encoder.width != self.unet.cross_attention_dim:
            raise ValueError(f"unet.cross_attention_dim {self.unet.cross_attention_dim} != text_encoder.width "
                             f"{self.text_encoder.width}")

    @property
    def image_size(self) -> int:
        return self.unet.sample_size * (self.vae.downscale if self.vae else self.pixel_patch)

    @classmethod
    def from_dict(cls, d: dict) -> "StableDiffusionConfig":
        return cls(unet=UNetConfig.from_dict(d["unet"]),
                   vae=VAEConfig.from_dict(d["vae"]) if d.get("vae") else None,
                   text_encoder=CLIPTextConfig(**d["text_encoder"]) if d.get("text_encoder") else None,
                   pixel_patch=d.get("pixel_patch", 1), schedule=NoiseSchedule(**d.get("schedule", {})),
                   empty_prompt_ids=tuple(d["empty_prompt_ids"]) if d.get("empty_prompt_ids") else None)


class StableDiffusion(nnx.Module):

    def __init__(self, config: StableDiffusionConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config, self.dtype = config, dtype  # dtype: the compute dtype (the API reads it)
        self.unet = UNet(config.unet, dtype=dtype, rngs=rngs)
        self.vae = AutoencoderKL(config.vae, dtype=dtype, rngs=rngs) if config.vae else None
        self.text_encoder = CLIPTextEncoder(config.text_encoder, dtype=dtype, rngs=rngs) \
            if config.text_encoder else None

    def latents_to_images(self, latents):
        """Scaled latents (B,h,w,Z) -> images (B,H,W,3), about [-1,1]."""
        if self.vae is None:
            return depth_to_space(latents.astype(jnp.float32), self.config.pixel_patch)
        return self.vae.decode(latents / self.config.vae.scaling_factor)

    def images_to_latents(self, images):
        """Images (B,H,W,3) in [-1,1] -> scaled latents (the posterior mean)."""
        if self.vae is None:
            return space_to_depth(images.astype(jnp.float32), self.config.pixel_patch)
        return self.vae.encode(images)[0] * self.config.vae.scaling_factor


def space_to_depth(x, p: int):
    """(B,H,W,C) -> (B,H/p,W/p,p*p*C): each p x p patch becomes one position."""
    b, h, w, c = x.shape
    return x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, h // p, w // p, p * p * c)


def depth_to_space(x, p: int):
    """The inverse of `space_to_depth`."""
    b, h, w, c = x.shape
    return x.reshape(b, h, w, p, p, c // (p * p)).transpose(0, 1, 3, 2, 4, 5).reshape(b, h * p, w * p, c // (p * p))
