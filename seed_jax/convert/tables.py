"""Mapping tables for the building blocks the source layouts share: EVA ViT (LAVIS
and Hugging Face names), timm-style blocks, the BLIP-2 BERT Q-Former (LAVIS and
Hugging Face names) and the CLIP text encoder. Each returns {our path: Rule}."""

from __future__ import annotations

import numpy as np

from seed_jax.convert.rules import (Rule, fused_part, heads_bias, heads_in, heads_out, linear, patch_conv, rule,
                                    squeeze_leading)
from seed_jax.models.qformer import QFormerConfig


def dense(target: str, source: str, layers=None, *, bias: bool = True) -> dict[str, Rule]:
    """torch Linear `source`.{weight,bias} -> our Dense `target`.{kernel,bias} (`bias`: whether it has one)."""
    table = {f"{target}.kernel": rule(f"{source}.weight", hook=linear, layers=layers)}
    if bias:
        table[f"{target}.bias"] = rule(f"{source}.bias", layers=layers)
    return table


def norm(target: str, source: str, layers=None) -> dict[str, Rule]:
    return {f"{target}.scale": rule(f"{source}.weight", layers=layers),
            f"{target}.bias": rule(f"{source}.bias", layers=layers)}


def attention(target: str, query: str, key: str, value: str, out: str, heads: int, layers=None, *,
              bias: bool = True) -> dict[str, Rule]:
    """Separate torch q/k/v/out Linears (all with biases, or, `bias` False, none) -> our Attention."""
    table = {}
    for name, src, bias_name in (("query", query, "q_bias"), ("key", key, "k_bias"), ("value", value, "v_bias")):
        table[f"{target}.{name}"] = rule(f"{src}.weight", hook=heads_in(heads), layers=layers)
        if bias:
            table[f"{target}.{bias_name}"] = rule(f"{src}.bias", hook=heads_bias(heads), layers=layers)
    table[f"{target}.out"] = rule(f"{out}.weight", hook=heads_out(heads), layers=layers)
    if bias:
        table[f"{target}.out_bias"] = rule(f"{out}.bias", layers=layers)
    return table


def fused_attention(target: str, qkv_weight: str, out: str, heads: int, layers, *, q_bias: Rule,
                    k_bias: Rule | None, v_bias: Rule) -> dict[str, Rule]:
    """A fused qkv weight (3D, D) -> our query/key/value, biases given as rules."""
    table = {f"{target}.{name}": rule(qkv_weight, hook=fused_part(part, heads_in(heads)), layers=layers)
             for part, name in enumerate(("query", "key", "value"))}
    table.update({f"{target}.q_bias": q_bias, f"{target}.v_bias": v_bias})
    if k_bias is not None:
        table[f"{target}.k_bias"] = k_bias
    table[f"{target}.out"] = rule(f"{out}.weight", hook=heads_out(heads), layers=layers)
    table[f"{target}.out_bias"] = rule(f"{out}.bias", layers=layers)
    return table


def mlp(target: str, fc1: str, fc2: str, layers) -> dict[str, Rule]:
    return {**dense(f"{target}.fc1", fc1, layers), **dense(f"{target}.fc2", fc2, layers)}


# ---- EVA ViT
def eva_vit_lavis(target: str, src: str, depth: int, heads: int) -> dict[str, Rule]:
    """LAVIS `eva_vit.py` names (`blocks.N.attn.qkv.weight`, separate q_bias / v_bias)."""
    layers = range(depth)
    b = f"{src}blocks.{{i}}."
    blocks = f"{target}.blocks.blocks"
    return {
        f"{target}.patch_kernel": rule(f"{src}patch_embed.proj.weight", hook=patch_conv),
        f"{target}.patch_bias": rule(f"{src}patch_embed.proj.bias"),
        f"{target}.cls_token": rule(f"{src}cls_token"),
        f"{target}.pos_embed": rule(f"{src}pos_embed"),
        **norm(f"{blocks}.norm1", f"{b}norm1", layers),
        **fused_attention(f"{blocks}.attn", f"{b}attn.qkv.weight", f"{b}attn.proj", heads, layers,
                          q_bias=rule(f"{b}attn.q_bias", hook=heads_bias(heads), layers=layers), k_bias=None,
                          v_bias=rule(f"{b}attn.v_bias", hook=heads_bias(heads), layers=layers)),
        **norm(f"{blocks}.norm2", f"{b}norm2", layers),
        **mlp(f"{blocks}.mlp", f"{b}mlp.fc1", f"{b}mlp.fc2", layers),
    }


