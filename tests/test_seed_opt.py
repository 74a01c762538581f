"""SEED-OPT: the OPT text tokenizer, sequence formats and loss masks, packing
(segment-aware attention equals separate sequences), the pre-tokenization job, the
tiny trainer end to end with its export, and the image/text API."""

import functools
import json
import os
import re
import shutil
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from array_record.python import array_record_module
from flax import nnx

from configs.pretokenize import get_config as get_pretokenize_config
from configs.seed_opt import get_config
from helpers import (MAIN_WITH_A_SLOW_EXPORT, TWO_PROCESSES_ON_ONE_BATCH,
                     assert_compiles_without_full_rematerialization, assert_optimizer_state_split_as_params,
                     assert_same_gradients, assert_weights_split, checkpoint_params, collectives_in_loop_bodies,
                     decoder_with_text_encoder_changed, layout_mesh, run_two_processes, seed_opt_losses_on_one_batch,
                     split_over_fsdp_and_tensor, stage_gradients, write_with_a_damaged_record)
from seed_jax import api, command_line, parallel, weights
from seed_jax.convert import opt as convert_opt
from seed_jax.data import code_records, opt_text, pipeline, preprocess, records, sequences, synthetic
from seed_jax.evaluators import caption_codes
from seed_jax.models import opt
from seed_jax.models.opt import OPTConfig
from seed_jax.models.stable_diffusion import StableDiffusionConfig
from seed_jax.models.tokenizer import SeedTokenizerConfig
from seed_jax.trainers import checkpointing, global_batches, loop, pretokenize, seed_opt
from seed_jax.trainers import tokenizer as tokenizer_trainer

WORDS = synthetic.caption_vocabulary() + ["A", "photo", "of", "Generate", "an", "image"]


@pytest.fixture(scope="module")
def text():
    return opt_text.OPTTextTokenizer(opt_text.word_bpe(WORDS))


@pytest.fixture(scope="module")
def builder(text):
    return sequences.SequenceBuilder(text, sequences.ImageTokens.after_vocabulary(text.vocab_size, 64))


def test_word_bpe_has_opt_specials_and_one_token_per_caption_word(text):
    assert (text.bos_id, text.eos_id, text.pad_id) == (2, 2, 1)
    caption = " a large red circle at the top left and a small blue star in the centre"
    ids = text.encode(caption)
    assert len(ids) == len(caption.split())
    assert text.decode(ids) == caption
    other = "Zebra? 42 ü"  # outside the word list: byte symbols still encode it
    assert text.decode(text.encode(other)) == other
    assert text.decode([text.bos_id] + ids + [text.eos_id, text.vocab_size + 5]) == caption


def test_caption_and_generation_sequences_and_loss_masks(builder, text):
    codes = np.arange(32) * 2
    image = builder.image
    ids, mask = builder.caption_sequence(codes, "a small red star at the top")
    prompt = [text.bos_id, image.start] + [image.first_code + c for c in codes] + [image.end] \
        + text.encode("A photo of")
    answer = text.encode(" a small red star at the top") + [text.eos_id]
    assert ids == prompt + answer and mask == [0] * len(prompt) + [1] * len(answer)

    ids, mask = builder.generation_sequence("a small red star at the top", codes)
    prompt = [text.bos_id] + text.encode("Generate an image: a small red star at the top") + [image.start]
    assert ids == prompt + [image.first_code + c for c in codes] + [image.end]
    assert mask == [0] * len(prompt) + [1] * 33  # the 32 codes and </img>
    assert builder.generation_prompt("a small red star at the top") == prompt

    shifted = sequences.shifted(ids, mask)
    np.testing.assert_array_equal(shifted["inputs"], ids[:-1])
    np.testing.assert_array_equal(shifted["target_index"], np.arange(len(prompt) - 1, len(ids) - 1))
    np.testing.assert_array_equal(shifted["target_ids"], ids[len(prompt):])
    with pytest.raises(ValueError, match=r"codes: values must lie in \[0, 64\)"):
        builder.caption_prompt(np.asarray([64]))


def test_a_caption_over_max_text_tokens_is_cut_without_its_end_token_and_said(text, caplog):
    """A caption cut at max_text_tokens took </s> as a target after its last kept token,
    silently: the model learnt to end captions mid-sentence. Cut, it takes no </s>; one
    that fits takes it, and the training example says once that it cut one."""
    image = sequences.ImageTokens.after_vocabulary(text.vocab_size, 64)
    builder = sequences.SequenceBuilder(text, image, max_text_tokens=6)
    codes, prompt = np.arange(32), len(builder.caption_prompt(np.arange(32)))
    long, fits = "a small red star at the top left", "a small red star at the"
    ids, mask = builder.caption_sequence(codes, long)
    assert ids[prompt:] == text.encode(" " + long)[:6] and mask[prompt:] == [1] * 6
    ids, mask = builder.caption_sequence(codes, fits)
    assert ids[prompt:] == text.encode(" " + fits) + [text.eos_id] and mask[prompt:] == [1] * 7
    assert builder.is_cut(builder.caption_sequence(codes, long)[0], long, to_image=False)
    assert not builder.is_cut(builder.caption_sequence(codes, fits)[0], fits, to_image=False)
    # "Generate an image: a star" is 6 tokens: as long as max_text_tokens, not cut
    assert len(builder.generation_prompt("a star")) == 6 + 2  # and <s>, <img>
    for caption, cut in ((fits, True), ("a star", False)):
        assert builder.is_cut(builder.generation_sequence(caption, codes)[0], caption, to_image=True) == cut
    ten = sequences.SequenceBuilder(text, image, max_text_tokens=10)  # "... a small red star at the": 10 tokens
    assert not ten.is_cut(ten.generation_sequence(fits, codes)[0], fits, to_image=True)
    for to_image, where in ((0.0, "in an image -> text sequence, which then takes no </s>"),
                            (1.0, "in the text -> image prompt (prompts.generate with it)")):
        example = sequences.CodeExample(builder, to_image, 128, 80, pipeline.SkipCounter())
        rng = np.random.default_rng(0)
        caplog.clear()
        with caplog.at_level("WARNING"):
            example(code_records.encode_code_record("fits", "a star", codes), rng)
            assert "cut a caption" not in caplog.text
            for _ in range(2):
                targets = example(code_records.encode_code_record("long", long, codes), rng)["target_ids"]
                assert to_image or targets[-1] != text.eos_id
        assert caplog.text.count(f"cut a caption at data.max_text_tokens 6 {where}") == 1


def test_a_long_question_loses_its_end_not_the_prompts_short_answer(builder, text):
    """A question prompt longer than max_text_tokens was cut at its end, so a long
    question lost "Short answer.", the words the answer follows."""
    codes, limit = np.arange(32), builder.max_text_tokens
    image = [text.bos_id] + builder.image.wrap(codes)
    short = "what colour is the star"
    assert builder.question_prompt(codes, short) == image + text.encode(f"Question: {short} Short answer.")
    long = " ".join(["the large red circle"] * 20)  # 80 words
    suffix = text.encode(" Short answer.")
    prompt = builder.question_prompt(codes, long)[len(image):]
    assert len(prompt) == limit and prompt[-len(suffix):] == suffix
    assert prompt[:-len(suffix)] == text.encode(f"Question: {long}")[:limit - len(suffix)]
    # a template without text after its field is cut as before; braces and a conversion are kept
    caption = " ".join(["a small blue star"] * 20)
    assert builder.generation_prompt(caption) == \
        [text.bos_id] + text.encode(f"Generate an image: {caption}")[:limit] + [builder.image.start]
    prompts = sequences.Prompts(question="Q {{x}}: {question!s} {{y}} Short answer.")
    cut = sequences.SequenceBuilder(text, builder.image, prompts).question_prompt(codes, long)[len(image):]
    assert cut[-len(text.encode(" {y} Short answer.")):] == text.encode(" {y} Short answer.")
    start = text.encode("Q {x}: the large")
    assert cut[:len(start)] == start


@pytest.mark.parametrize("name, template, message", [
    ("generate", "Generate an image", r"prompts.generate: expected \{caption\} .*got 'Generate an image'"),
    ("generate", "Generate an image: {Caption}", r"prompts.generate: expected \{caption\}"),
    ("generate", "{caption}: {caption}", r"prompts.generate: expected \{caption\}"),
    ("question", "Question: {q} Short answer.", r"prompts.question: expected \{question\}"),
    ("question", "Question: {question:{w}} Short answer.", r"prompts.question: expected \{question\}"),
    ("question", "Question: {question:{}} Short answer.", r"prompts.question: expected \{question\}"),
    ("caption", "A photo of {caption}", "prompts.caption: expected no field"),
    ("caption", "A photo of {", "prompts.caption: 'A photo of {' is no format string"),
])
def test_prompts_without_their_fields_fail_naming_them(builder, name, template, message):
    """A generation prompt without {caption} trained text -> image on one prompt for every
    caption, without an error; a misspelt field raised KeyError at the first such sequence."""
    with pytest.raises(ValueError, match=message):
        sequences.Prompts(**{name: template})
    prompts = sequences.Prompts(generate="Draw {{this}}: {caption}")  # doubled braces are text
    assert sequences.SequenceBuilder(builder.text, builder.image, prompts).generation_prompt("a red star") == \
        [builder.text.bos_id] + builder.text.encode("Draw {this}: a red star") + [builder.image.start]


def test_packed_rows_give_the_logits_of_separate_sequences():
    """Two sequences packed in one row with segment ids and per-segment positions
    give each sequence's own logits: no attention crosses the segment boundary."""
    config = OPTConfig(vocab_size=50, width=32, depth=2, num_heads=4, mlp_dim=64, max_positions=32)
    model = weights.build("opt", config)
    rng = np.random.default_rng(0)
    first, second = rng.integers(0, 50, (1, 7)), rng.integers(0, 50, (1, 5))
    row = np.concatenate([first, second, np.zeros((1, 4), int)], 1)
    segments = np.asarray([[1] * 7 + [2] * 5 + [0] * 4])
    positions = np.asarray([list(range(7)) + list(range(5)) + [0] * 4])
    packed = np.asarray(model(row, positions=positions, segment_ids=segments)[0])
    np.testing.assert_allclose(packed[:, :7], model(first)[0], atol=1e-5)
    np.testing.assert_allclose(packed[:, 7:12], model(second)[0], atol=1e-5)
    at = np.asarray([[2, 6, 9, 11]])
    selected = model(row, positions=positions, segment_ids=segments, logits_at=at)[0]
    np.testing.assert_allclose(selected, packed[:, at[0]], atol=1e-6)
    unpacked = np.asarray(model(row)[0])  # without segments the second sequence sees the first
    assert not np.allclose(unpacked[:, 7:12], packed[:, 7:12], atol=1e-3)


def _write_records(path, raws) -> str:
    writer = array_record_module.ArrayRecordWriter(str(path), "group_size:1")
    for raw in raws:
        writer.write(raw)
    writer.close()
    return str(path)


def _write_code_records(path, rows, corrupt=0):
    return _write_records(path, [code_records.encode_code_record(*row) for row in rows] + [b"\x00not json"] * corrupt)


def test_packed_pipeline_rows_rebuild_the_sequences_and_count_skipped_records(builder, tmp_path):
    """Every segment of every packed row, with its targets, is exactly one record's
    image -> text or text -> image sequence and loss mask; both directions occur."""
    rng = np.random.default_rng(0)
    rows = [(f"r{i}", synthetic.caption(synthetic.sample_scene(rng)), rng.integers(0, 64, 32)) for i in range(40)]
    path = _write_code_records(tmp_path / "train-00000-of-00001.array_record", rows, corrupt=3)
    skipped = pipeline.SkipCounter()
    example = sequences.CodeExample(builder, 0.5, 128, 80, skipped)
    iterator = sequences.packed_train_iterator([path], example, global_batch_size=4, seed=0, num_packing_bins=4,
                                               num_threads=1)
    expected = {}
    for _, caption, codes in rows:
        for ids, mask in (builder.caption_sequence(codes, caption), builder.generation_sequence(caption, codes)):
            expected[tuple(ids)] = mask
    directions = set()
    for _ in range(6):
        batch = next(iterator)
        assert {k: v.shape for k, v in batch.items()} == {
            "inputs": (4, 128), "segment_ids": (4, 128), "positions": (4, 128),
            "target_ids": (4, 80), "target_index": (4, 80), "target_mask": (4, 80)}
        for b in range(4):
            segments, valid = batch["segment_ids"][b], batch["target_mask"][b] > 0
            target_segments = segments[batch["target_index"][b][valid]]
            assert np.all(target_segments > 0)
            for segment in set(segments[segments > 0]):
                at = np.nonzero(segments == segment)[0]
                np.testing.assert_array_equal(batch["positions"][b][at], np.arange(len(at)))
                mine = target_segments == segment
                index = batch["target_index"][b][valid][mine] - at[0]
                targets = batch["target_ids"][b][valid][mine]
                ids = list(batch["inputs"][b][at]) + [targets[-1]]  # the last token is only a target
                mask = [0] * len(ids)
                for i, t in zip(index, targets):
                    assert ids[i + 1] == t
                    mask[i + 1] = 1
                assert expected[tuple(int(i) for i in ids)] == mask
                directions.add("t2i" if targets[-1] == builder.image.end else "i2t")
    assert directions == {"i2t", "t2i"}
    # 24 rows of two or more sequences pass the 40 good records: a whole epoch, all 3 corrupt ones
    # skipped (reads run ahead into the next epoch, which may skip them again)
    assert skipped.count >= 3


def test_records_of_the_wrong_length_or_type_are_skipped_and_counted(builder, tmp_path):
    """A record of 31 codes, one of booleans, ones with an empty or blank caption (they
    trained image -> text on </s> alone, text -> image from no caption) and a corrupt
    one are skipped and counted, by the training example and by the evaluation reader alike."""
    good = ("good", "a small red star at the top", np.arange(32))
    short = code_records.encode_code_record("short", "a big blue circle", np.arange(31))
    booleans = json.dumps({"format": code_records.FORMAT_VERSION, "id": "bools", "caption": "a small red star",
                           "codes": [True] * 32}).encode()
    empty = code_records.encode_code_record("empty", "", np.arange(32))
    blank = code_records.encode_code_record("blank", " \t", np.arange(32))
    skipped = pipeline.SkipCounter()
    rng = np.random.default_rng(0)
    for fraction in (0.0, 1.0):  # image -> text, text -> image
        example = sequences.CodeExample(builder, fraction, 128, 80, skipped)
        assert example(code_records.encode_code_record(*good), rng) is not None
        assert [example(raw, rng) for raw in (short, booleans, empty, blank, b"\x00")] == [None] * 5
    assert skipped.count == 10
    path = _write_records(tmp_path / "eval-00000-of-00001.array_record",
                          [short, booleans, empty, blank, code_records.encode_code_record(*good)])
    skipped = pipeline.SkipCounter()
    assert [r["id"] for r in sequences.read_code_records([path], 1, skipped)] == ["good"]
    assert skipped.count == 4
    skipped = pipeline.SkipCounter()
    every = sequences.read_code_records([path], pipeline.ALL_RECORDS, skipped)
    assert [r["id"] for r in every] == ["good"] and skipped.count == 4
    with pytest.raises(ValueError, match=r"num_examples: expected an integer >= 1 \(-1: all\), got 0"):
        sequences.read_code_records([str(path)], 0, skipped)
    # a fraction read every record (the count was never reached); errors name the config key given
    with pytest.raises(ValueError, match=r"^eval.num_examples: expected an integer >= 1 \(-1: all\), got 1.5"):
        sequences.read_code_records([str(path)], 1.5, skipped, name="eval.num_examples")
    with pytest.raises(ValueError, match=r"^eval.num_examples: 2 requested, .*eval-00000-of-00001.array_record\.\.\. "
                                         "hold 1 readable records"):
        sequences.read_code_records([str(path)], 2, skipped, name="eval.num_examples")


