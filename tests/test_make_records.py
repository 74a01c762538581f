"""make_records: image folders (JSON Lines, LAVIS lists, COCO, Karpathy splits, sidecar captions) and TFDS ->
image-caption shards."""

import io
import json
import os
import re

import ml_collections
import numpy as np
import pytest
from array_record.python import array_record_module
from PIL import Image

from seed_jax.data import make_records, pipeline, preprocess, records, synthetic, text


def _image(path, size=(32, 24), seed=0, fmt=None, mode="RGB"):
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], len(mode)), np.uint8)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(pixels, mode).save(path, format=fmt)
    with open(path, "rb") as f:
        return f.read()


def _write(path, content):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(content)


def _run(*argv):
    return make_records.main([str(a) for a in argv])


def _read(out, prefix="train"):
    """{id: record} of every shard of `prefix` in `out`."""
    result = {}
    for path in records.shard_paths(str(out), prefix):
        reader = array_record_module.ArrayRecordReader(path)
        for raw in reader.read_all():
            record = records.decode_record(raw)
            result[record["id"]] = record
        reader.close()
    return result


def _summary(out, prefix="train"):
    with open(os.path.join(out, f"{prefix}.summary.json")) as f:
        return json.load(f)


def _pixels(data):
    return np.asarray(preprocess.decode_image(data))


def test_jsonl_captions_round_trip(tmp_path):
    folder, out = tmp_path / "images", tmp_path / "out"
    jpeg = _image(str(folder / "a" / "x.jpg"), seed=1)
    png = _image(str(folder / "b" / "y.png"), seed=2)
    rgba = _image(str(folder / "c.png"), seed=3, mode="RGBA")
    lines = [{"image": "a/x.jpg", "caption": "a first caption"}, {"image": "b/y.png", "caption": "a png", "id": 7},
             {"image": "a/x.jpg", "caption": "  a second caption\n"}, {"image": "c.png", "caption": ["one", "two"]},
             {"image": "./a//x.jpg", "caption": "a third caption"}]  # one image however its path is spelt
    _write(str(folder / "captions.jsonl"), "\n".join(json.dumps(line) for line in lines) + "\n")
    assert _run("--source=folder", f"--input={folder}", f"--captions={folder / 'captions.jsonl'}", f"--out={out}",
                "--num_shards=2", "--num_workers=1") == 0
    got = _read(out)
    assert {k: v["caption"] for k, v in got.items()} == {
        "a/x.jpg": "a first caption", "a/x.jpg#1": "a second caption", "a/x.jpg#2": "a third caption", "7": "a png",
        "c.png": "one", "c.png#1": "two"}
    assert got["a/x.jpg"]["image"] == got["a/x.jpg#1"]["image"] == jpeg  # JPEG and PNG bytes kept as they are
    assert got["7"]["image"] == png and got["c.png"]["image"] == rgba
    summary = _summary(out)
    assert summary["records"] == 6 and summary["images"] == 3 and summary["skipped_records"] == 0
    assert summary["shards"] == ["train-00000-of-00002.array_record", "train-00001-of-00002.array_record"]
    # a row without "caption" (its text under another key) is a missing caption, not an empty one
    lines = [{"image": "a/x.jpg", "text": "a cat"}, {"image": "b/y.png", "caption": ""},
             {"image": "c.png", "caption": "ok"}]
    _write(str(folder / "captions.jsonl"), "\n".join(json.dumps(line) for line in lines) + "\n")
    assert _run("--source=folder", f"--input={folder}", f"--captions={folder / 'captions.jsonl'}", f"--out={out}",
                "--prefix=keys", "--num_workers=1") == 0
    assert _summary(out, "keys")["skipped_ids"] == {"missing_caption": ["a/x.jpg"], "empty_caption": ["b/y.png"]}


def test_eval_labels_group_an_images_captions(tmp_path):
    """The tokenizer's retrieval eval reads each record's image from its id (`path#k`), so
    an image's captions (a record each) are one image to retrieval."""
    folder, out = tmp_path / "coco", tmp_path / "out"
    rows = []
    for i in range(3):
        _image(str(folder / "val2014" / f"{i}.jpg"), seed=i)
        rows.append({"image": f"val2014/{i}.jpg", "caption": [f"image {i} caption {k}" for k in range(3)]})
    _write(str(tmp_path / "test.json"), json.dumps(rows))
    assert _run("--source=folder", f"--input={folder}", f"--captions={tmp_path / 'test.json'}", f"--out={out}",
                "--prefix=eval", "--num_workers=1") == 0
    captions, images = zip(*pipeline.read_labels(records.shard_paths(str(out), "eval"), 9))
    assert images == tuple(f"val2014/{i}.jpg" for i in range(3) for _ in range(3))
    assert captions == tuple(f"image {i} caption {k}" for i in range(3) for k in range(3))
    assert [records.image_id(i) for i in ("a.jpg#0", "a.jpg#01", "a#b", "x#2", "x#12")] == [
        "a.jpg#0", "a.jpg#01", "a#b", "x", "x"]


def test_coco_captions_file_gives_a_record_per_caption(tmp_path):
    folder, out = tmp_path / "coco", tmp_path / "out"
    jpeg = _image(str(folder / "train2014" / "COCO_1.jpg"), seed=1)
    _image(str(folder / "train2014" / "COCO_2.jpg"), seed=2)
    coco = {"images": [{"id": 1, "file_name": "COCO_1.jpg"}, {"id": 2, "file_name": "COCO_2.jpg"}],
            "annotations": [{"id": 10, "image_id": 1, "caption": "a dog"}, {"id": 11, "image_id": 9, "caption": "lost"},
                            {"id": 12, "image_id": 1, "caption": "a brown dog"}]}
    _write(str(folder / "annotations" / "captions_train2014.json"), json.dumps(coco))
    assert _run("--source=folder", f"--input={folder / 'train2014'}", "--num_workers=1", f"--out={out}",
                f"--captions={folder / 'annotations' / 'captions_train2014.json'}") == 0
    got = _read(out)
    assert {k: v["caption"] for k, v in got.items()} == {"COCO_1.jpg": "a dog", "COCO_1.jpg#1": "a brown dog"}
    assert got["COCO_1.jpg"]["image"] == jpeg
    summary = _summary(out)  # COCO_2 has no caption; image 9 is not listed
    assert summary["skipped"] == {"missing_image": 1, "undecodable_image": 0, "empty_caption": 0,
                                  "missing_caption": 1, "unreadable_example": 0}
    assert summary["skipped_ids"] == {"missing_image": ["image_id:9"], "missing_caption": ["COCO_2.jpg"]}


