"""Hugging Face and LAVIS layouts -> our models, against transformers' Blip2VisionModel,
Blip2QFormerModel (no causal mask) and CLIPTextModel with the same random weights."""

import json

import pytest
import torch
import torch.nn.functional as F
from flax import nnx
from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval, CLIPConfig,
                          CLIPModel, CLIPTextConfig, CLIPTextModel, OPTConfig)

from parity import INTERMEDIATE_TOLERANCE, relative_error
from seed_jax import weights
from seed_jax.convert.__main__ import convert

pytestmark = pytest.mark.torch

TINY_VISION = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                   patch_size=8)
TINY_QFORMER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                    encoder_hidden_size=48, vocab_size=100, max_position_embeddings=40, use_qformer_text_input=True)


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Norm scales near 1 and non-zero biases (HF initialises them to 1 and 0, which
    would hide a swapped or dropped tensor), matrices and embeddings as initialised,
    except near-zero matrices (BLIP-2's ViT: initializer_range 1e-10, which leaves its
    blocks the identity plus biases and hides a wrong qkv split or activation): those
    at 1/sqrt(fan-in)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.ndim == 1 and "norm" in name.lower() and name.endswith("weight"):
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
        elif p.ndim == 1:
            p.copy_(0.05 * torch.randn(p.shape, generator=g))
        elif "query_tokens" in name or "embedding" in name:
            p.copy_(0.5 * torch.randn(p.shape, generator=g))
        elif p.abs().max() < 1e-6:
            p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
    return model


def _blip2_config(vision=TINY_VISION, qformer=TINY_QFORMER, **kw):
    return Blip2Config(vision_config=vision, qformer_config=qformer, num_query_tokens=8, image_text_hidden_size=16,
                       **kw)


@torch.no_grad()
def _hf_reference(hf, batch, seed=0):
    c = hf.config.vision_config
    pixels = torch.randn(batch, 3, c.image_size, c.image_size, generator=torch.Generator().manual_seed(seed))
    vision = hf.vision_model(pixel_values=pixels, output_hidden_states=True)
    queries = hf.qformer(query_embeds=hf.query_tokens.expand(batch, -1, -1),
                         encoder_hidden_states=vision.last_hidden_state).last_hidden_state
    ref = {"vit_features": vision.hidden_states[-1], "image_embeds": vision.last_hidden_state, "queries": queries,
           "pixels": pixels.permute(0, 2, 3, 1)}
    return {k: v.numpy() for k, v in ref.items()}


def _ours(out_dir, pixels):
    model, kind, config = weights.load_model(str(out_dir), kind="blip2")
    # Parameters go in as arguments (nnx.jit), not as captured constants.
    vit_features, image_embeds = nnx.jit(lambda m, x: m.image_embeds(x))(model, pixels)
    return model, config, {"vit_features": vit_features, "image_embeds": image_embeds,
                           "queries": nnx.jit(lambda m, x: m.qformer.queries(x))(model, image_embeds)}


def _assert_close(ours, ref, keys):
    errors = {k: relative_error(ours[k], ref[k]) for k in keys}
    for k, e in errors.items():
        assert e <= INTERMEDIATE_TOLERANCE, f"{k}: relative error {e:.2e}"
    return errors


@torch.no_grad()
def _text_reference(hf, ids, mask):
    tokens = hf.qformer(query_embeds=hf.embeddings(input_ids=ids), query_length=0,
                        attention_mask=mask).last_hidden_state
    return F.normalize(hf.text_projection(tokens[:, 0]), dim=-1).numpy()


def _text_inputs(vocab, batch=3, length=9):
    ids = torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(7))
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, 6:] = 0  # a padded caption
    return ids, mask