def test_records_with_codes_outside_the_codebook_are_skipped_by_the_evaluation_reader_too(builder, tmp_path):
    """A record whose codes lie outside the codebook: the training example skips and
    counts it, and so does the evaluation reader (it once returned it, and the first
    evaluation, after training up to it, raised when it built the record's prompt)."""
    rng = np.random.default_rng(0)
    beyond = code_records.encode_code_record("beyond", "a big blue circle", np.arange(32) + 40)  # 40..71, of 64
    skipped = pipeline.SkipCounter()
    assert sequences.CodeExample(builder, 0.0, 128, 80, skipped)(beyond, rng) is None and skipped.count == 1
    path = _write_records(tmp_path / "eval-00000-of-00001.array_record",
                          [beyond, code_records.encode_code_record("good", "a small red star", np.arange(32))])
    skipped = pipeline.SkipCounter()
    read = sequences.read_code_records([path], pipeline.ALL_RECORDS, skipped, num_codes=64)
    assert [r["id"] for r in read] == ["good"] and skipped.count == 1
    builder.caption_prompt(read[0]["codes"])  # what the evaluation builds from each record
    with pytest.raises(ValueError, match=r"code record 'beyond': codes up to 71, the codebook has 64"):
        code_records.decode_code_record(beyond, num_codes=64)


@pytest.mark.parametrize("content", [
    {"id": "huge", "caption": "a small red star", "codes": [2**31] + [0] * 31},  # no int32 holds it
    {"id": "surrogate", "caption": "a small \\ud800 star", "codes": [0] * 32},  # JSON text, not Unicode text
], ids=["code_beyond_int32", "caption_with_a_lone_surrogate"])
def test_a_code_record_that_breaks_its_readers_is_skipped_and_counted(builder, tmp_path, content):
    """The training example, and the evaluation reader without `num_codes` (caption_codes'),
    raised OverflowError (numpy's int32) or TypeError (the tokenizer) on these records,
    ending the run, where they skip and count a malformed record."""
    raw = ('{"format":%d,"id":"%s","caption":"%s","codes":%s}' % (
        code_records.FORMAT_VERSION, content["id"], content["caption"], content["codes"])).encode()
    skipped = pipeline.SkipCounter()
    assert sequences.CodeExample(builder, 0.0, 128, 80, skipped)(raw, np.random.default_rng(0)) is None
    assert skipped.count == 1
    path = _write_records(tmp_path / "eval-00000-of-00001.array_record",
                          [raw, code_records.encode_code_record("good", "a small red star", np.arange(32))])
    skipped = pipeline.SkipCounter()
    assert [r["id"] for r in sequences.read_code_records([path], pipeline.ALL_RECORDS, skipped)] == ["good"]
    assert skipped.count == 1


def test_a_pipeline_that_skips_every_record_raises_instead_of_waiting(builder, tmp_path, caplog):
    rng = np.random.default_rng(0)
    rows = [(f"r{i}", synthetic.caption(synthetic.sample_scene(rng)), rng.integers(0, 64, 32)) for i in range(20)]
    path = _write_code_records(tmp_path / "train-00000-of-00001.array_record", rows)
    too_short = sequences.CodeExample(builder, 0.0, 32, 80, pipeline.SkipCounter())  # image -> text needs ~50
    iterator = sequences.packed_train_iterator([path], too_short, global_batch_size=2, seed=0, num_packing_bins=2,
                                               num_threads=1)
    with caplog.at_level("WARNING"), pytest.raises(ValueError, match="skipped 100.00 %"):
        next(iterator)
    # grain's error names no cause: the first skipped sequence said why
    assert re.search(r"skipped a sequence of \d+ tokens with \d+ targets: a packed row holds 32 tokens "
                     r"\(data.seq_length\) and 80 targets", caplog.text)


def test_evaluation_and_the_export_cut_prompts_where_training_did(text, tmp_path):
    """data.max_text_tokens cuts a text -> image prompt in training; the evaluation's
    prompts and the export's were cut at SequenceBuilder's default (64) whatever it was.
    The evaluation decodes eval.batch_size rows at a time; it ran the API's default 32."""
    config = get_config("tiny")
    config.data.max_text_tokens = 6
    config.eval.batch_size = 3
    model_config = OPTConfig(vocab_size=text.vocab_size, width=32, depth=1, num_heads=2, mlp_dim=64,
                             max_positions=128, extra_tokens=64 + 2)
    model = weights.build("opt", model_config)
    image = sequences.ImageTokens.after_vocabulary(text.vocab_size, 64)
    trained = sequences.SequenceBuilder(text, image, max_text_tokens=config.data.max_text_tokens)
    caption = "a small red star at the top left and a big blue circle in the centre"
    record = {"id": "r", "caption": caption, "codes": np.arange(32)}

    class Retrieval:
        def recall(self, *args):
            return {"r1": 0.0}

    evaluator = seed_opt.Evaluator(config, [record], image, text, Retrieval(), str(tmp_path), "", "")
    assert evaluator.seed_opt(model).builder.generation_prompt(caption) == trained.generation_prompt(caption)
    assert evaluator.seed_opt(model).batch_size == 3  # eval.batch_size rows a call to the model (was 32)
    out = str(tmp_path / "export")
    seed_opt.export(model_config, weights.flat_params(model), image, text, out,
                    info={"max_text_tokens": config.data.max_text_tokens})
    assert api.SeedOPT.load(out).builder.generation_prompt(caption) == trained.generation_prompt(caption)


def test_fewer_held_out_records_than_samples_asked_for_are_said(text, tmp_path, caplog):
    """samples.json silently held fewer samples than eval.num_samples when the evaluation
    read fewer held-out records (eval.num_examples below it, or -1 on a small split)."""
    image = sequences.ImageTokens.after_vocabulary(text.vocab_size, 64)
    records_ = [{"id": f"r{i}", "caption": "a red star", "codes": np.arange(32)} for i in range(4)]
    config = get_config("tiny")
    assert config.eval.num_samples == 4
    with caplog.at_level("WARNING"):
        seed_opt.Evaluator(config, records_, image, text, None, str(tmp_path), "", "")
    assert "eval.num_samples" not in caplog.text
    with caplog.at_level("WARNING"):
        seed_opt.Evaluator(config, records_[:3], image, text, None, str(tmp_path), "", "")
    assert "eval.num_samples 4: the evaluation reads 3 held-out records, so samples.json holds 3" in caplog.text


def _export_of_8_codes_an_image(text, out: str) -> sequences.ImageTokens:
    """A random SEED-OPT export at `out` whose info records 8 codes an image (of 64); its image tokens."""
    model_config = OPTConfig(vocab_size=text.vocab_size, width=32, depth=1, num_heads=2, mlp_dim=64,
                             max_positions=128, extra_tokens=64 + 2)
    image = sequences.ImageTokens.after_vocabulary(text.vocab_size, 64)
    seed_opt.export(model_config, weights.flat_params(weights.build("opt", model_config)), image, text, out,
                    info={"codes_per_image": 8})
    return image


def test_an_export_reads_images_as_the_codes_per_image_it_was_trained_on(text, tmp_path, tokenizer_export):
    """Without a SEED tokenizer, SeedOPT read every image as SEED's 32 codes, whatever
    the tokenizer SEED-OPT was trained on: the export now records its codes per image."""
    out = str(tmp_path / "export")
    image = _export_of_8_codes_an_image(text, out)
    model = api.SeedOPT.load(out)
    assert model.image_codes(["a small red star", "a large blue circle"]).shape == (2, 8)
    record = {"id": "r", "caption": "a red star", "codes": np.arange(8)}  # training evaluates the same way
    retrieval = type("Retrieval", (), {"recall": lambda self, *args: {"r1": 0.0}})()
    evaluator = seed_opt.Evaluator(get_config("tiny"), [record], image, text, retrieval, str(tmp_path), "", "")
    assert len(evaluator.seed_opt(model.model).caption_codes(evaluator.codes, max_new_tokens=2)) == 1
    assert len(model.caption_codes(np.zeros((2, 8), np.int32), max_new_tokens=2)) == 2
    with pytest.raises(ValueError, match=r"codes: expected integer \(B,8\)"):
        model.caption_codes(np.zeros((2, 32), np.int32))
    with pytest.raises(ValueError, match=r"tokenizer: its 32 codes an image, the model reads 8 \(codes_per_image\)"):
        api.SeedOPT.load(out, tokenizer=tokenizer_export)


def test_caption_codes_reads_the_code_records_of_the_exports_codes_per_image(text, tmp_path):
    """The caption_codes evaluator read every code record as SEED's 32 codes: on the
    codes of a SEED-OPT trained with another count each record was skipped, and it
    failed ("hold 0 readable records"). It reads them as the export's codes_per_image.
    A record of codes outside the export's codebook (64) ended it with a ValueError from
    the first batch's prompts; it is skipped and counted, as training skips it."""
    out = str(tmp_path / "export")
    _export_of_8_codes_an_image(text, out)
    rows = [(f"img-{i}", "a small red star", np.full(8, i)) for i in range(3)] + [("beyond", "a star", np.full(8, 64))]
    os.makedirs(tmp_path / "codes")
    _write_code_records(records.shard_path(str(tmp_path / "codes"), "eval", 0, 1), rows)
    scores = caption_codes.score_split(api.SeedOPT.load(out), str(tmp_path / "codes"), "eval",
                                       num_examples=pipeline.ALL_RECORDS, max_new_tokens=2)
    assert scores["num_examples"] == 3 and scores["skipped_records"] == 1


class _Killed(Exception):
    """The process killed at this point."""


def test_an_export_killed_before_its_text_tokenizer_is_written_is_written_again(text, tmp_path, monkeypatch):
    """The export wrote its text tokenizer after model.json, which marks a whole export:
    killed in between, every later run kept it without the tokenizer
    (`write_unless_current`), and `api.SeedOPT.load` loaded it with no text tokenizer."""
    model_config = OPTConfig(vocab_size=text.vocab_size, width=32, depth=1, num_heads=2, mlp_dim=64,
                             max_positions=128, extra_tokens=64 + 2)
    params = weights.flat_params(weights.build("opt", model_config))
    image = sequences.ImageTokens.after_vocabulary(text.vocab_size, 64)
    out = str(tmp_path / "export")

    def write():
        return weights.write_unless_current(out, {"phase1": 3}, lambda: seed_opt.export(
            model_config, params, image, text, out, info={"steps": {"phase1": 3}}))

    def killed(self, path):
        raise _Killed

    monkeypatch.setattr(opt_text.OPTTextTokenizer, "save", killed)
    with pytest.raises(_Killed):
        write()
    monkeypatch.undo()
    assert write()
    assert os.path.exists(os.path.join(out, opt_text.FILE_NAME))


def test_lengths_the_model_or_a_phase_cannot_hold_are_rejected():
    config = get_config("tiny")
    positions = config.data.seq_length
    seed_opt.check_lengths(config, positions, 32)
    with pytest.raises(ValueError, match="data.seq_length .* exceeds the model's"):
        seed_opt.check_lengths(config, 64, 32)
    with pytest.raises(ValueError, match=r"data.seq_length 128: no sequence fits in a row; .* 126 codes takes at "
                                         r"least 129 tokens"):
        seed_opt.check_lengths(config, positions, 126)
    config.phase2.max_targets_per_row = 32
    with pytest.raises(ValueError, match="phase2.max_targets_per_row 32: a text -> image sequence has 33 targets"):
        seed_opt.check_lengths(config, positions, 32)


def test_held_out_captions_whose_image_prompts_leave_no_room_for_an_image_are_refused(builder):
    """Checked as `SeedOPT.image_codes` decodes: the longest prompt, then codes_per_image
    codes and </img> within the model's positions (the last one not fed back)."""
    config = get_config("tiny")
    captions = ["a small red circle", "a large blue square at the top left and a small green triangle"]
    prompt = len(builder.generation_prompt(captions[1]))
    assert prompt > len(builder.generation_prompt(captions[0]))
    seed_opt.check_generation_prompts(config, captions, builder, prompt + 32, 32)
    with pytest.raises(ValueError, match=rf"data.max_text_tokens 64: the held-out caption 'a large blue .*' makes a "
                                         rf"text -> image prompt of {prompt} tokens, which leaves 32 of the model's "
                                         rf"{prompt + 31} positions for an image's 32 codes and </img>"):
        seed_opt.check_generation_prompts(config, captions, builder, prompt + 31, 32)


def test_planned_lengths_are_those_of_the_tokenizer_run_that_will_be_used(tmp_path):
    """A finished tokenizer run is reused as it was trained, whatever `config.tokenizer` says."""
    config = get_config("tiny")
    assert seed_opt.planned_lengths(config, str(tmp_path)) == (128, config.tokenizer.model.qformer.num_queries)
    run = tmp_path / "tokenizer"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model": {"qformer": {"num_queries": 8}}}))
    (run / "DONE.json").write_text("{}")
    assert seed_opt.planned_lengths(config, str(tmp_path)) == (128, 8)


def test_more_held_out_records_than_the_shapes_world_holds_are_refused_before_any_work(tmp_path):
    """Counted against the synthetic eval images of the tokenizer run to be trained, or of
    the finished one reused as recorded; refused once the tokenizer had trained before."""
    config = get_config("tiny")
    config.eval.num_examples = config.tokenizer.data.synthetic.num_eval + 1
    with pytest.raises(command_line.ConfigError, match=r"^eval.num_examples 65: .* holds 64 held-out images"):
        seed_opt.train(config, str(tmp_path))
    assert not (tmp_path / "tokenizer").exists()
    config.eval.num_examples = 64
    seed_opt.check_held_out_count(config, str(tmp_path))
    run = tmp_path / "tokenizer"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"data": {"source": "synthetic", "synthetic": {"num_eval": 32}}}))
    (run / "DONE.json").write_text("{}")
    with pytest.raises(ValueError, match="eval.num_examples 64: .* holds 32 held-out images"):
        seed_opt.check_held_out_count(config, str(tmp_path))
    config.data.codes_dir = str(tmp_path / "codes")  # its held-out records are counted once read
    seed_opt.check_held_out_count(config, str(tmp_path))


