"""Retrieval recall@K (hits are retrieved captions equal to the true one) and the
shapes-world caption attribute scores."""

import io
import os
import subprocess
import sys
import types

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from conftest import REPO
from seed_jax import api, config_files
from seed_jax.data import captioned, pipeline, records
from seed_jax.evaluators import reconstruction, retrieval
from seed_jax.evaluators.caption_codes import score_captions
from seed_jax.evaluators.codebook import codebook_usage
from seed_jax.evaluators.reconstruction import derangement, other_image_rows, reconstruction_similarity
from seed_jax.evaluators.retrieval import recall_at_k
from seed_jax.evaluators.shapes_captions import all_shapes_captions, attribute_scores
from seed_jax.trainers import decoder


def test_perfect_and_shifted_retrieval():
    feats = np.eye(4)
    captions = ["a", "b", "c", "d"]
    assert recall_at_k(feats, feats, captions, ks=(1,)) == {"i2t_r1": 1.0, "t2i_r1": 1.0}
    shifted = np.roll(feats, 1, axis=0)  # image i matches text i+1
    out = recall_at_k(feats, shifted, captions, ks=(1, 2))
    assert out["i2t_r1"] == 0.0 and out["t2i_r1"] == 0.0
    # the one match with cos 1 first, then ties broken by the lowest index
    assert out["i2t_r2"] == 0.25 and out["t2i_r2"] == 0.5


def test_duplicate_captions_count_as_hits():
    images = np.eye(3)
    texts = np.array([[0, 1, 0], [1, 0, 0], [0, 0, 1]], float)  # 0 and 1 swapped
    out = recall_at_k(images, texts, ["same", "same", "other"], ks=(1,))
    assert out == {"i2t_r1": 1.0, "t2i_r1": 1.0}
    out = recall_at_k(images, texts, ["x", "y", "other"], ks=(1,))
    assert out["i2t_r1"] == pytest.approx(1 / 3)


def test_records_of_one_image_are_one_image():
    """COCO's Karpathy test split is 5 records per image (one per caption): a perfect model
    scored R@1 0.2, only one of an image's 5 captions counting as its own."""
    rng = np.random.default_rng(0)
    features = np.repeat(np.eye(8)[:6], 5, axis=0)  # 6 images, 5 records each
    captions = [f"image {i} caption {k}" for i in range(6) for k in range(5)]
    images = [f"val2014/{i}.jpg" for i in range(6) for _ in range(5)]
    texts = features + 1e-3 * rng.normal(size=features.shape)
    assert recall_at_k(features, texts, captions, ks=(1,)) == {"i2t_r1": 0.2, "t2i_r1": 0.2}
    assert recall_at_k(features, texts, captions, ks=(1,), images=images) == {"i2t_r1": 1.0, "t2i_r1": 1.0}
    # t2i ranks images, not their copies: a text whose image is second is a hit at 2
    swapped = texts.copy()
    swapped[0] = features[5] + 0.1 * features[0]
    out = recall_at_k(features, swapped, captions, ks=(1, 2), images=images)
    assert out["t2i_r1"] == pytest.approx(29 / 30) and out["t2i_r2"] == 1.0
    with pytest.raises(ValueError, match="images: expected 30"):
        recall_at_k(features, texts, captions, images=images[:-1])


def test_rows_kept_apart_count_their_images_captions():
    """SEED-OPT generates codes from each caption, so rows of one image differ and stay
    queries of their own (`group_rows=False`); a caption of the row's image is a hit."""
    rng = np.random.default_rng(1)
    captions = [f"image {i} caption {k}" for i in range(4) for k in range(3)]
    images = [f"{i}.jpg" for i in range(4) for _ in range(3)]
    texts = np.repeat(np.eye(6)[:4], 3, axis=0) + 1e-3 * rng.normal(size=(12, 6))
    rows = np.roll(texts, 1, axis=0)  # row r is nearest to the caption before it
    rows[::3] = texts[::3]  # except each image's first row, nearest to its own
    assert recall_at_k(rows, texts, captions, ks=(1,))["i2t_r1"] == pytest.approx(4 / 12)
    kept_apart = recall_at_k(rows, texts, captions, ks=(1,), images=images, group_rows=False)
    assert kept_apart["i2t_r1"] == 1.0  # the caption before is its image's, for 8 of 12 rows too
    same = recall_at_k(rows, texts, captions, ks=(1, 5), images=[str(i) for i in range(12)], group_rows=False)
    assert same == recall_at_k(rows, texts, captions, ks=(1, 5))  # one row per image: as without images


