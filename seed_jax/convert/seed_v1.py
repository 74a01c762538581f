"""SEED v1 release layout (`seed_tokenizer.pth`, optionally `causal_qformer.pth` and
LAVIS's `eva_vit_g.pth`) -> a `seed_tokenizer` export.

The reference builds the ViT from `eva_vit_g.pth` and the Q-Former from
`causal_qformer.pth`, then loads `seed_tokenizer.pth` over them; here the same
precedence holds: a key of the main checkpoint wins over the same key elsewhere.
The ViT has the reference's depth: 39 blocks of `eva_vit_g.pth`'s 40 (`vit_depth`).
"""

from __future__ import annotations

from typing import Mapping

from seed_jax.convert import infer, tables
from seed_jax.convert.lazy_arrays import LazyArrays
from seed_jax.convert.rules import Source, rule, scalar, squeeze_leading
from seed_jax.models.tokenizer import SeedTokenizerConfig

VIT = "visual_encoder."
QFORMER_LAYER = "Qformer.bert.encoder.layer.{i}."
REVERSE = "Reverse_Qformer"
REVERSE_LAYER = f"{REVERSE}.bert.encoder.layer.{{i}}."
VIT_BLOCK = f"{VIT}blocks.{{i}}.norm1.weight"
# LAVIS's create_eva_vit_g builds 39 blocks and loads eva_vit_g.pth's 40 into them with strict=False.
EVA_G_DEPTH = 39
# Keys of SEED-2's (SEED-LLaMA's) tokenizer, seed_quantizer.pt, whose codes decode to an unCLIP image embedding.
SEED2_KEYS = ("distill_image_proj.weight", "blocks_image.0.norm1.weight", "image_down.0.weight")


def merge_sources(checkpoint: Mapping, qformer: Mapping | None, vit: Mapping | None) -> tuple[LazyArrays, list[str]]:
    """One key space; `vit` keys under `visual_encoder.` (`vit_with_prefix`), and the
    reverse Q-Former the release's names (`with_release_names`). Returns (merged, keys
    the main checkpoint overrode); nothing is read."""
    extras = LazyArrays.merged(vit_with_prefix(vit or {}), qformer)
    overridden = sorted(k for k in checkpoint if k in extras)
    return with_release_names(LazyArrays.merged(extras, checkpoint)), overridden


def vit_with_prefix(vit: Mapping) -> LazyArrays:
    """The --vit file's arrays under `visual_encoder.`: LAVIS's eva_vit_g.pth has no prefix,
    a ViT saved from a whole model has it on every key; a file mixing both is refused."""
    prefixed = [k for k in vit if k.startswith(VIT)]
    if not prefixed:
        return LazyArrays.of(vit).rekeyed(lambda k: VIT + k)
    bare = [k for k in vit if not k.startswith(VIT)]
    if bare:
        raise ValueError(f"--vit: expected every key with the {VIT!r} prefix or none, got {prefixed[0]!r} with it "
                         f"and {bare[0]!r} without ({len(prefixed)} keys with, {len(bare)} without)")
    return LazyArrays.of(vit)


def with_release_names(source: LazyArrays) -> LazyArrays:
    """SEED's training model (LAVIS's blip2_codebook_all_image) names the reverse
    Q-Former that decodes to the 77 text-space embeddings `Reverse_Qformer_text.*` and
    its queries `reverse_tokens_text`; the release's inference model names them
    `Reverse_Qformer.*` and `reverse_tokens`, which the training model gives to the
    reverse Q-Former of its image distillation. A checkpoint with the training names
    takes the release's; an image reverse Q-Former beside it is renamed `*_image`, and
    so listed as unused."""
    if "reverse_tokens_text" not in source:
        return source

    renames = {"reverse_tokens": "reverse_tokens_image", "reverse_tokens_text": "reverse_tokens"}
    prefixes = {f"{REVERSE}.": f"{REVERSE}_image.", f"{REVERSE}_text.": f"{REVERSE}."}

    def release_name(key: str) -> str:
        if key in renames:
            return renames[key]
        prefix = next((p for p in prefixes if key.startswith(p)), None)
        return key if prefix is None else prefixes[prefix] + key[len(prefix):]

    return source.rekeyed(release_name)


def vit_depth(checkpoint: Source, requested: int | None) -> int:
    """The ViT depth the reference builds: `requested` (--vit_depth), else the blocks
    the main checkpoint holds, else 39 (a ViT from eva_vit_g.pth alone)."""
    if requested is None:
        return checkpoint.count(VIT_BLOCK) or EVA_G_DEPTH
    if requested < 1:
        raise ValueError(f"--vit_depth={requested}: expected at least 1")
    return requested


