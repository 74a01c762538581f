"""Autoregressive decoding for `models.opt.OPT` with its key/value cache, the whole
loop in one `lax.while_loop` (call under jit).

Prompts are left-padded (B,P) with a 1/0 mask; positions count the mask as OPT's
learned positions expect, so padded and unpadded prompts give the same tokens.
Each step picks a token greedily (temperature 0) or samples it after temperature,
top-k and top-p (nucleus) filtering; `allowed` ranges can force which tokens a step
may emit (SEED-OPT's text -> image: exactly 32 code tokens, then </img>).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from seed_jax.models.opt import OPT


@dataclasses.dataclass(frozen=True)
class Sampling:
    """temperature 0: greedy. top_k 0 and top_p 1.0 disable those filters."""
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"sampling: expected temperature >= 0, top_k >= 0, 0 < top_p <= 1, got {self}")


def filter_logits(logits: jax.Array, sampling: Sampling) -> jax.Array:
    """(B,V) float32 -> the same with filtered-out tokens at -inf, divided by the temperature."""
    logits = logits / sampling.temperature
    if sampling.top_k:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        cutoff_index = jnp.sum(cumulative - jax.nn.softmax(sorted_logits, axis=-1) < sampling.top_p, axis=-1)
        cutoff = jnp.take_along_axis(sorted_logits, cutoff_index[:, None] - 1, axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return logits


def allowed_ranges(max_new_tokens: int, ranges: list[tuple[int, int]] | None, vocab_size: int) -> np.ndarray:
    """Per step [low, high) token ids, (T,2) int32; steps past `ranges` allow everything."""
    out = np.tile(np.asarray([[0, vocab_size]], np.int32), (max_new_tokens, 1))
    for i, (low, high) in enumerate((ranges or [])[:max_new_tokens]):
        out[i] = (low, high)
    return out


def generate(model: OPT, input_ids: jax.Array, attention_mask: jax.Array, *, max_new_tokens: int,
             sampling: Sampling = Sampling(), rng: jax.Array | None = None, allowed: jax.Array | None = None,
             eos_id: int | None = None, pad_id: int = 1) -> jax.Array:
    """(B,P) left-padded prompts -> (B,max_new_tokens) int32 new tokens. After
    `eos_id` a row emits `pad_id`. `allowed` (T,2) restricts step t to ids in
    [allowed[t,0], allowed[t,1]). `rng` is needed when sampling (temperature > 0)."""
    if sampling.temperature > 0 and rng is None:
        raise ValueError("rng: sampling with temperature > 0 needs a PRNG key")
    batch, prompt_length = input_ids.shape
    vocab = model.config.total_vocab_size
    allowed = jnp.asarray(allowed_ranges(max_new_tokens, None, vocab) if allowed is None else allowed)
    mask = jnp.concatenate([attention_mask.astype(jnp.int32), jnp.zeros((batch, max_new_tokens), jnp.int32)], 1)
    positions = jnp.cumsum(mask[:, :prompt_length], axis=1) * mask[:, :prompt_length] - 1
    logits, cache = model(input_ids, mask, positions=positions,
                          cache=model.init_cache(batch, prompt_length + max_new_tokens), cache_index=0)
    rng = jax.random.key(0) if rng is None else rng

    def choose(logits, i):
        ids = jnp.arange(logits.shape[-1])
        logits = jnp.where((ids >= allowed[i, 0]) & (ids < allowed[i, 1]), logits, -jnp.inf)
        if sampling.temperature == 0:
            return jnp.argmax(logits, -1).astype(jnp.int32)
        return jax.random.categorical(jax.random.fold_in(rng, i), filter_logits(logits, sampling)).astype(jnp.int32)

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

    state = (0, logits[:, -1], cache, mask, positions[:, -1] + 1, jnp.zeros((batch,), bool),
             jnp.zeros((batch, max_new_tokens), jnp.int32))
    # every step but the last feeds its token back; the last token needs no forward pass
    i, logits, _, _, _, done, out = jax.lax.while_loop(lambda s: s[0] < max_new_tokens - 1, step, state)
    return emit(i, logits, done, out)[2]


def beam_search(model: OPT, input_ids: jax.Array, attention_mask: jax.Array, *, max_new_tokens: int,
                num_beams: int) -> jax.Array:
    """(B,P) left-padded prompts -> (B,max_new_tokens) int32: the beam of highest
    total log-probability after exactly `max_new_tokens` tokens (no early end; all
    hypotheses have the same length, so no length penalty applies)."""
    batch, prompt_length = input_ids.shape
    k = num_beams
    repeat = lambda x: jnp.repeat(x, k, axis=0)  # noqa: E731  (B,...) -> (B*K,...), beams of a row adjacent
    mask = jnp.concatenate([attention_mask.astype(jnp.int32), jnp.zeros((batch, max_new_tokens), jnp.int32)], 1)
    positions = jnp.cumsum(mask[:, :prompt_length], axis=1) * mask[:, :prompt_length] - 1
    logits, cache = model(input_ids, mask, positions=positions,
                          cache=model.init_cache(batch, prompt_length + max_new_tokens), cache_index=0)
    cache = jax.tree.map(lambda c: jnp.repeat(c, k, axis=1), cache)  # cache batch axis is 1 (after layers)
    # Only the first beam of each row is live at the start, so the first step picks K distinct tokens.
    scores = jnp.tile(jnp.asarray([0.0] + [-jnp.inf] * (k - 1)), batch)
    # New positions are written in order and the causal mask hides those not yet written.
    beam_mask = repeat(mask.at[:, prompt_length:].set(1))

    def select(logits, scores):
        """(B*K,V) logits -> the K best continuations of each row: parents (B*K,), tokens, scores."""
        vocab = logits.shape[-1]
        total = (scores[:, None] + jax.nn.log_softmax(logits, -1)).reshape(batch, k * vocab)
        scores, flat = jax.lax.top_k(total, k)  # (B,K)
        parent = (flat // vocab + jnp.arange(batch)[:, None] * k).reshape(-1)
        return parent, (flat % vocab).reshape(-1).astype(jnp.int32), scores.reshape(-1)

    def extend(i, logits, scores, out):
        parent, token, scores = select(logits, scores)
        return scores, out[parent].at[:, i].set(token)

    def step(state):
        i, logits, cache, scores, position, out = state
        parent, token, scores = select(logits, scores)
        cache = jax.tree.map(lambda c: c[:, parent], cache)
        out = out[parent].at[:, i].set(token)
        logits, cache = model(token[:, None], beam_mask, positions=position[:, None], cache=cache,
                              cache_index=prompt_length + i)
        return i + 1, logits[:, -1], cache, scores, position + 1, out

    state = (0, repeat(logits[:, -1]), cache, scores, repeat(positions[:, -1] + 1),
             jnp.zeros((batch * k, max_new_tokens), jnp.int32))
    i, logits, _, scores, _, out = jax.lax.while_loop(lambda s: s[0] < max_new_tokens - 1, step, state)
    scores, out = extend(i, logits, scores, out)  # the last token needs no forward pass
    best = jnp.argmax(scores.reshape(batch, k), -1) + jnp.arange(batch) * k
    return out[best]
