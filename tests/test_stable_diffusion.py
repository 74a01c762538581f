"""Stable Diffusion in NNX against diffusers with the same random weights: the UNet,
the VAE encoder and decoder, whole sampling runs per scheduler, the diffusers
folder and CompVis single-file converters, and the StableDiffusion API."""

import dataclasses
import gc
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from helpers import TINY_DIFFUSION
from parity import relative_error
from sd_fixtures import (CONTEXT_WIDTH, diffusers_scheduler, randomize, tiny_pipeline, tiny_text_encoder,
                         tiny_tokenizer)
from seed_jax import weights
from seed_jax.api import StableDiffusion
from seed_jax.diffusion.schedule import NoiseSchedule
from seed_jax.models.stable_diffusion import StableDiffusion as StableDiffusionModel
from seed_jax.convert.__main__ import convert
from seed_jax.convert.__main__ import main as convert_main

pytestmark = pytest.mark.torch

MODULE_TOLERANCE = 1e-4
RUN_TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(diffusers pipeline, our StableDiffusion) from one saved pipeline folder."""
    root = tmp_path_factory.mktemp("sd")
    pipe = tiny_pipeline(str(root / "pipeline"))
    report = convert(["sd", f"--checkpoint={root / 'pipeline'}", f"--out={root / 'export'}"])
    assert report["kind"] == "stable_diffusion"
    assert not [k for k in report["unused_keys"] if not k.endswith("position_ids")], report["unused_keys"]
    return pipe, StableDiffusion.load(str(root / "export"))


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def _nhwc(x: torch.Tensor):
    return x.detach().numpy().transpose(0, 2, 3, 1)


def test_unet_matches_diffusers(converted):
    pipe, sd = converted
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    context = rng.standard_normal((2, 77, CONTEXT_WIDTH)).astype(np.float32)
    timesteps = np.array([981, 17])
    with torch.no_grad():
        ref = pipe.unet(_nchw(latents), torch.from_numpy(timesteps), torch.from_numpy(context)).sample
    ours = sd.model.unet(latents, timesteps, context)
    assert ours.shape == (2, 8, 8, 4)
    assert relative_error(ours, _nhwc(ref)) <= MODULE_TOLERANCE


def test_vae_encoder_and_decoder_match_diffusers(converted):
    pipe, sd = converted
    rng = np.random.default_rng(1)
    images = rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    latents = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    with torch.no_grad():
        posterior = pipe.vae.encode(_nchw(images)).latent_dist
        decoded = pipe.vae.decode(_nchw(latents)).sample
    mean, logvar = sd.model.vae.encode(images)
    assert relative_error(mean, _nhwc(posterior.mean)) <= MODULE_TOLERANCE
    assert relative_error(logvar, _nhwc(posterior.logvar)) <= MODULE_TOLERANCE
    assert relative_error(sd.model.vae.decode(latents), _nhwc(decoded)) <= MODULE_TOLERANCE


def test_latent_sizes_the_downsampling_does_not_divide_match_diffusers(converted):
    """Latents whose sides the UNet's stride-2 levels do not halve evenly (SD v1 at 520
    pixels: 65 latents): diffusers' UNet upsamples each level to its skip's size, and
    its pipeline samples them; our UNet and `sample` refused them. The prompt is 20
    tokens long: the pipeline pads its empty negative to that length, where `sample`
    refused any prompt of other than 77 tokens without negative_embeds."""
    pipe, sd = converted
    pipe.scheduler = diffusers_scheduler("ddim")
    rng = np.random.default_rng(9)
    latents = rng.standard_normal((1, 9, 7, 4)).astype(np.float32)
    context = rng.standard_normal((1, 20, CONTEXT_WIDTH)).astype(np.float32)
    with torch.no_grad():
        ref_unet = pipe.unet(_nchw(latents), torch.tensor([500]), torch.from_numpy(context)).sample
        ref_images = pipe(prompt_embeds=torch.from_numpy(context), latents=_nchw(latents), num_inference_steps=3,
                          guidance_scale=2.0, output_type="np").images
    ours = sd.model.unet(latents, np.array([500]), context)
    assert ours.shape == (1, 9, 7, 4)
    assert relative_error(ours, _nhwc(ref_unet)) <= MODULE_TOLERANCE
    images = sd.sample(context, latents=latents, num_steps=3, guidance_scale=2.0, sampler="ddim")
    assert images.shape == ref_images.shape == (1, 18, 14, 3)
    assert relative_error((images + 1) / 2, ref_images) <= RUN_TOLERANCE


def test_empty_prompt_embedding_matches_pipeline(converted):
    pipe, sd = converted
    ids = pipe.tokenizer("", padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert tuple(ids[0].tolist()) == sd.config.empty_prompt_ids
    with torch.no_grad():
        ref = pipe.text_encoder(ids).last_hidden_state.numpy()
    assert relative_error(sd.empty_prompt_embeds(1), ref) <= MODULE_TOLERANCE
    # the pipeline pads the empty negative to the length of the prompt_embeds it is given
    with torch.no_grad():
        _, negative = pipe.encode_prompt(None, "cpu", 1, True, prompt_embeds=torch.zeros(1, 20, CONTEXT_WIDTH))
    assert relative_error(sd.empty_prompt_embeds(1, 20), negative.numpy()) <= MODULE_TOLERANCE


@pytest.mark.parametrize("sampler", ["plms", "ddim", "dpm++2m"])
def test_sampling_run_matches_diffusers_pipeline(converted, sampler):
    """The whole guided run and the VAE decode against StableDiffusionPipeline with
    the matching scheduler; the negative side is the pipeline's own empty prompt."""
    pipe, sd = converted
    pipe.scheduler = diffusers_scheduler(sampler)
    rng = np.random.default_rng(2)
    prompt = rng.standard_normal((2, 77, CONTEXT_WIDTH)).astype(np.float32)
    latents = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    with torch.no_grad():
        ref = pipe(prompt_embeds=torch.from_numpy(prompt), latents=_nchw(latents), num_inference_steps=12,
                   guidance_scale=7.5, output_type="np").images
    ours = sd.sample(prompt, latents=latents, num_steps=12, guidance_scale=7.5, sampler=sampler)
    assert ours.shape == ref.shape == (2, 16, 16, 3)
    assert relative_error((ours + 1) / 2, ref) <= RUN_TOLERANCE


@pytest.mark.parametrize("sampler", ["plms", "ddim", "dpm++2m"])
def test_sampler_matches_scheduler_on_latents(converted, sampler):
    """Latents after a run with explicit negative embeddings and few steps (PLMS's
    warm-up and DPM's first/last-order switches dominate), before the decoder."""
    pipe, sd = converted
    rng = np.random.default_rng(3)
    prompt = rng.standard_normal((1, 77, CONTEXT_WIDTH)).astype(np.float32)
    negative = rng.standard_normal((1, 77, CONTEXT_WIDTH)).astype(np.float32)
    latents = rng.standard_normal((1, 8, 8, 4)).astype(np.float32)
    for steps in (1, 2, 5):
        ref = _scheduler_run(pipe, diffusers_scheduler(sampler), steps, prompt, negative, latents, 3.0)
        ours = sd.sample(prompt, negative, latents=latents, num_steps=steps, guidance_scale=3.0, sampler=sampler)
        assert relative_error(ours, ref) <= RUN_TOLERANCE, steps


