"""CLIP text encoder (SD v1's ViT-L/14 text tower): token + position embeddings,
causal pre-LN blocks with quick-GELU, final LayerNorm. (B,77) ids -> (B,77,D)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from seed_jax.models import layers


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    vocab_size: int = 49408
    max_length: int = 77
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    eps: float = 1e-5
    activation: str = "quick_gelu"

    @property
    def block(self) -> layers.BlockConfig:
        return layers.BlockConfig(self.width, self.num_heads, self.mlp_dim, eps=self.eps,
                                  activation=self.activation, causal=True)


CLIP_TEXT_PRESETS = {
    "vit_l14": CLIPTextConfig(),
    "tiny": CLIPTextConfig(vocab_size=128, width=32, depth=1, num_heads=2, mlp_dim=64),
}


class CLIPTextEncoder(nnx.Module):

    def __init__(self, config: CLIPTextConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        c = config
        self.config = c
        self.token_embedding = layers.param(rngs, layers.normal(0.02), (c.vocab_size, c.width), ("vocab", "embed"))
        self.position_embedding = layers.param(rngs, layers.normal(0.01), (c.max_length, c.width),
                                               ("length", "embed"))
        self.blocks = layers.BlockStack(c.block, c.depth, dtype=dtype, rngs=rngs)
        self.final_norm = layers.LayerNorm(c.width, eps=c.eps, dtype=jnp.float32, rngs=rngs)

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        """input_ids (B,L<=77) int -> last hidden state (B,L,D) in float32."""
        c = self.config
        if input_ids.ndim != 2 or input_ids.shape[1] > c.max_length:
            raise ValueError(f"input_ids: expected (B,L) with L <= {c.max_length}, got {input_ids.shape}")
        x = self.token_embedding[...][input_ids] + self.position_embedding[...][: input_ids.shape[1]]
        return self.final_norm(self.blocks(x))
