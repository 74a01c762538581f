"""SEED-OPT token sequences and the packed training pipeline.

An image is `<img> <img_c0> ... <img_c31> </img>`: the code tokens follow the text
vocabulary (`ImageTokens`). Each sequence starts with `</s>` (OPT's BOS):

  image -> text:  </s> IMAGE "A photo of" " {caption}" </s>            loss on the caption and </s>
  text -> image:  </s> "Generate an image: {caption}" <img> CODES </img>  loss on the codes and </img>
  question:       </s> IMAGE "Question: {q} Short answer."               a prompt only (answered zero-shot)

Text over `max_text_tokens` is cut: a prompt's caption or question loses its end, and a
caption that takes loss its end and its </s>.

Training rows pack several sequences to a fixed length T (grain's first-fit packing):
`inputs`, `segment_ids` (0 = padding) and `positions` (from 0 in each sequence), int32
(T,) each; and the next-token targets that take loss, at most K per row: `target_ids`,
their row positions `target_index` and `target_mask` (0 = padding), int32 (K,) each.
The model computes logits at those K positions only (on the demo's image -> text rows
about a quarter of all positions).
"""

from __future__ import annotations

import dataclasses
import string
import threading
from typing import Sequence

import grain
import grain.experimental
import jax
import numpy as np
from absl import logging

from seed_jax.data import code_records, pipeline, records
from seed_jax.data.opt_text import OPTTextTokenizer
from seed_jax.data.pipeline import SkipCounter

CODES_PER_IMAGE = 32  # SEED's causal queries
MAX_TEXT_TOKENS = 64  # the longest caption, question or generation prompt text, in tokens


@dataclasses.dataclass(frozen=True)
class ImageTokens:
    """Ids of `<img>`, `</img>` and code 0 (codes are consecutive) in the model's vocabulary."""
    start: int
    end: int
    first_code: int
    num_codes: int

    @classmethod
    def after_vocabulary(cls, vocab_size: int, num_codes: int) -> "ImageTokens":
        """The layout `convert hf_opt --image_tokens` appends: <img>, </img>, codes."""
        return cls(vocab_size, vocab_size + 1, vocab_size + 2, num_codes)

    def wrap(self, codes) -> list[int]:
        codes = np.asarray(codes)
        if codes.size and (codes.min() < 0 or codes.max() >= self.num_codes):
            raise ValueError(f"codes: values must lie in [0, {self.num_codes}), got [{codes.min()}, {codes.max()}]")
        return [self.start] + [self.first_code + int(c) for c in codes] + [self.end]

    def to_codes(self, ids) -> np.ndarray:
        """Code-token ids -> codes."""
        return np.asarray(ids, np.int32) - self.first_code

    def name(self, token: int) -> str | None:
        """`<img>`, `</img>` or a code's `<img_00012>` for an image token; None for any other id."""
        if token == self.start:
            return "<img>"
        if token == self.end:
            return "</img>"
        if 0 <= token - self.first_code < self.num_codes:
            return f"<img_{token - self.first_code:05d}>"
        return None


@dataclasses.dataclass(frozen=True)
class Prompts:
    """The prompts' texts: `generate` holds the field {caption} once, `question` the field
    {question} once, `caption` none (else a ValueError naming the prompt)."""
    caption: str = "A photo of"
    generate: str = "Generate an image: {caption}"
    question: str = "Question: {question} Short answer."

    def __post_init__(self):
        for name, fields in (("caption", []), ("generate", ["caption"]), ("question", ["question"])):
            _check_fields(f"prompts.{name}", getattr(self, name), fields)


def _split_at_field(template: str, field: str, value: str) -> tuple[str, str]:
    """`template.format(field=value)` as (the text up to the value's end, the text after it)."""
    formatter, texts, after = string.Formatter(), ["", ""], 0
    for literal, name, spec, conversion in formatter.parse(template):
        texts[after] += literal
        if name == field:
            texts[after] += formatter.format_field(formatter.convert_field(value, conversion), spec or "")
            after = 1
    return texts[0], texts[1]


def _check_fields(name: str, template, expected: list[str]) -> None:
    """A ValueError naming `name` unless `template` is a str whose format fields are `expected`
    (one without {caption} would train text -> image on one prompt for every caption)."""
    if not isinstance(template, str):
        raise ValueError(f"{name}: expected a string, got {template!r}")
    try:
        parsed = [(field, spec) for _, field, spec, _ in string.Formatter().parse(template) if field is not None]
    except ValueError as error:
        raise ValueError(f"{name}: {template!r} is no format string ({error})") from None
    fields = [field for field, _ in parsed] + [nested for _, spec in parsed if "{" in spec  # {question:{w}}, {q:{}}
                                               for _, nested, _, _ in string.Formatter().parse(spec)
                                               if nested is not None]
    if fields != expected:
        wanted = " ".join("{%s}" % f for f in expected) or "no field"
        raise ValueError(f"{name}: expected {wanted} (braces in text doubled), got {template!r}")


