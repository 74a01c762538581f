"""User-facing inference. `SeedTokenizer.load(OUT, diffusion=SD_OUT)` then
`preprocess`, `encode`, `embed_codes`, `decode`, `reconstruct`;
`StableDiffusion.load(SD_OUT)` then `sample`; `SeedOPT.load(OPT_OUT)` then
`logits`, `generate`, and with SEED `caption`, `answer`, `generate_image`. Batches of any size run in chunks
of `batch_size` rows through one compiled program per chunk size (the last chunk is
padded; SeedOPT's also per prompt length and decoding options), their results come
back to host memory chunk by chunk as numpy arrays, and inputs are checked before
anything runs.

    tokenizer = SeedTokenizer.load("exports/seed_v1", diffusion="exports/sd_v1_4")
    codes = tokenizer.encode(tokenizer.preprocess(images))   # uint8 (B,H,W,3) -> int32 (B,32)
    prompt_embeds = tokenizer.embed_codes(codes)               # (B,77,768)
    images = tokenizer.decode(codes)                           # uint8 (B,512,512,3)
"""

from __future__ import annotations

import functools
import inspect
import os
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from seed_jax import generation, weights
from seed_jax.data import opt_text, sequences
from seed_jax.data import preprocess as image_preprocess
from seed_jax.data.opt_text import OPTTextTokenizer
from seed_jax.diffusion import pipeline, samplers
from seed_jax.models import layers
from seed_jax.models.opt import OPT as OPTModel
from seed_jax.models.stable_diffusion import StableDiffusion as StableDiffusionModel
from seed_jax.models.tokenizer import SeedTokenizer as SeedTokenizerModel

# CLIP-normalised pixels of uint8 images lie in [-1.80, 2.15]. The bound is wide
# (standard-normal test inputs pass) but catches 0..255 images that skipped
# normalisation.
PIXEL_RANGE = (-8.0, 8.0)
IMAGES_EXPECTED = "uint8 (B,H,W,3), one image or a non-empty list of images (uint8 (H,W,3) or PIL)"
INTERMEDIATES = ("vit_features", "image_embeds", "causal_embeddings", "quant_input", "codes", "quantized")


