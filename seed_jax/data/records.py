"""Binary record format for captioned images and ArrayRecord shard helpers.

A record is a dict ``{"image": bytes, "caption": str, "id": str}`` where
``image`` holds an encoded PNG or JPEG. On disk a record is

    <4-byte little-endian header length> <UTF-8 JSON header> <image bytes>

The header carries the caption, the id, and the image's length and CRC32, so
truncated or corrupted records are detected by ``decode_record``.
"""

from __future__ import annotations

import glob
import json
import os
import re
import struct
import zlib
from typing import Iterable

from array_record.python import array_record_module

FORMAT_VERSION = 1
_HEADER_LENGTH = struct.Struct("<I")
_SHARD_SUFFIX = ".array_record"


def write_json(path: str, data, indent: int | None = 1) -> None:
    """Writes `data` as JSON to `path` whole or not at all (a summary, a marker, an
    export's model.json): through a `.partial` file renamed once written, so a kill while
    writing leaves the file as it was (or none), never a part of it."""
    with open(path + ".partial", "w") as f:
        json.dump(data, f, indent=indent)
    os.replace(path + ".partial", path)


def is_unicode_text(value) -> bool:
    """A str that UTF-8 can hold: not one with a lone surrogate (a JSON escape such as
    \\ud800, or a file name's bytes that are not UTF-8), which tokenizers refuse."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def encode_record(record: dict) -> bytes:
    """Serialises a record dict to bytes."""
    image = bytes(record["image"])
    caption, record_id = record["caption"], record["id"]
    if not isinstance(caption, str) or not isinstance(record_id, str):
        raise TypeError("record 'caption' and 'id' must be str")
    try:
        header = json.dumps(
            {
                "format": FORMAT_VERSION,
                "caption": caption,
                "id": record_id,
                "image_length": len(image),
                "image_crc32": zlib.crc32(image),
            },
            ensure_ascii=False,
            separators=(",", ":"),
        ).encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"record {record_id!r}: its id or caption is not Unicode text ({e.reason}: "
                         f"{e.object[e.start:e.end]!r})") from None
    return _HEADER_LENGTH.pack(len(header)) + header + image


def decode_record(data: bytes) -> dict:
    """Parses bytes written by ``encode_record``; raises ValueError if corrupt."""
    data = bytes(data)
    if len(data) < _HEADER_LENGTH.size:
        raise ValueError(f"corrupt record: only {len(data)} bytes, too short for a header")
    (header_length,) = _HEADER_LENGTH.unpack_from(data)
    image_start = _HEADER_LENGTH.size + header_length
    if image_start > len(data):
        raise ValueError(
            f"corrupt record: header claims {header_length} bytes but only "
            f"{len(data) - _HEADER_LENGTH.size} follow"
        )
    try:
        header = json.loads(data[_HEADER_LENGTH.size : image_start].decode("utf-8"))
    except ValueError as error:  # covers UnicodeDecodeError and JSONDecodeError
        raise ValueError(f"corrupt record: header is not UTF-8 JSON ({error})") from error
    if not (
        isinstance(header, dict)
        and header.get("format") == FORMAT_VERSION
        and isinstance(header.get("caption"), str)
        and isinstance(header.get("id"), str)
        and isinstance(header.get("image_length"), int)
        and isinstance(header.get("image_crc32"), int)
    ):
        raise ValueError(f"corrupt record: unexpected header {header!r}")
    if not (is_unicode_text(header["caption"]) and is_unicode_text(header["id"])):
        raise ValueError(f"corrupt record {header['id']!r}: its id or caption is not Unicode text")
    image = data[image_start:]
    if len(image) != header["image_length"]:
        raise ValueError(
            f"corrupt record {header['id']!r}: image has {len(image)} bytes, "
            f"header says {header['image_length']}"
        )
    if zlib.crc32(image) != header["image_crc32"]:
        raise ValueError(f"corrupt record {header['id']!r}: image checksum mismatch")
    return {"image": image, "caption": header["caption"], "id": header["id"]}


def require_caption(record: dict, kind: str = "record") -> dict:
    """`record` (decoded: its "id" and "caption"), unless its caption is empty or
    whitespace: a ValueError naming the `kind` of record, for the readers that train on
    captions to skip and count it."""
    if not record["caption"].strip():
        raise ValueError(f"{kind} {record['id']!r}: empty caption {record['caption']!r}")
    return record


def image_id(record_id: str) -> str:
    """The image a record's caption belongs to: its id less a trailing `#k` (k >= 1), as
    `make_records` names caption k of an image with several (COCO's 5 are 5 records)."""
    base, sep, k = record_id.rpartition("#")
    return base if sep and re.fullmatch(r"[1-9][0-9]*", k) else record_id


MAX_SHARDS = 99_999  # shard names hold 5 digits, which `shard_paths` looks for


def shard_path(directory: str, prefix: str, index: int, num_shards: int) -> str:
    """Path of shard ``index`` out of ``num_shards`` for ``prefix``."""
    return os.path.join(directory, f"{prefix}-{index:05d}-of-{num_shards:05d}{_SHARD_SUFFIX}")


def existing_shards(directory: str, prefix: str) -> list[str]:
    """Sorted paths in `directory` named as shards of `prefix`, of any count."""
    digits = "[0-9]" * 5
    pattern = f"{glob.escape(prefix)}-{digits}-of-{digits}{_SHARD_SUFFIX}"
    return sorted(glob.glob(os.path.join(glob.escape(directory), pattern)))


def write_array_record_shards(
    records: Iterable[dict], directory: str, prefix: str, num_shards: int
) -> list[str]:
    """Writes records round-robin into ``num_shards`` ArrayRecord files.

    Shards are written under temporary names and renamed only once all of them
    are complete; older shards with the same prefix are then replaced.
    Returns the shard paths in shard order.
    """
    if not 1 <= num_shards <= MAX_SHARDS:
        raise ValueError(f"num_shards: expected 1..{MAX_SHARDS} (shard names hold 5 digits), got {num_shards}")
    os.makedirs(directory, exist_ok=True)
    paths = [shard_path(directory, prefix, i, num_shards) for i in range(num_shards)]
    temp_paths = [path + ".partial" for path in paths]
    writers = [array_record_module.ArrayRecordWriter(p, "group_size:1") for p in temp_paths]
    try:
        try:
            for i, record in enumerate(records):
                writers[i % num_shards].write(encode_record(record))
        finally:
            for writer in writers:
                writer.close()
    except BaseException:
        for temp_path in temp_paths:
            if os.path.exists(temp_path):
                os.remove(temp_path)
        raise
    for stale in set(existing_shards(directory, prefix)) - set(paths):
        os.remove(stale)
    for temp_path, path in zip(temp_paths, paths):
        os.replace(temp_path, path)
    return paths


def shard_paths(directory: str, prefix: str, field: str | None = None) -> list[str]:
    """Sorted paths of the shards for ``prefix`` in ``directory``: one complete set
    ``prefix-00000-of-N`` ... ``prefix-(N-1)-of-N``, else an error saying what is wrong
    (sets of two shard counts would read records twice; a missing shard loses records),
    starting with ``field`` when given (the config field or flag that named ``directory``)."""
    named = f"{field}: " if field else ""
    paths = existing_shards(directory, prefix)
    if not paths:
        hint = (f": it is a file; give the folder that holds the shards ({os.path.dirname(directory) or '.'!r})"
                if os.path.isfile(directory) else _other_prefixes(directory) if os.path.isdir(directory)
                else ": no such folder")
        raise FileNotFoundError(
            f"{named}no ArrayRecord shards named '{prefix}-*-of-*{_SHARD_SUFFIX}' in {directory!r}{hint}"
        )
    numbers = [re.fullmatch(r"-(\d{5})-of-(\d{5})", os.path.basename(p)[len(prefix):-len(_SHARD_SUFFIX)])
               for p in paths]
    counts = sorted({int(m.group(2)) for m in numbers})
    if len(counts) > 1:
        raise ValueError(f"{named}{directory!r} holds shards of {prefix!r} written as {counts} shards: "
                         "remove the stale set")
    indices = [int(m.group(1)) for m in numbers]
    if indices != list(range(counts[0])):
        missing = sorted(set(range(counts[0])) - set(indices))
        raise ValueError(f"{named}{directory!r}: the shards of {prefix!r} numbered {indices} are not the set "
                         f"0..{counts[0] - 1} (missing {missing})")
    for path in paths:
        _check_readable(path, named)
    return paths


def _other_prefixes(directory: str) -> str:
    """A hint naming the prefixes of the shards `directory` holds ("" when none): e.g. a
    split written with make_records' default --prefix=train read as "eval"."""
    prefixes = sorted({m.group(1) for name in os.listdir(directory)
                       if (m := re.fullmatch(rf"(.+)-\d{{5}}-of-\d{{5}}{re.escape(_SHARD_SUFFIX)}", name))})
    return f"; it holds shards of the prefixes {prefixes}" if prefixes else ""


def _check_readable(path: str, named: str = "") -> None:
    """Raises ValueError naming the shard `path` (after `named`) unless it opens as an
    ArrayRecord file: a truncated copy or a file of another format failed at its first
    read, after the model was built, as a RuntimeError naming no file (often no cause)."""
    try:
        reader = array_record_module.ArrayRecordReader(path)
        readable = reader.ok()
        reader.close()  # raises the status of a reader that is not ok, which may be empty
        if readable:
            return
        why = ""
    except RuntimeError as error:
        why = str(error)
    why = why or "its index does not read: truncated or corrupt"
    raise ValueError(f"{named}{path!r} ({os.path.getsize(path)} bytes) is not a readable ArrayRecord shard ({why}): "
                     "write it again")