def test_shard_sets_of_two_counts_or_with_a_gap_are_refused(tmp_path):
    """Each error starts with the field (config field or flag) that named the folder,
    given one; those of these two sets named the folder alone."""
    for count in (2, 3):
        for index in range(count):
            open(records.shard_path(str(tmp_path), "train", index, count), "wb").close()
    with pytest.raises(ValueError, match=r"shards of 'train' written as \[2, 3\] shards"):
        records.shard_paths(str(tmp_path), "train")
    with pytest.raises(ValueError, match=r"^data.train_dir: '.*' holds shards of 'train' written as \[2, 3\]"):
        records.shard_paths(str(tmp_path), "train", "data.train_dir")
    os.remove(records.shard_path(str(tmp_path), "train", 0, 2))
    os.remove(records.shard_path(str(tmp_path), "train", 1, 2))
    os.remove(records.shard_path(str(tmp_path), "train", 1, 3))
    with pytest.raises(ValueError, match=r"missing \[1\]"):
        records.shard_paths(str(tmp_path), "train")
    with pytest.raises(ValueError, match=r"^data.train_dir: '.*': the shards of 'train' numbered \[0, 2\] .*"
                                         r"missing \[1\]"):
        records.shard_paths(str(tmp_path), "train", "data.train_dir")


@pytest.fixture(scope="module")
def tokenizer_export(tiny_decoder_run):
    return os.path.join(tiny_decoder_run, "tokenizer", "export")


def test_pretokenize_slices_cover_the_split_and_match_the_api(tokenizer_export, tmp_path, monkeypatch):
    """Two processes' slices together hold every readable record once, in order, with
    the codes `SeedTokenizer.encode` gives; a corrupt record is skipped and counted."""
    examples = [synthetic.make_example(i, 5, 32) for i in range(9)]
    source = tmp_path / "images"
    os.makedirs(source)
    writer = array_record_module.ArrayRecordWriter(str(source / "eval-00000-of-00001.array_record"), "group_size:1")
    for i, example in enumerate(examples):
        writer.write(records.encode_record(example) if i != 4 else b"broken")
    writer.close()
    paths = records.shard_paths(str(source), "eval")
    tokenizer = api.SeedTokenizer.load(tokenizer_export)
    encoder = pretokenize.LocalEncoder(tokenizer.model)
    out = str(tmp_path / "codes")
    summaries = []
    for process in (0, 1):
        monkeypatch.setattr(jax, "process_index", lambda process=process: process)
        monkeypatch.setattr(jax, "process_count", lambda: 2)
        summaries.append(pretokenize.tokenize_split(encoder, paths, out, "eval", batch_size=2, num_threads=1))
    monkeypatch.undo()
    assert [s["source_records"] for s in summaries] == [4, 5]
    assert sum(s["skipped_records"] for s in summaries) == 1
    written = []
    for path in records.shard_paths(out, "eval"):
        reader = array_record_module.ArrayRecordReader(path)
        written += [code_records.decode_code_record(reader.read()) for _ in range(reader.num_records())]
    kept = [e for i, e in enumerate(examples) if i != 4]
    assert [r["id"] for r in written] == [e["id"] for e in kept]
    assert [r["caption"] for r in written] == [e["caption"] for e in kept]
    pixels = np.stack([preprocess.normalize(preprocess.resize(preprocess.decode_image(e["image"]), 32))
                       for e in kept])
    np.testing.assert_array_equal(np.stack([r["codes"] for r in written]), tokenizer.encode(pixels))
    # A rerun on one process replaces the two processes' shards and summaries.
    assert pretokenize.tokenize_split(encoder, paths, out, "eval", batch_size=4, num_threads=1)["records"] == 8
    assert [os.path.basename(p) for p in records.shard_paths(out, "eval")] == ["eval-00000-of-00001.array_record"]
    assert sorted(f for f in os.listdir(out) if "summary" in f) == ["eval.summary-00000-of-00001.json"]


def test_pretokenize_splits_sharing_a_prefix_write_their_own_code_shards_or_fail(tokenizer_export, tmp_path):
    """Image shards of both splits named `train` (make_records' default prefix): with one
    output prefix the eval split's codes overwrote the train split's unannounced; now that
    names both splits, and `out_prefix` gives each split's codes their own name."""
    dirs = {}
    for name, count in (("train", 3), ("eval", 2)):
        dirs[name] = str(tmp_path / name)
        synthetic.write_shapes_dataset(dirs[name], split="train", num_examples=count, seed=len(name), image_size=32,
                                       num_shards=1, num_workers=1)
    config = get_pretokenize_config()
    config.tokenizer_export, config.out_dir, config.num_threads = tokenizer_export, str(tmp_path / "codes"), 1
    config.splits.train.dir, config.splits.eval.dir, config.splits.eval.prefix = dirs["train"], dirs["eval"], "train"
    with pytest.raises(ValueError, match=r"config.splits.eval and config.splits.train: both would write code shards "
                                         r"named 'train'; .*--config.splits.eval.out_prefix=eval"):
        pretokenize.run(config, str(tmp_path))
    assert not os.path.exists(config.out_dir)
    config.splits.eval.out_prefix = "eval"
    assert pretokenize.run(config, str(tmp_path))
    written = {prefix: list(pipeline.read_records(records.shard_paths(config.out_dir, prefix), pipeline.ALL_RECORDS))
               for prefix in ("train", "eval")}
    assert {prefix: len(rows) for prefix, rows in written.items()} == {"train": 3, "eval": 2}


@pytest.mark.parametrize("case", ["own_split", "another_split"])
def test_pretokenize_refuses_to_write_codes_over_image_records_and_keeps_them(tokenizer_export, tmp_path, case):
    """out_dir = the train images' folder. Code shards named as them (here 2 image shards,
    1 process) made process 0 remove the image shards of another count (a same-count run
    replaced them): those of the train split itself, or, for an eval split written as
    `train`, the train split's before it read them (eval runs first)."""
    train_dir, eval_dir = str(tmp_path / "train"), str(tmp_path / "eval")
    train_paths = synthetic.write_shapes_dataset(train_dir, split="train", num_examples=3, seed=0, image_size=32,
                                                 num_shards=2, num_workers=1)
    eval_paths = synthetic.write_shapes_dataset(eval_dir, split="eval", num_examples=2, seed=1, image_size=32,
                                                num_shards=1, num_workers=1)
    splits = {"train": train_paths} if case == "own_split" else {"train": eval_paths, "codes": train_paths}
    with pytest.raises(ValueError, match="out_dir: .* holds image records read here .* named as the 'train' code"):
        pretokenize.pretokenize(tokenizer_export, splits, train_dir, batch_size=2, num_threads=1)
    assert records.shard_paths(train_dir, "train") == train_paths
    assert not records.existing_shards(train_dir, "codes")
    summaries = pretokenize.pretokenize(tokenizer_export, {"codes": train_paths}, train_dir, batch_size=2,
                                        num_threads=1)
    assert summaries["codes"]["records"] == 3  # another prefix in the same folder is fine


def test_pretokenize_killed_while_writing_a_summary_reruns_the_shard(tmp_path, monkeypatch):
    """A run killed while it wrote a shard's summary left it cut short beside the finished
    shard; every rerun then took the shard as done and failed reading the summary."""
    paths = synthetic.write_shapes_dataset(str(tmp_path / "images"), split="train", num_examples=3, seed=0,
                                           image_size=16, num_shards=1, num_workers=1)

    class Encoder:
        image_size = 16

        def __call__(self, pixels):
            return np.zeros((len(pixels), 32), np.int32)

    def killed(data, f, **kwargs):
        f.write(json.dumps(data)[:5])
        raise KeyboardInterrupt  # how a kill (SIGINT, or the end of a job's time) stops a write

    out = str(tmp_path / "codes")
    monkeypatch.setattr(pretokenize.json, "dump", killed)
    with pytest.raises(KeyboardInterrupt):
        pretokenize.tokenize_split(Encoder(), paths, out, "train", batch_size=2, num_threads=1)
    monkeypatch.undo()
    assert pretokenize.tokenize_split(Encoder(), paths, out, "train", batch_size=2, num_threads=1)["records"] == 3


def test_pretokenize_writes_a_finished_shard_again_for_another_tokenizer_export_or_dtype(tmp_path):
    """A rerun after the tokenizer export was replaced (retrained, or resumed with more
    steps) kept the finished shards, and SEED-OPT trained on the old export's codes; so
    did a rerun in float32 of a split encoded in bfloat16, whose codes differ."""
    paths = synthetic.write_shapes_dataset(str(tmp_path / "images"), split="train", num_examples=3, seed=0,
                                           image_size=16, num_shards=1, num_workers=1)

    class Encoder:
        image_size = 16

        def __init__(self, code):
            self.code = code

        def __call__(self, pixels):
            return np.full((len(pixels), 32), self.code, np.int32)

    def written_codes():
        reader = array_record_module.ArrayRecordReader(records.shard_paths(out, "train")[0])
        return {int(code_records.decode_code_record(reader.read())["codes"][0]) for _ in range(reader.num_records())}

    out = str(tmp_path / "codes")
    run = functools.partial(pretokenize.tokenize_split, in_paths=paths, out_dir=out, prefix="train", batch_size=2,
                            num_threads=1)
    assert run(Encoder(1), tokenizer="export-a")["tokenizer"] == "export-a"
    run(Encoder(2), tokenizer="export-a")  # the same export: the shard is done
    assert written_codes() == {1}
    assert run(Encoder(3), tokenizer="export-b")["tokenizer"] == "export-b"
    assert written_codes() == {3}
    assert run(Encoder(4), tokenizer="export-b", dtype="bfloat16")["dtype"] == "bfloat16"
    run(Encoder(5), tokenizer="export-b", dtype="bfloat16")
    assert written_codes() == {4}
    assert run(Encoder(6), tokenizer="export-b", dtype="float32")["dtype"] == "float32"
    assert written_codes() == {6}


def test_pretokenize_writes_a_finished_shard_again_for_other_input_records(tmp_path):
    """A rerun into the same out_dir after the image records changed (a split rebuilt with
    more images, or another split's dir) kept the finished shard: SEED-OPT trained on the
    codes of the 3 old images, not the 7 new ones."""
    class Encoder:
        image_size = 16
        encoded = 0

        def __call__(self, pixels):
            self.encoded += len(pixels)
            return np.zeros((len(pixels), 32), np.int32)

    out, encoder = str(tmp_path / "codes"), Encoder()
    run = functools.partial(pretokenize.tokenize_split, encoder, out_dir=out, prefix="train", batch_size=2,
                            num_threads=1, tokenizer="export-a")
    # the same records twice (the rerun resumes: nothing encoded), then others
    for folder, count, encoded in (("old", 3, 3), ("old", 3, 3), ("new", 7, 10)):
        paths = synthetic.write_shapes_dataset(str(tmp_path / folder), split="train", num_examples=count, seed=count,
                                               image_size=16, num_shards=1, num_workers=1)
        assert run(paths)["records"] == count and encoder.encoded == encoded
        assert len(list(pipeline.read_records(records.shard_paths(out, "train"), pipeline.ALL_RECORDS))) == count


def test_pretokenize_writes_a_finished_shard_again_for_its_split_rebuilt_at_the_same_size(tmp_path):
    """A split rebuilt with other captions of the same images (make_records --overwrite)
    has shards of the same names and sizes (here exactly; ArrayRecord pads files to 64 KiB
    blocks, so mostly so at any change): the rerun kept the code records of the old
    captions."""
    folder, out = tmp_path / "images", str(tmp_path / "codes")
    os.makedirs(folder)
    path = records.shard_path(str(folder), "train", 0, 1)

    def write(caption: str) -> int:
        writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
        for i in range(3):
            writer.write(records.encode_record({**synthetic.make_example(i, 0, 16), "caption": f"{caption} {i}"}))
        writer.close()
        return os.path.getsize(path)

    def run() -> list[str]:
        pretokenize.tokenize_split(_ZeroEncoder(), [path], out, "train", batch_size=2, num_threads=1)
        return [code_records.decode_code_record(r)["caption"]
                for r in pipeline.read_records(records.shard_paths(out, "train"), pipeline.ALL_RECORDS)]

    size = write("a red circle")
    assert run() == ["a red circle 0", "a red circle 1", "a red circle 2"]
    assert write("a tan circle") == size
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 10**9))  # rebuilt a second later
    assert run() == ["a tan circle 0", "a tan circle 1", "a tan circle 2"]
    # a summary written before modification times were kept names shards by name and size: its shard
    # is kept, not encoded again on the first rerun after the upgrade
    summary_path = os.path.join(out, "train.summary-00000-of-00001.json")
    summary = json.loads(open(summary_path).read())
    summary["inputs"]["shards"] = [shard[:2] for shard in summary["inputs"]["shards"]]
    records.write_json(summary_path, summary)
    write("a red circle")
    assert run() == ["a tan circle 0", "a tan circle 1", "a tan circle 2"]


class _ZeroEncoder:
    """Stands in for `pretokenize.LocalEncoder`: 16-px images -> codes of zeros; counts them."""
    image_size = 16

    def __init__(self):
        self.encoded = 0

    def __call__(self, pixels):
        self.encoded += len(pixels)
        return np.zeros((len(pixels), 32), np.int32)


def _write_image_records(folder, good: list[bool]) -> list[str]:
    """One shard `train-00000-of-00001` in `folder` of a 16-px shapes record where `good`,
    a corrupt one (3 bytes, too short for a header) elsewhere; returns its path."""
    os.makedirs(folder)
    path = records.shard_path(str(folder), "train", 0, 1)
    writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
    for i, is_good in enumerate(good):
        writer.write(records.encode_record(synthetic.make_example(i, 0, 16)) if is_good else b"bad")
    writer.close()
    return [path]


def test_a_record_damaged_on_disk_is_skipped_by_pretokenize_and_the_code_readers(tmp_path):
    """An image or code record whose chunk fails its checksum raised a RuntimeError from
    the reader, which ended the run; it is now skipped and counted as a corrupt one."""
    os.makedirs(tmp_path / "images")
    images = [records.shard_path(str(tmp_path / "images"), "train", 0, 1)]
    write_with_a_damaged_record(images[0], [records.encode_record(synthetic.make_example(i, 0, 16))
                                            for i in range(4)], 1)
    summary = pretokenize.tokenize_splits(_ZeroEncoder(), {"train": images}, str(tmp_path / "codes"), batch_size=2,
                                          num_threads=1)["train"]
    assert (summary["records"], summary["skipped_records"]) == (3, 1)
    codes = str(tmp_path / "codes.array_record")
    write_with_a_damaged_record(codes, [code_records.encode_code_record(f"r{i}", f"caption {i}", np.full(32, i))
                                        for i in range(4)], 2)
    skipped = pipeline.SkipCounter()
    assert [r["id"] for r in sequences.read_code_records([codes], pipeline.ALL_RECORDS, skipped)] == ["r0", "r1", "r3"]
    assert skipped.count == 1


