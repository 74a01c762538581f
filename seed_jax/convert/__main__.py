r"""Converts released weights into our export format (orbax params + model.json).

  python -m seed_jax.convert seed_v1 --checkpoint=DIR/seed_tokenizer.pth \
      [--qformer=DIR/causal_qformer.pth] [--vit=DIR/eva_vit_g.pth] --out=OUT \
      [--vit_heads=16 --qformer_heads=12 --blocks_heads=12 --vit_depth=39]
  python -m seed_jax.convert lavis_blip2 --checkpoint=blip2_pretrained.pth [--vit=eva_vit_g.pth] --out=OUT
  python -m seed_jax.convert hf_blip2 --checkpoint=HF_FOLDER --out=OUT
  python -m seed_jax.convert hf_clip_text --checkpoint=SD_FOLDER/text_encoder --out=OUT
  python -m seed_jax.convert sd --checkpoint=SD_FOLDER|sd-v1-4.ckpt --out=OUT [--unet_heads=8] [--ema]
  python -m seed_jax.convert hf_opt --checkpoint=OPT_FOLDER --out=OUT [--image_tokens=8192]

Dimensions are read from the checkpoint; head counts (no shape tells them) are
flags for the .pth layouts and config.json entries for Hugging Face folders. Every
parameter of our model must be found (a missing key fails, naming it); source keys
left unused are listed, as are the generation settings of an OPT folder that
SeedOPT.generate does not apply. Folders are read as transformers / diffusers read them
(`--variant=fp16` for a variant's weights).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from seed_jax import command_line, weights
from seed_jax.convert import blip2, clip_text, opt, seed_v1, sources
from seed_jax.convert import stable_diffusion as sd
from seed_jax.convert.rules import Source, apply


def _merged(args, what: str, checkpoint, qformer, vit) -> tuple[Source, list[str]]:
    """(--checkpoint with --qformer / --vit merged in, named by the files given; the keys
    --checkpoint overrode): see `seed_v1.merge_sources`. One that lacks the ViT without
    --vit fails saying to give it."""
    merged, overridden = seed_v1.merge_sources(checkpoint, qformer, vit)
    given = [f"--{name}" for name in ("qformer", "vit") if getattr(args, name, "")]
    name = f"{what} {args.checkpoint}" + (f" (with {' and '.join(given)})" if given else "")
    patch = f"{seed_v1.VIT}patch_embed.proj.weight"
    if not vit and patch not in merged:
        raise KeyError(f"{name}: missing key {patch!r} (no ViT): give LAVIS's eva_vit_g.pth with --vit")
    return Source(merged, name), overridden


def _seed_v1(args):
    checkpoint = sources.read_file(args.checkpoint, allow_pickle=args.allow_pickle)
    extra = {name: sources.read_file(path, allow_pickle=args.allow_pickle) if path else None
             for name, path in (("qformer", args.qformer), ("vit", args.vit))}
    depth = seed_v1.vit_depth(Source(checkpoint, args.checkpoint), args.vit_depth)
    source, overridden = _merged(args, "seed_v1 checkpoint", checkpoint, extra["qformer"], extra["vit"])
    config = seed_v1.config(source, vit_heads=args.vit_heads, qformer_heads=args.qformer_heads,
                            blocks_heads=args.blocks_heads, vit_depth=depth)
    return "seed_tokenizer", config, seed_v1.table(config), source, {"overridden_by_checkpoint": overridden}


def _lavis_blip2(args):
    arrays = sources.read_file(args.checkpoint, allow_pickle=args.allow_pickle)
    vit = sources.read_file(args.vit, allow_pickle=args.allow_pickle) if args.vit else {}
    depth = seed_v1.vit_depth(Source(arrays, args.checkpoint), args.vit_depth)
    source, overridden = _merged(args, "LAVIS BLIP-2 checkpoint", arrays, None, vit)
    config = blip2.lavis_config(source, vit_heads=args.vit_heads, qformer_heads=args.qformer_heads,
                                vit_depth=depth)
    return "blip2", config, blip2.lavis_table(config), source, {"overridden_by_checkpoint": overridden}


def _folder_weights(args) -> tuple[sources.LazyArrays, dict]:
    """The folder's weights, and the report's `variant` entry: the variant read (None: the main weights)."""
    variant = sources.variant_read(args.checkpoint, args.variant)
    arrays = sources.read_folder(args.checkpoint, allow_pickle=args.allow_pickle, variant=variant)
    return arrays, {"variant": variant}


def _hf_blip2(args):
    arrays, info = _folder_weights(args)
    source = Source(arrays, args.checkpoint)
    hf = sources.read_hf_config(args.checkpoint)
    config = blip2.hf_config(source, hf)
    return "blip2", config, blip2.hf_table(config, hf), source, info


def _hf_clip_text(args):
    arrays, info = _folder_weights(args)
    source = Source(arrays, args.checkpoint)
    config = clip_text.config(source, sources.read_hf_config(args.checkpoint))
    return "clip_text", config, clip_text.table(config, source), source, info


def _sd(args):
    info = {}
    if os.path.isdir(args.checkpoint):
        if args.ema:
            raise ValueError("--ema: a diffusers folder holds one set of UNet weights; --ema reads the EMA "
                             "copy of a CompVis .ckpt")
        source, configs, variants = sd.read_diffusers_folder(args.checkpoint, allow_pickle=args.allow_pickle,
                                                             variant=args.variant)
        layout = "diffusers"
        info["variants"] = variants
    else:
        if args.variant:
            raise ValueError(f"--variant={args.variant}: a CompVis file holds one set of weights; --variant reads "
                             "a diffusers folder's")
        arrays = sources.read_file(args.checkpoint, allow_pickle=args.allow_pickle)
        info["unet_weights"] = "ema" if args.ema else "raw"
        info["ema_weights_unread"] = not args.ema and any(k in arrays for k in sd.compvis_ema_keys(arrays))
        source = sd.compvis_to_diffusers(arrays, args.checkpoint, ema=args.ema)
        configs, layout = {}, "compvis"
    empty = sd.empty_prompt_ids(args.checkpoint if layout == "diffusers" else None, sd.text_positions(source))
    config = sd.config(source, configs, empty_prompt=empty, unet_heads=args.unet_heads,
                       scaling_factor=args.scaling_factor, norm_groups=args.norm_groups,
                       text_heads=args.text_heads)
    return "stable_diffusion", config, sd.table(config, source), source, {"source_layout": layout, **info}


def _hf_opt(args):
    hf = opt.language_model_config(sources.read_hf_config(args.checkpoint))
    arrays, info = _folder_weights(args)
    source = Source(opt.with_embedding_from_head(arrays, hf), args.checkpoint)
    config = opt.config(source, hf, image_tokens=args.image_tokens)
    generation = opt.generation_file(args.checkpoint, hf)
    info.update({"image_tokens": args.image_tokens, **opt.generation_ids(generation),
                 "generation_settings_not_applied": opt.generation_settings_not_applied(generation)})
    if args.image_tokens:  # ids of the appended rows
        info.update({"image_start_id": config.vocab_size, "image_end_id": config.vocab_size + 1,
                     "first_code_id": config.vocab_size + 2})
    return "opt", config, opt.table(config, source, seed=args.seed), source, info


CONVERTERS = {"seed_v1": _seed_v1, "lavis_blip2": _lavis_blip2, "hf_blip2": _hf_blip2,
              "hf_clip_text": _hf_clip_text, "sd": _sd, "hf_opt": _hf_opt}
LAYOUT_HELP = {
    "seed_v1": "SEED v1's released tokenizer (seed_tokenizer.pth [+ causal_qformer.pth, eva_vit_g.pth])",
    "lavis_blip2": "LAVIS's BLIP-2 (blip2_pretrained.pth [+ eva_vit_g.pth])",
    "hf_blip2": "a transformers Blip2ForImageTextRetrieval / Blip2ForConditionalGeneration folder",
    "hf_clip_text": "a transformers CLIP text encoder folder (e.g. SD's text_encoder/)",
    "sd": "Stable Diffusion v1/v2: a diffusers pipeline folder, or SD v1's CompVis .ckpt / .safetensors",
    "hf_opt": "a transformers OPTForCausalLM / OPTModel folder, or a Blip2ForConditionalGeneration one's OPT, "
              "with SEED's image tokens appended",
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m seed_jax.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="layout", required=True, metavar="LAYOUT")
    for name in CONVERTERS:
        s = sub.add_parser(name, help=LAYOUT_HELP[name], description=LAYOUT_HELP[name])
        s.add_argument("--checkpoint", required=True, type=command_line.user_path,
                       help="checkpoint file (.pth/.bin/.safetensors/.ckpt) or Hugging Face / diffusers folder")
        s.add_argument("--out", required=True, type=command_line.user_path, help="new export directory")
        s.add_argument("--allow_pickle", action="store_true",
                       help="load .pth files that torch's weights_only loader refuses (trusted files only)")
        if name in ("seed_v1", "lavis_blip2"):
            s.add_argument("--vit", default="", type=command_line.user_path,
                           help="LAVIS eva_vit_g.pth, if the checkpoint lacks the ViT (keys with the "
                                "visual_encoder. prefix or, as there, without)")
            s.add_argument("--vit_heads", type=int, default=16,
                           help="EVA ViT attention heads (default 16, the release's: no shape tells them)")
            s.add_argument("--qformer_heads", type=int, default=12,
                           help="Q-Former attention heads (default 12, the release's)")
            s.add_argument("--vit_depth", type=int, default=None,
                           help="ViT blocks to build (default: as many as --checkpoint holds, else 39: "
                                "what LAVIS builds from eva_vit_g.pth's 40); later blocks are left unused")
        else:
            s.add_argument("--variant", default=None,
                           help="read this weights variant of the folder (e.g. fp16: model.fp16.safetensors); "
                                "default: the main weights, else the only variant there"
                                + ("; in a diffusers folder, for the parts that have it (as diffusers)"
                                   if name == "sd" else ""))
        if name == "sd":
            s.add_argument("--unet_heads", type=int, default=None,
                           help="UNet attention heads (default: the folder's unet/config.json, else 8 as SD v1)")
            s.add_argument("--scaling_factor", type=float, default=None,
                           help="latent scale (default: vae/config.json, else 0.18215)")
            s.add_argument("--norm_groups", type=int, default=None,
                           help="GroupNorm groups of UNet and VAE (default: the config.json files, else 32)")
            s.add_argument("--text_heads", type=int, default=None,
                           help="text encoder heads (default: text_encoder/config.json, else 12)")
            s.add_argument("--ema", action="store_true",
                           help="a CompVis .ckpt holding EMA weights beside the raw ones (model_ema.*, e.g. "
                                "v1-5-pruned.ckpt): convert the UNet's EMA copy, as diffusers' folders hold")
        if name == "hf_opt":
            s.add_argument("--image_tokens", type=int, default=8192,
                           help="append <img>, </img> and this many code tokens to the vocabulary (0: keep it)")
            s.add_argument("--seed", type=int, default=0, help="noise seed of the appended rows")
        if name == "seed_v1":
            s.add_argument("--qformer", default="", type=command_line.user_path, help="causal_qformer.pth")
            s.add_argument("--blocks_heads", type=int, default=12,
                           help="attention heads of the blocks after the codebook (default 12, the release's)")
    return p


def check_args(args: argparse.Namespace) -> None:
    """Counts and scales given on the command line are positive (--image_tokens may be
    0), before anything is read."""
    for name, value in sorted(vars(args).items()):
        if value is None or not (name.endswith(("_heads", "_depth")) or name in ("norm_groups", "scaling_factor")):
            continue
        if value <= 0:
            raise ValueError(f"--{name}={value}: expected a positive value")
    if getattr(args, "image_tokens", 0) < 0:
        raise ValueError(f"--image_tokens={args.image_tokens}: expected the number of image codes to append "
                         "(0: keep the vocabulary)")


def convert(argv: list[str]) -> dict:
    """Runs one conversion; returns a report {kind, num_params, unused_keys, ...}."""
    args = parser().parse_args(argv)
    check_args(args)
    weights.check_free(args.out)  # before minutes of reading and converting
    kind, config, table, source, info = CONVERTERS[args.layout](args)
    expected_shapes = weights.model_shapes(kind, config)
    params = apply(table, source, expected_shapes)
    report = {"layout": args.layout, "checkpoint": args.checkpoint, "unused_keys": source.unused(), **info}
    del source, table  # the source arrays are no longer needed: free them before writing
    # One array at a time into the form orbax writes, so two copies are never held.
    params = {k: weights.host_array(params.pop(k)) for k in list(params)}
    weights.save(args.out, kind, config, params, info=report, expected_shapes=expected_shapes)
    return {"kind": kind, "num_params": int(sum(v.size for v in params.values())), **report}


def main(argv=None) -> int:
    try:
        report = convert(sys.argv[1:] if argv is None else argv)
    except (KeyError, ValueError, FileNotFoundError, FileExistsError, NotADirectoryError) as e:
        # a message alone, without KeyError's quotes; an OS error's (errno, text, path) whole
        print(f"error: {e.args[0] if len(e.args) == 1 else e}", file=sys.stderr)
        return 1
    print(f"wrote {report['kind']} export ({report['num_params']:,} parameters) from {report['checkpoint']}")
    if report["unused_keys"]:
        print(f"{len(report['unused_keys'])} source keys unused:")
        for key in report["unused_keys"]:
            print(f"  {key}")
    not_applied = report.get("generation_settings_not_applied")
    if not_applied:
        print(f"{len(not_applied)} generation settings of the folder not applied (transformers' generate() "
              "applies them):")
        for key, value in not_applied.items():
            print(f"  {key}: {json.dumps(value)}")
        print(opt.generate_arguments(not_applied))
    if report.get("ema_weights_unread"):
        print("the checkpoint also holds the UNet's EMA weights (model_ema.*), usually the better ones for "
              "sampling: --ema converts those instead")
    overridden = report.get("overridden_by_checkpoint", [])
    if overridden:
        print(f"{len(overridden)} keys present in both --checkpoint and an extra file: --checkpoint's were used")
    return 0


if __name__ == "__main__":
    sys.exit(main())