def _karpathy_file(folder, path):
    """A Karpathy split file (dataset_coco.json's shape) over images written in `folder`:
    COCO's entries with a "filepath", Flickr's without; returns {relative path: bytes}."""
    rows = [("val2014", "COCO_val_1.jpg", "train"), ("val2014", "COCO_val_2.png", "restval"),
            (None, "flickr_3.jpg", "train"), ("val2014", "COCO_val_4.jpg", "test"), (None, "flickr_5.jpg", "val")]
    images, data = {}, []
    for i, (filepath, filename, split) in enumerate(rows):
        relative = f"{filepath}/{filename}" if filepath else filename
        images[relative] = _image(str(folder / relative), seed=i)
        sentences = [{"raw": f" {split} image {i} caption {k}\n", "tokens": ["x"]} for k in range(3)]
        data.append({"filename": filename, "split": split, "sentences": sentences, "imgid": i, "sentids": [0, 1, 2],
                     **({"filepath": filepath, "cocoid": 100 + i} if filepath else {})})
    data[0]["sentences"][1]["raw"] = "  "
    _write(str(path), json.dumps({"images": data, "dataset": "coco"}))
    return images


def test_karpathy_split_file_gives_the_chosen_splits(tmp_path):
    """Karpathy's dataset_coco.json / dataset_flickr30k.json: the images of --splits, in
    file order, at filepath/filename (filename alone without a filepath), a record per
    sentence's raw text; an image's captions are one image to retrieval."""
    folder, out = tmp_path / "coco", tmp_path / "out"
    images = _karpathy_file(folder, tmp_path / "dataset_coco.json")
    assert _run("--source=folder", f"--input={folder}", f"--captions={tmp_path / 'dataset_coco.json'}",
                "--splits=train, restval", f"--out={out}", "--num_workers=1") == 0
    got = _read(out)
    assert {k: v["caption"] for k, v in got.items()} == {
        "val2014/COCO_val_1.jpg": "train image 0 caption 0", "val2014/COCO_val_1.jpg#2": "train image 0 caption 2",
        "val2014/COCO_val_2.png": "restval image 1 caption 0", "val2014/COCO_val_2.png#1": "restval image 1 caption 1",
        "val2014/COCO_val_2.png#2": "restval image 1 caption 2", "flickr_3.jpg": "train image 2 caption 0",
        "flickr_3.jpg#1": "train image 2 caption 1", "flickr_3.jpg#2": "train image 2 caption 2"}
    assert all(record["image"] == images[records.image_id(i)] for i, record in got.items())
    summary = _summary(out)
    assert summary["skipped_ids"] == {"empty_caption": ["val2014/COCO_val_1.jpg#1"]}
    assert summary["images"] == 3 and summary["source"]["splits"] == "train, restval"
    _, ids = zip(*pipeline.read_labels(records.shard_paths(str(out), "train"), 8))
    assert ids == ("val2014/COCO_val_1.jpg",) * 2 + ("val2014/COCO_val_2.png",) * 3 + ("flickr_3.jpg",) * 3
    assert _run("--source=folder", f"--input={folder}", f"--captions={tmp_path / 'dataset_coco.json'}",
                "--splits=test,val", f"--out={out}", "--prefix=eval", "--num_workers=1") == 0
    assert sorted(_read(out, "eval")) == sorted(f"{path}{suffix}" for path in ("val2014/COCO_val_4.jpg", "flickr_5.jpg")
                                                for suffix in ("", "#1", "#2"))


@pytest.mark.parametrize("captions, splits, message", [
    ("dataset_coco.json", None, "--splits is required with the Karpathy split file"),
    ("dataset_coco.json", "train,tset", "--splits=train,tset: --captions {tmp}/dataset_coco.json has no images in "
                                        "split tset; its splits: restval (1 images), test (1 images), "
                                        "train (2 images), val (1 images)"),
    ("dataset_coco.json", "train,", "--splits='train,': expected split names"),
    (None, "train", "--splits chooses the splits of a Karpathy split file"),
    ("c.jsonl", "train", "--splits=train: --captions {tmp}/c.jsonl is a JSON Lines captions file, which has no splits"),
    ("c.json", "train", "is a JSON list of {\"image\", \"caption\"} objects, which has no splits"),
    ("captions_train2014.json", "train", "is a COCO captions file, which has no splits"),
    ("no_sentences.json", None, "images[0]: expected an object with a string \"filename\""),
])
def test_karpathy_splits_errors_name_the_flag(tmp_path, capsys, captions, splits, message):
    folder = tmp_path / "coco"
    _karpathy_file(folder, tmp_path / "dataset_coco.json")
    row = {"image": "flickr_3.jpg", "caption": "a caption"}
    _write(str(tmp_path / "c.jsonl"), json.dumps(row))
    _write(str(tmp_path / "c.json"), json.dumps([row]))
    _write(str(tmp_path / "captions_train2014.json"), json.dumps({"images": [], "annotations": []}))
    _write(str(tmp_path / "no_sentences.json"), json.dumps({"images": [{"filename": "a.jpg"}, {"sentences": []}]}))
    flags = ([f"--captions={tmp_path / captions}"] if captions else []) + ([f"--splits={splits}"] if splits else [])
    assert _run("--source=folder", f"--input={folder}", *flags, f"--out={tmp_path / 'out'}") == 1
    assert message.replace("{tmp}", str(tmp_path)) in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out")