def test_pretokenizing_an_all_corrupt_split_fails_naming_it(tmp_path):
    """A split of which every record was skipped wrote empty code shards, and training on
    them failed later naming the shards ("0 records, fewer than the 1 processes"); it now
    fails once written, naming the split, its counts and why a record was skipped, and
    removes the split's empty shard and summary, so a rerun reads the split again and
    fails alike. A good split's shard stays done."""
    splits = {"good": _write_image_records(tmp_path / "good", [True] * 3),
              "train": _write_image_records(tmp_path / "corrupt", [False] * 5)}
    out, encoder = str(tmp_path / "codes"), _ZeroEncoder()
    run = functools.partial(pretokenize.tokenize_splits, encoder, splits, out, batch_size=2, num_threads=1)
    message = (r"pretokenize train: no record of the split .*corrupt/train-00000-of-00001.array_record\.\.\. could "
               r"be tokenized: 5 of its 5 records skipped \(this process's first: corrupt record: only 3 bytes, too "
               r"short for a header\); its empty code shards in .*codes were removed")
    for _ in range(2):  # the rerun resumes the good split's shard (nothing encoded) and fails alike
        with pytest.raises(ValueError, match=message):
            run()
        assert encoder.encoded == 3
        assert sorted(os.listdir(out)) == ["good-00000-of-00001.array_record", "good.summary-00000-of-00001.json"]


def test_pretokenizing_a_split_again_once_its_records_decode_writes_them(tmp_path, monkeypatch):
    """A split none of whose images decoded (here: a codec missing) left its empty shard
    and summary, taken as done: the rerun once the images decoded failed at once from
    them, having read no record."""
    paths = _write_image_records(tmp_path / "images", [True] * 3)
    out, encoder = str(tmp_path / "codes"), _ZeroEncoder()
    run = functools.partial(pretokenize.tokenize_splits, encoder, {"train": paths}, out, batch_size=2, num_threads=1)

    def no_codec(data):
        raise ValueError("undecodable image (no codec)")

    monkeypatch.setattr(preprocess, "decode_image", no_codec)
    with pytest.raises(ValueError, match=r"3 of its 3 records skipped \(this process's first: undecodable image"):
        run()
    monkeypatch.undo()
    assert run()["train"]["records"] == 3 and encoder.encoded == 3


_PRETOKENIZE_ON_TWO_PROCESSES = """
import json
import sys
import jax
flags = dict(a.split("=") for a in sys.argv[2:] if "=" in a)
jax.distributed.initialize(flags["--coordinator_address"], int(flags["--num_processes"]), int(flags["--process_id"]))
import numpy as np
from seed_jax.data import records
from seed_jax.trainers import pretokenize
class ZeroEncoder:
    image_size = 16
    def __call__(self, pixels):
        return np.zeros((len(pixels), 32), np.int32)
folder = sys.argv[1]
for name in ("half", "corrupt"):
    paths = records.shard_paths(f"{folder}/{name}", "train")
    try:
        summaries = pretokenize.tokenize_splits(ZeroEncoder(), {name: paths}, f"{folder}/codes", batch_size=2,
                                                num_threads=1)
        print("summary", json.dumps(summaries[name]["records"]))
    except ValueError as error:
        print("error", error)
"""


def test_two_processes_pretokenize_a_split_one_of_whose_slices_is_all_corrupt(tmp_path, repo_root):
    """An all-corrupt split fails on every process, judged on the split's totals: a
    process whose slice alone is all corrupt (the second half of `half`) writes an empty
    shard and no error, while the other process's slice holds the split's records."""
    _write_image_records(tmp_path / "half", [True] * 4 + [False] * 4)
    _write_image_records(tmp_path / "corrupt", [False] * 8)
    outputs = run_two_processes(repo_root, [str(tmp_path)], program=("-c", _PRETOKENIZE_ON_TWO_PROCESSES))
    reported = [[line for line in out.splitlines() if line.startswith(("summary", "error"))] for out in outputs]
    assert [lines[0] for lines in reported] == ["summary 4", "summary 0"]  # this process's records
    for lines in reported:
        assert len(lines) == 2 and re.match(r"error pretokenize corrupt: .* 8 of its 8 records skipped \(this "
                                            r"process's first: corrupt record", lines[1])
    assert len(records.shard_paths(str(tmp_path / "codes"), "half")) == 2


def test_codes_written_with_another_tokenizer_export_are_refused(tmp_path):
    """`data.codes_dir` from a standalone pretokenize run is checked against the
    tokenizer export SEED-OPT trains with, where the shard summaries name theirs."""
    exports = {}
    for name in ("a", "b"):
        exports[name] = tmp_path / name
        os.makedirs(exports[name] / "params")
        (exports[name] / "model.json").write_text("{}")
        (exports[name] / "params" / "x").write_bytes(name.encode())
    codes = tmp_path / "codes"
    os.makedirs(codes)
    records.write_json(str(codes / "eval.summary-00000-of-00001.json"), {"records": 3})  # older: cannot tell
    records.write_json(str(codes / "train.summary-00000-of-00001.json"),
                       {"records": 3, "tokenizer": weights.fingerprint(str(exports["a"]))})
    pretokenize.check_written_with(str(codes), ["train", "eval"], str(exports["a"]))
    with pytest.raises(ValueError, match=r"data.codes_dir: .*train.summary-00000-of-00001.json says its codes were "
                                         r"written with another tokenizer export than '.*b'"):
        pretokenize.check_written_with(str(codes), ["train", "eval"], str(exports["b"]))


def test_an_export_fingerprint_follows_its_files(tmp_path):
    export = tmp_path / "export"
    os.makedirs(export / "params" / "sub")
    (export / "model.json").write_text("{}")
    (export / "params" / "sub" / "a").write_bytes(b"12")
    first = weights.fingerprint(str(export))
    assert weights.fingerprint(str(export)) == first
    (export / "params" / "sub" / "a").write_bytes(b"13")
    changed = weights.fingerprint(str(export))
    assert changed != first
    (export / "params" / "sub" / "a").rename(export / "params" / "sub" / "b")
    assert weights.fingerprint(str(export)) not in (first, changed)


def test_the_demo_pretokenizes_a_tokenizer_runs_own_array_record_images(tmp_path, monkeypatch):
    """A reused tokenizer run trained on ArrayRecord shards elsewhere (data.source=array_record):
    its images were once looked for in TOKENIZER_WORKDIR/data, which only the synthetic
    source writes (a FileNotFoundError)."""
    config = get_config("tiny")
    tok_config = config.tokenizer.copy_and_resolve_references()
    data_dir = str(tmp_path / "elsewhere")
    for split, prefix in (("train", "shapes_train"), ("eval", "shapes_eval")):
        for path in synthetic.write_shapes_dataset(data_dir, split=split, num_examples=2, seed=0, image_size=16,
                                                   num_shards=1, num_workers=1):
            os.rename(path, path.replace(f"{split}-", f"{prefix}-"))
    tok_config.data.update(source="array_record", train_dir=data_dir, train_prefix="shapes_train",
                           eval_dir=data_dir, eval_prefix="shapes_eval")
    read = {}

    def pretokenize_splits(export, splits, out_dir, **_):
        read.update({prefix: [os.path.basename(p) for p in paths] for prefix, paths in splits.items()})
        for prefix in splits:
            records.write_array_record_shards([], out_dir, prefix, 1)

    monkeypatch.setattr(pretokenize, "pretokenize", pretokenize_splits)
    seed_opt.code_paths(config, str(tmp_path / "run"), str(tmp_path / "tokenizer"), "unused", tok_config)
    assert read == {config.data.train_prefix: ["shapes_train-00000-of-00001.array_record"],
                    config.data.eval_prefix: ["shapes_eval-00000-of-00001.array_record"]}


def test_a_folder_without_shards_is_named_by_its_config_field(tmp_path):
    """An empty or mistyped shard folder failed with "no ArrayRecord shards named ...
    in ''", naming no setting. Each config field that names the folder is now named."""
    empty = str(tmp_path / "empty")
    os.makedirs(empty)
    tok_config = get_config("tiny").tokenizer.copy_and_resolve_references()
    tok_config.data.update(source="array_record", train_dir=empty, eval_dir=empty)
    with pytest.raises(command_line.ConfigError, match=r"^data.train_dir: no ArrayRecord shards named 'train-\*"):
        tokenizer_trainer.dataset_paths(tok_config, str(tmp_path / "tok"))
    config = get_config("tiny")
    config.data.codes_dir = empty  # a ConfigError, which `python -m seed_jax.main` prints alone, as each here
    with pytest.raises(command_line.ConfigError, match=r"^data.codes_dir: no ArrayRecord shards named"):
        seed_opt.code_paths(config, str(tmp_path / "run"), None, "unused", tok_config)
    with pytest.raises(command_line.ConfigError, match=rf"^the tokenizer run in {re.escape(str(tmp_path / 'tok'))} "
                                                       r"\(its config\.json\): data\.train_dir: no ArrayRecord"):
        config.data.codes_dir = ""  # the images of a finished tokenizer run, moved since it trained
        seed_opt.code_paths(config, str(tmp_path / "run"), str(tmp_path / "tok"), "unused", tok_config)
    with pytest.raises(command_line.ConfigError, match=r"^data.codes_dir: required unless the tokenizer is trained"):
        seed_opt.code_paths(config, str(tmp_path / "run"), None, "unused", None)
    splits = get_pretokenize_config().splits
    splits.train.dir = empty
    with pytest.raises(FileNotFoundError, match=r"^config.splits.train.dir: no ArrayRecord shards named"):
        pretokenize.split_paths(splits)


def test_a_codes_dir_of_image_records_is_refused_saying_why_before_the_model_is_built(tiny_decoder_run, tmp_path,
                                                                                      monkeypatch):
    """data.codes_dir at image-caption shards (pretokenize's input, not its output) failed
    once the model was built (a converted OPT loads for minutes) with "hold 0 readable
    records", saying not why. It fails before, naming the first record's fault."""
    config = get_config("tiny")
    config.tokenizer_workdir = os.path.join(tiny_decoder_run, "tokenizer")
    config.data.codes_dir = os.path.join(tiny_decoder_run, "tokenizer", "data")  # the tokenizer run's images

    def built(*args, **kwargs):
        raise AssertionError("the model was built")

    monkeypatch.setattr(seed_opt, "create_model", built)
    with pytest.raises(command_line.ConfigError, match=r"^eval.num_examples: 16 requested, .* hold 0 readable "
                                                       r"records \(the first skipped: corrupt code record: "):
        seed_opt.train(config, str(tmp_path / "run"))


def _model_json_exports(folder) -> dict[str, str]:
    """kind -> an export of a default SEED tokenizer or OPT in `folder` holding model.json
    alone: what the config checks read."""
    exports = {}
    for kind, model_config in (("seed_tokenizer", SeedTokenizerConfig()), ("opt", OPTConfig())):
        exports[kind] = str(folder / kind)
        os.makedirs(exports[kind])
        weights.write_config(exports[kind], kind, model_config)
    exports["stage1"] = str(folder / "stage1")  # as `seed_jax.export --stage=stage1` records it
    os.makedirs(exports["stage1"])
    weights.write_config(exports["stage1"], "seed_tokenizer", SeedTokenizerConfig(), info={"steps": {"stage1": 4}})
    return exports


@pytest.mark.parametrize("field, value, message", [
    ("tokenizer_export", "/no/export", r"^config.tokenizer_export: /no/export: not an export \(model.json missing\)"),
    ("tokenizer_export", "opt", r"^config.tokenizer_export: .*: holds a 'opt' model, expected 'seed_tokenizer'"),
    ("tokenizer_export", "stage1", r"^config.tokenizer_export: .*stage1 holds a tokenizer trained through stage I only"),
    ("dtype", "fp32", r"^config.dtype: expected one of \['bfloat16', 'float32'\], got 'fp32'"),
    ("batch_size", 0, r"^config.batch_size: expected an integer >= 1, got 0"),
    ("num_threads", -1, r"^config.num_threads: expected an integer >= 0, got -1")])
def test_pretokenize_settings_that_cannot_run_fail_naming_them(tmp_path, field, value, message):
    """Each failed as a traceback once the export was read (or, a `batch_size` of 0, encoded
    the whole split as one batch); now a ConfigError naming the field, before any work."""
    exports = _model_json_exports(tmp_path)
    config = get_pretokenize_config()
    config.tokenizer_export, config.out_dir = exports["seed_tokenizer"], str(tmp_path / "codes")
    config.splits.train.dir = str(tmp_path / "images")
    synthetic.write_shapes_dataset(config.splits.train.dir, split="train", num_examples=2, seed=0, image_size=32,
                                   num_shards=1, num_workers=1)
    config[field] = exports.get(value, value)
    with pytest.raises(command_line.ConfigError, match=message):
        pretokenize.run(config, str(tmp_path))
    assert not os.path.exists(config.out_dir)


@pytest.mark.parametrize("field, value, message", [
    ("tokenizer_export", "/no/export", r"^tokenizer_export: /no/export: not an export \(model.json missing\)"),
    ("tokenizer_export", "opt", r"^tokenizer_export: .*: holds a 'opt' model, expected 'seed_tokenizer'$"),
    ("tokenizer_export", "stage1", r"^tokenizer_export: .*stage1 holds a tokenizer trained through stage I only .*"
                                   r"; export the run after stage II"),
    ("init.opt", "/no/opt", r"^init.opt: /no/opt: not an export \(model.json missing\)"),
    ("init.opt", "seed_tokenizer", r"^init.opt: .*: holds a 'seed_tokenizer' model, expected 'opt'$")])
def test_exports_that_are_missing_or_of_another_kind_fail_naming_their_field(tmp_path, field, value, message):
    """A missing `tokenizer_export` or `init.opt` failed naming only its path, as the path's
    own error, and a stage-I `tokenizer_export` trained on its untrained codes; each is
    named as the field now, before any work."""
    exports = _model_json_exports(tmp_path)
    config = get_config("tiny")
    config.tokenizer_export = exports["seed_tokenizer"]
    config.update_from_flattened_dict({field: exports.get(value, value)})
    with pytest.raises(command_line.ConfigError, match=message):
        seed_opt.train(config, str(tmp_path / "wd"))
    assert not os.path.exists(tmp_path / "wd")


@pytest.fixture(scope="module")
def seed_opt_run(tiny_decoder_run, tmp_path_factory):
    config = get_config("tiny")
    config.unlock()
    config.tokenizer_workdir = os.path.join(tiny_decoder_run, "tokenizer")
    config.decoder_export = os.path.join(tiny_decoder_run, "export")
    config.eval.decode.num_steps = 2
    config.image_embedding = "codebook_projection"  # the path with more parts (rows: the demo, tests above)
    config.prompts.caption = "A picture of"  # not the default: the export must carry it
    config.data.max_text_tokens = 48  # not the default either
    workdir = str(tmp_path_factory.mktemp("seed_opt"))
    assert seed_opt.train(config, workdir)
    return workdir, config