class SeedTokenizer:
    """Image <-> SEED codes. `dtype` is the compute dtype ("float32" or "bfloat16");
    parameters stay float32 and the codebook distances are always float32."""

    def __init__(self, model: SeedTokenizerModel, *, dtype: str = "float32", batch_size: int = 32,
                 diffusion: "StableDiffusion | None" = None):
        layers.compute_dtype(dtype)  # checks the name
        _check_count("batch_size", batch_size, 1)
        self.model, self.config, self.dtype, self.batch_size = model, model.config, dtype, batch_size
        if diffusion is not None and diffusion.context_shape[1] != model.config.generation_width:
            raise ValueError(f"diffusion: its UNet takes {diffusion.context_shape[1]}-wide context, the tokenizer's "
                             f"generation embeddings are {model.config.generation_width}-wide")
        self.diffusion = diffusion
        graphdef, state = nnx.split(model)
        # float32 means float32 on every backend (GPUs otherwise round matmul inputs to TF32).
        precision = "highest" if dtype == "float32" else "default"

        def encode(state, pixels, intermediates: bool):
            with jax.default_matmul_precision(precision):
                out = nnx.merge(graphdef, state).encode(pixels)
            # Codes alone unless asked: each chunk's outputs stay on the device until
            # the chunks are joined (ViT-g's features are 1.4 MB an image).
            return {k: out[k] for k in INTERMEDIATES} if intermediates else {"codes": out["codes"]}

        def embed_codes(state, codes):
            with jax.default_matmul_precision(precision):
                return nnx.merge(graphdef, state).embed_codes(codes)

        self._state = state
        self._encode = jax.jit(encode, static_argnames="intermediates")
        self._embed_codes = jax.jit(embed_codes)

    @classmethod
    def load(cls, path: str, *, diffusion: str | None = None, dtype: str = "float32",
             batch_size: int = 32) -> "SeedTokenizer":
        """From an export directory (`seed_jax.convert seed_v1` or `seed_jax.export`);
        `diffusion` is a `stable_diffusion` export, needed by `decode`/`reconstruct`."""
        model, _, _ = weights.load_model(path, dtype=layers.compute_dtype(dtype), kind="seed_tokenizer")
        sd = StableDiffusion.load(diffusion, dtype=dtype, batch_size=min(batch_size, 8)) if diffusion else None
        return cls(model, dtype=dtype, batch_size=batch_size, diffusion=sd)

    @property
    def image_size(self) -> int:
        return self.config.vit.image_size

    @property
    def num_codes(self) -> int:
        return self.config.num_codes

    @property
    def num_queries(self) -> int:
        return self.config.qformer.num_queries

    # ---- images -> pixels
    def preprocess(self, images) -> np.ndarray:
        """Images -> float32 (B,S,S,3) as the evaluation reads image files: RGB, bicubic
        resize to the model's size (PIL, as torchvision's Resize on a PIL image), /255,
        CLIP mean/std. `images`: uint8 (B,H,W,3), or one image, or a list of images of
        any sizes; an image is uint8 (H,W,3) or a PIL image of any mode (converted as
        training converts decoded files: `data.preprocess.to_rgb`)."""
        batch = _image_list(images)
        size = self.image_size
        pixels = np.empty((len(batch), size, size, 3), np.float32)
        for i, image in enumerate(batch):
            pixels[i] = image_preprocess.normalize(image_preprocess.resize(_rgb_image(f"images[{i}]", image), size))
        return pixels

    # ---- pixels -> codes
    def _check_pixels(self, pixels) -> np.ndarray:
        s = self.image_size
        pixels = np.asarray(pixels)
        if pixels.ndim != 4 or pixels.shape[1:] != (s, s, 3):
            raise ValueError(f"pixels: expected (B,{s},{s},3) (see preprocess), got {pixels.shape}")
        if not pixels.shape[0]:
            raise ValueError(f"pixels: the batch is empty, got {pixels.shape}")
        if not jnp.issubdtype(pixels.dtype, jnp.floating):  # numpy's says no to bfloat16
            raise ValueError(f"pixels: expected floating point CLIP-normalised values, got {pixels.dtype}; "
                             "pass uint8 images through preprocess() first")
        low, high = float(pixels.min()), float(pixels.max())
        if not (np.isfinite(low) and np.isfinite(high)) or low < PIXEL_RANGE[0] or high > PIXEL_RANGE[1]:
            raise ValueError(f"pixels: values in [{low:.3g}, {high:.3g}], expected CLIP-normalised values "
                             f"within {list(PIXEL_RANGE)}; pass uint8 images through preprocess()")
        return pixels.astype(np.float32)

    def encode(self, pixels, return_intermediates: bool = False):
        """pixels float (B,S,S,3) -> int32 codes (B,32); with `return_intermediates`
        a dict of `INTERMEDIATES` (each with leading B)."""
        pixels = self._check_pixels(pixels)
        out = self._chunked(functools.partial(self._encode, intermediates=return_intermediates), pixels)
        return out if return_intermediates else out["codes"]

    # ---- codes -> generation embeddings
    def embed_codes(self, codes) -> np.ndarray:
        """int codes (B,32) in [0, num_codes) -> generation embeddings (B,77,G) float32."""
        codes = np.asarray(codes)
        if codes.ndim != 2 or codes.shape[1] != self.num_queries:
            raise ValueError(f"codes: expected (B,{self.num_queries}), got {codes.shape}")
        if not codes.shape[0]:
            raise ValueError(f"codes: the batch is empty, got {codes.shape}")
        if not np.issubdtype(codes.dtype, np.integer):
            raise ValueError(f"codes: expected integers, got {codes.dtype}")
        if codes.min() < 0 or codes.max() >= self.num_codes:
            raise ValueError(f"codes: values must lie in [0, {self.num_codes}), got [{codes.min()}, {codes.max()}]")
        return self._chunked(self._embed_codes, codes.astype(np.int32))

    def _chunked(self, fn, inputs: np.ndarray):
        return run_in_chunks(lambda *chunk: fn(self._state, *chunk), (inputs,), self.batch_size)

    # ---- codes -> images (needs the diffusion model given to `load`)
    def decode(self, codes, num_steps: int = 50, guidance_scale: float = 7.5, sampler: str = "plms",
               seed: int = 0) -> np.ndarray:
        """int codes (B,32) -> uint8 images (B,S,S,3) (S = 512 for SD v1): the codes'
        generation embeddings condition the diffusion model, the empty prompt is the
        unconditional side of guidance, and image i starts from noise seeded by
        (seed, i)."""
        self.check_decode_options(num_steps=num_steps, guidance_scale=guidance_scale, sampler=sampler, seed=seed)
        embeds = self.embed_codes(codes)
        latents = self.diffusion.initial_noise(embeds.shape[0], seed)
        images = self.diffusion.sample(embeds, latents=latents, num_steps=num_steps, guidance_scale=guidance_scale,
                                       sampler=sampler)
        return to_uint8(images)

    def check_decode_options(self, **options) -> None:
        """Raises the error `decode(codes, **options)` would raise for its options (a
        bad or unknown one; no diffusion model), running nothing."""
        bound = inspect.signature(self.decode).bind(None, **options)  # decode's defaults, in one place
        bound.apply_defaults()
        if self.diffusion is None:
            raise ValueError("decode needs a diffusion model: SeedTokenizer.load(path, diffusion=SD_EXPORT)")
        given = bound.arguments
        self.diffusion.check_sampling(given["num_steps"], given["guidance_scale"], given["sampler"], given["seed"])

    def reconstruct(self, images, **decode_options) -> np.ndarray:
        """Images (see preprocess) -> encode -> decode (options as `decode`)."""
        return self.decode(self.encode(self.preprocess(images)), **decode_options)


def _image_list(images) -> list:
    """`SeedTokenizer.preprocess`'s `images` -> a non-empty list of single images."""
    if isinstance(images, Image.Image):
        return [images]
    if hasattr(images, "__array__"):  # a jax or torch array too: rows would read a (H,W,3) image as H images
        images = np.asarray(images)
    if isinstance(images, np.ndarray):
        batch = [images] if images.ndim == 3 else list(images) if images.ndim == 4 else []
    elif isinstance(images, (str, bytes)) or not isinstance(images, Iterable):  # a path is no image
        batch = []
    else:
        batch = list(images)
    if not batch:
        raise ValueError(f"images: expected {IMAGES_EXPECTED}, got "
                         f"{getattr(images, 'shape', None) or type(images).__name__}")
    return batch


