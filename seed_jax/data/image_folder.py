"""An image folder with captions -> `captioned.Entry`s, in a stable order.

Layouts:
  * a JSON Lines captions file, one `{"image": "relative/path.jpg", "caption": "..."}`
    per line (`caption` may be a list; `id` optional, else the image path is the id and
    lines naming the same image are its captions 0, 1, ...);
  * a JSON list of the same objects, as LAVIS's annotation files are (e.g.
    `coco_karpathy_test.json`: `{"image": "val2014/....jpg", "caption": [5 captions]}`);
  * a COCO captions file `{"images": [{"id", "file_name"}], "annotations": [{"image_id",
    "caption"}]}`: one record per caption, as BLIP-2 trains on COCO;
  * Karpathy's split file (`dataset_coco.json`, `dataset_flickr30k.json`): `{"images":
    [{"filepath"?, "filename", "split", "sentences": [{"raw"}, ...]}]}`, read for the
    splits chosen (`splits`, make_records' `--splits`: e.g. train,restval), in file order;
    the image is `filepath/filename` (`filename` without a filepath, as Flickr's), its
    captions the sentences' `raw` text;
  * no captions file: sidecar captions as img2dataset / webdataset extraction writes them,
    `00001.jpg` beside `00001.txt` (or `.TXT`, any case), in any subfolder (walked in sorted
    order, symlinked folders included).
Image paths are relative to the folder; ids are those paths (with `/`; a sidecar file
name's bytes that are not UTF-8 as \\xNN), `#k` added for an image's k-th caption from
k = 1. Two entries of a captions file that would give one record id are an error naming
the id and where the file names each, raised before any image is read.
"""

from __future__ import annotations

import collections
import json
import os
import posixpath

from seed_jax.data.captioned import Entry

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def folder_entries(input_dir: str, captions: str = "", splits: tuple[str, ...] = ()) -> list[Entry]:
    """The entries of `input_dir`, captioned by the file `captions` (.jsonl or .json; of a
    Karpathy split file, the images of `splits`) or, without one, by sidecar .txt files."""
    if not os.path.isdir(input_dir):
        raise NotADirectoryError(f"--input: {input_dir!r} is not a directory")
    if not captions:
        return sidecar_entries(input_dir)
    entries = captions_file_entries(input_dir, captions, splits)
    check_unique_ids(entries, captions)
    return entries


