"""Pre-tokenization: image-caption records -> SEED code records, as SEED-LLaMA
prepares its LLM data (images are tokenized once, not at every training step).

Process p of P takes the contiguous slice [p*N/P, (p+1)*N/P) of a split's N records
and writes `{prefix}-{p:05d}-of-{P:05d}.array_record` of code records
(`data/code_records.py`); its local devices split each batch. A finished shard
(written under a temporary name, renamed at the end) is not redone, so a rerun
resumes, unless its summary names another tokenizer export (`weights.fingerprint`:
the export was replaced since) or other input shards (names, sizes and modification
times: the split was rebuilt or another split given); a rerun on another number of processes first removes
the shards (and summaries) of the earlier count. Undecodable records are skipped and counted in
`{prefix}.summary-{p:05d}-of-{P:05d}.json` (with the first one's reason); a split of which
no process wrote a record fails once every process has written its shard, and its empty
shards and summaries are removed (a rerun tries the split again).
"""

from __future__ import annotations

import glob
import json
import os

import grain
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from seed_jax import command_line, weights
from seed_jax.api.checks import check_count
from seed_jax.api.precision import matmul_precision
from seed_jax.api.seed_tokenizer import read_codes_export
from seed_jax.data import code_records, pipeline, preprocess, records
from seed_jax.models import layers
from seed_jax.models.tokenizer import SeedTokenizer


class LocalEncoder:
    """pixels (B,S,S,3) -> codes (B,Q), Q the queries, with the batch split over this process's devices,
    at the matmul precision `api.SeedTokenizer` encodes with (float32: full float32 on
    every backend), so that the codes trained on are those the API gives for the images."""

    def __init__(self, model: SeedTokenizer):
        self.mesh = Mesh(np.asarray(jax.local_devices()), ("batch",))
        self.image_size = model.config.vit.image_size
        graphdef, state = nnx.split(model)
        replicated = NamedSharding(self.mesh, PartitionSpec())
        self.batch_sharding = NamedSharding(self.mesh, PartitionSpec("batch"))
        self.state = jax.device_put(state, replicated)
        precision = matmul_precision(jnp.dtype(model.dtype).name)

        def encode(state, pixels):
            with jax.default_matmul_precision(precision):
                return nnx.merge(graphdef, state).encode(pixels)["codes"]

        self._encode = jax.jit(encode, in_shardings=(replicated, self.batch_sharding))

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        rows = len(pixels)
        padded = -(-rows // self.mesh.size) * self.mesh.size
        pixels = np.concatenate([pixels, np.zeros((padded - rows,) + pixels.shape[1:], pixels.dtype)])
        return np.asarray(self._encode(self.state, jax.device_put(pixels, self.batch_sharding)))[:rows]


_SUMMARIES = "{}.summary-" + "[0-9]" * 5 + "-of-" + "[0-9]" * 5 + ".json"  # a prefix's summaries, as a glob


def tokenize_split(encoder: LocalEncoder, in_paths: list[str], out_dir: str, prefix: str, *, batch_size: int,
                   num_threads: int = 4, tokenizer: str | None = None, dtype: str | None = None) -> dict:
    """Writes this process's shard of code records for one split; returns its summary.
    `tokenizer`: the encoder's export fingerprint, and `dtype` its compute dtype (bfloat16
    picks other codes than float32 for some images), kept in the summary with the shard's
    inputs (`_inputs`); a finished shard whose summary holds another of any is written
    again. (`pretokenize` first checks that no split's input shards are named as its outputs.)"""
    index, count = jax.process_index(), jax.process_count()
    path, summary_path = _shard_files(out_dir, prefix)
    if index == 0:
        _remove_other_counts(out_dir, prefix, count)
    source = pipeline.RecordSource(in_paths)
    start, stop = index * len(source) // count, (index + 1) * len(source) // count
    inputs = _inputs(in_paths, start, stop)
    finished = _finished_summary(path, summary_path, tokenizer, dtype, inputs,
                                 f"pretokenize {prefix} shard {index}/{count}")
    if finished is not None:
        return finished
    ds = grain.MapDataset.range(start, stop).map(lambda i: preprocess.eval_record(source[i], encoder.image_size))
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2 * batch_size))
    os.makedirs(out_dir, exist_ok=True)
    from array_record.python import array_record_module

    written = skipped = 0
    first_skip_reason = ""
    writer = array_record_module.ArrayRecordWriter(path + ".partial", "group_size:1")
    try:
        batch: list[dict] = []
        for item in ds:
            if item["pixels"] is None:
                skipped += 1
                first_skip_reason = first_skip_reason or item["error"]
                continue
            batch.append(item)
            if len(batch) == batch_size:
                written += _write_batch(encoder, batch, writer)
                batch = []
        if batch:
            written += _write_batch(encoder, batch, writer)
    finally:
        writer.close()
    os.replace(path + ".partial", path)
    summary = {"records": written, "skipped_records": skipped, "first_skip_reason": first_skip_reason,
               "source_records": stop - start, "tokenizer": tokenizer, "dtype": dtype, "inputs": inputs}
    records.write_json(summary_path, summary)  # whole or not at all: a rerun takes a shard with one as done
    logging.info("pretokenize %s shard %d/%d: %s", prefix, index, count, summary)
    return summary


