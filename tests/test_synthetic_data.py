"""Tests for the shapes-world generator and the ArrayRecord record format."""

import io
import os
import re

import numpy as np
import pytest
from array_record.python import array_record_data_source
from PIL import Image

from seed_jax.data import records, synthetic

_OBJECT_PHRASE = re.compile(
    r"a (?P<size>\w+) (?P<colour>\w+) (?P<shape>\w+) (?P<position>(at|on|in) the [\w ]+)"
)


def _scenes(count, seed=0):
    rng = np.random.default_rng(seed)
    return [synthetic.sample_scene(rng) for _ in range(count)]


def test_make_example_is_deterministic():
    first = synthetic.make_example(3, seed=7, image_size=64)
    assert first == synthetic.make_example(3, seed=7, image_size=64)
    assert first["id"] == "shapes-7-0000003"
    other = synthetic.make_example(4, seed=7, image_size=64)
    assert other["image"] != first["image"]
    assert other["id"] != first["id"]
    assert synthetic.make_example(3, seed=8, image_size=64)["image"] != first["image"]


def test_captions_follow_the_grammar_and_cover_it():
    vocabulary = set(synthetic.caption_vocabulary())
    seen = {"size": set(), "colour": set(), "shape": set(), "position": set(), "count": set()}
    for scene in _scenes(600):
        text = synthetic.caption(scene)
        assert set(text.split()) <= vocabulary, text
        phrases = text.split(" and ")
        assert len(phrases) == len(scene.objects)
        for phrase, obj in zip(phrases, scene.objects):
            match = _OBJECT_PHRASE.fullmatch(phrase)
            assert match, phrase
            assert match["size"] == obj.size and match["colour"] == obj.colour
            assert match["shape"] == obj.shape
            assert match["position"] == synthetic.POSITIONS[obj.cell]
            for key in ("size", "colour", "shape", "position"):
                seen[key].add(match[key])
        seen["count"].add(len(scene.objects))
    assert seen["size"] == set(synthetic.SIZES)
    assert seen["colour"] == set(synthetic.COLOURS) and len(synthetic.COLOURS) == 8
    assert seen["shape"] == set(synthetic.SHAPES) and len(synthetic.SHAPES) >= 6
    assert seen["position"] == set(synthetic.POSITIONS) and len(synthetic.POSITIONS) == 9
    assert seen["count"] == {1, 2}


def test_caption_example():
    scene = synthetic.Scene(
        objects=(
            synthetic.SceneObject("circle", "red", "large", 0),
            synthetic.SceneObject("star", "blue", "small", 4),
        ),
        background_style="plain",
        background_tones=synthetic.BACKGROUND_TONES[:2],
    )
    assert synthetic.caption(scene) == (
        "a large red circle at the top left and a small blue star in the centre"
    )


@pytest.mark.parametrize("text", [
    "a large red circle",  # no position
    "a huge red circle at the top",  # unknown size
    "a small blue star at the top and",  # dangling conjunction
    "a small blue star in the centre and a large red circle at the top",  # cells out of reading order
    "the small blue star at the top",
])
def test_parse_caption_rejects_text_off_the_grammar(text):
    assert synthetic.parse_caption(text) is None


def test_parse_caption_inverts_caption():
    for scene in _scenes(600, seed=3):
        assert synthetic.parse_caption(synthetic.caption(scene)) == scene.objects


def test_objects_are_in_distinct_cells_in_reading_order():
    for scene in _scenes(2000, seed=1):
        cells = [obj.cell for obj in scene.objects]
        assert cells == sorted(set(cells))
        assert all(0 <= cell < 9 for cell in cells)


@pytest.mark.parametrize("size", ["small", "large"])
@pytest.mark.parametrize("cell", [0, 4, 8])
def test_objects_stay_inside_their_cell(size, cell):
    image_size = 64
    for seed in range(10):
        scene = synthetic.Scene(
            objects=(synthetic.SceneObject("square", "white", size, cell),),
            background_style="plain",
            background_tones=synthetic.BACKGROUND_TONES[:2],
        )
        pixels = synthetic.render(scene, image_size, np.random.default_rng(seed))
        background = np.array(synthetic.BACKGROUND_TONES[0])
        rows, cols = np.nonzero(np.abs(pixels.astype(int) - background).max(axis=-1) > 8)
        row, col = divmod(cell, 3)
        cell_side = image_size / 3
        assert rows.min() >= row * cell_side and rows.max() < (row + 1) * cell_side
        assert cols.min() >= col * cell_side and cols.max() < (col + 1) * cell_side


@pytest.mark.parametrize("image_size", [64, 48])
def test_images_decode_to_rgb_uint8(image_size):
    for index in range(5):
        example = synthetic.make_example(index, seed=0, image_size=image_size)
        pixels = np.asarray(Image.open(io.BytesIO(example["image"])))
        assert pixels.shape == (image_size, image_size, 3)
        assert pixels.dtype == np.uint8


