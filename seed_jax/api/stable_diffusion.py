"""`StableDiffusion`: prompt embeddings -> images, sampling and decoding as one jitted program."""

from __future__ import annotations

import jax
import numpy as np
from absl import logging
from flax import nnx

from seed_jax import weights
from seed_jax.api.checks import as_array, check_count, check_finite_number, is_integer, seed_key
from seed_jax.api.chunks import run_in_chunks
from seed_jax.api.precision import matmul_precision, model_dtype
from seed_jax.command_line import user_path
from seed_jax.diffusion import pipeline, samplers
from seed_jax.diffusion.schedule import NoiseSchedule
from seed_jax.models import layers
from seed_jax.models.stable_diffusion import StableDiffusion as StableDiffusionModel


class StableDiffusion:
    """Prompt embeddings -> images with a converted Stable Diffusion (or a model from
    `configs/decoder.py`). The whole sampling loop, classifier-free guidance and the
    VAE decoder run as one jitted program per (sampler, steps, chunk size). `dtype` is
    the compute dtype the model was built in (None: read from it; `load(..., dtype=)`
    builds it so); float32 matmuls run at full float32 precision on every backend.
    `uncond_probability`: how often training gave the UNet the empty prompt, where known
    (a decoder export records it); 0 warns, once, when guidance falls back on it."""

    def __init__(self, model: StableDiffusionModel, *, dtype: str | None = None, batch_size: int = 8,
                 uncond_probability: float | None = None):
        dtype = model_dtype(dtype, model)
        check_count("batch_size", batch_size, 1)
        self.model, self.config, self.dtype, self.batch_size = model, model.config, dtype, batch_size
        self.uncond_probability, self._warned_unconditional = uncond_probability, False
        graphdef, self._state = nnx.split(model)
        precision = matmul_precision(dtype)

        def sample(state, plan, prompt_embeds, negative_embeds, latents, guidance_scale, sampler):
            with jax.default_matmul_precision(precision):
                return pipeline.sample(nnx.merge(graphdef, state), prompt_embeds, negative_embeds, latents,
                                       guidance_scale, sampler=sampler, plan=plan)

        def encode_text(state, ids):
            with jax.default_matmul_precision(precision):
                return nnx.merge(graphdef, state).text_encoder(ids)

        def noise(key, rows):
            return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), self.latent_shape))(rows)

        self._sample = jax.jit(sample, static_argnames="sampler")
        self._empty_prompt = None
        self._encode_text = jax.jit(encode_text)
        self._noise = jax.jit(noise)

    @classmethod
    def load(cls, path: str, *, dtype: str = "float32", batch_size: int = 8) -> "StableDiffusion":
        """From an export directory (`python -m seed_jax.convert sd` or a decoder workdir export;
        a leading `~` is the home directory)."""
        path = user_path(path)
        check_count("batch_size", batch_size, 1)  # before the weights are read
        model, _, _ = weights.load_model(path, dtype=layers.compute_dtype(dtype), kind="stable_diffusion")
        return cls(model, dtype=dtype, batch_size=batch_size,
                   uncond_probability=weights.read_config(path)[2].get("uncond_probability"))

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(h, w, Z) of the default initial noise (the size the UNet was trained at)."""
        unet = self.config.unet
        return unet.sample_size, unet.sample_size, unet.in_channels

    @property
    def context_shape(self) -> tuple[int, int]:
        length = self.config.text_encoder.max_length if self.config.text_encoder else 77
        return length, self.config.unet.cross_attention_dim

    def initial_noise(self, batch: int, seed: int = 0) -> np.ndarray:
        """(B,h,w,Z) standard normal; row i depends only on (seed, i). Drawn in chunks
        as `sample` runs (one compiled program per chunk size, not per batch size)."""
        key = seed_key(seed)
        check_count("batch", batch, 1)
        return run_in_chunks(lambda rows: self._noise(key, rows), (np.arange(batch),), self.batch_size)

    def encode_text(self, input_ids) -> np.ndarray:
        """Token ids (B,L) in [0, vocab_size) -> the text encoder's last hidden state (B,L,X)."""
        if self.model.text_encoder is None:
            raise ValueError("this model has no text encoder")
        ids = as_array("input_ids", input_ids)
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"input_ids: expected integer (B,L), got {ids.dtype} {ids.shape}")
        if not ids.shape[0]:
            raise ValueError(f"input_ids: the batch is empty, got {ids.shape}")
        # the embedding lookup would clamp an id outside the vocabulary to its last row
        _check_ids_in_vocabulary("input_ids", ids, self.config.text_encoder.vocab_size)
        return run_in_chunks(lambda x: self._encode_text(self._state, x), (ids.astype(np.int32),), self.batch_size)

    def empty_prompt_embeds(self, batch: int, length: int | None = None) -> np.ndarray:
        """(B,L,X): the text encoder's output for the empty prompt (the unconditional side),
        padded to `length` tokens (default: all of the model's empty-prompt ids), as
        StableDiffusionPipeline pads it to the prompt's length. The text encoder is causal:
        that is the first `length` rows of the full-length output."""
        if self.config.empty_prompt_ids is None or self.model.text_encoder is None:
            raise ValueError("this model has no text encoder or empty-prompt ids: pass negative_embeds")
        batch = check_count("batch", batch, 1)
        if self._empty_prompt is None:  # the weights are fixed: encode once
            ids = np.asarray([self.config.empty_prompt_ids])
            _check_ids_in_vocabulary("empty_prompt_ids", ids, self.config.text_encoder.vocab_size,
                                     hint="the model's tokenized empty prompt does not fit its text encoder; "
                                          "pass negative_embeds")
            self._empty_prompt = self.encode_text(ids)
        full = self._empty_prompt.shape[1]
        if length is not None and not (is_integer(length) and 1 <= length <= full):
            raise ValueError(f"length: expected 1..{full} (the empty prompt's ids), got {length}")
        return np.repeat(self._empty_prompt[:, :length], batch, axis=0)

    def sample(self, prompt_embeds, negative_embeds=None, *, latents=None, num_steps: int = 50,
               guidance_scale: float = 7.5, sampler: str = "plms", seed: int = 0) -> np.ndarray:
        """prompt_embeds (B,L,X) -> float32 images (B,H,W,3) in [-1,1].

        `negative_embeds` (B,L,X) defaults to the empty prompt's embedding (L tokens); guidance
        applies when `guidance_scale` > 1. `latents` (B,h,w,Z) is the initial noise
        (default: `initial_noise(B, seed)`). `sampler`: "plms", "ddim" or "dpm++2m"."""
        prompt_embeds = self._check_embeds("prompt_embeds", prompt_embeds, None)
        batch = prompt_embeds.shape[0]
        if not batch:
            raise ValueError(f"prompt_embeds: the batch is empty, got {prompt_embeds.shape}")
        scale, plan = self.check_sampling(num_steps, guidance_scale, sampler, seed)
        guided = scale > 1.0
        if negative_embeds is not None:  # also where no guidance uses them, as StableDiffusionPipeline checks them
            negative_embeds = self._check_embeds("negative_embeds", negative_embeds, batch, prompt_embeds.shape[1])
        elif guided:
            self._warn_if_unconditional_is_untrained(scale)
            length, full = prompt_embeds.shape[1], len(self.config.empty_prompt_ids or ())
            if full and length > full:  # both halves share one UNet batch
                raise ValueError(f"prompt_embeds: {length} tokens long, longer than the empty prompt's {full} "
                                 "ids (the default negative_embeds); pass negative_embeds of the same length")
            negative_embeds = self.empty_prompt_embeds(batch, length)
        latents = self.initial_noise(batch, seed) if latents is None else as_array("latents", latents, np.float32)
        if latents.ndim != 4 or latents.shape[0] != batch or latents.shape[-1] != self.latent_shape[-1] \
                or 0 in latents.shape[1:3]:
            raise ValueError(f"latents: expected ({batch},h,w,{self.latent_shape[-1]}), h and w >= 1 (default size "
                             f"{self.latent_shape[:2]}), got {latents.shape}")
        if not np.isfinite(latents).all():
            raise ValueError("latents: contains NaN or infinity")
        inputs = (prompt_embeds, negative_embeds, latents) if guided else (prompt_embeds, latents)

        def run(*chunk):
            prompt, negative, noise = chunk if guided else (chunk[0], None, chunk[1])
            return self._sample(self._state, plan, prompt, negative, noise, scale, sampler)

        return run_in_chunks(run, inputs, self.batch_size)

    def _warn_if_unconditional_is_untrained(self, scale: float) -> None:
        if self.uncond_probability == 0 and not self._warned_unconditional:
            self._warned_unconditional = True
            logging.warning("guidance_scale %g guides by the empty prompt, on which this model was never trained "
                            "(its decoder training's uncond_probability was 0): expect poor images; pass "
                            "guidance_scale=1 (no guidance), or negative_embeds", scale)

    def check_sampling(self, num_steps: int, guidance_scale: float, sampler: str, seed: int):
        """(guidance scale float32, the sampler's plan) for `sample`'s options, else a
        ValueError naming the bad one."""
        return check_sampling(self.config.schedule, num_steps, guidance_scale, sampler, seed)

    def _check_embeds(self, name: str, embeds, batch: int | None, length: int | None = None) -> np.ndarray:
        embeds = as_array(name, embeds, np.float32)
        width = self.config.unet.cross_attention_dim
        if embeds.ndim != 3 or embeds.shape[-1] != width or (batch is not None and embeds.shape[0] != batch) \
                or (length is not None and embeds.shape[1] != length):
            expected = f"({batch if batch is not None else 'B'},{length or 'L'},{width})"
            raise ValueError(f"{name}: expected {expected}, got {embeds.shape}")
        if not np.isfinite(embeds).all():
            raise ValueError(f"{name}: contains NaN or infinity")
        return embeds


def check_sampling(schedule: NoiseSchedule, num_steps: int, guidance_scale: float, sampler: str, seed: int):
    """`StableDiffusion.check_sampling` for a model of noise `schedule` (read from its
    export's config before its weights are)."""
    scale = np.float32(check_finite_number("guidance_scale", guidance_scale))  # NaN > 1 is False: no guidance
    seed_key(seed)
    return scale, samplers.get(sampler).plan(schedule, num_steps)


def _check_ids_in_vocabulary(name: str, ids: np.ndarray, vocab_size: int, hint: str = "") -> None:
    """Refuses token ids outside [0, vocab_size), naming `name` (and adding `hint`)."""
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"{name}: values must lie in [0, {vocab_size}) (the text encoder's vocabulary), "
                         f"got [{ids.min()}, {ids.max()}]" + (f"; {hint}" if hint else ""))