def _shard_files(out_dir: str, prefix: str) -> tuple[str, str]:
    """(code shard, its summary) of this process for the split `prefix` in `out_dir`."""
    index, count = jax.process_index(), jax.process_count()
    return (records.shard_path(out_dir, prefix, index, count),
            os.path.join(out_dir, f"{prefix}.summary-{index:05d}-of-{count:05d}.json"))


def _inputs(in_paths: list[str], start: int, stop: int) -> dict:
    """What a shard is written from: the records [start, stop) of the image-record
    shards `in_paths`, named by file name, size and modification time. A split moved
    elsewhere (mv) keeps all three; one rebuilt (make_records --overwrite) gets new times,
    and often keeps its sizes, ArrayRecord files being padded to 64 KiB blocks: other
    captions of the same images kept the old ones' codes and captions."""
    return {"shards": [[os.path.basename(p), os.path.getsize(p), os.stat(p).st_mtime_ns] for p in in_paths],
            "slice": [start, stop]}


def _finished_summary(path: str, summary_path: str, tokenizer: str | None, dtype: str | None, inputs: dict,
                      name: str) -> dict | None:
    """The summary of the finished shard `path` when `tokenizer` wrote it in `dtype` from
    `inputs`, else None (warning why it is written again). A summary from before dtypes or
    inputs were kept cannot tell, and passes; one from before modification times were kept
    is compared by names and sizes (`_as_kept`), not written again whole."""
    if not (os.path.exists(path) and os.path.exists(summary_path)):
        return None
    with open(summary_path) as f:
        summary = json.load(f)
    kept = summary.get("inputs", inputs)
    if summary.get("tokenizer") != tokenizer:
        logging.warning("%s: written with another tokenizer export (fingerprint %s, now %s); writing it again", name,
                        summary.get("tokenizer"), tokenizer)
    elif summary.get("dtype", dtype) != dtype:
        logging.warning("%s: encoded in %s, now %s; writing it again", name, summary["dtype"], dtype)
    elif kept != _as_kept(inputs, kept):
        logging.warning("%s: written from other image records (%s, now %s); writing it again", name, kept, inputs)
    else:
        return summary
    return None


def _as_kept(inputs: dict, kept: dict) -> dict:
    """`inputs` (`_inputs`) as the summary's `kept` ones name their shards: by name and
    size alone where it was written before modification times were kept."""
    if any(len(shard) == 2 for shard in kept.get("shards", [])):
        return {**inputs, "shards": [shard[:2] for shard in inputs["shards"]]}
    return inputs