def config(source: Source, *, vit_heads: int, qformer_heads: int, blocks_heads: int,
           vit_depth: int | None = None) -> SeedTokenizerConfig:
    _refuse_seed2(source)
    vit = infer.vit_config(source, patch_weight=f"{VIT}patch_embed.proj.weight", pos_embed=f"{VIT}pos_embed",
                           block=VIT_BLOCK, fc1=f"{VIT}blocks.{{i}}.mlp.fc1.weight", heads=vit_heads,
                           depth=vit_depth)
    common = dict(self_key="attention.self.query.weight", cross_key="crossattention.self.key.weight",
                  heads=qformer_heads)
    qformer = infer.qformer_config(source, layer=QFORMER_LAYER, query_tokens="query_tokens", causal=True,
                                   word_embeddings="Qformer.bert.embeddings.word_embeddings.weight",
                                   position_embeddings="Qformer.bert.embeddings.position_embeddings.weight",
                                   **common)
    reverse = infer.qformer_config(source, layer=REVERSE_LAYER, query_tokens="reverse_tokens", causal=False,
                                   word_embeddings=None, position_embeddings=None, **common)
    num_codes, code_dim = infer.need(source, "quantize.embedding.weight", "the codebook", rank=2)
    decoder_depth = source.count("blocks_text.{i}.norm1.weight")
    if decoder_depth == 0:
        raise KeyError(f"{source.name}: missing key 'blocks_text.0.norm1.weight' (the decode blocks)")
    decoder_mlp = source.shape("blocks_text.0.mlp.fc1.weight")[0]
    recon_head = "pos_embed" in source  # SEED's training model's reconstruction head: pos_embed + blocks
    if recon_head and (depth := source.count("blocks.{i}.norm1.weight")) != decoder_depth:
        raise KeyError(f"{source.name}: the reconstruction head ('pos_embed') has {depth} blocks "
                       f"('blocks.N.*'); expected as many as blocks_text, {decoder_depth}")
    generation_width = infer.need(source, "distill_text_proj.weight", "the generation projection")[0]
    with_itc = all(k in source for k in ("vision_proj.weight", "text_proj.weight", "temp"))
    proj_dim = source.shape("vision_proj.weight")[0] if with_itc else 256
    if qformer.width % blocks_heads:
        raise ValueError(f"blocks heads {blocks_heads} do not divide the width {qformer.width}")
    return SeedTokenizerConfig(vit=vit, qformer=qformer, reverse_qformer=reverse, num_codes=num_codes,
                               code_dim=code_dim, decoder_depth=decoder_depth, decoder_heads=blocks_heads,
                               decoder_mlp_dim=decoder_mlp, generation_width=generation_width,
                               proj_dim=proj_dim, with_itc_heads=with_itc, recon_head=recon_head)


def _refuse_seed2(source: Source) -> None:
    """Raises, naming the key, for a SEED-2 checkpoint: it shares v1's encoder side but not
    the decoder (blocks_text, the reverse Q-Former, distill_text_proj), so it would fail on
    a missing v1 key as if the file were damaged."""
    found = [k for k in SEED2_KEYS if k in source]
    if found and "distill_text_proj.weight" not in source:
        raise ValueError(f"{source.name}: holds {found[0]!r}: a SEED-2 (SEED-LLaMA) tokenizer checkpoint "
                         "(seed_quantizer.pt), whose codes decode to a 1024-d unCLIP image embedding; only "
                         "SEED v1's layout (blocks_text, Reverse_Qformer, distill_text_proj) converts")


def table(c: SeedTokenizerConfig) -> dict:
    t = {
        **tables.eva_vit_lavis("visual_encoder", VIT, c.vit.depth, c.vit.num_heads),
        **tables.norm("ln_vision", "ln_vision"),
        **tables.qformer("qformer", QFORMER_LAYER, c.qformer, names=tables.LAVIS_BERT,
                         query_tokens="query_tokens", embed_norm="Qformer.bert.embeddings.LayerNorm",
                         word_embeddings="Qformer.bert.embeddings.word_embeddings.weight",
                         position_embeddings="Qformer.bert.embeddings.position_embeddings.weight"),
        **tables.dense("encode_task_layer.fc1", "encode_task_layer.0"),
        **tables.dense("encode_task_layer.fc2", "encode_task_layer.2"),
        "quantize.codebook": rule("quantize.embedding.weight"),
        **tables.dense("decode_task_layer.fc1", "decode_task_layer.0"),
        **tables.dense("decode_task_layer.fc2", "decode_task_layer.2"),
        "pos_embed_text": rule("pos_embed_text", hook=squeeze_leading),
        **tables.timm_blocks("blocks_text.blocks", "blocks_text", c.decoder_depth, c.decoder_heads),
        **tables.qformer("reverse_qformer", REVERSE_LAYER, c.reverse_qformer, names=tables.LAVIS_BERT,
                         query_tokens="reverse_tokens", embed_norm="Reverse_Qformer.bert.embeddings.LayerNorm"),
        **tables.dense("distill_text_proj", "distill_text_proj"),
    }
    if c.recon_head:
        t["pos_embed"] = rule("pos_embed", hook=squeeze_leading)
        t.update(tables.timm_blocks("blocks.blocks", "blocks", c.decoder_depth, c.decoder_heads))
    if c.with_itc_heads:
        t.update(tables.dense("vision_proj", "vision_proj"))
        t.update(tables.dense("text_proj", "text_proj"))
        t["temp"] = rule("temp", hook=scalar)
    return t

