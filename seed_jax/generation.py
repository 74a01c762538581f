"""Autoregressive decoding for `models.opt.OPT` with its key/value cache, the whole
loop in one `lax.while_loop` (call under jit).

Prompts are left-padded (B,P) with a 1/0 mask; positions count the mask as OPT's
learned positions expect, so padded and unpadded prompts give the same tokens.
Each step picks a token greedily (temperature 0) or samples it after temperature,
top-k and top-p (nucleus) filtering; `allowed` ranges can force which tokens a step
may emit (SEED-OPT's text -> image: exactly 32 code tokens, then </img>). Beam
search follows transformers' (finished hypotheses at eos, length-normalised scores)
and takes the same `allowed` ranges.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from seed_jax import parallel
from seed_jax.api.checks import is_integer, is_real
from seed_jax.models.opt import OPT


@dataclasses.dataclass(frozen=True)
class Sampling:
    """temperature 0: greedy. top_k 0 and top_p 1.0 disable those filters, as None does (transformers'
    `generate` reads an argument None so: it replaces the generation config's value, and the warper is
    skipped). A temperature None is refused: `generate` reads it as 1 with do_sample, as greedy without,
    and here the temperature chooses between them.

    A pytree: under jit `temperature`, `top_k` and `top_p` are traced, so new values
    run the compiled program again; the mode (`greedy`; `filtered`: top-k or top-p on)
    is static: one program decodes greedily, one samples with neither filter, one with
    either or both (every top_k and top_p). The mode is told from the values, so build it outside
    jit and pass it in. `tail` is 1 - top_p, the mass top-p may cut, computed in float64
    as transformers does."""
    temperature: float = 0.0
    top_k: int | None = 0
    top_p: float | None = 1.0
    greedy: bool = dataclasses.field(init=False)
    filtered: bool = dataclasses.field(init=False)
    tail: float = dataclasses.field(init=False)

    def __post_init__(self):
        for name in ("temperature", "top_k", "top_p"):  # the mode and `tail` are told from their values
            if isinstance(getattr(self, name), jax.core.Tracer):
                raise ValueError(f"{name}: expected a number, got a traced value: build the Sampling outside "
                                 "jit and pass it in (its temperature, top_k and top_p are traced there)")
        if self.temperature is None:
            raise ValueError("temperature: expected a finite number >= 0 (0: greedy), got None, which transformers' "
                             "generate reads as 1.0 with do_sample=True and as greedy without: pass 1.0 or 0")
        for name, off in (("top_k", 0), ("top_p", 1.0)):
            if getattr(self, name) is None:
                object.__setattr__(self, name, off)
        # NaN passes `< 0`; NaN or inf logits would escape the `allowed` ranges' -inf. A string or a bool is
        # no number here (a string failed in numpy's isfinite or in `<`, naming nothing).
        if not (is_real(self.temperature) and np.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature: expected a finite number >= 0 (0: greedy), got {self.temperature!r}")
        if not is_integer(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k: expected an integer >= 0 (0: no top-k), got {self.top_k!r}")
        if not (is_real(self.top_p) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p: expected a number 0 < top_p <= 1 (1: no top-p), got {self.top_p!r}")
        # Python numbers: numpy scalars would trace as other types, compiling again; a top_k beyond int32
        # (traced so) keeps the whole vocabulary, as any beyond it does
        for name, value in (("temperature", float(self.temperature)), ("top_k", min(int(self.top_k), 2**31 - 1)),
                            ("top_p", float(self.top_p))):
            object.__setattr__(self, name, value)
        object.__setattr__(self, "greedy", self.temperature == 0)
        object.__setattr__(self, "filtered", self.top_k > 0 or self.top_p < 1)
        object.__setattr__(self, "tail", 1.0 - self.top_p)


def _unflatten_sampling(modes, values) -> Sampling:
    """Rebuilds a checked Sampling around (possibly traced) values, unchecked."""
    sampling = object.__new__(Sampling)
    for name, value in zip(("greedy", "filtered", "temperature", "top_k", "top_p", "tail"), (*modes, *values)):
        object.__setattr__(sampling, name, value)
    return sampling


# greedy decoding reads no filter: one program serves every top_k and top_p
jax.tree_util.register_pytree_node(
    Sampling, lambda s: ((s.temperature, s.top_k, s.top_p, s.tail), (s.greedy, s.filtered and not s.greedy)),
    _unflatten_sampling)


def filter_logits(logits: jax.Array, sampling: Sampling) -> jax.Array:
    """(B,V) float32 -> the same divided by the temperature, then top-k and top-p
    filtered (filtered-out tokens -inf), as transformers' Temperature-, TopK- and
    TopPLogitsWarper in `generate`'s order. The row's maximum is subtracted first:
    a tiny temperature tends to greedy instead of overflowing to inf (it is clamped
    to float32's smallest normal number, so that one float32 rounds to 0, such as
    1e-50, does not divide by 0).

    Top-k keeps every token at least the k-th largest (ties included; top_k 0 or beyond
    the vocabulary keeps all). Top-p cuts the longest run of least likely tokens, in
    ascending order, whose softmax mass is at most `tail` (1 - top_p), and keeps at
    least the likeliest. Of the tokens tied across its cut, it keeps as many as
    transformers, the highest ids (as a stable sort orders them; which of them
    transformers keeps, torch.sort's order tells, for more than 16 tokens not stable)."""
    temperature = jnp.maximum(jnp.asarray(sampling.temperature, jnp.float32), jnp.finfo(jnp.float32).tiny)
    logits = (logits - logits.max(-1, keepdims=True)) / temperature
    if not sampling.filtered:
        return logits
    vocab = logits.shape[-1]
    ascending = jnp.sort(logits, -1)  # one sort serves both filters
    k = jnp.where(sampling.top_k == 0, vocab, jnp.minimum(sampling.top_k, vocab))
    kth = jax.lax.dynamic_index_in_dim(ascending, vocab - k, axis=-1)  # (B,1)
    ascending = jnp.where(ascending < kth, -jnp.inf, ascending)
    ids = jnp.arange(vocab)
    cut = ((jnp.cumsum(jax.nn.softmax(ascending, -1), -1) <= jnp.asarray(sampling.tail, jnp.float32))
           & (jnp.asarray(sampling.tail) > 0) & (ids < vocab - 1))  # top_p 1: off, as transformers skips it
    first = jnp.argmax(~cut, -1, keepdims=True)  # the first kept position
    low = jnp.take_along_axis(ascending, first, -1)
    # the tokens tied with the first kept one fill the positions up to the last <= it: keep that many of the
    # highest ids among them
    tied = logits == low
    kept_tied = (ascending <= low).sum(-1, keepdims=True) - first
    kept = ((logits > low) | (tied & (jnp.cumsum(tied[:, ::-1], -1)[:, ::-1] <= kept_tied))) & (logits >= kth)
    return jnp.where(kept, logits, -jnp.inf)


def allowed_ranges(max_new_tokens: int, ranges: list[tuple[int, int]] | None, vocab_size: int) -> np.ndarray:
    """Per step [low, high) token ids, (T,2) int32; steps past `ranges` allow everything."""
    ranges = [] if ranges is None else list(ranges)  # also a (T,2) array
    if len(ranges) > max_new_tokens:
        raise ValueError(f"allowed: expected at most max_new_tokens={max_new_tokens} ranges, got {len(ranges)}")
    out = np.tile(np.asarray([[0, vocab_size]], np.int32), (max_new_tokens, 1))
    for i, pair in enumerate(ranges):
        pair = np.asarray(pair)
        if not (pair.shape == (2,) and np.issubdtype(pair.dtype, np.integer) and 0 <= pair[0] < pair[1] <= vocab_size):
            raise ValueError(f"allowed[{i}]: expected integers (low, high) with 0 <= low < high <= {vocab_size} "
                             f"(the vocabulary size), got {pair.tolist()}")
        out[i] = pair
    return out


def up_to_last_end(tokens: np.ndarray, eos_id: int | None) -> np.ndarray:
    """(B,T) new tokens, `eos_id` ending each row -> (B,W): the columns up to the last
    row's `eos_id`, as transformers' `generate` returns them; all T when a row has not
    ended (or there is no `eos_id`)."""
    if eos_id is None:
        return tokens
    ended = np.asarray(tokens) == eos_id
    if not len(tokens) or not ended.any(1).all():
        return tokens
    return tokens[:, :ended.argmax(1).max() + 1]


def _prefill(model: OPT, input_ids: jax.Array, attention_mask: jax.Array, max_new_tokens: int) -> tuple:
    """(B,P) left-padded prompts -> the last prompt token's logits (B,V) (the only ones
    computed), a cache of P + max_new_tokens positions holding the prompt, the mask over
    it (B,P+T; the new columns 0) and the first new token's position (B,)."""
    batch, prompt_length = input_ids.shape
    mask = jnp.concatenate([attention_mask.astype(jnp.int32), jnp.zeros((batch, max_new_tokens), jnp.int32)], 1)
    positions = jnp.cumsum(mask[:, :prompt_length], axis=1) * mask[:, :prompt_length] - 1
    logits, cache = model(input_ids, mask, positions=positions, logits_at=jnp.full((batch, 1), prompt_length - 1),
                          cache=model.init_cache(batch, prompt_length + max_new_tokens), cache_index=0)
    return logits[:, 0], cache, mask, positions[:, -1] + 1


def generate(model: OPT, input_ids: jax.Array, attention_mask: jax.Array, *, max_new_tokens: int,
             sampling: Sampling = Sampling(), rng: jax.Array | None = None, allowed: jax.Array | None = None,
             eos_id: int | None = None, pad_id: int = 1, new_tokens: int | jax.Array | None = None) -> jax.Array:
    """(B,P) left-padded prompts -> (B,max_new_tokens) int32 new tokens. After
    `eos_id` a row emits `pad_id`; once every row has, decoding stops. `allowed` (T,2)
    restricts step t to ids in [allowed[t,0], allowed[t,1]). `eos_id` (-1: none, as None),
    `pad_id` and `new_tokens` may be traced; `new_tokens` (1..max_new_tokens, None: all)
    stops decoding after that many columns, the others left `pad_id`. `rng` is needed when
    sampling (temperature > 0):
    one key for the batch, or (B,) keys, one per row (a row's tokens then depend on
    its key and prompt alone, not on the batch it runs in)."""
    if not sampling.greedy and rng is None:
        raise ValueError("rng: sampling with temperature > 0 needs a PRNG key")
    batch, prompt_length = input_ids.shape
    vocab = model.config.total_vocab_size
    allowed = jnp.asarray(allowed_ranges(max_new_tokens, None, vocab) if allowed is None else allowed)
    logits, cache, mask, position = _prefill(model, input_ids, attention_mask, max_new_tokens)
    rng = jax.random.key(0) if rng is None else rng
    if not jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):  # raw uint32 data (jax.random.PRNGKey)
        rng = jax.random.wrap_key_data(rng)
    keys = rng if rng.ndim else jax.random.split(rng, batch)  # (B,)

    def choose(logits, i):
        ids = jnp.arange(logits.shape[-1])
        logits = jnp.where((ids >= allowed[i, 0]) & (ids < allowed[i, 1]), logits, -jnp.inf)
        if sampling.greedy:
            return jnp.argmax(logits, -1).astype(jnp.int32)
        sample = lambda key, row: jax.random.categorical(jax.random.fold_in(key, i), row)  # noqa: E731
        return jax.vmap(sample)(keys, filter_logits(logits, sampling)).astype(jnp.int32)

    def emit(i, logits, done, out):
        token = choose(logits, i)
        out = out.at[:, i].set(jnp.where(done, pad_id, token))
        return token, (done | (token == eos_id)) if eos_id is not None else done, out

    def step(state):
        i, logits, cache, mask, position, done, out = state
        token, done, out = emit(i, logits, done, out)
        mask = mask.at[:, prompt_length + i].set(1)
        logits, cache = model(token[:, None], mask, positions=position[:, None], cache=cache,
                              cache_index=prompt_length + i)
        return i + 1, logits[:, -1], cache, mask, position + 1, done, out

    state = (0, logits, cache, mask, position, jnp.zeros((batch,), bool),
             jnp.full((batch, max_new_tokens), pad_id, jnp.int32))
    limit = max_new_tokens if new_tokens is None else new_tokens
    # Every step but the last feeds its token back (the last token needs no forward
    # pass). The loop ends once every row has emitted eos_id; the columns left hold pad_id.
    i, logits, _, _, _, done, out = jax.lax.while_loop(lambda s: (s[0] < limit - 1) & ~s[5].all(), step, state)
    return emit(i, logits, done, out)[2]


