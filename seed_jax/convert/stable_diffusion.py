"""Stable Diffusion v1 -> a `stable_diffusion` export (UNet, VAE, CLIP text encoder,
noise schedule, the empty prompt's token ids).

Two layouts: a diffusers pipeline folder (`unet/`, `vae/`, `text_encoder/`, optional
`tokenizer/` and `scheduler/`; safetensors or .bin) and the CompVis single file
(`sd-v1-4.ckpt`: `model.diffusion_model.*`, `first_stage_model.*`,
`cond_stage_model.transformer.*`). CompVis keys are renamed to diffusers names
first, so one table serves both; the table is derived from our parameter names.
"""

from __future__ import annotations

import os
import re
from typing import Mapping

import numpy as np

from seed_jax.convert import clip_text, sources, tables
from seed_jax.convert.infer import need
from seed_jax.convert.lazy_arrays import LazyArrays
from seed_jax.convert.rules import Rule, Source, heads_bias, heads_in, heads_out, linear, patch_conv, rule
from seed_jax.diffusion.schedule import NoiseSchedule
from seed_jax.models.stable_diffusion import StableDiffusionConfig
from seed_jax.models.unet import UNetConfig
from seed_jax.models.vae import VAEConfig

PARTS = ("unet", "vae", "text_encoder")
COMPVIS_UNET = "model.diffusion_model."
COMPVIS_OPEN_CLIP = "cond_stage_model.model."  # SD 2's text encoder in a CompVis file
# SD v1's text encoder (CLIP ViT-L/14's), for a CompVis checkpoint, which has no config.json
SD_V1_TEXT_ENCODER = {"num_attention_heads": 12, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
# CLIP ViT-L/14's tokenizer (what SD v1 used): <|startoftext|>, then <|endoftext|> as end and padding.
SD_V1_EMPTY_PROMPT = (49406,) + (49407,) * 76
# config.json keys (diffusers' defaults) whose other values change the UNet's or VAE's computation
# without leaving keys or shapes our model would miss: any other value is refused.
UNSUPPORTED_UNET = {"class_embed_type": None, "addition_embed_type": None, "only_cross_attention": False,
                    "dual_cross_attention": False, "transformer_layers_per_block": 1, "time_embedding_type": "positional",
                    "resnet_time_scale_shift": "default", "mid_block_type": "UNetMidBlock2DCrossAttn",
                    "act_fn": "silu", "downsample_padding": 1, "mid_block_scale_factor": 1,
                    "time_embedding_act_fn": None, "timestep_post_act": None, "time_cond_proj_dim": None,
                    "encoder_hid_dim": None, "encoder_hid_dim_type": None, "num_class_embeds": None,
                    "attention_type": "default", "conv_in_kernel": 3, "conv_out_kernel": 3}
UNSUPPORTED_VAE = {"act_fn": "silu", "mid_block_add_attention": True, "use_quant_conv": True,
                   "use_post_quant_conv": True}

UNSUPPORTED_SCHEDULER = {"trained_betas": None, "rescale_betas_zero_snr": False, "thresholding": False}
# DPMSolverMultistepScheduler's settings as dpm++2m follows them (DPM-Solver++(2M), midpoint, final
# sigma 0); a file holding another value is kept for PLMS and DDIM, which ignore these keys
DPM_SETTINGS = {"algorithm_type": "dpmsolver++", "solver_order": 2, "solver_type": "midpoint",
                "final_sigmas_type": "zero", "lambda_min_clipped": -float("inf"), "variance_type": None,
                "use_lu_lambdas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
                "use_flow_sigmas": False}


# ---------------------------------------------------------------- our names -> diffusers names
_RENAMES = ((r"\.downsample\.", ".downsamplers.0."), (r"\.upsample\.", ".upsamplers.0."),
            (r"mid_block\.resnet1\.", "mid_block.resnets.0."), (r"mid_block\.resnet2\.", "mid_block.resnets.1."),
            (r"^(vae\..*mid_block)\.attention\.norm\.", r"\1.attentions.0.group_norm."),
            (r"^(vae\..*mid_block)\.attention\.attn\.", r"\1.attentions.0."),
            (r"mid_block\.attention\.", "mid_block.attentions.0."), (r"\.block\.", ".transformer_blocks.0."),
            (r"\.ff\.proj\.", ".ff.net.0.proj."), (r"\.ff\.out\.", ".ff.net.2."))
_ATTENTION = {"query": ("to_q.weight", heads_in), "key": ("to_k.weight", heads_in),
              "value": ("to_v.weight", heads_in), "out": ("to_out.0.weight", heads_out),
              "q_bias": ("to_q.bias", heads_bias), "k_bias": ("to_k.bias", heads_bias),
              "v_bias": ("to_v.bias", heads_bias)}


def _squeeze_1x1(w: np.ndarray) -> np.ndarray:
    """A 1x1 conv weight (O,I,1,1) used as a Linear -> (O,I); Linear weights pass."""
    return w[:, :, 0, 0] if w.ndim == 4 else w


def diffusers_rule(path: str, shape: tuple[int, ...]) -> Rule:
    """The rule filling our parameter `path` (of `shape`) from diffusers names."""
    *parents, leaf = path.split(".")
    key = ".".join(parents) + "."
    for pattern, replacement in _RENAMES:
        key = re.sub(pattern, replacement, key)
    if leaf in _ATTENTION:  # q/k/v/out of an attention: heads are our shape's axis 0 or 1
        name, make_hook = _ATTENTION[leaf]
        heads = shape[0] if leaf in ("out", "q_bias", "k_bias", "v_bias") else shape[1]
        hook = make_hook(heads)
        return rule(key + name, hook=lambda w: hook(_squeeze_1x1(w)))
    if leaf == "out_bias":
        return rule(key + "to_out.0.bias")
    if leaf == "scale":
        return rule(key + "weight")
    if leaf == "bias":
        return rule(key + "bias")
    if leaf == "kernel" and len(shape) == 4:
        return rule(key + "weight", hook=patch_conv)  # (O,I,kh,kw) -> (kh,kw,I,O)
    if leaf == "kernel":
        return rule(key + "weight", hook=lambda w: linear(_squeeze_1x1(w)))
    raise ValueError(f"no diffusers name for our parameter {path}")


def table(config: StableDiffusionConfig, source: Source) -> dict[str, Rule]:
    from seed_jax import weights  # weights imports the models; keep this module light to import

    ours = weights.shapes(weights.flat_params(weights.build("stable_diffusion", config, abstract=True)))
    out = {path: diffusers_rule(path, shape) for path, shape in ours.items() if not path.startswith("text_encoder.")}
    out.update(tables.clip_text("text_encoder.", f"text_encoder.{clip_text.prefix(_part(source, 'text_encoder'))}",
                                config.text_encoder.depth, config.text_encoder.num_heads))
    _check_every_weight_read(out, source)
    return out


def _check_every_weight_read(table: dict[str, Rule], source: Source) -> None:
    """A UNet, VAE or text-encoder weight no rule reads (an up level's attention whose
    down level has none, encoder_hid_proj, ...) is a block our model lacks: it would
    compute something else, so it is refused. Keys outside the parts (a CompVis file's
    EMA copy, schedule buffers) and transformers' position_ids buffer are not weights."""
    read = set()
    for r in table.values():
        read.update(r.sources if r.layers is None else (k.format(i=i) for k in r.sources for i in r.layers))
    unread = sorted(k for k in source.arrays if k.split(".")[0] in PARTS and k not in read
                    and not k.endswith("position_ids"))
    if unread:
        raise ValueError(f"{source.name}: {len(unread)} weights have no place in our model (a block layout or "
                         f"option it does not follow), e.g. {', '.join(unread[:3])}")


def _part(source: Source, part: str) -> Source:
    """The keys of one part with its prefix removed (for shape lookups)."""
    prefix = f"{part}."
    return Source(source.arrays.rekeyed(lambda k: k[len(prefix):] if k.startswith(prefix) else None),
                  f"{source.name} {part}")


# ---------------------------------------------------------------- configs from shapes (+ config.json)
def _refuse_unsupported(file: str, hf: dict, unsupported: dict, scope: str) -> None:
    """Each key of `unsupported` in `hf` (read from `file`) must hold its one supported
    value (per-block lists of it throughout); `scope` says what is supported."""
    for key, supported in unsupported.items():
        value = hf.get(key, supported)
        values = value if isinstance(value, (list, tuple)) else [value]
        if any(v != supported for v in values):
            raise ValueError(f"{file} {key}={value!r:.60}: only {supported!r} is supported ({scope})")


def unet_config(source: Source, hf: dict, *, heads: int | None = None) -> UNetConfig:
    _refuse_unsupported("unet config.json", hf, UNSUPPORTED_UNET, "SD v1/v2 UNets")
    s = _part(source, "unet")
    levels = s.count("down_blocks.{i}.resnets.0.conv1.weight")
    if levels == 0:
        raise KeyError(f"{source.name}: missing key 'unet.down_blocks.0.resnets.0.conv1.weight' (not an SD UNet)")
    channels = tuple(need(s, f"down_blocks.{i}.resnets.0.conv1.weight", "UNet width")[0] for i in range(levels))
    attention = tuple(f"down_blocks.{i}.attentions.0.norm.weight" in s for i in range(levels))
    setting = "--unet_heads" if heads is not None else next(
        (f"unet config.json {k}" for k in ("num_attention_heads", "attention_head_dim") if hf.get(k)),
        "UNet heads (SD v1's; --unet_heads)")
    if heads is None:
        heads = hf.get("num_attention_heads") or hf.get("attention_head_dim", 8)
    value, heads = heads, tuple(heads) if isinstance(heads, (list, tuple)) else (heads,) * levels
    for level in range(min(levels, len(heads))):  # a level with attention, or the last: the mid block's
        if (attention[level] or level == levels - 1) and channels[level] % heads[level]:
            raise ValueError(f"{setting}={value} does not divide the width {channels[level]} of UNet level {level}")
    context = need(s, _first_attention(s, attention) + ".attn2.to_k.weight", "cross-attention width")[1]
    out_channels, in_channels = need(s, "conv_out.weight", "output channels")[0], need(s, "conv_in.weight", "")[1]
    return UNetConfig(in_channels=in_channels, out_channels=out_channels, sample_size=hf.get("sample_size") or 64,
                      block_channels=channels, layers_per_block=s.count("down_blocks.0.resnets.{i}.conv1.weight"),
                      attention_levels=attention, num_heads=heads, cross_attention_dim=context,
                      norm_groups=hf.get("norm_num_groups", 32), norm_eps=hf.get("norm_eps", 1e-5),
                      flip_sin_to_cos=hf.get("flip_sin_to_cos", True), freq_shift=hf.get("freq_shift", 0),
                      center_input_sample=hf.get("center_input_sample", False))


def _first_attention(s: Source, attention: tuple[bool, ...]) -> str:
    level = attention.index(True) if any(attention) else None
    return "mid_block.attentions.0.transformer_blocks.0" if level is None else \
        f"down_blocks.{level}.attentions.0.transformer_blocks.0"


def vae_config(source: Source, hf: dict, *, scaling_factor: float | None = None) -> VAEConfig:
    _refuse_unsupported("vae config.json", hf, UNSUPPORTED_VAE, "SD v1/v2 autoencoders")
    s = _part(source, "vae")
    levels = s.count("encoder.down_blocks.{i}.resnets.0.conv1.weight")
    if levels == 0:
        raise KeyError(f"{source.name}: missing key 'vae.encoder.down_blocks.0.resnets.0.conv1.weight' "
                       "(not an SD autoencoder)")
    channels = tuple(need(s, f"encoder.down_blocks.{i}.resnets.0.conv1.weight", "VAE width")[0] for i in range(levels))
    return VAEConfig(in_channels=need(s, "encoder.conv_in.weight", "")[1],
                     out_channels=need(s, "decoder.conv_out.weight", "")[0],
                     latent_channels=need(s, "decoder.conv_in.weight", "latent channels")[1],
                     block_channels=channels, layers_per_block=s.count("encoder.down_blocks.0.resnets.{i}.conv1.weight"),
                     norm_groups=hf.get("norm_num_groups", 32),
                     scaling_factor=scaling_factor or hf.get("scaling_factor", 0.18215))


def schedule_config(hf: dict) -> NoiseSchedule:
    """scheduler_config.json -> our schedule; settings the samplers do not follow
    (they would silently sample another schedule or other timesteps) are refused.
    A key the file lacks takes SD v1's value (e.g. clip_sample False, skip_prk_steps
    True), not the diffusers class default a scheduler built from the file would get;
    without timestep_spacing each sampler spaces as its scheduler's default (as a
    scheduler `from_config` of the file does). dpm++2m follows use_karras_sigmas, and
    refuses to sample with the file's other DPM-Solver settings it does not follow
    (`DPM_SETTINGS`), which PLMS and DDIM ignore as their schedulers do."""
    _refuse_unsupported("scheduler_config.json", hf, UNSUPPORTED_SCHEDULER,
                        "the SD v1/v2 schedule; DDIM clips x0 with clip_sample, never thresholds it")
    defaults = NoiseSchedule()
    dpm_unfollowed = ", ".join(f"{key}={hf[key]!r}" for key, followed in DPM_SETTINGS.items()
                               if hf.get(key, followed) != followed)
    return NoiseSchedule(dpm_unfollowed=dpm_unfollowed, **{k: hf.get(k, getattr(defaults, k)) for k in
                            ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "steps_offset",
                             "set_alpha_to_one", "prediction_type", "clip_sample", "clip_sample_range",
                             "skip_prk_steps", "timestep_spacing", "use_karras_sigmas")})


