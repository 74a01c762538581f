"""BLIP-2's stage-1 model as SEED starts from it: EVA ViT, ln_vision, Q-Former and
the contrastive heads, without a language model.

Its parameter names are those of `SeedTokenizer`, so a converted BLIP-2 checkpoint
initialises the tokenizer's image side and Q-Former path by path.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from seed_jax.models import layers
from seed_jax.models.qformer import QFormer, QFormerConfig
from seed_jax.models.tokenizer import l2_normalize
from seed_jax.models.vit import VisionTransformer, ViTConfig


@dataclasses.dataclass(frozen=True)
class Blip2Config:
    vit: ViTConfig = ViTConfig()
    qformer: QFormerConfig = QFormerConfig(causal_queries=False)
    ln_vision_eps: float = 1e-5
    proj_dim: int = 256
    with_itc_heads: bool = False  # vision_proj and text_proj
    with_temperature: bool = False  # LAVIS keeps `temp`; Hugging Face does not

    @classmethod
    def from_dict(cls, d: dict) -> "Blip2Config":
        d = dict(d)
        d["vit"] = ViTConfig(**d["vit"])
        d["qformer"] = QFormerConfig(**d["qformer"])
        return cls(**d)


class Blip2QFormer(nnx.Module):

    def __init__(self, config: Blip2Config, *, dtype=jnp.float32, remat: bool = False, rngs: nnx.Rngs):
        c = config
        if c.vit.width != c.qformer.encoder_width:
            raise ValueError(f"qformer.encoder_width {c.qformer.encoder_width} != vit.width {c.vit.width}")
        self.config = c
        self.visual_encoder = VisionTransformer(c.vit, dtype=dtype, remat=remat, rngs=rngs)
        self.ln_vision = layers.LayerNorm(c.vit.width, eps=c.ln_vision_eps, dtype=jnp.float32, rngs=rngs)
        self.qformer = QFormer(c.qformer, dtype=dtype, remat=remat, rngs=rngs)
        d = c.qformer.width
        if c.with_itc_heads:
            self.vision_proj = layers.Dense(d, c.proj_dim, axes=("embed", None), dtype=dtype, rngs=rngs)
            self.text_proj = layers.Dense(d, c.proj_dim, axes=("embed", None), dtype=dtype, rngs=rngs)
        if c.with_temperature:
            self.temp = nnx.Param(jnp.asarray(0.07, jnp.float32), out_sharding=(), eager_sharding=False)

    def image_embeds(self, pixels: jax.Array) -> tuple[jax.Array, jax.Array]:
        """pixels (B,S,S,3) -> (ViT features, ln_vision output), each (B,1+P,E)."""
        features = self.visual_encoder(pixels)
        return features, self.ln_vision(features)

    def queries(self, pixels: jax.Array) -> jax.Array:
        """pixels (B,S,S,3) -> Q-Former query outputs (B,Q,D)."""
        return self.qformer.queries(self.image_embeds(pixels)[1])

    def image_features(self, queries: jax.Array) -> jax.Array:
        """(B,Q,D) -> L2-normalised vision_proj of every query (B,Q,F), as BLIP-2 scores them."""
        return l2_normalize(self.vision_proj(queries))

    def text_features(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        """(B,L) -> L2-normalised text_proj of the text [CLS] output (B,F)."""
        return l2_normalize(self.text_proj(self.qformer.text(input_ids, attention_mask)[:, 0]))
