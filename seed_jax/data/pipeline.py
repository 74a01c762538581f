"""grain pipelines over ArrayRecord shards of `{"image", "caption", "id"}` records.

Each process reads its own slice of the records and yields its part of the global
batch: `image` float32 (b,S,S,3), `text_ids` / `text_mask` int32 (b,L) for the
Q-Former, `clip_ids` int32 (b,77) for the CLIP text encoder, `index` int32 (b,).
A record that cannot be decoded is skipped (train) or padded (eval), and counted; a
training pipeline that skips nearly all it reads raises instead of waiting forever.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Callable, Iterator, Sequence

import grain
import grain.experimental
import jax
import numpy as np
from absl import logging
from array_record.python import array_record_module

from seed_jax.data import preprocess, records
from seed_jax.data.text import TextTokenizer

# A training pipeline that skips more than this fraction of 1000 consecutive records
# raises (grain's filter check) instead of reading on forever for batches it cannot fill.
MAX_SKIPPED_FRACTION = 0.9


class SkipCounter:
    """Thread-safe count of records that could not be decoded; the first skip with a
    reason is logged (grain's error when nearly all are skipped names no cause)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.count = 0
        self._said_why = False

    def add(self, n: int = 1, why: str = "") -> None:
        with self._lock:
            self.count += n
            if why and not self._said_why:
                self._said_why = True
                logging.warning("skipped a record (skipped records are counted, this is said once): %s", why)


def counted_once(counter: SkipCounter) -> SkipCounter:
    """`counter` on process 0, a counter of its own on every other: for records that
    every process reads alike (the decoder's and SEED-OPT's eval records), which a
    counter summed over processes would count once per process."""
    return counter if jax.process_index() == 0 else SkipCounter()


@dataclasses.dataclass(frozen=True)
class Example:
    """Turns a raw record into a model example; None when the record is corrupt."""
    image_size: int
    text: TextTokenizer
    clip_text: TextTokenizer
    skipped: SkipCounter
    crop_scale: tuple[float, float] = (0.5, 1.0)
    flip: bool = True
    process_caption: Callable[[str], str] = str  # e.g. `text.blip_caption`, before both tokenizers

    def decode(self, raw: bytes, captioned: bool = False):
        """(record, image); (None, None), counted, for a corrupt record and, `captioned`,
        one whose caption is empty or blank, as written or once `process_caption` cleans
        it (blip_caption leaves nothing of "..."): `records.require_caption`."""
        try:
            record = records.decode_record(raw)
            if captioned:
                records.require_caption(record)
                if not self.process_caption(record["caption"]).strip():
                    raise ValueError(f"record {record['id']!r}: caption {record['caption']!r} is empty once cleaned "
                                     "(data.caption_processor)")
            return record, preprocess.decode_image(record["image"])
        except ValueError as error:
            self.skipped.add(why=str(error))
            return None, None

    def finish(self, pixels: np.ndarray, caption: str, index: int) -> dict:
        caption = self.process_caption(caption)
        text_ids, text_mask = self.text([caption])
        clip_ids, _ = self.clip_text([caption])
        return {"image": preprocess.normalize(pixels), "text_ids": text_ids[0], "text_mask": text_mask[0],
                "clip_ids": clip_ids[0], "index": np.int32(index)}

    def train(self, item: tuple[int, bytes], rng: np.random.Generator) -> dict | None:
        """A training example; None (counted) for a record without a caption to learn from:
        stage I would contrast its image with an empty text, stage II distil an empty prompt."""
        index, raw = item
        record, image = self.decode(raw, captioned=True)
        if record is None:
            return None
        pixels = preprocess.train_image(image, self.image_size, rng, self.crop_scale, self.flip)
        return self.finish(pixels, record["caption"], index)

    def eval(self, item: tuple[int, bytes | None]) -> dict:
        index, raw = item
        record, image = (None, None) if raw is None else self.decode(raw)
        if record is None:  # padding or corrupt: a masked-out row
            pixels = np.zeros((self.image_size, self.image_size, 3), np.uint8)
            return self.finish(pixels, "", -1)
        return self.finish(preprocess.resize(image, self.image_size), record["caption"], index)


@dataclasses.dataclass(frozen=True)
class CaptionExample:
    """A record -> its Q-Former caption tokens `text_ids` / `text_mask` int32 (L,) and
    `index`, its image left undecoded: the captions of an evaluation that encodes each
    image once, from another pass (`Example.eval`) over one record per image. Same
    `eval` interface as `Example`."""
    text: TextTokenizer
    skipped: SkipCounter
    process_caption: Callable[[str], str] = str

    def eval(self, item: tuple[int, bytes | None]) -> dict:
        index, raw = item
        caption = None if raw is None else self._caption(raw)
        text_ids, text_mask = self.text(["" if caption is None else self.process_caption(caption)])
        return {"text_ids": text_ids[0], "text_mask": text_mask[0],
                "index": np.int32(-1 if caption is None else index)}

    def _caption(self, raw: bytes) -> str | None:
        try:
            return records.decode_record(raw)["caption"]
        except ValueError as error:
            self.skipped.add(why=str(error))
            return None


@dataclasses.dataclass(frozen=True)
class PixelExample:
    """A record -> `image` float32 (S,S,3) in [-1,1] (bicubic resize, no crop or flip:
    captions name positions), `clip_ids` int32 (L,), `index`; what a diffusion model
    trains on. Same `train` / `eval` interface as `Example`."""
    image_size: int
    clip_text: TextTokenizer
    skipped: SkipCounter
    process_caption: Callable[[str], str] = str  # as `Example`'s, before the tokenizer

    def _finish(self, image: np.ndarray, caption: str, index: int) -> dict:
        clip_ids, _ = self.clip_text([self.process_caption(caption)])
        return {"image": image.astype(np.float32) / 127.5 - 1.0, "clip_ids": clip_ids[0], "index": np.int32(index)}

    def _decode(self, raw: bytes | None):
        if raw is None:
            return None, None
        try:
            record = records.decode_record(raw)
            return record, preprocess.resize(preprocess.decode_image(record["image"]), self.image_size)
        except ValueError as error:
            self.skipped.add(why=str(error))
            return None, None

    def train(self, item: tuple[int, bytes], rng: np.random.Generator) -> dict | None:
        del rng
        record, image = self._decode(item[1])
        return None if record is None else self._finish(image, record["caption"], item[0])

    def eval(self, item: tuple[int, bytes | None]) -> dict:
        record, image = self._decode(item[1])
        if record is None:
            return self._finish(np.zeros((self.image_size, self.image_size, 3), np.uint8), "", -1)
        return self._finish(image, record["caption"], item[0])


class RecordSource:
    """grain's ArrayRecordDataSource over the shards `paths`, but a record whose chunk
    fails its checksum (the file damaged on disk) reads as b"", a corrupt record to every
    decoder, skipped and counted (the first logged, naming its shard), rather than a
    RuntimeError from the reading thread that ended the run. Other read errors (a shard
    gone or cut short while read, an I/O error) still raise."""

    def __init__(self, paths: Sequence[str]):
        self._paths = list(paths)
        self._source = grain.sources.ArrayRecordDataSource(self._paths)
        self._said_why = threading.Event()

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> bytes:
        try:
            return self._source[index]
        except RuntimeError as error:
            if "Corrupted" not in str(error):  # riegeli's "Corrupted Riegeli/records file: ... hash mismatch"
                raise
            if not self._said_why.is_set():
                self._said_why.set()
                logging.warning("%s: a record fails its checksum, skipped as a corrupt one (this is said once): %s",
                                self._shard_of(index), error)
            return b""

    def _shard_of(self, index: int) -> str:
        """The shard holding record `index` (each shard's records counted again: said once)."""
        for path in self._paths:
            reader = array_record_module.ArrayRecordReader(path)
            count = reader.num_records()
            reader.close()
            if index < count:
                return f"record {index} of {path}"
            index -= count
        return f"a record of {self._paths}"


def _source(paths: Sequence[str]) -> grain.MapDataset:
    return grain.MapDataset.source(RecordSource(paths))


def _process_slice() -> tuple[int, int]:
    return jax.process_index(), jax.process_count()


def process_seed(seed: int, index: int) -> int:
    """The shuffle / augmentation seed of process `index`: `seed` on process 0, its own
    stream on every other. One seed everywhere would walk every process's slice
    (records p, p+P, p+2P, ...) in the same permutation, so the records k*P .. k*P+P-1
    always shared a global batch (a COCO image's consecutive captions became each
    other's in-batch negatives) and got the same crop and flip."""
    return seed if index == 0 else int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def train_iterator(paths: Sequence[str], example: Example, *, global_batch_size: int, seed: int,
                   num_threads: int = 8, prefetch: int = 4):
    """Endless shuffled, augmented batches of this process's slice; a checkpointable
    grain iterator (`get_state` / `set_state`)."""
    index, count = _process_slice()
    if global_batch_size % count:
        raise ValueError(f"batch_size {global_batch_size} must divide by the process count {count}")
    source = _source(paths)
    check_a_record_per_process(paths, len(source), count)
    indexed = grain.MapDataset.range(len(source)).map(lambda i: (i, source[i]))[index::count]
    seed = process_seed(seed, index)
    ds = indexed.shuffle(seed=seed).repeat(None).random_map(example.train, seed=seed)
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch))
    return iter(raise_when_mostly_skipped(ds).batch(global_batch_size // count, drop_remainder=True))


def check_a_record_per_process(paths: Sequence[str], num_records: int, count: int) -> None:
    """Raises unless each of `count` processes gets records of the split (repeat(None)
    over none would end its stream at once). On every process alike: were only those
    left without records to raise, the others would wait for them at their first step."""
    if num_records < count:
        raise ValueError(f"{paths[0]}...: {num_records} records, fewer than the {count} processes that each "
                         "train on a slice of them")


def raise_when_mostly_skipped(ds: grain.IterDataset) -> grain.IterDataset:
    """`ds` (whose skipped records are None) raising a ValueError once it skips more
    than MAX_SKIPPED_FRACTION of its records."""
    return grain.experimental.WithOptionsIterDataset(
        ds, grain.experimental.DatasetOptions(filter_raise_threshold_ratio=MAX_SKIPPED_FRACTION))


ALL_RECORDS = -1  # as `num_examples`: every record of the split


def first_count(num_examples: int, available: int, prefix: str = "") -> int:
    """How many records `num_examples` asks for (ALL_RECORDS: all `available`); raises
    naming eval.num_examples (after `prefix`, e.g. "tokenizer.") unless that is 1..available."""
    count = available if num_examples == ALL_RECORDS else num_examples
    if not 0 < count <= available:
        raise ValueError(f"{prefix}eval.num_examples: {num_examples} requested, the eval split has {available} "
                         f"({ALL_RECORDS}: all of them)")
    return count


def eval_batches(paths: Sequence[str], example, *, num_examples: int, global_batch_size: int,
                 num_threads: int = 8, record_groups: Sequence[Sequence[int]] | None = None) -> "EvalBatches":
    """The first `num_examples` records (ALL_RECORDS: every one) through `example.eval`,
    or, with `record_groups` (lists of indices among them), one row per group (in that
    order): the first of its records that decodes (those before it skipped), padding
    where none does. Padded to whole global batches (padding has index -1).
    Process p gets rows [p*b, (p+1)*b) of every global batch."""
    index, count = _process_slice()
    if global_batch_size % count:
        raise ValueError(f"eval.batch_size {global_batch_size} must divide by the process count {count}")
    num_examples = first_count(num_examples, len(_source(paths)))
    groups = ([(i,) for i in range(num_examples)] if record_groups is None
              else [tuple(int(i) for i in group) for group in record_groups])
    check_record_groups(groups, num_examples)
    per_process = global_batch_size // count
    num_batches = -(-len(groups) // global_batch_size)
    rows = [g * global_batch_size + index * per_process + r
            for g in range(num_batches) for r in range(per_process)]
    return EvalBatches(paths, [groups[row] if row < len(groups) else () for row in rows], per_process, example,
                       num_threads)


def check_record_groups(groups: Sequence[tuple[int, ...]], num_examples: int) -> None:
    """Raises naming record_groups unless every index is in [0, num_examples)."""
    indices = [i for group in groups for i in group]
    if any(not 0 <= i < num_examples for i in indices):
        raise ValueError(f"record_groups: expected indices in [0, {num_examples}), got {min(indices)}..{max(indices)}")


def first_decoding(example, source, group: tuple[int, ...]) -> dict:
    """`example.eval` of the first record of `group` that decodes (each one before it
    skipped and counted by `example`); a padding row (index -1) when none does or
    `group` is empty."""
    for i in group:
        row = example.eval((i, source[i]))
        if row["index"] >= 0:
            return row
    return example.eval((-1, None))


class EvalBatches:
    """This process's eval batches, decoded again at each pass rather than held: a whole
    Karpathy test split at 224 px is 25k float32 images, 15 GB. The same batches every
    pass; corrupt records are counted in the first pass only (`example.skipped`).
    `record_groups`: the records each of this process's rows tries in turn (see
    `first_decoding`), () for padding."""

    def __init__(self, paths: Sequence[str], record_groups: list[tuple[int, ...]], per_process: int, example,
                 num_threads: int):
        self._paths, self._record_groups = list(paths), record_groups
        self._per_process, self._example, self._num_threads = per_process, example, num_threads
        self._passes = 0

    def __iter__(self):
        example = self._example if self._passes == 0 else dataclasses.replace(self._example, skipped=SkipCounter())
        self._passes += 1
        source = _source(self._paths)
        ds = grain.MapDataset.source(self._record_groups).map(lambda group: first_decoding(example, source, group))
        ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=self._num_threads, prefetch_buffer_size=4))
        return iter(ds.batch(self._per_process))


def read_records(paths: Sequence[str], num_examples: int, prefix: str = "") -> Iterator[bytes]:
    """The first `num_examples` raw records (ALL_RECORDS: every one), each read as the
    iterator reaches it, so a reader of a split's captions never holds its images at
    once. Raises naming eval.num_examples at the call (see `first_count`)."""
    source = _source(paths)
    count = first_count(num_examples, len(source), prefix)
    return (source[i] for i in range(count))


def first_record_of_image(images: Sequence[str | None]) -> np.ndarray:
    """int (N,): for each of N records (their `records.image_id`, as `read_labels` gives
    them), the index of the first record of its image; a record that did not decode
    (None) its own index."""
    first: dict[str, int] = {}
    return np.asarray([i if image is None else first.setdefault(image, i) for i, image in enumerate(images)],
                      np.int64)


def records_of_images(images: Sequence[str | None]) -> list[list[int]]:
    """For each image of N records (their `records.image_id`, as `read_labels` gives them),
    in the order of its first record, the indices of its records in order; records that
    did not decode (None) in none."""
    groups: dict[str, list[int]] = {}
    for i, image in enumerate(images):
        if image is not None:
            groups.setdefault(image, []).append(i)
    return list(groups.values())


def why_no_image_decodes(paths: Sequence[str], indices: Sequence[int]) -> str | None:
    """None once one of the records `indices` of the split `paths` decodes with its image
    (read in turn: the first that does ends it), else why the first of them did not."""
    source, why = _source(paths), None
    for i in indices:
        try:
            preprocess.decode_image(records.decode_record(source[i])["image"])
            return None
        except ValueError as error:
            why = why or str(error)
    return why


def read_labels(paths: Sequence[str], num_examples: int, prefix: str = "") -> list[tuple[str | None, str | None]]:
    """(caption, `records.image_id`) of the first `num_examples` records (ALL_RECORDS: every
    one; (None, None) where a record is corrupt): what retrieval needs to count an image's
    other captions as hits. Raises as `read_records`."""
    labels = []
    for raw in read_records(paths, num_examples, prefix):
        try:
            record = records.decode_record(raw)
            labels.append((record["caption"], records.image_id(record["id"])))
        except ValueError:
            labels.append((None, None))
    return labels