def test_tfds_split_flag_with_a_karpathy_file_points_to_splits(tmp_path, capsys):
    """--split (TFDS's) with a Karpathy split file was refused as a flag of --source=tfds,
    without naming --splits, the flag meant."""
    folder = tmp_path / "coco"
    _karpathy_file(folder, tmp_path / "dataset_coco.json")
    assert _run("--source=folder", f"--input={folder}", f"--captions={tmp_path / 'dataset_coco.json'}",
                "--split=train", f"--out={tmp_path / 'out'}") == 1
    assert ("--split is a flag of --source=tfds, not of --source=folder; did you mean --splits, the splits of a "
            "Karpathy split file to read (e.g. --splits=train,restval)?") in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("captions, content, message", [
    ("c.jsonl", "\n".join(json.dumps(row) for row in [{"image": "a.jpg", "caption": ["one", "two"]},
                                                      {"image": "b.jpg", "caption": "three"},
                                                      {"image": "b.jpg", "caption": "four", "id": "a.jpg#1"}]),
     "record id 'a.jpg#1' occurs twice (line 1 and line 3)"),
    ("c.json", json.dumps([{"image": "a.jpg", "caption": "one", "id": 7}, {"image": "b.jpg", "caption": "two"},
                           {"image": "b.jpg", "caption": [], "id": 7}]),
     "record id '7' occurs twice (item 0 and item 2)"),
    ("captions.json", json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"},
                                             {"id": 3, "file_name": "a.jpg"}],
                                  "annotations": [{"image_id": k, "caption": "x"} for k in (1, 2, 3)]}),
     "record id 'a.jpg' occurs twice (images[0] and images[2])"),
    ("dataset_coco.json", json.dumps({"images": [
        {"filename": name, "split": split, "sentences": [{"raw": "x"}]}
        for name, split in (("a.jpg", "train"), ("b.jpg", "train"), ("a.jpg", "restval"))]}),
     "record id 'a.jpg' occurs twice (images[0] and images[2])"),
])
def test_duplicate_ids_fail_before_any_image_is_read(tmp_path, capsys, monkeypatch, captions, content, message):
    """Two entries giving one record id were found only as the second was written, after
    every image before it was read; now when the entries are listed, naming both places."""
    folder, out = tmp_path / "images", tmp_path / "out"
    for i, name in enumerate(("a.jpg", "b.jpg")):
        _image(str(folder / name), seed=i)
    _write(str(tmp_path / captions), content)

    def no_reading(*args, **kwargs):
        raise AssertionError("an image was read before the duplicate id was found")

    monkeypatch.setattr(make_records.captioned, "prepare", no_reading)
    argv = ["--source=folder", f"--input={folder}", f"--captions={tmp_path / captions}", f"--out={out}",
            "--num_workers=1"] + (["--splits=train,restval"] if captions == "dataset_coco.json" else [])
    assert _run(*argv) == 1
    assert f"--captions {tmp_path / captions}: {message}: ids must be unique" in capsys.readouterr().err
    assert not os.path.exists(out)


def test_a_cameras_multi_picture_jpeg_is_kept_as_it_is(tmp_path):
    """Phones save MPO: a JPEG with further pictures after the first, which PIL reports
    as format "MPO". Its bytes are a JPEG that decoders read: kept, not re-encoded."""
    folder, out = tmp_path / "photos", tmp_path / "out"
    first, second = (Image.fromarray(np.full((24, 32, 3), v, np.uint8)) for v in (40, 200))
    os.makedirs(folder)
    first.save(folder / "phone.jpg", format="MPO", save_all=True, append_images=[second])
    with Image.open(folder / "phone.jpg") as probe:
        assert probe.format == "MPO"
    _write(str(folder / "phone.txt"), "a photo")
    assert _run("--source=folder", f"--input={folder}", "--num_workers=1", f"--out={out}") == 0
    record = _read(out)["phone.jpg"]
    assert record["image"] == (folder / "phone.jpg").read_bytes()
    assert abs(_pixels(record["image"]).mean() - 40) < 3 and _summary(out)["reencoded_images"] == 0


def test_lavis_annotation_list_gives_a_record_per_caption(tmp_path, capsys):
    """LAVIS's annotation files (BLIP-2's and SEED's COCO Karpathy splits) are a JSON list
    of {"image", "caption"} objects, the caption a string or a list."""
    folder, out = tmp_path / "coco", tmp_path / "out"
    jpeg = _image(str(folder / "val2014" / "COCO_1.jpg"), seed=1)
    png = _image(str(folder / "val2014" / "COCO_2.png"), seed=2)
    rows = [{"image": "val2014/COCO_1.jpg", "caption": ["a dog", "a brown dog"], "image_id": "1"},
            {"image": "val2014/COCO_2.png", "caption": "a cat"}]
    _write(str(tmp_path / "coco_karpathy_test.json"), json.dumps(rows))
    assert _run("--source=folder", f"--input={folder}", f"--captions={tmp_path / 'coco_karpathy_test.json'}",
                "--num_workers=1", f"--out={out}") == 0
    got = _read(out)
    assert {k: v["caption"] for k, v in got.items()} == {"val2014/COCO_1.jpg": "a dog",
                                                         "val2014/COCO_1.jpg#1": "a brown dog",
                                                         "val2014/COCO_2.png": "a cat"}
    assert got["val2014/COCO_1.jpg#1"]["image"] == jpeg and got["val2014/COCO_2.png"]["image"] == png
    _write(str(tmp_path / "bad.json"), json.dumps([{"image": "val2014/COCO_1.jpg"}, {"caption": "no image"}]))
    assert _run("--source=folder", f"--input={folder}", f"--captions={tmp_path / 'bad.json'}",
                f"--out={tmp_path / 'bad'}") == 1
    assert 'item 1: expected an object with a string "image"' in capsys.readouterr().err


