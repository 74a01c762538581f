"""Caption swaps: one part of one object changes, win rates count, a tiny run scores."""

import json
import os
import shutil

import numpy as np
import pytest

from seed_jax import api
from seed_jax.data import synthetic
from seed_jax.evaluators import caption_swaps


@pytest.mark.parametrize("part", caption_swaps.PARTS)
def test_swap_part_changes_that_part_of_one_object(part):
    rng = np.random.default_rng(0)
    for _ in range(300):
        objects = synthetic.sample_scene(rng).objects
        swapped = caption_swaps.swap_part(objects, part, rng)
        assert synthetic.parse_caption(synthetic.objects_caption(swapped)) == swapped  # cells distinct, in order
        (old,), (new,) = set(objects) - set(swapped), set(swapped) - set(objects)
        assert [p for p in caption_swaps.PARTS if getattr(old, p) != getattr(new, p)] == [part]
    with pytest.raises(ValueError, match="part"):
        caption_swaps.swap_part(objects, "texture", rng)


def test_own_caption_wins_counts_rows_closer_to_their_caption():
    image = np.eye(4)
    caption = np.eye(4) * np.array([[1.0], [0.5], [0.2], [0.0]])
    swapped = np.eye(4) * 0.3
    assert caption_swaps.own_caption_wins(image, caption, swapped) == 0.5


def test_scores_a_tiny_run_and_names_unsuitable_runs(tiny_decoder_run, tmp_path, monkeypatch):
    def no_tokenization(*args, **kwargs):
        raise AssertionError("scoring needs the stage-I features alone (SeedTokenizer.image_features), not codes")

    monkeypatch.setattr(api.SeedTokenizer, "encode", no_tokenization)
    scores = caption_swaps.score_run(os.path.join(tiny_decoder_run, "tokenizer"), num_examples=64)
    assert set(scores) == set(caption_swaps.PARTS) and all(0 <= v <= 1 for v in scores.values())
    (tmp_path / "config.json").write_text(json.dumps({"data": {"source": "array_record"}}))
    with pytest.raises(ValueError, match="shapes world"):
        caption_swaps.score_run(str(tmp_path))


def test_a_finished_run_without_an_export_is_exported_first(tiny_decoder_run, tmp_path):
    """The quick start's tokenizer run has no export/ until a trainer built on it runs."""
    run = str(tmp_path / "tokenizer")  # a copy: other tests, in other workers too, read the shared run's export
    shutil.copytree(os.path.join(tiny_decoder_run, "tokenizer"), run)
    shutil.rmtree(os.path.join(run, "export"))
    scores = caption_swaps.score_run(run, num_examples=32)
    assert os.path.exists(os.path.join(run, "export", "model.json"))
    assert set(scores) == set(caption_swaps.PARTS)


def test_a_missing_or_unfinished_run_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer_workdir: .* holds no tokenizer run"):
        caption_swaps.score_run(str(tmp_path / "absent"))
    (tmp_path / "config.json").write_text(json.dumps({"data": {"source": "synthetic"}}))
    with pytest.raises(ValueError, match="tokenizer_workdir: .* no finished tokenizer run"):
        caption_swaps.score_run(str(tmp_path))
