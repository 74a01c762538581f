"""Hugging Face OPT folders of every kind transformers' OPTConfig can save (no biases,
LayerNorms without scale and bias, no final LayerNorm, a separate lm_head, float16
.bin shards), through the CLI, against transformers' logits and its `generate` as a
user calls it (the folder's end and padding ids); and OPT's LayerNorm epsilon, which
the whole-model tests cannot see."""

import json

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import load_file, save_file, save_model
from transformers import OPTConfig, OPTForCausalLM, OPTModel

from parity import INTERMEDIATE_TOLERANCE, relative_error
from sd_fixtures import randomize
from seed_jax.api import SeedOPT
from seed_jax.convert.__main__ import convert, main

pytestmark = pytest.mark.torch

TINY = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
            max_position_embeddings=64)
STEPS = 20
VARIANTS = {  # the OPTConfig fields, and how the folder is saved
    "no_bias": (dict(enable_bias=False), {}),
    "no_affine_post_ln_projected": (dict(layer_norm_elementwise_affine=False, do_layer_norm_before=False,
                                         word_embed_proj_dim=16), {}),
    "no_final_norm": (dict(_remove_final_layer_norm=True), {}),
    "untied_head_projected": (dict(tie_word_embeddings=False, word_embed_proj_dim=16), {}),
    "float16_bin_shards": ({}, dict(half=True, safe_serialization=False, max_shard_size="20KB")),
}


def _save(folder, fields: dict, seed: int = 0, *, half: bool = False, model_class=OPTForCausalLM, **save):
    """A random OPT of `fields` saved to `folder` (in float16 with `half`). transformers 5
    writes safetensors whatever safe_serialization says: with it False, the files are
    rewritten as transformers 4 wrote them (pytorch_model.bin, or shards and their index)."""
    model = randomize(model_class(OPTConfig(**TINY, **fields)), seed)
    (model.half() if half else model).save_pretrained(folder, **save)
    if save.get("safe_serialization") is False:
        _as_torch_files(folder)


def _as_torch_files(folder):
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        index.unlink()
    else:
        weight_map = dict.fromkeys(load_file(folder / "model.safetensors"), "model.safetensors")
    names = {f: "pytorch_" + f.replace(".safetensors", ".bin") for f in set(weight_map.values())}
    for old, new in names.items():
        torch.save(load_file(folder / old), folder / new)
        (folder / old).unlink()
    if len(names) > 1:
        (folder / "pytorch_model.bin.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": {k: names[v] for k, v in weight_map.items()}}))


def _prompts():
    """Three left-padded prompts of 8, 5 and 2 tokens (B,8) and their mask."""
    ids = np.random.default_rng(0).integers(3, 100, (3, 8))
    mask = np.ones_like(ids)
    for row, pad in ((1, 3), (2, 6)):
        ids[row, :pad], mask[row, :pad] = 1, 0
    return ids, mask


@torch.no_grad()
def _transformers_greedy(hf, ids, mask, **options) -> np.ndarray:
    """`generate`'s greedy new tokens (B,T): T is STEPS, or fewer where every row ended
    before (as SeedOPT.generate returns them)."""
    return hf.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), max_new_tokens=STEPS,
                       do_sample=False, num_beams=1, **options).numpy()[:, ids.shape[1]:]


def _convert(folder, out) -> SeedOPT:
    convert(["hf_opt", f"--checkpoint={folder}", f"--out={out}", "--image_tokens=0"])
    return SeedOPT.load(str(out))


