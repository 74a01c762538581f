"""User-facing inference. `SeedTokenizer.load(OUT, diffusion=SD_OUT)` then
`preprocess`, `encode` (or `encode_images`), `embed_codes`, `decode`, `reconstruct`;
`StableDiffusion.load(SD_OUT)` then `sample`; `SeedOPT.load(OPT_OUT)` then
`logits`, `generate`, and with SEED `caption`, `answer`, `generate_image`. Batches of any size run in chunks
of `batch_size` rows through one compiled program per chunk size (the last chunk is
padded; a batch below `batch_size` runs padded to the next power of two rows, so a few
programs serve every batch size; SeedOPT's also per decoding options and per length of
its ids rounded up to a multiple of 16), their results come back to host memory chunk by chunk as numpy
arrays, and inputs are checked before anything runs.

    tokenizer = SeedTokenizer.load("exports/seed_v1", diffusion="exports/sd_v1_4")
    codes = tokenizer.encode_images(images)                  # uint8 (B,H,W,3) -> int32 (B,32)
    prompt_embeds = tokenizer.embed_codes(codes)               # (B,77,768)
    images = tokenizer.decode(codes)                           # uint8 (B,512,512,3)
"""

from seed_jax.api.checks import seed_key
from seed_jax.api.chunks import run_in_chunks
from seed_jax.api.images import to_uint8
from seed_jax.api.seed_opt import SeedOPT
from seed_jax.api.seed_tokenizer import INTERMEDIATES, PIXEL_RANGE, SeedTokenizer
from seed_jax.api.stable_diffusion import StableDiffusion

__all__ = ["INTERMEDIATES", "PIXEL_RANGE", "SeedOPT", "SeedTokenizer", "StableDiffusion", "run_in_chunks", "seed_key",
           "to_uint8"]