def test_retrieval_scored_in_chunks_ranks_as_the_whole_matrix(monkeypatch):
    """Queries are ranked CHUNK_ROWS at a time (a whole 5000 x 25k similarity matrix and
    its argsorts took gigabytes); ranks, ties included, are those of the whole matrix."""
    rng = np.random.default_rng(2)
    images = [f"{i}.jpg" for i in range(9) for _ in range(3)]
    captions = [f"caption {i % 11}" for i in range(27)]  # some captions shared across images
    ks = (1, 2, 5, 40)  # 40 > 27 texts: every text
    small_integers = (rng.integers(0, 3, (27, 4)).astype(float), rng.integers(0, 3, (27, 4)).astype(float))
    for features, texts in (small_integers, (rng.normal(size=(27, 6)), rng.normal(size=(27, 6)))):  # ties; none
        whole = _recall_from_the_whole_matrix(features, texts, captions, ks, images)
        for chunk_rows in (1, 4, 27, 1000):
            monkeypatch.setattr(retrieval, "CHUNK_ROWS", chunk_rows)
            assert recall_at_k(features, texts, captions, ks=ks, images=images) == whole


def _recall_from_the_whole_matrix(image_features, text_features, captions, ks, images):
    """recall_at_k restated with one similarity matrix, its argsorts and loops."""
    first = {}
    for row, image in enumerate(images):
        first.setdefault(image, row)
    rows = sorted(first.values())
    own = {image: {captions[r] for r in range(len(images)) if images[r] == image} for image in first}
    sim = image_features[rows] @ text_features.T
    i2t, t2i = np.argsort(-sim, axis=1, kind="stable"), np.argsort(-sim.T, axis=1, kind="stable")
    out = {}
    for k in ks:
        out[f"i2t_r{k}"] = float(np.mean([any(captions[t] in own[images[r]] for t in i2t[q, :k])
                                          for q, r in enumerate(rows)]))
        out[f"t2i_r{k}"] = float(np.mean([any(captions[t] in own[images[rows[q]]] for q in t2i[t, :k])
                                          for t in range(len(captions))]))
    return out


def test_shape_mismatch_is_named():
    with pytest.raises(ValueError, match="features"):
        recall_at_k(np.eye(3), np.eye(2), ["a", "b", "c"])


def test_no_pairs_or_codes_are_refused_not_scored():
    """recall_at_k of no pairs returned NaN for every recall (numpy's "Mean of empty
    slice" warning alone), and codebook_usage of no codes a perplexity of 1 (one code
    used) beside used_codes 0; both now raise, naming their argument."""
    with pytest.raises(ValueError, match="captions: no pairs to rank, got 0 captions"):
        recall_at_k(np.zeros((0, 4)), np.zeros((0, 4)), [])
    with pytest.raises(ValueError, match=r"codes: no codes to count, got shape \(0, 32\)"):
        codebook_usage(np.zeros((0, 32), np.int32), 8)
    assert codebook_usage(np.array([[1, 2], [3, 3]]), 8) == pytest.approx(
        {"used_codes": 3.0, "perplexity": np.exp(-2 * 0.25 * np.log(0.25) - 0.5 * np.log(0.5))})


def test_attribute_scores_compare_objects_by_cell():
    references = ["a small red star at the top and a large blue circle in the centre",
                  "a large green cross on the left",
                  "a small white diamond at the bottom"]
    generated = ["a small red square at the top and a large blue circle in the centre",  # shape wrong once
                 "a large green cross at the bottom right",  # wrong cell
                 "a small white"]  # off the grammar
    scores = attribute_scores(generated, references)
    assert scores["grammatical"] == pytest.approx(2 / 3)
    assert scores["object_count"] == pytest.approx(2 / 3)
    assert scores["cell_recall"] == pytest.approx(2 / 4)  # 2 of the 4 reference objects found in their cell
    assert scores["cell_precision"] == pytest.approx(2 / 3)  # 2 of the 3 generated objects in a reference's cell
    assert scores["size_accuracy"] == 1.0 and scores["colour_accuracy"] == 1.0
    assert scores["shape_accuracy"] == pytest.approx(1 / 2)
    perfect = attribute_scores(references, references)
    assert perfect == {"grammatical": 1.0, "object_count": 1.0, "cell_recall": 1.0, "cell_precision": 1.0,
                       "size_accuracy": 1.0, "colour_accuracy": 1.0, "shape_accuracy": 1.0}
    # an object added in another cell keeps cell recall at 1; precision falls
    extra = attribute_scores(["a large green cross on the left and a small red star in the centre"], references[1:2])
    assert extra["cell_recall"] == 1.0 and extra["cell_precision"] == pytest.approx(1 / 2)
    assert "shape_accuracy" not in attribute_scores(["nothing"] * 3, references)  # no object to compare