def _old_vae_attention_names(arrays: LazyArrays) -> LazyArrays:
    """diffusers < 0.14 named the VAE attention query/key/value/proj_attn."""
    renames = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}

    def new_name(k):
        if k.startswith("vae.") and ".attentions." in k:
            for old, new in renames.items():
                k = k.replace(old, new)
        return k
    return arrays.rekeyed(new_name)


# ---------------------------------------------------------------- diffusers folder
def read_diffusers_folder(folder: str, *, allow_pickle: bool = False,
                          variant: str | None = None) -> tuple[Source, dict[str, dict], dict[str, str | None]]:
    """(one Source with `unet.` / `vae.` / `text_encoder.` prefixed keys, each part's config.json,
    the variant each part was read in: see `part_variants`)."""
    if not os.path.isdir(folder):
        raise NotADirectoryError(f"checkpoint {folder!r}: expected a diffusers folder or a CompVis .ckpt/.safetensors")
    for part in PARTS:
        if not os.path.isdir(os.path.join(folder, part)):
            raise FileNotFoundError(f"{folder}: no {part}/ folder (a diffusers pipeline has unet/, vae/, text_encoder/)")
    variants = part_variants(folder, variant)
    parts, configs = [], {}
    for part in PARTS:
        path = os.path.join(folder, part)
        arrays = sources.read_folder(path, allow_pickle=allow_pickle, variant=variants[part])
        parts.append(arrays.rekeyed(lambda k, p=part: f"{p}.{k}"))
        configs[part] = sources.read_hf_config(path)
    scheduler = os.path.join(folder, "scheduler", "scheduler_config.json")
    configs["scheduler"] = sources.read_json(scheduler) if os.path.exists(scheduler) else {}
    return Source(_old_vae_attention_names(LazyArrays.merged(*parts)), folder), configs, variants