def check_written_with(out_dir: str, prefixes: list[str], tokenizer_export: str) -> None:
    """Raises unless every summary of `prefixes` in `out_dir` that names its tokenizer
    export's fingerprint names `tokenizer_export`'s: codes of another tokenizer would
    train a model whose image tokens mean something else. Summaries written before
    fingerprints were kept, and code shards without summaries, cannot tell and pass."""
    named = {}
    for prefix in prefixes:
        for path in sorted(glob.glob(os.path.join(glob.escape(out_dir), _SUMMARIES.format(glob.escape(prefix))))):
            with open(path) as f:
                written_with = json.load(f).get("tokenizer")
            if written_with is not None:
                named[path] = written_with
    expected = weights.fingerprint(tokenizer_export) if named else None
    for path, written_with in named.items():
        if written_with != expected:
            raise ValueError(f"data.codes_dir: {path} says its codes were written with another tokenizer export "
                             f"than {tokenizer_export!r}: pre-tokenize again with this export, or train with the "
                             "export that wrote them")


def _refuse_to_overwrite_inputs(splits: dict[str, list[str]], out_dir: str) -> None:
    """Raises when `out_dir` holds any split's input shards named like some split's code
    shards (the same folder and prefix): they would be removed (another count) or
    replaced, perhaps before the split that reads them ran."""
    inputs = [path for paths in splits.values() for path in paths]
    for prefix in splits:
        named_as_outputs = {os.path.realpath(p) for p in records.existing_shards(out_dir, prefix)}
        for path in inputs:
            if os.path.realpath(path) in named_as_outputs:
                raise ValueError(f"out_dir: {out_dir!r} holds image records read here ({path}) named as the "
                                 f"{prefix!r} code shards, which would replace them: choose another out_dir")


def _remove_other_counts(out_dir: str, prefix: str, count: int) -> None:
    """Removes the shards and summaries of `prefix` written by a run on other than `count` processes."""
    keep, digits, name = f"-of-{count:05d}", "[0-9]" * 5, glob.escape(prefix)
    for pattern in (f"{name}-{digits}-of-{digits}.array_record", _SUMMARIES.format(name)):
        for path in glob.glob(os.path.join(glob.escape(out_dir), pattern)):
            if keep not in os.path.basename(path):
                os.remove(path)


def _write_batch(encoder: LocalEncoder, batch: list[dict], writer) -> int:
    codes = encoder(np.stack([item["pixels"] for item in batch]))
    for item, row in zip(batch, codes):
        writer.write(code_records.encode_code_record(item["id"], item["caption"], row))
    return len(batch)


def pretokenize(tokenizer_export: str, splits: dict[str, list[str]], out_dir: str, *, batch_size: int,
                dtype: str = "float32", num_threads: int = 4) -> dict[str, dict]:
    """Every split (prefix -> image-record shard paths) -> code records in `out_dir`;
    all processes take part. Returns {prefix: this process's summary}."""
    _refuse_to_overwrite_inputs(splits, out_dir)  # before any split writes
    model, _, _ = weights.load_model(tokenizer_export, dtype=layers.compute_dtype(dtype), kind="seed_tokenizer")
    return tokenize_splits(LocalEncoder(model), splits, out_dir, batch_size=batch_size, num_threads=num_threads,
                           tokenizer=weights.fingerprint(tokenizer_export), dtype=dtype)


def tokenize_splits(encoder: LocalEncoder, splits: dict[str, list[str]], out_dir: str, *, batch_size: int,
                    num_threads: int = 4, tokenizer: str | None = None, dtype: str | None = None) -> dict[str, dict]:
    """`tokenize_split` of every split (prefix -> image-record shard paths), each then
    checked to hold records (`check_records_written`); all processes take part. Returns
    {prefix: this process's summary}."""
    out = {}
    for prefix, paths in splits.items():
        out[prefix] = tokenize_split(encoder, paths, out_dir, prefix, batch_size=batch_size, num_threads=num_threads,
                                     tokenizer=tokenizer, dtype=dtype)
        check_records_written(prefix, paths, out_dir, out[prefix])
    multihost_utils.sync_global_devices("pretokenized")
    return out


