"""grain pipelines: determinism, resumable iterator state, eval padding, corrupt records."""

import json
import os
import re
import struct
import zlib

import grain
import jax
import numpy as np
import pytest
from array_record.python import array_record_module

from helpers import write_with_a_damaged_record
from seed_jax.data import pipeline, records, synthetic, text


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("shapes"))
    train = synthetic.write_shapes_dataset(directory, split="train", num_examples=96, seed=0, image_size=32,
                                           num_shards=2, num_workers=1)
    return directory, train


def test_shapes_shards_replace_their_own_but_not_other_shards(tmp_path):
    """The shapes world regenerates a split whose settings changed, or whose writing was cut
    short, but refuses to write over shards of the split it did not write (no marker)."""
    directory = str(tmp_path)
    write = lambda count: synthetic.write_shapes_dataset(directory, split="train", num_examples=count,  # noqa: E731
                                                         seed=0, image_size=16, num_shards=1, num_workers=1)
    write(2)
    assert len(grain.sources.ArrayRecordDataSource(write(3))) == 3  # other settings: written again
    marker = json.loads((tmp_path / "train.json").read_text())
    assert marker["num_examples"] == 3 and "complete" not in marker
    records.write_json(str(tmp_path / "train.json"), {"complete": False})  # a write cut short
    assert len(grain.sources.ArrayRecordDataSource(write(3))) == 3
    os.remove(tmp_path / "train.json")  # shards alone: not the shapes world's
    with pytest.raises(ValueError, match="holds 'train' shards the shapes world did not write"):
        write(3)


@pytest.fixture(scope="module")
def example():
    wordpiece = text.grammar_wordpiece(synthetic.caption_vocabulary())
    assert wordpiece.to_str() == text.grammar_wordpiece(synthetic.caption_vocabulary()).to_str()
    pad = wordpiece.token_to_id("[PAD]")
    return pipeline.Example(32, text.TextTokenizer(wordpiece, 20, pad), text.TextTokenizer(wordpiece, 77, pad),
                            pipeline.SkipCounter(), (0.5, 1.0), True)


def test_text_tokenizer_pads_and_marks_cls(example):
    ids, mask = example.text(["a small red circle in the centre"])
    assert ids.shape == (1, 20) and ids.dtype == np.int32
    assert ids[0, 0] == example.text.tokenizer.token_to_id("[CLS]")
    assert mask[0].sum() == 9 and (ids[0, 9:] == example.text.pad_id).all()
    with pytest.raises(TypeError, match="texts"):
        example.text("one string")


def test_train_batches_are_deterministic_and_resume(shards, example):
    _, paths = shards
    first = pipeline.train_iterator(paths, example, global_batch_size=8, seed=3, num_threads=2)
    fresh = pipeline.train_iterator(paths, example, global_batch_size=8, seed=3, num_threads=1)
    batch = next(first)
    np.testing.assert_array_equal(next(fresh)["image"], batch["image"])
    assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.float32
    assert batch["text_ids"].shape == (8, 20) and batch["clip_ids"].shape == (8, 77)
    state = first.get_state()
    expected = [next(first) for _ in range(13)]  # crosses an epoch boundary (96 / 8 = 12)
    second = pipeline.train_iterator(paths, example, global_batch_size=8, seed=3, num_threads=2)
    second.set_state(state)
    for want in expected:
        got = next(second)
        np.testing.assert_array_equal(got["index"], want["index"])
        np.testing.assert_array_equal(got["image"], want["image"])
    epoch = [int(i) for b in expected[:11] for i in b["index"]] + [int(i) for i in batch["index"]]
    assert sorted(epoch) == list(range(96))  # one epoch sees every record once