def _converted_with_transformers_logits(hf, folder, out) -> SeedOPT:
    """`folder` converted to `out`; asserts its logits on `_prompts()` are `hf`'s."""
    ids, mask = _prompts()
    with torch.no_grad():
        ref = hf(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
    lm = _convert(folder, out)
    real = mask.astype(bool)
    assert relative_error(lm.logits(ids, mask)[real], ref[real]) <= INTERMEDIATE_TOLERANCE
    return lm


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_opt_folder_variant_gives_transformers_logits_and_greedy_tokens(variant, tmp_path):
    """enable_bias=False, layer_norm_elementwise_affine=False and an untied lm_head
    failed with a missing key or "our OPT ties them", _remove_final_layer_norm with
    "not supported"; they now build the model transformers builds."""
    fields, save = VARIANTS[variant]
    _save(tmp_path / "hf", fields, **save)
    hf = OPTForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    lm = _converted_with_transformers_logits(hf, tmp_path / "hf", tmp_path / "export")
    ids, mask = _prompts()
    np.testing.assert_array_equal(lm.generate(ids, STEPS, attention_mask=mask), _transformers_greedy(hf, ids, mask))


def test_an_untied_head_keeps_the_vocabularys_logits_beside_appended_image_tokens(tmp_path):
    """With image tokens appended the vocabulary's logits are still lm_head's (the
    appended ids' output rows are their input rows, as in a tied model)."""
    _save(tmp_path / "hf", dict(tie_word_embeddings=False))
    plain = _convert(tmp_path / "hf", tmp_path / "plain")
    convert(["hf_opt", f"--checkpoint={tmp_path / 'hf'}", f"--out={tmp_path / 'image'}", "--image_tokens=4"])
    extended = SeedOPT.load(str(tmp_path / "image"))
    assert extended.config.total_vocab_size == 106 and extended.model.lm_head[...].shape == (100, 32)
    ids, mask = _prompts()
    real = mask.astype(bool)
    np.testing.assert_allclose(extended.logits(ids, mask)[..., :100][real], plain.logits(ids, mask)[real], atol=1e-5)


def test_a_config_json_without_the_newer_keys_reads_as_transformers_does(tmp_path):
    """The Hub's facebook/opt-* config.json files predate enable_bias and
    layer_norm_elementwise_affine; without them (or the layout keys) the conversion
    takes OPTConfig's defaults, as `from_pretrained` builds the model."""
    _save(tmp_path / "hf", {})
    _set(tmp_path / "hf" / "config.json", **dict.fromkeys(
        ("enable_bias", "layer_norm_elementwise_affine", "_remove_final_layer_norm", "do_layer_norm_before",
         "tie_word_embeddings", "activation_function", "word_embed_proj_dim")))
    hf = OPTForCausalLM.from_pretrained(tmp_path / "hf").eval()
    _converted_with_transformers_logits(hf, tmp_path / "hf", tmp_path / "export")


def test_a_stored_head_that_differs_is_used_as_transformers_does_despite_a_tied_config(tmp_path):
    """transformers (>= 5) ties lm_head to the token embedding only when the folder
    holds no other head: a differing lm_head.weight stays, tie_word_embeddings true
    or not."""
    _save(tmp_path / "hf", {})
    path = tmp_path / "hf" / "model.safetensors"
    state = load_file(path)
    state["lm_head.weight"] = 0.5 * torch.randn(state["model.decoder.embed_tokens.weight"].shape,
                                                generator=torch.Generator().manual_seed(1))
    save_file(state, path, metadata={"format": "pt"})
    hf = OPTForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.tie_word_embeddings and torch.equal(hf.lm_head.weight, state["lm_head.weight"])
    assert not _converted_with_transformers_logits(hf, tmp_path / "hf", tmp_path / "export").config.tie_embeddings


def test_a_tied_embedding_stored_only_as_the_head_is_read_from_it_as_transformers_ties_them(tmp_path):
    """safetensors' save_model keeps the first name of tied tensors, lm_head.weight, and
    drops model.decoder.embed_tokens.weight; transformers ties the embedding to the head
    on loading, the converter failed on the missing embedding."""
    _save(tmp_path / "hf", {})
    model = OPTForCausalLM.from_pretrained(tmp_path / "hf")
    save_model(model, str(tmp_path / "hf" / "model.safetensors"))
    assert "model.decoder.embed_tokens.weight" not in load_file(tmp_path / "hf" / "model.safetensors")
    hf = OPTForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert torch.equal(hf.model.decoder.embed_tokens.weight, model.model.decoder.embed_tokens.weight)
    assert _converted_with_transformers_logits(hf, tmp_path / "hf", tmp_path / "export").config.tie_embeddings


def test_a_folder_without_the_untied_head_it_declares_fails_naming_the_key(tmp_path):
    """An OPTModel folder has no lm_head.weight: with tie_word_embeddings false,
    transformers starts the head at random, which no conversion can match."""
    _save(tmp_path / "hf", dict(tie_word_embeddings=False), model_class=OPTModel)
    with pytest.raises(ValueError, match="config.json tie_word_embeddings=false, but the folder holds no lm_head"):
        convert(["hf_opt", f"--checkpoint={tmp_path / 'hf'}", f"--out={tmp_path / 'export'}", "--image_tokens=0"])


def test_the_opt_of_a_blip2_folder_converts_to_its_language_models_logits(tmp_path):
    """A Blip2ForConditionalGeneration folder (keys language_model.model.decoder.*,
    the OPT settings in config.json's text_config) failed with a missing
    'model.decoder.embed_tokens.weight'; its OPT now converts, an untied head too."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    config = Blip2Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14),
        qformer_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                            encoder_hidden_size=32, vocab_size=100),
        text_config=OPTConfig(**TINY, tie_word_embeddings=False, do_layer_norm_before=False,
                              word_embed_proj_dim=16).to_dict(),
        num_query_tokens=4)
    blip2 = randomize(Blip2ForConditionalGeneration(config), 0).eval()
    blip2.save_pretrained(tmp_path / "blip2")
    lm = _converted_with_transformers_logits(blip2.language_model, tmp_path / "blip2", tmp_path / "out")
    assert not lm.model.config.tie_embeddings and lm.model.config.embed_width == 16
    report = json.loads((tmp_path / "out" / "model.json").read_text())["info"]
    assert any(k.startswith("vision_model.") for k in report["unused_keys"])


def _set(path, **entries):
    """Writes `entries` into the JSON file at `path` (None: removes the key)."""
    settings = json.loads(path.read_text())
    settings.update(entries)
    path.write_text(json.dumps({k: v for k, v in settings.items() if v is not None}))


def test_depth_is_config_jsons_num_hidden_layers_as_transformers_builds_it(tmp_path):
    """transformers builds num_hidden_layers layers and leaves stored ones beyond them
    unused; the converter built every stored layer, another model. Fewer stored
    layers than configured fail naming the first missing key."""
    _save(tmp_path / "hf", {})  # 2 layers
    _set(tmp_path / "hf" / "config.json", num_hidden_layers=1)
    hf = OPTForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert len(hf.model.decoder.layers) == 1
    assert _converted_with_transformers_logits(hf, tmp_path / "hf", tmp_path / "export").config.depth == 1
    _set(tmp_path / "hf" / "config.json", num_hidden_layers=3)
    with pytest.raises(KeyError, match=r"missing key 'model.decoder.layers.2.fc1.weight' \(config.json "
                                       r"num_hidden_layers=3, 2 layers stored\)"):
        convert(["hf_opt", f"--checkpoint={tmp_path / 'hf'}", f"--out={tmp_path / 'deeper'}", "--image_tokens=0"])
    _set(tmp_path / "hf" / "config.json", num_hidden_layers=2, num_attention_heads=5)  # said "num_heads: 5"
    with pytest.raises(ValueError, match=r"config.json num_attention_heads=5 does not divide the width 32"):
        convert(["hf_opt", f"--checkpoint={tmp_path / 'hf'}", f"--out={tmp_path / 'five'}", "--image_tokens=0"])


def test_a_weight_of_another_rank_fails_naming_its_key(tmp_path):
    """A token embedding stored flat failed unpacking its shape: "not enough values to
    unpack", no key named."""
    _save(tmp_path / "hf", {})
    path = tmp_path / "hf" / "model.safetensors"
    state = load_file(path)
    state["model.decoder.embed_tokens.weight"] = state["model.decoder.embed_tokens.weight"].flatten()
    save_file(state, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"'model.decoder.embed_tokens.weight' \(token embedding\) has shape "
                                         r"\(\d+,\), expected 2 dimensions"):
        convert(["hf_opt", f"--checkpoint={tmp_path / 'hf'}", f"--out={tmp_path / 'export'}", "--image_tokens=0"])


def test_generate_ends_and_pads_rows_as_transformers_generate(tmp_path):
    """transformers' `generate` ends a row at the folder's eos_token_id and pads it
    with its pad_token_id (generation_config.json, else config.json, where an absent
    key is no end token); SeedOPT.generate ran on past the end token unless given
    eos_id, so with a small vocabulary its greedy tokens differed from transformers'."""
    folder = tmp_path / "hf"
    _save(folder, {})
    ids, mask = _prompts()
    hf = OPTForCausalLM.from_pretrained(folder).eval()
    endless = _transformers_greedy(hf, ids, mask, eos_token_id=None)
    eos = int(endless[1, 3])  # a token the middle row emits at its fourth step: it ends there
    _set(folder / "generation_config.json", eos_token_id=eos, pad_token_id=0)
    hf = OPTForCausalLM.from_pretrained(folder).eval()
    ref = _transformers_greedy(hf, ids, mask)
    assert (ref[1, 4:] == 0).all() and not np.array_equal(ref, endless)
    np.testing.assert_array_equal(_convert(folder, tmp_path / "generation_config").generate(
        ids, STEPS, attention_mask=mask), ref)

    (folder / "generation_config.json").unlink()  # as the Hub's OPTModel folders: config.json's ids
    _set(folder / "config.json", eos_token_id=eos, pad_token_id=0)
    hf = OPTForCausalLM.from_pretrained(folder).eval()
    np.testing.assert_array_equal(_transformers_greedy(hf, ids, mask), ref)
    lm = _convert(folder, tmp_path / "config")
    np.testing.assert_array_equal(lm.generate(ids, STEPS, attention_mask=mask), ref)
    np.testing.assert_array_equal(lm.generate(ids, STEPS, attention_mask=mask, eos_id=None), endless)

    _set(folder / "config.json", eos_token_id=None, pad_token_id=None)
    hf = OPTForCausalLM.from_pretrained(folder).eval()
    np.testing.assert_array_equal(_transformers_greedy(hf, ids, mask), endless)
    np.testing.assert_array_equal(_convert(folder, tmp_path / "no_ids").generate(ids, STEPS, attention_mask=mask),
                                  endless)


def test_several_end_tokens_must_be_chosen_from(tmp_path):
    """An eos_token_id list (transformers ends at any of them) is recorded; generate
    ends at one, so it asks which rather than ending at none."""
    folder = tmp_path / "hf"
    _save(folder, {})
    _set(folder / "generation_config.json", eos_token_id=[2, 5])
    lm = _convert(folder, tmp_path / "export")
    assert lm.eos_id == [2, 5]
    with pytest.raises(ValueError, match=r"eos_id: generate ends rows at one token, got \[2, 5\]"):
        lm.generate(np.full((1, 3), 7), 2)
    assert lm.generate(np.full((1, 3), 7), 2, eos_id=5).shape == (1, 2)


def test_generation_settings_the_folder_sets_are_recorded_and_printed_as_not_applied(tmp_path, capsys):
    """transformers' `generate()` decodes with generation_config.json's settings (else
    config.json's); SeedOPT.generate only with its arguments. A folder sampling with
    top_p and a repetition penalty converted without a word: those settings (not the
    ones at their defaults, nor the ids and bookkeeping) are now recorded and printed,
    with the arguments that match them. Sampling settings of a folder that does not
    sample are read by neither, and go unlisted."""
    folder = tmp_path / "hf"
    _save(folder, {})
    settings = dict(do_sample=True, top_p=0.9, repetition_penalty=1.2)
    _set(folder / "generation_config.json", **settings, top_k=50, temperature=1.0, max_length=None)
    _set(folder / "config.json", num_beams=4)  # unread beside generation_config.json
    loaded = OPTForCausalLM.from_pretrained(folder).generation_config
    assert {k: getattr(loaded, k) for k in [*settings, "num_beams"]} == {**settings, "num_beams": None}
    assert main(["hf_opt", f"--checkpoint={folder}", f"--out={tmp_path / 'export'}", "--image_tokens=0"]) == 0
    info = json.loads((tmp_path / "export" / "model.json").read_text())["info"]
    assert info["generation_settings_not_applied"] == settings
    out = capsys.readouterr().out
    assert ("3 generation settings of the folder not applied (transformers' generate() applies them):\n"
            "  do_sample: true\n  top_p: 0.9\n  repetition_penalty: 1.2\n"
            "SeedOPT.generate takes decoding settings only from its arguments; to match these, pass "
            "temperature > 0 (do_sample), top_p; none matches repetition_penalty\n") in out

    (folder / "generation_config.json").unlink()  # config.json's are read then
    _set(folder / "config.json", top_p=0.7, temperature=0.5)  # read only when sampling: greedy here
    assert OPTForCausalLM.from_pretrained(folder).generation_config.num_beams == 4
    report = convert(["hf_opt", f"--checkpoint={folder}", f"--out={tmp_path / 'config'}", "--image_tokens=0"])
    assert report["generation_settings_not_applied"] == {"num_beams": 4}


def test_a_folder_with_default_generation_settings_records_none(tmp_path, capsys):
    """save_pretrained writes generation_config.json with the ids and bookkeeping
    (output_attentions: false among them), none of them a setting left unapplied."""
    _save(tmp_path / "hf", {})
    assert main(["hf_opt", f"--checkpoint={tmp_path / 'hf'}", f"--out={tmp_path / 'export'}", "--image_tokens=0"]) == 0
    info = json.loads((tmp_path / "export" / "model.json").read_text())["info"]
    assert info["generation_settings_not_applied"] == {}
    assert "generation settings" not in capsys.readouterr().out


EPSILON_TOLERANCE = 1e-5  # float32 noise here is ~1e-7; OPT's 1e-5 read as 1e-6 gives ~1


@torch.no_grad()
def test_layer_norms_use_opts_epsilon(tmp_path):
    """OPT's LayerNorms (torch's default eps 1e-5) moved the parity tests' logits by
    less than INTERMEDIATE_TOLERANCE at 1e-6. Here each LayerNorm of the converted
    model (a decoder layer's two, the final one) reads rows of variance ~1e-6, near
    the epsilon, against transformers' at 1e-5, and so does the whole model, whose
    token and position rows are scaled to that variance."""
    folder = tmp_path / "hf"
    hf = randomize(OPTForCausalLM(OPTConfig(**TINY)), 0).eval()
    for table in (hf.model.decoder.embed_tokens.weight, hf.model.decoder.embed_positions.weight):
        table.mul_(5e-3)
    hf.save_pretrained(folder)
    model = _convert(folder, tmp_path / "export").model
    graphdef, state = nnx.split(model.layers)
    first = nnx.merge(graphdef, jax.tree.map(lambda stacked: stacked[0], state))
    x = 1e-3 * torch.randn(2, 5, TINY["hidden_size"], generator=torch.Generator().manual_seed(0))
    decoder = hf.model.decoder
    pairs = {"self_attn_layer_norm": (first.self_attn_layer_norm, decoder.layers[0].self_attn_layer_norm),
             "layer final_layer_norm": (first.final_layer_norm, decoder.layers[0].final_layer_norm),
             "final_layer_norm": (model.final_layer_norm, decoder.final_layer_norm)}
    errors = {name: relative_error(ours(x.numpy()), theirs(x).numpy()) for name, (ours, theirs) in pairs.items()}
    ids, mask = _prompts()
    real = mask.astype(bool)
    ref = hf(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
    errors["logits"] = relative_error(np.asarray(model(ids, mask)[0])[real], ref[real])
    wrong = {name: f"{error:.1e}" for name, error in errors.items() if error > EPSILON_TOLERANCE}
    assert not wrong, f"relative errors over {EPSILON_TOLERANCE}: {wrong}"
