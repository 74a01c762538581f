"""`SeedTokenizer`: images <-> SEED codes, codes -> generation embeddings and (with a diffusion model) images."""

from __future__ import annotations

import functools
import hashlib
import inspect

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from seed_jax import parallel, weights
from seed_jax.api.checks import as_array, check_codes, check_count
from seed_jax.api.chunks import run_in_chunks
from seed_jax.api.images import check_image, image_list, rgb_image, to_uint8
from seed_jax.api.precision import matmul_precision, model_dtype
from seed_jax.api.processes import check_same_on_every_process
from seed_jax.command_line import user_path
from seed_jax.api.stable_diffusion import StableDiffusion
from seed_jax.data import preprocess as image_preprocess
from seed_jax.models import layers
from seed_jax.models.tokenizer import SeedTokenizer as SeedTokenizerModel

# CLIP-normalised pixels of uint8 images lie in [-1.80, 2.15]. The bound is wide
# (standard-normal test inputs pass) but catches 0..255 images that skipped
# normalisation.
PIXEL_RANGE = (-8.0, 8.0)
INTERMEDIATES = ("vit_features", "image_embeds", "causal_embeddings", "quant_input", "codes", "quantized")


def untrained_codebook(path: str, info: dict) -> str | None:
    """Why the tokenizer export at `path` (its model.json `info`) holds an untrained
    codebook, or None. `seed_jax.export` records each stage's restored step: one without a
    stage-II step (`--stage=stage1`, or exported before stage II's first checkpoint) holds
    the codebook and reverse Q-Former as initialised. Converted exports record no steps."""
    steps = info.get("steps")
    if steps is None or steps.get("stage2") is not None:
        return None
    return (f"{path} holds a tokenizer trained through stage I only (steps {steps}): its codebook and "
            "reverse Q-Former are as initialised, so its codes carry nothing of the image")


def codebook_digest(codebook) -> str:
    """The first 16 hex digits of the sha256 of a codebook's (K,C) float32 values: which
    trained tokenizer's codes a SEED-OPT export reads and writes."""
    return hashlib.sha256(np.ascontiguousarray(np.asarray(codebook, np.float32)).tobytes()).hexdigest()[:16]


def read_codes_export(field: str, path: str):
    """The config of the tokenizer export that the config `field` names, for a job that
    reads or writes its codes: missing, of another kind or with an untrained codebook
    (`untrained_codebook`), it is a ValueError naming `field`."""
    _, config, info = weights.read_config_named(field, path, "seed_tokenizer")
    reason = untrained_codebook(path, info)
    if reason:
        raise ValueError(f"{field}: {reason}; export the run after stage II (python -m seed_jax.export)")
    return config


