"""Records of pre-tokenized images: `{"id": str, "caption": str, "codes": int32 (32,)}`,
one UTF-8 JSON object each (with the format version), in ArrayRecord shards named
as `records.shard_path` names them. `decode_code_record` raises ValueError on
anything malformed, so readers can skip and count it."""

from __future__ import annotations

import json

import numpy as np

from seed_jax.data import records

FORMAT_VERSION = 1
_INT32_LIMIT = 2**31  # codes are read as int32: a larger one is malformed, not an OverflowError


def encode_code_record(record_id: str, caption: str, codes) -> bytes:
    codes = np.asarray(codes)
    if codes.ndim != 1 or not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"codes: expected integer (N,), got {codes.dtype} {codes.shape}")
    return json.dumps({"format": FORMAT_VERSION, "id": record_id, "caption": caption,
                       "codes": [int(c) for c in codes]}, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def decode_code_record(data: bytes, codes_per_image: int | None = None, num_codes: int | None = None) -> dict:
    """Bytes from `encode_code_record` -> {"id", "caption", "codes" int32 (N,)};
    with `codes_per_image`, a record of another N is malformed too, and with
    `num_codes` (the codebook's size) one with a code outside [0, num_codes)."""
    try:
        record = json.loads(bytes(data).decode("utf-8"))
    except ValueError as error:  # UnicodeDecodeError and JSONDecodeError
        raise ValueError(f"corrupt code record: not UTF-8 JSON ({error})") from error
    if not (isinstance(record, dict) and record.get("format") == FORMAT_VERSION
            and records.is_unicode_text(record.get("id")) and records.is_unicode_text(record.get("caption"))
            and isinstance(record.get("codes"), list) and record["codes"]
            and all(type(c) is int and 0 <= c < _INT32_LIMIT for c in record["codes"])):
        raise ValueError(f"corrupt code record: unexpected content {str(record)[:200]!r}")
    if codes_per_image is not None and len(record["codes"]) != codes_per_image:
        raise ValueError(f"code record {record['id']!r}: {len(record['codes'])} codes, expected {codes_per_image}")
    if num_codes is not None and max(record["codes"]) >= num_codes:
        raise ValueError(f"code record {record['id']!r}: codes up to {max(record['codes'])}, the codebook has "
                         f"{num_codes}")
    return {"id": record["id"], "caption": record["caption"], "codes": np.asarray(record["codes"], np.int32)}
