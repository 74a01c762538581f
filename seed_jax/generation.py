"""Autoregressive decoding for `models.opt.OPT` with its key/value cache, the whole
loop in one `lax.while_loop` (call under jit).

Prompts are left-padded (B,P) with a 1/0 mask; positions count the mask as OPT's
learned positions expect, so padded and unpadded prompts give the same tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from seed_jax.models.opt import OPT


def greedy(model: OPT, input_ids: jax.Array, attention_mask: jax.Array, *, max_new_tokens: int,
           eos_id: int | None = None, pad_id: int = 1) -> jax.Array:
    """(B,P) left-padded prompts -> (B,max_new_tokens) int32 new tokens, argmax at
    every step; after `eos_id` a row emits `pad_id`."""
    batch, prompt_length = input_ids.shape
    total = prompt_length + max_new_tokens
    mask = jnp.concatenate([attention_mask.astype(jnp.int32), jnp.zeros((batch, max_new_tokens), jnp.int32)], 1)
    positions = jnp.cumsum(mask[:, :prompt_length], axis=1) * mask[:, :prompt_length] - 1
    logits, cache = model(input_ids, mask, positions=positions, cache=model.init_cache(batch, total),
                          cache_index=0)
    next_position = positions[:, -1] + 1

    def step(state):
        i, token, cache, mask, next_position, done, out = state
        out = out.at[:, i].set(jnp.where(done, pad_id, token))
        done = done | (token == eos_id) if eos_id is not None else done
        mask = mask.at[:, prompt_length + i].set(1)
        logits, cache = model(token[:, None], mask, positions=next_position[:, None], cache=cache,
                              cache_index=prompt_length + i)
        return i + 1, jnp.argmax(logits[:, -1], -1).astype(jnp.int32), cache, mask, next_position + 1, done, out

    state = (0, jnp.argmax(logits[:, -1], -1).astype(jnp.int32), cache, mask, next_position,
             jnp.zeros((batch,), bool), jnp.zeros((batch, max_new_tokens), jnp.int32))
    return jax.lax.while_loop(lambda s: s[0] < max_new_tokens, step, state)[-1]