def test_hf_blip2_retrieval_folder_matches_transformers(tmp_path):
    hf = randomize(Blip2ForImageTextRetrieval(_blip2_config()), 0).eval()
    hf.save_pretrained(tmp_path / "hf")
    ref = _hf_reference(hf, batch=2)
    report = convert(["hf_blip2", f"--checkpoint={tmp_path / 'hf'}", f"--out={tmp_path / 'out'}"])
    assert report["kind"] == "blip2" and any(k.startswith("itm_head") for k in report["unused_keys"])
    model, config, ours = _ours(tmp_path / "out", ref["pixels"])
    assert config.qformer.with_text and config.with_itc_heads and config.qformer.cross_attention_freq == 2
    assert not config.qformer.causal_queries and config.qformer.num_queries == 8
    _assert_close(ours, ref, ("vit_features", "image_embeds", "queries"))

    with torch.no_grad():
        image_ref = F.normalize(hf.vision_projection(torch.from_numpy(ref["queries"])), dim=-1).numpy()
    assert relative_error(model.image_features(ours["queries"]), image_ref) <= INTERMEDIATE_TOLERANCE
    ids, mask = _text_inputs(TINY_QFORMER["vocab_size"])
    text = model.text_features(ids.numpy(), mask.numpy())
    assert relative_error(text, _text_reference(hf, ids, mask)) <= INTERMEDIATE_TOLERANCE


def test_hf_blip2_qformer_depth_is_config_jsons_as_transformers_builds_it(tmp_path):
    """The Q-Former has qformer_config.num_hidden_layers layers, as transformers builds
    it (stored layers beyond it unused); the converter built every stored layer."""
    randomize(Blip2ForImageTextRetrieval(_blip2_config()), 9).save_pretrained(tmp_path / "hf")
    settings = json.loads((tmp_path / "hf" / "config.json").read_text())
    settings["qformer_config"]["num_hidden_layers"] = 2  # of the 4 stored
    (tmp_path / "hf" / "config.json").write_text(json.dumps(settings))
    hf = Blip2ForImageTextRetrieval.from_pretrained(tmp_path / "hf").eval()
    ref = _hf_reference(hf, batch=2)
    report = convert(["hf_blip2", f"--checkpoint={tmp_path / 'hf'}", f"--out={tmp_path / 'out'}"])
    assert any(k.startswith("qformer.encoder.layer.3.") for k in report["unused_keys"])
    _, config, ours = _ours(tmp_path / "out", ref["pixels"])
    assert config.qformer.num_layers == 2
    _assert_close(ours, ref, ("queries",))


def test_hf_blip2_generation_folder_converts_without_the_language_model(tmp_path):
    opt = OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
                    word_embed_proj_dim=16, max_position_embeddings=32)
    qformer = dict(TINY_QFORMER, use_qformer_text_input=False)
    hf = randomize(Blip2ForConditionalGeneration(_blip2_config(qformer=qformer, text_config=opt.to_dict())), 1).eval()
    hf.save_pretrained(tmp_path / "hf")
    ref = _hf_reference(hf, batch=2, seed=1)
    report = convert(["hf_blip2", f"--checkpoint={tmp_path / 'hf'}", f"--out={tmp_path / 'out'}"])
    assert any(k.startswith("language_model.") for k in report["unused_keys"])
    _, config, ours = _ours(tmp_path / "out", ref["pixels"])
    assert not config.qformer.with_text and not config.with_itc_heads
    _assert_close(ours, ref, ("vit_features", "image_embeds", "queries"))

    # The ViT's depth is config.json's, as transformers builds it: later layers go unused.
    settings = json.loads((tmp_path / "hf" / "config.json").read_text())
    settings["vision_config"]["num_hidden_layers"] = 1
    (tmp_path / "hf" / "config.json").write_text(json.dumps(settings))
    report = convert(["hf_blip2", f"--checkpoint={tmp_path / 'hf'}", f"--out={tmp_path / 'one_layer'}"])
    assert weights.load_model(str(tmp_path / "one_layer"), kind="blip2")[2].vit.depth == 1
    assert "vision_model.encoder.layers.1.mlp.fc1.weight" in report["unused_keys"]
    settings["vision_config"]["num_hidden_layers"] = 3
    (tmp_path / "hf" / "config.json").write_text(json.dumps(settings))
    with pytest.raises(KeyError, match="missing key 'vision_model.encoder.layers.2.layer_norm1.weight'"):
        convert(["hf_blip2", f"--checkpoint={tmp_path / 'hf'}", f"--out={tmp_path / 'three_layers'}"])