def test_run_writes_metrics_samples_and_a_loadable_export(seed_opt_run, tokenizer_export):
    workdir, config = seed_opt_run
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records_ = [json.loads(line) for line in f]
    evals = {r["stage"]: r for r in records_ if r["split"] == "eval"}
    assert set(evals) == {"image_to_text", "both_directions"}
    for metrics in evals.values():
        assert 0 <= metrics["caption/exact_match"] <= 1 and 0 <= metrics["t2i/retrieval_r1"] <= 1
        assert 0 <= metrics["caption/grammatical"] <= 1 and 0 <= metrics["caption/cell_recall"] <= 1
        assert metrics["num_examples"] == config.eval.num_examples
    train = [r for r in records_ if r["split"] == "train"]
    assert all(r["target_tokens"] > 0 and np.isfinite(r["loss"]) for r in train)
    with open(os.path.join(workdir, "samples.json")) as f:
        samples = json.load(f)["samples"]
    assert len(samples) == config.eval.num_samples
    assert all(len(s["codes_generated_from_caption"]) == 32 for s in samples)
    assert os.path.getsize(os.path.join(workdir, "samples.png")) > 0

    model = api.SeedOPT.load(os.path.join(workdir, "export"), tokenizer=tokenizer_export,
                             diffusion=os.path.join(os.path.dirname(tokenizer_export), "..", "export"), batch_size=2)
    assert model.text_tokenizer is not None and model.image_token_ids["first_code_id"] == 640 + 2
    assert model.max_text_tokens == config.data.max_text_tokens
    assert weights.read_config(os.path.join(workdir, "export"))[2]["codes_per_image"] == model.num_queries == 32
    assert model.tokenizer.batch_size == 2 and model.tokenizer.diffusion.batch_size == 2  # one memory setting
    # the export's folder as text_tokenizer (it holds text_tokenizer.json) was refused for lacking vocab.json
    named = api.SeedOPT.load(os.path.join(workdir, "export"), text_tokenizer=os.path.join(workdir, "export"))
    text = "a small red star at the top"
    assert named.text_tokenizer.encode(text) == model.text_tokenizer.encode(text) != []
    images = [synthetic.make_example(i, 9, 32) for i in range(3)]
    pixels = [np.asarray(preprocess.decode_image(e["image"])) for e in images]
    captions = model.caption(pixels, max_new_tokens=8)
    assert len(captions) == 3 and all(isinstance(c, str) for c in captions)
    assert model.caption(pixels, max_new_tokens=8, num_beams=2)[0] is not None
    assert len(model.answer(pixels, ["what colour?"] * 3, max_new_tokens=4)) == 3
    codes = model.image_codes(["a small red star at the top", "a large blue circle"])
    assert codes.shape == (2, 32) and codes.min() >= 0 and codes.max() < 64
    generated = model.generate_image(["a small red star at the top"], num_steps=2, seed=4)
    assert generated.dtype == np.uint8 and generated.shape[0] == 1
    np.testing.assert_array_equal(generated, model.tokenizer.decode(codes[:1], num_steps=2, seed=4))
    with pytest.raises(ValueError, match="questions: expected a list of 3"):
        model.answer(pixels, ["one"])
    assert seed_opt.train(config, workdir)  # a finished run resumes to the end at once


def test_a_finished_run_given_more_phase_1_steps_is_refused_before_training(seed_opt_run):
    """Phase 2 would resume from its checkpoints, which hold phase 1's parameters as
    they were, and the extra phase-1 training would silently be lost."""
    workdir, config = seed_opt_run
    config = ml_collections.ConfigDict(config.to_dict())
    config.phase1.num_steps += 2
    with pytest.raises(ValueError, match=r"phase1.num_steps \d+: image_to_text would train on"):
        seed_opt.train(config, workdir)


def test_a_tokenizer_with_another_codebook_is_refused_before_the_model_loads(seed_opt_run, tokenizer_export,
                                                                            monkeypatch):
    """`SeedOPT.load` checked only the tokenizer's sizes: one of the same sizes with other
    codes (the tokenizer run retrained in place) had its codes misread silently."""
    export = os.path.join(seed_opt_run[0], "export")
    tokenizer = api.SeedTokenizer.load(tokenizer_export)
    assert weights.read_config(export)[2]["tokenizer_codebook"] == tokenizer.codebook_digest  # loads, as above
    codebook = tokenizer.model.quantize.codebook
    codebook.value = codebook.value + 1e-3
    loaded = []
    monkeypatch.setattr(weights, "load_model", lambda *args, **kwargs: loaded.append(args))
    with pytest.raises(ValueError, match=r"^tokenizer: its codebook \(digest [0-9a-f]{16}\) is not the one this "
                                         r"SEED-OPT export was trained with \(digest [0-9a-f]{16}, of tokenizer_export"):
        api.SeedOPT.load(export, tokenizer=tokenizer)
    assert not loaded


def test_t2i_retrieval_embeds_captions_as_the_tokenizers_training_cleaned_them():
    """A tokenizer trained on `blip_caption`-cleaned captions ("a red star") is scored on
    them: t2i retrieval embeds a record's raw "A red star." as its training wrote it."""
    import dataclasses

    from flax import nnx
    from helpers import TINY_QFORMER, TINY_TOKENIZER

    from seed_jax.data import text as caption_text
    from seed_jax.evaluators.code_retrieval import CodeRetrieval
    from seed_jax.evaluators.retrieval import recall_at_k
    from seed_jax.models.tokenizer import SeedTokenizer

    wordpiece = caption_text.grammar_wordpiece(["a", "red", "star"])
    caption_tokenizer = caption_text.TextTokenizer(wordpiece, 8, wordpiece.token_to_id("[PAD]"))
    config = dataclasses.replace(TINY_TOKENIZER, qformer=dataclasses.replace(TINY_QFORMER, vocab_size=128))
    model = SeedTokenizer(config, rngs=nnx.Rngs(0))
    tok_config = ml_collections.ConfigDict({"data": {"caption_processor": "blip_caption"}})
    cleaned = CodeRetrieval(model, caption_tokenizer, process_caption=seed_opt.caption_processor(None, tok_config))
    raw = CodeRetrieval(model, caption_tokenizer)
    np.testing.assert_allclose(cleaned.caption_features(["A red star."]), raw.caption_features(["a red star"]),
                               atol=1e-6)
    assert not np.allclose(raw.caption_features(["A red star."]), raw.caption_features(["a red star"]), atol=1e-3)
    # Hits are judged on cleaned captions too: two images' "a red star" and "A red star." are one text to the
    # tokenizer (tied features); compared raw, the second image's codes missed on the tie's order alone.
    codes = np.zeros((2, TINY_QFORMER.num_queries), np.int32)
    assert cleaned.recall(codes, ["a red star", "A red star."], ["x", "y"])["r1"] == 1.0
    # "none" (the demos'): what raw captions scored before
    codes, captions = np.arange(2 * 32).reshape(2, 32), ["a red star", "A red star."]
    before = recall_at_k(raw.code_features(codes), raw.caption_features(captions), captions, group_rows=False)
    assert raw.recall(codes, captions) == {k[4:]: v for k, v in before.items() if k.startswith("i2t_")}
    # a tokenizer export's processor is the config's (SEED's blip_caption by default), checked before training
    config = get_config("tiny")
    config.tokenizer_export = "/ckpt/seed_v1_converted"
    assert seed_opt.caption_processor(config, None)("A red star.") == "a red star"
    config.caption_tokenizer.caption_processor = "lavis"
    with pytest.raises(ValueError, match="caption_tokenizer.caption_processor: expected one of .*'lavis'"):
        seed_opt.check_config(config)


def test_a_tokenizer_export_without_a_caption_vocabulary_fails_naming_the_field():
    """With `tokenizer_export`, t2i retrieval reads the Q-Former's BERT vocab.txt from
    `caption_tokenizer.vocab_file`; left empty (as the demo and tiny presets leave it), the
    run failed with "vocab_file: '' does not exist", no field of the config, in a traceback.
    It now names it in a ConfigError (`python -m seed_jax.main` prints it alone)."""
    config = get_config("tiny")
    config.tokenizer_export = "/ckpt/seed_v1_converted"
    heads = types.SimpleNamespace(config=types.SimpleNamespace(with_itc_heads=True,
                                                               qformer=types.SimpleNamespace(with_text=True)))
    with pytest.raises(command_line.ConfigError, match=r"^caption_tokenizer\.vocab_file: '' does not exist"):
        seed_opt.code_retrieval(config, heads, config.tokenizer_export, None, None)


def test_a_tokenizer_without_retrieval_heads_trains_without_t2i_metrics(text, tmp_path, caplog):
    """SEED v1 converted without --qformer has no Q-Former text branch nor ITC heads: the
    evaluation's t2i retrieval failed on them with an AttributeError once OPT was built.
    Such a tokenizer now trains SEED-OPT, warned of, with every metric but t2i/*."""
    import dataclasses

    from flax import nnx
    from helpers import TINY_QFORMER, TINY_TOKENIZER

    from seed_jax.models.tokenizer import SeedTokenizer

    config = dataclasses.replace(TINY_TOKENIZER, with_itc_heads=False,
                                 qformer=dataclasses.replace(TINY_QFORMER, with_text=False))
    run = get_config("tiny")
    run.tokenizer_export = "/exports/seed_v1"  # no caption_tokenizer.vocab_file: none is read
    with caplog.at_level("WARNING"):
        retrieval = seed_opt.code_retrieval(run, SeedTokenizer(config, rngs=nnx.Rngs(0)), run.tokenizer_export,
                                            None, None)
    assert retrieval is None
    assert re.search(r"tokenizer_export: the tokenizer /exports/seed_v1 has no Q-Former text branch .* no t2i/\* "
                     r"metrics \(convert SEED v1 with --qformer", caplog.text)
    model_config = OPTConfig(vocab_size=text.vocab_size, width=32, depth=1, num_heads=2, mlp_dim=64,
                             max_positions=128, extra_tokens=64 + 2)
    image = sequences.ImageTokens.after_vocabulary(text.vocab_size, 64)
    records_ = [{"id": f"r{i}", "caption": "a red star", "codes": np.arange(32) + i} for i in range(2)]
    evaluator = seed_opt.Evaluator(run, records_, image, text, retrieval, str(tmp_path), "", "")
    metrics = evaluator(weights.build("opt", model_config), 1, "image_to_text")
    assert "caption/exact_match" in metrics and metrics["num_examples"] == 2
    assert not [k for k in metrics if k.startswith("t2i/")]


def test_caption_scores_by_part_and_on_a_runs_splits(seed_opt_run):
    references = ["a large red circle at the top left", "a small blue star in the centre"]
    generated = ["a large red circle at the top left", "a small blue cross in the centre"]
    scores = caption_codes.score_captions(generated, references)
    assert scores["caption/exact_match"] == 0.5 and scores["caption/shape_accuracy"] == 0.5
    assert scores["caption/colour_accuracy"] == scores["caption/cell_recall"] == 1.0
    assert caption_codes.score_captions(["a dog", "a cat"], ["a dog", "a bird"]) == {"caption/exact_match": 0.5}
    workdir, config = seed_opt_run
    model = api.SeedOPT.load(os.path.join(workdir, "export"))
    # captioned with the prompts it was trained with (once always the defaults)
    assert model.prompts == sequences.Prompts(**config.prompts.to_dict()) and model.prompts.caption == "A picture of"
    for split in ("train", "eval"):
        scores = caption_codes.score_split(model, os.path.join(workdir, "codes"), split, num_examples=8,
                                           batch_size=4, max_new_tokens=8)
        assert scores["num_examples"] == 8 and scores["skipped_records"] == 0
        assert 0 <= scores["caption/exact_match"] <= 1 and 0 <= scores["caption/grammatical"] <= 1


def test_caption_codes_counts_the_loaded_model_or_split_cannot_take_are_usage_errors(seed_opt_run, monkeypatch):
    """`caption_codes --max_new_tokens` past the model's positions, or `--num_examples` past
    the split's records, ended in a traceback (naming no flag for the count); both are now
    usage errors once the export has loaded, before any caption is generated."""
    from absl import app

    workdir, _ = seed_opt_run
    monkeypatch.setattr(caption_codes, "caption_all", lambda *args, **kwargs: pytest.fail("captions generated"))
    flag_values = dict(export=os.path.join(workdir, "export"), codes_dir=os.path.join(workdir, "codes"),
                       split="eval", num_examples=8, max_new_tokens=None)
    for changed, message in [(dict(max_new_tokens=10 ** 6), r"^--max_new_tokens: expected an integer in 1\.\.\d+"),
                             (dict(num_examples=10 ** 6), "--num_examples: 1000000 requested, .* hold \\d+ readable")]:
        monkeypatch.setattr(caption_codes, "FLAGS", types.SimpleNamespace(**{**flag_values, **changed}))
        with pytest.raises(app.UsageError, match=message):
            caption_codes.main(["caption_codes"])


def test_score_split_counts_any_caption_of_a_records_image(tmp_path):
    """On a split with a record per caption (COCO: 5 per image) an image's records give
    one greedy caption; it matches when it is any caption of the record's image."""
    writer = array_record_module.ArrayRecordWriter(str(tmp_path / "eval-00000-of-00001.array_record"), "group_size:1")
    for image, name in enumerate(("a.jpg", "b.jpg")):
        for k in range(2):
            writer.write(code_records.encode_code_record(name if k == 0 else f"{name}#{k}", f"{name} caption {k}",
                                                         np.full(32, image)))
    writer.close()

    class FirstCaption:  # writes the first caption of the image whose codes it reads
        num_queries = 32
        builder = types.SimpleNamespace(image=types.SimpleNamespace(num_codes=2))  # codes 0 and 1

        def caption_codes(self, codes, max_new_tokens):
            return [f"{'ab'[row[0]]}.jpg caption 0" for row in codes]

    scores = caption_codes.score_split(FirstCaption(), str(tmp_path), "eval", num_examples=pipeline.ALL_RECORDS)
    assert scores == {"caption/exact_match": 1.0, "num_examples": 4.0, "skipped_records": 0.0}


def test_rows_with_the_same_codes_are_captioned_once_in_order_of_first_appearance():
    """An image's several caption records (COCO: 5) hold its codes each; they were
    captioned once per record, the same greedy caption five times."""
    calls = []

    class Numbering:  # captions a row by its first code, recording each call's rows
        def caption_codes(self, codes, max_new_tokens):
            calls.append(codes[:, 0].tolist())
            return [f"caption {row[0]}" for row in codes]

    codes = np.repeat(np.array([7, 3, 7, 9, 3, 5])[:, None], 32, axis=1)
    captions = caption_codes.caption_all(Numbering(), codes, batch_size=2, max_new_tokens=4)
    assert captions == [f"caption {c}" for c in (7, 3, 7, 9, 3, 5)]
    assert calls == [[7, 3], [9, 5]]  # distinct rows, in the order they first appear