@torch.no_grad()
def _scheduler_run(pipe, scheduler, steps, prompt, negative, latents, guidance):
    """diffusers' UNet and `scheduler` stepped by hand with guidance, then the VAE
    decoder: images (B,H,W,3) in [-1,1]."""
    scheduler.set_timesteps(steps)
    x = _nchw(latents)
    context = torch.from_numpy(np.concatenate([negative, prompt]))
    for t in scheduler.timesteps:
        uncond, cond = pipe.unet(torch.cat([x, x]), t, context).sample.chunk(2)
        x = scheduler.step(uncond + guidance * (cond - uncond), t, x).prev_sample
    return _nhwc(pipe.vae.decode(x / pipe.vae.config.scaling_factor).sample.clamp(-1, 1))


@pytest.mark.parametrize("sampler", ["ddim", "dpm++2m"])
def test_v_prediction_sampling_matches_diffusers(converted, sampler):
    """The same UNet read as a v-predicting model, against the scheduler configured
    with prediction_type="v_prediction"."""
    pipe, sd = converted
    config = dataclasses.replace(sd.config, schedule=dataclasses.replace(sd.config.schedule,
                                                                         prediction_type="v_prediction"))
    v_model = StableDiffusion(weights.materialize(weights.build("stable_diffusion", config, abstract=True),
                                                  weights.flat_params(sd.model)))
    rng = np.random.default_rng(5)
    prompt, negative = rng.standard_normal((2, 1, 77, CONTEXT_WIDTH)).astype(np.float32)
    latents = rng.standard_normal((1, 8, 8, 4)).astype(np.float32)
    scheduler = type(diffusers_scheduler(sampler)).from_config(diffusers_scheduler(sampler).config,
                                                               prediction_type="v_prediction")
    ref = _scheduler_run(pipe, scheduler, 6, prompt, negative, latents, 2.0)
    ours = v_model.sample(prompt, negative, latents=latents, num_steps=6, guidance_scale=2.0, sampler=sampler)
    assert relative_error(ours, ref) <= RUN_TOLERANCE


def _compvis_state_dict(pipe) -> dict:
    """The pipeline's weights under CompVis LDM names, built key by key from the
    LDM module structure (resnets in_layers/out_layers, input/output_blocks, the
    VAE's down/up/mid with levels counted from the bottom)."""
    out = {}
    unet, levels, per_level = pipe.unet.state_dict(), 2, 3
    resnet = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
              "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}

    def put_resnet(dst, src):
        for k, v in unet.items():
            if k.startswith(src + "."):
                name, rest = k[len(src) + 1:].split(".", 1)
                out[f"model.diffusion_model.{dst}.{resnet[name]}.{rest}"] = v

    def put_all(dst, src, state, prefix):
        for k, v in state.items():
            if k.startswith(src + "."):
                out[f"{prefix}{dst}{k[len(src):]}"] = v

    put_all("time_embed.0", "time_embedding.linear_1", unet, "model.diffusion_model.")
    put_all("time_embed.2", "time_embedding.linear_2", unet, "model.diffusion_model.")
    put_all("input_blocks.0.0", "conv_in", unet, "model.diffusion_model.")
    put_all("out.0", "conv_norm_out", unet, "model.diffusion_model.")
    put_all("out.2", "conv_out", unet, "model.diffusion_model.")
    for i in range(levels):
        for j in range(2):
            put_resnet(f"input_blocks.{1 + i * per_level + j}.0", f"down_blocks.{i}.resnets.{j}")
            put_all(f"input_blocks.{1 + i * per_level + j}.1", f"down_blocks.{i}.attentions.{j}", unet,
                    "model.diffusion_model.")
        put_all(f"input_blocks.{1 + i * per_level + 2}.0.op", f"down_blocks.{i}.downsamplers.0.conv", unet,
                "model.diffusion_model.")
        for j in range(3):
            put_resnet(f"output_blocks.{i * per_level + j}.0", f"up_blocks.{i}.resnets.{j}")
            has_attention = f"up_blocks.{i}.attentions.0.norm.weight" in unet
            put_all(f"output_blocks.{i * per_level + j}.1", f"up_blocks.{i}.attentions.{j}", unet,
                    "model.diffusion_model.")
            if j == 2:
                put_all(f"output_blocks.{i * per_level + j}.{2 if has_attention else 1}.conv",
                        f"up_blocks.{i}.upsamplers.0.conv", unet, "model.diffusion_model.")
    put_resnet("middle_block.0", "mid_block.resnets.0")
    put_all("middle_block.1", "mid_block.attentions.0", unet, "model.diffusion_model.")
    put_resnet("middle_block.2", "mid_block.resnets.1")

    vae, vae_levels = pipe.vae.state_dict(), 2
    attention = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    for k, v in vae.items():
        new = k.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        new = new.replace("down_blocks.", "down.").replace(".resnets.", ".block.").replace("downsamplers.0", "downsample")
        new = new.replace("upsamplers.0", "upsample").replace("mid_block.block.0", "mid.block_1")
        new = new.replace("mid_block.block.1", "mid.block_2")
        if "mid_block.attentions.0." in new:
            name = new.split("mid_block.attentions.0.")[1].rsplit(".", 1)[0]
            new = new.replace(f"mid_block.attentions.0.{name}", f"mid.attn_1.{attention[name]}")
            v = v[:, :, None, None] if v.ndim == 2 else v  # LDM's attention projections are 1x1 convs
        if new.startswith("decoder.up_blocks."):
            level = int(new.split(".")[2])
            new = new.replace(f"decoder.up_blocks.{level}.", f"decoder.up.{vae_levels - 1 - level}.")
        out[f"first_stage_model.{new}"] = v
    for k, v in pipe.text_encoder.state_dict().items():
        out[f"cond_stage_model.transformer.{k}"] = v
    out["model_ema.decay"] = torch.tensor(0.9999)  # present in the release; must be reported unused
    return out