def _lavis_state_dict(hf_state: dict, temp: float) -> dict:
    """The LAVIS blip2_pretrained.pth names for a transformers BLIP-2 state dict
    (the inverse of transformers' conversion script)."""
    out = {}
    for key, value in hf_state.items():
        k = key
        for old, new in (("vision_model.embeddings.class_embedding", "visual_encoder.cls_token"),
                         ("vision_model.embeddings.position_embedding", "visual_encoder.pos_embed"),
                         ("vision_model.embeddings.patch_embedding", "visual_encoder.patch_embed.proj"),
                         ("vision_model.encoder.layers.", "visual_encoder.blocks."),
                         ("vision_model.post_layernorm", "ln_vision"),
                         (".layer_norm1", ".norm1"), (".layer_norm2", ".norm2"),
                         (".self_attn.projection", ".attn.proj"), (".self_attn.qkv", ".attn.qkv"),
                         ("qformer.layernorm", "Qformer.bert.embeddings.LayerNorm"),
                         ("qformer.encoder.", "Qformer.bert.encoder."),
                         ("attention.attention.", "attention.self."),
                         ("embeddings.word_embeddings", "Qformer.bert.embeddings.word_embeddings"),
                         ("embeddings.position_embeddings", "Qformer.bert.embeddings.position_embeddings"),
                         ("vision_projection", "vision_proj"), ("text_projection", "text_proj")):
            if old in k and not (old.startswith("embeddings.") and k.startswith("Qformer.")):
                k = k.replace(old, new)
        if k.endswith("attn.qkv.bias"):
            q, _, v = value.chunk(3)
            out[k.replace("qkv.bias", "q_bias")], out[k.replace("qkv.bias", "v_bias")] = q, v
        else:
            out[k] = value
    out["temp"] = torch.tensor(temp)
    return out


def test_lavis_blip2_checkpoint_matches_transformers(tmp_path):
    hf = randomize(Blip2ForImageTextRetrieval(_blip2_config()), 2).eval()
    ref = _hf_reference(hf, batch=2, seed=2)
    lavis = _lavis_state_dict(hf.state_dict(), temp=0.05)
    vit = {k[len("visual_encoder."):]: v for k, v in lavis.items() if k.startswith("visual_encoder.")}
    torch.save({"model": {k: v for k, v in lavis.items() if not k.startswith("visual_encoder.")}},
               tmp_path / "blip2_pretrained.pth")
    torch.save(vit, tmp_path / "eva_vit_g.pth")
    convert(["lavis_blip2", f"--checkpoint={tmp_path / 'blip2_pretrained.pth'}", f"--vit={tmp_path / 'eva_vit_g.pth'}",
             f"--out={tmp_path / 'out'}", "--vit_heads=4", "--qformer_heads=4",
             f"--vit_depth={TINY_VISION['num_hidden_layers']}"])
    model, config, ours = _ours(tmp_path / "out", ref["pixels"])
    assert config.with_temperature and abs(float(model.temp[...]) - 0.05) < 1e-7
    # LAVIS's ln_vision eps is 1e-5 where transformers' post_layernorm has 1e-6: well inside the tolerance.
    _assert_close(ours, ref, ("vit_features", "image_embeds", "queries"))
    ids, mask = _text_inputs(TINY_QFORMER["vocab_size"])
    text = model.text_features(ids.numpy(), mask.numpy())
    assert relative_error(text, _text_reference(hf, ids, mask)) <= INTERMEDIATE_TOLERANCE