class SeedTokenizer:
    """Image <-> SEED codes. `dtype` is the compute dtype ("float32" or "bfloat16") the
    model was built in (None: read from it; `load(..., dtype=)` builds it so); parameters
    stay float32 and the codebook distances are always float32. `mesh` (the devices
    `model`'s weights are split over, by `axis_rules`): `encode`, `image_features` and
    `embed_codes` split each chunk's rows over it (`parallel.rows_apart`); None leaves the layout
    to XLA. A mesh may span several processes (multi-host): every process then makes the same
    calls with the same inputs, and gets every row back (inputs that differ between them raise a
    ValueError naming the argument). The diffusion model runs on one device (of each process)
    either way."""

    def __init__(self, model: SeedTokenizerModel, *, dtype: str | None = None, batch_size: int = 32,
                 diffusion: "StableDiffusion | None" = None, mesh: jax.sharding.Mesh | None = None,
                 axis_rules: parallel.Rules = parallel.DEFAULT_RULES):
        dtype = model_dtype(dtype, model)
        check_count("batch_size", batch_size, 1)
        parallel.check_rules(axis_rules)
        self.model, self.config, self.dtype, self.batch_size = model, model.config, dtype, batch_size
        if diffusion is not None and diffusion.context_shape[1] != model.config.generation_width:
            raise ValueError(f"diffusion: its UNet takes {diffusion.context_shape[1]}-wide context, the tokenizer's "
                             f"generation embeddings are {model.config.generation_width}-wide")
        self.diffusion = diffusion
        graphdef, state = nnx.split(model)
        precision = matmul_precision(dtype)

        def encode(state, pixels, intermediates: bool):
            with jax.default_matmul_precision(precision):
                out = nnx.merge(graphdef, state).encode(pixels)
            # Codes alone unless asked: each chunk's outputs stay on the device until
            # the chunks are joined (ViT-g's features are 1.4 MB an image).
            return {k: out[k] for k in INTERMEDIATES} if intermediates else {"codes": out["codes"]}

        def embed_codes(state, codes):
            with jax.default_matmul_precision(precision):
                return nnx.merge(graphdef, state).embed_codes(codes)

        def image_features(state, pixels):
            with jax.default_matmul_precision(precision):
                model = nnx.merge(graphdef, state)
                return model.image_features(model.causal_embeddings(pixels))

        self._state, self._mesh = state, mesh
        # every process gets every row back, as SeedOPT's decoding does
        everywhere = {} if mesh is None else {"out_shardings": parallel.replicated(mesh)}
        apart = functools.partial(parallel.rows_apart, state=state, mesh=mesh, rules=axis_rules)
        self._encode = jax.jit(apart(encode), static_argnames="intermediates", **everywhere)
        self._embed_codes = jax.jit(apart(embed_codes), **everywhere)
        self._image_features = jax.jit(apart(image_features), **everywhere)

    @classmethod
    def load(cls, path: str, *, diffusion: str | None = None, dtype: str = "float32", batch_size: int = 32,
             mesh: jax.sharding.Mesh | None = None,
             axis_rules: parallel.Rules = parallel.DEFAULT_RULES) -> "SeedTokenizer":
        """From an export directory (`seed_jax.convert seed_v1` or `seed_jax.export`);
        `diffusion` is a `stable_diffusion` export, needed by `decode`/`reconstruct`
        (read onto one device, mesh or not). With `mesh`, each tokenizer weight is read
        straight into its split over it by `axis_rules` (no device holds them all), and
        batches run as `SeedTokenizer(..., mesh=, axis_rules=)`'s. The paths (each an
        export of its kind), dtype, batch_size and axis_rules are checked before any
        weights are read; a leading `~` is the home directory."""
        path, diffusion = user_path(path), user_path(diffusion)
        check_count("batch_size", batch_size, 1)
        parallel.check_rules(axis_rules)
        compute_dtype = layers.compute_dtype(dtype)
        if diffusion:
            weights.read_config(diffusion, "stable_diffusion")
        reason = untrained_codebook(path, weights.read_config(path, "seed_tokenizer")[2])
        if reason:
            logging.warning("%s: encode, embed_codes and decode give nothing of use; image_features (stage I) "
                            "are trained", reason)
        model, _, _ = weights.load_model(path, dtype=compute_dtype, kind="seed_tokenizer", mesh=mesh,
                                         rules=axis_rules)
        sd = StableDiffusion.load(diffusion, dtype=dtype, batch_size=min(batch_size, 8)) if diffusion else None
        return cls(model, dtype=dtype, batch_size=batch_size, diffusion=sd, mesh=mesh, axis_rules=axis_rules)

    @property
    def codebook_digest(self) -> str | None:
        """`codebook_digest` of this tokenizer's codebook; None where processes split it."""
        codebook = self.model.quantize.codebook[...]
        return codebook_digest(jax.device_get(codebook)) if codebook.is_fully_addressable else None

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
        CLIP mean/std. `images`: uint8 (B,H,W,3), or one image, or a list (or 1-D object
        array) of images of any sizes; an image is uint8 (H,W,3) or a PIL image of any mode (converted as
        training converts decoded files: `data.preprocess.to_rgb`)."""
        batch = image_list(images)
        return self._pixels(batch, range(len(batch)))

    def _pixels(self, batch: list, indices) -> np.ndarray:
        """float32 (len(indices),S,S,3): `preprocess` of the images `batch[indices]`,
        a bad one named by its index in `batch`; an image listed again (`run_in_chunks`
        pads a chunk with its first) is copied, not preprocessed again."""
        size = self.image_size
        pixels = np.empty((len(indices), size, size, 3), np.float32)
        rows = {}
        for row, i in enumerate(indices):
            if i in rows:
                pixels[row] = pixels[rows[i]]
                continue
            rows[i] = row
            image = rgb_image(f"images[{i}]", batch[i])
            pixels[row] = image_preprocess.normalize(image_preprocess.resize(image, size))
        return pixels

    # ---- pixels -> codes
    def _check_pixels(self, pixels) -> np.ndarray:
        s = self.image_size
        pixels = as_array("pixels", pixels)
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
        return pixels.astype(np.float32, copy=False)  # a copy of a large batch would double its memory

    def encode(self, pixels, return_intermediates: bool = False):
        """pixels float (B,S,S,3) -> int32 codes (B,Q), Q = `num_queries` (SEED's 32); with `return_intermediates`
        a dict of `INTERMEDIATES` (each with leading B)."""
        pixels = self._check_pixels(pixels)
        check_same_on_every_process(self._mesh, pixels=pixels, return_intermediates=return_intermediates)
        out = self._chunked(functools.partial(self._encode, intermediates=return_intermediates), pixels)
        return out if return_intermediates else out["codes"]

    def encode_images(self, images) -> np.ndarray:
        """Images (as `preprocess` takes them) -> int32 codes (B,Q) (Q = `num_queries`), as
        `encode(preprocess(images))`, each chunk of `batch_size` images preprocessed as
        it is encoded: the host holds a chunk's float pixels (600 KB an image at 224 px),
        not the whole batch's. Every image is checked before any is encoded (a PIL image
        opened from a file decodes, and may fail, when its chunk is)."""
        batch = image_list(images)
        for i, image in enumerate(batch):
            check_image(f"images[{i}]", image)

        def chunk_codes(indices):
            pixels = self._pixels(batch, indices.tolist())
            check_same_on_every_process(self._mesh, images=pixels)
            return self._encode(self._state, pixels, intermediates=False)["codes"]

        return run_in_chunks(chunk_codes, (np.arange(len(batch)),), self.batch_size)

    def image_features(self, pixels) -> np.ndarray:
        """pixels float (B,S,S,3) -> float32 (B,F) L2-normalised stage-I image features
        (the ITC head on the last causal query; F = `config.proj_dim`), as the
        tokenizer's contrastive training scores images. Only the causal Q-Former's path
        runs: no codes, and no intermediates leave the device."""
        if not self.config.with_itc_heads:
            raise ValueError("image_features needs the stage-I contrastive heads (vision_proj); this tokenizer "
                             "was built without them (config.with_itc_heads False: SEED v1 converted without "
                             "--qformer)")
        pixels = self._check_pixels(pixels)
        check_same_on_every_process(self._mesh, pixels=pixels)
        return self._chunked(self._image_features, pixels)

    # ---- codes -> generation embeddings
    def embed_codes(self, codes) -> np.ndarray:
        """int codes (B,Q) (Q = `num_queries`) in [0, num_codes) -> generation embeddings (B,77,G) float32."""
        codes = check_codes(codes, self.num_queries, self.num_codes)
        check_same_on_every_process(self._mesh, codes=codes)
        return self._chunked(self._embed_codes, codes)

    def _chunked(self, fn, inputs: np.ndarray):
        return run_in_chunks(lambda *chunk: fn(self._state, *chunk), (inputs,), self.batch_size)

    # ---- codes -> images (needs the diffusion model given to `load`)
    def decode(self, codes, num_steps: int = 50, guidance_scale: float = 7.5, sampler: str = "plms",
               seed: int = 0) -> np.ndarray:
        """int codes (B,Q) (Q = `num_queries`) -> uint8 images (B,S,S,3) (S = 512 for SD v1): the codes'
        generation embeddings condition the diffusion model, the empty prompt is the
        unconditional side of guidance, and image i starts from noise seeded by
        (seed, i)."""
        self.check_decode_options(num_steps=num_steps, guidance_scale=guidance_scale, sampler=sampler, seed=seed)
        embeds = self.embed_codes(codes)
        latents = self.diffusion.initial_noise(embeds.shape[0], seed)
        images = self.diffusion.sample(embeds, latents=latents, num_steps=num_steps, guidance_scale=guidance_scale,
                                       sampler=sampler)
        return to_uint8(images)

    def check_decode_options(self, *, caller: str = "decode",
                             load: str = "SeedTokenizer.load(path, diffusion=SD_EXPORT)", **options) -> None:
        """Raises the error `decode(codes, **options)` would raise for its options (a
        bad or unknown one; no diffusion model: `caller` needs one, give it to `load`),
        running nothing."""
        bound = inspect.signature(self.decode).bind(None, **options)  # decode's defaults, in one place
        bound.apply_defaults()
        if self.diffusion is None:
            raise ValueError(f"{caller} needs a diffusion model: {load}")
        given = bound.arguments
        self.diffusion.check_sampling(given["num_steps"], given["guidance_scale"], given["sampler"], given["seed"])

    def reconstruct(self, images, **decode_options) -> np.ndarray:
        """Images (see preprocess) -> encode -> decode (options as `decode`)."""
        self.check_decode_options(**decode_options)  # before the images are encoded
        return self.decode(self.encode_images(images), **decode_options)