def test_sidecar_captions_with_bad_items_skipped_and_counted(tmp_path, capsys):
    folder, out = tmp_path / "extracted", tmp_path / "out"
    jpeg = _image(str(folder / "00000" / "000001.jpg"), seed=1)
    _write(str(folder / "00000" / "000001.txt"), "a red square\n")
    _image(str(folder / "00000" / "000002.webp"), seed=2, fmt="WEBP")  # re-encoded as JPEG
    _write(str(folder / "00000" / "000002.txt"), "a webp image")
    _write(str(folder / "00000" / "000002.json"), "{}")  # other sidecars are ignored
    _write(str(folder / "00001" / "000003.jpg"), "not an image")  # corrupt
    _write(str(folder / "00001" / "000003.txt"), "corrupt")
    _write(str(folder / "00001" / "000004.txt"), "no image beside it")  # missing image
    _image(str(folder / "00001" / "000005.png"), seed=5)
    _write(str(folder / "00001" / "000005.txt"), " \n")  # empty caption
    _image(str(folder / "00001" / "000006.png"), seed=6)  # no caption file
    _image(str(folder / "00001" / "000007.png"), seed=7)
    with open(folder / "00001" / "000007.txt", "wb") as f:
        f.write(b"caf\xe9")  # not UTF-8: skipped as an empty caption
    assert _run("--source=folder", f"--input={folder}", f"--out={out}", "--num_workers=1") == 0
    got = _read(out)
    assert {k: v["caption"] for k, v in got.items()} == {"00000/000001.jpg": "a red square",
                                                         "00000/000002.webp": "a webp image"}
    assert got["00000/000001.jpg"]["image"] == jpeg
    webp = got["00000/000002.webp"]["image"]
    assert Image.open(io.BytesIO(webp)).format == "JPEG"
    with open(folder / "00000" / "000002.webp", "rb") as f:
        original = _pixels(f.read()).astype(np.int32)
    assert np.abs(_pixels(webp).astype(np.int32) - original).mean() < 12  # JPEG of noise at quality 95
    summary = _summary(out)
    assert summary["skipped"] == {"missing_image": 1, "undecodable_image": 1, "empty_caption": 2,
                                  "missing_caption": 1, "unreadable_example": 0}
    assert summary["skipped_ids"]["undecodable_image"] == ["00001/000003.jpg"]
    assert summary["records"] == 2 and summary["reencoded_images"] == 1 and summary["skipped_records"] == 5
    printed = capsys.readouterr().out
    assert "wrote 2 records" in printed and "missing_image 1" in printed and "undecodable_image 1" in printed


def test_sidecar_captions_in_any_case_and_two_of_one_image_refused(tmp_path, capsys):
    """A sidecar named .TXT or .Txt was ignored: its image counted as missing a caption.
    Two sidecars of one image that differ only in case would leave which one captions it
    to the file system: an error naming both (without an image, each is counted as one missing)."""
    folder, out = tmp_path / "images", tmp_path / "out"
    _image(str(folder / "a.jpg"), seed=1)
    _write(str(folder / "a.TXT"), "upper case")
    _image(str(folder / "b.png"), seed=2)
    _write(str(folder / "b.Txt"), "mixed case")
    _write(str(folder / "c.txt"), "no image")
    _write(str(folder / "c.TXT"), "no image either")
    assert _run("--source=folder", f"--input={folder}", f"--out={out}", "--num_workers=1") == 0, capsys.readouterr()
    assert {k: v["caption"] for k, v in _read(out).items()} == {"a.jpg": "upper case", "b.png": "mixed case"}
    assert _summary(out)["skipped_ids"] == {"missing_image": ["c.TXT", "c.txt"]}  # each counted
    _write(str(folder / "b.txt"), "lower case")
    assert _run("--source=folder", f"--input={folder}", f"--out={out}", "--overwrite", "--num_workers=1") == 1
    assert (f"--input: the image {folder / 'b.png'} has caption files that differ only in case: "
            f"{folder / 'b.Txt'} and {folder / 'b.txt'}; keep one") in capsys.readouterr().err


def test_sidecar_walk_follows_symlinked_folders_without_looping(tmp_path):
    """A folder assembled from links to others (mydata/cc3m -> /data/cc3m/images) is read
    through them (they were skipped, uncounted); a link to a folder containing it is not."""
    folder, elsewhere, out = tmp_path / "images", tmp_path / "elsewhere", tmp_path / "out"
    _image(str(folder / "own.jpg"), seed=1)
    _write(str(folder / "own.txt"), "in the folder")
    _image(str(elsewhere / "00000" / "000001.jpg"), seed=2)
    _write(str(elsewhere / "00000" / "000001.txt"), "behind a link")
    os.symlink(elsewhere, folder / "linked")
    os.symlink(folder, folder / "linked" / "00000" / "back")  # a cycle
    assert _run("--source=folder", f"--input={folder}", f"--out={out}", "--num_workers=1") == 0
    assert {k: v["caption"] for k, v in _read(out).items()} == {"own.jpg": "in the folder",
                                                              "linked/00000/000001.jpg": "behind a link"}


def test_captions_written_with_a_byte_order_mark(tmp_path, capsys):
    """Windows editors start UTF-8 text with a BOM: not part of a sidecar caption, and no
    reason to refuse a .jsonl / .json captions file; a .json that is not JSON names --captions."""
    folder, out = tmp_path / "images", tmp_path / "out"
    _image(str(folder / "a.jpg"), seed=1)
    with open(folder / "a.txt", "w", encoding="utf-8-sig") as f:
        f.write("a caption from Notepad\n")
    assert _run("--source=folder", f"--input={folder}", f"--out={out}", "--num_workers=1") == 0
    assert _read(out)["a.jpg"]["caption"] == "a caption from Notepad"
    row = {"image": "a.jpg", "caption": "from a file"}
    for name, content in (("c.jsonl", json.dumps(row) + "\n"), ("c.json", json.dumps([row]))):
        with open(tmp_path / name, "w", encoding="utf-8-sig") as f:
            f.write(content)
        assert _run("--source=folder", f"--input={folder}", f"--captions={tmp_path / name}", f"--out={out}",
                    f"--prefix={name[2:]}", "--num_workers=1") == 0, capsys.readouterr().err
        assert _read(out, name[2:])["a.jpg"]["caption"] == "from a file"
    _write(str(tmp_path / "bad.json"), "{not json")
    assert _run("--source=folder", f"--input={folder}", f"--captions={tmp_path / 'bad.json'}", f"--out={out}",
                "--prefix=bad", "--num_workers=1") == 1
    assert f"--captions {tmp_path / 'bad.json'}: not JSON" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["c.jsonl", "c.json"])
def test_a_captions_file_that_is_not_utf8_names_it_and_the_line(tmp_path, capsys, name):
    """A captions file saved as Latin-1 (a caption with "café"): the .jsonl one failed with
    "error: utf-8" (the codec name, args[0] of UnicodeDecodeError), naming neither."""
    folder, captions = tmp_path / "images", tmp_path / name
    _image(str(folder / "a.jpg"), seed=1)
    rows = [{"image": "a.jpg", "caption": "a cup"}, {"image": "a.jpg", "caption": "café au lait"}]
    lines = [json.dumps(row, ensure_ascii=False) for row in rows]
    captions.write_bytes(("\n".join(lines) if name.endswith("l") else f"[{', '.join(lines)}]").encode("latin-1"))
    assert _run("--source=folder", f"--input={folder}", f"--captions={captions}", f"--out={tmp_path / 'out'}",
                "--num_workers=1") == 1
    where = ": line 2" if name.endswith("l") else ""
    assert f"--captions {captions}{where}: not JSON ('utf-8' codec can't decode" in capsys.readouterr().err