def _clip_parity(tmp_path, config: CLIPTextConfig, seed: int) -> float:
    hf = randomize(CLIPTextModel(config), seed).eval()
    hf.save_pretrained(tmp_path / "text_encoder")
    ids = torch.randint(0, config.vocab_size, (2, config.max_position_embeddings),
                        generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref = hf(input_ids=ids).last_hidden_state.numpy()
    convert(["hf_clip_text", f"--checkpoint={tmp_path / 'text_encoder'}", f"--out={tmp_path / 'out'}"])
    model, _, _ = weights.load_model(str(tmp_path / "out"), kind="clip_text")
    error = relative_error(nnx.jit(lambda m, x: m(x))(model, ids.numpy()), ref)
    assert error <= INTERMEDIATE_TOLERANCE, f"relative error {error:.2e}"
    return error


def test_hf_clip_text_folder_matches_transformers(tmp_path):
    _clip_parity(tmp_path, CLIPTextConfig(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, max_position_embeddings=77), seed=0)


def test_hf_clip_model_folder_converts_its_text_tower_by_its_text_config(tmp_path):
    """A whole CLIPModel folder (as openai/clip-vit-large-patch14): heads, activation
    and epsilon are in config.json's text_config; they used to fall back to 12 heads,
    quick_gelu and 1e-5, silently."""
    text = dict(vocab_size=99, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-6)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=32,
                  patch_size=16)
    hf = randomize(CLIPModel(CLIPConfig(text_config=text, vision_config=vision)), 4).eval()
    hf.save_pretrained(tmp_path / "clip")
    report = convert(["hf_clip_text", f"--checkpoint={tmp_path / 'clip'}", f"--out={tmp_path / 'out'}"])
    assert any(k.startswith("vision_model.") for k in report["unused_keys"])
    model, _, config = weights.load_model(str(tmp_path / "out"), kind="clip_text")
    assert (config.num_heads, config.activation, config.eps) == (4, "gelu", 1e-6)
    ids = torch.randint(0, 99, (2, 77), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = hf.text_model(input_ids=ids).last_hidden_state.numpy()
    assert relative_error(nnx.jit(lambda m, x: m(x))(model, ids.numpy()), ref) <= INTERMEDIATE_TOLERANCE


def test_a_clip_model_config_json_with_text_config_dict_reads_as_transformers_does(tmp_path):
    """Early CLIPModel config.json files (transformers 4.x before text_config) hold the
    text settings in text_config_dict, which transformers still reads (over text_config's,
    the rest at CLIPTextConfig's defaults); the converter took the defaults' 8 heads."""
    text = dict(vocab_size=99, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=77, hidden_act="gelu")
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=32,
                  patch_size=16)
    randomize(CLIPModel(CLIPConfig(text_config=text, vision_config=vision)), 6).save_pretrained(tmp_path / "clip")
    settings = json.loads((tmp_path / "clip" / "config.json").read_text())
    settings["text_config_dict"] = text
    settings["text_config"] = {**settings["text_config"], "num_attention_heads": 8, "hidden_act": "quick_gelu"}
    (tmp_path / "clip" / "config.json").write_text(json.dumps(settings))
    hf = CLIPModel.from_pretrained(tmp_path / "clip").eval()
    assert (hf.config.text_config.num_attention_heads, hf.config.text_config.hidden_act) == (4, "gelu")
    ids = torch.randint(0, 99, (2, 77), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref = hf.text_model(input_ids=ids).last_hidden_state.numpy()
    for out in ("both", "dict_alone"):
        if out == "dict_alone":  # the oldest files have text_config_dict alone
            del settings["text_config"]
            (tmp_path / "clip" / "config.json").write_text(json.dumps(settings))
            assert CLIPModel.from_pretrained(tmp_path / "clip").config.text_config.num_attention_heads == 4
        convert(["hf_clip_text", f"--checkpoint={tmp_path / 'clip'}", f"--out={tmp_path / out}"])
        model, _, config = weights.load_model(str(tmp_path / out), kind="clip_text")
        assert (config.num_heads, config.activation, config.eps) == (4, "gelu", 1e-5), out
        assert relative_error(nnx.jit(lambda m, x: m(x))(model, ids.numpy()), ref) <= INTERMEDIATE_TOLERANCE


def test_a_clip_config_json_without_heads_or_activation_reads_as_transformers_does(tmp_path):
    """Keys config.json lacks take transformers' defaults (8 heads, quick_gelu, 1e-5),
    as `from_pretrained` builds the model; they used to fall back to 12 heads."""
    folder = tmp_path / "text_encoder"
    randomize(CLIPTextModel(CLIPTextConfig(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=8, max_position_embeddings=77)), 5).save_pretrained(folder)
    settings = json.loads((folder / "config.json").read_text())
    for key in ("num_attention_heads", "hidden_act", "layer_norm_eps"):
        del settings[key]
    (folder / "config.json").write_text(json.dumps(settings))
    hf = CLIPTextModel.from_pretrained(folder).eval()
    convert(["hf_clip_text", f"--checkpoint={folder}", f"--out={tmp_path / 'out'}"])
    model, _, config = weights.load_model(str(tmp_path / "out"), kind="clip_text")
    assert config.num_heads == hf.config.num_attention_heads == 8
    ids = torch.randint(0, 99, (2, 77), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = hf(input_ids=ids).last_hidden_state.numpy()
    assert relative_error(nnx.jit(lambda m, x: m(x))(model, ids.numpy()), ref) <= INTERMEDIATE_TOLERANCE


def test_clip_text_depth_is_config_jsons_num_hidden_layers_as_transformers_builds_it(tmp_path):
    """A text encoder whose config.json builds fewer layers than it stores (a "clip
    skip" folder): transformers builds num_hidden_layers and leaves the last stored
    layer unused; the converter built every stored layer, another output. Fewer
    stored layers than configured fail naming the first missing key."""
    folder = tmp_path / "text_encoder"
    hf_config = CLIPTextConfig(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, max_position_embeddings=77)
    randomize(CLIPTextModel(hf_config), 8).save_pretrained(folder)
    settings = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**settings, "num_hidden_layers": 1}))
    hf = CLIPTextModel.from_pretrained(folder).eval()
    report = convert(["hf_clip_text", f"--checkpoint={folder}", f"--out={tmp_path / 'out'}"])
    assert any(k.startswith("encoder.layers.1.") for k in report["unused_keys"])
    model, _, config = weights.load_model(str(tmp_path / "out"), kind="clip_text")
    assert config.depth == 1
    ids = torch.randint(0, 99, (2, 77), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        ref = hf(input_ids=ids).last_hidden_state.numpy()
    assert relative_error(nnx.jit(lambda m, x: m(x))(model, ids.numpy()), ref) <= INTERMEDIATE_TOLERANCE
    (folder / "config.json").write_text(json.dumps({**settings, "num_hidden_layers": 3}))
    with pytest.raises(KeyError, match=r"missing key 'encoder.layers.2.layer_norm1.weight' \(config.json "
                                       r"num_hidden_layers=3, 2 layers stored\)"):
        convert(["hf_clip_text", f"--checkpoint={folder}", f"--out={tmp_path / 'deeper'}"])
    (folder / "config.json").write_text(json.dumps({**settings, "num_attention_heads": 5}))  # said "num_heads: 5"
    with pytest.raises(ValueError, match=r"config.json num_attention_heads=5 does not divide the width 32"):
        convert(["hf_clip_text", f"--checkpoint={folder}", f"--out={tmp_path / 'five_heads'}"])


@pytest.mark.slow
@pytest.mark.full_size
def test_full_size_clip_vit_l14_text_encoder_matches_transformers(tmp_path):
    # SD v1's text encoder shape (CLIPTextConfig's defaults are ViT-B/32's: 512 wide, 8 heads)
    error = _clip_parity(tmp_path, CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                                  projection_dim=768), seed=1)
    print(f"CLIP ViT-L/14 text relative error {error:.1e}")