def test_eval_batches_pad_to_whole_batches(shards, example):
    directory, paths = shards
    batches = list(pipeline.eval_batches(paths, example, num_examples=20, global_batch_size=8, num_threads=2))
    index = np.concatenate([b["index"] for b in batches])
    assert len(batches) == 3 and list(index[:20]) == list(range(20)) and (index[20:] == -1).all()
    labels = pipeline.read_labels(paths, 20)
    assert len(labels) == 20 and all(isinstance(c, str) and c and isinstance(i, str) for c, i in labels)
    for bad in (1000, 0, -2):  # more than the split holds; none, which would fail at the first evaluation
        with pytest.raises(ValueError, match=f"eval.num_examples: {bad} requested, the eval split has"):
            pipeline.eval_batches(paths, example, num_examples=bad, global_batch_size=8)
    # ALL_RECORDS: the whole split (seed1 evaluates on all of Karpathy's test split)
    every = pipeline.eval_batches(paths, example, num_examples=pipeline.ALL_RECORDS, global_batch_size=8)
    size = len(list(pipeline.read_records(paths, pipeline.ALL_RECORDS)))
    index = np.concatenate([b["index"] for b in every])
    assert size > 20 and list(index[:size]) == list(range(size)) and (index[size:] == -1).all()
    assert len(pipeline.read_labels(paths, pipeline.ALL_RECORDS)) == size


def test_a_train_split_with_no_records_for_this_process_fails_naming_it(tmp_path, example):
    path = str(tmp_path / "empty.array_record")
    array_record_module.ArrayRecordWriter(path, "group_size:1").close()
    with pytest.raises(ValueError, match="0 records, fewer than the 1 processes"):
        pipeline.train_iterator([path], example, global_batch_size=4, seed=0, num_threads=1)


@pytest.mark.parametrize("read", ["images", "codes"])
def test_a_train_split_with_no_records_for_some_process_fails_on_every_process(read, tmp_path, example,
                                                                               monkeypatch):
    """One record, two processes: process 1 alone raised (it has none), and process 0,
    which has one, waited for it at the first step until both were killed."""
    from seed_jax.data import code_records, sequences

    path = str(tmp_path / "one.array_record")
    writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
    writer.write(records.encode_record(synthetic.make_example(0, 0, 32)) if read == "images"
                 else code_records.encode_code_record("a", "a caption", np.zeros(32, np.int32)))
    writer.close()
    monkeypatch.setattr(jax, "process_index", lambda: 0)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(ValueError, match="1 records, fewer than the 2 processes"):
        if read == "images":
            pipeline.train_iterator([path], example, global_batch_size=4, seed=0, num_threads=1)
        else:
            sequences.packed_train_iterator([path], None, global_batch_size=4, seed=0)


def test_a_shard_folder_that_is_a_file_or_missing_says_so(shards, tmp_path):
    """A `data.train_dir` naming one of its shards gave "no shards in FILE", as an empty
    folder does; a file, or a folder that does not exist, is now said to be one."""
    directory, train = shards
    with pytest.raises(FileNotFoundError, match=rf"^data.train_dir: no ArrayRecord shards named 'train-.*' in "
                                                rf"'{re.escape(train[0])}': it is a file; give the folder that "
                                                rf"holds the shards \('{re.escape(directory)}'\)$"):
        records.shard_paths(train[0], "train", "data.train_dir")
    with pytest.raises(FileNotFoundError, match=r"in '/no/shards': no such folder$"):
        records.shard_paths("/no/shards", "train")
    # a folder holding shards of other prefixes names them (a split written as make_records' default "train")
    with pytest.raises(FileNotFoundError, match=r"'eval-\*-of-\*.array_record' in '.*'; it holds shards of the "
                                                r"prefixes \['train'\]$"):
        records.shard_paths(directory, "eval")
    with pytest.raises(FileNotFoundError, match=r"'eval-\*-of-\*.array_record' in '.*'$"):  # none: no hint
        records.shard_paths(str(tmp_path), "eval")


@pytest.mark.parametrize("damage", ["truncated", "empty", "not_array_record"])
def test_a_shard_that_is_not_a_readable_array_record_file_is_named(shards, tmp_path, damage):
    """A truncated copy of a shard failed at the run's first read, after the model was
    built, as a bare RuntimeError from array_record naming no file."""
    _, train = shards
    data = {"truncated": open(train[1], "rb").read()[:-5000], "empty": b"", "not_array_record": b"x" * 70000}[damage]
    for i, path in enumerate(train):
        (tmp_path / path.rsplit("/", 1)[1]).write_bytes(data if i == 1 else open(path, "rb").read())
    bad = records.shard_path(str(tmp_path), "train", 1, 2)
    with pytest.raises(ValueError, match=rf"^data.train_dir: '{re.escape(bad)}' \({len(data)} bytes\) is not a "
                                         "readable ArrayRecord shard"):
        records.shard_paths(str(tmp_path), "train", "data.train_dir")