def test_attribute_scores_name_bad_references():
    assert all_shapes_captions(["a small red star at the top"]) and not all_shapes_captions(["a red bus"])
    with pytest.raises(ValueError, match="references: 'a red bus' is not a shapes-world caption"):
        attribute_scores(["a red bus"], ["a red bus"])
    with pytest.raises(ValueError, match="generated: 1 captions for 2 references"):
        attribute_scores(["a"], ["a small red star at the top"] * 2)


def test_unrelated_similarity_needs_two_images_and_the_decoder_says_so_before_training(tmp_path):
    """derangement(1) has no answer: it used to search forever, hanging the decoder's
    evaluation after its whole training when eval.num_examples was 1."""
    assert sorted(derangement(2)) == [0, 1] and not np.any(derangement(5) == np.arange(5))
    for n in (0, 1):
        with pytest.raises(ValueError, match=f"n: .* needs n >= 2, got {n}"):
            derangement(n)
    with pytest.raises(ValueError, match="images: .* at least 2 are needed, got 1"):
        reconstruction_similarity(None, np.zeros((1, 8, 8, 3), np.uint8), None, None)
    config = config_files.load(os.path.join(REPO, "configs", "decoder.py"), "tiny")
    config.eval.num_examples = 1
    with pytest.raises(ValueError, match="eval.num_examples: expected at least 2"):
        decoder.train(config, str(tmp_path))
    assert not os.path.exists(tmp_path / "tokenizer")  # nothing was trained


def test_unrelated_similarity_pairs_rows_with_another_images_not_a_caption_of_their_own(monkeypatch):
    """Real eval splits hold a record per caption (COCO: 5 per image); the unrelated
    similarity paired a row with a random other row, about 3% of them a record of its own
    image (128 records, 5 per image), whose reconstruction is its own."""
    image_ids = [f"val2014/{i}.jpg" for i in range(26) for _ in range(5)][:128]
    names = sorted(set(image_ids))
    images = np.array([names.index(i) for i in image_ids], np.uint8)[:, None, None, None].repeat(3, -1)
    # features: one-hot of the image, so a row and its own image's reconstruction have cosine 1, others 0
    monkeypatch.setattr(reconstruction, "image_features", lambda tokenizer, x: np.eye(len(names))[x[:, 0, 0, 0]])
    scores = reconstruction_similarity(None, images, images, images, image_ids)
    assert scores["recon/similarity"] == 1.0 and scores["recon/unrelated_similarity"] == 0.0
    for seed in range(5):
        other = other_image_rows(image_ids, seed)
        assert not any(image_ids[o] == image_ids[i] for i, o in enumerate(other))
        assert len(set(other)) > len(names) // 2  # rows of many images, not one per image
    distinct = [f"{i}.png" for i in range(7)]  # one row per image: the derangement as before
    np.testing.assert_array_equal(other_image_rows(distinct, 3), derangement(7, 3))
    with pytest.raises(ValueError, match="image_ids: .* at least 2 distinct image ids, got 1 in 5 rows"):
        other_image_rows(["a.jpg"] * 5)
    # 3 images, all of one image id: the error named `images` (there are 3), not `image_ids`
    with pytest.raises(ValueError, match="image_ids: .* at least 2 distinct image ids, got 1 in 3 rows"):
        reconstruction_similarity(None, images[:3], images[:3], images[:3], ["a.jpg"] * 3)
    with pytest.raises(ValueError, match="image_ids: expected one per image"):
        reconstruction_similarity(None, images, images, images, image_ids[:-1])
    # one reconstruction or generated image broadcast over every image's features
    with pytest.raises(ValueError, match=r"reconstructions: expected one per image \(128\), got 1"):
        reconstruction_similarity(None, images, images[:1], images, image_ids)
    with pytest.raises(ValueError, match=r"from_captions: expected one per image \(128\), got 127"):
        reconstruction_similarity(None, images, images, images[:-1], image_ids)


