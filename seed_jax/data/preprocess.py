"""Image preprocessing: decode, RandomResizedCrop + flip (train) or resize (eval),
CLIP mean/std normalisation. Works on one example; numpy in, numpy out."""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

from seed_jax.data import records

CLIP_MEAN = np.asarray([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.asarray([0.26862954, 0.26130258, 0.27577711], np.float32)
SIXTEEN_BIT_GRAY = ("I;16", "I;16L", "I;16B", "I;16N")  # PIL's modes of 16-bit grayscale PNGs and TIFFs


def decode_image(data: bytes) -> Image.Image:
    """Encoded bytes -> RGB PIL image (`to_rgb`: deeper grayscale to 8 bits); raises ValueError if undecodable."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as e:  # PIL raises many types for corrupt data
        raise ValueError(f"undecodable image ({type(e).__name__}: {e})") from e
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """A PIL image of any mode -> RGB (alpha dropped). Grayscale deeper than 8 bits keeps its
    top 8 bits: 16-bit ("I;16") of 16; 32-bit integer ("I") of the depth its largest value
    needs (8, 16 or 31 bits: values up to 255 as they are, up to 65535 as 16-bit; negative
    ones as 0). Float ("F"): [0, 1] scaled to 0..255, a larger range taken as 0..255 (clipped)."""
    # convert() would clip every value above 255 to white, and floats in [0, 1] to black
    if image.mode in SIXTEEN_BIT_GRAY:
        image = Image.fromarray((np.asarray(image) >> 8).astype(np.uint8), "L")
    elif image.mode == "I":
        pixels = np.maximum(np.asarray(image), 0)
        top = pixels.max(initial=0)
        image = Image.fromarray((pixels >> (0 if top <= 255 else 8 if top <= 65535 else 23)).astype(np.uint8), "L")
    elif image.mode == "F":
        pixels = np.nan_to_num(np.asarray(image, np.float64))  # NaN as 0
        scale = 255 if pixels.max(initial=0) <= 1 else 1
        image = Image.fromarray(np.clip(np.round(pixels * scale), 0, 255).astype(np.uint8), "L")
    return image.convert("RGB")


def normalize(image: np.ndarray) -> np.ndarray:
    """uint8 (H,W,3) -> float32 (H,W,3) with CLIP mean/std."""
    return (image.astype(np.float32) / 255.0 - CLIP_MEAN) / CLIP_STD


def resize(image: Image.Image, size: int) -> np.ndarray:
    """Bicubic resize to (size,size); uint8 (size,size,3)."""
    return np.asarray(image.resize((size, size), Image.BICUBIC), np.uint8)


def crop_box(width: int, height: int, rng: np.random.Generator, scale=(0.5, 1.0),
             ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box (left, top, w, h): area fraction in `scale`,
    log-uniform aspect ratio in `ratio`, 10 tries then a centre crop."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def train_image(image: Image.Image, size: int, rng: np.random.Generator, scale=(0.5, 1.0),
                flip: bool = True) -> np.ndarray:
    """RandomResizedCrop to (size,size) + horizontal flip with p=0.5; uint8."""
    left, top, w, h = crop_box(image.width, image.height, rng, scale)
    image = image.resize((size, size), Image.BICUBIC, box=(left, top, left + w, top + h))
    out = np.asarray(image, np.uint8)
    if flip and rng.random() < 0.5:
        out = out[:, ::-1]
    return out


def eval_record(raw: bytes, image_size: int) -> dict:
    """A raw image record -> {"id", "caption", "pixels" (S,S,3) CLIP-normalised, resized
    without a crop}; "pixels" is None when the record or its image does not decode, and
    "error" then says why."""
    try:
        record = records.decode_record(raw)
        image = resize(decode_image(record["image"]), image_size)
        return {"id": record["id"], "caption": record["caption"], "pixels": normalize(image)}
    except ValueError as error:
        return {"id": "", "caption": "", "pixels": None, "error": str(error)}