def part_variants(folder: str, variant: str | None) -> dict[str, str | None]:
    """Part -> the variant its weights are read in, as diffusers' from_pretrained chooses:
    `variant` for the parts that have weights of it (SD v1.5's `non_ema` is the UNet's
    alone), the main weights (None) for the others; some part must have it. A part
    without main weights is read in its only variant (`sources.variant_read`)."""
    variants = {}
    for part in PARTS:
        path = os.path.join(folder, part)
        variants[part] = sources.variant_read(path, variant if variant in sources.weight_variants(path) else None)
    if variant is not None and variant not in variants.values():
        raise FileNotFoundError(f"{folder}: no part ({', '.join(PARTS)}) has weights of the variant {variant}")
    return variants


def text_positions(source: Source) -> int:
    """How many tokens the text encoder takes (its position embedding's rows), with or
    without transformers 4's `text_model.` in front of the names."""
    s = _part(source, "text_encoder")
    return need(s, f"{clip_text.prefix(s)}embeddings.position_embedding.weight", "text position embedding")[0]


def empty_prompt_ids(folder: str | None, max_length: int) -> tuple[int, ...]:
    """Token ids of "" padded to `max_length` (the text encoder's positions): from the
    folder's tokenizer/ when there is one, padded to its model_max_length if that is
    shorter (the pipeline pads a prompt, and the empty negative, to it); else SD v1's
    CLIP tokenizer ids."""
    path = os.path.join(folder, "tokenizer") if folder else None
    if path and os.path.isdir(path):
        from transformers import CLIPTokenizer

        # Without them transformers 5 builds a tokenizer of the special tokens alone: wrong ids, silently.
        missing = [f for f in ("vocab.json", "merges.txt") if not os.path.isfile(os.path.join(path, f))]
        if missing and not os.path.isfile(os.path.join(path, "tokenizer.json")):
            raise FileNotFoundError(f"{path}: no tokenizer.json, nor {' or '.join(missing)}: the tokenizer's "
                                    "vocabulary, which the empty prompt's ids come from (a partial download?)")

        tokenizer = CLIPTokenizer.from_pretrained(path, local_files_only=True)
        return tuple(int(i) for i in tokenizer("", padding="max_length", truncation=True,
                                               max_length=min(max_length, tokenizer.model_max_length)).input_ids)
    if max_length != len(SD_V1_EMPTY_PROMPT):
        raise ValueError(f"no tokenizer/ folder and the text encoder takes {max_length} tokens, not 77: "
                         "cannot tokenize the empty prompt")
    return SD_V1_EMPTY_PROMPT


