"""Model dimensions read from source checkpoint shapes.

Everything a shape tells (widths, depths, layer counts, query counts, codebook
size, image size) comes from here; head counts and epsilons, which no shape
tells, come from the caller.
"""

from __future__ import annotations

import math
from typing import Sequence

from seed_jax.convert.rules import Source
from seed_jax.models.qformer import QFormerConfig
from seed_jax.models.vit import ViTConfig


def need(source: Source, key: str, why: str, rank: int | None = None) -> tuple[int, ...]:
    """The shape of `key` in `source`, which must hold it (with `rank` dimensions)."""
    if key not in source:
        raise KeyError(f"{source.name}: missing key {key!r} ({why})")
    shape = tuple(source.shape(key))
    if rank is not None and len(shape) != rank:
        raise ValueError(f"{source.name}: {key!r} ({why}) has shape {shape}, expected {rank} dimensions")
    return shape


def prefix(source: Source, key: str, candidates: Sequence[str], what: str) -> str:
    """The first of `candidates` under which `source` holds `key`."""
    for candidate in candidates:
        if candidate + key in source:
            return candidate
    raise KeyError(f"{source.name}: missing key {candidates[0] + key!r} (also tried the prefixes "
                   f"{', '.join(repr(c) for c in candidates[1:])}; not {what})")


def heads(count: int, width: int, setting: str) -> int:
    """`count` attention heads (read from `setting`), which must divide `width`."""
    if width % count:
        raise ValueError(f"{setting}={count} does not divide the width {width}")
    return count


def layer_count(source: Source, template: str, configured: int | None, setting: str) -> int:
    """Layers to build: `configured` (from `setting`, e.g. config.json's
    num_hidden_layers, as transformers builds them; stored layers beyond it are left
    unused), else all stored ones. `template` (with `{i}`) counts the stored layers;
    fewer than `configured` fails naming the first missing key."""
    stored = source.count(template)
    if configured is None:
        return stored
    if stored < configured:
        raise KeyError(f"{source.name}: missing key {template.format(i=stored)!r} ({setting}={configured}, "
                       f"{stored} layers stored)")
    return configured


def vit_config(source: Source, *, patch_weight: str, pos_embed: str, block: str, fc1: str, heads: int,
               eps: float = 1e-6, depth: int | None = None, depth_setting: str = "--vit_depth") -> ViTConfig:
    """`block` is a template with `{i}` whose presence counts the layers; `depth` (read
    from `depth_setting`; default: all of them) builds the first `depth` (see
    `layer_count`)."""
    width, _, patch, _ = need(source, patch_weight, "the ViT patch embedding", rank=4)
    num_tokens = need(source, pos_embed, "the ViT position embedding")[-2]
    grid = math.isqrt(num_tokens - 1)
    if grid * grid != num_tokens - 1:
        raise ValueError(f"{pos_embed}: {num_tokens} positions is not 1 + a square grid")
    if block.format(i=0) not in source:
        raise KeyError(f"{source.name}: no ViT blocks ({block.format(i=0)!r} missing)")
    depth = layer_count(source, block, depth, depth_setting)
    mlp_dim = need(source, fc1.format(i=0), "the ViT MLP width")[0]
    if width % heads:
        raise ValueError(f"vit heads {heads} do not divide the ViT width {width}")
    return ViTConfig(image_size=grid * patch, patch_size=patch, width=width, depth=depth, num_heads=heads,
                     mlp_dim=mlp_dim, eps=eps)


def qformer_config(source: Source, *, layer: str, query_tokens: str, self_key: str, cross_key: str, heads: int,
                   causal: bool, word_embeddings: str | None, position_embeddings: str | None,
                   eps: float = 1e-12, depth: int | None = None) -> QFormerConfig:
    """`layer` is the encoder layer template ("Qformer.bert.encoder.layer.{i}.");
    `self_key` / `cross_key` are relative to it. Text parts are on when the word
    embeddings and the text feed-forward are both present. `depth`: config.json's
    qformer_config.num_hidden_layers (default: all stored layers; see `layer_count`)."""
    _, num_queries, width = need(source, query_tokens, "the query tokens", rank=3)
    num_layers = layer_count(source, layer + self_key, depth, "config.json qformer_config.num_hidden_layers")
    if num_layers == 0:
        raise KeyError(f"{source.name}: no Q-Former layers ({(layer + self_key).format(i=0)!r} missing)")
    cross = [i for i in range(num_layers) if (layer + cross_key).format(i=i) in source]
    if not cross or cross[0] != 0:
        raise ValueError(f"{source.name}: the Q-Former's layer 0 has no cross-attention ({cross_key})")
    freq = cross[1] - cross[0] if len(cross) > 1 else num_layers
    if cross != list(range(0, num_layers, freq)):
        raise ValueError(f"{source.name}: cross-attention on layers {cross} is not every {freq}th layer from 0")
    if num_layers % freq:  # else QFormerConfig's error, naming neither the checkpoint nor the Q-Former
        raise ValueError(f"{source.name}: a Q-Former of {num_layers} layers with cross-attention every {freq} "
                         f"(on layers {cross}): expected a multiple of {freq} layers, the groups our Q-Former "
                         "scans")
    encoder_width = source.shape((layer + cross_key).format(i=0))[1]
    mlp_dim = need(source, (layer + "intermediate_query.dense.weight").format(i=0), "the query MLP width")[0]
    with_text = (word_embeddings is not None and word_embeddings in source
                 and (layer + "intermediate.dense.weight").format(i=0) in source)
    vocab_size, max_positions = 30523, 512
    if with_text:
        vocab_size = source.shape(word_embeddings)[0]
        max_positions = need(source, position_embeddings, "the text position embeddings")[0]
    if width % heads:
        raise ValueError(f"qformer heads {heads} do not divide the Q-Former width {width}")
    return QFormerConfig(width=width, num_layers=num_layers, num_heads=heads, mlp_dim=mlp_dim,
                         cross_attention_freq=freq, encoder_width=encoder_width, num_queries=num_queries,
                         causal_queries=causal, with_text=with_text, vocab_size=vocab_size,
                         max_positions=max_positions, eps=eps, dropout=0.1)