def test_record_round_trip():
    record = {"image": b"\x89PNG\x00\xffdata", "caption": "un cercle rouge é", "id": "x-1"}
    decoded = records.decode_record(records.encode_record(record))
    assert decoded == record
    assert isinstance(decoded["image"], bytes)


@pytest.mark.parametrize(
    "corrupt",
    [
        pytest.param(lambda data: b"", id="empty"),
        pytest.param(lambda data: data[:3], id="no-header-length"),
        pytest.param(lambda data: data[:20], id="truncated-header"),
        pytest.param(lambda data: data[:-1], id="truncated-image"),
        pytest.param(lambda data: data + b"x", id="trailing-byte"),
        pytest.param(lambda data: data[:-1] + bytes([data[-1] ^ 1]), id="flipped-image-bit"),
        pytest.param(lambda data: data[:4] + b"\xff" + data[5:], id="header-not-utf8"),
        pytest.param(lambda data: data.replace(b'"caption"', b'"captiom"'), id="missing-field"),
        pytest.param(lambda data: b"\xff\xff\xff\xff" + data[4:], id="huge-header-length"),
        pytest.param(lambda data: b"garbage bytes that are not a record", id="garbage"),
    ],
)
def test_decode_record_rejects_corrupt_bytes(corrupt):
    data = records.encode_record({"image": b"image-bytes", "caption": "c", "id": "i"})
    with pytest.raises(ValueError, match="corrupt record"):
        records.decode_record(corrupt(data))


def test_shards_round_trip_through_array_record(tmp_path):
    examples = [synthetic.make_example(i, seed=1, image_size=32) for i in range(11)]
    paths = records.write_array_record_shards(examples, str(tmp_path), "train", num_shards=3)
    assert [os.path.basename(p) for p in paths] == [
        f"train-0000{i}-of-00003.array_record" for i in range(3)
    ]
    assert records.shard_paths(str(tmp_path), "train") == paths
    source = array_record_data_source.ArrayRecordDataSource(paths)
    assert len(source) == len(examples)
    read = [records.decode_record(source[i]) for i in range(len(source))]
    # Round-robin: shard k holds examples k, k + 3, ...
    expected = [examples[i] for shard in range(3) for i in range(shard, len(examples), 3)]
    assert read == expected


def test_rewriting_with_fewer_shards_removes_old_ones(tmp_path):
    examples = [synthetic.make_example(i, seed=1, image_size=32) for i in range(4)]
    records.write_array_record_shards(examples, str(tmp_path), "eval", num_shards=4)
    paths = records.write_array_record_shards(examples, str(tmp_path), "eval", num_shards=2)
    assert records.shard_paths(str(tmp_path), "eval") == paths


def test_interrupted_write_leaves_no_shards(tmp_path):
    def failing_records():
        yield synthetic.make_example(0, seed=1, image_size=32)
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        records.write_array_record_shards(failing_records(), str(tmp_path), "train", 2)
    assert os.listdir(tmp_path) == []
    with pytest.raises(FileNotFoundError, match="train"):
        records.shard_paths(str(tmp_path), "train")


def test_shapes_dataset_cache_and_splits(tmp_path):
    settings = dict(num_examples=12, seed=5, image_size=32, num_shards=2, num_workers=1)
    train = synthetic.write_shapes_dataset(str(tmp_path), split="train", **settings)
    eval_ = synthetic.write_shapes_dataset(str(tmp_path), split="eval", **settings)
    assert os.path.exists(tmp_path / "train.json")
    mtimes = [os.stat(p).st_mtime_ns for p in train]

    assert synthetic.write_shapes_dataset(str(tmp_path), split="train", **settings) == train
    assert [os.stat(p).st_mtime_ns for p in train] == mtimes

    def read(paths):
        source = array_record_data_source.ArrayRecordDataSource(paths)
        return [records.decode_record(source[i]) for i in range(len(source))]

    train_records, eval_records = read(train), read(eval_)
    assert len(train_records) == len(eval_records) == 12
    assert not {r["id"] for r in train_records} & {r["id"] for r in eval_records}
    assert not {r["image"] for r in train_records} & {r["image"] for r in eval_records}

    changed = synthetic.write_shapes_dataset(
        str(tmp_path), split="train", **{**settings, "num_examples": 14}
    )
    assert len(read(changed)) == 14


def test_parallel_generation_matches_sequential():
    count = 600  # two work units, so two worker processes are used
    parallel = list(synthetic.generate_examples(count, seed=2, image_size=16, num_workers=2))
    assert parallel == [synthetic.make_example(i, seed=2, image_size=16) for i in range(count)]