def _rgb_image(name: str, image) -> Image.Image:
    """A PIL image of any mode (to RGB) or a uint8 (H,W,3) array -> a non-empty RGB PIL image."""
    if isinstance(image, Image.Image):
        rgb = image_preprocess.to_rgb(image)
    else:
        array = np.asarray(image)
        if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != 3:
            raise ValueError(f"{name}: expected uint8 (H,W,3) or a PIL image, got {array.dtype} {array.shape}")
        rgb = Image.fromarray(array)
    if not (rgb.width and rgb.height):  # PIL would resize it to a black image
        raise ValueError(f"{name}: expected a non-empty image, got {rgb.width}x{rgb.height} pixels")
    return rgb


def seed_key(seed: int) -> jax.Array:
    """The PRNG key of a user's `seed`, an integer in [0, 2**32): with 64-bit mode off
    jax keeps only a seed's low 32 bits, so 2**32 would silently give seed 0's key."""
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or not 0 <= seed < 2**32:
        raise ValueError(f"seed: expected an integer in [0, 2**32), got {seed!r}")
    return jax.random.key(int(seed))


def _check_finite_number(name: str, value) -> float:
    """One finite real number, else a ValueError naming `name`."""
    number = np.asarray(value)
    if number.ndim or number.dtype.kind not in "iuf" or not np.isfinite(number):  # "iuf": int, uint, float
        raise ValueError(f"{name}: expected a finite number, got {value!r}")
    return float(number)


def _is_integer(value) -> bool:
    """A Python or numpy integer, not a bool (a float count fails inside jit, naming nothing)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_count(name: str, value, minimum: int, note: str = "") -> int:
    """An integer >= `minimum`, else a ValueError naming `name` (and `note`)."""
    if not _is_integer(value) or value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}{f' ({note})' if note else ''}, got {value!r}")
    return int(value)


def _check_ids_in_vocabulary(name: str, ids: np.ndarray, vocab_size: int, hint: str = "") -> None:
    """Refuses token ids outside [0, vocab_size), naming `name` (and adding `hint`)."""
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"{name}: values must lie in [0, {vocab_size}) (the text encoder's vocabulary), "
                         f"got [{ids.min()}, {ids.max()}]" + (f"; {hint}" if hint else ""))


def to_uint8(images) -> np.ndarray:
    """Float images in [-1,1] -> uint8 [0,255]."""
    return np.round((np.clip(np.asarray(images, np.float32), -1, 1) + 1) * 127.5).astype(np.uint8)


def run_in_chunks(fn, inputs: tuple, batch_size: int):
    """Runs `fn(*chunk)` over chunks of `batch_size` rows of every array in `inputs`
    (the last chunk padded with copies of its first row, so one program serves all) and
    joins the results as numpy arrays. A chunk's outputs are copied to the host
    while the next chunk runs, so the device holds two chunks' outputs at most,
    whatever the batch."""
    n = inputs[0].shape[0]
    if n == 0:
        raise ValueError("inputs: the batch is empty")
    size = min(batch_size, n)
    joined, pending = None, None
    for start in range(0, n, size):
        running = (start, fn(*_padded_chunk(inputs, start, size)))  # dispatched: runs while `pending` is copied
        if pending is not None:
            joined = _copy_to_host(joined, n, *pending)
        pending = running
    return _copy_to_host(joined, n, *pending)


def _padded_chunk(inputs: tuple, start: int, size: int) -> tuple:
    """Rows [start, start + size) of every array in `inputs`, past the end copies of the chunk's first row."""
    chunk = tuple(x[start:start + size] for x in inputs)
    missing = size - chunk[0].shape[0]
    return tuple(np.concatenate([x, np.repeat(x[:1], missing, axis=0)]) for x in chunk) if missing else chunk


def _copy_to_host(joined, n: int, start: int, outputs):
    """Copies a chunk's `outputs` (a pytree of arrays with leading chunk size) into
    rows `start`... of `joined` (numpy arrays of n rows, made at the first chunk),
    leaving out the padding rows; returns `joined`."""
    host = jax.device_get(outputs)
    if joined is None:
        joined = jax.tree.map(lambda x: np.empty((n, *x.shape[1:]), x.dtype), host)

    def copy(into, chunk):
        into[start:start + len(chunk)] = chunk[:n - start]

    jax.tree.map(copy, joined, host)
    return joined


