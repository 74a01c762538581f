"""The tokenizer feature probe: labels round-trip to captions, and probes fit and score."""

import os

import numpy as np

from seed_jax.data import synthetic
from seed_jax.evaluators import feature_probe


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
