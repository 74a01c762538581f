"""User images in and out: one image or a batch -> RGB PIL images; float images -> uint8."""

from __future__ import annotations

from typing import Iterable

import numpy as np
from PIL import Image

from seed_jax.data import preprocess as image_preprocess

IMAGES_EXPECTED = "uint8 (B,H,W,3), one image or a non-empty list of images (uint8 (H,W,3) or PIL)"


def image_list(images) -> list:
    """`SeedTokenizer.preprocess`'s `images` -> a non-empty list of single images (a 1-D
    object array of images, as numpy makes of images of different sizes, is such a list)."""
    if isinstance(images, Image.Image):
        return [images]
    if hasattr(images, "__array__"):  # a jax or torch array too: rows would read a (H,W,3) image as H images
        images = np.asarray(images)
    if isinstance(images, np.ndarray):  # a 1-D object array (np.array([a, b], dtype=object)) is a list
        rows = images.ndim == 4 or (images.ndim == 1 and images.dtype == object)
        batch = [images] if images.ndim == 3 else list(images) if rows else []
    elif isinstance(images, (str, bytes)) or not isinstance(images, Iterable):  # a path is no image
        batch = []
    else:
        batch = list(images)
    if not batch:
        raise ValueError(f"images: expected {IMAGES_EXPECTED}, got "
                         f"{getattr(images, 'shape', None) or type(images).__name__}")
    return batch


def check_image(name: str, image) -> None:
    """Raises unless `image` is a non-empty PIL image (any mode) or uint8 (H,W,3) array;
    converts nothing."""
    if isinstance(image, Image.Image):
        width, height = image.size
    else:
        array = np.asarray(image)
        if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != 3:
            raise ValueError(f"{name}: expected uint8 (H,W,3) or a PIL image, got {array.dtype} {array.shape}")
        height, width = array.shape[:2]
    if not (width and height):  # PIL would resize it to a black image
        raise ValueError(f"{name}: expected a non-empty image, got {width}x{height} pixels")


def rgb_image(name: str, image) -> Image.Image:
    """A PIL image of any mode (to RGB) or a uint8 (H,W,3) array -> a non-empty RGB PIL image."""
    check_image(name, image)
    if not isinstance(image, Image.Image):
        return Image.fromarray(np.asarray(image))
    try:  # a PIL image opened from a file decodes here
        return image_preprocess.to_rgb(image)
    except Exception as e:  # PIL raises many types for corrupt data
        raise ValueError(f"{name}: undecodable image ({type(e).__name__}: {e})") from e


def to_uint8(images) -> np.ndarray:
    """Float images in [-1,1] -> uint8 [0,255]."""
    return np.round((np.clip(np.asarray(images, np.float32), -1, 1) + 1) * 127.5).astype(np.uint8)