@pytest.mark.slow
@pytest.mark.full_size
def test_full_size_hf_blip2_matches_transformers(tmp_path):
    """ViT-g/14 at 224 px and the BERT-base Q-Former (transformers' defaults)."""
    hf = randomize(Blip2ForImageTextRetrieval(Blip2Config(qformer_config=dict(use_qformer_text_input=True))), 3).eval()
    hf.save_pretrained(tmp_path / "hf")
    ref = _hf_reference(hf, batch=1, seed=3)
    ids, mask = _text_inputs(hf.config.qformer_config.vocab_size)
    text_ref = _text_reference(hf, ids, mask)
    del hf
    convert(["hf_blip2", f"--checkpoint={tmp_path / 'hf'}", f"--out={tmp_path / 'out'}"])
    model, config, ours = _ours(tmp_path / "out", ref["pixels"])
    assert config.vit.depth == 39 and config.vit.width == 1408 and config.qformer.num_queries == 32
    errors = _assert_close(ours, ref, ("vit_features", "image_embeds", "queries"))
    errors["text"] = relative_error(model.text_features(ids.numpy(), mask.numpy()), text_ref)
    assert errors["text"] <= INTERMEDIATE_TOLERANCE
    print("full-size hf_blip2 relative errors:", {k: f"{v:.1e}" for k, v in errors.items()})


