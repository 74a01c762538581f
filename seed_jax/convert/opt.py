"""A transformers `OPTForCausalLM` folder (keys `model.decoder.*`), an `OPTModel`
one (`decoder.*`, as the Hub's facebook/opt-* folders), or the OPT language model of a
`Blip2ForConditionalGeneration` one (`language_model.model.decoder.*`, config.json's
`text_config`, as Salesforce/blip2-opt-*) -> an `opt` export. Dimensions
come from shapes; depth (`num_hidden_layers`; without it, the stored layers), head
count, layer-norm placement (`do_layer_norm_before`, `_remove_final_layer_norm`),
`enable_bias`, `layer_norm_elementwise_affine` and the training dropout rates
(`dropout`, `attention_dropout`) from config.json (a key it lacks takes transformers'
`OPTConfig` default, as `from_pretrained` would). The logits read the token embedding
unless the folder holds an `lm_head.weight` that differs from it, which transformers
then keeps as a separate head (whatever `tie_word_embeddings` says).
The end and padding ids transformers' `generate` uses go to the export's info, with
the folder's other generation settings, which SeedOPT.generate does not apply."""

from __future__ import annotations

import os

import numpy as np

from seed_jax.convert import infer, sources, tables
from seed_jax.convert.infer import need
from seed_jax.convert.lazy_arrays import LazyArrays
from seed_jax.convert.rules import Rule, Source, rule
from seed_jax.models.opt import POSITION_OFFSET, OPTConfig, rows_in_distribution


BLIP2_LANGUAGE_MODEL = "language_model."  # the OPTForCausalLM's keys in a BLIP-2 folder start so


def prefix(source: Source) -> str:
    """`model.decoder.` (OPTForCausalLM), `decoder.` (OPTModel) or
    `language_model.model.decoder.` (BLIP-2)."""
    return infer.prefix(source, "decoder.embed_tokens.weight", ("model.", "", f"{BLIP2_LANGUAGE_MODEL}model."),
                        "an OPT model") + "decoder."


def head_key(source: Source) -> str:
    """The key of a separate output layer: `lm_head.weight`, in BLIP-2 under its language model."""
    return (BLIP2_LANGUAGE_MODEL if prefix(source).startswith(BLIP2_LANGUAGE_MODEL) else "") + "lm_head.weight"


def with_embedding_from_head(arrays: LazyArrays, hf: dict) -> LazyArrays:
    """`arrays` with the token embedding read from the head where only the head holds
    them: safetensors' `save_model` keeps the first name of tied tensors, `lm_head.weight`,
    and transformers ties the embedding to it on loading (tie_word_embeddings true)."""
    for model in ("model.", f"{BLIP2_LANGUAGE_MODEL}model."):
        head, embed = model[:-len("model.")] + "lm_head.weight", f"{model}decoder.embed_tokens.weight"
        if (head in arrays and embed not in arrays and f"{model}decoder.embed_positions.weight" in arrays
                and hf.get("tie_word_embeddings", True)):
            return LazyArrays.merged(arrays, arrays.rekeyed(lambda k, h=head, e=embed: e if k == h else None))
    return arrays


def language_model_config(hf: dict) -> dict:
    """config.json's OPT settings: `hf` itself, or a BLIP-2 folder's `text_config`
    (an OPT one, else a ValueError naming what it is)."""
    if hf.get("model_type") != "blip-2":
        return hf
    text = hf.get("text_config") or {}
    if text.get("model_type", "opt") != "opt":
        raise ValueError(f"config.json text_config.model_type={text['model_type']!r}: this BLIP-2 folder's "
                         "language model is not an OPT")
    return text


def extra_tokens(image_tokens: int) -> int:
    """Rows appended for `image_tokens` codes: <img>, </img>, then one per code (0: none)."""
    return image_tokens + 2 if image_tokens else 0