def eva_vit_hf(target: str, src: str, depth: int, heads: int, *, qkv_bias: bool = True) -> dict[str, Rule]:
    """transformers `Blip2VisionModel` names. Its fused qkv bias has a k part, which
    no softmax can see (it adds the same q·b_k to every key's score), so it is dropped;
    without one (config.json's vision_config.qkv_bias false) our q and v biases are zero."""
    layers = range(depth)
    b = f"{src}encoder.layers.{{i}}."
    blocks = f"{target}.blocks.blocks"
    bias = f"{b}self_attn.qkv.bias"

    def qv_bias(part: int) -> Rule:
        """The fused bias's q (0) or v (2) part; without one, zeros (N, H) sized by the weight (3*D, D)."""
        if qkv_bias:
            return rule(bias, hook=fused_part(part, heads_bias(heads)), layers=layers)
        return rule(f"{b}self_attn.qkv.weight", hook=lambda w: np.zeros((heads, w.shape[0] // 3 // heads)),
                    layers=layers)

    return {
        f"{target}.patch_kernel": rule(f"{src}embeddings.patch_embedding.weight", hook=patch_conv),
        f"{target}.patch_bias": rule(f"{src}embeddings.patch_embedding.bias"),
        f"{target}.cls_token": rule(f"{src}embeddings.class_embedding"),
        f"{target}.pos_embed": rule(f"{src}embeddings.position_embedding"),
        **norm(f"{blocks}.norm1", f"{b}layer_norm1", layers),
        **fused_attention(f"{blocks}.attn", f"{b}self_attn.qkv.weight", f"{b}self_attn.projection", heads, layers,
                          q_bias=qv_bias(0), k_bias=None, v_bias=qv_bias(2)),
        **norm(f"{blocks}.norm2", f"{b}layer_norm2", layers),
        **mlp(f"{blocks}.mlp", f"{b}mlp.fc1", f"{b}mlp.fc2", layers),
    }


# ---- timm-style pre-LN blocks (SEED's blocks_text): fused qkv with a full bias
def timm_blocks(target: str, src: str, depth: int, heads: int) -> dict[str, Rule]:
    layers = range(depth)
    b = f"{src}.{{i}}."
    bias = f"{b}attn.qkv.bias"
    return {
        **norm(f"{target}.norm1", f"{b}norm1", layers),
        **fused_attention(f"{target}.attn", f"{b}attn.qkv.weight", f"{b}attn.proj", heads, layers,
                          q_bias=rule(bias, hook=fused_part(0, heads_bias(heads)), layers=layers),
                          k_bias=rule(bias, hook=fused_part(1, heads_bias(heads)), layers=layers),
                          v_bias=rule(bias, hook=fused_part(2, heads_bias(heads)), layers=layers)),
        **norm(f"{target}.norm2", f"{b}norm2", layers),
        **mlp(f"{target}.mlp", f"{b}mlp.fc1", f"{b}mlp.fc2", layers),
    }


# ---- BLIP-2 Q-Former (BERT)
LAVIS_BERT = dict(attention="attention.self", cross="crossattention.self")
HF_BERT = dict(attention="attention.attention", cross="crossattention.attention")


def qformer(target: str, layer_src: str, c: QFormerConfig, *, names: dict, query_tokens: str,
            embed_norm: str, word_embeddings: str | None = None,
            position_embeddings: str | None = None) -> dict[str, Rule]:
    """`layer_src` is the encoder layer template ("Qformer.bert.encoder.layer.{i}.").
    Layer g*freq + j of the source is position j of scanned group g."""
    table = {f"{target}.query_tokens": rule(query_tokens, hook=squeeze_leading),
             **norm(f"{target}.embed_norm", embed_norm)}
    if c.with_text:
        table[f"{target}.word_embeddings"] = rule(word_embeddings)
        table[f"{target}.position_embeddings"] = rule(position_embeddings)
    freq, heads = c.cross_attention_freq, c.num_heads
    for j in range(freq):
        layers = range(j, c.num_layers, freq)
        t = f"{target}.groups.layers.{j}"
        s = layer_src
        attn, cross = names["attention"], names["cross"]
        table.update(attention(f"{t}.self_attn", f"{s}{attn}.query", f"{s}{attn}.key", f"{s}{attn}.value",
                               f"{s}attention.output.dense", heads, layers))
        table.update(norm(f"{t}.self_norm", f"{s}attention.output.LayerNorm", layers))
        if j == 0:
            table.update(attention(f"{t}.cross_attn", f"{s}{cross}.query", f"{s}{cross}.key", f"{s}{cross}.value",
                                   f"{s}crossattention.output.dense", heads, layers))
            table.update(norm(f"{t}.cross_norm", f"{s}crossattention.output.LayerNorm", layers))
        table.update(dense(f"{t}.query_ffn.intermediate", f"{s}intermediate_query.dense", layers))
        table.update(dense(f"{t}.query_ffn.output", f"{s}output_query.dense", layers))
        table.update(norm(f"{t}.query_ffn.norm", f"{s}output_query.LayerNorm", layers))
        if c.with_text:
            table.update(dense(f"{t}.text_ffn.intermediate", f"{s}intermediate.dense", layers))
            table.update(dense(f"{t}.text_ffn.output", f"{s}output.dense", layers))
            table.update(norm(f"{t}.text_ffn.norm", f"{s}output.LayerNorm", layers))
    return table


# ---- CLIP text encoder (transformers CLIPTextModel)
def clip_text(target: str, src: str, depth: int, heads: int) -> dict[str, Rule]:
    layers = range(depth)
    b = f"{src}encoder.layers.{{i}}."
    blocks = f"{target}blocks.blocks"
    a = f"{b}self_attn."
    return {
        f"{target}token_embedding": rule(f"{src}embeddings.token_embedding.weight"),
        f"{target}position_embedding": rule(f"{src}embeddings.position_embedding.weight"),
        **norm(f"{blocks}.norm1", f"{b}layer_norm1", layers),
        **attention(f"{blocks}.attn", f"{a}q_proj", f"{a}k_proj", f"{a}v_proj", f"{a}out_proj", heads, layers),
        **norm(f"{blocks}.norm2", f"{b}layer_norm2", layers),
        **mlp(f"{blocks}.mlp", f"{b}mlp.fc1", f"{b}mlp.fc2", layers),
        **norm(f"{target}final_norm", f"{src}final_layer_norm"),
    }