@pytest.mark.parametrize("part", ["vision_config", "qformer_config"])
def test_a_blip2_activation_other_than_gelu_is_refused_naming_the_key(part, tmp_path):
    """Either part's hidden_act was ignored: quick_gelu in the ViT or relu in the
    Q-Former converted, the image embeddings or the queries then off transformers' by
    3e-3 or 2e-2."""
    settings = {"vision_config": (dict(TINY_VISION, hidden_act="quick_gelu"), TINY_QFORMER),
                "qformer_config": (TINY_VISION, dict(TINY_QFORMER, hidden_act="relu"))}[part]
    Blip2ForImageTextRetrieval(_blip2_config(*settings)).save_pretrained(tmp_path / "hf")
    with pytest.raises(ValueError, match=rf"config.json {part}.hidden_act='(quick_gelu|relu)': expected one of "
                                         r"\['gelu', 'gelu_python'\] \(BLIP-2's exact GELU\)"):
        convert(["hf_blip2", f"--checkpoint={tmp_path / 'hf'}", f"--out={tmp_path / 'out'}"])


def test_a_blip2_vit_without_qkv_biases_converts_to_transformers_features(tmp_path):
    """vision_config.qkv_bias false (no qkv.bias stored) failed with a missing key; it
    now converts with zero q and v biases, as transformers computes without them."""
    hf = randomize(Blip2ForImageTextRetrieval(_blip2_config(dict(TINY_VISION, qkv_bias=False))), 5).eval()
    hf.save_pretrained(tmp_path / "hf")
    ref = _hf_reference(hf, batch=2)
    convert(["hf_blip2", f"--checkpoint={tmp_path / 'hf'}", f"--out={tmp_path / 'out'}"])
    _, _, ours = _ours(tmp_path / "out", ref["pixels"])
    _assert_close(ours, ref, ("vit_features", "image_embeds", "queries"))


def test_a_qformer_depth_not_a_multiple_of_its_cross_attention_frequency_is_refused_naming_it(tmp_path):
    """3 layers with cross_attention_frequency 2 (transformers builds them) failed with
    QFormerConfig's "num_layers 3 must be a multiple of cross_attention_freq 2", naming
    neither the folder nor the Q-Former."""
    qformer = dict(TINY_QFORMER, num_hidden_layers=3, cross_attention_frequency=2)
    Blip2ForImageTextRetrieval(_blip2_config(qformer=qformer)).save_pretrained(tmp_path / "hf")
    with pytest.raises(ValueError, match=r"hf: a Q-Former of 3 layers with cross-attention every 2 \(on layers "
                                         r"\[0, 2\]\): expected a multiple of 2 layers"):
        convert(["hf_blip2", f"--checkpoint={tmp_path / 'hf'}", f"--out={tmp_path / 'out'}"])