def test_file_names_and_captions_that_are_not_unicode_text(tmp_path, capsys):
    r"""A file name that is not UTF-8 (Python reads its bytes as lone surrogates, which no
    record can hold) gets an id with the bytes as \xNN; a caption with a lone surrogate
    (a JSON escape) is skipped and counted as a caption file that is not text is; an id
    with one fails naming its record. Each once ended the whole run with 'error: utf-8'."""
    folder, out = tmp_path / "images", tmp_path / "out"
    _image(str(folder / "a.jpg"), seed=1)
    _write(str(folder / "a.txt"), "plain")
    latin = os.path.join(os.fsencode(folder), b"caf\xe9.jpg")  # a Latin-1 name
    Image.new("RGB", (8, 8)).save(latin, format="JPEG")
    with open(latin[:-4] + b".txt", "w") as f:
        f.write("a Latin-1 file name")
    assert _run("--source=folder", f"--input={folder}", f"--out={out}", "--num_workers=1") == 0, capsys.readouterr()
    assert {k: v["caption"] for k, v in _read(out).items()} == {"a.jpg": "plain", "caf\\xe9.jpg": "a Latin-1 file name"}
    captions = tmp_path / "captions.jsonl"
    _write(str(captions), '{"image": "a.jpg", "caption": ["fine", "half a pair \\ud800 of surrogates"]}\n')
    assert _run("--source=folder", f"--input={folder}", f"--captions={captions}", f"--out={out}", "--prefix=json",
                "--num_workers=1") == 0, capsys.readouterr()
    assert {k: v["caption"] for k, v in _read(out, "json").items()} == {"a.jpg": "fine"}
    assert _summary(out, "json")["skipped_ids"] == {"empty_caption": ["a.jpg#1"]}
    _write(str(captions), '{"image": "a.jpg", "caption": "fine", "id": "x\\ud800"}\n')
    assert _run("--source=folder", f"--input={folder}", f"--captions={captions}", f"--out={out}", "--prefix=id",
                "--num_workers=1") == 1
    assert "record 'x\\ud800': its id or caption is not Unicode text" in capsys.readouterr().err


def test_resize_gives_the_shorter_side_and_keeps_smaller_images(tmp_path):
    folder, out = tmp_path / "images", tmp_path / "out"
    _image(str(folder / "wide.png"), size=(64, 40), seed=1)
    _image(str(folder / "tall.jpg"), size=(30, 50), seed=2)
    small = _image(str(folder / "small.jpg"), size=(12, 10), seed=3)
    for name in ("wide.png", "tall.jpg", "small.jpg"):
        _write(str(folder / (name.split(".")[0] + ".txt")), name)
    assert _run("--source=folder", f"--input={folder}", f"--out={out}", "--resize=16", "--num_workers=1") == 0
    got = _read(out)
    sizes = {k: Image.open(io.BytesIO(v["image"])).size for k, v in got.items()}
    assert sizes == {"wide.png": (26, 16), "tall.jpg": (16, 27), "small.jpg": (12, 10)}
    assert Image.open(io.BytesIO(got["wide.png"]["image"])).format == "JPEG"
    assert got["small.jpg"]["image"] == small
    assert _summary(out)["reencoded_images"] == 2


def test_16_bit_grayscale_png_keeps_its_shades(tmp_path):
    """PIL's convert("RGB") of a 16-bit grayscale image clips every value above 255 to
    white; the kept PNG and the --resize JPEG decode to the top 8 bits of each value."""
    folder, out = tmp_path / "images", tmp_path / "out"
    shades = np.tile(np.linspace(0, 65535, 40).astype(np.uint16), (24, 1))
    os.makedirs(folder)
    Image.fromarray(shades).save(folder / "deep.png")
    assert Image.open(folder / "deep.png").mode == "I;16"
    _write(str(folder / "deep.txt"), "a 16-bit grey ramp")
    expected = np.repeat((shades >> 8)[..., None], 3, axis=2)
    for resize, prefix in ((0, "train"), (12, "small")):
        assert _run("--source=folder", f"--input={folder}", f"--out={out}", f"--prefix={prefix}",
                    f"--resize={resize}", "--num_workers=1") == 0
        pixels = _pixels(_read(out, prefix)["deep.png"]["image"]).astype(np.int32)
        if not resize:
            np.testing.assert_array_equal(pixels, expected)
        else:  # a JPEG of the ramp shrunk to 20x12: dark on the left, light on the right
            assert pixels[:, :4].mean() < 40 and pixels[:, -4:].mean() > 215


@pytest.mark.parametrize("values, expected", [
    (np.linspace(0, 2**31 - 1, 40).astype(np.int32), lambda v: v >> 23),  # 32-bit: its top 8 bits
    (np.linspace(0, 65535, 40).astype(np.int32), lambda v: v >> 8),  # 16-bit values, as "I;16" reads them
    (np.arange(-20, 236, 8).astype(np.int32), lambda v: np.maximum(v, 0)),  # 8-bit values as they are
    (np.linspace(0, 1, 40).astype(np.float32), lambda v: np.round(v * 255)),  # float in [0, 1]
    (np.linspace(-10, 300, 40).astype(np.float32), lambda v: np.clip(np.round(v), 0, 255)),  # float 0..255
])
def test_32_bit_integer_and_float_tiffs_keep_their_shades(values, expected):
    """PIL's convert("RGB") of a 32-bit integer ("I") or float ("F") image clips each value
    to 0..255: a 32-bit or 16-bit ramp went white past its first shades, a [0, 1] float one
    black. Integers now keep their top 8 bits, as a 16-bit image does; floats in [0, 1] scale to 0..255."""
    buffer = io.BytesIO()
    shades = np.tile(values, (6, 1))
    Image.fromarray(shades).save(buffer, format="TIFF")
    assert Image.open(io.BytesIO(buffer.getvalue())).mode == ("I" if values.dtype == np.int32 else "F")
    want = np.repeat(expected(shades.astype(np.float64 if values.dtype == np.float32 else np.int64))[..., None], 3, 2)
    np.testing.assert_array_equal(_pixels(buffer.getvalue()), want.astype(np.uint8))