class StableDiffusion:
    """Prompt embeddings -> images with a converted Stable Diffusion (or a model from
    `configs/decoder.py`). The whole sampling loop, classifier-free guidance and the
    VAE decoder run as one jitted program per (sampler, steps, chunk size)."""

    def __init__(self, model: StableDiffusionModel, *, dtype: str = "float32", batch_size: int = 8):
        layers.compute_dtype(dtype)  # checks the name
        _check_count("batch_size", batch_size, 1)
        self.model, self.config, self.dtype, self.batch_size = model, model.config, dtype, batch_size
        graphdef, self._state = nnx.split(model)
        precision = "highest" if dtype == "float32" else "default"

        def sample(state, plan, prompt_embeds, negative_embeds, latents, guidance_scale, sampler):
            with jax.default_matmul_precision(precision):
                return pipeline.sample(nnx.merge(graphdef, state), prompt_embeds, negative_embeds, latents,
                                       guidance_scale, sampler=sampler, plan=plan)

        def encode_text(state, ids):
            with jax.default_matmul_precision(precision):
                return nnx.merge(graphdef, state).text_encoder(ids)

        self._sample = jax.jit(sample, static_argnames="sampler")
        self._empty_prompt = None
        self._encode_text = jax.jit(encode_text)

    @classmethod
    def load(cls, path: str, *, dtype: str = "float32", batch_size: int = 8) -> "StableDiffusion":
        """From an export directory (`python -m seed_jax.convert sd` or a decoder workdir export)."""
        model, _, _ = weights.load_model(path, dtype=layers.compute_dtype(dtype), kind="stable_diffusion")
        return cls(model, dtype=dtype, batch_size=batch_size)

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
        """(B,h,w,Z) standard normal; row i depends only on (seed, i)."""
        key = seed_key(seed)
        return np.asarray(jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), self.latent_shape))(
            jnp.arange(batch)))

    def encode_text(self, input_ids) -> np.ndarray:
        """Token ids (B,L) in [0, vocab_size) -> the text encoder's last hidden state (B,L,X)."""
        if self.model.text_encoder is None:
            raise ValueError("this model has no text encoder")
        ids = np.asarray(input_ids)
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"input_ids: expected integer (B,L), got {ids.dtype} {ids.shape}")
        if not ids.shape[0]:
            raise ValueError(f"input_ids: the batch is empty, got {ids.shape}")
        # the embedding lookup would clamp an id outside the vocabulary to its last row
        _check_ids_in_vocabulary("input_ids", ids, self.config.text_encoder.vocab_size)
        return run_in_chunks(lambda x: self._encode_text(self._state, x), (ids.astype(np.int32),), self.batch_size)

    def empty_prompt_embeds(self, batch: int) -> np.ndarray:
        """(B,L,X): the text encoder's output for the empty prompt (the unconditional side)."""
        if self.config.empty_prompt_ids is None or self.model.text_encoder is None:
            raise ValueError("this model has no text encoder or empty-prompt ids: pass negative_embeds")
        if self._empty_prompt is None:  # the weights are fixed: encode once
            ids = np.asarray([self.config.empty_prompt_ids])
            _check_ids_in_vocabulary("empty_prompt_ids", ids, self.config.text_encoder.vocab_size,
                                     hint="the model's tokenized empty prompt does not fit its text encoder; "
                                          "pass negative_embeds")
            self._empty_prompt = self.encode_text(ids)
        return np.repeat(self._empty_prompt, batch, axis=0)

    def sample(self, prompt_embeds, negative_embeds=None, *, latents=None, num_steps: int = 50,
               guidance_scale: float = 7.5, sampler: str = "plms", seed: int = 0) -> np.ndarray:
        """prompt_embeds (B,L,X) -> float32 images (B,H,W,3) in [-1,1].

        `negative_embeds` (B,L,X) defaults to the empty prompt's embedding; guidance
        applies when `guidance_scale` > 1. `latents` (B,h,w,Z) is the initial noise
        (default: `initial_noise(B, seed)`). `sampler`: "plms", "ddim" or "dpm++2m"."""
        prompt_embeds = self._check_embeds("prompt_embeds", prompt_embeds, None)
        batch = prompt_embeds.shape[0]
        if not batch:
            raise ValueError(f"prompt_embeds: the batch is empty, got {prompt_embeds.shape}")
        scale, plan = self.check_sampling(num_steps, guidance_scale, sampler, seed)
        guided = scale > 1.0
        if guided:
            if negative_embeds is None:
                negative_embeds = self.empty_prompt_embeds(batch)
                if negative_embeds.shape[1] != prompt_embeds.shape[1]:  # both halves share one UNet batch
                    raise ValueError(f"prompt_embeds: {prompt_embeds.shape[1]} tokens long, the empty prompt's "
                                     f"embedding (the default negative_embeds) is {negative_embeds.shape[1]}; "
                                     "pass negative_embeds of the same length")
            else:
                negative_embeds = self._check_embeds("negative_embeds", negative_embeds, batch,
                                                     prompt_embeds.shape[1])
        latents = self.initial_noise(batch, seed) if latents is None else np.asarray(latents, np.float32)
        factor = 2 ** (len(self.config.unet.block_channels) - 1)
        if (latents.ndim != 4 or latents.shape[0] != batch or latents.shape[-1] != self.latent_shape[-1]
                or latents.shape[1] % factor or latents.shape[2] % factor):
            raise ValueError(f"latents: expected ({batch},h,w,{self.latent_shape[-1]}) with h and w multiples of "
                             f"{factor} (default size {self.latent_shape[:2]}), got {latents.shape}")
        if not np.isfinite(latents).all():
            raise ValueError("latents: contains NaN or infinity")
        inputs = (prompt_embeds, negative_embeds, latents) if guided else (prompt_embeds, latents)

        def run(*chunk):
            prompt, negative, noise = chunk if guided else (chunk[0], None, chunk[1])
            return self._sample(self._state, plan, prompt, negative, noise, scale, sampler)

        return run_in_chunks(run, inputs, self.batch_size)

    def check_sampling(self, num_steps: int, guidance_scale: float, sampler: str, seed: int):
        """(guidance scale float32, the sampler's plan) for `sample`'s options, else a
        ValueError naming the bad one."""
        scale = np.float32(_check_finite_number("guidance_scale", guidance_scale))  # NaN > 1 is False: no guidance
        seed_key(seed)
        return scale, samplers.get(sampler).plan(self.config.schedule, num_steps)

    def _check_embeds(self, name: str, embeds, batch: int | None, length: int | None = None) -> np.ndarray:
        embeds = np.asarray(embeds, np.float32)
        width = self.config.unet.cross_attention_dim
        if embeds.ndim != 3 or embeds.shape[-1] != width or (batch is not None and embeds.shape[0] != batch) \
                or (length is not None and embeds.shape[1] != length):
            expected = f"({batch if batch is not None else 'B'},{length or 'L'},{width})"
            raise ValueError(f"{name}: expected {expected}, got {embeds.shape}")
        if not np.isfinite(embeds).all():
            raise ValueError(f"{name}: contains NaN or infinity")
        return embeds