def test_a_record_damaged_on_disk_is_skipped_and_counted(tmp_path, example):
    """A record whose chunk fails its checksum raised a RuntimeError in grain's reading
    thread, which ended the run; it is now a corrupt record like any other."""
    path = str(tmp_path / "damaged.array_record")
    write_with_a_damaged_record(path, [records.encode_record(synthetic.make_example(i, 0, 32)) for i in range(6)], 2)
    ex = pipeline.Example(32, example.text, example.clip_text, pipeline.SkipCounter())
    batch = next(pipeline.train_iterator([path], ex, global_batch_size=5, seed=0, num_threads=1))
    assert sorted(batch["index"].tolist()) == [0, 1, 3, 4, 5] and ex.skipped.count >= 1
    counted = pipeline.Example(32, example.text, example.clip_text, pipeline.SkipCounter())
    batches = list(pipeline.eval_batches([path], counted, num_examples=6, global_batch_size=6, num_threads=1))
    assert batches[0]["index"].tolist() == [0, 1, -1, 3, 4, 5] and counted.skipped.count == 1
    assert [image is None for _, image in pipeline.read_labels([path], 6)] == [False, False, True, False, False, False]


def test_a_record_source_names_the_damaged_records_shard_and_raises_other_read_errors(tmp_path, caplog):
    """Its warning named the first shard, whichever held the record, and every RuntimeError
    read as a corrupt record: a shard cut short while read gave all its records as b"",
    counted as corrupt ones, the run going on without them."""
    paths = [str(tmp_path / f"train-0000{i}-of-00002.array_record") for i in range(2)]
    write_with_a_damaged_record(paths[0], [b"first %d" % i for i in range(2)], 1)
    write_with_a_damaged_record(paths[1], [b"second %d" % i for i in range(3)], 1)
    source = pipeline.RecordSource(paths)
    with caplog.at_level("WARNING"):
        assert [source[i] for i in range(5)] == [b"first 0", b"", b"second 0", b"", b"second 2"]
    assert f"record 1 of {paths[0]}: a record fails its checksum" in caplog.text
    assert caplog.text.count("fails its checksum") == 1  # said once
    second = pipeline.RecordSource(paths[1:])
    with open(paths[1], "r+b") as f:  # cut short once the source is made
        f.truncate(40)
    with pytest.raises(RuntimeError):
        second[0]