def captions_file_entries(input_dir: str, path: str, splits: tuple[str, ...] = ()) -> list[Entry]:
    """The entries of the captions file `path`, its format told by its name and shape."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--captions: no file {path!r}")
    if path.endswith(".jsonl"):
        _refuse_splits(splits, path, "a JSON Lines captions file")
        return jsonl_entries(input_dir, path)
    if not path.endswith(".json"):
        raise ValueError(f"--captions: {path!r}: expected a .jsonl file (one {{\"image\", \"caption\"}} object "
                         "a line), a .json list of such objects, a COCO captions .json file or a Karpathy split "
                         ".json file")
    with open(path, encoding="utf-8-sig") as f:
        try:
            data = json.load(f)
        except ValueError as e:
            raise ValueError(f"--captions {path}: not JSON ({e})") from e
    if is_karpathy_split_file(data):
        return karpathy_entries(input_dir, path, data, splits)
    if isinstance(data, list):  # LAVIS's annotations
        _refuse_splits(splits, path, "a JSON list of {\"image\", \"caption\"} objects")
        return rows_entries(input_dir, path, ((f"item {i}", row) for i, row in enumerate(data)))
    if not (isinstance(data, dict) and isinstance(data.get("images"), list)
            and isinstance(data.get("annotations"), list)):
        raise ValueError(f"--captions {path}: expected a COCO captions file, an object with lists \"images\" "
                         "and \"annotations\"; a Karpathy split file, an object with a list \"images\" of "
                         "{\"filename\", \"split\", \"sentences\"} objects; or a list of {\"image\", \"caption\"} "
                         "objects")
    _refuse_splits(splits, path, "a COCO captions file")
    return coco_entries(input_dir, path, data)


def _refuse_splits(splits: tuple[str, ...], path: str, kind: str) -> None:
    if splits:
        raise ValueError(f"--splits={','.join(splits)}: --captions {path} is {kind}, which has no splits; "
                         "--splits chooses those of a Karpathy split file (dataset_coco.json)")


def check_unique_ids(entries: list[Entry], path: str) -> None:
    """Raises ValueError naming a record id two entries of the captions file `path`
    would both give, and where the file names each."""
    first: dict[str, Entry] = {}
    for entry in entries:
        for record_id in entry.record_ids():
            earlier = first.setdefault(record_id, entry)
            if earlier is not entry:
                raise ValueError(f"--captions {path}: record id {record_id!r} occurs twice ({earlier.where} and "
                                 f"{entry.where}): ids must be unique")


def _image_path(input_dir: str, relative: str) -> str:
    return os.path.join(input_dir, relative) if relative else ""


def _normalized(relative: str) -> str:
    """A relative image path in one spelling: "/" between names, no "./" or doubled "/"
    (posixpath.normpath), so "./a/x.jpg" and "a/x.jpg" are one image and one id."""
    relative = relative.replace(os.sep, "/")
    return posixpath.normpath(relative) if relative else relative


def _name_id(relative: str) -> str:
    """A path found on disk as a record id: the bytes of a name that is not UTF-8 (which
    Python reads as lone surrogates, text no record can hold) written as \\xNN."""
    return os.fsencode(_normalized(relative)).decode("utf-8", "backslashreplace")


def jsonl_entries(input_dir: str, path: str) -> list[Entry]:
    """The entries of a JSON Lines captions file (see `rows_entries`)."""
    def rows():
        with open(path, "rb") as f:  # decoded a line at a time, so that bytes that are not UTF-8 name their line
            for number, line in enumerate(f, 1):
                try:
                    text = line.decode("utf-8-sig")  # utf-8-sig: also without a byte order mark
                    if text.strip():
                        yield f"line {number}", json.loads(text)
                except ValueError as e:  # UnicodeDecodeError too
                    raise ValueError(f"--captions {path}: line {number}: not JSON ({e})") from e

    return rows_entries(input_dir, path, rows())


def rows_entries(input_dir: str, path: str, rows) -> list[Entry]:
    """(where, `{"image", "caption", "id"?}`) rows -> one entry per image (rows without an
    `id` merged by image path, where the first names it) or per row with an `id`."""
    by_image: dict[str, tuple[str, list]] = {}  # image path -> (first where, captions), for rows without an id
    order: list = []  # image paths (str) and explicit-id entries, in first-seen order
    for where, row in rows:
        if not isinstance(row, dict) or not isinstance(row.get("image"), str):
            raise ValueError(f"--captions {path}: {where}: expected an object with a string \"image\" "
                             f"(and \"caption\"), got {json.dumps(row)[:200]}")
        caption = row.get("caption")
        captions = tuple(caption) if isinstance(caption, list) else (caption,)
        image = _normalized(row["image"])
        if row.get("id") is None:
            if image not in by_image:
                by_image[image] = (where, [])
                order.append(image)
            by_image[image][1].extend(captions)
            continue
        order.append(Entry(str(row["id"]), _image_path(input_dir, row["image"]), captions, where=where))
    return [item if isinstance(item, Entry) else
            Entry(item, _image_path(input_dir, item), tuple(by_image[item][1]), where=by_image[item][0])
            for item in order]


def coco_entries(input_dir: str, path: str, data) -> list[Entry]:
    """One entry per listed image of the COCO captions file `path` (its JSON: `data`) with
    its captions in annotation order; captions of an image id not listed become an entry
    whose image is missing."""
    captions: dict = {}
    first_annotation: dict = {}  # image id -> index of its first annotation
    for index, annotation in enumerate(data["annotations"]):
        captions.setdefault(annotation.get("image_id"), []).append(annotation.get("caption"))
        first_annotation.setdefault(annotation.get("image_id"), index)
    entries = []
    for index, image in enumerate(data["images"]):
        name = image.get("file_name")
        if not isinstance(name, str):
            raise ValueError(f"--captions {path}: an image without a string \"file_name\": {image}")
        entries.append(Entry(_normalized(name), _image_path(input_dir, name), tuple(captions.pop(image.get("id"), ())),
                             where=f"images[{index}]"))
    entries += [Entry(f"image_id:{image_id}", "", tuple(texts), where=f"annotations[{first_annotation[image_id]}]")
                for image_id, texts in captions.items()]
    return entries


def is_karpathy_split_file(data) -> bool:
    """Karpathy's split files are an object with a list "images" of objects with "sentences"
    (and no "annotations", which COCO captions files have)."""
    return (isinstance(data, dict) and isinstance(data.get("images"), list) and "annotations" not in data
            and any(isinstance(image, dict) and "sentences" in image for image in data["images"]))


def karpathy_entries(input_dir: str, path: str, data, splits: tuple[str, ...]) -> list[Entry]:
    """One entry per image of `splits` in Karpathy's split file `path` (its JSON: `data`),
    in file order: image `filepath/filename` (`filename` when there is no filepath),
    captions its sentences' `raw` text."""
    for index, image in enumerate(data["images"]):
        _check_karpathy_image(path, index, image)
    _check_splits(path, splits, collections.Counter(image["split"] for image in data["images"]))
    entries = []
    for index, image in enumerate(data["images"]):
        if image["split"] in splits:
            relative = _normalized(posixpath.join(image.get("filepath") or "", image["filename"]))
            entries.append(Entry(relative, _image_path(input_dir, relative),
                                 tuple(sentence.get("raw") for sentence in image["sentences"]), where=f"images[{index}]"))
    return entries


