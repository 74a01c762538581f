"""Builds image-caption ArrayRecord shards (`records.py`) from an image folder or a
prepared TFDS dataset: what `configs/tokenizer.py`'s `data.train_dir` / `data.eval_dir`
and `configs/pretokenize.py`'s splits read.

  python -m seed_jax.data.make_records --source=folder --input=DIR [--captions=FILE [--splits=A,B]] --out=OUT \\
      [--prefix=train] [--num_shards=N] [--resize=SHORTER_SIDE] [--num_workers=K] [--overwrite]
  python -m seed_jax.data.make_records --source=tfds --name=coco_captions --split=train --out=OUT \\
      [--data_dir=DIR] [--image_key=image] [--caption_key=captions/text] [--id_key=image/id]

Folder layouts (`image_folder.py`): `--captions=captions.jsonl` (`{"image", "caption"}`
a line), `--captions=coco_karpathy_test.json` (a list of those, as LAVIS's annotations),
`--captions=captions_train2014.json` (COCO), `--captions=dataset_coco.json
--splits=train,restval` (Karpathy's split file, dataset_flickr30k.json too: --splits
names the splits to read, comma-separated, and is required with it and refused with any
other file; images keep the file's order), or none: `00001.jpg` + `00001.txt` sidecars
(`.TXT`, any case) in any subfolder. One record per caption; ids are the image's path relative to --input
(TFDS: `--id_key`, else `{split}/{index}`; bytes of a file name or id that are not
UTF-8 as \\xNN), `#k` added for its k-th caption (k >= 1).
Two entries of a captions file that give one id are an error naming it and where the
file names each, raised before any image is read (TFDS ids are checked as they are
written: no shard is kept either way). JPEG and PNG bytes are kept as they are; other
formats, and images that `--resize` shrinks to that shorter side, become RGB JPEGs
(`captioned.py`). A missing or undecodable image, an empty or missing caption and an
unreadable TFDS example (`{split}/{index}`: its file missing or corrupt) are skipped and
counted, in OUT/{prefix}.summary.json beside the shards. The same input
gives byte-identical shards, whatever --num_workers. An --out that already holds shards
of --prefix is refused unless --overwrite: the new set then replaces them once it is
complete.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from typing import Iterable, Iterator

import tqdm

from seed_jax import command_line
from seed_jax.data import captioned, records, workers
from seed_jax.data.captioned import SKIP_REASONS, Entry, Prepared

FOLDER_FLAGS = ("input", "captions", "splits")
TFDS_FLAGS = ("name", "split", "data_dir", "image_key", "caption_key", "id_key")
TFDS_DEFAULTS = {"split": "train", "data_dir": "", "image_key": "image", "caption_key": "captions/text",
                 "id_key": ""}
# A flag of the other source that is one letter from a flag of this one: what was meant.
MEANT = {"split": "--splits, the splits of a Karpathy split file to read (e.g. --splits=train,restval)",
         "splits": "--split, the TFDS split to read (e.g. --split=train)"}
SKIPPED_IDS_KEPT = 20  # ids listed per skip reason in the summary
_CHUNK = 16  # entries per task sent to a worker, at most


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m seed_jax.data.make_records", description=__doc__.split("\n\n")[0])
    p.add_argument("--source", required=True, choices=("folder", "tfds"))
    p.add_argument("--out", required=True, type=command_line.user_path, help="directory for the shards and the summary")
    p.add_argument("--prefix", default="train", help="shards are PREFIX-00000-of-N.array_record")
    p.add_argument("--num_shards", type=int, default=1)
    p.add_argument("--resize", type=int, default=0,
                   help="shrink images whose shorter side is longer to this shorter side (0: keep sizes)")
    p.add_argument("--quality", type=int, default=captioned.JPEG_QUALITY, help="JPEG quality of re-encoded images")
    p.add_argument("--num_workers", type=int, default=0, help="decoding processes (0: one per usable CPU)")
    p.add_argument("--overwrite", action="store_true", help="replace shards of --prefix already in --out")
    folder = p.add_argument_group("--source=folder")
    folder.add_argument("--input", type=command_line.user_path, help="the image folder")
    folder.add_argument("--captions", type=command_line.user_path,
                        help=".jsonl, .json list, COCO .json or Karpathy split .json captions file "
                        "(default: sidecar .txt files)")
    folder.add_argument("--splits", help="the splits of a Karpathy split file to read, comma-separated, e.g. "
                        "train,restval (required with one)")
    tfds = p.add_argument_group("--source=tfds")
    tfds.add_argument("--name", help="prepared TFDS dataset, e.g. coco_captions or coco_captions/2014:1.1.0")
    for flag, default in TFDS_DEFAULTS.items():
        tfds.add_argument(f"--{flag}", type=command_line.user_path if flag == "data_dir" else None,
                          help=f"default {default!r}")
    return p


def check_args(args: argparse.Namespace) -> None:
    """Raises ValueError naming the flag that is wrong; fills in the per-source defaults."""
    for flag, minimum in (("num_shards", 1), ("resize", 0), ("num_workers", 0), ("quality", 1)):
        if getattr(args, flag) < minimum:
            raise ValueError(f"--{flag}={getattr(args, flag)}: expected an integer >= {minimum}")
    if args.num_shards > records.MAX_SHARDS:  # written, but named with more digits than readers look for
        raise ValueError(f"--num_shards={args.num_shards}: expected at most {records.MAX_SHARDS} (shard names hold "
                         "5 digits)")
    if args.quality > 100:
        raise ValueError(f"--quality={args.quality}: expected a JPEG quality in 1..100")
    if not args.prefix or "/" in args.prefix or os.sep in args.prefix:
        raise ValueError(f"--prefix={args.prefix!r}: expected a non-empty file name prefix without '/'")
    own, other = (FOLDER_FLAGS, TFDS_FLAGS) if args.source == "folder" else (TFDS_FLAGS, FOLDER_FLAGS)
    for flag in other:
        if getattr(args, flag) is not None:
            meant = f"; did you mean {MEANT[flag]}?" if flag in MEANT else ""
            raise ValueError(f"--{flag} is a flag of --source={'tfds' if args.source == 'folder' else 'folder'}, "
                             f"not of --source={args.source}{meant}")
    required = "input" if args.source == "folder" else "name"
    if not getattr(args, required):
        raise ValueError(f"--{required} is required with --source={args.source}")
    if args.source == "folder":
        check_splits_flag(args)
    else:
        for flag in own:
            if getattr(args, flag) is None:
                setattr(args, flag, TFDS_DEFAULTS[flag])
    check_out(args.out)
    if records.existing_shards(args.out, args.prefix) and not args.overwrite:
        raise FileExistsError(f"--out: {args.out!r} already holds shards of --prefix={args.prefix!r}: pass "
                              "--overwrite to replace them (once the new set is complete), or choose another "
                              "--out or --prefix")


def check_out(out: str) -> None:
    """Raises NotADirectoryError naming --out when it, or a folder above it, is a file
    or a link to nothing (which makedirs cannot replace)."""
    path = os.path.abspath(out)
    while not os.path.lexists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        what = f"a link to the missing {os.readlink(path)!r}" if os.path.islink(path) else "a file"
        raise NotADirectoryError(f"--out: {out!r} cannot be a folder: {path!r} is {what}")


def split_names(splits: str | None) -> tuple[str, ...]:
    """--splits=train,restval -> ("train", "restval"); () when it is not given."""
    return () if splits is None else tuple(name.strip() for name in splits.split(","))


def check_splits_flag(args: argparse.Namespace) -> None:
    """Raises ValueError when --splits names no split or comes without --captions."""
    if args.splits is None:
        return
    if not all(split_names(args.splits)):
        raise ValueError(f"--splits={args.splits!r}: expected split names separated by commas, e.g. train,restval")
    if not args.captions:
        raise ValueError("--splits chooses the splits of a Karpathy split file (--captions=dataset_coco.json): "
                         "there is no --captions")


def entries(args: argparse.Namespace) -> tuple[int, Iterable[Entry]]:
    """(number of entries, the entries in order) of the source the flags name."""
    if args.source == "folder":
        from seed_jax.data import image_folder

        found = image_folder.folder_entries(args.input, args.captions or "", split_names(args.splits))
        return len(found), found
    from seed_jax.data import tfds_source

    return tfds_source.tfds_entries(args.name, args.split, args.data_dir, args.image_key, args.caption_key,
                                    args.id_key)


def _prepare_chunk(chunk: list[Entry], resize: int, quality: int) -> list[Prepared]:
    return [captioned.prepare(entry, resize, quality) for entry in chunk]


def prepared(items: Iterable[Entry], count: int, num_workers: int, resize: int, quality: int) -> Iterator[Prepared]:
    """`captioned.prepare` of each entry, in order, in chunks on `num_workers` processes."""
    work = functools.partial(_prepare_chunk, resize=resize, quality=quality)
    num_workers = num_workers or workers.usable_cpus()
    size = max(1, min(_CHUNK, count // (4 * num_workers)))
    num_workers = min(num_workers, -(-count // size))
    for done in workers.map_in_order(work, workers.chunks(items, size), num_workers):
        yield from done


def make_records(argv: list[str]) -> dict:
    """Runs the command line `argv`; returns the summary it writes."""
    args = parser().parse_args(argv)
    check_args(args)
    count, items = entries(args)
    stats = {"records": 0, "images": 0, "reencoded_images": 0}
    skipped: dict[str, list[str]] = {reason: [] for reason in SKIP_REASONS}
    counts = dict.fromkeys(SKIP_REASONS, 0)

    def to_write() -> Iterator[dict]:
        seen: set[str] = set()
        progress = tqdm.tqdm(total=count, unit="image", desc=f"{args.prefix} records", mininterval=10)
        for result in prepared(items, count, args.num_workers, args.resize, args.quality):
            progress.update()
            for reason, ids in result.skipped.items():
                counts[reason] += len(ids)
                skipped[reason] += ids[:SKIPPED_IDS_KEPT - len(skipped[reason])]
            if result.records:
                stats["images"] += 1
                stats["reencoded_images"] += result.reencoded
            for record in result.records:
                if record["id"] in seen:  # a folder's ids were checked before reading; TFDS ids are here
                    raise ValueError(f"record id {record['id']!r} occurs twice: ids must be unique")
                seen.add(record["id"])
                stats["records"] += 1
                yield record
        progress.close()
        if not stats["records"]:  # raised inside the writer: no shards are written
            raise ValueError(f"no records: all {count} images' captions were skipped ({counts}); see --input / "
                             "--captions (or --name / --split)")

    paths = records.write_array_record_shards(to_write(), args.out, args.prefix, args.num_shards)
    source = {flag: getattr(args, flag) for flag in ("source",) + (FOLDER_FLAGS if args.source == "folder"
                                                                  else TFDS_FLAGS)}
    summary = {**stats, "skipped_records": sum(counts.values()), "skipped": counts,
               "skipped_ids": {reason: ids for reason, ids in skipped.items() if ids},
               "num_shards": args.num_shards, "shards": [os.path.basename(p) for p in paths],
               "resize": args.resize, "source": source}
    path = summary_path(args.out, args.prefix)
    records.write_json(path, summary)
    return {**summary, "summary": path}


def summary_path(directory: str, prefix: str) -> str:
    return os.path.join(directory, f"{prefix}.summary.json")


def error_message(error: Exception) -> str:
    """What `main` prints for `error`: its message (args[0]: str() of a KeyError adds
    quotes), but the whole str() of an OSError from the system, whose args[0] is its
    errno ("[Errno 13] Permission denied: 'out'", not "13")."""
    if isinstance(error, OSError) and error.errno is not None:
        return str(error)
    return error.args[0] if error.args else str(error)


def main(argv=None) -> int:
    try:
        summary = make_records(sys.argv[1:] if argv is None else argv)
    except (KeyError, ValueError, ImportError, OSError) as e:
        print(f"error: {error_message(e)}", file=sys.stderr)
        return 1
    skipped = ", ".join(f"{reason} {n}" for reason, n in summary["skipped"].items() if n) or "none"
    print(f"wrote {summary['records']} records of {summary['images']} images "
          f"({summary['reencoded_images']} re-encoded) to {summary['num_shards']} shards; "
          f"skipped {summary['skipped_records']} records ({skipped}); summary in {summary['summary']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