class SequenceBuilder:
    """Prompts (what generation starts from) and full training sequences with their loss masks."""

    def __init__(self, text: OPTTextTokenizer, image: ImageTokens, prompts: Prompts = Prompts(),
                 max_text_tokens: int = MAX_TEXT_TOKENS):
        self.text, self.image, self.prompts, self.max_text_tokens = text, image, prompts, max_text_tokens

    def _filled(self, template: str, field: str, value: str) -> list[int]:
        """`template` with its one {field} set to `value`, encoded, at most
        `max_text_tokens` ids: a longer text loses the value's end, not the template's
        text after the field (a long question keeps "Short answer.")."""
        ids = self.text.encode(template.format(**{field: value}))
        if len(ids) <= self.max_text_tokens:
            return ids
        before, after = _split_at_field(template, field, value)
        after = self.text.encode(after)
        kept = self.text.encode(before)[:max(self.max_text_tokens - len(after), 0)]
        return (kept + after)[:self.max_text_tokens]

    # ---- prompts
    def caption_prompt(self, codes) -> list[int]:
        return [self.text.bos_id] + self.image.wrap(codes) + self.text.encode(self.prompts.caption)

    def question_prompt(self, codes, question: str) -> list[int]:
        return ([self.text.bos_id] + self.image.wrap(codes)
                + self._filled(self.prompts.question, "question", question))

    def generation_prompt(self, caption: str) -> list[int]:
        return [self.text.bos_id] + self._filled(self.prompts.generate, "caption", caption) + [self.image.start]

    # ---- training sequences: (ids, loss_mask) where loss_mask[i] = 1 if ids[i] is a target
    def caption_sequence(self, codes, caption: str) -> tuple[list[int], list[int]]:
        return self._answered(self.caption_prompt(codes), " " + caption)

    def generation_sequence(self, caption: str, codes) -> tuple[list[int], list[int]]:
        prompt = self.generation_prompt(caption)
        image = self.image.wrap(codes)[1:]  # the prompt ends with <img>
        return prompt + image, [0] * len(prompt) + [1] * len(image)

    def _answered(self, prompt: list[int], answer: str) -> tuple[list[int], list[int]]:
        """`prompt` + the answer's ids + </s>, loss on the answer and </s>; an answer
        longer than `max_text_tokens` is cut and takes no </s> (else training taught the
        model to end captions where the cut fell; LAVIS's BLIP-2 OPT cuts so)."""
        answer_ids = self.text.encode(answer)
        cut = len(answer_ids) > self.max_text_tokens
        answer_ids = answer_ids[:self.max_text_tokens] + ([] if cut else [self.text.eos_id])
        return prompt + answer_ids, [0] * len(prompt) + [1] * len(answer_ids)

    def is_cut(self, ids: list[int], caption: str, to_image: bool) -> bool:
        """Whether the sequence `ids` of `caption` (`generation_sequence`'s where `to_image`,
        else `caption_sequence`'s) holds the caption's start only: a caption's then ends
        without </s>; a text -> image prompt as long as `max_text_tokens` is encoded again
        to tell (a longer one would have been cut)."""
        if not to_image:
            return ids[-1] != self.text.eos_id
        prompt_text = ids.index(self.image.start) - 1  # between <s> and <img>
        return prompt_text >= self.max_text_tokens and len(
            self.text.encode(self.prompts.generate.format(caption=caption))) > self.max_text_tokens


def shifted(ids: Sequence[int], loss_mask: Sequence[int]) -> dict[str, np.ndarray]:
    """A sequence -> `inputs` (L-1,), and for the N tokens that take loss `target_ids`
    (N,) with their input positions `target_index` (N,)."""
    ids, loss_mask = np.asarray(ids, np.int32), np.asarray(loss_mask, np.int32)
    target_index = np.nonzero(loss_mask[1:])[0].astype(np.int32)
    return {"inputs": ids[:-1], "target_ids": ids[1:][target_index], "target_index": target_index}


def decode_captioned(raw: bytes, codes_per_image: int, num_codes: int | None = None) -> dict:
    """`code_records.decode_code_record`, a record whose caption is empty (or whitespace)
    malformed too: it would train image -> text on </s> alone and text -> image from a
    prompt without a caption, and be scored against an empty reference."""
    return records.require_caption(code_records.decode_code_record(raw, codes_per_image, num_codes), "code record")