def test_the_decoder_evaluation_needs_two_images_not_two_records(tmp_path, monkeypatch):
    """Eval records of one image's captions passed the check of 2 records, then the
    evaluation failed after the whole training, finding no other image to pair with."""
    rows = [{"image": _png((200, 30, 30)), "caption": f"caption {k}", "id": captioned.record_id("a.jpg", k)}
            for k in range(3)]
    monkeypatch.setattr(api.SeedTokenizer, "load", lambda *args, **kwargs: types.SimpleNamespace(image_size=8))
    config = config_files.load(os.path.join(REPO, "configs", "decoder.py"), "tiny")
    config.eval.num_examples = pipeline.ALL_RECORDS

    def evaluator(rows, prefix):
        paths = records.write_array_record_shards(rows, str(tmp_path), prefix, 1)
        return decoder.Evaluator(config, "tokenizer_export", paths, lambda captions: (np.zeros(len(captions)),),
                                 None, str(tmp_path), pipeline.SkipCounter())

    with pytest.raises(ValueError, match="eval records hold 1 decodable images; the evaluation needs at least 2"):
        evaluator(rows, "one_image")
    two = evaluator(rows + [{**rows[0], "id": "b.jpg"}], "two_images")
    assert two.image_ids == ["a.jpg"] * 3 + ["b.jpg"]


