"""One image with its captions -> records `{"image", "caption", "id"}`, or the reasons
its captions were skipped. What `make_records` runs per image (in worker processes).

Images stay as their original bytes when they are JPEG (MPO included) or PNG and
decode; any other format (WebP, BMP, GIF, TIFF, ...), and any image `resize` shrinks, is re-encoded
as an RGB JPEG, or PNG when a side is too long for JPEG (the pipeline decodes every
image to RGB, dropping alpha as `preprocess.decode_image` does, so RGB is all a record
needs to keep).
"""

from __future__ import annotations

import dataclasses
import io
import os

from PIL import Image

from seed_jax.data import preprocess, records

KEPT_FORMATS = ("JPEG", "MPO", "PNG")  # MPO: a camera's multi-picture JPEG; decoders read its first
JPEG_QUALITY = 95
JPEG_MAX_SIDE = 65500  # the longest side PIL writes as JPEG
# Why a caption (one record) was skipped; an unreadable example (TFDS: its files are
# missing or corrupt) counts once, its captions unknown.
SKIP_REASONS = ("missing_image", "undecodable_image", "empty_caption", "missing_caption", "unreadable_example")


@dataclasses.dataclass(frozen=True)
class Entry:
    """An image and its captions, before reading. `image` is a file path or encoded
    bytes ("" when there is none); captions come from `captions` or, when set, the
    text file `caption_file`. Caption k gets the record id `id` (k = 0) or `id#k`.
    `where` says where a captions file names it ("line 3", "images[4]"), for errors.
    `unreadable` says why the source could not read the example, which is then skipped."""
    id: str
    image: str | bytes
    captions: tuple = ()
    caption_file: str = ""
    where: str = ""
    unreadable: str = ""

    def record_ids(self) -> tuple[str, ...]:
        """The ids its records, or its skipped ones, get: `id` (also when it has no
        caption, as a missing caption is counted), then `id#1`, ... a caption each."""
        count = 1 if self.caption_file else max(1, len(self.captions))
        return tuple(record_id(self.id, k) for k in range(count))


@dataclasses.dataclass
class Prepared:
    records: list[dict]
    skipped: dict[str, list[str]]  # reason -> ids of the records skipped for it
    reencoded: bool = False


def record_id(base: str, k: int) -> str:
    return base if k == 0 else f"{base}#{k}"


def encode_image(data: bytes, resize: int = 0, quality: int = JPEG_QUALITY) -> tuple[bytes, bool]:
    """(bytes to store, re-encoded?): `data` itself when it is a JPEG or PNG that decodes
    and needs no resize, else an RGB JPEG (PNG when a side is over `JPEG_MAX_SIDE`), shrunk
    so its shorter side is `resize` when it is longer (0: no resize). Raises ValueError
    when `data` does not decode."""
    image = preprocess.decode_image(data)  # RGB, fully decoded: what the pipeline will see
    width, height = image.size
    if resize and min(width, height) > resize:
        if width <= height:
            size = (resize, max(1, round(height * resize / width)))
        else:
            size = (max(1, round(width * resize / height)), resize)
        image = image.resize(size, Image.BICUBIC)
    else:
        with Image.open(io.BytesIO(data)) as probe:
            if probe.format in KEPT_FORMATS:
                return data, False
    out = io.BytesIO()
    if max(image.size) > JPEG_MAX_SIDE:  # PIL's JPEG encoder raises OSError: lossless PNG instead
        image.save(out, format="PNG")
    else:
        image.save(out, format="JPEG", quality=quality)
    return out.getvalue(), True


def _read_captions(entry: Entry) -> tuple:
    if not entry.caption_file:
        return tuple(entry.captions)
    try:
        with open(entry.caption_file, "rb") as f:
            data = f.read()
        return (data.decode("utf-8-sig"),)  # a byte order mark (Windows editors) is not text
    except UnicodeDecodeError:
        return (data,)  # its bytes, not text: skipped as an empty caption
    except OSError:
        return ()


def prepare(entry: Entry, resize: int = 0, quality: int = JPEG_QUALITY) -> Prepared:
    """Reads and checks `entry`: a record per non-empty caption (stripped of surrounding
    whitespace) when the image reads and decodes; every skipped caption under its reason
    (one that is not text, as a caption file that is not UTF-8, as an empty caption; None,
    a captions file's row without one, as a missing caption); an unreadable entry is
    skipped whole."""
    if entry.unreadable:
        return Prepared([], {"unreadable_example": [entry.id]})
    skipped: dict[str, list[str]] = {}
    captions = _read_captions(entry)
    if not captions:
        return Prepared([], {"missing_caption": [entry.id]})
    kept = []
    for k, caption in enumerate(captions):
        text = caption.strip() if records.is_unicode_text(caption) else ""
        if text:
            kept.append((record_id(entry.id, k), text))
        else:
            reason = "missing_caption" if caption is None else "empty_caption"
            skipped.setdefault(reason, []).append(record_id(entry.id, k))
    if not kept:
        return Prepared([], skipped)
    data = entry.image
    if isinstance(data, str):
        try:
            if not data or not os.path.isfile(data):
                raise FileNotFoundError(data)
            with open(data, "rb") as f:
                data = f.read()
        except OSError:
            skipped["missing_image"] = [i for i, _ in kept]
            return Prepared([], skipped)
    try:
        image, reencoded = encode_image(bytes(data), resize, quality)
    except ValueError:
        skipped["undecodable_image"] = [i for i, _ in kept]
        return Prepared([], skipped)
    return Prepared([{"image": image, "caption": text, "id": i} for i, text in kept], skipped, reencoded)