def test_a_finished_tokenizer_run_is_reused_with_its_own_config(tiny_decoder_run, tmp_path, caplog):
    config = get_config("tiny")
    config.unlock()
    config.tokenizer_workdir = os.path.join(tiny_decoder_run, "tokenizer")
    config.tokenizer.data.max_text_length = 7  # not how that run was trained
    written = os.path.getmtime(os.path.join(config.tokenizer_workdir, "export", weights.CONFIG_FILE))
    with caplog.at_level("WARNING"):
        directory, export, run_config = tokenizer_trainer.ensure_trained(config, str(tmp_path))
    [warning] = [r.getMessage() for r in caplog.records if "tokenizer.data.max_text_length" in r.getMessage()]
    assert f"tokenizer.data.max_text_length: {run_config.data.max_text_length} -> 7" in warning
    assert directory == config.tokenizer_workdir and export == os.path.join(directory, "export")
    assert os.path.getmtime(os.path.join(export, weights.CONFIG_FILE)) == written  # current: not written again
    assert weights.read_config(export)[2]["steps"] == {name: run_config[name].num_steps
                                                       for name in ("stage1", "stage2")}
    assert run_config.data.max_text_length == get_config("tiny").tokenizer.data.max_text_length != 7
    assert run_config.clip_text.to_dict() == config.tokenizer.clip_text.to_dict()
    assert not os.listdir(tmp_path)  # nothing trained here


def test_decoder_export_is_required_unless_the_config_says_otherwise(tiny_decoder_run, tmp_path):
    config = get_config("tiny")
    config.unlock()
    assert seed_opt.decoder_export(config) == ""
    config.decoder_export = os.path.join(tiny_decoder_run, "export")
    assert seed_opt.decoder_export(config) == config.decoder_export
    config.decoder_export = str(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="decoder_export: no diffusion export at .*missing"):
        seed_opt.decoder_export(config)
    # a ConfigError in training, which `python -m seed_jax.main` prints without a traceback, before any work
    with pytest.raises(command_line.ConfigError, match="^decoder_export: no diffusion export at .*missing"):
        seed_opt.train(config, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run" / "tokenizer")
    config.decoder_export_required = False  # the demo's: the decoder demo may not have run
    assert seed_opt.decoder_export(config) == ""


def _run_clip_text(tok_dir: str, seed_offset: int = 0):
    """The CLIP text encoder of the tokenizer run in `tok_dir`, drawn again (with its seed
    moved by `seed_offset`: another run's)."""
    from seed_jax import export

    tok_config = export.read_workdir_config(tok_dir)
    tok_config.seed += seed_offset
    return tokenizer_trainer.create_clip_text(tok_config, parallel.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}))


def test_a_decoder_trained_for_another_tokenizer_run_is_refused_or_paints_nothing(tiny_decoder_run, caplog):
    """A decoder conditions on its tokenizer run's CLIP text encoder (what the codes'
    generation embeddings imitate). One trained for a run with another CLIP (here another
    seed) painted samples.png from embeddings it never saw, without a word."""
    tok_dir, decoder = os.path.join(tiny_decoder_run, "tokenizer"), os.path.join(tiny_decoder_run, "export")
    clip_text, other_clip = _run_clip_text(tok_dir), _run_clip_text(tok_dir, seed_offset=1)
    assert seed_opt.paired_decoder(decoder, clip_text, tok_dir, required=True) == decoder
    assert seed_opt.paired_decoder("", clip_text, tok_dir, required=True) == ""
    with pytest.raises(command_line.ConfigError, match=rf"decoder_export {re.escape(decoder)}: its text encoder is "
                                                       r"not the CLIP text encoder of the tokenizer run in .* "
                                                       r"\(first at text_encoder\."):
        seed_opt.paired_decoder(decoder, other_clip, tok_dir, required=True)
    with caplog.at_level("WARNING"):
        assert seed_opt.paired_decoder(decoder, other_clip, tok_dir, required=False) == ""
    assert "samples get no images" in caplog.text


def test_a_decoder_of_the_run_drawn_again_by_another_compiler_is_paired(tiny_decoder_run, tmp_path):
    """The run's random CLIP text encoder, drawn again under other XLA flags (or on another
    backend), differs in its last bits (3e-7 relative: the tests' flags against XLA's
    defaults): its decoder was refused as another tokenizer run's."""
    tok_dir = os.path.join(tiny_decoder_run, "tokenizer")
    redrawn = decoder_with_text_encoder_changed(
        os.path.join(tiny_decoder_run, "export"), str(tmp_path / "redrawn"),
        lambda text_encoder: {k: v * np.float32(1 + 1e-6) for k, v in text_encoder.items()})
    assert seed_opt.paired_decoder(redrawn, _run_clip_text(tok_dir), tok_dir, required=True) == redrawn


def test_a_decoder_export_without_a_text_encoder_is_refused_as_such(tiny_decoder_run):
    """The tokenizer's export passed as decoder_export holds no `text_encoder.*`: the
    refusal said its text encoder was another run's CLIP, as if it had one."""
    tok_dir = os.path.join(tiny_decoder_run, "tokenizer")
    with pytest.raises(ValueError, match=r"export: it holds no text encoder \(a 'seed_tokenizer' export\), so "
                                         r"it cannot be told to be a decoder of the tokenizer run in "):
        seed_opt.paired_decoder(os.path.join(tok_dir, "export"), _run_clip_text(tok_dir), tok_dir, required=True)


def test_training_refuses_a_decoder_of_another_tokenizer_run_before_pretokenizing(tiny_decoder_run, tmp_path):
    """`train` checks the pairing (not only `paired_decoder` alone), and before it writes
    WORKDIR/codes: pre-tokenizing a real split takes hours, and the refusal came after."""
    name = "text_encoder.final_norm.scale"
    other = decoder_with_text_encoder_changed(os.path.join(tiny_decoder_run, "export"), str(tmp_path / "other"),
                                               lambda text_encoder: {name: text_encoder[name] + 1.0})
    config = get_config("tiny")
    config.tokenizer_workdir, config.decoder_export = os.path.join(tiny_decoder_run, "tokenizer"), other
    workdir = tmp_path / "wd"
    with pytest.raises(command_line.ConfigError, match=rf"decoder_export {re.escape(other)}: its text encoder is "
                                                       rf"not the CLIP text encoder .* \(first at {re.escape(name)}\)"):
        seed_opt.train(config, str(workdir))  # a ConfigError: `python -m seed_jax.main` prints it alone
    assert not (workdir / "codes").exists()


def test_demo_presets_share_the_tokenizer_and_decoder_demos_default_workdirs():
    from configs.decoder import get_config as decoder_config
    from seed_jax import config_files

    tokenizer_demo = config_files.default_workdir("tokenizer", "demo")
    assert tokenizer_demo == os.path.join("workdirs", "tokenizer_demo")
    assert get_config().tokenizer_workdir == decoder_config().tokenizer_workdir == tokenizer_demo
    assert get_config().decoder_export == os.path.join(config_files.default_workdir("decoder", "demo"), "export")
    assert not get_config().decoder_export_required
    assert get_config("tiny").tokenizer_workdir == decoder_config("tiny").tokenizer_workdir == ""


def test_image_codes_emit_32_codes_then_the_end_token(seed_opt_run):
    workdir, _ = seed_opt_run
    model = api.SeedOPT.load(os.path.join(workdir, "export"))
    image = model.builder.image
    ids, mask = model._left_padded([model.builder.generation_prompt("a small red star")])
    allowed = [(image.first_code, image.first_code + image.num_codes)] * 32 + [(image.end, image.end + 1)]
    tokens = model.generate(ids, 33, attention_mask=mask, allowed=allowed, temperature=1.0, seed=3)
    assert np.all((tokens[:, :32] >= image.first_code) & (tokens[:, :32] < image.first_code + 64))
    assert np.all(tokens[:, 32] == image.end)
    with pytest.raises(ValueError, match="images need the SEED tokenizer"):
        model.caption(np.zeros((1, 32, 32, 3), np.uint8))


def _packed_batch() -> dict[str, np.ndarray]:
    """Eight packed rows of two sequences each, 7 targets per row."""
    rng = np.random.default_rng(0)
    segments = np.asarray([[1] * 10 + [2] * 12 + [0] * 2] * 8, np.int32)
    positions = np.asarray([list(range(10)) + list(range(12)) + [0, 0]] * 8, np.int32)
    ids = rng.integers(0, 70, (8, 25)).astype(np.int32)
    index = np.asarray([[3, 4, 5, 8, 15, 16, 20, 0]] * 8, np.int32)  # the last is padding
    return {"inputs": ids[:, :-1], "segment_ids": segments, "positions": positions, "target_index": index,
            "target_ids": np.take_along_axis(ids, index + 1, 1),
            "target_mask": np.asarray([[1] * 7 + [0]] * 8, np.int32)}


def _lm_model(code_dim=0, **rates):
    """A tiny SEED-OPT with LoRA (codes as rows, or through the codebook projection when
    `code_dim` > 0), `rates` its dropout rates."""
    config = OPTConfig(vocab_size=60, width=32, depth=2, num_heads=4, mlp_dim=64, max_positions=32,
                       extra_tokens=10, code_dim=code_dim, lora_rank=4, **rates)
    model = weights.build("opt", config)
    if code_dim:
        weights.assign(model, {"code_vectors": np.random.default_rng(1).standard_normal((8, code_dim))})
    return model


_RUN = ml_collections.ConfigDict(dict(axis_rules=parallel.DEFAULT_RULES, seed=0))


def _lm_stage(mesh, code_dim=0, num_steps=3, stage_index=None, **rates):
    """The shared train step with lm_loss for `_lm_model(code_dim, **rates)`'s adapters,
    `stage_index` its keys' (`loop.step_key`); returns (setup, run config)."""
    stage = ml_collections.ConfigDict(dict(lr=1e-2, init_lr=1e-3, end_lr=1e-3, warmup_steps=1, num_steps=num_steps,
                                           weight_decay=0.0, b1=0.9, b2=0.999))
    setup = loop.prepare_stage(_lm_model(code_dim, **rates), seed_opt.trainable(ml_collections.ConfigDict(
        {"train_all": False})), seed_opt.lm_loss, stage, _RUN, mesh, stage_index=stage_index)
    return setup, _RUN


def _lm_losses(mesh, code_dim, num_steps=3, **rates):
    """lm_loss on packed rows (one batch: its loss must fall), through the shared train step."""
    setup, run = _lm_stage(mesh, code_dim, num_steps, **rates)
    batch = global_batches.global_batch(_packed_batch(), mesh, run.axis_rules)
    state, losses = setup.state, []
    for _ in range(num_steps):
        state, metrics = setup.train_step(state, setup.frozen, batch)
        losses.append(float(metrics["loss"]))
    return losses


DROPPING = dict(dropout=0.2, attention_dropout=0.2, lora_dropout=0.2)


@pytest.mark.parametrize("code_dim, rates", [(0, {}), (4, {}), (0, DROPPING)], ids=["rows", "projected", "dropout"])
def test_packed_lora_step_same_loss_on_1_and_8_devices(code_dim, rates):
    """With dropout the 8-device step draws the masks the 1-device one does."""
    losses_1 = _lm_losses(parallel.make_mesh({"data": 1}, devices=jax.devices()[:1]), code_dim, **rates)
    losses_8 = _lm_losses(parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}), code_dim, **rates)
    np.testing.assert_allclose(losses_8, losses_1, rtol=1e-4)
    assert losses_1[-1] < losses_1[0]
    if rates:  # dropout is on: the losses are not those without it
        plain = _lm_losses(parallel.make_mesh({"data": 1}, devices=jax.devices()[:1]), code_dim)
        assert not np.allclose(losses_1, plain, rtol=1e-4)


@pytest.mark.parametrize("code_dim, rates, train_all", [(0, {}, False), (4, {}, False), (0, DROPPING, False),
                                                     (4, {}, True)], ids=["rows", "projected", "dropout", "all"])
def test_lm_step_same_gradients_on_1_and_8_devices(code_dim, rates, train_all):
    """Every trainable parameter's lm_loss gradient (the adapters', or with `train_all`, as
    the demo trains, every one's but the codebook's) on a data x fsdp and on a data x fsdp x
    tensor mesh is the 1-device one (`assert_same_gradients`; attention key biases' are 0):
    XLA's partitioner once got the decoder's kernel gradients wrong on such a mesh while the
    losses still matched."""
    trainable = seed_opt.trainable(ml_collections.ConfigDict({"train_all": train_all}))

    def gradients(mesh):
        return stage_gradients(_lm_model(code_dim, **rates), trainable, seed_opt.lm_loss, _RUN, mesh, _packed_batch())

    reference = gradients(parallel.make_mesh({"data": 1}, devices=jax.devices()[:1]))
    for axes in ({"data": 2, "fsdp": 4}, {"data": 2, "fsdp": 2, "tensor": 2}):
        grads = gradients(parallel.make_mesh(axes))
        assert_same_gradients(grads, reference, zero=("k_bias",) if train_all else ())
    assert split_over_fsdp_and_tensor(grads), "no gradient is split over fsdp and tensor"


def _decoding_programs(seed_opt: api.SeedOPT, monkeypatch) -> list[str]:
    """The compiled text of each program `seed_opt` decodes with from here on, in order."""
    texts = []
    for name in ("_generate", "_beam_search"):
        def compiling(*args, jitted=getattr(seed_opt, name), **kwargs):
            texts.append(jitted.lower(*args, **kwargs).compile().as_text())
            return jitted(*args, **kwargs)

        monkeypatch.setattr(seed_opt, name, compiling)
    return texts


def test_decoding_on_a_mesh_gives_one_devices_tokens_without_exchanges_at_each_step(monkeypatch):
    """A SeedOPT given the data x fsdp mesh its weights are split over (as training splits
    them) decodes each device's rows alone, greedy, with beams and sampled: the 1-device tokens, and
    no cross-device operation in the decode loop's body (the weights are gathered before
    it). Without the mesh, every layer of every step exchanges activations over fsdp: the
    known positive that shows the check sees them."""
    model = _lm_model()
    ids = np.random.default_rng(0).integers(2, 60, (8, 5)).astype(np.int32)
    options = [dict(eos_id=None), dict(eos_id=None, num_beams=2), dict(temperature=0.8, top_k=8, top_p=0.9, seed=1)]
    expected = [api.SeedOPT(model, batch_size=8).generate(ids, 12, **o) for o in options]
    mesh = parallel.make_mesh({"data": 2, "fsdp": 4})
    state = nnx.state(model)
    nnx.update(model, jax.device_put(state, parallel.state_shardings(state, mesh, parallel.DEFAULT_RULES)))
    assert "fsdp" in str(model.layers.fc1.kernel.get_value().sharding.spec)

    left_split = api.SeedOPT(model, batch_size=8)
    programs = _decoding_programs(left_split, monkeypatch)
    np.testing.assert_array_equal(left_split.generate(ids, 12, **options[0]), expected[0])
    assert collectives_in_loop_bodies(programs[0])

    rows_apart = api.SeedOPT(model, batch_size=8, mesh=mesh)
    programs = _decoding_programs(rows_apart, monkeypatch)
    for o, tokens in zip(options, expected):
        np.testing.assert_array_equal(rows_apart.generate(ids, 12, **o), tokens)
    assert len(programs) == 3
    for program in programs:
        assert collectives_in_loop_bodies(program) == []