def test_the_decoder_evaluation_runs_a_bfloat16_model_in_bfloat16(tmp_path, monkeypatch):
    """The evaluator put the diffusion model behind the API without a dtype, which then
    read "float32": a bfloat16 model (config.dtype) ran its bfloat16 matmuls at
    float32's "highest" precision while the API said float32. It now takes the
    model's, beside the float32 tokenizer's."""
    from flax import nnx

    from helpers import TINY_DIFFUSION, TINY_TOKENIZER
    from seed_jax.models.stable_diffusion import StableDiffusion
    from seed_jax.models.tokenizer import SeedTokenizer
    from test_api_dtype import lowered_program, matmul_precisions

    tokenizer = api.SeedTokenizer(SeedTokenizer(TINY_TOKENIZER, rngs=nnx.Rngs(0)))
    monkeypatch.setattr(api.SeedTokenizer, "load", lambda *args, **kwargs: tokenizer)
    config = config_files.load(os.path.join(REPO, "configs", "decoder.py"), "tiny")
    config.eval.num_examples = pipeline.ALL_RECORDS
    rows = [{"image": _png(color), "caption": "a caption", "id": f"{i}.jpg"}
            for i, color in enumerate([(200, 30, 30), (30, 200, 30)])]
    paths = records.write_array_record_shards(rows, str(tmp_path), "eval", 1)
    evaluator = decoder.Evaluator(config, "tokenizer_export", paths, lambda captions: (np.zeros(len(captions)),),
                                  None, str(tmp_path), pipeline.SkipCounter())
    diffusion, painter = evaluator.apis(StableDiffusion(TINY_DIFFUSION, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    assert diffusion.dtype == "bfloat16" and "DEFAULT" in matmul_precisions(lowered_program(diffusion))
    assert painter.dtype == "float32" and matmul_precisions(lowered_program(painter)) == {"HIGHEST"}


def test_reconstruction_features_run_at_the_apis_precision_and_compute_only_the_features():
    """The reconstruction similarity's image features ran the stage-I head outside the
    API's matmul precision (a float32 tokenizer at TF32 on GPUs), after a program that
    computed, and copied to the host, every intermediate of tokenization (ViT features,
    codes) to read the causal embeddings. They are now one program at the API's
    precision returning the features alone, equal to the old path's."""
    import dataclasses

    import jax
    from flax import nnx

    from helpers import TINY_TOKENIZER
    from seed_jax.models.tokenizer import SeedTokenizer
    from test_api_dtype import matmul_precisions

    images = np.random.default_rng(0).integers(0, 256, (3, 40, 40, 3), np.uint8)
    for dtype in ("float32", "bfloat16"):
        tokenizer = api.SeedTokenizer(SeedTokenizer(TINY_TOKENIZER, dtype=jnp.dtype(dtype), rngs=nnx.Rngs(0)),
                                      batch_size=2)
        features = reconstruction.image_features(tokenizer, images)
        assert tokenizer._encode._cache_size() == 0  # no tokenization program ran
        pixels = tokenizer.preprocess(images)
        causal = tokenizer.encode(pixels, return_intermediates=True)["causal_embeddings"]
        np.testing.assert_array_equal(features, tokenizer.model.image_features(causal))  # the old path's
        lowered = tokenizer._image_features.lower(tokenizer._state, pixels[:2])
        assert jax.tree.leaves(lowered.out_info) == [jax.ShapeDtypeStruct((2, TINY_TOKENIZER.proj_dim), jnp.float32)]
        found = matmul_precisions(lowered.as_text())
        assert found == {"HIGHEST"} if dtype == "float32" else "DEFAULT" in found
    headless = api.SeedTokenizer(SeedTokenizer(dataclasses.replace(TINY_TOKENIZER, with_itc_heads=False),
                                               rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"image_features needs the stage-I contrastive heads \(vision_proj\)"):
        headless.image_features(pixels)


def _png(color: tuple[int, int, int]) -> bytes:
    png = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(png, format="PNG")
    return png.getvalue()


def test_exact_match_counts_any_caption_of_the_rows_image():
    """A split with a record per caption (COCO: 5 per image) gives one greedy caption per
    image, from its codes, for each of its records: scored against each record's own
    caption alone, a captioner writing one of each image's captions scored 0.2."""
    references = [f"image {i} caption {k}" for i in range(4) for k in range(5)]
    images = [f"val2014/{i}.jpg" for i in range(4) for _ in range(5)]
    generated = [f"image {i} caption 0" for i in range(4) for _ in range(5)]
    assert score_captions(generated, references, images) == {"caption/exact_match": 1.0}
    assert score_captions(generated, references) == {"caption/exact_match": 0.2}  # each row its own image
    generated[5:10] = ["image 0 caption 0"] * 5  # another image's caption is no match
    assert score_captions(generated, references, images) == {"caption/exact_match": 0.75}
    with pytest.raises(ValueError, match="images: expected one per reference"):
        score_captions(generated, references, images[:-1])
    # a reference with surrounding whitespace (records not written by make_records, which strips them)
    # could never match: generated captions are stripped
    assert score_captions(["a red star", "a blue circle"], [" a red star\n", "a blue square "]) == \
        {"caption/exact_match": 0.5}


def _shapes_run_without_shards(folder) -> str:
    """A tiny shapes-world tokenizer run's config.json, finished (DONE.json), its data/ empty."""
    import json

    from configs.tokenizer import get_config

    os.makedirs(os.path.join(folder, "data"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(get_config("tiny").to_dict(), f)
    open(os.path.join(folder, "DONE.json"), "w").close()
    return str(folder)


def _caption_codes(run, empty):
    from seed_jax.evaluators import caption_codes
    return caption_codes.score_split(None, empty, "eval")


def _query_redundancy(run, empty):
    from seed_jax.evaluators import query_redundancy
    return query_redundancy.measure("unused export", empty, "train", num_examples=8)


def _caption_swaps(run, empty):
    from seed_jax.evaluators import caption_swaps
    return caption_swaps.score_run(run, num_examples=8)


def _feature_probe(run, empty):
    from seed_jax.evaluators import feature_probe
    return feature_probe.probe_run(run, num_train=8, num_eval=8)


def _vit_from_labels(run, empty):
    from seed_jax.evaluators import vit_from_labels
    return vit_from_labels.run(run, steps=1, batch_size=1, lr=1.0, num_train=8, num_eval=8)


@pytest.mark.parametrize("evaluate, flag, prefix", [
    (_caption_codes, "codes_dir", "eval"), (_query_redundancy, "data_dir", "train"),
    (_caption_swaps, "tokenizer_workdir", "eval"), (_feature_probe, "tokenizer_workdir", "train"),
    (_vit_from_labels, "tokenizer_workdir", "train")])
def test_an_evaluators_folder_without_shards_is_named_by_its_flag(evaluate, flag, prefix, tmp_path, monkeypatch):
    """The five evaluator command lines' shards: a folder without them was named, not the
    flag that gave it (`--codes_dir`, `--data_dir`, `--tokenizer_workdir`: its data/)."""
    from seed_jax.evaluators import feature_probe

    tokenizer = types.SimpleNamespace(config=types.SimpleNamespace(
        qformer=types.SimpleNamespace(with_text=True), with_itc_heads=True))
    monkeypatch.setattr(feature_probe, "load_run_tokenizer", lambda *args: tokenizer)
    monkeypatch.setattr(api.SeedTokenizer, "load", lambda *args, **kwargs: tokenizer)
    run, empty = _shapes_run_without_shards(tmp_path / "run"), str(tmp_path / "run" / "data")
    with pytest.raises(FileNotFoundError, match=rf"^{flag}: no ArrayRecord shards named '{prefix}-\*-of-\*"
                                                rf"\.array_record' in '.*run/data'$"):
        evaluate(run, empty)


def test_a_folder_without_shards_fails_before_the_export_loads(tmp_path, monkeypatch):
    """caption_codes and query_redundancy loaded their export (minutes for a 2.7B
    SEED-OPT) before they looked for the shards a mistyped flag names."""
    from seed_jax.evaluators import query_redundancy

    def load(*args, **kwargs):
        raise AssertionError("the export loaded before the shards were looked for")

    monkeypatch.setattr(api.SeedTokenizer, "load", load)
    empty = str(tmp_path)
    with pytest.raises(FileNotFoundError, match="^data_dir: no ArrayRecord shards"):
        query_redundancy.measure("unused export", empty, "train", num_examples=8)
    run = subprocess.run([sys.executable, "-m", "seed_jax.evaluators.caption_codes", f"--export={tmp_path}/absent",
                          f"--codes_dir={empty}"], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": REPO})
    assert run.returncode != 0 and "--codes_dir: no ArrayRecord shards" in run.stderr, run.stderr[-2000:]
    assert "Traceback" not in run.stderr, run.stderr[-2000:]  # a UsageError: the message and the flags' help


@pytest.mark.parametrize("module, work, flag_values, expected", [
    ("caption_codes", "score_records", dict(export="~/e", codes_dir="~/codes", split="eval", num_examples=1,
                                          max_new_tokens=1), ["~/e", "~/codes"]),
    ("caption_swaps", "score_run", dict(tokenizer_workdir="~/w", split="eval", num_examples=1), ["~/w"]),
    ("feature_probe", "probe_run", dict(tokenizer_workdir="~/w", intermediates=["quantized"], num_train=1,
                                        extra_data_dir="~/extra", epochs=1, out="~/out.json"),
     ["~/w", "~/extra", "~/out.json"]),
    ("query_redundancy", "measure", dict(export="~/e", data_dir="~/data", prefix="eval", num_examples=1,
                                         out="~/out.json"), ["~/e", "~/data", "~/out.json"]),
    ("vit_from_labels", "run", dict(tokenizer_workdir="~/w", steps=1, batch_size=1, lr=1.0, seed=0, out="~/out.json"),
     ["~/w", "~/out.json"])])
def test_an_evaluators_path_flags_take_the_home_directory(module, work, flag_values, expected, tmp_path,
                                                            monkeypatch):
    """`--codes_dir=~/codes` (and the evaluators' other folder and file flags: a shell leaves
    a `~` after `=` as it is) looked for ./~/codes; only --export, which the API expands,
    named the home directory's. Every path flag now does."""
    import importlib

    import ml_collections

    from seed_jax import weights
    from seed_jax.evaluators import feature_probe, query_redundancy

    evaluator = importlib.import_module(f"seed_jax.evaluators.{module}")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(evaluator, "FLAGS", types.SimpleNamespace(**flag_values))
    used = []
    result = dict(num_examples=1, r2_from_last=[], codes_used=[], positions_per_code={}) \
        if module == "query_redundancy" else {}

    def take(*args, **kwargs):  # each string argument is a path or a name
        used.extend(a for a in [*args, *kwargs.values()] if isinstance(a, str))
        return result

    monkeypatch.setattr(evaluator, work, take)
    monkeypatch.setattr(records, "shard_paths", take)

    def check_run(*args, **kwargs):  # a finished shapes-world run of one training image
        take(*args, **kwargs)
        return ml_collections.ConfigDict(dict(data=dict(synthetic=dict(num_train=1))))

    monkeypatch.setattr(feature_probe, "check_run", check_run)
    monkeypatch.setattr(api.SeedOPT, "load", take)
    monkeypatch.setattr(weights, "read_config_named", take)
    monkeypatch.setattr(query_redundancy, "check_rows", take)
    if module == "caption_codes":  # the loaded model checks its options, then reads the records it captions

        def load(path):
            take(path)
            return types.SimpleNamespace(check_caption_options=lambda **options: None)

        monkeypatch.setattr(api.SeedOPT, "load", load)
        monkeypatch.setattr(evaluator, "read_split", lambda *args, **kwargs: (take(*args, **kwargs), None))
    monkeypatch.chdir(tmp_path)
    evaluator.main(["evaluator"])
    for path in expected:
        home = path.replace("~", str(tmp_path))
        assert home in used or os.path.exists(home), (path, used)
    assert not any(p.startswith("~") for p in used) and not os.path.exists("~"), used


@pytest.mark.parametrize("module, flag_values, missing", [
    ("caption_swaps", dict(split="eval", num_examples=8), "eval"),
    ("feature_probe", dict(intermediates=["quantized"], num_train=8, epochs=1, extra_data_dir=""), "eval"),
    ("vit_from_labels", dict(steps=1, batch_size=1, lr=1e-3), "train")])
def test_an_evaluators_tokenizer_run_it_cannot_read_is_a_usage_error(module, flag_values, missing, tmp_path,
                                                                      monkeypatch):
    """caption_swaps, feature_probe and vit_from_labels given a folder without a tokenizer
    run, or a run without its shards, ended in a traceback (a FileNotFoundError); each is now
    a UsageError naming tokenizer_workdir, raised before the run's export is loaded."""
    import importlib

    from absl import app

    evaluator = importlib.import_module(f"seed_jax.evaluators.{module}")
    monkeypatch.setattr(api.SeedTokenizer, "load", lambda *args, **kwargs: pytest.fail("the export loaded"))
    for workdir, message in [(str(tmp_path / "absent"), "tokenizer_workdir: .* holds no tokenizer run"),
                             (_shapes_run_without_shards(tmp_path / "run"),
                              f"tokenizer_workdir: no ArrayRecord shards named '{missing}-")]:
        monkeypatch.setattr(evaluator, "FLAGS", types.SimpleNamespace(tokenizer_workdir=workdir, **flag_values))
        with pytest.raises(app.UsageError, match=message):
            evaluator.main(["evaluator"])


@pytest.mark.parametrize("module, flag_values, message", [
    ("feature_probe", dict(intermediates=["codes"]), r"--intermediates: \['codes'\] are not among"),
    ("vit_from_labels", dict(steps=0, batch_size=1), "--steps: expected a positive integer, got 0"),
    ("caption_codes", dict(export="/no/export", codes_dir="/no/codes", split="eval", num_examples=256,
                           max_new_tokens=24), "--codes_dir: no ArrayRecord shards named 'eval-.*' in '/no/codes'"),
    # a count failed after the export loaded (minutes for a 2.7B SEED-OPT), in a traceback
    ("caption_codes", dict(export="/no/export", codes_dir="/no/codes", split="eval", num_examples=0,
                           max_new_tokens=24), r"--num_examples: expected an integer >= 1 \(-1: all\), got 0"),
    ("caption_codes", dict(export="/no/export", codes_dir="/no/codes", split="eval", num_examples=256,
                           max_new_tokens=0), "--max_new_tokens: expected an integer >= 1, got 0"),
    ("query_redundancy", dict(export="/no/export", data_dir="/no/data", prefix="train", num_examples=1),
     "--data_dir: no ArrayRecord shards named 'train-.*' in '/no/data'"),
    # counts that failed in a traceback once the export had loaded, or (epochs, lr, no intermediates)
    # printed an untrained probe's scores, or none
    ("caption_swaps", dict(tokenizer_workdir="/no/run", split="eval", num_examples=0),
     "--num_examples: expected an integer >= 1, got 0"),
    ("feature_probe", dict(tokenizer_workdir="/no/run", intermediates=["quantized"], num_train=0, epochs=1),
     "--num_train: expected an integer >= 1, got 0"),
    ("feature_probe", dict(tokenizer_workdir="/no/run", intermediates=["quantized"], num_train=8, epochs=0),
     "--epochs: expected an integer >= 1, got 0"),
    ("feature_probe", dict(tokenizer_workdir="/no/run", intermediates=[], num_train=8, epochs=1),
     "--intermediates: expected one or more of .*, got none"),
    ("vit_from_labels", dict(tokenizer_workdir="/no/run", steps=1, batch_size=1, lr=0.0),
     "--lr: expected a positive learning rate, got 0.0"),
    ("query_redundancy", dict(export="/no/export", data_dir="/no/data", prefix="train", num_examples=-1),
     "--num_examples: expected an integer >= 1, got -1")])
def test_an_evaluators_flag_it_cannot_take_is_a_usage_error(module, flag_values, message, monkeypatch):
    """Such a flag (or a folder holding no shards) raised a ValueError (FileNotFoundError),
    which absl's app.run prints at the end of a traceback; a UsageError it prints as the
    message and the flags' help."""
    import importlib

    from absl import app

    evaluator = importlib.import_module(f"seed_jax.evaluators.{module}")
    monkeypatch.setattr(evaluator, "FLAGS", types.SimpleNamespace(**flag_values))
    with pytest.raises(app.UsageError, match=message):
        evaluator.main(["evaluator"])


def test_an_evaluators_export_of_another_kind_or_too_few_images_is_a_usage_error(tiny_decoder_run, tmp_path,
                                                                                 monkeypatch):
    """caption_codes and query_redundancy given a workdir or another model's export for --export,
    and query_redundancy given fewer images than its R^2 fit needs (more than the export's
    Q-Former width + 1, in three quarters of them), failed in a traceback: the count after the
    export had loaded and encoded them all. Each is now a UsageError, before the export loads."""
    from absl import app

    from seed_jax.evaluators import caption_codes, query_redundancy

    monkeypatch.setattr(api.SeedTokenizer, "load", lambda *args, **kwargs: pytest.fail("the export loaded"))
    monkeypatch.setattr(api.SeedOPT, "load", lambda *args, **kwargs: pytest.fail("the export loaded"))
    tokenizer = os.path.join(tiny_decoder_run, "tokenizer")
    data = os.path.join(tokenizer, "data")
    cases = [  # the tiny Q-Former is 32 wide: 46 images leave 34 to fit, 45 leave 33
        (query_redundancy, dict(export=os.path.join(tokenizer, "export"), data_dir=data, prefix="eval",
                                num_examples=45), r"--num_examples: 45 images, of 64 records in the shards: 45 rows"),
        (query_redundancy, dict(export=tiny_decoder_run, data_dir=data, prefix="eval", num_examples=4096),
         rf"--export: {tiny_decoder_run}: not an export \(model.json missing\); it holds one in .*/export"),
        (caption_codes, dict(export=os.path.join(tokenizer, "export"), codes_dir=data, split="eval", num_examples=8,
                             max_new_tokens=4), "--export: .*: holds a 'seed_tokenizer' model, expected 'opt'")]
    for evaluator, flag_values, message in cases:
        monkeypatch.setattr(evaluator, "FLAGS", types.SimpleNamespace(out="", **flag_values))
        with pytest.raises(app.UsageError, match=message):
            evaluator.main(["evaluator"])
    assert query_redundancy.too_few_rows(46, 32) is None


@pytest.mark.parametrize("module, work, flag_values", [
    ("feature_probe", "probe_run", dict(tokenizer_workdir="w", intermediates=["quantized"], num_train=1,
                                        extra_data_dir="", epochs=1)),
    ("query_redundancy", "measure", dict(export="e", data_dir="data", prefix="eval", num_examples=1)),
    ("vit_from_labels", "run", dict(tokenizer_workdir="w", steps=1, batch_size=1, lr=1.0, seed=0))])
def test_an_evaluators_results_file_it_cannot_write_is_a_usage_error_before_the_work(module, work, flag_values,
                                                                                     tmp_path, monkeypatch):
    """`--out` naming a folder, or a file under a file, failed once the probes had trained
    (minutes), and `--out` in a folder not yet made too; the first two are now UsageErrors
    before the work, and the folder is made."""
    import importlib

    import ml_collections
    from absl import app

    from seed_jax.evaluators import feature_probe, query_redundancy

    evaluator = importlib.import_module(f"seed_jax.evaluators.{module}")
    result = {"feature_probe": {"quantized": {"eval": {"exact_match": 0.5}}}, "vit_from_labels": {"eval": {}},
              "query_redundancy": dict(num_examples=1, r2_from_last=[0.5], codes_used=[1],
                                       positions_per_code={1: 1})}[module]
    worked = []
    monkeypatch.setattr(evaluator, work, lambda *args, **kwargs: worked.append(True) or result)
    monkeypatch.setattr(records, "shard_paths", lambda *args, **kwargs: ["shard"])
    monkeypatch.setattr(query_redundancy, "check_rows", lambda *args, **kwargs: None)
    monkeypatch.setattr(feature_probe, "check_run", lambda *args, **kwargs: ml_collections.ConfigDict(
        dict(data=dict(synthetic=dict(num_train=1)))))
    (tmp_path / "file").write_text("")
    for out, message in [(tmp_path, f"--out={tmp_path} is a directory"),
                         (tmp_path / "file" / "r.json", "--out=.*/file/r.json: its folder .*/file cannot be made")]:
        monkeypatch.setattr(evaluator, "FLAGS", types.SimpleNamespace(out=str(out), **flag_values))
        with pytest.raises(app.UsageError, match=message):
            evaluator.main(["evaluator"])
    assert not worked
    out = tmp_path / "new" / "r.json"
    monkeypatch.setattr(evaluator, "FLAGS", types.SimpleNamespace(out=str(out), **flag_values))
    evaluator.main(["evaluator"])
    assert worked and out.exists()