def new_rows(count: int, seed: int):
    """Hook: the token table (V,W) -> `count` rows in its distribution (`rows_in_distribution`)."""
    def hook(table):
        return rows_in_distribution(table.mean(0), table.std(0), count, np.random.default_rng(seed))
    return hook


def config(source: Source, hf: dict, *, image_tokens: int = 0) -> OPTConfig:
    if hf.get("activation_function", "relu") != "relu":
        raise ValueError(f"config.json activation_function={hf['activation_function']!r}: OPT uses 'relu'")
    p = prefix(source)
    vocab_size, token_width = need(source, f"{p}embed_tokens.weight", "token embedding", rank=2)
    positions, width = need(source, f"{p}embed_positions.weight", "position embedding", rank=2)
    depth = infer.layer_count(source, f"{p}layers.{{i}}.fc1.weight", hf.get("num_hidden_layers"),
                              "config.json num_hidden_layers")
    heads = infer.heads(hf.get("num_attention_heads", 12), width, "config.json num_attention_heads")
    return OPTConfig(vocab_size=vocab_size, width=width, depth=depth, num_heads=heads,
                     mlp_dim=need(source, f"{p}layers.0.fc1.weight", "MLP width")[0],
                     max_positions=positions - POSITION_OFFSET,
                     embed_width=token_width if token_width != width else None,
                     pre_layer_norm=hf.get("do_layer_norm_before", True),
                     final_norm=not hf.get("_remove_final_layer_norm", False), bias=hf.get("enable_bias", True),
                     norm_affine=hf.get("layer_norm_elementwise_affine", True),
                     tie_embeddings=tied_output(source, hf, f"{p}embed_tokens.weight", head_key(source)),
                     extra_tokens=extra_tokens(image_tokens),
                     dropout=float(hf.get("dropout", 0.1)), attention_dropout=float(hf.get("attention_dropout", 0.0)))


def tied_output(source: Source, hf: dict, embed_tokens: str, head: str = "lm_head.weight") -> bool:
    """Whether transformers' logits read `embed_tokens`: a stored `head` that
    differs from it is kept as the head (transformers >= 5 ties only equal ones); none
    stored with tie_word_embeddings false would leave transformers' head at random."""
    if head in source:
        return bool((source[head] == source[embed_tokens]).all())
    if not hf.get("tie_word_embeddings", True):
        raise ValueError(f"config.json tie_word_embeddings=false, but the folder holds no {head}: "
                         "transformers would start the output layer at random")
    return True


def generation_file(folder: str, hf: dict) -> dict:
    """The settings transformers' `generate` starts from after `from_pretrained`:
    generation_config.json's when the folder has one (config.json's are then unread),
    else config.json's (`hf`)."""
    path = os.path.join(folder, "generation_config.json")
    return sources.read_json(path) if os.path.exists(path) else hf


def generation_ids(settings: dict) -> dict:
    """{eos_token_id, pad_token_id} of transformers' `generate` after `from_pretrained`,
    from the folder's `generation_file`, a key absent from it being None (no end token);
    without a padding id, finished rows pad with the end id. eos_token_id may be a list."""
    eos, pad = settings.get("eos_token_id"), settings.get("pad_token_id")
    if isinstance(eos, list) and len(eos) == 1:
        eos = eos[0]
    first_eos = eos[0] if isinstance(eos, list) else eos
    if pad is None:  # nothing pads without an end id: 1, SeedOPT's default
        pad = 1 if first_eos is None else first_eos
    return {"eos_token_id": eos, "pad_token_id": pad}


# GenerationConfig keys that are no decoding settings: the ids recorded by `generation_ids`,
# ids a decoder-only prompt does not use, bookkeeping, and what changes how fast `generate`
# runs or what it returns beside the tokens (save_pretrained writes output_attentions=false)
NOT_DECODING = ("eos_token_id", "pad_token_id", "bos_token_id", "decoder_start_token_id", "_from_model_config",
                "transformers_version", "use_cache", "output_attentions", "output_hidden_states", "output_scores",
                "output_logits", "return_dict_in_generate")