def test_an_image_too_wide_for_jpeg_is_stored_as_png(tmp_path):
    """A BMP 65600 px wide (a panorama strip) re-encoded as JPEG made PIL raise OSError
    (JPEG holds at most 65500 px a side), which ended the whole run; it is stored as PNG."""
    folder, out = tmp_path / "images", tmp_path / "out"
    _image(str(folder / "strip.bmp"), size=(65600, 2), seed=1, fmt="BMP")
    _write(str(folder / "strip.txt"), "a very wide strip")
    _image(str(folder / "ok.jpg"), seed=2)
    _write(str(folder / "ok.txt"), "an ordinary image")
    assert _run("--source=folder", f"--input={folder}", f"--out={out}", "--num_workers=1") == 0
    stored = _read(out)["strip.bmp"]["image"]
    assert Image.open(io.BytesIO(stored)).format == "PNG"
    with open(folder / "strip.bmp", "rb") as f:
        np.testing.assert_array_equal(_pixels(stored), _pixels(f.read()))
    assert _summary(out)["records"] == 2


def _sidecar_folder(folder, n):
    for i in range(n):
        _image(str(folder / f"{i // 4:02d}" / f"{i:04d}.{'png' if i % 3 else 'jpg'}"), seed=i)
        _write(str(folder / f"{i // 4:02d}" / f"{i:04d}.txt"), f"caption number {i}")


def test_output_is_byte_identical_whatever_the_workers(tmp_path):
    folder = tmp_path / "images"
    _sidecar_folder(folder, 10)
    _image(str(folder / "02" / "odd.bmp"), seed=99, fmt="BMP")
    _write(str(folder / "02" / "odd.txt"), "a bmp")
    for name, workers in (("a", 1), ("b", 2)):
        assert _run("--source=folder", f"--input={folder}", f"--out={tmp_path / name}", "--num_shards=3",
                    f"--num_workers={workers}") == 0
    for path in records.shard_paths(str(tmp_path / "a"), "train"):
        with open(path, "rb") as a, open(str(tmp_path / "b" / os.path.basename(path)), "rb") as b:
            assert a.read() == b.read()
    assert len(_read(tmp_path / "b")) == 11


def test_shards_feed_the_tokenizer_pipeline(tmp_path):
    """The tokenizer trainer finds the shards (`data.train_dir` / `train_prefix`) and its
    train and eval pipelines read them (the decoder and pretokenize read the same)."""
    from seed_jax.trainers import tokenizer as tokenizer_trainer

    folder, out = tmp_path / "images", tmp_path / "out"
    _sidecar_folder(folder, 12)
    for prefix in ("cc_train", "cc_eval"):
        assert _run("--source=folder", f"--input={folder}", f"--out={out}", f"--prefix={prefix}", "--num_shards=2",
                    "--num_workers=1") == 0
    data = ml_collections.ConfigDict(dict(source="array_record", train_dir=str(out), train_prefix="cc_train",
                                          eval_dir=str(out), eval_prefix="cc_eval"))
    train, evals = tokenizer_trainer.dataset_paths(ml_collections.ConfigDict(dict(data=data)), str(tmp_path))
    assert [os.path.basename(p) for p in train] == ["cc_train-00000-of-00002.array_record",
                                                    "cc_train-00001-of-00002.array_record"]
    wordpiece = text.grammar_wordpiece(synthetic.caption_vocabulary())
    pad = wordpiece.token_to_id("[PAD]")
    example = pipeline.Example(16, text.TextTokenizer(wordpiece, 8, pad), text.TextTokenizer(wordpiece, 77, pad),
                               pipeline.SkipCounter())
    batch = next(pipeline.train_iterator(train, example, global_batch_size=4, seed=0, num_threads=1))
    assert batch["image"].shape == (4, 16, 16, 3)
    batches = pipeline.eval_batches(evals, example, num_examples=12, global_batch_size=8, num_threads=1)
    assert sorted(int(i) for b in batches for i in b["index"] if i >= 0) == list(range(12))
    assert example.skipped.count == 0


@pytest.mark.parametrize("flags, message", [
    (["--source=folder"], "--input is required"),
    (["--source=folder", "--input={folder}", "--num_shards=0"], "--num_shards=0"),
    # written as train-00000-of-100000.array_record, which no reader found
    (["--source=folder", "--input={folder}", "--num_shards=100000"], "--num_shards=100000: expected at most 99999"),
    (["--source=folder", "--input={folder}", "--resize=-3"], "--resize=-3"),
    (["--source=folder", "--input={folder}", "--name=coco_captions"], "--name is a flag of --source=tfds"),
    (["--source=tfds", "--input={folder}", "--name=coco_captions"], "--input is a flag of --source=folder"),
    (["--source=tfds", "--splits=train", "--name=coco_captions"], "--splits is a flag of --source=folder, not of "
     "--source=tfds; did you mean --split, the TFDS split to read (e.g. --split=train)?"),
    (["--source=tfds"], "--name is required"),
    (["--source=folder", "--input={folder}/nowhere"], "--input"),
    (["--source=folder", "--input={folder}", "--captions={folder}/0000.txt"], "--captions"),
    (["--source=folder", "--input={folder}", "--prefix=a/b"], "--prefix"),
])
def test_bad_flags_fail_naming_the_flag(tmp_path, capsys, flags, message):
    folder = tmp_path / "images"
    _sidecar_folder(folder, 1)
    assert _run(*[f.format(folder=folder) for f in flags], f"--out={tmp_path / 'out'}") == 1
    assert message in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("out", ["{file}", "{file}/sub"])
def test_an_out_that_cannot_be_a_folder_fails_naming_it(tmp_path, capsys, out):
    """--out naming a file, or a folder below one: the error said only "error: 17" (the
    errno of makedirs' FileExistsError) or "error: 20"."""
    folder, file = tmp_path / "images", tmp_path / "notes.txt"
    _sidecar_folder(folder, 1)
    _write(str(file), "a file")
    assert _run("--source=folder", f"--input={folder}", f"--out={out.format(file=file)}", "--num_workers=1") == 1
    assert re.search(r"--out: .*notes.txt.* a file", capsys.readouterr().err)