def check_records_written(prefix: str, in_paths: list[str], out_dir: str, summary: dict) -> None:
    """Raises on every process when no process wrote a code record of the split `prefix`
    (every record skipped, or none): training on its empty code shards failed later,
    naming them, not the cause. Judged on the split's totals, gathered from every
    process's `summary` (a collective): one process's slice may be empty or all corrupt
    while the others' are not, and the split then trains on theirs. Each process then
    removes its empty shard and summary: kept, they were taken as done, and a rerun after
    the cause was fixed without changing the records (e.g. an image codec installed)
    failed at once from them."""
    counts = np.asarray([summary["records"], summary["skipped_records"], summary["source_records"]], np.int32)
    written, skipped, source = np.asarray(multihost_utils.process_allgather(counts)).reshape(-1, 3).sum(0)
    if written:
        return
    for path in _shard_files(out_dir, prefix):
        if os.path.exists(path):
            os.remove(path)
    why = summary.get("first_skip_reason")  # absent from summaries written before it was kept
    raise ValueError(f"pretokenize {prefix}: no record of the split {in_paths[0]}... could be tokenized: {skipped} of "
                     f"its {source} records skipped" + (f" (this process's first: {why})" if why else "") +
                     f"; its empty code shards in {out_dir} were removed. Rebuild the split's image records, or fix "
                     "why they were skipped, and run again")


def split_paths(splits) -> dict[str, list[str]]:
    """`config.splits` ({name: {dir, prefix, out_prefix}}) -> {code-shard prefix: image-record
    shard paths} of the splits with a `dir`; a split's code shards take its `out_prefix`,
    or its `prefix` when that is "". Two splits writing one prefix would leave one set of
    code shards, so that is an error naming both."""
    out, named = {}, {}
    for name, split in splits.items():
        if not split.dir:
            continue
        prefix = split.out_prefix or split.prefix
        if prefix in named:
            other = named[prefix]
            rename = other if name == prefix else name  # the split not already named as its shards
            raise ValueError(f"config.splits.{other} and config.splits.{name}: both would write code shards named "
                             f"{prefix!r}; give one another out_prefix (e.g. --config.splits.{rename}.out_prefix="
                             f"{rename})")
        named[prefix] = name
        out[prefix] = records.shard_paths(split.dir, split.prefix, f"config.splits.{name}.dir")
    return out


def run(config, workdir: str) -> bool:
    """Entry point for `configs/pretokenize.py`. Its settings are checked first, naming the
    field: a `tokenizer_export` that holds no SEED tokenizer, `dtype`, `num_threads` and
    `batch_size` failed as tracebacks (a `batch_size` below 1 encoded a split in one batch)."""
    out_dir = config.out_dir or os.path.join(workdir, "codes")
    with command_line.config_checks():
        if not config.tokenizer_export:
            raise ValueError("config.tokenizer_export: the SEED tokenizer export to encode with is required")
        splits = split_paths(config.splits)
        if not splits:
            raise ValueError("config.splits: set the `dir` of at least one split (e.g. --config.splits.train.dir=...)")
        read_codes_export("config.tokenizer_export", config.tokenizer_export)
        layers.compute_dtype(config.dtype, "config.dtype")
        check_count("config.batch_size", config.batch_size, 1)
        check_count("config.num_threads", config.num_threads, 0)
    summaries = pretokenize(config.tokenizer_export, splits, out_dir, batch_size=config.batch_size,
                            dtype=config.dtype, num_threads=config.num_threads)
    print(json.dumps({"out_dir": out_dir, "process": jax.process_index(), "summaries": summaries}), flush=True)
    return True