# Settings transformers' `generate` reads only when it samples (do_sample true; GenerationConfig.validate)
SAMPLING_ONLY = ("temperature", "top_k", "top_p", "min_p", "top_h", "typical_p", "epsilon_cutoff", "eta_cutoff")
# SeedOPT.generate's argument for a generation setting, where it has one
GENERATE_ARGUMENTS = {"do_sample": "temperature > 0 (do_sample)", "temperature": "temperature", "top_k": "top_k",
                      "top_p": "top_p", "num_beams": "num_beams", "length_penalty": "length_penalty",
                      "max_new_tokens": "max_new_tokens", "max_length": "max_new_tokens (max_length counts the prompt)"}


def generation_defaults() -> dict:
    """transformers' `GenerationConfig()` settings, with the values transformers 5 gives
    at `generate` those it leaves None there."""
    from transformers import GenerationConfig

    defaults = GenerationConfig().to_dict()
    defaults.update(getattr(GenerationConfig, "_get_default_generation_params", dict)())
    return defaults


def generation_settings_not_applied(settings: dict) -> dict:
    """{key: value} of the folder's generation settings (`generation_file`) that differ
    from transformers' defaults: `generate()` decodes with them, SeedOPT.generate only
    with its arguments. A None value is unset (transformers gives it the default); the
    SAMPLING_ONLY ones count only when the folder samples (`do_sample` true)."""
    defaults = generation_defaults()
    inert = () if settings.get("do_sample") is True else SAMPLING_ONLY
    return {k: v for k, v in settings.items()
            if k in defaults and k not in NOT_DECODING + inert and v is not None and v != defaults[k]}


def generate_arguments(settings: dict) -> str:
    """A line saying where SeedOPT.generate's decoding settings come from, naming its
    arguments that match `settings` (`generation_settings_not_applied`)."""
    matched = list(dict.fromkeys(GENERATE_ARGUMENTS[k] for k in settings if k in GENERATE_ARGUMENTS))
    unmatched = [k for k in settings if k not in GENERATE_ARGUMENTS]
    return ("SeedOPT.generate takes decoding settings only from its arguments"
            + (f"; to match these, pass {', '.join(matched)}" if matched else "")
            + (f"; none matches {', '.join(unmatched)}" if unmatched else ""))


def table(c: OPTConfig, source: Source, seed: int = 0) -> dict[str, Rule]:
    layers = range(c.depth)
    p = prefix(source)
    b = f"{p}layers.{{i}}."
    a = f"{b}self_attn."
    out = {
        "embed_tokens": rule(f"{p}embed_tokens.weight"),
        "embed_positions": rule(f"{p}embed_positions.weight"),
        **tables.attention("layers.self_attn", f"{a}q_proj", f"{a}k_proj", f"{a}v_proj", f"{a}out_proj", c.num_heads,
                           layers, bias=c.bias),
        **tables.dense("layers.fc1", f"{b}fc1", layers, bias=c.bias),
        **tables.dense("layers.fc2", f"{b}fc2", layers, bias=c.bias),
    }
    if c.norm_affine:
        out.update(tables.norm("layers.self_attn_layer_norm", f"{b}self_attn_layer_norm", layers))
        out.update(tables.norm("layers.final_layer_norm", f"{b}final_layer_norm", layers))
        if c.pre_layer_norm and c.final_norm:
            out.update(tables.norm("final_layer_norm", f"{p}final_layer_norm"))
    if not c.tie_embeddings:
        out["lm_head"] = rule(head_key(source))
    if c.extra_tokens:
        out["embed_extra"] = rule(f"{p}embed_tokens.weight", hook=new_rows(c.extra_tokens, seed))
    if c.embed_width:
        out["project_in.kernel"] = tables.dense("x", f"{p}project_in")["x.kernel"]
        out["project_out.kernel"] = tables.dense("x", f"{p}project_out")["x.kernel"]
    return out