# ---------------------------------------------------------------- CompVis single file
_COMPVIS_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                   "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_COMPVIS_VAE_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def _compvis_unet_key(key: str, layers_per_block: int) -> str | None:
    per_level = layers_per_block + 1
    if m := re.fullmatch(r"time_embed\.([02])\.(.*)", key):
        return f"time_embedding.linear_{1 if m[1] == '0' else 2}.{m[2]}"
    if m := re.fullmatch(r"out\.([02])\.(.*)", key):
        return f"{'conv_norm_out' if m[1] == '0' else 'conv_out'}.{m[2]}"
    if key.startswith("input_blocks.0.0."):
        return "conv_in." + key[len("input_blocks.0.0."):]
    if m := re.fullmatch(r"input_blocks\.(\d+)\.(\d+)\.(.*)", key):
        level, j = divmod(int(m[1]) - 1, per_level)
        if m[3].startswith("op."):
            return f"down_blocks.{level}.downsamplers.0.conv.{m[3][3:]}"
        return _compvis_block(f"down_blocks.{level}", j, int(m[2]), m[3])
    if m := re.fullmatch(r"middle_block\.(\d)\.(.*)", key):
        index = int(m[1])
        return (f"mid_block.attentions.0.{m[2]}" if index == 1 else
                _compvis_block("mid_block", index // 2, 0, m[2]))
    if m := re.fullmatch(r"output_blocks\.(\d+)\.(\d+)\.(.*)", key):
        level, j = divmod(int(m[1]), per_level)
        if m[3].startswith("conv."):
            return f"up_blocks.{level}.upsamplers.0.{m[3]}"
        return _compvis_block(f"up_blocks.{level}", j, int(m[2]), m[3])
    return None


def _compvis_block(prefix: str, j: int, sub: int, rest: str) -> str:
    """Sub-module 0 of a CompVis block is the resnet, 1 the spatial transformer."""
    if sub == 0:
        for old, new in _COMPVIS_RESNET.items():
            if rest.startswith(old + "."):
                return f"{prefix}.resnets.{j}.{new}{rest[len(old):]}"
        return f"{prefix}.resnets.{j}.{rest}"
    return f"{prefix}.attentions.{j}.{rest}"


def _compvis_vae_key(key: str, num_levels: int) -> str | None:
    key = key.replace("nin_shortcut", "conv_shortcut").replace("norm_out", "conv_norm_out")
    if m := re.fullmatch(r"(encoder|decoder)\.mid\.block_([12])\.(.*)", key):
        return f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.{m[3]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid\.attn_1\.(norm|q|k|v|proj_out)\.(.*)", key):
        return f"{m[1]}.mid_block.attentions.0.{_COMPVIS_VAE_ATTENTION[m[2]]}.{m[3]}"
    if m := re.fullmatch(r"encoder\.down\.(\d+)\.block\.(\d+)\.(.*)", key):
        return f"encoder.down_blocks.{m[1]}.resnets.{m[2]}.{m[3]}"
    if m := re.fullmatch(r"encoder\.down\.(\d+)\.downsample\.(.*)", key):
        return f"encoder.down_blocks.{m[1]}.downsamplers.0.{m[2]}"
    if m := re.fullmatch(r"decoder\.up\.(\d+)\.block\.(\d+)\.(.*)", key):  # CompVis counts up levels from the bottom
        return f"decoder.up_blocks.{num_levels - 1 - int(m[1])}.resnets.{m[2]}.{m[3]}"
    if m := re.fullmatch(r"decoder\.up\.(\d+)\.upsample\.(.*)", key):
        return f"decoder.up_blocks.{num_levels - 1 - int(m[1])}.upsamplers.0.{m[2]}"
    if re.fullmatch(r"(encoder|decoder)\.(conv_in|conv_norm_out|conv_out)\..*|(post_)?quant_conv\..*", key):
        return key
    return None


def compvis_ema_keys(arrays: Mapping[str, np.ndarray]) -> dict[str, str]:
    """{EMA key: UNet key} of a CompVis LDM state dict: LDM's LitEma keeps a copy of each
    `model.diffusion_model.*` weight under `model_ema.` + its name without dots."""
    return {"model_ema." + k[len("model."):].replace(".", ""): k for k in arrays if k.startswith(COMPVIS_UNET)}


def compvis_to_diffusers(arrays: Mapping[str, np.ndarray], name: str, *, ema: bool = False) -> Source:
    """A CompVis LDM state dict -> a Source with diffusers names (prefixed by part).
    `ema`: the UNet from its EMA copy (`model_ema.*`, which a training checkpoint such
    as v1-5-pruned.ckpt holds beside the raw weights) instead of `model.diffusion_model.*`.
    Keys that map to nothing (the other UNet copy, schedule buffers, ...) stay under
    their own names, so they are reported as unused."""
    unet_prefix, vae_prefix = COMPVIS_UNET, "first_stage_model."
    if f"{unet_prefix}input_blocks.0.0.weight" not in arrays:
        raise KeyError(f"{name}: missing key '{unet_prefix}input_blocks.0.0.weight' (not a CompVis SD checkpoint)")
    if open_clip := next((k for k in arrays if k.startswith(COMPVIS_OPEN_CLIP)), None):
        raise ValueError(f"{name}: holds {open_clip!r}: an SD 2 CompVis checkpoint (its text encoder is "
                         "OpenCLIP's); of CompVis files only SD v1's (cond_stage_model.transformer.*) convert: "
                         "convert SD 2's diffusers folder instead")
    ema_keys = compvis_ema_keys(arrays) if ema else {}
    if ema and (missing := [k for k in ema_keys if k not in arrays]):
        raise KeyError(f"{name}: --ema: missing key '{missing[0]}' ({len(missing)} of the UNet's {len(ema_keys)} "
                       "EMA weights are absent)")
    first_level = [k for k in arrays if re.match(rf"{re.escape(unet_prefix)}input_blocks\.\d+\.0\.op\.weight", k)]
    layers_per_block = min(int(k[len(unet_prefix):].split(".")[1]) for k in first_level) - 1 if first_level else 2
    num_vae_levels = len({k.split(".")[3] for k in arrays if k.startswith(f"{vae_prefix}decoder.up.")})

    def new_name(original):
        new, key = None, original
        if ema:  # the EMA copy takes the UNet's names; the raw weights stay unused
            if key.startswith(unet_prefix):
                return key
            key = ema_keys.get(key, key)
        if key.startswith(unet_prefix):
            new = _compvis_unet_key(key[len(unet_prefix):], layers_per_block)
            new = new and f"unet.{new}"
        elif key.startswith(vae_prefix):
            new = _compvis_vae_key(key[len(vae_prefix):], num_vae_levels)
            new = new and f"vae.{new}"
        elif m := re.fullmatch(r"cond_stage_model\.transformer\.(text_model\.)?(.*)", key):
            new = f"text_encoder.text_model.{m[2]}"
        return new or original
    return Source(LazyArrays.of(arrays).rekeyed(new_name), name)


def config(source: Source, configs: dict[str, dict], *, empty_prompt: tuple[int, ...],
           unet_heads: int | None = None, scaling_factor: float | None = None,
           norm_groups: int | None = None, text_heads: int | None = None) -> StableDiffusionConfig:
    """Given values (no shape tells them) override the config.json files; without
    either, SD v1's: 8 UNet heads, 32 groups, 12 text-encoder heads."""
    configs = {k: dict(v) for k, v in configs.items()}
    configs.setdefault("text_encoder", dict(SD_V1_TEXT_ENCODER))
    for part, key, value in (("unet", "norm_num_groups", norm_groups), ("vae", "norm_num_groups", norm_groups),
                             ("text_encoder", "num_attention_heads", text_heads)):
        if value:
            configs.setdefault(part, {})[key] = value
    return StableDiffusionConfig(
        unet=unet_config(source, configs.get("unet", {}), heads=unet_heads),
        vae=vae_config(source, configs.get("vae", {}), scaling_factor=scaling_factor),
        text_encoder=clip_text.config(_part(source, "text_encoder"), configs.get("text_encoder", {}),
                                      "--text_heads" if text_heads else "text_encoder heads (--text_heads)"),
        schedule=schedule_config(configs.get("scheduler", {})), empty_prompt_ids=empty_prompt)
