"""A PyTorch re-statement of the SEED v1 tokenizer, written from the architecture
notes (DESIGN.md §1), with module names that give the release's state-dict keys
(`visual_encoder.blocks.N.attn.qkv.weight`, `Qformer.bert.encoder.layer.N...`).

It is what our parity tests and benchmarks compare against: build it with random
weights, `torch.save({"model": model.state_dict()}, path)`, convert with
`python -m seed_jax.convert seed_v1`, and compare `encode` / `embed_codes`.
Needs the `torch` extra. Inputs are NCHW as in the reference.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn


@dataclasses.dataclass(frozen=True)
class ReferenceConfig:
    image_size: int = 224
    patch_size: int = 14
    vit_width: int = 1408
    vit_depth: int = 39
    vit_heads: int = 16
    vit_mlp: int = 6144
    width: int = 768
    qformer_layers: int = 12
    qformer_heads: int = 12
    qformer_mlp: int = 3072
    cross_attention_freq: int = 2
    num_queries: int = 32
    reverse_layers: int = 4
    reverse_queries: int = 77
    num_codes: int = 8192
    code_dim: int = 32
    blocks: int = 4
    blocks_heads: int = 12
    blocks_mlp: int = 3072
    generation_width: int = 768
    recon_head: bool = False  # SEED's training model: pos_embed + blocks rebuild the causal embeddings


TINY = ReferenceConfig(image_size=32, patch_size=8, vit_width=48, vit_depth=2, vit_heads=4, vit_mlp=96, width=32,
                       qformer_layers=4, qformer_heads=4, qformer_mlp=64, num_queries=32, reverse_layers=2,
                       reverse_queries=77, num_codes=64, code_dim=8, blocks=2, blocks_heads=2, blocks_mlp=64,
                       generation_width=24)


class Mlp(nn.Module):
    def __init__(self, width, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class FusedAttention(nn.Module):
    """One qkv matrix. EVA: q and v biases only (`eva=True`); timm: a full qkv bias."""

    def __init__(self, width, heads, eva: bool):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=not eva)
        if eva:
            self.q_bias = nn.Parameter(torch.zeros(width))
            self.v_bias = nn.Parameter(torch.zeros(width))
        self.proj = nn.Linear(width, width)
        self.eva = eva

    def forward(self, x):
        b, n, d = x.shape
        if self.eva:
            bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
            qkv = F.linear(x, self.qkv.weight, bias)
        else:
            qkv = self.qkv(x)
        q, k, v = qkv.reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q * (d // self.heads) ** -0.5) @ k.transpose(-2, -1)
        out = attn.softmax(-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    def __init__(self, width, heads, mlp, eva: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = FusedAttention(width, heads, eva)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = Mlp(width, mlp)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch, width):
        super().__init__()
        self.proj = nn.Conv2d(3, width, patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class EvaViT(nn.Module):
    def __init__(self, c: ReferenceConfig):
        super().__init__()
        grid = c.image_size // c.patch_size
        self.patch_embed = PatchEmbed(c.patch_size, c.vit_width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.vit_width))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, c.vit_width))
        self.blocks = nn.ModuleList(Block(c.vit_width, c.vit_heads, c.vit_mlp, eva=True) for _ in range(c.vit_depth))

    def forward(self, pixels):
        x = self.patch_embed(pixels)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return x


class SelfOrCross(nn.Module):
    """BERT attention scores with an additive mask of -10000 where not allowed."""

    def __init__(self, width, heads, kv_width):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(width, width)
        self.key, self.value = nn.Linear(kv_width, width), nn.Linear(kv_width, width)

    def forward(self, x, context, additive_mask):
        b, n, d = x.shape
        split = lambda t: t.reshape(b, t.shape[1], self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.query(x)), split(self.key(context)), split(self.value(context))
        scores = q @ k.transpose(-2, -1) / math.sqrt(d // self.heads)
        if additive_mask is not None:
            scores = scores + additive_mask
        return (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d)


class DenseNorm(nn.Module):
    """BERT's "output": LayerNorm(residual + dense(x))."""

    def __init__(self, width_in, width):
        super().__init__()
        self.dense = nn.Linear(width_in, width)
        self.LayerNorm = nn.LayerNorm(width, eps=1e-12)

    def forward(self, x, residual):
        return self.LayerNorm(residual + self.dense(x))


class Attention(nn.Module):
    def __init__(self, width, heads, kv_width):
        super().__init__()
        self.self = SelfOrCross(width, heads, kv_width)
        self.output = DenseNorm(width, width)

    def forward(self, x, context, mask=None):
        return self.output(self.self(x, context, mask), x)


class Dense(nn.Module):
    def __init__(self, width_in, width_out):
        super().__init__()
        self.dense = nn.Linear(width_in, width_out)

    def forward(self, x):
        return F.gelu(self.dense(x))


class BertLayer(nn.Module):
    def __init__(self, width, heads, mlp, kv_width, cross: bool):
        super().__init__()
        self.attention = Attention(width, heads, width)
        if cross:
            self.crossattention = Attention(width, heads, kv_width)
        self.intermediate_query = Dense(width, mlp)
        self.output_query = DenseNorm(mlp, width)

    def forward(self, x, image, mask):
        x = self.attention(x, x, mask)
        if hasattr(self, "crossattention"):
            x = self.crossattention(x, image)
        return self.output_query(self.intermediate_query(x), x)


