"""Feature probes (labels round-trip to captions; probes fit and score) and a ViT trained on the labels."""

import os

import grain
import numpy as np

from helpers import write_with_a_damaged_record
from seed_jax.data import records, synthetic
from seed_jax.evaluators import feature_probe, vit_from_labels


def test_cell_labels_round_trip_to_captions():
    rng = np.random.default_rng(1)
    captions = [synthetic.caption(synthetic.sample_scene(rng)) for _ in range(300)]
    labels = feature_probe.cell_labels(captions)
    assert labels.shape == (300, 9) and labels.max() < feature_probe.NUM_LABELS
    assert [feature_probe.labels_caption(row) for row in labels] == captions
    assert ((labels > 0).sum(1) >= 1).all()


def test_probes_fit_their_training_images_and_score_held_out_ones(tiny_decoder_run):
    results = feature_probe.probe_run(os.path.join(tiny_decoder_run, "tokenizer"), ("vit_features", "quantized"),
                                      num_train=256, num_eval=64, epochs=60)
    assert set(results) == {"vit_features", "quantized"}
    for splits in results.values():
        assert set(splits["eval"]) >= {"exact_match", "grammatical", "cell_recall"}
        assert all(0 <= v <= 1 for v in splits["eval"].values())
    # A probe with 512 hidden units memorises 256 training images from the ViT's features.
    assert results["vit_features"]["train"]["exact_match"] > 0.9


def test_more_training_images_extend_the_runs_own(tiny_decoder_run, tmp_path):
    run = os.path.join(tiny_decoder_run, "tokenizer")
    own = feature_probe.training_shards(run, 256)
    assert own == records.shard_paths(os.path.join(run, "data"), "train")
    extended = feature_probe.training_shards(run, 300, str(tmp_path))
    own_records = grain.sources.ArrayRecordDataSource(own)
    extended_records = grain.sources.ArrayRecordDataSource(extended)
    assert (len(own_records), len(extended_records)) == (256, 300)
    by_id = lambda source: {r["id"]: (r["caption"], r["image"])  # noqa: E731
                            for r in (records.decode_record(source[i]) for i in range(len(source)))}
    own_examples, extended_examples = by_id(own_records), by_id(extended_records)
    assert set(own_examples) < set(extended_examples)
    assert all(extended_examples[k] == v for k, v in own_examples.items())  # the same images, unchanged


def test_a_vit_trained_on_the_labels_fits_its_training_images(tiny_decoder_run):
    results = vit_from_labels.run(os.path.join(tiny_decoder_run, "tokenizer"), steps=200, batch_size=32, lr=3e-3,
                                  num_train=256, num_eval=64)
    assert set(results["eval"]) >= {"exact_match", "grammatical", "shape_accuracy"}
    assert all(0 <= v <= 1 for v in results["eval"].values())
    # The tiny ViT learns 256 images' captions from their labels in 200 steps (0.99 measured).
    assert results["train"]["exact_match"] > 0.9


def test_more_training_images_are_not_written_over_the_runs_data_or_other_shards(tiny_decoder_run, tmp_path,
                                                                                 monkeypatch):
    """`--extra_data_dir` naming the run's own data folder rewrote its training split; naming
    a folder of other `train` shards (real data) replaced them, deleting those its shard count
    left over. Both are refused, naming the flag, before the run's export loads."""
    import types

    import pytest
    from absl import app

    from seed_jax import api

    run = os.path.join(tiny_decoder_run, "tokenizer")
    theirs = str(tmp_path / "theirs")
    records.write_array_record_shards([{"image": b"x", "caption": "a real caption", "id": "a.jpg"}] * 3, theirs,
                                      "train", 3)
    before = {path: open(path, "rb").read() for path in records.existing_shards(theirs, "train")}
    run_data = {path: os.path.getmtime(path) for path in records.existing_shards(os.path.join(run, "data"), "train")}
    monkeypatch.setattr(api.SeedTokenizer, "load", lambda *args, **kwargs: pytest.fail("the export loaded"))
    for folder, message in [(os.path.join(run, "data"), "is the run's own data folder"),
                            (theirs, "holds 'train' shards the shapes world did not write")]:
        with pytest.raises(ValueError, match=f"^extra_data_dir: .*{message}"):
            feature_probe.training_shards(run, 300, folder)
        monkeypatch.setattr(feature_probe, "FLAGS", types.SimpleNamespace(
            tokenizer_workdir=run, intermediates=["quantized"], num_train=300, epochs=1, out="",
            extra_data_dir=folder))
        with pytest.raises(app.UsageError, match=f"^--extra_data_dir: .*{message}"):
            feature_probe.main(["feature_probe"])
    assert {path: open(path, "rb").read() for path in records.existing_shards(theirs, "train")} == before
    assert {path: os.path.getmtime(path)
            for path in records.existing_shards(os.path.join(run, "data"), "train")} == run_data


def test_read_split_skips_a_record_damaged_on_disk(tmp_path):
    """A record whose chunk fails its checksum raised a RuntimeError that ended the probe."""
    path = str(tmp_path / "damaged.array_record")
    write_with_a_damaged_record(path, [records.encode_record(synthetic.make_example(i, 0, 16)) for i in range(3)], 1)
    pixels, captions = feature_probe.read_split([path], 3, 16)
    assert pixels.shape == (2, 16, 16, 3) and captions == [synthetic.make_example(i, 0, 16)["caption"] for i in (0, 2)]
