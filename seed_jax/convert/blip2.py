"""BLIP-2 stage-1 checkpoints -> a `blip2` export (ViT, ln_vision, Q-Former, heads),
the starting point of SEED's stage I.

- LAVIS `blip2_pretrained.pth`: `visual_encoder.*` (or a separate `eva_vit_g.pth`,
  of whose 40 blocks LAVIS builds 39), `ln_vision`, `query_tokens`, `Qformer.bert.*`,
  `vision_proj`, `text_proj`, `temp`.
- Hugging Face `Blip2ForImageTextRetrieval` / `Blip2ForConditionalGeneration`
  folders: `vision_model.*` (its `post_layernorm` is LAVIS's `ln_vision`),
  `query_tokens`, `qformer.*`, and for retrieval `embeddings.*`,
  `vision_projection`, `text_projection`. Heads and epsilons come from config.json
  (an activation other than BLIP-2's gelu is refused).
"""

from __future__ import annotations

from seed_jax.convert import infer, tables
from seed_jax.convert.rules import Source, rule, scalar
from seed_jax.convert.seed_v1 import QFORMER_LAYER, VIT, VIT_BLOCK
from seed_jax.models.blip2 import Blip2Config

HF_LAYER = "qformer.encoder.layer.{i}."
HF_VIT = "vision_model."


def lavis_config(source: Source, *, vit_heads: int, qformer_heads: int, vit_depth: int | None = None) -> Blip2Config:
    vit = infer.vit_config(source, patch_weight=f"{VIT}patch_embed.proj.weight", pos_embed=f"{VIT}pos_embed",
                           block=VIT_BLOCK, fc1=f"{VIT}blocks.{{i}}.mlp.fc1.weight", heads=vit_heads,
                           depth=vit_depth)
    qformer = infer.qformer_config(
        source, layer=QFORMER_LAYER, query_tokens="query_tokens", self_key="attention.self.query.weight",
        cross_key="crossattention.self.key.weight", heads=qformer_heads, causal=False,
        word_embeddings="Qformer.bert.embeddings.word_embeddings.weight",
        position_embeddings="Qformer.bert.embeddings.position_embeddings.weight")
    with_heads = "vision_proj.weight" in source and "text_proj.weight" in source
    return Blip2Config(vit=vit, qformer=qformer, ln_vision_eps=1e-5,
                       proj_dim=source.shape("vision_proj.weight")[0] if with_heads else 256,
                       with_itc_heads=with_heads, with_temperature="temp" in source)


def lavis_table(c: Blip2Config) -> dict:
    t = {**tables.eva_vit_lavis("visual_encoder", VIT, c.vit.depth, c.vit.num_heads),
         **tables.norm("ln_vision", "ln_vision"),
         **tables.qformer("qformer", QFORMER_LAYER, c.qformer, names=tables.LAVIS_BERT,
                          query_tokens="query_tokens", embed_norm="Qformer.bert.embeddings.LayerNorm",
                          word_embeddings="Qformer.bert.embeddings.word_embeddings.weight",
                          position_embeddings="Qformer.bert.embeddings.position_embeddings.weight")}
    return _heads(t, c, "vision_proj", "text_proj")


EXACT_GELU = ("gelu", "gelu_python")  # transformers' names of erf GELU


def hf_config(source: Source, hf: dict) -> Blip2Config:
    vision, qf = hf.get("vision_config", {}), hf.get("qformer_config", {})
    for part, settings in (("vision_config", vision), ("qformer_config", qf)):
        act = settings.get("hidden_act", "gelu")  # transformers' default, exact GELU
        if act not in EXACT_GELU:  # our ViT and Q-Former compute BLIP-2's exact GELU alone
            raise ValueError(f"config.json {part}.hidden_act={act!r}: expected one of {sorted(EXACT_GELU)} "
                             "(BLIP-2's exact GELU), which our model computes")
    vit_eps = vision.get("layer_norm_eps", 1e-6)
    vit = infer.vit_config(source, patch_weight=f"{HF_VIT}embeddings.patch_embedding.weight",
                           pos_embed=f"{HF_VIT}embeddings.position_embedding",
                           block=f"{HF_VIT}encoder.layers.{{i}}.layer_norm1.weight",
                           fc1=f"{HF_VIT}encoder.layers.{{i}}.mlp.fc1.weight",
                           heads=vision.get("num_attention_heads", 16), eps=vit_eps,
                           depth=vision.get("num_hidden_layers"),  # as transformers builds it
                           depth_setting="config.json vision_config.num_hidden_layers")
    qformer = infer.qformer_config(
        source, layer=HF_LAYER, query_tokens="query_tokens", self_key="attention.attention.query.weight",
        cross_key="crossattention.attention.key.weight", heads=qf.get("num_attention_heads", 12), causal=False,
        word_embeddings="embeddings.word_embeddings.weight",
        position_embeddings="embeddings.position_embeddings.weight", eps=qf.get("layer_norm_eps", 1e-12),
        depth=qf.get("num_hidden_layers"))
    with_heads = "vision_projection.weight" in source and "text_projection.weight" in source
    return Blip2Config(vit=vit, qformer=qformer, ln_vision_eps=vit_eps,
                       proj_dim=source.shape("vision_projection.weight")[0] if with_heads else 256,
                       with_itc_heads=with_heads, with_temperature=False)


def hf_table(c: Blip2Config, hf: dict) -> dict:
    """`hf`: config.json (its vision_config.qkv_bias, transformers' default true)."""
    qkv_bias = hf.get("vision_config", {}).get("qkv_bias", True)
    t = {**tables.eva_vit_hf("visual_encoder", HF_VIT, c.vit.depth, c.vit.num_heads, qkv_bias=qkv_bias),
         **tables.norm("ln_vision", f"{HF_VIT}post_layernorm"),
         **tables.qformer("qformer", HF_LAYER, c.qformer, names=tables.HF_BERT, query_tokens="query_tokens",
                          embed_norm="qformer.layernorm", word_embeddings="embeddings.word_embeddings.weight",
                          position_embeddings="embeddings.position_embeddings.weight")}
    return _heads(t, c, "vision_projection", "text_projection")


def _heads(t: dict, c: Blip2Config, vision: str, text: str) -> dict:
    if c.with_itc_heads:
        t.update(tables.dense("vision_proj", vision))
        t.update(tables.dense("text_proj", text))
    if c.with_temperature:
        t["temp"] = rule("temp", hook=scalar)
    return t