class Beams(NamedTuple):
    """Beam search state: live beams (B*K rows) and each row's K finished hypotheses."""
    scores: jax.Array           # (B*K,) float32 total log-probability of each live beam
    tokens: jax.Array           # (B*K,T) int32 its new tokens so far, pad_id after
    finished_scores: jax.Array  # (B,K) float32 length-normalised; -inf for an empty slot
    finished_tokens: jax.Array  # (B,K,T) int32
    active: jax.Array           # (B,) bool: the row still takes finished hypotheses


def length_divisors(max_new_tokens: int, length_penalty: float) -> np.ndarray:
    """(T,) float32 length**length_penalty for lengths 1..T, computed in float64 and
    rounded to float32 once, as transformers' divisor is."""
    return (np.arange(1, max_new_tokens + 1, dtype=np.float64) ** length_penalty).astype(np.float32)


def beam_search(model: OPT, input_ids: jax.Array, attention_mask: jax.Array, *, max_new_tokens: int,
                num_beams: int, eos_id: int | None = None, pad_id: int = 1,
                length_penalty: float | jax.Array = 1.0, new_tokens: int | jax.Array | None = None,
                allowed: jax.Array | None = None) -> jax.Array:
    """(B,P) left-padded prompts -> (B,max_new_tokens) int32, as transformers'
    `generate(num_beams=K, do_sample=False)` with its default `early_stopping=False`.

    Each step takes the 2K best continuations of a row's K live beams. Those ending
    (with `eos_id`, or at the last step) among the first K are finished hypotheses,
    scored sum log-prob / length**length_penalty (length: new tokens, eos included)
    into a K-slot buffer; the K best others stay live. A row stops taking hypotheses
    once its buffer is full and its best live beam, scored at its current length, does
    not beat the buffer's worst; the loop ends when no row takes any. Returns each
    row's best hypothesis, `pad_id` after its eos. `length_penalty` is a number, or its
    (T,) `length_divisors` (an array may be traced: other penalties then reuse a compiled
    program), as `eos_id` (-1: none), `pad_id`, `new_tokens` and `allowed` (as `generate`'s)
    may be; `allowed` sets the other tokens' log-probabilities to -inf after the log-softmax
    over the whole vocabulary, as transformers' `prefix_allowed_tokens_fn`."""
    batch, prompt_length = input_ids.shape
    k = num_beams
    eos = -1 if eos_id is None else eos_id  # -1: no token ends a beam early
    limit = max_new_tokens if new_tokens is None else new_tokens
    repeat = lambda x: jnp.repeat(x, k, axis=0)  # noqa: E731  (B,...) -> (B*K,...), beams of a row adjacent
    take = lambda x, index: jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), 1)  # noqa: E731
    allowed = jnp.asarray(allowed_ranges(max_new_tokens, None, model.config.total_vocab_size) if allowed is None
                          else allowed)
    logits, cache, mask, position = _prefill(model, input_ids, attention_mask, max_new_tokens)
    cache = jax.tree.map(lambda c: jnp.repeat(c, k, axis=1), cache)  # cache batch axis is 1 (after layers)
    # New positions are written in order and the causal mask hides those not yet written.
    beam_mask = repeat(mask.at[:, prompt_length:].set(1))
    penalty = jnp.asarray(length_divisors(max_new_tokens, length_penalty) if np.ndim(length_penalty) == 0
                          else length_penalty, jnp.float32)

    def select(i, logits, beams: Beams):
        """Step i on the live beams' (B*K,V) logits -> their parents among their row's
        beams (B,K), new tokens (B*K,), next Beams. Beams move within their row only, so
        that rows split over devices stay apart."""
        vocab = logits.shape[-1]
        ids = jnp.arange(vocab)
        log_probs = jnp.where((ids >= allowed[i, 0]) & (ids < allowed[i, 1]), jax.nn.log_softmax(logits, -1), -jnp.inf)
        total = (beams.scores[:, None] + log_probs).reshape(batch, k * vocab)
        scores, flat = parallel.top_k_by_row(total, 2 * k)  # (B,2K), best first
        parent = flat // vocab
        token = (flat % vocab).astype(jnp.int32)
        tokens = take(beams.tokens.reshape(batch, k, -1), parent).at[:, :, i].set(token)  # (B,2K,T)
        ends = (token == eos) | (i == limit - 1)
        # an ended candidate runs on only where fewer than K others are left (K >= the vocabulary), dead (-inf)
        running = jnp.where(ends, -jnp.inf, scores)
        live = parallel.top_k_by_row(running, k)[1]  # (B,K)
        finishing = ends & (jnp.arange(2 * k) < k) & beams.active[:, None]
        merged = jnp.concatenate([beams.finished_scores, jnp.where(finishing, scores / penalty[i], -jnp.inf)], 1)
        best = parallel.top_k_by_row(merged, k)[1]
        finished_scores = take(merged, best)
        live_scores = take(running, live)
        # the worst of a buffer with an empty slot is -inf: the row stays active
        active = beams.active & (live_scores[:, 0] / penalty[i] > finished_scores.min(1))
        return take(parent, live), take(token, live).reshape(-1), Beams(
            live_scores.reshape(-1), take(tokens, live).reshape(batch * k, -1), finished_scores,
            take(jnp.concatenate([beams.finished_tokens, tokens], 1), best), active)

    def step(state):
        i, logits, cache, position, beams = state
        parent, token, beams = select(i, logits, beams)
        # (layers,B*K,...): each row's beams take their parents' keys and values
        cache = jax.tree.map(lambda c: jnp.take_along_axis(
            c.reshape(c.shape[0], batch, k, *c.shape[2:]), parent.reshape((1, batch, k) + (1,) * (c.ndim - 2)),
            2).reshape(c.shape), cache)
        logits, cache = model(token[:, None], beam_mask, positions=position[:, None], cache=cache,
                              cache_index=prompt_length + i)
        return i + 1, logits[:, -1], cache, position + 1, beams

    # Only the first beam of each row is live at the start, so the first step picks K distinct tokens.
    beams = Beams(jnp.tile(jnp.asarray([0.0] + [-jnp.inf] * (k - 1)), batch),
                  jnp.full((batch * k, max_new_tokens), pad_id, jnp.int32), jnp.full((batch, k), -jnp.inf),
                  jnp.full((batch, k, max_new_tokens), pad_id, jnp.int32), jnp.ones((batch,), bool))
    state = (0, repeat(logits), cache, repeat(position), beams)
    i, logits, _, _, beams = jax.lax.while_loop(lambda s: (s[0] < limit - 1) & s[4].active.any(), step, state)
    # The last step needs no forward pass; after an early stop no row is active and it changes nothing.
    return select(i, logits, beams)[2].finished_tokens[:, 0]
