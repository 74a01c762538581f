"""BLIP-2 Q-Former: a post-LN BERT whose learned queries cross-attend to image tokens.

Layers are grouped by `cross_attention_freq`: the first layer of each group has
cross-attention, and groups are scanned. Queries use their own feed-forward
(`intermediate_query` / `output_query`); text uses BERT's ordinary one. The causal
mask among queries is an explicit option (SEED's causal Q-Former turns it on).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from seed_jax import parallel
from seed_jax.models import layers


@dataclasses.dataclass(frozen=True)
class QFormerConfig:
    width: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    cross_attention_freq: int = 2
    encoder_width: int = 1408
    num_queries: int = 32
    causal_queries: bool = True
    with_text: bool = True  # word/position embeddings and the text feed-forward
    vocab_size: int = 30523
    max_positions: int = 512
    eps: float = 1e-12
    dropout: float = 0.1

    def __post_init__(self):
        if self.num_layers % self.cross_attention_freq:
            raise ValueError(f"num_layers {self.num_layers} must be a multiple of "
                             f"cross_attention_freq {self.cross_attention_freq}")


class FeedForward(nnx.Module):
    """BERT intermediate + output: LN(x + dropout(W2 gelu(W1 x)))."""

    def __init__(self, c: QFormerConfig, *, dtype, rngs: nnx.Rngs):
        self.intermediate = layers.Dense(c.width, c.mlp_dim, axes=("embed", "mlp"), dtype=dtype, rngs=rngs)
        self.output = layers.Dense(c.mlp_dim, c.width, axes=("mlp", "embed"), dtype=dtype, rngs=rngs)
        self.norm = layers.LayerNorm(c.width, eps=c.eps, dtype=dtype, rngs=rngs)

    def __call__(self, x, dropout_rate, rng):
        y = self.output(layers.ACTIVATIONS["gelu"](self.intermediate(x)))
        return self.norm(x + layers.dropout(y, dropout_rate, rng))


class QFormerLayer(nnx.Module):

    def __init__(self, c: QFormerConfig, has_cross: bool, *, dtype, rngs: nnx.Rngs):
        self.self_attn = layers.Attention(c.width, c.num_heads, dtype=dtype, rngs=rngs)
        self.self_norm = layers.LayerNorm(c.width, eps=c.eps, dtype=dtype, rngs=rngs)
        if has_cross:
            self.cross_attn = layers.Attention(c.width, c.num_heads, kv_width=c.encoder_width,
                                               dtype=dtype, rngs=rngs)
            self.cross_norm = layers.LayerNorm(c.width, eps=c.eps, dtype=dtype, rngs=rngs)
        else:
            self.cross_attn = self.cross_norm = None
        self.query_ffn = FeedForward(c, dtype=dtype, rngs=rngs)
        self.text_ffn = FeedForward(c, dtype=dtype, rngs=rngs) if c.with_text else None
        self.dropout = c.dropout

    def _self_attention(self, x, mask, rng):
        r_probs, r_out = layers.split_rng(rng, 2)
        y = self.self_attn(x, mask=mask, dropout_rate=self.dropout, rng=r_probs)
        return self.self_norm(x + layers.dropout(y, self.dropout, r_out))

    def queries(self, x, image, mask, rng):
        """x (B,Q,D) queries, image (B,S,E) -> (B,Q,D)."""
        r_self, r_probs, r_out, r_ffn = layers.split_rng(rng, 4)
        x = self._self_attention(x, mask, r_self)
        if self.cross_attn is not None:
            y = self.cross_attn(x, image, dropout_rate=self.dropout, rng=r_probs)
            x = self.cross_norm(x + layers.dropout(y, self.dropout, r_out))
        return self.query_ffn(x, self.dropout, r_ffn)

    def text(self, x, mask, rng):
        """x (B,L,D) text tokens, bidirectional with padding mask -> (B,L,D)."""
        r_self, r_ffn = layers.split_rng(rng, 2)
        return self.text_ffn(self._self_attention(x, mask, r_self), self.dropout, r_ffn)


class QFormerGroup(nnx.Module):
    """`cross_attention_freq` consecutive layers; the first one has cross-attention."""

    def __init__(self, c: QFormerConfig, *, dtype, rngs: nnx.Rngs):
        self.layers = nnx.List([QFormerLayer(c, i == 0, dtype=dtype, rngs=rngs)
                                for i in range(c.cross_attention_freq)])

    def queries(self, x, image, mask, rng):
        for layer, r in zip(self.layers, layers.split_rng(rng, len(self.layers))):
            x = layer.queries(x, image, mask, r)
        return x

    def text(self, x, mask, rng):
        for layer, r in zip(self.layers, layers.split_rng(rng, len(self.layers))):
            x = layer.text(x, mask, r)
        return x


class QFormer(nnx.Module):
    """Learned queries (num_queries, D) read image tokens; optionally encodes text."""

    def __init__(self, config: QFormerConfig, *, dtype=jnp.float32, remat: bool = False, rngs: nnx.Rngs):
        c = config
        self.config = c
        self.query_tokens = layers.param(rngs, layers.normal(0.02), (c.num_queries, c.width),
                                         ("length", "embed"))
        self.embed_norm = layers.LayerNorm(c.width, eps=c.eps, dtype=dtype, rngs=rngs)
        if c.with_text:
            self.word_embeddings = layers.param(rngs, layers.normal(0.02), (c.vocab_size, c.width),
                                                ("vocab", "embed"))
            self.position_embeddings = layers.param(rngs, layers.normal(0.02), (c.max_positions, c.width),
                                                    (None, "embed"))
        num_groups = c.num_layers // c.cross_attention_freq
        self.groups = layers.stacked(lambda r: QFormerGroup(c, dtype=dtype, rngs=r), num_groups, rngs)
        self.num_groups = num_groups
        self.remat = remat
        self.dtype = dtype

    def _layer_rngs(self, rng):
        return None if rng is None else jax.random.split(rng, self.num_groups)

    def queries(self, image: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        """image (B,S,E) -> query outputs (B,Q,D). `rng` enables dropout."""
        c = self.config
        if image.ndim != 3 or image.shape[-1] != c.encoder_width:
            raise ValueError(f"image: expected (B,S,{c.encoder_width}), got {image.shape}")
        b = image.shape[0]
        r_embed, r_layers = layers.split_rng(rng, 2)
        x = self.embed_norm(jnp.broadcast_to(self.query_tokens[...], (b, c.num_queries, c.width)))
        x = layers.dropout(x, c.dropout, r_embed)
        mask = layers.causal_mask(c.num_queries) if c.causal_queries else None
        image = image.astype(self.dtype)

        def step(group, h, r):
            return group.queries(parallel.constrain(h, ("batch", "length", "embed")), image, mask, r)

        return layers.scan(self.groups, step, x, self._layer_rngs(r_layers), remat=self.remat)

    def text(self, input_ids: jax.Array, attention_mask: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        """input_ids, attention_mask (B,L) -> token outputs (B,L,D); [CLS] is position 0."""
        c = self.config
        if not c.with_text:
            raise ValueError("text: this Q-Former was built with with_text=False")
        length = input_ids.shape[1]
        if length > c.max_positions:
            raise ValueError(f"input_ids: length {length} exceeds max_positions {c.max_positions}")
        r_embed, r_layers = layers.split_rng(rng, 2)
        # The lookup reads the word table whole: split over `fsdp` along its width and looked up
        # by ids split over the batch axes, it made XLA's partitioner copy the looked-up (B,L,D)
        # rows of the whole batch to every device on meshes with data > 1 ("involuntary full
        # rematerialization" in stage I's backward pass on gpu8x8 and tpu_v4_32), as OPT's did.
        words = parallel.constrain(self.word_embeddings[...], (None, None))[input_ids]
        x = words + self.position_embeddings[...][:length]
        x = layers.dropout(self.embed_norm(x), c.dropout, r_embed)
        mask = layers.padding_mask(attention_mask)

        def step(group, h, r):
            return group.text(parallel.constrain(h, ("batch", "length", "embed")), mask, r)

        return layers.scan(self.groups, step, x, self._layer_rngs(r_layers), remat=self.remat)
