"""A prepared TFDS dataset -> `captioned.Entry`s, read without TensorFlow.

The dataset is opened from its files (`builder_from_files`, not the dataset's code,
which may need TensorFlow, as coco_captions' does) and read through
`as_data_source`, so it must have array_record files: prepared in that format
(`tfds build coco_captions --file_format=array_record`) or given them beside its own
(`tfds convert_format --dataset_version_dir=DIR --out_file_format=array_record`); both
need TensorFlow. Images are taken as their encoded bytes. Keys name features, nested
ones with `/` (`captions/text`); a caption feature that is a list gives one record per
caption; the image and id features must have one value an example (an id's bytes that
are not UTF-8 are written as \\xNN, as a folder's file names are). An example that
cannot be read (a missing, truncated or corrupt file) becomes an unreadable entry,
skipped and counted. tensorflow-datasets is optional: `pip install -e ".[tfds]"`.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
from absl import logging

from seed_jax.data.captioned import Entry

ARRAY_RECORD = "array_record"  # the file format tfds reads without TensorFlow (random access)
# What reading an example of damaged files raises: RuntimeError (array_record: a missing
# file, a failed checksum), ValueError (a truncated file's example read as None).
UNREADABLE = (RuntimeError, ValueError, OSError)


def import_tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError("--source=tfds needs tensorflow-datasets: pip install -e \".[tfds]\" "
                          "(or pip install tensorflow-datasets)") from e
    return tfds


def _is_sequence(feature) -> bool:
    """Whether `feature` is a tfds Sequence: a list of values an example. (A Sequence of a
    dict answers for the dict's attributes, `keys` too.)"""
    return isinstance(feature, import_tfds().features.Sequence)


def _file_formats(info) -> list[str]:
    """The file formats a prepared dataset is in: the one it was built in, then those
    `tfds convert_format` added beside it."""
    formats = [info.file_format, *getattr(info, "alternative_file_formats", ())]
    return [str(getattr(f, "value", f)) for f in formats if f]


def _find(mapping, key: str):
    """mapping[key], with `a/b` looked up as mapping["a"]["b"] unless "a/b" is a key itself;
    a tfds Sequence feature is looked through. Returns (value, nested key path)."""
    if _is_sequence(mapping):
        mapping = mapping.feature
    if not hasattr(mapping, "keys"):
        raise KeyError(f"{key!r} is below a feature that has no parts")
    if key in mapping:
        return mapping[key], [key]
    head, _, rest = key.partition("/")
    while rest:
        if head in mapping:
            value, path = _find(mapping[head], rest)
            return value, [head] + path
        more, _, rest = rest.partition("/")
        head = f"{head}/{more}"
    raise KeyError(f"no feature {key!r} among {sorted(mapping.keys())}")


def _feature(features, key: str, flag: str):
    try:
        return _find(features, key)
    except KeyError as e:
        raise KeyError(f"--{flag}={key!r}: {e.args[0]}") from None


def _in_sequence(features, path: list[str]) -> bool:
    """Whether the feature at `path`, or one above it, is a Sequence (several values an example)."""
    feature = features
    for key in path:
        if _is_sequence(feature):
            return True
        feature = feature[key]
    return _is_sequence(feature)


def _check_one_value(features, path: list[str], key: str, flag: str) -> None:
    """Raises ValueError naming `flag` when an example holds a list of the feature at `path`."""
    if _in_sequence(features, path):
        raise ValueError(f"--{flag}={key!r}: a feature inside a Sequence (a list of values an example); "
                         "expected a feature with one value an example")


def _is_text(feature) -> bool:
    """Whether `feature` holds text: a Text feature or string Tensor, or a Sequence of them."""
    while _is_sequence(feature):
        feature = feature.feature
    dtype = getattr(feature, "np_dtype", None)
    return isinstance(dtype, (type, np.dtype)) and np.dtype(dtype).kind in "OSU"


def _get(example, path: list[str]):
    for key in path:
        example = example[key]
    return example


def _texts(value) -> list:
    """A text feature, a list of them, or a scalar (an id) -> a list of str (bytes: not UTF-8)."""
    if not isinstance(value, (list, tuple, np.ndarray)) or np.ndim(value) == 0:
        value = [value]
    texts = []
    for text in value:
        try:
            texts.append(bytes(text).decode("utf-8") if isinstance(text, (bytes, np.bytes_)) else str(text))
        except UnicodeDecodeError:
            texts.append(bytes(text))
    return texts


def _id_text(value) -> str:
    """An id feature's value -> its record id: bytes that are not UTF-8 get those bytes as
    \\xNN, as a folder's file names do (ids name records; they are never tokenized)."""
    text = _texts(value)[0]
    return text.decode("utf-8", "backslashreplace") if isinstance(text, bytes) else text


def _open_builder(name: str, data_dir: str):
    """The prepared dataset `name` (in `data_dir`, or TFDS's default), read from its files;
    raises naming --name when it is not there or has no array_record files."""
    tfds = import_tfds()
    from tensorflow_datasets.core import read_only_builder

    try:
        builder = read_only_builder.builder_from_files(name, **({"data_dir": data_dir} if data_dir else {}))
    except tfds.core.DatasetNotFoundError as e:
        raise FileNotFoundError(f"--name={name!r}: no prepared dataset of that name in "
                                f"{data_dir or 'the default TFDS data dir'} (--data_dir): {e}") from e
    formats = _file_formats(builder.info)
    if ARRAY_RECORD not in formats:
        raise ValueError(f"--name={name!r}: prepared as {' and '.join(formats) or 'an unrecorded format'}; reading "
                         f"without TensorFlow needs the array_record format: add it (tfds convert_format "
                         f"--dataset_version_dir={builder.data_dir} --out_file_format=array_record) or build "
                         f"the dataset in it (tfds build {name} --file_format=array_record); both need TensorFlow")
    return builder


def _feature_paths(features, image_key: str, caption_key: str, id_key: str):
    """(image, caption, id) feature paths (id: None without `id_key`); raises naming the flag
    whose feature is missing or of the wrong kind."""
    image_feature, image_path = _feature(features, image_key, "image_key")
    if not isinstance(image_feature, import_tfds().features.Image):
        raise ValueError(f"--image_key={image_key!r}: expected an Image feature, got {type(image_feature).__name__}")
    _check_one_value(features, image_path, image_key, "image_key")
    caption_feature, caption_path = _feature(features, caption_key, "caption_key")
    if not _is_text(caption_feature):
        raise ValueError(f"--caption_key={caption_key!r}: expected a text feature (Text, a string Tensor, or a "
                         f"Sequence of them), got {type(caption_feature).__name__}")
    if not id_key:
        return image_path, caption_path, None
    id_path = _feature(features, id_key, "id_key")[1]
    _check_one_value(features, id_path, id_key, "id_key")
    return image_path, caption_path, id_path


def _data_source(builder, split: str, image_path: list[str]):
    """`split`'s examples, read from array_record files, the image at `image_path` left encoded."""
    tfds = import_tfds()
    decoders = tfds.decode.SkipDecoding()
    for key in reversed(image_path):
        decoders = {key: decoders}
    converted = _file_formats(builder.info)[0] != ARRAY_RECORD  # array_record added by `tfds convert_format`
    try:
        return builder.as_data_source(split=split, decoders=decoders,
                                      **({"file_format": ARRAY_RECORD} if converted else {}))
    except (ValueError, KeyError) as e:
        raise ValueError(f"--split={split!r}: {e}") from e


def _entries(source, split: str, image_path: list[str], caption_path: list[str],
             id_path: list[str] | None) -> Iterator[Entry]:
    """An entry per example of `source`; an example that cannot be read is an unreadable
    entry `{split}/{index}` (its cause logged for the first)."""
    said_why = False
    for index in range(len(source)):
        try:
            example = source[index]
        except UNREADABLE as e:
            if not said_why:
                said_why = True
                logging.warning("skipped an unreadable example (they are counted, this is said once): %s", e)
            yield Entry(f"{split}/{index}", b"", unreadable=str(e))
            continue
        base = _id_text(_get(example, id_path)) if id_path else f"{split}/{index}"
        yield Entry(base, bytes(_get(example, image_path)), tuple(_texts(_get(example, caption_path))))


def tfds_entries(name: str, split: str, data_dir: str = "", image_key: str = "image",
                 caption_key: str = "captions/text", id_key: str = "") -> tuple[int, Iterator[Entry]]:
    """(number of examples, their entries in order). Ids are the `id_key` feature (bytes
    that are not UTF-8 as \\xNN: `_id_text`), or `{split}/{index}` without one."""
    builder = _open_builder(name, data_dir)
    paths = _feature_paths(builder.info.features, image_key, caption_key, id_key)
    source = _data_source(builder, split, paths[0])
    return len(source), _entries(source, split, *paths)