def test_load_onto_a_mesh_reads_each_weight_into_its_split_and_decodes_as_one_device(tmp_path):
    """`SeedOPT.load` took no mesh: every weight was read whole onto one device. Given a
    mesh, each is read split by the axis rules (none whole on a device), logits are computed
    for each device's own rows (the 32-wide activations hold 2 of the 8 rows), and logits and
    greedy tokens are those of the load without one."""
    export = _opt_export(str(tmp_path / "opt"))
    ids = np.random.default_rng(0).integers(2, 60, (8, 5)).astype(np.int32)
    whole = api.SeedOPT.load(export, batch_size=8)
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    split = api.SeedOPT.load(export, batch_size=8, mesh=mesh)
    model = split.model
    P = jax.sharding.PartitionSpec
    for variable, spec in [(model.embed_tokens, P("tensor", "fsdp")), (model.layers.fc1.kernel, P(None, "fsdp", "tensor")),
                           (model.layers.self_attn.query, P(None, "fsdp", "tensor", None))]:
        sharding = variable.get_value().sharding
        assert sharding == jax.sharding.NamedSharding(mesh, spec), (sharding, spec)
    assert all(len(v.sharding.device_set) == 8 and not v.sharding.is_fully_replicated
               for v in (model.embed_tokens.get_value(), model.layers.fc2.kernel.get_value()))
    program = split._logits.lower(split._state, ids, np.ones_like(ids)).compile().as_text()
    assert set(re.findall(r"f32\[\d+,5,32\]", program)) == {"f32[2,5,32]"}, "a device computes others' rows"
    np.testing.assert_allclose(split.logits(ids), whole.logits(ids), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(split.generate(ids, 6, eos_id=None), whole.generate(ids, 6, eos_id=None))
    with pytest.raises(ValueError, match=r"axis_rules: \('embed', 'model'\) is not a \(logical name, mesh axes\)"):
        api.SeedOPT.load(export, mesh=mesh, axis_rules=[("embed", "model")])


def test_the_train_step_keeps_the_batch_split_on_a_mesh_with_data_and_fsdp(capfd):
    """The token and position lookups, with tables split over fsdp along their width and
    ids over data x fsdp, made XLA copy the whole batch's (B,L,D) embeddings to every
    device ("involuntary full rematerialization") once data > 1, as on gpu8x8 and
    tpu_v4_32 (benchmarks/memory_plan.py)."""
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    setup, run = _lm_stage(mesh)
    batch = global_batches.global_batch(_packed_batch(), mesh, run.axis_rules)
    assert_compiles_without_full_rematerialization(setup, batch, capfd)


@pytest.mark.parametrize("rates", [{}, DROPPING], ids=["plain", "dropout"])
def test_the_train_step_draws_new_dropout_masks_at_each_step(rates):
    """The same parameters and batch at steps 0, 0 and 1: with dropout the loss repeats
    for the same step and changes with the step (its key folds the step in); without
    dropout it is the same at every step."""
    mesh = parallel.make_mesh({"data": 1}, devices=jax.devices()[:1])
    setup, run = _lm_stage(mesh, **rates)
    batch = global_batches.global_batch(_packed_batch(), mesh, run.axis_rules)

    def loss_at(step):  # the step donates its state: each call gets a copy
        state = {**jax.tree.map(jnp.copy, setup.state), "step": jnp.asarray(step, jnp.int32)}
        return float(setup.train_step(state, setup.frozen, batch)[1]["loss"])

    first, again, second = loss_at(0), loss_at(0), loss_at(1)
    assert first == again
    assert (first != second) == bool(rates)


@pytest.mark.parametrize("rates", [{}, DROPPING], ids=["plain", "dropout"])
def test_each_phase_draws_its_own_dropout_masks_and_without_dropout_steps_as_before(rates):
    """The phases' train steps at the same step, parameters and batch (phase i trains
    under stage index i, `test_each_phase_trains_under_its_own_stage_index`): with
    dropout their step k drew the same masks (the step folded into the seed alone) and
    now each draws its own; without dropout (the demos) either phase's step is, bit for
    bit, the step under the seed's key alone, as before."""
    mesh = parallel.make_mesh({"data": 1}, devices=jax.devices()[:1])

    def step_under(stage_index):
        setup, run = _lm_stage(mesh, stage_index=stage_index, **rates)
        batch = global_batches.global_batch(_packed_batch(), mesh, run.axis_rules)
        state = {**setup.state, "step": jnp.asarray(1, jnp.int32)}
        state, metrics = setup.train_step(state, setup.frozen, batch)
        return float(metrics["loss"]), jax.device_get(state)

    (phase1_loss, phase1), (phase2_loss, phase2), (_, seed_only) = step_under(0), step_under(1), step_under(None)
    assert (phase1_loss != phase2_loss) == bool(rates)
    if not rates:
        for state in (phase1, phase2):
            jax.tree.map(np.testing.assert_array_equal, state, seed_only)


def test_each_phase_trains_under_its_own_stage_index(seed_opt_run, monkeypatch):
    """`seed_opt.train` passes each phase's index to `loop.run_stage` (the keys' stage
    index): the phases of a run (here a finished one, resumed to its end) draw apart."""
    workdir, config = seed_opt_run
    indices = {}
    run_stage = loop.run_stage

    def recording(**kwargs):
        indices[kwargs["name"]] = kwargs.get("stage_index")
        return run_stage(**kwargs)

    monkeypatch.setattr(loop, "run_stage", recording)
    assert seed_opt.train(config, workdir)
    assert indices == {name: index for index, (name, _) in enumerate(seed_opt.PHASES)}


def test_an_export_after_num_steps_lowered_records_the_checkpoints_steps(seed_opt_run, tmp_path):
    """A finished run's copy whose export was lost (e.g. killed before writing it),
    resumed with phase1.num_steps below its last checkpoint: phase 1 resumes from that
    checkpoint as it is, and the export recorded the config's steps, not those it was
    trained to."""
    workdir, config = seed_opt_run
    copy = str(tmp_path / "run")
    shutil.copytree(workdir, copy)
    shutil.rmtree(os.path.join(copy, "export"))
    os.remove(os.path.join(copy, "DONE.json"))
    config = ml_collections.ConfigDict(config.to_dict())
    trained = config.phase1.num_steps
    config.phase1.num_steps = trained - 1
    assert seed_opt.train(config, copy)
    assert weights.read_config(os.path.join(copy, "export"))[2]["steps"] == {"phase1": trained,
                                                                             "phase2": config.phase2.num_steps}
    no_checkpoints = checkpointing.trained_steps(str(tmp_path / "none"), list(seed_opt.PHASES))
    assert no_checkpoints == {"phase1": 0, "phase2": 0}  # a stage of no steps trained none, not None


def test_a_run_resumed_with_another_packing_bin_count_is_refused(seed_opt_run):
    """A phase's checkpoint holds the packer's position in rows packed with
    `data.num_packing_bins` bins: another count restored it into other rows (or failed
    inside grain, an index beyond its fewer bins)."""
    workdir, config = seed_opt_run
    config = ml_collections.ConfigDict(config.to_dict())
    trained = config.data.num_packing_bins
    config.data.num_packing_bins = trained // 2
    with pytest.raises(ValueError, match=rf"data.num_packing_bins: {trained} -> {trained // 2}\).*"
                                         rf"--config.data.num_packing_bins={trained}\b"):
        seed_opt.train(config, workdir)


def test_codebook_projection_starts_from_a_converted_opt_without_code_rows(tmp_path):
    """init.opt + image_embedding="codebook_projection": the export must keep its vocabulary
    (--image_tokens=0); its weights load, the code vectors are the tokenizer's codebook at unit RMS,
    and the appended rows start in the export's distribution: <img>, </img> as the converter's
    rows of the same seed, the projected codes at the rows' mean plus a tenth of their spread."""
    base = OPTConfig(vocab_size=60, width=32, depth=2, num_heads=4, mlp_dim=64, max_positions=32)
    base_model = weights.build("opt", base, seed=3)
    plain, with_rows = str(tmp_path / "plain"), str(tmp_path / "with_rows")
    weights.save(plain, "opt", base, weights.flat_params(base_model))
    extended = weights.build("opt", OPTConfig(**{**base.__dict__, "extra_tokens": 6}))
    weights.save(with_rows, "opt", extended.config, weights.flat_params(extended))
    config = get_config("tiny")
    config.unlock()
    config.image_embedding, config.lora.rank, config.train_all = "codebook_projection", 2, False
    config.init.opt = with_rows
    with pytest.raises(ValueError, match="convert with --image_tokens=0"):
        seed_opt.model_config(config, 50, num_codes=4, code_dim=8)
    config.init.opt = plain
    # a text tokenizer wider than the export's vocabulary: its last ids would be read as <img>, </img>, codes
    with pytest.raises(ValueError, match=r"init.opt: the export's vocabulary \(60\) is smaller than the text "
                                         r"tokenizer's \(61"):
        seed_opt.model_config(config, 61, num_codes=4, code_dim=8)
    m_config = seed_opt.model_config(config, 60, num_codes=4, code_dim=8)
    assert (m_config.extra_tokens, m_config.code_dim, m_config.lora_rank) == (6, 8, 2)
    codebook = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32) * 0.1
    mesh = parallel.make_mesh({"data": 1}, devices=jax.devices()[:1])
    model = seed_opt.create_model(m_config, config, mesh, codebook)
    np.testing.assert_allclose(model.embed_tokens[...], base_model.embed_tokens[...])
    vectors = np.asarray(model.code_vectors[...])
    np.testing.assert_allclose(vectors, codebook / np.sqrt(np.mean(codebook ** 2)), rtol=1e-6)
    table = np.asarray(base_model.embed_tokens[...], np.float64)
    converted_markers = convert_opt.new_rows(opt.IMAGE_MARKERS, config.seed)(table)
    np.testing.assert_allclose(model.embed_extra[...], converted_markers, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(model.code_projection.bias[...], table.mean(0), rtol=1e-5, atol=1e-7)
    codes = vectors @ np.asarray(model.code_projection.kernel[...]) + table.mean(0)
    noise_rms = np.sqrt(np.mean(((codes - table.mean(0)) / table.std(0)) ** 2))
    assert 0.06 < noise_rms < 0.15, noise_rms  # NEW_ROW_NOISE of the spread (0.105); the old init gave 0.87
    with pytest.raises(ValueError, match="codebook: expected shape"):
        seed_opt.create_model(m_config, config, mesh, codebook[:3])
    config.image_embedding = "pixels"
    with pytest.raises(ValueError, match="image_embedding: expected 'rows' or 'codebook_projection'"):
        seed_opt.model_config(config, 50, num_codes=4, code_dim=8)


def _opt_export(path: str, **fields) -> str:
    """A tiny OPT export at `path` with 4 codes appended as rows (`fields`: its config's)."""
    config = OPTConfig(vocab_size=60, width=32, depth=2, num_heads=4, mlp_dim=64, max_positions=32, extra_tokens=6,
                       **fields)
    weights.save(path, "opt", config, weights.flat_params(weights.build("opt", config)))
    return path


def _rates(config: OPTConfig) -> tuple[float, float, float]:
    return config.dropout, config.attention_dropout, config.lora_dropout


def test_training_takes_the_converted_opts_dropout_rates_unless_the_config_sets_them(tmp_path, caplog):
    """seed_opt_2.7b leaves model.dropout and attention_dropout None: the export's rates
    (a conversion records config.json's); a rate the config sets wins. An export written
    before exports recorded them trains at 0.0, with a warning saying so."""
    config = get_config("seed_opt_2.7b")
    assert config.model.dropout is None and config.model.attention_dropout is None and config.lora.dropout == 0.0
    config.lora.dropout = 0.05
    config.init.opt = _opt_export(str(tmp_path / "converted"), dropout=0.1)
    with caplog.at_level("WARNING"):
        assert _rates(seed_opt.model_config(config, 50, num_codes=4, code_dim=8)) == (0.1, 0.0, 0.05)
        config.model.attention_dropout = 0.2
        assert _rates(seed_opt.model_config(config, 50, num_codes=4, code_dim=8)) == (0.1, 0.2, 0.05)
    assert "records no" not in caplog.text
    old = _opt_export(str(tmp_path / "old"), dropout=0.1)
    meta_path = os.path.join(old, weights.CONFIG_FILE)
    with open(meta_path) as f:
        meta = json.load(f)
    for name in ("dropout", "attention_dropout", "lora_dropout"):
        del meta["config"][name]
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    config.init.opt = old
    with caplog.at_level("WARNING"):
        assert _rates(seed_opt.model_config(config, 50, num_codes=4, code_dim=8)) == (0.0, 0.2, 0.05)
    assert f"init.opt: {old} records no dropout (written before" in caplog.text
    caplog.clear()
    config.model.dropout = 0.1
    with caplog.at_level("WARNING"):
        assert _rates(seed_opt.model_config(config, 50, num_codes=4, code_dim=8)) == (0.1, 0.2, 0.05)
    assert "records no" not in caplog.text


def test_models_trained_from_scratch_take_the_configs_rates_and_the_demos_are_0():
    for preset in ("demo", "tiny"):
        config = get_config(preset)
        assert (config.model.dropout, config.model.attention_dropout, config.lora.dropout) == (0.0, 0.0, 0.0)
    config.model.dropout, config.model.attention_dropout, config.lora.dropout = 0.1, 0.05, 0.2
    assert _rates(seed_opt.model_config(config, 50, num_codes=4, code_dim=8)) == (0.1, 0.05, 0.2)


@pytest.mark.parametrize("path, value, message", [
    ("model.dropout", 1.0, r"model.dropout: expected a dropout rate in \[0, 1\), got 1.0"),
    ("model.attention_dropout", -0.5, r"model.attention_dropout: expected a dropout rate in \[0, 1\), got -0.5"),
    ("lora.dropout", 1.5, r"lora.dropout: expected a dropout rate in \[0, 1\), got 1.5"),
])
def test_bad_dropout_rates_fail_with_the_other_model_settings(path, value, message):
    """Checked up front with dtype, image_embedding and lora (`check_config`), as `train` does first."""
    config = get_config("tiny")
    group, name = path.split(".")
    config[group][name] = value
    with pytest.raises(ValueError, match=message):
        seed_opt.check_config(config)


def test_a_phase_batch_size_that_does_not_split_over_the_mesh_fails_naming_it():
    """On one process such a batch was replicated, silently: each of the 8 devices
    computed the whole batch."""
    config = get_config("tiny")
    config.phase2.batch_size = 12
    with pytest.raises(ValueError, match=r"^phase2\.batch_size: 12 does not divide by 8, "):
        seed_opt.check_config(config)


def test_without_init_opt_every_model_rate_must_be_set():
    config = get_config("seed_opt_2.7b")
    seed_opt.check_config(config)  # None: the converted OPT's
    config.init.opt = ""
    with pytest.raises(ValueError, match="model.dropout: expected a dropout rate in .*got None"):
        seed_opt.check_config(config)


def test_lm_loss_is_the_masked_mean_cross_entropy_of_the_targets():
    config = OPTConfig(vocab_size=60, width=32, depth=2, num_heads=4, mlp_dim=64, max_positions=32, extra_tokens=10)
    model = weights.build("opt", config)
    rng = np.random.default_rng(3)
    segments = np.asarray([[1] * 9 + [2] * 5] * 2, np.int32)
    batch = {"inputs": rng.integers(0, 70, (2, 14)).astype(np.int32), "segment_ids": segments,
             "positions": np.asarray([list(range(9)) + list(range(5))] * 2, np.int32),
             "target_index": np.asarray([[2, 7, 10, 0], [1, 3, 12, 13]], np.int32),
             "target_ids": rng.integers(0, 70, (2, 4)).astype(np.int32),
             "target_mask": np.asarray([[1, 1, 1, 0], [1, 1, 1, 1]], np.int32)}
    loss, (metrics, _) = seed_opt.lm_loss(model, batch, None)
    logits, _ = model(batch["inputs"], positions=batch["positions"], segment_ids=segments,
                      logits_at=batch["target_index"])
    shifted = np.asarray(logits, np.float64) - np.asarray(logits, np.float64).max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    picked = np.take_along_axis(log_probs, batch["target_ids"][..., None], -1)[..., 0]
    mask = batch["target_mask"].astype(bool)
    np.testing.assert_allclose(float(loss), -picked[mask].mean(), rtol=1e-5)
    assert float(metrics["target_tokens"]) == 7


@pytest.mark.slow
def test_two_processes_on_loopback_pretokenize_train_and_export(tiny_decoder_run, tmp_path, repo_root):
    """The multi-host path with parameters sharded across processes (fsdp over both
    processes' devices): each process pre-tokenizes its slice, trains on its rows, decodes
    its held-out rows (`eval.rows_apart`), process 0 paints the samples, and the export
    holds the last checkpoint's whole parameters.
    Process 0 writes the export slower than the others wait for it at exit: they returned
    at once, and JAX's shutdown aborted both processes with the export cut short."""
    workdir = tmp_path / "wd"
    run_two_processes(repo_root, [f"--config={repo_root}/configs/seed_opt.py:tiny", f"--workdir={workdir}",
                                  f"--config.tokenizer_workdir={tiny_decoder_run}/tokenizer",
                                  f"--config.decoder_export={tiny_decoder_run}/export",
                                  "--config.eval.decode.num_steps=2",
                                  # each generated token costs collectives across the processes:
                                  # the held-out records in one batch, their captions cut short
                                  "--config.eval.batch_size=16", "--config.eval.max_caption_tokens=2",
                                  "--config.eval.rows_apart=True",  # each process gets every row's tokens
                                  "--config.mesh.data=1", "--config.mesh.fsdp=8"],
                      program=("-c", MAIN_WITH_A_SLOW_EXPORT))
    assert (workdir / "DONE.json").exists()
    assert (workdir / "samples.png").stat().st_size > 0  # the decoder's pairing, checked on both processes
    assert sorted(f for f in os.listdir(workdir / "codes") if f.startswith("train-")) == [
        "train-00000-of-00002.array_record", "train-00001-of-00002.array_record"]
    with open(workdir / "metrics.jsonl") as f:
        lines = [json.loads(line) for line in f]
    config = get_config("tiny")
    for phase, key in seed_opt.PHASES:  # written once (by process 0), every step
        assert [r["step"] for r in lines if (r["stage"], r["split"]) == (phase, "train")] == list(
            range(1, config[key].num_steps + 1))
    evals = [r for r in lines if r["split"] == "eval"]
    assert [e["stage"] for e in evals] == ["image_to_text", "both_directions"]
    assert [e["num_examples"] for e in evals] == [config.eval.num_examples] * 2  # every held-out record, once
    trained = checkpoint_params(str(workdir), "both_directions", module=None)
    exported = weights.load_params(str(workdir / "export"))
    assert "layers.fc1.kernel" in trained and set(trained) <= set(exported)
    for key, value in trained.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)


