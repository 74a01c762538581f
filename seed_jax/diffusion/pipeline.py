"""Embeddings -> images: classifier-free guided denoising with a sampler, then the
autoencoder's decoder. Everything here is traced into one jitted program."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from seed_jax.diffusion import samplers
from seed_jax.models.stable_diffusion import StableDiffusion


def guided_denoiser(model: StableDiffusion, prompt_embeds: jax.Array, negative_embeds: jax.Array | None,
                    guidance_scale: jax.Array):
    """denoise(x, t) = out(x | negative) + g (out(x | prompt) - out(x | negative)), the
    UNet's output (noise or v), both halves in one UNet call; without `negative_embeds`,
    the plain conditional output. Embeddings (B,S,X)."""
    context = None if negative_embeds is None else jnp.concatenate([negative_embeds, prompt_embeds])

    def denoise(x, t):
        if context is None:
            output = model.unet(x, t, prompt_embeds)
        else:
            unconditional, conditional = jnp.split(model.unet(jnp.concatenate([x, x]), t, context), 2)
            output = unconditional + guidance_scale * (conditional - unconditional)
        return output

    return denoise


def sample(model: StableDiffusion, prompt_embeds: jax.Array, negative_embeds: jax.Array | None,
           latents: jax.Array, guidance_scale: jax.Array, *, sampler: str, plan: samplers.Plan) -> jax.Array:
    """Initial noise latents (B,h,w,Z) -> images (B,H,W,3) clipped to [-1,1], float32."""
    method = samplers.get(sampler)
    denoise = guided_denoiser(model, prompt_embeds, negative_embeds, guidance_scale)
    final = samplers.run(method, plan, denoise, latents.astype(jnp.float32))
    return jnp.clip(model.latents_to_images(final), -1.0, 1.0)