class Embeddings(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.LayerNorm = nn.LayerNorm(width, eps=1e-12)
        self.register_buffer("position_ids", torch.arange(512)[None])  # in the release, unused by queries


class Encoder(nn.Module):
    def __init__(self, width, layers, heads, mlp, kv_width, freq):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(width, heads, mlp, kv_width, i % freq == 0) for i in range(layers))


class Bert(nn.Module):
    def __init__(self, width, layers, heads, mlp, kv_width, freq):
        super().__init__()
        self.embeddings = Embeddings(width)
        self.encoder = Encoder(width, layers, heads, mlp, kv_width, freq)

    def forward(self, queries, image, causal: bool):
        x = self.embeddings.LayerNorm(queries)
        n = x.shape[1]
        mask = None
        if causal:
            mask = (1.0 - torch.tril(torch.ones(n, n, device=x.device, dtype=x.dtype))) * -10000.0
        for layer in self.encoder.layer:
            x = layer(x, image, mask)
        return x


class QFormer(nn.Module):
    def __init__(self, *args):
        super().__init__()
        self.bert = Bert(*args)


class SeedV1Reference(nn.Module):
    def __init__(self, c: ReferenceConfig):
        super().__init__()
        self.config = c
        d = c.width
        self.visual_encoder = EvaViT(c)
        self.ln_vision = nn.LayerNorm(c.vit_width)
        self.query_tokens = nn.Parameter(torch.zeros(1, c.num_queries, d))
        self.Qformer = QFormer(d, c.qformer_layers, c.qformer_heads, c.qformer_mlp, c.vit_width,
                               c.cross_attention_freq)
        self.quantize = nn.Module()
        self.quantize.embedding = nn.Embedding(c.num_codes, c.code_dim)
        self.encode_task_layer = nn.Sequential(nn.Linear(d, d), nn.Tanh(), nn.Linear(d, c.code_dim))
        self.decode_task_layer = nn.Sequential(nn.Linear(c.code_dim, c.code_dim), nn.Tanh(), nn.Linear(c.code_dim, d))
        self.pos_embed_text = nn.Parameter(torch.zeros(1, c.num_queries, d))
        self.blocks_text = nn.ModuleList(Block(d, c.blocks_heads, c.blocks_mlp, eva=False) for _ in range(c.blocks))
        self.Reverse_Qformer = QFormer(d, c.reverse_layers, c.qformer_heads, c.qformer_mlp, d, c.cross_attention_freq)
        self.reverse_tokens = nn.Parameter(torch.zeros(1, c.reverse_queries, d))
        self.distill_text_proj = nn.Linear(d, c.generation_width)
        if c.recon_head:
            self.pos_embed = nn.Parameter(torch.zeros(1, c.num_queries, d))
            self.blocks = nn.ModuleList(Block(d, c.blocks_heads, c.blocks_mlp, eva=False) for _ in range(c.blocks))

    @torch.no_grad()
    def encode(self, pixels):
        """pixels (B,3,S,S) -> every intermediate, plus the code distances (B,32,K)."""
        vit_features = self.visual_encoder(pixels)
        image_embeds = self.ln_vision(vit_features.float())
        queries = self.query_tokens.expand(pixels.shape[0], -1, -1)
        causal = self.Qformer.bert(queries, image_embeds, causal=True)
        z = self.encode_task_layer(causal)
        e = self.quantize.embedding.weight
        distances = (z.pow(2).sum(-1, keepdim=True) + e.pow(2).sum(-1)
                     - 2 * torch.einsum("bqc,kc->bqk", z, e))
        codes = distances.argmin(-1)
        quantized = z + (e[codes] - z).detach()
        return {"vit_features": vit_features, "image_embeds": image_embeds, "causal_embeddings": causal,
                "quant_input": z, "codes": codes, "quantized": quantized, "distances": distances}

    @torch.no_grad()
    def embed_codes(self, codes):
        """codes (B,32) -> generation embeddings (B,77,G)."""
        x = self.decode_task_layer(self.quantize.embedding(codes)) + self.pos_embed_text
        for block in self.blocks_text:
            x = block(x)
        tokens = self.reverse_tokens.expand(codes.shape[0], -1, -1)
        return self.distill_text_proj(self.Reverse_Qformer.bert(tokens, x, causal=False))

    @torch.no_grad()
    def reconstruct(self, codes):
        """codes (B,32) -> the causal embeddings rebuilt for L_recon (B,32,D), through the
        reconstruction head."""
        x = self.decode_task_layer(self.quantize.embedding(codes)) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return x


@torch.no_grad()
def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Random weights everywhere, norms and biases included, so that a mapping that
    drops or swaps any tensor shows up in the outputs."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("LayerNorm.weight") or name.endswith("norm1.weight") or name.endswith("norm2.weight") \
                or name == "ln_vision.weight":
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
        elif p.ndim >= 2 and "embed" not in name and "tokens" not in name and "embedding" not in name:
            fan_in = p[0].numel()
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
        else:
            p.copy_(0.5 * torch.randn(p.shape, generator=g) if p.ndim >= 2 else 0.05 * torch.randn(p.shape, generator=g))
    return model