def test_an_out_that_is_a_link_to_nothing_fails_naming_it(tmp_path, capsys):
    """A dangling symlink as --out (makedirs cannot replace it) said only "error: 17"."""
    folder, out = tmp_path / "images", tmp_path / "out"
    _sidecar_folder(folder, 1)
    os.symlink(tmp_path / "gone", out)
    assert _run("--source=folder", f"--input={folder}", f"--out={out}", "--num_workers=1") == 1
    assert re.search(r"--out: .*out.* a link to the missing .*gone", capsys.readouterr().err)


def test_a_system_error_is_said_whole_not_as_its_errno(tmp_path, capsys, monkeypatch):
    """main printed args[0] of the errors it caught: for an OSError from the system, its
    errno ("error: 13"); a PermissionError was not caught at all (a traceback)."""
    def refused(argv):
        raise PermissionError(13, "Permission denied", str(tmp_path / "out"))

    monkeypatch.setattr(make_records, "make_records", refused)
    assert _run("--source=folder") == 1
    assert re.search(r"error: .*Permission denied: .*out", capsys.readouterr().err)


def test_existing_shards_are_refused_unless_overwrite(tmp_path, capsys):
    folder, out = tmp_path / "images", tmp_path / "out"
    _sidecar_folder(folder, 3)
    assert _run("--source=folder", f"--input={folder}", f"--out={out}", "--num_shards=2", "--num_workers=1") == 0
    assert _run("--source=folder", f"--input={folder}", f"--out={out}", "--num_shards=3", "--num_workers=1") == 1
    assert "--overwrite" in capsys.readouterr().err
    assert len(records.shard_paths(str(out), "train")) == 2  # untouched
    assert _run("--source=folder", f"--input={folder}", f"--out={out}", "--num_shards=3", "--num_workers=1",
                "--overwrite") == 0
    assert len(records.shard_paths(str(out), "train")) == 3 and len(_read(out)) == 3  # the set of 2 is gone


def test_a_folder_with_no_usable_record_writes_nothing(tmp_path, capsys):
    folder, out = tmp_path / "images", tmp_path / "out"
    _write(str(folder / "x.jpg"), "not an image")
    _write(str(folder / "x.txt"), "a caption")
    assert _run("--source=folder", f"--input={folder}", f"--out={out}", "--num_workers=1") == 1
    assert "no records" in capsys.readouterr().err
    assert records.existing_shards(str(out), "train") == [] and os.listdir(out) == []


def _tiny_tfds_dataset(data_dir):
    """A coco_captions-shaped dataset (image, image/id, captions {id, text}) prepared in the
    array_record format without TensorFlow: images are given encoded, so no TF encoder runs."""
    tfds = pytest.importorskip("tensorflow_datasets")

    class CocoCaptions(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.1.0")
        BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="2014")]

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(encoding_format="jpeg"), "image/id": np.int64,
                "captions": tfds.features.Sequence({"text": tfds.features.Text(), "id": np.int64})}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(3), "val": self._generate_examples(1)}

        def _generate_examples(self, n):
            for i in range(n):
                data = _image(os.path.join(data_dir, "src", f"{i}.jpg"), seed=i)
                texts = [f"picture {i} caption {k}" for k in range(2)] + ([""] if i == 2 else [])
                yield i, {"image": data, "image/id": 100 + i,
                          "captions": {"text": texts, "id": [10 * i + k for k in range(len(texts))]}}

    CocoCaptions(data_dir=data_dir, file_format="array_record").download_and_prepare()


def test_tfds_dataset_gives_a_record_per_caption(tmp_path):
    data_dir, out = str(tmp_path / "tfds"), tmp_path / "out"
    _tiny_tfds_dataset(data_dir)
    assert _run("--source=tfds", "--name=coco_captions/2014", "--split=train", f"--data_dir={data_dir}",
                "--id_key=image/id", f"--out={out}", "--num_workers=1") == 0
    got = _read(out)
    assert {k: v["caption"] for k, v in got.items()} == {
        f"{100 + i}{'#1' if k else ''}": f"picture {i} caption {k}" for i in range(3) for k in range(2)}
    with open(os.path.join(data_dir, "src", "1.jpg"), "rb") as f:
        assert got["101#1"]["image"] == f.read()  # the encoded JPEG as the dataset holds it
    assert _summary(out)["skipped"]["empty_caption"] == 1
    assert _run("--source=tfds", "--name=coco_captions", "--split=val", f"--data_dir={data_dir}",
                f"--out={out}", "--prefix=eval", "--num_workers=1") == 0
    assert sorted(_read(out, "eval")) == ["val/0", "val/0#1"]


def test_paths_under_the_home_directory(tmp_path, monkeypatch):
    """--input, --captions, --data_dir and --out=~/x (a shell leaves a ~ after = as it is)
    named a folder "~" in the current directory; `~` is now the home directory."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    _image(str(tmp_path / "images" / "x.jpg"), seed=1)
    _write(str(tmp_path / "captions.jsonl"), json.dumps({"image": "x.jpg", "caption": "a cat"}) + "\n")
    assert _run("--source=folder", "--input=~/images", "--captions=~/captions.jsonl", "--out=~/out",
                "--num_workers=1") == 0
    assert [r["caption"] for r in _read(tmp_path / "out").values()] == ["a cat"]
    _tiny_tfds_dataset(str(tmp_path / "tfds"))
    assert _run("--source=tfds", "--name=coco_captions", "--split=val", "--data_dir=~/tfds", "--out=~/out",
                "--prefix=eval", "--num_workers=1") == 0
    assert sorted(_read(tmp_path / "out", "eval")) == ["val/0", "val/0#1"]
    assert not os.path.exists(tmp_path / "~")


@pytest.mark.parametrize("flag, message", [("--image_key=captions", "--image_key='captions': expected an Image"),
                                           ("--caption_key=caption", "--caption_key='caption': no feature"),
                                           ("--caption_key=captions/id", "--caption_key='captions/id': expected a "
                                            "text feature"),
                                           ("--id_key=captions/id", "--id_key='captions/id': a feature inside a "
                                            "Sequence"),
                                           ("--split=test", "--split='test'"),
                                           ("--name=coco", "--name='coco'")])
def test_tfds_bad_flags_name_the_flag(tmp_path, capsys, flag, message):
    data_dir = str(tmp_path / "tfds")
    _tiny_tfds_dataset(data_dir)
    argv = {"--name": "--name=coco_captions", "--split": "--split=train"}
    argv[flag.split("=")[0]] = flag
    assert _run("--source=tfds", f"--data_dir={data_dir}", f"--out={tmp_path / 'out'}", *argv.values()) == 1
    assert message in capsys.readouterr().err


def _tfds_info_file(data_dir):
    return os.path.join(data_dir, "coco_captions", "2014", "1.1.0", "dataset_info.json")


def _set_file_formats(data_dir, file_format, alternatives):
    """Rewrites the dataset's recorded file formats, as `tfds convert_format` (in place) leaves them."""
    with open(_tfds_info_file(data_dir)) as f:
        info = json.load(f)
    info["fileFormat"], info["alternativeFileFormats"] = file_format, alternatives
    with open(_tfds_info_file(data_dir), "w") as f:
        json.dump(info, f)