class SeedOPT:
    """An OPT language model (a converted Hugging Face OPT, with or without SEED's
    appended image tokens, or a SEED-OPT training export): `logits` and jitted,
    cached `generate`; with a text tokenizer and image tokens also `caption_codes` /
    `answer_codes` / `image_codes`, and with a `SeedTokenizer` `caption`, `answer`
    and `generate_image` on images. Batches run `batch_size` rows at a time (the KV
    cache holds batch_size * num_beams rows). `eos_id` (an id, None, or a list of ids,
    which makes `generate` ask for one) and `pad_id` are `generate`'s defaults: `load`
    reads those of the converted folder, as transformers' `generate` does."""

    def __init__(self, model: OPTModel, *, dtype: str = "float32", image_token_ids: dict | None = None,
                 text_tokenizer: OPTTextTokenizer | None = None, tokenizer: SeedTokenizer | None = None,
                 prompts: sequences.Prompts = sequences.Prompts(), batch_size: int = 32,
                 max_text_tokens: int = sequences.MAX_TEXT_TOKENS, eos_id: int | list[int] | None = None,
                 pad_id: int = 1):
        layers.compute_dtype(dtype)  # checks the name
        _check_count("batch_size", batch_size, 1)
        self.model, self.config, self.dtype, self.batch_size = model, model.config, dtype, batch_size
        self.eos_id, self.pad_id = eos_id, pad_id
        self.image_token_ids = image_token_ids or {}
        if tokenizer is not None and self.image_token_ids:  # else codes of one would read as the other's
            num_codes = self.config.total_vocab_size - self.image_token_ids["first_code_id"]
            if tokenizer.num_codes != num_codes:
                raise ValueError(f"tokenizer: its {tokenizer.num_codes} codes, the model's image tokens hold "
                                 f"{num_codes} codes: expected the SEED tokenizer SEED-OPT was trained on")
        self.text_tokenizer, self.tokenizer, self.prompts = text_tokenizer, tokenizer, prompts
        self.max_text_tokens = max_text_tokens
        graphdef, self._state = nnx.split(model)
        precision = "highest" if dtype == "float32" else "default"

        def logits(state, ids, mask):
            with jax.default_matmul_precision(precision):
                return nnx.merge(graphdef, state)(ids, mask)[0]

        def generate(state, ids, mask, rng, allowed, max_new_tokens, sampling, eos_id, pad_id):
            with jax.default_matmul_precision(precision):
                return generation.generate(nnx.merge(graphdef, state), ids, mask, max_new_tokens=max_new_tokens,
                                           sampling=sampling, rng=rng, allowed=allowed, eos_id=eos_id, pad_id=pad_id)

        def beam_search(state, ids, mask, max_new_tokens, num_beams, eos_id, pad_id, length_penalty):
            with jax.default_matmul_precision(precision):
                return generation.beam_search(nnx.merge(graphdef, state), ids, mask, max_new_tokens=max_new_tokens,
                                              num_beams=num_beams, eos_id=eos_id, pad_id=pad_id,
                                              length_penalty=length_penalty)

        self._logits = jax.jit(logits)
        self._generate = jax.jit(generate, static_argnames=("max_new_tokens", "eos_id", "pad_id"))
        self._beam_search = jax.jit(beam_search, static_argnames=("max_new_tokens", "num_beams", "eos_id", "pad_id",
                                                                  "length_penalty"))

    @classmethod
    def load(cls, path: str, *, dtype: str = "float32", tokenizer: "str | SeedTokenizer | None" = None,
             diffusion: str | None = None, text_tokenizer: str | None = None, batch_size: int = 32) -> "SeedOPT":
        """From an `opt` export (`python -m seed_jax.convert hf_opt`, or a SEED-OPT
        training export). The text tokenizer is `text_tokenizer` (a tokenizer.json,
        or a folder with OPT's vocab.json + merges.txt) or the export's own
        text_tokenizer.json; `tokenizer` (a SEED tokenizer export, with `diffusion`
        for images, or a `SeedTokenizer`) enables the image methods; a tokenizer loaded
        here runs `batch_size` rows at a time too. The prompts, and the length their
        text is cut to, are those SEED-OPT was trained with (the export's info), else
        `sequences.Prompts()` and `sequences.MAX_TEXT_TOKENS`. `generate` ends rows at the
        converted folder's eos_token_id and pads them with its pad_token_id (exports
        without them: no end token, padding 1)."""
        if diffusion is not None and not isinstance(tokenizer, str):  # it would go unused
            raise ValueError(f"diffusion: given without a SEED tokenizer export path (tokenizer={tokenizer!r}); "
                             "pass tokenizer=PATH, or a SeedTokenizer loaded with diffusion=")
        model, _, _ = weights.load_model(path, dtype=layers.compute_dtype(dtype), kind="opt")
        info = weights.read_config(path)[2]
        ids = {k: info[k] for k in ("image_start_id", "image_end_id", "first_code_id") if k in info}
        if isinstance(tokenizer, str):
            tokenizer = SeedTokenizer.load(tokenizer, diffusion=diffusion, dtype=dtype, batch_size=batch_size)
        if text_tokenizer is not None and not os.path.exists(text_tokenizer):
            raise FileNotFoundError(f"text_tokenizer: {text_tokenizer!r} does not exist")
        own = os.path.join(path, opt_text.FILE_NAME)
        prompts = sequences.Prompts(**info.get("prompts", {}))
        return cls(model, dtype=dtype, image_token_ids=ids, tokenizer=tokenizer, batch_size=batch_size, prompts=prompts,
                   max_text_tokens=info.get("max_text_tokens", sequences.MAX_TEXT_TOKENS),
                   eos_id=info.get("eos_token_id"), pad_id=info.get("pad_token_id", 1),
                   text_tokenizer=_load_text_tokenizer(text_tokenizer or own) if text_tokenizer or os.path.exists(own)
                   else None)

    def _check_ids(self, input_ids, attention_mask, *, left_padded: bool):
        """(B,L) ids and their 0/1 mask (default all ones) -> int32 arrays; prompts to
        continue (`left_padded`) must end in a real token."""
        ids = np.asarray(input_ids)
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer) or not ids.size:
            raise ValueError(f"input_ids: expected integer (B,L) with B, L >= 1, got {ids.dtype} {ids.shape}")
        if ids.min() < 0 or ids.max() >= self.config.total_vocab_size:
            raise ValueError(f"input_ids: values must lie in [0, {self.config.total_vocab_size}), "
                             f"got [{ids.min()}, {ids.max()}]")
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask: expected {ids.shape} like input_ids, got {mask.shape}")
        if not np.isin(mask, (0, 1)).all():
            raise ValueError(f"attention_mask: expected values 0 and 1, got {np.unique(mask).tolist()}")
        if not mask.any(1).all():
            raise ValueError(f"attention_mask: expected a 1 in every row, rows {np.flatnonzero(~mask.any(1)).tolist()} "
                             "are all 0")
        if left_padded and not mask[:, -1].all():
            raise ValueError(f"attention_mask: expected left-padded prompts (1 in the last column), rows "
                             f"{np.flatnonzero(mask[:, -1] == 0).tolist()} end in padding")
        return ids.astype(np.int32), mask.astype(np.int32)

    def logits(self, input_ids, attention_mask=None) -> np.ndarray:
        """(B,L) ids (padded, with `attention_mask`) -> (B,L,V) float32 logits."""
        ids, mask = self._check_ids(input_ids, attention_mask, left_padded=False)
        if ids.shape[1] > self.config.max_positions:
            raise ValueError(f"input_ids: length {ids.shape[1]} exceeds the model's {self.config.max_positions} "
                             "positions")
        return run_in_chunks(lambda i, m: self._logits(self._state, i, m), (ids, mask), self.batch_size)

    def generate(self, input_ids, max_new_tokens: int, *, attention_mask=None, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int | None = None, eos_id: int | None | str = "model",
                 pad_id: int | str = "model", allowed: list[tuple[int, int]] | None = None, num_beams: int = 1,
                 length_penalty: float = 1.0) -> np.ndarray:
        """(B,P) left-padded prompts -> (B,max_new_tokens) int32, `pad_id` after
        `eos_id` (as transformers' `generate`, whose output would end where every row
        has ended): greedy at temperature 0, else sampled (top-k / top-p; `seed`
        defaults to 0). `eos_id` / `pad_id` "model": this SeedOPT's (`load`: the
        converted folder's); `eos_id` None: no end token. `allowed[t] = (low, high)`
        restricts step t. `num_beams` > 1: beam search as transformers'
        `generate(num_beams=..., do_sample=False)` (no sampling options or `allowed`),
        finished hypotheses scored by log-probability / length**`length_penalty`."""
        eos_id, pad_id = self._end_and_padding(eos_id, pad_id)
        ids, mask = self._check_ids(input_ids, attention_mask, left_padded=True)
        if ids.shape[1] > self.config.max_positions:
            raise ValueError(f"input_ids: length {ids.shape[1]} exceeds the model's {self.config.max_positions} "
                             "positions")
        # the last new token is not fed back, so it needs no position of its own
        longest = self.config.max_positions - ids.shape[1] + 1
        if not _is_integer(max_new_tokens) or not 1 <= max_new_tokens <= longest:
            raise ValueError(f"max_new_tokens: expected an integer in 1..{longest} (the model has "
                             f"{self.config.max_positions} positions), got {max_new_tokens!r}")
        num_beams = _check_count("num_beams", num_beams, 1, "1: no beam search")
        vocab = self.config.total_vocab_size
        if eos_id is not None and (not _is_integer(eos_id) or not 0 <= eos_id < vocab):  # else no row would end
            raise ValueError(f"eos_id: expected None or a token id in [0, {vocab}), got {eos_id!r}")
        if not _is_integer(pad_id):
            raise ValueError(f"pad_id: expected an integer, got {pad_id!r}")
        length_penalty = _check_finite_number("length_penalty", length_penalty)  # NaN: every answer empty
        if num_beams == 1 and length_penalty != 1.0:
            raise ValueError(f"length_penalty={length_penalty} applies to beam search only: expected num_beams > 1")
        if num_beams > 1:
            given = {name: value for name, value, default in [("temperature", temperature, 0.0), ("top_k", top_k, 0),
                     ("top_p", top_p, 1.0), ("seed", seed, None), ("allowed", allowed, None)] if value != default}
            if given:
                raise ValueError(f"num_beams > 1 (beam search) takes no {', '.join(given)}, got {given}")
            return run_in_chunks(lambda i, m: self._beam_search(
                self._state, i, m, max_new_tokens=max_new_tokens, num_beams=num_beams, eos_id=eos_id, pad_id=pad_id,
                length_penalty=length_penalty), (ids, mask), self.batch_size)
        sampling = generation.Sampling(temperature, top_k, top_p)
        ranges = generation.allowed_ranges(max_new_tokens, allowed, self.config.total_vocab_size)
        key = seed_key(0 if seed is None else seed)

        def run(ids, mask, rows):  # row r samples with key (seed, r), whatever the chunk it runs in
            keys = jax.vmap(lambda row: jax.random.fold_in(key, row))(rows)
            return self._generate(self._state, ids, mask, keys, ranges,
                                  max_new_tokens=max_new_tokens, sampling=sampling, eos_id=eos_id, pad_id=pad_id)

        return run_in_chunks(run, (ids, mask, np.arange(len(ids))), self.batch_size)

    def _end_and_padding(self, eos_id, pad_id) -> tuple:
        """`generate`'s eos_id and pad_id, "model" read as this SeedOPT's (checked by `generate`)."""
        models = isinstance(eos_id, str) and eos_id == "model"
        eos_id = self.eos_id if models else eos_id
        pad_id = self.pad_id if isinstance(pad_id, str) and pad_id == "model" else pad_id
        if isinstance(eos_id, list):
            whose = " (the converted model's end tokens)" if models else ""
            raise ValueError(f"eos_id: generate ends rows at one token, got {eos_id}{whose}: pass one as eos_id")
        return eos_id, pad_id

    # ---- SEED: codes <-> text
    @property
    def builder(self) -> sequences.SequenceBuilder:
        if self.text_tokenizer is None:
            raise ValueError("this SeedOPT has no text tokenizer: load(..., text_tokenizer=PATH)")
        ids = self.image_token_ids
        if not ids:
            raise ValueError("this model has no image tokens: convert it with --image_tokens, or train SEED-OPT")
        num_codes = self.config.total_vocab_size - ids["first_code_id"]
        image = sequences.ImageTokens(ids["image_start_id"], ids["image_end_id"], ids["first_code_id"], num_codes)
        return sequences.SequenceBuilder(self.text_tokenizer, image, self.prompts, self.max_text_tokens)

    def _left_padded(self, prompts: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        length = max(len(p) for p in prompts)
        pad = self.text_tokenizer.pad_id
        ids = np.asarray([[pad] * (length - len(p)) + p for p in prompts], np.int32)
        mask = np.asarray([[0] * (length - len(p)) + [1] * len(p) for p in prompts], np.int32)
        return ids, mask

    def _answers(self, prompts: list[list[int]], max_new_tokens: int, num_beams: int, **sampling) -> list[str]:
        ids, mask = self._left_padded(prompts)
        eos = self.text_tokenizer.eos_id
        tokens = self.generate(ids, max_new_tokens, attention_mask=mask, eos_id=eos, pad_id=self.text_tokenizer.pad_id,
                               num_beams=num_beams, **sampling)
        return [self._decode_answer(row[:row.index(eos)] if eos in row else row).strip() for row in tokens.tolist()]

    def _decode_answer(self, ids: list[int]) -> str:
        """Generated ids -> text, image tokens written by name (`<img_00012>`): an answer
        that holds them reads so (and is no caption's exact match), as a tokenizer with
        them added decodes it."""
        image, pieces, text = self.builder.image, [], []
        for token in ids:
            name = image.name(token)
            if name is None:
                text.append(token)
            else:
                pieces += [self.text_tokenizer.decode(text), name]
                text = []
        return "".join(pieces + [self.text_tokenizer.decode(text)])

    @property
    def num_queries(self) -> int:
        """Codes per image: the SEED tokenizer's, else SEED's 32."""
        return self.tokenizer.num_queries if self.tokenizer is not None else 32

    def _codes(self, codes) -> np.ndarray:
        codes = np.asarray(codes)
        if (codes.ndim != 2 or not np.issubdtype(codes.dtype, np.integer) or not codes.size
                or codes.shape[1] != self.num_queries):
            raise ValueError(f"codes: expected integer (B,{self.num_queries}), got {codes.dtype} {codes.shape}")
        return codes

    def caption_codes(self, codes, *, max_new_tokens: int = 30, num_beams: int = 1, **sampling) -> list[str]:
        """int codes (B,32) -> captions (image -> text after the prompt "A photo of");
        `sampling`: temperature, top_k, top_p, seed (not with num_beams > 1)."""
        builder = self.builder
        return self._answers([builder.caption_prompt(row) for row in self._codes(codes)], max_new_tokens, num_beams,
                             **sampling)

    def answer_codes(self, codes, questions: Sequence[str], *, max_new_tokens: int = 10, num_beams: int = 1,
                     **sampling) -> list[str]:
        """int codes (B,32) and B questions -> short answers ("Question: {q} Short answer.")."""
        codes = self._codes(codes)
        questions = _check_texts("questions", questions, count=len(codes))
        builder = self.builder
        prompts = [builder.question_prompt(row, q) for row, q in zip(codes, questions)]
        return self._answers(prompts, max_new_tokens, num_beams, **sampling)

    def image_codes(self, prompts: Sequence[str], *, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                    seed: int = 0) -> np.ndarray:
        """Text prompts -> int32 codes (B,32): after "Generate an image: {prompt}" and
        <img>, each of 32 steps may only emit a code token, then </img>."""
        prompts = _check_texts("prompts", prompts)
        builder = self.builder
        image = builder.image
        ids, mask = self._left_padded([builder.generation_prompt(p) for p in prompts])
        num_queries = self.num_queries
        allowed = [(image.first_code, image.first_code + image.num_codes)] * num_queries + [(image.end, image.end + 1)]
        tokens = self.generate(ids, num_queries + 1, attention_mask=mask, allowed=allowed, temperature=temperature,
                               top_k=top_k, top_p=top_p, seed=seed, eos_id=None)
        return image.to_codes(tokens[:, :num_queries])

    # ---- SEED: images <-> text (need the SEED tokenizer)
    def _seed_tokenizer(self) -> SeedTokenizer:
        if self.tokenizer is None:
            raise ValueError("images need the SEED tokenizer: SeedOPT.load(..., tokenizer=SEED_EXPORT)")
        return self.tokenizer

    def caption(self, images, **options) -> list[str]:
        """Images (as `SeedTokenizer.preprocess` takes them) -> captions (options as `caption_codes`)."""
        tokenizer = self._seed_tokenizer()
        return self.caption_codes(tokenizer.encode(tokenizer.preprocess(images)), **options)

    def answer(self, images, questions: Sequence[str], **options) -> list[str]:
        """Images (as `SeedTokenizer.preprocess` takes them) and one question each -> short answers
        (options as `answer_codes`)."""
        tokenizer = self._seed_tokenizer()
        return self.answer_codes(tokenizer.encode(tokenizer.preprocess(images)), questions, **options)

    def generate_image(self, prompts: Sequence[str], *, temperature: float = 0.0, top_k: int = 0,
                       top_p: float = 1.0, seed: int = 0, **decode_options) -> np.ndarray:
        """Text prompts -> uint8 images (B,S,S,3): `image_codes`, then
        `SeedTokenizer.decode` (needs `load(..., tokenizer=..., diffusion=...)`);
        `decode_options` as `SeedTokenizer.decode`."""
        tokenizer = self._seed_tokenizer()
        tokenizer.check_decode_options(seed=seed, **decode_options)  # before the language model runs
        codes = self.image_codes(prompts, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        return tokenizer.decode(codes, seed=seed, **decode_options)


def _check_texts(name: str, texts, count: int | None = None) -> list[str]:
    """`texts` as a list of `count` strings (None: at least one), else a ValueError
    naming `name` (a prompt's format() would write None or 3 in as text)."""
    listed = list(texts) if isinstance(texts, Iterable) and not isinstance(texts, str) else None
    if listed is None or (len(listed) != count if count is not None else not listed):
        expected = f"a list of {count} strings, one per image" if count is not None else "a non-empty list of strings"
        got = f"{len(listed)} of them" if listed is not None else repr(texts)
        raise ValueError(f"{name}: expected {expected}, got {got}")
    for i, text in enumerate(listed):
        if not isinstance(text, str):
            raise ValueError(f"{name}[{i}]: expected a string, got {text!r}")
    return listed


def _load_text_tokenizer(path: str) -> OPTTextTokenizer:
    """A tokenizer.json file, or a folder with OPT's vocab.json + merges.txt."""
    if os.path.isdir(path):
        return OPTTextTokenizer(opt_text.gpt2_bpe(path))
    return OPTTextTokenizer.load(path)