def test_compvis_single_file_converts_to_the_same_model(converted, tmp_path):
    """The CompVis layout written here is checked against diffusers' own LDM
    converters first, then our CLI must give the same images as the folder."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    pipe, sd = converted
    state = _compvis_state_dict(pipe)
    unet_back = convert_ldm_unet_checkpoint(state, dict(pipe.unet.config))
    assert set(unet_back) == set(pipe.unet.state_dict())
    assert all(torch.equal(unet_back[k], v) for k, v in pipe.unet.state_dict().items())
    vae_back = convert_ldm_vae_checkpoint(state, dict(pipe.vae.config))
    assert set(vae_back) == set(pipe.vae.state_dict())
    assert all(torch.equal(vae_back[k].reshape(v.shape), v) for k, v in pipe.vae.state_dict().items())

    torch.save({"state_dict": state, "global_step": 1}, tmp_path / "sd-tiny.ckpt")
    report = convert(["sd", f"--checkpoint={tmp_path / 'sd-tiny.ckpt'}", f"--out={tmp_path / 'export'}",
                      "--unet_heads=2", "--norm_groups=8", "--text_heads=2"])
    assert report["source_layout"] == "compvis"
    assert "model_ema.decay" in report["unused_keys"]
    from_ckpt = StableDiffusion.load(str(tmp_path / "export"))
    rng = np.random.default_rng(4)
    prompt = rng.standard_normal((1, 77, CONTEXT_WIDTH)).astype(np.float32)
    latents = rng.standard_normal((1, 8, 8, 4)).astype(np.float32)
    options = dict(latents=latents, num_steps=3, guidance_scale=7.5, sampler="ddim")
    # The CompVis file has no tokenizer: the empty prompt is SD v1's ids, out of this
    # tiny vocabulary, so both sides take the folder's empty-prompt embedding.
    negative = sd.empty_prompt_embeds(1)
    np.testing.assert_allclose(from_ckpt.sample(prompt, negative, **options), sd.sample(prompt, negative, **options),
                               atol=1e-6)


def test_a_compvis_file_takes_sd_v1s_text_encoder_heads(converted):
    """A CompVis checkpoint has no config.json: without --text_heads its text encoder
    has SD v1's 12 heads (CLIP ViT-L/14's), not CLIPTextConfig's default 8."""
    from seed_jax.convert import stable_diffusion

    pipe, _ = converted
    source = stable_diffusion.compvis_to_diffusers({k: v.numpy() for k, v in _compvis_state_dict(pipe).items()},
                                                   "sd-tiny.ckpt")
    build = lambda **heads: stable_diffusion.config(source, {}, empty_prompt=(0,) * 77, unet_heads=2,  # noqa: E731
                                                    norm_groups=8, **heads)
    with pytest.raises(ValueError, match=r"^text_encoder heads \(--text_heads\)=12 does not divide the width 32"):
        build()  # 12 heads, which this tiny text encoder's width does not take
    assert build(text_heads=2).text_encoder.num_heads == 2
    with pytest.raises(ValueError, match=r"^--text_heads=5 does not divide the width 32"):
        build(text_heads=5)
    # So for the UNet's (a level with attention, or the last: the mid block's): it failed building the model.
    with pytest.raises(ValueError, match=r"^--unet_heads=5 does not divide the width 32"):
        stable_diffusion.unet_config(source, {}, heads=5)
    with pytest.raises(ValueError, match=r"^unet config.json attention_head_dim=\[2, 5\] does not divide the "
                                         r"width 64"):
        stable_diffusion.unet_config(source, {"attention_head_dim": [2, 5]})


def test_compvis_ema_weights_convert_with_ema(converted, tmp_path, capsys):
    """A training checkpoint holds LitEma's copy of each UNet weight (`model_ema.` + its
    name without dots) beside the raw one: the raw weights convert by default, with a
    notice, and the EMA copy with --ema."""
    pipe, _ = converted
    raw = _compvis_state_dict(pipe)
    state = dict(raw)
    for k, v in raw.items():
        if k.startswith("model.diffusion_model."):
            state["model_ema." + k[len("model."):].replace(".", "")] = v * 0.5 + 0.01
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint  # the same EMA names as diffusers
    ema_back = convert_ldm_unet_checkpoint(state, dict(pipe.unet.config), extract_ema=True)
    assert all(torch.equal(ema_back[k], v * 0.5 + 0.01) for k, v in pipe.unet.state_dict().items())
    torch.save({"state_dict": state}, tmp_path / "sd-ema.ckpt")
    args = [f"--checkpoint={tmp_path / 'sd-ema.ckpt'}", "--unet_heads=2", "--norm_groups=8", "--text_heads=2"]
    assert convert_main(["sd", *args, f"--out={tmp_path / 'raw'}"]) == 0
    assert "--ema converts those" in capsys.readouterr().out
    assert convert_main(["sd", *args, f"--out={tmp_path / 'ema'}", "--ema"]) == 0
    from_raw, from_ema = (weights.load_params(str(tmp_path / d)) for d in ("raw", "ema"))
    conv_in = "unet.conv_in.kernel"
    expected = raw["model.diffusion_model.input_blocks.0.0.weight"].permute(2, 3, 1, 0).numpy()
    np.testing.assert_array_equal(from_raw[conv_in], expected)
    np.testing.assert_allclose(from_ema[conv_in], expected * 0.5 + 0.01, rtol=1e-6)
    np.testing.assert_array_equal(from_ema["vae.decoder.conv_out.kernel"], from_raw["vae.decoder.conv_out.kernel"])
    del state["model_ema.diffusion_modelout2bias"]
    torch.save({"state_dict": state}, tmp_path / "sd-ema-gap.ckpt")
    assert convert_main(["sd", f"--checkpoint={tmp_path / 'sd-ema-gap.ckpt'}", "--unet_heads=2", "--norm_groups=8",
                         "--text_heads=2", f"--out={tmp_path / 'gap'}", "--ema"]) == 1
    assert "missing key 'model_ema.diffusion_modelout2bias'" in capsys.readouterr().err


def test_flags_of_the_other_layout_fail_naming_them(tmp_path):
    """--variant with a CompVis file was ignored without a word (the file's weights were
    converted, whatever variant was asked for); like --ema with a folder, it now fails."""
    (tmp_path / "pipeline").mkdir()
    with pytest.raises(ValueError, match="--ema: a diffusers folder holds one set of UNet weights"):
        convert(["sd", f"--checkpoint={tmp_path / 'pipeline'}", f"--out={tmp_path / 'a'}", "--ema"])
    with pytest.raises(ValueError, match="--variant=fp16: a CompVis file holds one set of weights; --variant "
                                         "reads a diffusers folder's"):
        convert(["sd", f"--checkpoint={tmp_path / 'sd-v1-4.ckpt'}", f"--out={tmp_path / 'b'}", "--variant=fp16"])


