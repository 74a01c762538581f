"""Query redundancy: R^2 of one query from another, code sharing between positions, a tiny run."""

import os

import grain
import numpy as np
import pytest

from seed_jax.data import records
from seed_jax.evaluators import query_redundancy


def test_r2_is_near_one_for_a_linear_copy_and_near_zero_for_independent_queries():
    rng = np.random.default_rng(0)
    last = rng.normal(size=(2000, 8))
    copy = last @ rng.normal(size=(8, 8)) + 0.01 * rng.normal(size=(2000, 8)) + 5.0  # offset: centring
    independent = rng.normal(size=(2000, 8))
    r2 = query_redundancy.r2_from_query(np.stack([copy, independent, last], axis=1))
    assert r2[0] > 0.99 and abs(r2[1]) < 0.05 and r2[2] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="features: 12 rows"):
        query_redundancy.r2_from_query(np.zeros((12, 3, 8)))


def test_code_sharing_counts_codes_per_position_and_positions_per_code():
    codes = np.array([[0, 5, 7], [1, 5, 7], [0, 6, 0]])
    sharing = query_redundancy.code_sharing(codes)
    # code 0 is chosen at positions 0 and 2; codes 1, 5, 6 and 7 at one position each.
    assert sharing == {"codes_used": [2, 2, 2], "positions_per_code": {1: 4, 2: 1}}


def test_measures_a_tiny_run(tiny_decoder_run):
    tokenizer = os.path.join(tiny_decoder_run, "tokenizer")
    result = query_redundancy.measure(os.path.join(tokenizer, "export"), os.path.join(tokenizer, "data"),
                                      "train", num_examples=256)
    assert result["num_examples"] == 256 and len(result["r2_from_last"]) == 32
    assert result["r2_from_last"][-1] == pytest.approx(1.0)
    assert len(result["codes_used"]) == 32
    assert sum(k * v for k, v in result["positions_per_code"].items()) == sum(result["codes_used"])


def test_an_image_of_several_caption_records_is_measured_once(tiny_decoder_run, tmp_path):
    """A split with a record per caption (make_records' COCO shards: `id`, `id#1`, ...)
    encoded each image once per caption, so held-out rows repeated fitted ones and R^2
    read high; each image now counts once, as in a split of a record per image."""
    tokenizer = os.path.join(tiny_decoder_run, "tokenizer")
    data, export = os.path.join(tokenizer, "data"), os.path.join(tokenizer, "export")
    source = grain.sources.ArrayRecordDataSource(records.shard_paths(data, "eval"))
    by_caption = [{**record, "id": record["id"] + suffix, "caption": record["caption"] + suffix}
                  for record in (records.decode_record(source[i]) for i in range(len(source)))
                  for suffix in ("", "#1", "#2")]
    records.write_array_record_shards(by_caption, str(tmp_path), "eval", 1)
    once = query_redundancy.measure(export, data, "eval", num_examples=64)
    assert query_redundancy.measure(export, str(tmp_path), "eval", num_examples=4096) == once
    assert once["num_examples"] == 64
