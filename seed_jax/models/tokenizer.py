"""The SEED v1 tokenizer: image -> 32 causal codes -> 77 generation embeddings.

pixels (B,S,S,3) -> EVA ViT (B,1+P,E) -> ln_vision -> causal Q-Former (B,32,D)
-> encode_task_layer (B,32,C) -> VQ codes (B,32) -> decode_task_layer (B,32,D)
-> + pos_embed_text -> blocks_text (B,32,D) -> reverse Q-Former (B,77,D)
-> distill_text_proj (B,77,G).
Stage-I heads: vision_proj / text_proj (D -> 256) and a learnable temperature.
Stage-II reconstruction head (`recon_head`, training only; DESIGN's release keys have
none, and `convert seed_v1` builds it when a checkpoint has `pos_embed` + `blocks.*`):
decode_task_layer (B,32,D) -> + pos_embed -> blocks (B,32,D), the causal embeddings
rebuilt from the codes, apart from the generation path as in SEED's training code.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from seed_jax.models import layers
from seed_jax.models.qformer import QFormer, QFormerConfig
from seed_jax.models.quantizer import VectorQuantizer
from seed_jax.models.vit import VisionTransformer, ViTConfig


@dataclasses.dataclass(frozen=True)
class SeedTokenizerConfig:
    vit: ViTConfig = ViTConfig()
    qformer: QFormerConfig = QFormerConfig()
    reverse_qformer: QFormerConfig = QFormerConfig(
        num_layers=4, encoder_width=768, num_queries=77, causal_queries=False, with_text=False)
    num_codes: int = 8192
    code_dim: int = 32
    decoder_depth: int = 4
    decoder_heads: int = 12
    decoder_mlp_dim: int = 3072
    generation_width: int = 768
    proj_dim: int = 256
    with_itc_heads: bool = True  # vision_proj, text_proj, temperature (stage I)
    recon_head: bool = False  # pos_embed + blocks for L_recon (training); False: reconstruct via blocks_text
    init_temperature: float = 0.07
    vq_beta: float = 0.25
    ln_vision_eps: float = 1e-5  # LAVIS's ln_vision; Hugging Face's BLIP-2 uses the ViT's eps

    @property
    def decoder_block(self) -> layers.BlockConfig:
        return layers.BlockConfig(self.qformer.width, self.decoder_heads, self.decoder_mlp_dim, eps=1e-6)

    @classmethod
    def from_dict(cls, d: dict) -> "SeedTokenizerConfig":
        d = dict(d)
        d["vit"] = ViTConfig(**d["vit"])
        d["qformer"] = QFormerConfig(**d["qformer"])
        d["reverse_qformer"] = QFormerConfig(**d["reverse_qformer"])
        return cls(**d)


class TaskLayer(nnx.Module):
    """Linear -> tanh -> Linear (SEED's encode_task_layer / decode_task_layer)."""

    def __init__(self, width_in: int, width_hidden: int, width_out: int, *, dtype, precision=None,
                 rngs: nnx.Rngs):
        self.fc1 = layers.Dense(width_in, width_hidden, axes=("embed", None), dtype=dtype, precision=precision,
                                rngs=rngs)
        self.fc2 = layers.Dense(width_hidden, width_out, axes=(None, "embed"), dtype=dtype, precision=precision,
                                rngs=rngs)

    def __call__(self, x):
        return self.fc2(jnp.tanh(self.fc1(x)))


def l2_normalize(x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class SeedTokenizer(nnx.Module):

    def __init__(self, config: SeedTokenizerConfig, *, dtype=jnp.float32, remat: bool = False,
                 rngs: nnx.Rngs):
        c = config
        d = c.qformer.width
        if c.vit.width != c.qformer.encoder_width:
            raise ValueError(f"qformer.encoder_width {c.qformer.encoder_width} != vit.width {c.vit.width}")
        if c.reverse_qformer.encoder_width != d:
            raise ValueError(f"reverse_qformer.encoder_width {c.reverse_qformer.encoder_width} != qformer.width {d}")
        self.config, self.dtype = c, dtype  # dtype: the compute dtype (the API reads it)
        self.visual_encoder = VisionTransformer(c.vit, dtype=dtype, remat=remat, rngs=rngs)
        self.ln_vision = layers.LayerNorm(c.vit.width, eps=c.ln_vision_eps, dtype=jnp.float32, rngs=rngs)
        self.qformer = QFormer(c.qformer, dtype=dtype, remat=remat, rngs=rngs)
        # float32 whatever `dtype`, as SEED runs it (outside autocast): the VQ distance reads its output,
        # and bfloat16's rounding (~1e-2) would flip the nearest code of near-ties. At HIGHEST
        # precision, as the distance: GPUs' default for float32 matmuls (TF32) rounds the inputs.
        self.encode_task_layer = TaskLayer(d, d, c.code_dim, dtype=jnp.float32, precision=jax.lax.Precision.HIGHEST,
                                           rngs=rngs)
        self.quantize = VectorQuantizer(c.num_codes, c.code_dim, beta=c.vq_beta, rngs=rngs)
        self.decode_task_layer = TaskLayer(c.code_dim, c.code_dim, d, dtype=dtype, rngs=rngs)
        self.pos_embed_text = layers.param(rngs, layers.normal(0.02), (c.qformer.num_queries, d),
                                           ("length", "embed"))
        self.blocks_text = layers.BlockStack(c.decoder_block, c.decoder_depth, dtype=dtype, remat=remat, rngs=rngs)
        self.reverse_qformer = QFormer(c.reverse_qformer, dtype=dtype, remat=remat, rngs=rngs)
        self.distill_text_proj = layers.Dense(d, c.generation_width, dtype=dtype, rngs=rngs)
        if c.with_itc_heads:
            self.vision_proj = layers.Dense(d, c.proj_dim, axes=("embed", None), dtype=dtype, rngs=rngs)
            self.text_proj = layers.Dense(d, c.proj_dim, axes=("embed", None), dtype=dtype, rngs=rngs)
            self.temp = nnx.Param(jnp.asarray(c.init_temperature, jnp.float32), out_sharding=(),
                                  eager_sharding=False)
        if c.recon_head:  # built last: the other parameters draw the same keys with or without it
            self.pos_embed = layers.param(rngs, layers.normal(0.02), (c.qformer.num_queries, d),
                                          ("length", "embed"))
            self.blocks = layers.BlockStack(c.decoder_block, c.decoder_depth, dtype=dtype, remat=remat, rngs=rngs)

    # ---- image -> causal embeddings -> codes
    def image_embeds(self, pixels: jax.Array) -> tuple[jax.Array, jax.Array]:
        """pixels (B,S,S,3) -> (ViT features, ln_vision output), each (B,1+P,E)."""
        features = self.visual_encoder(pixels)
        return features, self.ln_vision(features)

    def causal_embeddings(self, pixels: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        """pixels (B,S,S,3) -> causal Q-Former outputs (B,32,D)."""
        return self.qformer.queries(self.image_embeds(pixels)[1], rng=rng)

    def quantize_embeddings(self, causal: jax.Array) -> dict[str, jax.Array]:
        """causal (B,32,D) -> quant_input (B,32,C), codes (B,32), quantized (B,32,C), loss."""
        quant_input = self.encode_task_layer(causal)
        return {"quant_input": quant_input, **self.quantize(quant_input)}

    def encode(self, pixels: jax.Array) -> dict[str, jax.Array]:
        """pixels (B,S,S,3) -> every intermediate of tokenization; `codes` is (B,32) int32."""
        vit_features, image_embeds = self.image_embeds(pixels)
        causal = self.qformer.queries(image_embeds)
        out = self.quantize_embeddings(causal)
        out.pop("loss")
        return {"vit_features": vit_features, "image_embeds": image_embeds,
                "causal_embeddings": causal, **out}

    # ---- codes -> embeddings
    def generation_tokens(self, quantized: jax.Array) -> jax.Array:
        """code vectors (B,32,C) -> decode_task_layer + pos_embed_text -> blocks_text (B,32,D)."""
        return self.blocks_text(self.decode_task_layer(quantized) + self.pos_embed_text[...])

    def reconstruct(self, quantized: jax.Array) -> jax.Array:
        """code vectors (B,32,C) -> reconstructed causal embeddings (B,32,D): through the
        reconstruction head when the model has one, else the generation path's blocks."""
        if not self.config.recon_head:
            return self.generation_tokens(quantized)
        return self.blocks(self.decode_task_layer(quantized) + self.pos_embed[...])

    def generation_embeddings(self, tokens: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        """`generation_tokens` (B,32,D) -> reverse Q-Former -> distill_text_proj -> (B,77,G).
        `rng` enables dropout."""
        return self.distill_text_proj(self.reverse_qformer.queries(tokens, rng=rng)).astype(jnp.float32)

    def embed_codes(self, codes: jax.Array) -> jax.Array:
        """int codes (B,32) -> generation embeddings (B,77,G)."""
        return self.generation_embeddings(self.generation_tokens(self.quantize.lookup(codes)))

    # ---- stage-I contrastive heads
    def image_features(self, causal: jax.Array) -> jax.Array:
        """(B,32,D) -> L2-normalised vision_proj of the last causal query (B,256)."""
        return l2_normalize(self.vision_proj(causal[:, -1]))

    def text_features(self, input_ids: jax.Array, attention_mask: jax.Array,
                      rng: jax.Array | None = None) -> jax.Array:
        """(B,L) -> L2-normalised text_proj of the text [CLS] output (B,256)."""
        return l2_normalize(self.text_proj(self.qformer.text(input_ids, attention_mask, rng=rng)[:, 0]))