def test_a_pipeline_folder_given_for_one_model_names_its_model_folders(tmp_path):
    """`hf_clip_text` given SD's pipeline folder, not its text_encoder/, listed only the
    weight files it lacks."""
    for part in ("text_encoder", "unet", "vae"):
        (tmp_path / part).mkdir()
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"nor a sharded .index.json of one \(a diffusers pipeline folder: "
                                                r"give the folder of one of its models, text_encoder, unet, vae;"):
        convert(["hf_clip_text", f"--checkpoint={tmp_path}", f"--out={tmp_path / 'out'}"])
    (tmp_path / "model_index.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"nor a sharded .index.json of one$"):  # not a pipeline: no hint
        convert(["hf_clip_text", f"--checkpoint={tmp_path}", f"--out={tmp_path / 'out'}"])


def test_an_sd2_compvis_file_is_named_as_such(tmp_path, capsys):
    """SD 2's single files (v2-1_512-ema-pruned.safetensors) hold OpenCLIP's text encoder under
    cond_stage_model.model.*: the conversion failed on a missing CLIP key, as if the file lacked it."""
    from safetensors.numpy import save_file

    save_file({"model.diffusion_model.input_blocks.0.0.weight": np.zeros((32, 4, 3, 3), np.float16),
               "cond_stage_model.model.token_embedding.weight": np.zeros((64, 32), np.float16)},
              str(tmp_path / "v2-1_512.safetensors"))
    assert convert_main(["sd", f"--checkpoint={tmp_path / 'v2-1_512.safetensors'}", f"--out={tmp_path / 'o'}"]) == 1
    assert ("holds 'cond_stage_model.model.token_embedding.weight': an SD 2 CompVis checkpoint"
            in capsys.readouterr().err)


def test_a_variant_only_some_parts_have_is_read_for_those_as_diffusers_does(tmp_path, capsys):
    """SD v1.5's folder has `non_ema` weights for its UNet alone: diffusers'
    from_pretrained(variant="non_ema") reads them there and the main weights of the
    VAE and text encoder; --variant=non_ema failed on vae/ instead. A part whose weights
    are a variant's alone is read in it: the report recorded no variant then."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    folder = tmp_path / "pipeline"
    tiny_pipeline(str(folder))
    non_ema = UNet2DConditionModel.from_pretrained(folder / "unet")
    with torch.no_grad():
        for p in non_ema.parameters():
            p.mul_(0.5).add_(0.01)
    non_ema.save_pretrained(folder / "unet", variant="non_ema")
    pipe = StableDiffusionPipeline.from_pretrained(folder, variant="non_ema", safety_checker=None)
    report = convert(["sd", f"--checkpoint={folder}", f"--out={tmp_path / 'export'}", "--variant=non_ema"])
    assert report["variants"] == {"unet": "non_ema", "vae": None, "text_encoder": None}
    params = weights.load_params(str(tmp_path / "export"))
    for ours, module, name in (("unet.conv_in.kernel", pipe.unet, "conv_in.weight"),
                               ("vae.decoder.conv_out.kernel", pipe.vae, "decoder.conv_out.weight")):
        expected = module.state_dict()[name].permute(2, 3, 1, 0).numpy()
        np.testing.assert_allclose(params[ours], expected, rtol=1e-6, err_msg=ours)
    np.testing.assert_allclose(params["unet.conv_in.kernel"],
                               non_ema.conv_in.weight.detach().permute(2, 3, 1, 0).numpy(), rtol=1e-6)
    assert convert_main(["sd", f"--checkpoint={folder}", f"--out={tmp_path / 'none'}", "--variant=bf16"]) == 1
    assert "no part (unet, vae, text_encoder) has weights of the variant bf16" in capsys.readouterr().err
    # A part with a variant's weights alone is read in it, and the report says so.
    text_encoder = folder / "text_encoder"
    pipe.text_encoder.save_pretrained(text_encoder, variant="fp16")
    (text_encoder / "model.safetensors").unlink()
    report = convert(["sd", f"--checkpoint={folder}", f"--out={tmp_path / 'fp16_text'}"])
    assert report["variants"] == {"unet": None, "vae": None, "text_encoder": "fp16"}


def test_a_vae_with_diffusers_0_13s_attention_names_converts_as_diffusers_reads_it(tmp_path):
    """diffusers < 0.14 saved the VAE's mid-block attention as query/key/value/proj_attn
    (the Hub's SD v1 folders still do); diffusers renames them on loading, and so must
    the converter: the same parameters as from today's names."""
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "pipeline"
    tiny_pipeline(str(folder))
    convert(["sd", f"--checkpoint={folder}", f"--out={tmp_path / 'new_names'}"])
    path = folder / "vae" / "diffusion_pytorch_model.safetensors"
    state = load_file(path)
    old_names = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    renamed = {}
    for key, value in state.items():
        for new, old in old_names.items():
            key = key.replace(new, old) if ".attentions." in key else key
        renamed[key] = value
    assert sum(".proj_attn." in k for k in renamed) == 4  # weight and bias, encoder and decoder
    save_file(renamed, path, metadata={"format": "pt"})
    vae = AutoencoderKL.from_pretrained(folder / "vae")
    assert all(torch.equal(vae.state_dict()[k], v) for k, v in state.items())
    convert(["sd", f"--checkpoint={folder}", f"--out={tmp_path / 'old_names'}"])
    new, old = (weights.load_params(str(tmp_path / d)) for d in ("new_names", "old_names"))
    assert new.keys() == old.keys()
    for key in new:
        np.testing.assert_array_equal(old[key], new[key], err_msg=key)


def test_sample_rejects_bad_inputs(converted):
    _, sd = converted
    good = np.zeros((1, 77, CONTEXT_WIDTH), np.float32)
    with pytest.raises(ValueError, match="prompt_embeds: expected"):
        sd.sample(np.zeros((1, 77, 5), np.float32), num_steps=2)
    with pytest.raises(ValueError, match="negative_embeds: expected"):
        sd.sample(good, np.zeros((2, 77, CONTEXT_WIDTH), np.float32), num_steps=2)
    # Both halves of guidance run as one UNet batch: their lengths must agree.
    with pytest.raises(ValueError, match=r"negative_embeds: expected \(1,77,"):
        sd.sample(good, np.zeros((1, 20, CONTEXT_WIDTH), np.float32), num_steps=2)
    # unused without guidance, they were not looked at (StableDiffusionPipeline refuses them)
    for scale in (1.0, 0.0):
        with pytest.raises(ValueError, match=r"negative_embeds: expected \(1,77,"):
            sd.sample(good, np.zeros((2, 77, CONTEXT_WIDTH), np.float32), num_steps=1, guidance_scale=scale)
    with pytest.raises(ValueError, match="negative_embeds: contains NaN"):
        sd.sample(good, np.full((1, 77, CONTEXT_WIDTH), np.nan, np.float32), num_steps=1, guidance_scale=1.0)
    with pytest.raises(ValueError, match="prompt_embeds: 78 tokens long, longer than the empty prompt's 77 ids"):
        sd.sample(np.zeros((1, 78, CONTEXT_WIDTH), np.float32), num_steps=2)
    assert sd.sample(np.zeros((1, 78, CONTEXT_WIDTH), np.float32), num_steps=1, guidance_scale=1.0).shape[0] == 1
    with pytest.raises(ValueError, match="length: expected 1..77"):
        sd.empty_prompt_embeds(1, 78)
    # numpy's errors named nothing (a negative or float batch), or a float length passed
    for bad in (0, -1, 2.0):
        with pytest.raises(ValueError, match=f"batch: expected an integer >= 1, got {bad}"):
            sd.empty_prompt_embeds(bad)
    with pytest.raises(ValueError, match="length: expected 1..77"):
        sd.empty_prompt_embeds(1, 20.5)
    with pytest.raises(ValueError, match="latents: expected"):
        sd.sample(good, latents=np.zeros((1, 4, 4, 3), np.float32), num_steps=2)
    with pytest.raises(ValueError, match=r"latents: expected \(1,h,w,4\), h and w >= 1"):  # gave empty images
        sd.sample(good, latents=np.zeros((1, 0, 4, 4), np.float32), num_steps=2)
    with pytest.raises(ValueError, match="sampler: expected"):
        sd.sample(good, num_steps=2, sampler="euler")
    with pytest.raises(ValueError, match="num_steps: expected"):
        sd.sample(good, num_steps=0)
    with pytest.raises(ValueError, match="NaN"):
        sd.sample(np.full((1, 77, CONTEXT_WIDTH), np.nan, np.float32), num_steps=2)
    with pytest.raises(ValueError, match="latents: contains NaN"):
        sd.sample(good, latents=np.full((1, *sd.latent_shape), np.nan, np.float32), num_steps=2)
    with pytest.raises(ValueError, match="guidance_scale: expected a finite number, got nan"):
        sd.sample(good, num_steps=2, guidance_scale=float("nan"))
    for bad in (None, "7.5", [7.5, 2.0]):  # numpy's TypeError or "truth value ... is ambiguous" named nothing
        with pytest.raises(ValueError, match="guidance_scale: expected a finite number"):
            sd.sample(good, num_steps=2, guidance_scale=bad)
    with pytest.raises(ValueError, match="prompt_embeds: the batch is empty"):
        sd.sample(np.zeros((0, 77, CONTEXT_WIDTH), np.float32), num_steps=2)


def test_initial_noise_of_a_new_batch_size_compiles_nothing_new():
    """initial_noise drew a batch's noise op by op, each op compiled again for every new
    batch size (1.3-1.9 s on a 2-core CPU for every decode of a new batch size), the
    whole batch's noise at once on the device. It now draws chunks of `batch_size` rows
    through one program per chunk size, and row i is still normal(fold_in(key(seed), i))."""
    sd = StableDiffusion(StableDiffusionModel(TINY_DIFFUSION, rngs=nnx.Rngs(0)), batch_size=8)
    key = jax.random.key(5)
    expected = np.stack([jax.random.normal(jax.random.fold_in(key, i), sd.latent_shape) for i in range(19)])
    np.testing.assert_array_equal(sd.initial_noise(19, seed=5), expected)  # chunks of 8, the last padded
    lowered = []

    def lowering(event, *_, **__):
        if event.endswith("jaxpr_to_mlir_module_duration"):  # a program lowered (jitted or an eager op's)
            lowered.append(event)

    jax.monitoring.register_event_duration_secs_listener(lowering)
    try:
        for batch in (5, 6, 7, 11, 12):  # chunks of 8 rows, as 19's
            np.testing.assert_array_equal(sd.initial_noise(batch, seed=5), expected[:batch])
    finally:
        jax.monitoring.unregister_event_duration_listener(lowering)
    assert not lowered, f"{len(lowered)} programs lowered for batch sizes the chunks of 8 serve"
    with pytest.raises(ValueError, match="batch: expected an integer >= 1, got 0"):
        sd.initial_noise(0)


def test_nested_lists_with_rows_of_different_lengths_are_named():
    """Token ids as a tokenizer returns them unpadded (lists of different lengths), or
    embeddings or latents so built, failed as numpy's "setting an array element with a
    sequence ... inhomogeneous shape", naming no argument; each is now named."""
    sd = StableDiffusion(StableDiffusionModel(TINY_DIFFUSION, rngs=nnx.Rngs(0)))
    prompt = np.zeros((2, 77, sd.context_shape[1]), np.float32)
    ragged = [prompt[0], prompt[1, :76]]
    expected = "expected an array (nested lists with rows of one length), got list"
    with pytest.raises(ValueError, match=re.escape(f"input_ids: {expected}")):
        sd.encode_text([[8, 1, 9], [8, 9]])
    with pytest.raises(ValueError, match=re.escape(f"prompt_embeds: {expected}")):
        sd.sample(ragged, num_steps=2)
    with pytest.raises(ValueError, match=re.escape(f"negative_embeds: {expected}")):
        sd.sample(prompt, ragged, num_steps=2)
    with pytest.raises(ValueError, match=re.escape(f"latents: {expected}")):
        sd.sample(prompt, latents=[np.zeros(sd.latent_shape), np.zeros((7, 8, 3))], num_steps=2)


def test_encode_text_rejects_ids_outside_the_vocabulary(converted):
    """Ids past the text encoder's vocabulary (another tokenizer's, e.g. SD v1's 49406
    given to a smaller one) were looked up clamped to its last row, and negative ids
    wrapped around: silently wrong embeddings. They are refused, naming input_ids."""
    _, sd = converted
    vocab = sd.config.text_encoder.vocab_size
    ids = np.asarray([sd.config.empty_prompt_ids])
    assert sd.encode_text(ids).shape == (1, 77, CONTEXT_WIDTH)
    for bad in (vocab, 49406, -1):
        wrong = ids.copy()
        wrong[0, 1] = bad
        with pytest.raises(ValueError, match=rf"input_ids: values must lie in \[0, {vocab}\) \(the text encoder's "
                                             rf"vocabulary\), got \[{wrong.min()}, {wrong.max()}\]"):
            sd.encode_text(wrong)
    with pytest.raises(ValueError, match=r"input_ids: the batch is empty, got \(0, 77\)"):
        sd.encode_text(np.zeros((0, 77), np.int32))


def test_empty_prompt_ids_outside_the_vocabulary_are_named(converted):
    """A model whose empty-prompt ids do not fit its text encoder (SD v1's ids written for
    a CompVis file whose text encoder has another vocabulary) gave a clamped, wrong
    unconditional embedding as the default negative; it is now an error saying so."""
    _, sd = converted
    config = dataclasses.replace(sd.config, empty_prompt_ids=(49406,) + (49407,) * 76)
    model = StableDiffusion(weights.materialize(weights.build("stable_diffusion", config, abstract=True),
                                                weights.flat_params(sd.model)))
    with pytest.raises(ValueError, match=r"empty_prompt_ids: .* \[0, 64\).*pass negative_embeds"):
        model.sample(np.zeros((1, 77, CONTEXT_WIDTH), np.float32), num_steps=1)


@pytest.mark.parametrize("trained", [0.0, 0.1])
def test_guiding_a_model_never_trained_unconditionally_warns_once(converted, tmp_path, caplog, trained):
    """A decoder trained with uncond_probability 0 was guided by the empty prompt it never
    saw, silently: its export records the probability, and sampling then warns, once,
    where guidance falls back on the empty prompt."""
    _, sd = converted
    out = str(tmp_path / "export")
    weights.save(out, "stable_diffusion", sd.config, weights.flat_params(sd.model),
                 info={"uncond_probability": trained})
    model = StableDiffusion.load(out)
    prompt = np.zeros((1, 77, CONTEXT_WIDTH), np.float32)
    with caplog.at_level("WARNING"):
        model.sample(prompt, num_steps=1, guidance_scale=1.0)  # no guidance
        model.sample(prompt, prompt, num_steps=1, guidance_scale=3.0)  # the user's negative
        assert "never trained" not in caplog.text
        model.sample(prompt, num_steps=1, guidance_scale=3.0)
        model.sample(prompt, num_steps=1, guidance_scale=3.0)
    assert caplog.text.count("never trained") == (trained == 0)


@pytest.mark.slow
@pytest.mark.full_size
def test_full_size_sd_v1_unet_and_vae_match_diffusers(tmp_path):
    """SD v1's UNet (one denoising step) and autoencoder (encode and decode) with random
    weights, through the CLI, at 256x256 pixels (32x32 latents): the same weights and
    code paths as at 512, a quarter of the CPU time and a sixteenth of the attention's."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel

    unet = randomize(UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8), 10).eval()
    vae = randomize(AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                                  down_block_types=("DownEncoderBlock2D",) * 4,
                                  up_block_types=("UpDecoderBlock2D",) * 4), 11).eval()
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=tiny_text_encoder(width=768),
                                   tokenizer=tiny_tokenizer(str(tmp_path / "tok")), unet=unet,
                                   scheduler=diffusers_scheduler("plms"), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((1, 32, 32, 4)).astype(np.float32)
    context = rng.standard_normal((1, 77, 768)).astype(np.float32)
    images = rng.uniform(-1, 1, (1, 256, 256, 3)).astype(np.float32)
    with torch.no_grad():  # the references first, so the torch models are gone before ours load
        ref_unet = _nhwc(pipe.unet(_nchw(latents), torch.tensor([981]), torch.from_numpy(context)).sample)
        ref_mean = _nhwc(pipe.vae.encode(_nchw(images)).latent_dist.mean)
        ref_decoded = _nhwc(pipe.vae.decode(_nchw(latents)).sample)
    pipe.save_pretrained(tmp_path / "pipeline")
    del pipe, unet, vae
    gc.collect()
    convert(["sd", f"--checkpoint={tmp_path / 'pipeline'}", f"--out={tmp_path / 'export'}"])
    sd = StableDiffusion.load(str(tmp_path / "export"))
    assert sd.config.unet.block_channels == (320, 640, 1280, 1280) and sd.config.unet.num_heads == (8,) * 4
    error = relative_error(sd.model.unet(latents, np.array([981]), context), ref_unet)
    print(f"full SD v1 UNet relative error {error:.2e}")
    assert error <= MODULE_TOLERANCE
    errors = (relative_error(sd.model.vae.encode(images)[0], ref_mean),
              relative_error(sd.model.vae.decode(latents), ref_decoded))
    print(f"full SD v1 VAE relative error: encoder {errors[0]:.2e}, decoder {errors[1]:.2e}")
    assert max(errors) <= MODULE_TOLERANCE


def test_unsupported_unet_options_are_named():
    from seed_jax.convert import stable_diffusion as sd_convert
    from seed_jax.convert.rules import Source

    with pytest.raises(ValueError, match="transformer_layers_per_block=2"):
        sd_convert.unet_config(Source({}, "folder"), {"transformer_layers_per_block": 2})
    with pytest.raises(ValueError, match="class_embed_type='timestep'"):
        sd_convert.unet_config(Source({}, "folder"), {"class_embed_type": "timestep"})
    with pytest.raises(KeyError, match="not an SD UNet"):  # per-block lists of the supported value pass the check
        sd_convert.unet_config(Source({}, "folder"), {"transformer_layers_per_block": [1, 1, 1, 1]})


@pytest.mark.parametrize("part, key, value", [
    ("unet", "act_fn", "gelu"), ("unet", "downsample_padding", 0), ("unet", "mid_block_scale_factor", 2.0),
    ("unet", "time_embedding_act_fn", "silu"), ("unet", "timestep_post_act", "silu"),
    ("unet", "time_cond_proj_dim", 8), ("unet", "encoder_hid_dim", 32), ("unet", "num_class_embeds", 10),
    ("unet", "attention_type", "gated"), ("unet", "conv_in_kernel", 1), ("unet", "conv_out_kernel", 1),
    ("vae", "act_fn", "gelu"), ("vae", "mid_block_add_attention", False), ("vae", "use_quant_conv", False),
    ("vae", "use_post_quant_conv", False)])
def test_options_that_change_the_computation_are_refused(part, key, value):
    """Each of these, set in a saved tiny pipeline, converted without a word and then
    computed another UNet (relative error 0.1 to 0.8: act_fn, downsample_padding,
    mid_block_scale_factor, the time-embedding activations, encoder_hid_dim) or VAE."""
    from seed_jax.convert import stable_diffusion as sd_convert
    from seed_jax.convert.rules import Source

    read_config = sd_convert.unet_config if part == "unet" else sd_convert.vae_config
    with pytest.raises(ValueError, match=f"{part} config.json {key}={value!r}: only"):
        read_config(Source({}, "folder"), {key: value})


def test_center_input_sample_is_followed(converted):
    """center_input_sample=True: diffusers' UNet maps its input x to 2x - 1 first;
    our UNet ignored the key (relative error 0.9)."""
    from seed_jax.convert import stable_diffusion as sd_convert
    from seed_jax.convert.rules import Source

    pipe, sd = converted
    source = Source({f"unet.{k}": v.numpy() for k, v in pipe.unet.state_dict().items()}, "folder")
    assert sd_convert.unet_config(source, {**pipe.unet.config, "center_input_sample": True}).center_input_sample
    config = dataclasses.replace(sd.config, unet=dataclasses.replace(sd.config.unet, center_input_sample=True))
    centered = StableDiffusion(weights.materialize(weights.build("stable_diffusion", config, abstract=True),
                                                   weights.flat_params(sd.model)))
    rng = np.random.default_rng(6)
    latents = rng.standard_normal((1, 8, 8, 4)).astype(np.float32)
    context = rng.standard_normal((1, 77, CONTEXT_WIDTH)).astype(np.float32)
    pipe.unet.register_to_config(center_input_sample=True)
    try:
        with torch.no_grad():
            ref = pipe.unet(_nchw(latents), torch.tensor([500]), torch.from_numpy(context)).sample
    finally:
        pipe.unet.register_to_config(center_input_sample=False)
    assert relative_error(centered.model.unet(latents, np.array([500]), context), _nhwc(ref)) <= MODULE_TOLERANCE


def test_weights_our_model_has_no_place_for_are_refused(converted):
    """An up level with attention whose down level has none, or encoder_hid_dim's
    projection, left weights unread: the conversion only listed them as unused and
    the UNet computed something else (relative error 0.3 to 0.4)."""
    from seed_jax.convert import stable_diffusion as sd_convert
    from seed_jax.convert.rules import Source

    pipe, _ = converted
    arrays = {f"{part}.{k}": v.numpy() for part in ("unet", "vae", "text_encoder")
              for k, v in getattr(pipe, part).state_dict().items()}
    configs = {"unet": dict(pipe.unet.config), "vae": dict(pipe.vae.config),
               "text_encoder": pipe.text_encoder.config.to_dict()}

    def table(extra):
        source = Source({**arrays, **extra}, "folder")
        return sd_convert.table(sd_convert.config(source, configs, empty_prompt=(0,) * 77), source)

    assert table({"text_encoder.text_model.embeddings.position_ids": np.arange(77)[None]})
    with pytest.raises(ValueError, match="folder: 2 weights have no place in our model .* e.g. "
                                         "unet.encoder_hid_proj.bias, unet.encoder_hid_proj.weight"):
        table({"unet.encoder_hid_proj.weight": np.zeros((32, 32)), "unet.encoder_hid_proj.bias": np.zeros(32)})


def test_unfollowed_scheduler_settings_are_named():
    """Settings that would make the folder's own scheduler sample another schedule or
    other timesteps than ours are refused; what diffusers saves for SD v1 passes."""
    from seed_jax.convert import stable_diffusion as sd_convert
    from seed_jax.diffusion import samplers

    saved = {"_class_name": "PNDMScheduler", "beta_schedule": "scaled_linear", "steps_offset": 1,
             "timestep_spacing": "leading", "trained_betas": None, "prediction_type": "v_prediction"}
    assert sd_convert.schedule_config(saved).prediction_type == "v_prediction"
    followed = sd_convert.schedule_config({**saved, "clip_sample": True, "clip_sample_range": 0.5,
                                           "skip_prk_steps": False, "timestep_spacing": "trailing"})
    assert (followed.clip_sample, followed.clip_sample_range, followed.skip_prk_steps,
            followed.timestep_spacing) == (True, 0.5, False, "trailing")
    assert sd_convert.schedule_config({"steps_offset": 1}).timestep_spacing is None  # each sampler's default
    # DPM-Solver settings: dpm++2m follows use_karras_sigmas and refuses the others; PLMS and DDIM ignore them
    dpm = sd_convert.schedule_config({**saved, "use_karras_sigmas": True, "solver_order": 3,
                                      "algorithm_type": "dpmsolver++", "lambda_min_clipped": -float("inf")})
    assert dpm.use_karras_sigmas and dpm.dpm_unfollowed == "solver_order=3"
    with pytest.raises(ValueError, match=r"sampler: dpm\+\+2m does not follow .* solver_order=3 .*use plms or ddim"):
        samplers.DPMSolverPP.plan(dpm, 5)
    plain = dataclasses.replace(dpm, use_karras_sigmas=False, dpm_unfollowed="")
    for method in (samplers.PLMS, samplers.DDIM):
        ours, theirs = method.plan(dpm, 5), method.plan(plain, 5)
        assert ours.keys() == theirs.keys() and all(np.array_equal(ours[k], theirs[k]) for k in ours)
    cosine = sd_convert.schedule_config({**saved, "beta_schedule": "squaredcos_cap_v2", "use_karras_sigmas": True})
    with pytest.raises(ValueError, match="Karras timesteps .* lie between integers"):
        samplers.DPMSolverPP.plan(cosine, 5)
    for key, value in (("rescale_betas_zero_snr", True), ("trained_betas", [1e-4] * 1000), ("thresholding", True)):
        with pytest.raises(ValueError, match=f"scheduler_config.json {key}="):
            sd_convert.schedule_config({**saved, key: value})


@pytest.mark.parametrize("fields, message", [
    (dict(num_train_timesteps=0), "num_train_timesteps: expected an integer >= 1, got 0"),
    (dict(steps_offset=-1), r"steps_offset: expected an integer in \[0, num_train_timesteps = 1000\), got -1"),
    (dict(steps_offset=1000), "steps_offset: .* got 1000"),
    (dict(beta_schedule="cosine"), "beta_schedule: expected one of"),
    (dict(prediction_type="sample"), "prediction_type: expected one of"),
    (dict(timestep_spacing="uniform"), "timestep_spacing: expected one of"),
    (dict(beta_start=-0.001, beta_schedule="linear"), "beta_start: expected 0 < beta_start < 1 .* got -0.001"),
    (dict(beta_start=-0.001), "beta_start: expected 0 < beta_start < 1 .*'scaled_linear', got -0.001"),
    (dict(beta_start=0.0), "beta_start: expected 0 < beta_start < 1"),
    (dict(beta_end=1.0), "beta_end: expected 0 < beta_end < 1"),
    (dict(beta_end=float("nan"), beta_schedule="linear"), "beta_end: expected 0 < beta_end < 1"),
    (dict(beta_start=0.5, beta_end=0.9),
     r"beta_start/beta_end: alpha-bar.* at timestep \d+ of num_train_timesteps = 1000;"),
    (dict(num_train_timesteps=20000), "beta_start/beta_end: alpha-bar.* num_train_timesteps = 20000")])
def test_a_bad_noise_schedule_is_named(fields, message):
    """A negative steps_offset once indexed the schedule from its end, silently. Betas were not
    checked: a negative "linear" beta_start made alpha-bar exceed 1 (NaN training loss), a
    negative "scaled_linear" one was silently read as 0 (its square root is complex), and betas
    near 1 (or many timesteps) underflowed alpha-bar to 0, which the samplers divide by."""
    with pytest.raises(ValueError, match=message):
        NoiseSchedule(**fields)


def test_the_cosine_schedule_ignores_beta_start_and_beta_end():
    cosine = NoiseSchedule(beta_schedule="squaredcos_cap_v2", beta_start=-1.0, beta_end=2.0)
    np.testing.assert_array_equal(cosine.alphas_cumprod(),
                                  NoiseSchedule(beta_schedule="squaredcos_cap_v2").alphas_cumprod())
    assert 0 < cosine.alphas_cumprod()[-1] < cosine.alphas_cumprod()[0] < 1


def _toy_model(x, t):
    """A stand-in model output, non-linear in x and changing with the timestep t (numpy or traced)."""
    return jnp.tanh(x) * (0.5 + t / 1000) - 0.2 * x


@pytest.mark.parametrize("sampler, settings, steps", [
    ("plms", dict(skip_prk_steps=False), 4), ("plms", dict(skip_prk_steps=False), 9),
    ("plms", dict(skip_prk_steps=False, prediction_type="v_prediction"), 6),
    ("plms", dict(prediction_type="v_prediction"), 6),
    ("ddim", dict(clip_sample=True), 5), ("ddim", dict(clip_sample=True, clip_sample_range=0.5), 5),
    ("plms", dict(timestep_spacing="linspace"), 5), ("ddim", dict(timestep_spacing="trailing"), 5),
    ("dpm++2m", dict(timestep_spacing="leading", steps_offset=1), 5), ("dpm++2m", dict(timestep_spacing="trailing"), 5),
    ("dpm++2m", dict(use_karras_sigmas=True), 5), ("dpm++2m", dict(use_karras_sigmas=True), 50),
    ("dpm++2m", dict(use_karras_sigmas=True, prediction_type="v_prediction"), 7),
    ("dpm++2m", dict(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
                     timestep_spacing="trailing"), 3),
    ("ddim", dict(prediction_type="v_prediction"), 5),
    ("ddim", dict(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", timestep_spacing="trailing"), 1),
    ("ddim", dict(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", timestep_spacing="trailing",
                  clip_sample=True), 3)])
def test_scheduler_settings_are_sampled_as_diffusers_does(sampler, settings, steps):
    """Settings that a saved scheduler_config.json holds and our samplers ignored:
    PNDM's Runge-Kutta warm-up (skip_prk_steps False, PNDMScheduler's default: 8 model
    evaluations fewer), DDIM's clip_sample (relative error 3 to 6 here, 0.5 on a tiny
    pipeline's images); PLMS on a v-predicting model converted each estimate where
    PNDM converts their combination (error 0.3). timestep_spacing other than "leading"
    was refused, and dpm++2m spaced "linspace" even where the file says "leading" (what
    diffusers saves for SD v1 now; its DPM-Solver built from that file spaces "leading");
    dpm++2m ignored use_karras_sigmas (at 50 steps, rounding repeats timesteps near sigma_min),
    and read a v-predicting model's output at the alpha-bar of the rounded timestep, not at the
    Karras sigma (error 1e-4), and through a noise estimate, whose division by alpha loses
    float32 precision where alpha-bar is tiny (the cosine schedule's last timestep: error 6e-4),
    as DDIM did too (6e-4 at 1 step): now both read x0 from v, as their schedulers do.
    The samplers against the schedulers, stepped with the same toy model."""
    from seed_jax.diffusion import samplers

    schedule = NoiseSchedule(**{"steps_offset": 1, **settings})
    reference = diffusers_scheduler(sampler)
    reference = type(reference).from_config(reference.config, **settings)
    x = np.random.default_rng(7).standard_normal((1, 4, 4, 4)).astype(np.float32)
    reference.set_timesteps(steps)
    ref = torch.from_numpy(x)
    for t in reference.timesteps:
        ref = reference.step(torch.from_numpy(np.array(_toy_model(ref.numpy(), int(t)))), t, ref).prev_sample
    method = samplers.get(sampler)
    plan = method.plan(schedule, steps)
    assert len(plan["timestep"]) == len(reference.timesteps)

    ours = jax.jit(lambda latents: samplers.run(method, plan, _toy_model, latents))(x)
    assert relative_error(ours, ref.numpy()) <= 1e-5


EPSILON_TOLERANCE = 1e-5  # float32 noise here is ~1e-6; a wrong epsilon gives > 0.1


@torch.no_grad()
def test_normalisation_epsilons_match_where_they_show(converted):
    """GroupNorm/LayerNorm epsilons (UNet resnets norm_eps 1e-5, its transformers' GroupNorm
    1e-6 and LayerNorms 1e-5, the VAE's 1e-6, CLIP's layer_norm_eps) hardly move the
    whole-model outputs the tests above compare at 1e-4. Here each module reads inputs
    whose variance (1e-6) is near its epsilon, so a wrong one is an O(1) error."""
    pipe, sd = converted
    ours, unet, vae = sd.model, pipe.unet, pipe.vae
    te = getattr(pipe.text_encoder, "text_model", pipe.text_encoder)  # transformers 5 dropped the wrapper
    g = torch.Generator().manual_seed(8)
    tiny = lambda *shape: 1e-3 * torch.randn(*shape, generator=g)  # noqa: E731
    x, temb = tiny(1, 32, 8, 8), torch.randn(1, 128, generator=g)
    tokens, context = tiny(1, 64, 32), torch.randn(1, 77, CONTEXT_WIDTH, generator=g)
    z, pixels, text = tiny(1, 32, 4, 4), tiny(1, 16, 8, 8), tiny(1, 77, CONTEXT_WIDTH)
    our_attention = ours.unet.down_blocks[0].attentions[0]
    errors = {
        "unet resnet": (ours.unet.down_blocks[0].resnets[0](_nhwc(x), temb.numpy()),
                        _nhwc(unet.down_blocks[0].resnets[0](x, temb))),
        "unet conv_norm_out": (ours.unet.conv_norm_out(_nhwc(x)), _nhwc(unet.conv_norm_out(x))),
        "unet transformer": (our_attention(_nhwc(x), context.numpy()),
                             _nhwc(unet.down_blocks[0].attentions[0](x, encoder_hidden_states=context).sample)),
        "unet transformer block": (our_attention.block(tokens.numpy(), context.numpy()),
                                   unet.down_blocks[0].attentions[0].transformer_blocks[0](
                                       tokens, encoder_hidden_states=context).numpy()),
        "vae resnet": (ours.vae.decoder.mid_block.resnet1(_nhwc(z)), _nhwc(vae.decoder.mid_block.resnets[0](z, None))),
        "vae attention": (ours.vae.decoder.mid_block.attention(_nhwc(z)),
                          _nhwc(vae.decoder.mid_block.attentions[0](z))),
        "vae conv_norm_out": (ours.vae.decoder.conv_norm_out(_nhwc(pixels)),
                              _nhwc(vae.decoder.conv_norm_out(pixels))),
        "text final norm": (ours.text_encoder.final_norm(text.numpy()), te.final_layer_norm(text).numpy()),
        "text blocks": (ours.text_encoder.blocks(text.numpy()), _clip_blocks(te, text)),
    }
    errors = {name: relative_error(a, b) for name, (a, b) in errors.items()}
    wrong = {name: f"{error:.1e}" for name, error in errors.items() if error > EPSILON_TOLERANCE}
    assert not wrong, f"relative errors over {EPSILON_TOLERANCE}: {wrong}"


def _clip_blocks(text_encoder, x: torch.Tensor) -> np.ndarray:
    """transformers' CLIP encoder layers over hidden states x (B,L,D), causally masked."""
    length = x.shape[1]
    mask = torch.full((length, length), float("-inf")).triu(1)[None, None]
    for layer in text_encoder.encoder.layers:
        x = layer(x, mask)
        x = x[0] if isinstance(x, tuple) else x
    return x.numpy()


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_beta_schedules_match_diffusers(beta_schedule):
    """Each beta_schedule diffusers' DDIM and PNDM schedulers offer gives their alpha-bar
    (squaredcos_cap_v2, the cosine schedule, was refused)."""
    from diffusers import DDIMScheduler

    reference = DDIMScheduler(beta_schedule=beta_schedule, beta_start=0.00085, beta_end=0.012)
    np.testing.assert_allclose(NoiseSchedule(beta_schedule=beta_schedule).alphas_cumprod(),
                               reference.alphas_cumprod.numpy(), rtol=1e-5)


def test_the_empty_prompt_is_padded_as_the_pipeline_pads_it(tmp_path):
    """StableDiffusionPipeline pads a prompt, and the empty negative, to the tokenizer's
    model_max_length: a tokenizer of 16 gave our empty prompt 77 ids. The text encoder's
    length was read from a transformers 4 key only: transformers 5 saves the names
    without `text_model.`, and the length fell back to 77."""
    from seed_jax.convert import stable_diffusion as sd_convert
    from seed_jax.convert.rules import Source

    tokenizer = tiny_tokenizer(str(tmp_path / "vocab"))
    tokenizer.model_max_length = 16
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    ids = tokenizer("", padding="max_length", max_length=tokenizer.model_max_length).input_ids
    assert sd_convert.empty_prompt_ids(str(tmp_path), 77) == tuple(ids) and len(ids) == 16
    assert len(sd_convert.empty_prompt_ids(str(tmp_path), 8)) == 8  # never past the text encoder's length
    for prefix in ("text_encoder.text_model.", "text_encoder."):
        embeddings = {f"{prefix}embeddings.{name}_embedding.weight": np.zeros((n, 4)) for name, n in
                      (("token", 64), ("position", 80))}
        assert sd_convert.text_positions(Source(embeddings, "folder")) == 80


@pytest.mark.parametrize("kept", [["tokenizer_config.json"], ["vocab.json"], []])
def test_a_tokenizer_folder_without_its_vocabulary_is_named(tmp_path, kept):
    """transformers 5 loads such a folder as a tokenizer of its special tokens alone: the
    empty prompt's ids were (0, 2, 2, ...), silently; with vocab.json alone its error
    named no folder."""
    from seed_jax.convert import stable_diffusion as sd_convert

    tiny_tokenizer(str(tmp_path / "vocab")).save_pretrained(tmp_path / "saved")
    (tmp_path / "tokenizer").mkdir()
    for name in kept:
        source = tmp_path / ("vocab" if name == "vocab.json" else "saved") / name
        (tmp_path / "tokenizer" / name).write_bytes(source.read_bytes())
    missing = "merges.txt" if kept == ["vocab.json"] else "vocab.json or merges.txt"
    with pytest.raises(FileNotFoundError, match=f"tokenizer: no tokenizer.json, nor {missing}: the tokenizer's "
                                                "vocabulary"):
        sd_convert.empty_prompt_ids(str(tmp_path), 77)