@pytest.mark.slow
def test_two_processes_train_as_one_process_on_the_same_global_batch(repo_root):
    """Each of two processes feeds its half of one global batch, with the parameters
    sharded across both (fsdp over their 8 devices): the losses of three steps equal those
    of one process on 8 devices (float32 reduction order aside)."""
    outputs = run_two_processes(repo_root, [], program=("-c", TWO_PROCESSES_ON_ONE_BATCH))
    reported = [[float(v) for v in line.split()[1:]] for out in outputs for line in out.splitlines()
                if line.startswith("losses")]
    expected = seed_opt_losses_on_one_batch(dict(data=1, fsdp=8))
    assert len(reported) == 2 and len(set(expected)) == 3, outputs
    for losses in reported:
        np.testing.assert_allclose(losses, expected, rtol=1e-6)


@pytest.mark.parametrize("key, value, message", [
    ("dtype", "bf16", "dtype: expected one of"),
    ("image_embedding", "codebook", "image_embedding: expected 'rows' or 'codebook_projection'"),
    ("lora", dict(rank=4, alpha=32.0, targets=("query", "q_proj"), dropout=0.0), r"lora\.targets: \['q_proj'\]"),
    ("keep_checkpoints", 0, "keep_checkpoints: expected an integer >= 1, got 0"),
    ("data", dict(get_config("tiny").data, max_text_tokens=0), "data.max_text_tokens: expected an integer >= 1"),
    ("prompts", dict(caption="A photo of", generate="Generate an image", question="Question: {question}"),
     r"prompts.generate: expected \{caption\}"),
    # lengths that could never fit, checked from the config before the tokenizer is trained
    ("data", dict(get_config("tiny").data, seq_length=256), "data.seq_length 256 exceeds the model's 128 positions"),
    ("data", dict(get_config("tiny").data, seq_length=34), "data.seq_length 34: no sequence fits in a row"),
    ("phase2", dict(get_config("tiny").phase2, max_targets_per_row=32),
     "phase2.max_targets_per_row 32: a text -> image sequence has 33 targets"),
    ("data", dict(get_config("tiny").data, num_threads=-1), r"data.num_threads: expected an integer >= 0, got -1"),
    # evaluation's chunks of held-out records: 0 failed at the first evaluation, after phase 1 trained
    ("eval", dict(get_config("tiny").eval, batch_size=0), r"eval.batch_size: expected an integer >= 1, got 0"),
    ("eval", dict(get_config("tiny").eval, max_caption_tokens=0),
     r"eval.max_caption_tokens: expected an integer >= 1, got 0"),
    # captions longer than the positions left after the caption prompt (38 tokens of 128): once checked by
    # generate at the first evaluation, after phase 1 trained
    ("eval", dict(get_config("tiny").eval, max_caption_tokens=92),
     r"eval.max_caption_tokens 92: the model's 128 positions leave 91 new tokens after the caption prompt's 38 "
     r"\(<s>, an image of 32 codes and prompts.caption 'A photo of'\)"),
    # the held-out records read once the codes were made, naming num_examples; a fraction read them all
    ("eval", dict(get_config("tiny").eval, num_examples=0), r"eval.num_examples: expected an integer >= 1 \(-1: all\)"),
    ("eval", dict(get_config("tiny").eval, num_examples=8.5), r"eval.num_examples: expected an integer >= 1 .*got 8.5"),
    # samples of the first evaluation: 0 failed painting no images, -1 saved all records but the last
    ("eval", dict(get_config("tiny").eval, num_samples=0), r"eval.num_samples: expected an integer >= 1, got 0"),
    ("eval", dict(get_config("tiny").eval, num_samples=-1), r"eval.num_samples: expected an integer >= 1, got -1"),
    # code records given: their shards, once looked for after the tokenizer trained
    ("data", dict(get_config("tiny").data, codes_dir="/no/codes"), r"data.codes_dir: no ArrayRecord shards named 'tr"),
    # a row that holds no sequence's targets (image -> text: a caption token and </s>): every record skipped
    ("phase1", dict(get_config("tiny").phase1, max_targets_per_row=1),
     r"phase1.max_targets_per_row: expected an integer >= 2 \(an image -> text sequence has a caption token"),
    # a negative count skipped the phase without a word; a negative warm-up started mid-cosine
    ("phase1", dict(get_config("tiny").phase1, num_steps=-1), r"^phase1.num_steps: expected an integer >= 0 .*got -1$"),
    ("phase2", dict(get_config("tiny").phase2, warmup_steps=-1), r"^phase2.warmup_steps: expected an integer >= 0"),
    # outside [0, 1], every sequence or none was text -> image, without a word; 0 bins failed in grain
    ("phase2", dict(get_config("tiny").phase2, text_to_image_fraction=1.5),
     r"^phase2.text_to_image_fraction: expected the fraction of sequences that are text -> image, in \[0, 1\], "
     r"got 1.5$"),
    ("phase1", dict(get_config("tiny").phase1, text_to_image_fraction=-0.1), r"^phase1.text_to_image_fraction: "),
    ("data", dict(get_config("tiny").data, num_packing_bins=0), r"^data.num_packing_bins: expected an integer >= 1"),
    # the text tokenizer, once read after the tokenizer trained and its images were pre-tokenized
    ("text_tokenizer", dict(kind="bpe", folder=""), "text_tokenizer.kind: expected 'word_bpe' or 'gpt2_bpe', got 'bpe'"),
    ("text_tokenizer", dict(kind="gpt2_bpe", folder="/no/opt"), "text tokenizer folder: '/no/opt/vocab.json' does not"),
])
def test_bad_model_settings_fail_before_the_tokenizer_and_codes_are_prepared(key, value, message, tmp_path,
                                                                              monkeypatch):
    """dtype (once a bare KeyError), image_embedding, lora targets and the text tokenizer
    were checked only after training the demo tokenizer and pre-tokenizing its images;
    keep_checkpoints 0 (no checkpoint kept) was not checked at all. Each is a ConfigError,
    which `python -m seed_jax.main` prints without a traceback."""
    def prepared(*args, **kwargs):
        raise AssertionError("the tokenizer was prepared before the config was checked")

    monkeypatch.setattr(tokenizer_trainer, "ensure_trained", prepared)
    config = get_config("tiny")
    config.unlock()
    config[key] = ml_collections.ConfigDict(value) if isinstance(value, dict) else value
    with pytest.raises(command_line.ConfigError, match=message):
        seed_opt.train(config, str(tmp_path / "wd"))


@pytest.mark.parametrize("decode, message", [
    (dict(sampler="euler"), r"^eval.decode.sampler: expected one of \['ddim', "),
    (dict(num_steps=0), r"^eval.decode.num_steps: expected an int in 1..1000, got 0"),
    (dict(guidance_scale=float("nan")), r"^eval.decode.guidance_scale: expected a finite number, got nan"),
])
def test_bad_sample_decoding_options_fail_before_the_tokenizer_and_codes_are_prepared(decode, message, tmp_path,
                                                                                       monkeypatch):
    """eval.decode's options, with which a decoder export paints samples.png, were first read
    at the first evaluation, after phase 1 trained, naming sampler / num_steps alone."""
    def prepared(*args, **kwargs):
        raise AssertionError("the tokenizer was prepared before the config was checked")

    monkeypatch.setattr(tokenizer_trainer, "ensure_trained", prepared)
    decoder = str(tmp_path / "decoder")
    os.makedirs(decoder)
    weights.write_config(decoder, "stable_diffusion", StableDiffusionConfig())  # only its config is read
    config = get_config("tiny")
    config.decoder_export = decoder
    seed_opt.check_decode_options(config, decoder)  # the preset's are fine
    config.eval.decode.update(decode)
    with pytest.raises(command_line.ConfigError, match=message):
        seed_opt.train(config, str(tmp_path / "wd"))


def test_one_prefix_for_both_splits_of_the_tokenizer_runs_images_fails_before_they_are_prepared(tmp_path,
                                                                                                  monkeypatch):
    """With data.eval_prefix = data.train_prefix the splits {train: images, eval: images}
    collapsed to the eval split's: SEED-OPT trained and was evaluated on the eval images."""
    def prepared(*args, **kwargs):
        raise AssertionError("the tokenizer was prepared before the config was checked")

    monkeypatch.setattr(tokenizer_trainer, "ensure_trained", prepared)
    config = get_config("tiny")
    config.data.eval_prefix = config.data.train_prefix
    with pytest.raises(ValueError, match="data.train_prefix and data.eval_prefix: both 'train'"):
        seed_opt.train(config, str(tmp_path / "wd"))


@pytest.fixture(scope="module")
def gpu8_stage():
    """SEED-OPT 2.7B's phase-1 train step under the gpu8 layout, shapes alone
    (benchmarks/memory_plan.py), with its mesh."""
    from benchmarks import memory_plan

    config = memory_plan.run_config("gpu8")
    mesh = parallel.make_mesh(config.mesh.to_dict())
    return config, mesh, memory_plan.abstract_stage(config, "phase1", mesh)


def test_the_2_7b_weights_split_over_the_gpu8_mesh(gpu8_stage):
    """No parameter over 1 MiB is replicated, every frozen array over 16 MiB (token and
    position tables, attention projections, fc1, fc2) is split over fsdp, and a device
    holds an eighth of the frozen weights (within 1 %)."""
    _, mesh, stage = gpu8_stage
    assert mesh.size == 8
    frozen = assert_weights_split(stage, devices=8)
    assert {"embed_tokens", "layers.fc1.kernel", "layers.fc2.kernel", "layers.self_attn.query"} <= set(frozen)


@pytest.mark.parametrize("phase", ["phase1", "phase2"])
@pytest.mark.parametrize("layout", ["gpu8", "gpu8x8", "tpu_v4_32"])
def test_the_2_7b_weights_and_optimizer_state_split_over_each_layout(layout, phase):
    """Each layout preset's fsdp x tensor axes split OPT-2.7B's weights (as on gpu8, above)
    and the AdamW state with them, on a device-less mesh of its size (gpu8x8: 64 devices)."""
    from benchmarks import memory_plan

    config = memory_plan.run_config(layout)
    mesh = layout_mesh(config.mesh, memory_plan.layout_devices(layout))
    stage = memory_plan.abstract_stage(config, phase, mesh)
    assert_weights_split(stage, devices=mesh.shape["fsdp"] * mesh.shape["tensor"])
    assert_optimizer_state_split_as_params(stage)
