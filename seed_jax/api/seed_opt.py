"""`SeedOPT`: an OPT language model's logits and generation, and with SEED captions, answers and images."""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Iterable, Sequence

import jax
import numpy as np
from flax import nnx

from seed_jax import generation, parallel, weights
from seed_jax.api.checks import as_array, check_count, check_finite_number, is_integer, seed_key
from seed_jax.api.chunks import run_in_chunks
from seed_jax.api.images import image_list
from seed_jax.api.precision import matmul_precision, model_dtype
from seed_jax.api.processes import check_same_on_every_process
from seed_jax.api.seed_tokenizer import SeedTokenizer
from seed_jax.command_line import user_path
from seed_jax.data import opt_text, sequences
from seed_jax.data.opt_text import OPTTextTokenizer
from seed_jax.models import layers
from seed_jax.models.opt import OPT as OPTModel

# generate pads prompts (on the left) and logits its ids (on the right) to a multiple
# of this many tokens, so that ids of other lengths reuse the compiled program
LENGTH_STEP = 16
# caption_codes' and answer_codes' longest output by default, where the model's positions allow
CAPTION_TOKENS, ANSWER_TOKENS = 30, 10


class SeedOPT:
    """An OPT language model (a converted Hugging Face OPT, with or without SEED's
    appended image tokens, or a SEED-OPT training export): `logits` and jitted,
    cached `generate`; with a text tokenizer and image tokens also `caption_codes` /
    `answer_codes` / `image_codes`, and with a `SeedTokenizer` `caption`, `answer`
    and `generate_image` on images. Batches run `batch_size` rows at a time (the KV
    cache holds batch_size * num_beams rows). `eos_id` (an id, None, or a list of ids,
    which makes `generate` ask for one) and `pad_id` are `generate`'s defaults: `load`
    reads those of the converted folder, as transformers' `generate` does. Images are
    `codes_per_image` codes (None: the SEED tokenizer's, else SEED's 32). `dtype` is
    the compute dtype the model was built in (None: read from it; `load(..., dtype=)`
    builds it so); float32 matmuls run at full float32 precision on every backend.
    `mesh` (the devices `model`'s weights are split over, by `axis_rules`): `logits` and
    decoding split each chunk's rows over it (`parallel.rows_apart`); None leaves the
    layout to XLA. A mesh may span several processes (multi-host): every process then
    makes the same calls with the same inputs (and seed), and gets every row back; inputs or
    options that differ between them raise a ValueError naming the argument."""

    def __init__(self, model: OPTModel, *, dtype: str | None = None, image_token_ids: dict | None = None,
                 text_tokenizer: OPTTextTokenizer | None = None, tokenizer: SeedTokenizer | None = None,
                 prompts: sequences.Prompts = sequences.Prompts(), batch_size: int = 32,
                 max_text_tokens: int = sequences.MAX_TEXT_TOKENS, eos_id: int | list[int] | None = None,
                 pad_id: int = 1, codes_per_image: int | None = None, mesh: jax.sharding.Mesh | None = None,
                 axis_rules: parallel.Rules = parallel.DEFAULT_RULES):
        dtype = model_dtype(dtype, model)
        check_count("batch_size", batch_size, 1)
        self.model, self.config, self.dtype, self.batch_size = model, model.config, dtype, batch_size
        self.eos_id, self.pad_id = eos_id, pad_id
        self.image_token_ids = image_token_ids or {}
        if tokenizer is not None and self.image_token_ids:  # else codes of one would read as the other's
            num_codes = self.config.total_vocab_size - self.image_token_ids["first_code_id"]
            if tokenizer.num_codes != num_codes:
                raise ValueError(f"tokenizer: its {tokenizer.num_codes} codes, the model's image tokens hold "
                                 f"{num_codes} codes: expected the SEED tokenizer SEED-OPT was trained on")
        if codes_per_image is None:
            codes_per_image = sequences.CODES_PER_IMAGE if tokenizer is None else tokenizer.num_queries
        elif tokenizer is not None and tokenizer.num_queries != codes_per_image:
            raise ValueError(f"tokenizer: its {tokenizer.num_queries} codes an image, the model reads "
                             f"{codes_per_image} (codes_per_image): expected the SEED tokenizer SEED-OPT was "
                             "trained on")
        if text_tokenizer is not None and text_tokenizer.vocab_size > self.config.vocab_size:
            # else its ids from there on would read as the model's image tokens (as training refuses it)
            raise ValueError(f"text_tokenizer: its {text_tokenizer.vocab_size} ids exceed the model's text "
                             f"vocabulary of {self.config.vocab_size}: expected the text tokenizer the model was "
                             "trained with")
        self.text_tokenizer, self.tokenizer, self.prompts = text_tokenizer, tokenizer, prompts
        # as training checks data.max_text_tokens, which `load` reads: 0 left every prompt empty
        self.max_text_tokens = check_count("max_text_tokens", max_text_tokens, 1)
        self.num_queries = check_count("codes_per_image", codes_per_image, 1)  # codes per image
        graphdef, self._state = nnx.split(model)
        self._mesh = mesh
        precision = matmul_precision(dtype)

        def logits(state, ids, mask):
            with jax.default_matmul_precision(precision):
                return nnx.merge(graphdef, state)(ids, mask)[0]

        def generate(state, ids, mask, rng, allowed, max_new_tokens, sampling, eos_id, pad_id, new_tokens):
            with jax.default_matmul_precision(precision):
                return generation.generate(nnx.merge(graphdef, state), ids, mask, max_new_tokens=max_new_tokens,
                                           sampling=sampling, rng=rng, allowed=allowed, eos_id=eos_id, pad_id=pad_id,
                                           new_tokens=new_tokens)

        def beam_search(state, ids, mask, allowed, max_new_tokens, num_beams, eos_id, pad_id, length_penalty,
                        new_tokens):
            with jax.default_matmul_precision(precision):
                return generation.beam_search(nnx.merge(graphdef, state), ids, mask, max_new_tokens=max_new_tokens,
                                              num_beams=num_beams, eos_id=eos_id, pad_id=pad_id,
                                              length_penalty=length_penalty, new_tokens=new_tokens, allowed=allowed)

        # every process gets every row back; the end and padding ids, the length penalty's divisors and the
        # count of new tokens (within the compiled columns, `_new_columns`) are traced: new values reuse the programs
        everywhere = {} if mesh is None else {"out_shardings": parallel.replicated(mesh)}
        apart = functools.partial(parallel.rows_apart, state=self._state, mesh=mesh, rules=axis_rules, row_args=2)
        self._logits = jax.jit(apart(logits), **everywhere)
        self._generate = jax.jit(apart(generate), static_argnames="max_new_tokens", **everywhere)
        self._beam_search = jax.jit(apart(beam_search), static_argnames=("max_new_tokens", "num_beams"), **everywhere)

    @classmethod
    def load(cls, path: str, *, dtype: str = "float32", tokenizer: "str | SeedTokenizer | None" = None,
             diffusion: str | None = None, text_tokenizer: str | None = None, batch_size: int = 32,
             mesh: jax.sharding.Mesh | None = None, axis_rules: parallel.Rules = parallel.DEFAULT_RULES) -> "SeedOPT":
        """From an `opt` export (`python -m seed_jax.convert hf_opt`, or a SEED-OPT
        training export). The text tokenizer is `text_tokenizer` (a tokenizer.json,
        or a folder with OPT's vocab.json + merges.txt, or with its tokenizer.json alone,
        as transformers 5 saves it, or a SEED-OPT export's folder) or the export's own
        text_tokenizer.json; `tokenizer` (a SEED tokenizer export, with `diffusion` for
        images, or a `SeedTokenizer`) enables the image methods, refused where the
        export recorded another codebook; a tokenizer loaded here runs `batch_size` rows
        at a time too. The prompts, the length their text is cut to and the codes an
        image are those SEED-OPT was trained with (the export's info), else
        `sequences.Prompts()`, `sequences.MAX_TEXT_TOKENS` and the SEED tokenizer's
        count (without one, SEED's 32). `generate` ends rows at the
        converted folder's eos_token_id and pads them with its pad_token_id (exports
        without them: no end token, padding 1). With `mesh`, each weight is read straight
        into its split over it by `axis_rules` (no device holds them all), and decoding
        runs as `SeedOPT(..., mesh=, axis_rules=)`'s; a SEED tokenizer loaded here is read
        and runs so too (`SeedTokenizer.load(..., mesh=, axis_rules=)`; SD on one device).
        The paths (each an export of its kind), dtype, batch_size and axis_rules are checked,
        and the text tokenizer read, before any weights are; a leading `~` in a path is the
        home directory."""
        path, diffusion, text_tokenizer = user_path(path), user_path(diffusion), user_path(text_tokenizer)
        if isinstance(tokenizer, str):
            tokenizer = user_path(tokenizer)
        if diffusion is not None and not isinstance(tokenizer, str):  # it would go unused
            raise ValueError(f"diffusion: given without a SEED tokenizer export path (tokenizer={tokenizer!r}); "
                             "pass tokenizer=PATH, or a SeedTokenizer loaded with diffusion=")
        check_count("batch_size", batch_size, 1)
        parallel.check_rules(axis_rules)
        compute_dtype = layers.compute_dtype(dtype)
        info = weights.read_config(path, "opt")[2]
        if isinstance(tokenizer, str):
            weights.read_config(tokenizer, "seed_tokenizer")
        if diffusion:  # "" loads none, as SeedTokenizer.load
            weights.read_config(diffusion, "stable_diffusion")
        if text_tokenizer is not None and not os.path.exists(text_tokenizer):
            raise FileNotFoundError(f"text_tokenizer: {text_tokenizer!r} does not exist")
        own = os.path.join(path, opt_text.FILE_NAME)
        text = _load_text_tokenizer(text_tokenizer or own) if text_tokenizer or os.path.exists(own) else None
        if isinstance(tokenizer, str):  # first: a tokenizer of other codes is refused before the model is read
            tokenizer = SeedTokenizer.load(tokenizer, diffusion=diffusion, dtype=dtype, batch_size=batch_size,
                                           mesh=mesh, axis_rules=axis_rules)
        if tokenizer is not None:
            _check_trained_codebook(tokenizer, info)
        model, _, _ = weights.load_model(path, dtype=compute_dtype, kind="opt", mesh=mesh, rules=axis_rules)
        ids = {k: info[k] for k in ("image_start_id", "image_end_id", "first_code_id") if k in info}
        prompts = sequences.Prompts(**info.get("prompts", {}))
        return cls(model, dtype=dtype, image_token_ids=ids, tokenizer=tokenizer, batch_size=batch_size, prompts=prompts,
                   max_text_tokens=info.get("max_text_tokens", sequences.MAX_TEXT_TOKENS),
                   eos_id=info.get("eos_token_id"), pad_id=info.get("pad_token_id", 1),
                   codes_per_image=info.get("codes_per_image"), text_tokenizer=text, mesh=mesh, axis_rules=axis_rules)

    def _check_ids(self, input_ids, attention_mask, *, left_padded: bool):
        """(B,L) ids and their 0/1 mask (default all ones) -> int32 arrays; prompts to
        continue (`left_padded`) must end in a real token."""
        ids = as_array("input_ids", input_ids)  # prompts of other lengths: numpy's error named neither argument
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer) or not ids.size:
            raise ValueError(f"input_ids: expected integer (B,L) with B, L >= 1, got {ids.dtype} {ids.shape}")
        if ids.min() < 0 or ids.max() >= self.config.total_vocab_size:
            raise ValueError(f"input_ids: values must lie in [0, {self.config.total_vocab_size}), "
                             f"got [{ids.min()}, {ids.max()}]")
        mask = np.ones_like(ids) if attention_mask is None else as_array("attention_mask", attention_mask)
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask: expected {ids.shape} like input_ids, got {mask.shape}")
        if not np.isin(mask, (0, 1)).all():
            raise ValueError(f"attention_mask: expected values 0 and 1, got {np.unique(mask).tolist()}")
        if not mask.any(1).all():
            raise ValueError(f"attention_mask: expected a 1 in every row, rows {np.flatnonzero(~mask.any(1)).tolist()} "
                             "are all 0")
        if left_padded and not mask[:, -1].all():
            raise ValueError(f"attention_mask: expected left-padded prompts (1 in the last column), rows "
                             f"{np.flatnonzero(mask[:, -1] == 0).tolist()} end in padding")
        return ids.astype(np.int32), mask.astype(np.int32)

    def logits(self, input_ids, attention_mask=None) -> np.ndarray:
        """(B,L) ids (padded, with `attention_mask`) -> (B,L,V) float32 logits. Padding
        takes no positions: as `generate`'s prompts, L may exceed the model's positions
        where only so many columns hold real tokens (the others, padding in every row, read 0)."""
        ids, mask = self._check_ids(input_ids, attention_mask, left_padded=False)
        check_same_on_every_process(self._mesh, input_ids=ids, attention_mask=mask)
        longest = self.config.max_positions
        if mask.sum(1).max() > longest:
            raise ValueError(f"input_ids: length {mask.sum(1).max()} exceeds the model's {longest} positions")
        kept = mask.any(0) if ids.shape[1] > longest else np.ones(ids.shape[1], bool)
        if kept.sum() > longest:
            raise ValueError(f"attention_mask: real tokens in {kept.sum()} columns, more than the model's {longest} "
                             "positions: expected the rows' padding on one side")
        length = int(kept.sum())
        padded = _padded_to_step(ids[:, kept], mask[:, kept], longest, left=False)
        logits = run_in_chunks(lambda i, m: self._logits(self._state, i, m)[:, :length], padded, self.batch_size)
        if kept.all():
            return logits
        out = np.zeros((*ids.shape, logits.shape[-1]), logits.dtype)
        out[:, kept] = logits
        return out

    def generate(self, input_ids, max_new_tokens: int, *, attention_mask=None, temperature: float = 0.0,
                 top_k: int | None = 50, top_p: float | None = 1.0, seed: int | None = None,
                 eos_id: int | None | str = "model", pad_id: int | str = "model",
                 allowed: list[tuple[int, int]] | None = None, num_beams: int = 1,
                 length_penalty: float = 1.0) -> np.ndarray:
        """(B,P) left-padded prompts -> (B,T) int32 new tokens, `pad_id` after `eos_id`,
        as transformers' `generate`: T is `max_new_tokens`, or fewer when every row has
        ended (up to the last row's `eos_id`). Greedy at temperature 0, else sampled
        (top-k / top-p; `seed` defaults to 0) from the `top_k` likeliest tokens: 50, as
        transformers' `generate(do_sample=True)` (0: all). top_k / top_p None: no top-k / top-p, as
        transformers' `generate(top_k=None)` (the argument replaces the generation config's 50); a
        temperature None is refused (`generate` reads it as 1.0 with do_sample, greedy without).
        `eos_id` / `pad_id` "model": this SeedOPT's (`load`: the converted folder's); `eos_id`
        None: no end token.
        Decoding settings come from these arguments alone, never from the converted folder's
        generation_config.json (the export's info lists those it set: `generation_settings_not_applied`).
        `allowed[t] = (low, high)` restricts step t. `num_beams` > 1: beam search as transformers'
        `generate(num_beams=..., do_sample=False)` (no sampling options; `allowed` as its
        `prefix_allowed_tokens_fn`), finished hypotheses scored by log-probability /
        length**`length_penalty`."""
        ids, mask = self._check_ids(input_ids, attention_mask, left_padded=True)
        d = self._decoding(int(mask.sum(1).max()), max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                           seed=seed, eos_id=eos_id, pad_id=pad_id, allowed=allowed, num_beams=num_beams,
                           length_penalty=length_penalty)
        check_same_on_every_process(
            self._mesh, input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, temperature=temperature,
            top_k=top_k, top_p=top_p, seed=seed, eos_id=d.eos_id, pad_id=d.pad_id, allowed=allowed,
            num_beams=num_beams, length_penalty=length_penalty)
        ids, mask = _padded_to_step(ids, mask, self.config.max_positions, left=True)
        eos_id, pad_id = np.int32(-1 if d.eos_id is None else d.eos_id), np.int32(d.pad_id)
        columns, new_tokens = _new_columns(d.max_new_tokens, self.config.max_positions), np.int32(d.max_new_tokens)
        ranges = generation.allowed_ranges(columns, d.ranges, self.config.total_vocab_size)  # the extra columns: any
        if d.num_beams > 1:
            divisors = generation.length_divisors(columns, d.length_penalty)
            tokens = run_in_chunks(lambda i, m: self._beam_search(
                self._state, i, m, ranges, max_new_tokens=columns, num_beams=d.num_beams, eos_id=eos_id,
                pad_id=pad_id, length_penalty=divisors, new_tokens=new_tokens), (ids, mask), self.batch_size)
            return generation.up_to_last_end(tokens[:, :d.max_new_tokens], d.eos_id)

        def run(ids, mask, rows):  # row r samples with key (seed, r), whatever the chunk it runs in
            keys = jax.vmap(lambda row: jax.random.fold_in(d.key, row))(rows)
            return self._generate(self._state, ids, mask, keys, ranges, max_new_tokens=columns, sampling=d.sampling,
                                  eos_id=eos_id, pad_id=pad_id, new_tokens=new_tokens)

        tokens = run_in_chunks(run, (ids, mask, np.arange(len(ids))), self.batch_size)
        return generation.up_to_last_end(tokens[:, :d.max_new_tokens], d.eos_id)

    def _decoding(self, prompt_length: int, max_new_tokens, *, temperature=0.0, top_k=50, top_p=1.0, seed=None,
                  eos_id="model", pad_id="model", allowed=None, num_beams=1, length_penalty=1.0) -> _Decoding:
        """`generate`'s options for prompts of at most `prompt_length` tokens (their padding
        takes no positions), checked (a ValueError names the bad one), as the compiled
        programs take them."""
        eos_id, pad_id = self._end_and_padding(eos_id, pad_id)
        if prompt_length > self.config.max_positions:
            raise ValueError(f"input_ids: a prompt of {prompt_length} tokens exceeds the model's "
                             f"{self.config.max_positions} positions")
        longest = new_token_room(self.config.max_positions, prompt_length)
        if not is_integer(max_new_tokens) or not 1 <= max_new_tokens <= longest:
            raise ValueError(f"max_new_tokens: expected an integer in 1..{longest} (the model has "
                             f"{self.config.max_positions} positions), got {max_new_tokens!r}")
        max_new_tokens = int(max_new_tokens)  # a numpy integer has no bit_length (`_new_columns`)
        num_beams = check_count("num_beams", num_beams, 1, "1: no beam search")
        vocab = self.config.total_vocab_size
        if eos_id is not None and (not is_integer(eos_id) or not 0 <= eos_id < vocab):  # else no row would end
            raise ValueError(f"eos_id: expected None or a token id in [0, {vocab}), got {eos_id!r}")
        if not is_integer(pad_id) or not 0 <= pad_id < vocab:  # else not a token (or not an int32)
            raise ValueError(f"pad_id: expected a token id in [0, {vocab}), got {pad_id!r}")
        length_penalty = check_finite_number("length_penalty", length_penalty)  # NaN: every answer empty
        if num_beams == 1 and length_penalty != 1.0:
            raise ValueError(f"length_penalty={length_penalty} applies to beam search only: expected num_beams > 1")
        ranges = generation.allowed_ranges(max_new_tokens, allowed, vocab)
        if num_beams > 1:
            given = {name: value for name, value, default in [("temperature", temperature, 0.0), ("top_k", top_k, 50),
                     ("top_p", top_p, 1.0), ("seed", seed, None)] if value is not None and value != default}
            if given:
                raise ValueError(f"num_beams > 1 (beam search) takes no {', '.join(given)}, got {given}")
            return _Decoding(max_new_tokens, eos_id, pad_id, num_beams, length_penalty, ranges)
        return _Decoding(max_new_tokens, eos_id, pad_id, num_beams, length_penalty, ranges,
                         sampling=generation.Sampling(temperature, top_k, top_p),
                         key=seed_key(0 if seed is None else seed))

    def _end_and_padding(self, eos_id, pad_id) -> tuple:
        """`generate`'s eos_id and pad_id, "model" read as this SeedOPT's (checked by `_decoding`)."""
        models = isinstance(eos_id, str) and eos_id == "model"
        eos_id = self.eos_id if models else eos_id
        pad_id = self.pad_id if isinstance(pad_id, str) and pad_id == "model" else pad_id
        if isinstance(eos_id, list):
            whose = " (the converted model's end tokens)" if models else ""
            raise ValueError(f"eos_id: generate ends rows at one token, got {eos_id}{whose}: pass one as eos_id")
        return eos_id, pad_id

    # ---- SEED: codes <-> text
    @property
    def builder(self) -> sequences.SequenceBuilder:
        if self.text_tokenizer is None:
            raise ValueError("this SeedOPT has no text tokenizer: load(..., text_tokenizer=PATH)")
        ids = self.image_token_ids
        if not ids:
            raise ValueError("this model has no image tokens: convert it with --image_tokens, or train SEED-OPT")
        num_codes = self.config.total_vocab_size - ids["first_code_id"]
        image = sequences.ImageTokens(ids["image_start_id"], ids["image_end_id"], ids["first_code_id"], num_codes)
        return sequences.SequenceBuilder(self.text_tokenizer, image, self.prompts, self.max_text_tokens)

    def _left_padded(self, prompts: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        length = max(len(p) for p in prompts)
        pad = self.text_tokenizer.pad_id
        ids = np.asarray([[pad] * (length - len(p)) + p for p in prompts], np.int32)
        mask = np.asarray([[0] * (length - len(p)) + [1] * len(p) for p in prompts], np.int32)
        return ids, mask

    def _answer_request(self, prompts: list[list[int]], max_new_tokens: int | None, default_tokens: int,
                        num_beams: int, sampling: dict) -> tuple[np.ndarray, dict]:
        """Prompts -> left-padded ids (B,P) and `generate`'s keyword arguments (`generate`
        checks their values). `max_new_tokens` None: `default_tokens`, or fewer where the
        positions end."""
        unknown = sorted(set(sampling) - {"temperature", "top_k", "top_p", "seed", "length_penalty"})
        if unknown:
            raise TypeError(f"unexpected options {unknown}: captions and answers take max_new_tokens, num_beams, "
                            "temperature, top_k, top_p, seed and length_penalty")
        ids, mask = self._left_padded(prompts)
        if max_new_tokens is None:
            max_new_tokens = max(1, min(default_tokens, new_token_room(self.config.max_positions, ids.shape[1])))
        return ids, dict(max_new_tokens=max_new_tokens, attention_mask=mask, eos_id=self.text_tokenizer.eos_id,
                         pad_id=self.text_tokenizer.pad_id, num_beams=num_beams, **sampling)

    def _check_answer_options(self, prompts: list[list[int]], *request) -> None:
        """Checks `generate`'s options for `prompts` (`_answer_request`'s arguments after
        them) without generating: before images are encoded."""
        ids, options = self._answer_request(prompts, *request)
        del options["attention_mask"]
        self._decoding(ids.shape[1], **options)

    def _answers(self, prompts: list[list[int]], max_new_tokens: int | None, default_tokens: int, num_beams: int,
                 sampling: dict) -> list[str]:
        ids, options = self._answer_request(prompts, max_new_tokens, default_tokens, num_beams, sampling)
        tokens = self.generate(ids, **options)
        eos = self.text_tokenizer.eos_id
        return [self._decode_answer(row[:row.index(eos)] if eos in row else row).strip() for row in tokens.tolist()]

    def _decode_answer(self, ids: list[int]) -> str:
        """Generated ids -> text, image tokens written by name (`<img_00012>`): an answer
        that holds them reads so (and is no caption's exact match), as a tokenizer with
        them added decodes it."""
        image, pieces, text = self.builder.image, [], []
        for token in ids:
            name = image.name(token)
            if name is None:
                text.append(token)
            else:
                pieces += [self.text_tokenizer.decode(text), name]
                text = []
        return "".join(pieces + [self.text_tokenizer.decode(text)])

    def _codes(self, codes) -> np.ndarray:
        codes = as_array("codes", codes)
        if (codes.ndim != 2 or not np.issubdtype(codes.dtype, np.integer) or not codes.size
                or codes.shape[1] != self.num_queries):
            raise ValueError(f"codes: expected integer (B,{self.num_queries}), got {codes.dtype} {codes.shape}")
        return codes

    def _placeholder_codes(self, count: int) -> np.ndarray:
        """(count,num_queries) codes whose prompts are as long as any codes': options are checked on
        them before images are encoded."""
        return np.zeros((count, self.num_queries), np.int32)

    def _caption_prompts(self, codes: np.ndarray) -> list[list[int]]:
        builder = self.builder
        return [builder.caption_prompt(row) for row in codes]

    def _question_prompts(self, codes: np.ndarray, questions: list[str]) -> list[list[int]]:
        builder = self.builder
        return [builder.question_prompt(row, q) for row, q in zip(codes, questions)]

    def caption_codes(self, codes, *, max_new_tokens: int | None = None, num_beams: int = 1,
                      **sampling) -> list[str]:
        """int codes (B,Q), Q = `num_queries`, -> captions (image -> text after the prompt
        "A photo of"); `max_new_tokens` None: 30, or fewer where the model's positions end;
        `sampling`: temperature, top_k, top_p, seed (not with num_beams > 1) and
        length_penalty (with num_beams > 1 only); another name is a TypeError."""
        return self._answers(self._caption_prompts(self._codes(codes)), max_new_tokens, CAPTION_TOKENS, num_beams,
                             sampling)

    def check_caption_options(self, *, max_new_tokens: int | None = None, num_beams: int = 1, **sampling) -> None:
        """Checks `caption_codes`' options without generating: a ValueError (TypeError for
        an unknown option) naming the one it cannot take, e.g. `max_new_tokens` past the
        model's positions."""
        self._check_answer_options(self._caption_prompts(self._placeholder_codes(1)), max_new_tokens,
                                   CAPTION_TOKENS, num_beams, sampling)

    def answer_codes(self, codes, questions: Sequence[str], *, max_new_tokens: int | None = None,
                     num_beams: int = 1, **sampling) -> list[str]:
        """int codes (B,Q) (as `caption_codes`) and B questions -> short answers
        ("Question: {q} Short answer."); options as `caption_codes`, `max_new_tokens`
        None: 10 or fewer."""
        codes = self._codes(codes)
        questions = _check_texts("questions", questions, count=len(codes))
        return self._answers(self._question_prompts(codes, questions), max_new_tokens, ANSWER_TOKENS, num_beams,
                             sampling)

    def image_codes(self, prompts: Sequence[str], *, temperature: float = 0.0, top_k: int | None = 50,
                    top_p: float | None = 1.0, seed: int | None = None, num_beams: int = 1) -> np.ndarray:
        """Text prompts -> int32 codes (B,Q), Q = `num_queries`: after "Generate an image:
        {prompt}" and <img>, each of Q steps may only emit a code token, then </img>.
        Options as `generate`'s (`num_beams` > 1: beam search over the same steps, without
        temperature, top_k, top_p or seed; every hypothesis has Q+1 tokens, so a
        `length_penalty` could not change which wins)."""
        prompts = _check_texts("prompts", prompts)
        builder = self.builder
        image = builder.image
        ids, mask = self._left_padded([builder.generation_prompt(p) for p in prompts])
        num_queries = self.num_queries
        allowed = [(image.first_code, image.first_code + image.num_codes)] * num_queries + [(image.end, image.end + 1)]
        tokens = self.generate(ids, num_queries + 1, attention_mask=mask, allowed=allowed, temperature=temperature,
                               top_k=top_k, top_p=top_p, seed=seed, eos_id=None, num_beams=num_beams)
        return image.to_codes(tokens[:, :num_queries])

    # ---- SEED: images <-> text (need the SEED tokenizer)
    def _seed_tokenizer(self) -> SeedTokenizer:
        if self.tokenizer is None:
            raise ValueError("images need the SEED tokenizer: SeedOPT.load(..., tokenizer=SEED_EXPORT)")
        return self.tokenizer

    def caption(self, images, *, max_new_tokens: int | None = None, num_beams: int = 1, **sampling) -> list[str]:
        """Images (as `SeedTokenizer.preprocess` takes them) -> captions (options as `caption_codes`)."""
        tokenizer = self._seed_tokenizer()  # it, and every option, checked before the images are encoded
        self.check_caption_options(max_new_tokens=max_new_tokens, num_beams=num_beams, **sampling)
        return self.caption_codes(tokenizer.encode_images(images), max_new_tokens=max_new_tokens, num_beams=num_beams,
                                  **sampling)

    def answer(self, images, questions: Sequence[str], *, max_new_tokens: int | None = None, num_beams: int = 1,
               **sampling) -> list[str]:
        """Images (as `SeedTokenizer.preprocess` takes them) and one question each -> short answers
        (options as `answer_codes`)."""
        tokenizer = self._seed_tokenizer()  # it, and every option, checked before the images are encoded
        images = image_list(images)
        questions = _check_texts("questions", questions, count=len(images))
        self._check_answer_options(self._question_prompts(self._placeholder_codes(len(images)), questions),
                                   max_new_tokens, ANSWER_TOKENS, num_beams, sampling)
        return self.answer_codes(tokenizer.encode_images(images), questions, max_new_tokens=max_new_tokens,
                                 num_beams=num_beams, **sampling)

    def generate_image(self, prompts: Sequence[str], *, temperature: float = 0.0, top_k: int | None = 50,
                       top_p: float | None = 1.0, seed: int = 0, num_beams: int = 1, **decode_options) -> np.ndarray:
        """Text prompts -> uint8 images (B,S,S,3): `image_codes`, then
        `SeedTokenizer.decode` (needs `load(..., tokenizer=..., diffusion=...)`);
        `decode_options` as `SeedTokenizer.decode`. `seed` seeds both; with `num_beams` > 1
        (beam search, no sampling options) the diffusion alone."""
        tokenizer = self._seed_tokenizer()
        tokenizer.check_decode_options(  # before the language model runs
            caller="generate_image", load="SeedOPT.load(..., tokenizer=SEED_EXPORT, diffusion=SD_EXPORT), or a "
            "SeedTokenizer loaded with diffusion=", seed=seed, **decode_options)
        codes = self.image_codes(prompts, temperature=temperature, top_k=top_k, top_p=top_p,
                                 seed=seed if num_beams == 1 else None, num_beams=num_beams)
        return tokenizer.decode(codes, seed=seed, **decode_options)


@dataclasses.dataclass(frozen=True)
class _Decoding:
    """`generate`'s checked options: per-step token `ranges` (T,2); beam search when
    num_beams > 1, else `sampling` with the PRNG `key`."""
    max_new_tokens: int
    eos_id: int | None
    pad_id: int
    num_beams: int
    length_penalty: float
    ranges: np.ndarray
    sampling: generation.Sampling | None = None
    key: jax.Array | None = None


def new_token_room(max_positions: int, prompt_length: int) -> int:
    """The most new tokens `generate` makes after a prompt of `prompt_length` tokens in a
    model of `max_positions` positions: the last new token is not fed back, so it needs
    no position of its own."""
    return max_positions - prompt_length + 1


def _new_columns(max_new_tokens: int, longest: int) -> int:
    """The new-token columns decoding compiles for `max_new_tokens`: the next power of two,
    at least `LENGTH_STEP`, at most `longest` (the model's positions) where that still holds
    them; a few programs serve every count, each stopping after `max_new_tokens`."""
    return max(max_new_tokens, min(max(LENGTH_STEP, 1 << (max_new_tokens - 1).bit_length()), longest))


def _padded_to_step(ids: np.ndarray, mask: np.ndarray, longest: int, *, left: bool) -> tuple[np.ndarray, np.ndarray]:
    """(B,L) ids and mask -> (B,L') with L' the next multiple of `LENGTH_STEP`
    (at most `longest`, at least L), the new columns (on the left or the right) token 0
    under mask 0. Positions count the mask, so the new columns take none, and attention
    is causal: the real columns' results are those of the (B,L) ids, and one compiled
    program serves every length up to L'."""
    length = ids.shape[1]
    padded = max(length, min(-(-length // LENGTH_STEP) * LENGTH_STEP, longest))
    columns = ((0, 0), (padded - length, 0) if left else (0, padded - length))
    return np.pad(ids, columns), np.pad(mask, columns)


def _check_texts(name: str, texts, count: int | None = None) -> list[str]:
    """`texts` as a list of `count` strings (None: at least one), else a ValueError
    naming `name` (a prompt's format() would write None or 3 in as text)."""
    listed = list(texts) if isinstance(texts, Iterable) and not isinstance(texts, str) else None
    if listed is None or (len(listed) != count if count is not None else not listed):
        expected = f"a list of {count} strings, one per image" if count is not None else "a non-empty list of strings"
        got = f"{len(listed)} of them" if listed is not None else repr(texts)
        raise ValueError(f"{name}: expected {expected}, got {got}")
    for i, text in enumerate(listed):
        if not isinstance(text, str):
            raise ValueError(f"{name}[{i}]: expected a string, got {text!r}")
    return listed


def _check_trained_codebook(tokenizer: SeedTokenizer, info: dict) -> None:
    """A ValueError unless `tokenizer`'s codebook is the one the SEED-OPT export (its
    model.json `info`) was trained with, where the export recorded it: another tokenizer
    of the same sizes (say, one retrained in place) would have its codes misread silently."""
    trained, given = info.get("tokenizer_codebook"), tokenizer.codebook_digest
    if trained and given and given != trained:
        raise ValueError(f"tokenizer: its codebook (digest {given}) is not the one this SEED-OPT export was trained "
                         f"with (digest {trained}, of tokenizer_export {info.get('tokenizer_export')!r}): its codes "
                         "would be misread; pass the SEED tokenizer the export was trained with")


def _load_text_tokenizer(path: str) -> OPTTextTokenizer:
    """A tokenizer.json file, or a folder with OPT's vocab.json + merges.txt (else its tokenizer.json),
    or a SEED-OPT export's folder, holding its text_tokenizer.json."""
    if not os.path.isdir(path):
        return OPTTextTokenizer.load(path)
    exported = os.path.join(path, opt_text.FILE_NAME)
    return OPTTextTokenizer.load(exported) if os.path.exists(exported) else OPTTextTokenizer(opt_text.gpt2_bpe(path))