def test_corrupt_records_are_skipped_and_counted(tmp_path, example):
    good = [synthetic.make_example(i, 0, 32) for i in range(6)]
    path = str(tmp_path / "mixed.array_record")
    writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
    for i, record in enumerate(good):
        data = records.encode_record(record)
        writer.write(data[: len(data) // 2] if i in (1, 4) else data)
    writer.close()
    ex = pipeline.Example(32, example.text, example.clip_text, pipeline.SkipCounter())
    it = pipeline.train_iterator([path], ex, global_batch_size=4, seed=0, num_threads=1)
    batch = next(it)
    assert sorted(batch["index"].tolist()) == [0, 2, 3, 5]  # one epoch holds exactly the 4 good ones
    assert ex.skipped.count >= 2
    counted = pipeline.Example(32, example.text, example.clip_text, pipeline.SkipCounter())
    batches = pipeline.eval_batches([path], counted, num_examples=6, global_batch_size=6, num_threads=1)
    assert counted.skipped.count == 0  # nothing read until a pass: the batches are not held
    first, second = list(batches), list(batches)
    assert sorted(first[0]["index"].tolist()) == [-1, -1, 0, 2, 3, 5]
    assert counted.skipped.count == 2  # the first pass counts; the second reads alike and does not
    np.testing.assert_array_equal(second[0]["index"], first[0]["index"])
    np.testing.assert_array_equal(second[0]["image"], first[0]["image"])


def test_a_record_with_an_empty_or_blank_caption_is_skipped_and_counted_in_training(tmp_path, example):
    """The tokenizer trained on such a record (stage I contrasting its image with no text,
    stage II distilling an empty prompt's embedding); it is now skipped and counted in
    data/skipped_records, as SEED-OPT's readers skip a code record without a caption."""
    path = str(tmp_path / "captions.array_record")
    writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
    for i in range(6):
        record = synthetic.make_example(i, 0, 32)
        writer.write(records.encode_record({**record, "caption": {1: "", 4: " \n "}.get(i, record["caption"])}))
    writer.close()
    ex = pipeline.Example(32, example.text, example.clip_text, pipeline.SkipCounter())
    batch = next(pipeline.train_iterator([path], ex, global_batch_size=4, seed=0, num_threads=1))
    assert sorted(batch["index"].tolist()) == [0, 2, 3, 5] and ex.skipped.count >= 2
    # a caption that the caption processor cleans to nothing ("..." under blip_caption) is empty too
    cleaned = pipeline.Example(32, example.text, example.clip_text, pipeline.SkipCounter(),
                               process_caption=text.blip_caption)
    good = records.encode_record(synthetic.make_example(0, 0, 32))
    dots = records.encode_record({**synthetic.make_example(1, 0, 32), "caption": "..."})
    assert cleaned.train((0, good), np.random.default_rng(0)) is not None and cleaned.skipped.count == 0
    assert cleaned.train((1, dots), np.random.default_rng(0)) is None and cleaned.skipped.count == 1


def _with_header(image: bytes, caption: str, record_id: str) -> bytes:
    """An image record whose header JSON is written as given (escapes kept), as a tool
    other than `records.encode_record` might write it."""
    header = (f'{{"format":1,"caption":"{caption}","id":"{record_id}","image_length":{len(image)},'
              f'"image_crc32":{zlib.crc32(image)}}}').encode()
    return struct.pack("<I", len(header)) + header + image


def test_a_record_whose_caption_is_not_unicode_text_is_skipped_and_counted(tmp_path, example):
    """A header caption or id holding a lone surrogate (the JSON escape \\ud800, which
    encode_record refuses to write) decoded, and the tokenizer then raised TypeError,
    ending training; it is corrupt, skipped and counted, in training and evaluation."""
    path = str(tmp_path / "surrogate.array_record")
    writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
    for i in range(6):
        record = synthetic.make_example(i, 0, 32)
        bad = {1: ("a \\ud800 b", "one"), 4: ("a caption", "four\\udfff")}.get(i)
        writer.write(_with_header(bytes(record["image"]), *bad) if bad else records.encode_record(record))
    writer.close()
    with pytest.raises(ValueError, match="not Unicode text"):
        records.decode_record(array_record_module.ArrayRecordReader(path).read([1])[0])
    ex = pipeline.Example(32, example.text, example.clip_text, pipeline.SkipCounter())
    batch = next(pipeline.train_iterator([path], ex, global_batch_size=4, seed=0, num_threads=1))
    assert sorted(batch["index"].tolist()) == [0, 2, 3, 5] and ex.skipped.count >= 2
    counted = pipeline.Example(32, example.text, example.clip_text, pipeline.SkipCounter())
    batches = list(pipeline.eval_batches([path], counted, num_examples=6, global_batch_size=6, num_threads=1))
    assert sorted(batches[0]["index"].tolist()) == [-1, -1, 0, 2, 3, 5] and counted.skipped.count == 2
    assert pipeline.read_labels([path], 6)[1] == (None, None)


def test_a_pipeline_of_corrupt_records_raises_instead_of_waiting(tmp_path, example, caplog):
    """grain's error names no cause ("check the filtering logic"): the first skipped
    record says why it was skipped."""
    path = str(tmp_path / "corrupt.array_record")
    writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
    for i in range(8):
        writer.write(records.encode_record(synthetic.make_example(i, 0, 32))[:40])
    writer.close()
    ex = pipeline.Example(32, example.text, example.clip_text, pipeline.SkipCounter())
    it = pipeline.train_iterator([path], ex, global_batch_size=4, seed=0, num_threads=1)
    with caplog.at_level("WARNING"), pytest.raises(ValueError, match="skipped 100.00 %"):
        next(it)
    assert ex.skipped.count >= 8
    assert len(re.findall(r"skipped a record .*: corrupt record: header claims \d+ bytes", caplog.text)) == 1


def test_clip_bpe_reads_its_files_and_matches_transformers(tmp_path):
    """SD's CLIP tokenizer from vocab.json + merges.txt: the same ids as transformers'
    CLIPTokenizer (start, BPE tokens, end, padded with end-of-text; truncated keeping the end)."""
    import json

    from transformers import CLIPTokenizer

    letters = "abcdefghijklmnopqrstuvwxyz"
    tokens = list(letters) + [c + "</w>" for c in letters] + ["re", "red</w>", "<|startoftext|>", "<|endoftext|>"]
    vocab_file, merges_file = str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt")
    with open(vocab_file, "w") as f:
        json.dump({t: i for i, t in enumerate(tokens)}, f)
    with open(merges_file, "w") as f:
        f.write("#version: 0.2\nr e\nre d</w>\n")
    bpe = text.clip_bpe(vocab_file, merges_file)
    assert bpe.get_vocab_size() == len(tokens)
    ours = text.TextTokenizer(bpe, 12, bpe.token_to_id("<|endoftext|>"))
    captions = ["A red dog", "", "red " * 20]
    ids, mask = ours(captions)
    want = CLIPTokenizer(vocab_file, merges_file)(captions, padding="max_length", truncation=True, max_length=12,
                                                 return_tensors="np")
    np.testing.assert_array_equal(ids, want["input_ids"])
    np.testing.assert_array_equal(mask, want["attention_mask"])
    assert ids[0, 2] == tokens.index("red</w>") and ids[2, -1] == tokens.index("<|endoftext|>")


def _opt_bpe_files(folder) -> list[str]:
    """A small OPT vocab.json + merges.txt in `folder` ("red" one token); its tokens by id."""
    import json

    from tokenizers import pre_tokenizers

    from seed_jax.data import opt_text

    tokens = list(opt_text.SPECIAL_TOKENS) + sorted(pre_tokenizers.ByteLevel.alphabet()) + ["Ġr", "Ġre", "Ġred"]
    with open(folder / "vocab.json", "w") as f:
        json.dump({t: i for i, t in enumerate(tokens)}, f)
    with open(folder / "merges.txt", "w") as f:
        f.write("#version: 0.2\nĠ r\nĠr e\nĠre d\n")
    return tokens


def test_gpt2_bpe_reads_opts_vocab_and_merges(tmp_path):
    """OPT's text tokenizer from a folder's vocab.json + merges.txt reads both files
    (transformers 5 ignored the vocab_file/merges_file keywords: an empty vocabulary)."""
    from seed_jax.data import opt_text

    tokens = _opt_bpe_files(tmp_path)
    tok = opt_text.OPTTextTokenizer(opt_text.gpt2_bpe(str(tmp_path)))
    assert tok.tokenizer.token_to_id("Ġred") == len(tokens) - 1 and (tok.bos_id, tok.pad_id) == (2, 1)
    assert tok.encode("a red") == [tokens.index("a"), tokens.index("Ġred")]
    assert tok.decode(tok.encode("a red dog")) == "a red dog"
    # OPT's specials, not GPT-2's: no "<|endoftext|>" added beyond OPT's vocabulary (transformers'
    # GPT-2 default), and "</s>" in text is OPT's end token, as transformers' OPT tokenizer reads it
    assert tok.vocab_size == len(tokens)
    assert max(tok.encode("a <|endoftext|> red")) < len(tokens)
    assert tok.encode("a red</s>") == [tokens.index("a"), tokens.index("Ġred"), tok.eos_id]


def test_gpt2_bpe_reads_a_folder_saved_by_transformers_5_from_its_tokenizer_json(tmp_path):
    """transformers 5's save_pretrained writes tokenizer.json without vocab.json and
    merges.txt: SeedOPT.load(text_tokenizer=) of such a folder (one `convert hf_opt`
    reads) failed, "vocab.json does not exist". Its tokenizer.json reads as the files do."""
    from transformers import GPT2TokenizerFast

    from seed_jax.api.seed_opt import _load_text_tokenizer
    from seed_jax.data import opt_text

    _opt_bpe_files(tmp_path)
    saved = tmp_path / "saved"
    GPT2TokenizerFast(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"),
                      **opt_text.OPT_SPECIAL_TOKENS).save_pretrained(str(saved))
    for name in ("vocab.json", "merges.txt"):  # as transformers 5 saves it (4.x writes them too)
        if (saved / name).exists():
            (saved / name).unlink()
    files, single = (_load_text_tokenizer(str(folder)) for folder in (tmp_path, saved))
    for sample in ["a red dog", "red</s> <pad>x", "ünïcode red"]:
        assert single.encode(sample) == files.encode(sample), sample
        assert single.decode(single.encode(sample)) == files.decode(files.encode(sample)), sample
    assert (single.vocab_size, single.eos_id, single.pad_id) == (files.vocab_size, files.eos_id, files.pad_id)
    with pytest.raises(FileNotFoundError, match=r"'.*empty/vocab.json' does not exist \(OPT's GPT-2 BPE files, or a "
                                                r"tokenizer.json\)"):
        opt_text.gpt2_bpe(str(tmp_path / "empty"))


def test_processes_do_not_shuffle_their_slices_in_lockstep(shards, example, monkeypatch):
    """Process p of P reads records p, p+P, ...; with one shuffle seed on every process the
    records k*P .. k*P+P-1 always met in the same global batch (consecutive captions of one
    image as each other's contrastive negatives) and got the same crop and flip."""
    _, paths = shards
    local = []
    for p in range(2):
        monkeypatch.setattr(pipeline, "_process_slice", lambda p=p: (p, 2))
        it = pipeline.train_iterator(paths, example, global_batch_size=16, seed=3, num_threads=1)
        local.append([next(it) for _ in range(3)])
    first, second = (np.concatenate([b["index"] for b in batches]) for batches in local)
    assert (first % 2 == 0).all() and (second % 2 == 1).all()
    assert np.mean(second == first + 1) < 0.25  # 1.0 in lockstep


def test_reading_an_eval_splits_labels_holds_one_record_at_a_time(tmp_path):
    """read_labels (the captions and image ids of the tokenizer's evaluation, every record
    of Karpathy's test split with seed1: 25k records of 160 KB JPEGs) held every record's
    image bytes at once, to keep their captions."""
    import tracemalloc

    size, count = 200_000, 24
    path = str(tmp_path / "eval-00000-of-00001.array_record")
    writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
    rng = np.random.default_rng(0)
    for i in range(count):
        record_id = f"image{i // 4}" + (f"#{i % 4}" if i % 4 else "")  # 4 captions an image, as make_records
        writer.write(records.encode_record({"image": rng.bytes(size), "caption": f"caption {i}", "id": record_id}))
    writer.close()
    tracemalloc.start()
    try:
        labels = pipeline.read_labels([path], pipeline.ALL_RECORDS)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert labels == [(f"caption {i}", f"image{i // 4}") for i in range(count)]
    assert peak < 6 * size  # a record and the copies decoding makes of it; all of them: count * size


def test_blip_caption_cleans_as_lavis_does():
    """LAVIS's `blip_caption` (SEED's text processor): lower case, .!"()*#:;~ as spaces,
    runs of whitespace one space, the ends stripped, the first 50 words kept."""
    assert text.blip_caption('  A "Dog" (Running):  FAST!! ~ ok.  ') == "a dog running fast ok"
    assert text.blip_caption("It's a dog, isn't it? yes") == "it's a dog, isn't it? yes"  # , ' ? are kept
    long = " ".join(f"w{i}" for i in range(60))
    assert text.blip_caption(long).split(" ") == [f"w{i}" for i in range(50)]
    with pytest.raises(ValueError, match="data.caption_processor: expected one of .*'bogus'"):
        text.caption_processor("bogus")


def test_the_caption_processor_runs_before_both_tokenizers(example):
    """With `process_caption` (seed1: LAVIS's blip_caption) a raw caption gives the
    Q-Former and CLIP ids of its cleaned form, in training and in the retrieval captions;
    without it the punctuation and capitals reach the tokenizers."""
    ex = pipeline.Example(32, example.text, example.clip_text, pipeline.SkipCounter(),
                          process_caption=text.blip_caption)
    pixels = np.zeros((32, 32, 3), np.uint8)
    raw, cleaned = "A Red Circle: in the centre.", "a red circle in the centre"
    got, want = ex.finish(pixels, raw, 0), ex.finish(pixels, cleaned, 0)
    for key in ("text_ids", "text_mask", "clip_ids"):
        np.testing.assert_array_equal(got[key], want[key])
    assert not np.array_equal(example.finish(pixels, raw, 0)["text_ids"], want["text_ids"])
    record = records.encode_record({"image": b"", "caption": raw, "id": "x"})
    captions = pipeline.CaptionExample(example.text, pipeline.SkipCounter(), text.blip_caption)
    np.testing.assert_array_equal(captions.eval((0, record))["text_ids"], want["text_ids"])