@dataclasses.dataclass(frozen=True)
class CodeExample:
    """A code record -> one training sequence: text -> image with probability
    `text_to_image_fraction`, else image -> text. None (counted) for a corrupt
    record, one without `codes_per_image` codes or with an empty caption, one longer
    than `max_length` or with more than `max_targets` targets."""
    builder: SequenceBuilder
    text_to_image_fraction: float
    max_length: int
    max_targets: int
    skipped: SkipCounter
    codes_per_image: int = CODES_PER_IMAGE
    said_too_long: threading.Event = dataclasses.field(default_factory=threading.Event, compare=False, repr=False)
    said_cut: threading.Event = dataclasses.field(default_factory=threading.Event, compare=False, repr=False)

    def __call__(self, raw: bytes, rng: np.random.Generator) -> dict | None:
        try:
            record = decode_captioned(raw, self.codes_per_image)
            to_image = rng.random() < self.text_to_image_fraction
            if to_image:
                ids, mask = self.builder.generation_sequence(record["caption"], record["codes"])
            else:
                ids, mask = self.builder.caption_sequence(record["codes"], record["caption"])
        except ValueError as error:
            self.skipped.add(why=str(error))
            return None
        if not self.said_cut.is_set() and self.builder.is_cut(ids, record["caption"], to_image):
            self.said_cut.set()  # said once, as a cut caption trains on its start alone
            where = ("in the text -> image prompt (prompts.generate with it)" if to_image
                     else "in an image -> text sequence, which then takes no </s>")
            logging.warning("cut a caption at data.max_text_tokens %d %s: %r", self.builder.max_text_tokens, where,
                            record["caption"][:200])
        if len(ids) - 1 > self.max_length or sum(mask[1:]) > self.max_targets:
            # said once: were every sequence too long, grain's error would say only "skipped 100.00 %"
            if not self.said_too_long.is_set():
                self.said_too_long.set()
                logging.warning("skipped a sequence of %d tokens with %d targets: a packed row holds %d tokens "
                                "(data.seq_length) and %d targets (the phase's max_targets_per_row)",
                                len(ids) - 1, sum(mask[1:]), self.max_length, self.max_targets)
            self.skipped.add()
            return None
        return shifted(ids, mask)


def _packed_row(row: dict) -> dict:
    """grain's packed features -> the row layout above (target positions move from
    their sequence's frame to the row's)."""
    segments, target_segments = row["inputs_segment_ids"], row["target_index_segment_ids"]
    starts = np.zeros(segments.max() + 1, np.int32)
    for segment in np.unique(segments[segments > 0]):
        starts[segment] = np.argmax(segments == segment)
    valid = target_segments > 0
    return {"inputs": row["inputs"], "segment_ids": segments, "positions": row["inputs_positions"],
            "target_ids": row["target_ids"], "target_mask": valid.astype(np.int32),
            "target_index": np.where(valid, row["target_index"] + starts[target_segments], 0).astype(np.int32)}


def packed_train_iterator(paths: Sequence[str], example: CodeExample, *, global_batch_size: int, seed: int,
                          num_packing_bins: int = 64, num_threads: int = 2, prefetch: int = 4):
    """Endless shuffled, packed batches of this process's slice of the code records
    (T = `example.max_length`, K = `example.max_targets`); a checkpointable grain iterator."""
    index, count = jax.process_index(), jax.process_count()
    if global_batch_size % count:
        raise ValueError(f"batch_size {global_batch_size} must divide by the process count {count}")
    source = grain.MapDataset.source(pipeline.RecordSource(paths))
    pipeline.check_a_record_per_process(paths, len(source), count)
    source = source[index::count]
    seed = pipeline.process_seed(seed, index)
    ds = source.shuffle(seed=seed).repeat(None).random_map(example, seed=seed)
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch))
    ds = pipeline.raise_when_mostly_skipped(ds)
    length, targets = example.max_length, example.max_targets
    ds = grain.experimental.FirstFitPackIterDataset(
        ds, length_struct={"inputs": length, "target_ids": targets, "target_index": targets},
        num_packing_bins=num_packing_bins, seed=seed)
    return iter(ds.map(_packed_row).batch(global_batch_size // count, drop_remainder=True))


def check_num_examples(name: str, num_examples) -> int:
    """`num_examples`, an integer >= 1 or `pipeline.ALL_RECORDS`, else a ValueError naming `name`."""
    integer = isinstance(num_examples, (int, np.integer)) and not isinstance(num_examples, bool)
    if not integer or (num_examples < 1 and num_examples != pipeline.ALL_RECORDS):
        raise ValueError(f"{name}: expected an integer >= 1 ({pipeline.ALL_RECORDS}: all), got {num_examples!r}")
    return int(num_examples)


def read_code_records(paths: Sequence[str], num_examples: int, skipped: SkipCounter,
                      codes_per_image: int = CODES_PER_IMAGE, num_codes: int | None = None,
                      name: str = "num_examples") -> list[dict]:
    """The first `num_examples` decodable code records of `codes_per_image` codes, each
    in [0, `num_codes`) when it is given, with a caption (others skipped and counted, as
    `CodeExample` skips them); `pipeline.ALL_RECORDS`: every decodable one. Errors name
    `num_examples` as `name` (a config key)."""
    num_examples = check_num_examples(name, num_examples)
    source = pipeline.RecordSource(paths)
    out, first_skip = [], ""
    for i in range(len(source)):
        if len(out) == num_examples:
            break
        try:
            out.append(decode_captioned(source[i], codes_per_image, num_codes))
        except ValueError as error:
            skipped.add(why=str(error))
            first_skip = first_skip or str(error)
    if len(out) < num_examples or not out:
        # why they were skipped: e.g. image records, not code records, where code records were expected
        why = f" (the first skipped: {first_skip})" if first_skip else ""
        raise ValueError(f"{name}: {num_examples} requested, {paths[0]}... hold {len(out)} readable records{why}")
    return out