def _check_karpathy_image(path: str, index: int, image) -> None:
    if not (isinstance(image, dict) and isinstance(image.get("filename"), str) and isinstance(image.get("split"), str)
            and isinstance(image.get("filepath") or "", str) and isinstance(image.get("sentences"), list)
            and all(isinstance(sentence, dict) for sentence in image["sentences"])):
        raise ValueError(f"--captions {path}: images[{index}]: expected an object with a string \"filename\" (and "
                         "\"filepath\"), a string \"split\" and a list \"sentences\" of {\"raw\"} objects, got "
                         f"{json.dumps(image)[:200]}")


def _check_splits(path: str, splits: tuple[str, ...], counts: collections.Counter) -> None:
    """Raises ValueError naming --splits and the splits of `path` (`counts`: split -> images)
    unless `splits` is non-empty and each has images."""
    have = ", ".join(f"{split} ({n} images)" for split, n in sorted(counts.items())) or "none"
    if not splits:
        raise ValueError(f"--splits is required with the Karpathy split file --captions {path}: choose from its "
                         f"splits {have}, e.g. --splits=train,restval")
    empty = [split for split in splits if not counts[split]]
    if empty:
        raise ValueError(f"--splits={','.join(splits)}: --captions {path} has no images in split "
                         f"{', '.join(empty)}; its splits: {have}")


def sidecar_entries(input_dir: str) -> list[Entry]:
    """Each image with its same-named .txt (.TXT, any case; two that differ only in case are
    an error naming both); a .txt without an image is an entry whose image is missing.
    Symlinked folders are walked (a folder assembled from links to others), except a link
    to a folder that contains it, which would loop."""
    entries = []
    ancestors = {input_dir: (os.path.realpath(input_dir),)}  # folder -> real paths of it and its parents
    for root, dirs, files in os.walk(input_dir, followlinks=True):
        chain = ancestors.pop(root)
        kept = []
        for d in sorted(d for d in dirs if not d.startswith(".")):
            real = os.path.realpath(os.path.join(root, d))
            if real not in chain:
                kept.append(d)
                ancestors[os.path.join(root, d)] = chain + (real,)
        dirs[:] = kept
        files = [f for f in files if not f.startswith(".")]
        texts, doubles = {}, {}  # stem -> its caption file; stem -> each of two or more (a.txt, a.TXT)
        for f in sorted(files):
            if f[-4:].lower() == ".txt":
                if f[:-4] in texts:
                    doubles.setdefault(f[:-4], [texts[f[:-4]]]).append(f)
                texts[f[:-4]] = f
        captioned = set()
        for name in sorted(files):
            stem, extension = os.path.splitext(name)
            if extension.lower() not in IMAGE_EXTENSIONS:
                continue
            if stem in doubles:
                raise ValueError(f"--input: the image {os.path.join(root, name)} has caption files that differ "
                                 f"only in case: {' and '.join(os.path.join(root, f) for f in doubles[stem])}; "
                                 "keep one")
            relative = _name_id(os.path.relpath(os.path.join(root, name), input_dir))
            text = texts.get(stem)
            captioned.add(stem)
            entries.append(Entry(relative, os.path.join(root, name),
                                 caption_file=os.path.join(root, text) if text else ""))
        for stem in sorted(set(texts) - captioned):
            for text in doubles.get(stem, [texts[stem]]):
                relative = _name_id(os.path.relpath(os.path.join(root, text), input_dir))
                entries.append(Entry(relative, "", caption_file=os.path.join(root, text)))
    return entries
