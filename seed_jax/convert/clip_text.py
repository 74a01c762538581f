"""A transformers `CLIPTextModel` (e.g. an SD v1 `text_encoder/` folder) -> a
`clip_text` export. Heads, epsilon and activation come from config.json; a key it
lacks takes transformers' `CLIPTextConfig` default, as `from_pretrained` would. The
depth is config.json's num_hidden_layers (layers stored beyond it are left unused, as
transformers leaves them), else the stored layers'."""

from __future__ import annotations

from seed_jax.convert import infer, tables
from seed_jax.convert.infer import need
from seed_jax.convert.rules import Source
from seed_jax.models.clip_text import CLIPTextConfig

ACTIVATIONS = ("quick_gelu", "gelu")  # transformers names that mean what ours do
TRANSFORMERS_DEFAULTS = {"num_attention_heads": 8, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}


def prefix(source: Source) -> str:
    """Key prefix in front of `embeddings.token_embedding.weight`."""
    return infer.prefix(source, "embeddings.token_embedding.weight",
                        ("text_model.", "", "cond_stage_model.transformer.text_model."), "a CLIP text encoder")


def config(source: Source, hf: dict, heads_setting: str = "config.json num_attention_heads") -> CLIPTextConfig:
    """`hf`: config.json, a CLIPTextModel's or a whole CLIPModel's (whose text tower's
    settings are its `text_config`, see `text_settings`); `heads_setting` names where
    its num_attention_heads came from."""
    hf = {**TRANSFORMERS_DEFAULTS, **text_settings(hf)}
    p = prefix(source)
    vocab_size, width = need(source, f"{p}embeddings.token_embedding.weight", "token embedding", rank=2)
    max_length = need(source, f"{p}embeddings.position_embedding.weight", "position embedding")[0]
    depth = infer.layer_count(source, f"{p}encoder.layers.{{i}}.layer_norm1.weight", hf.get("num_hidden_layers"),
                              "config.json num_hidden_layers")
    mlp_dim = need(source, f"{p}encoder.layers.0.mlp.fc1.weight", "MLP width")[0]
    act = hf["hidden_act"]
    if act not in ACTIVATIONS:
        raise ValueError(f"config.json hidden_act: expected one of {sorted(ACTIVATIONS)}, got {act!r}")
    return CLIPTextConfig(vocab_size=vocab_size, max_length=max_length, width=width, depth=depth,
                          num_heads=infer.heads(hf["num_attention_heads"], width, heads_setting), mlp_dim=mlp_dim,
                          eps=hf["layer_norm_eps"], activation=act)


def text_settings(hf: dict) -> dict:
    """The text tower's settings in config.json, as transformers reads them: a
    CLIPTextModel's own keys; a CLIPModel's `text_config`, unless it has the
    `text_config_dict` of early files: then that, the rest at CLIPTextConfig's defaults
    (transformers lets it replace text_config whole)."""
    if hf.get("text_config_dict") is not None:
        return hf["text_config_dict"]
    return hf.get("text_config") or hf


def table(c: CLIPTextConfig, source: Source) -> dict:
    return tables.clip_text("", prefix(source), c.depth, c.num_heads)