def test_tfds_dataset_converted_to_array_record_is_read(tmp_path, capsys):
    """A dataset built as tfrecord (tfds's default) and given array_record files by
    `tfds convert_format` records array_record as an alternative format: it was refused
    as "prepared as tfrecord"."""
    data_dir, out = str(tmp_path / "tfds"), tmp_path / "out"
    _tiny_tfds_dataset(data_dir)
    _set_file_formats(data_dir, "tfrecord", ["array_record"])
    assert _run("--source=tfds", "--name=coco_captions", f"--data_dir={data_dir}", f"--out={out}",
                "--num_workers=1") == 0
    assert len(_read(out)) == 6
    _set_file_formats(data_dir, "tfrecord", [])
    assert _run("--source=tfds", "--name=coco_captions", f"--data_dir={data_dir}", f"--out={out}",
                "--overwrite", "--num_workers=1") == 1
    err = capsys.readouterr().err
    assert "--name='coco_captions': prepared as tfrecord" in err
    assert (f"tfds convert_format --dataset_version_dir={os.path.dirname(_tfds_info_file(data_dir))} "
            "--out_file_format=array_record") in err


@pytest.mark.parametrize("damage", ["removed", "truncated"])
def test_tfds_unreadable_examples_are_skipped_and_counted(tmp_path, damage):
    """An example whose file is missing or corrupt raised tfds's RuntimeError (a traceback:
    not an error `main` reports); it is skipped and counted, as an undecodable image is."""
    data_dir, out = str(tmp_path / "tfds"), tmp_path / "out"
    _tiny_tfds_dataset(data_dir)
    (val_file,) = [os.path.join(os.path.dirname(_tfds_info_file(data_dir)), name)
                   for name in os.listdir(os.path.dirname(_tfds_info_file(data_dir))) if "-val.array_record" in name]
    if damage == "removed":
        os.remove(val_file)
    else:
        os.truncate(val_file, os.path.getsize(val_file) // 2)
    assert _run("--source=tfds", "--name=coco_captions", "--split=train+val", f"--data_dir={data_dir}",
                f"--out={out}", "--num_workers=1") == 0
    assert sorted(_read(out)) == sorted(f"train+val/{i}{'#1' if k else ''}" for i in range(3) for k in range(2))
    summary = _summary(out)
    assert summary["skipped"]["unreadable_example"] == 1
    assert summary["skipped_ids"]["unreadable_example"] == ["train+val/3"]


def test_tfds_ids_that_are_not_utf8_are_written_as_escapes(tmp_path, capsys):
    r"""A text id feature whose bytes are not UTF-8 (a Latin-1 file name) ended the run in a
    TypeError traceback (its first record's id was bytes); it is written with those bytes as
    \xNN, as a folder's file names are."""
    tfds = pytest.importorskip("tensorflow_datasets")
    data_dir, out = str(tmp_path / "tfds"), tmp_path / "out"

    class Named(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(encoding_format="jpeg"), "name": tfds.features.Text(),
                "captions": tfds.features.Sequence(tfds.features.Text())}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i, name in enumerate([b"plain.jpg", b"caf\xe9.jpg"]):
                yield i, {"image": _image(os.path.join(data_dir, "src", f"{i}.jpg"), seed=i), "name": name,
                          "captions": [f"picture {i}", f"picture {i} again"]}

    Named(data_dir=data_dir, file_format="array_record").download_and_prepare()
    assert _run("--source=tfds", "--name=named", "--caption_key=captions", "--id_key=name", f"--data_dir={data_dir}",
                f"--out={out}", "--num_workers=1") == 0, capsys.readouterr()
    assert {k: v["caption"] for k, v in _read(out).items()} == {
        "plain.jpg": "picture 0", "plain.jpg#1": "picture 0 again",
        "caf\\xe9.jpg": "picture 1", "caf\\xe9.jpg#1": "picture 1 again"}


def _tiny_tfds_frames_dataset(data_dir):
    """A dataset with an image and several more an example (a Sequence of Images), and a
    list of tags (empty in one example), prepared as array_record."""
    tfds = pytest.importorskip("tensorflow_datasets")

    class Frames(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(encoding_format="png"),
                "frames": tfds.features.Sequence({"image": tfds.features.Image(encoding_format="png")}),
                "caption": tfds.features.Text(), "tags": tfds.features.Sequence(tfds.features.Text())}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i in range(2):
                frames = [_image(os.path.join(data_dir, "src", f"{i}-{k}.png"), seed=k, fmt="PNG") for k in range(2)]
                yield i, {"image": frames[0], "frames": {"image": frames}, "caption": f"clip {i}",
                          "tags": ["a"] if i else []}

    Frames(data_dir=data_dir, file_format="array_record").download_and_prepare()


@pytest.mark.parametrize("flags, message", [
    (["--image_key=frames/image"], "--image_key='frames/image': a feature inside a Sequence"),
    (["--id_key=tags"], "--id_key='tags': a feature inside a Sequence"),
])
def test_tfds_several_values_an_example_are_refused(tmp_path, capsys, flags, message):
    """An image key or id key naming a list (a tfds Sequence) raised an AttributeError or
    an IndexError from deep inside the reading (tracebacks); it is refused naming the flag."""
    data_dir = str(tmp_path / "tfds")
    _tiny_tfds_frames_dataset(data_dir)
    assert _run("--source=tfds", "--name=frames", "--caption_key=caption", f"--data_dir={data_dir}",
                f"--out={tmp_path / 'out'}", "--num_workers=1", *flags) == 1
    assert message in capsys.readouterr().err
