"""SEED v1 release layout -> `python -m seed_jax.convert seed_v1` -> SeedTokenizer,
against our PyTorch re-statement of the reference with the same random weights."""

import dataclasses
import gc
import os
import re
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from parity import INTERMEDIATE_TOLERANCE, assert_codes_match, relative_error
from seed_jax import weights
from seed_jax.api import INTERMEDIATES, SeedTokenizer
from seed_jax.convert import __main__ as convert_cli
from seed_jax.convert.__main__ import convert
from seed_jax.convert.__main__ import main as convert_main
from seed_jax.torch_reference.seed_v1 import TINY, ReferenceConfig, SeedV1Reference, randomize

pytestmark = pytest.mark.torch


def _heads(c: ReferenceConfig) -> list[str]:
    return [f"--vit_heads={c.vit_heads}", f"--qformer_heads={c.qformer_heads}", f"--blocks_heads={c.blocks_heads}"]


def _reference(c: ReferenceConfig, batch: int, seed: int = 0):
    """(state dict, pixels NHWC, reference outputs) with random weights."""
    torch.manual_seed(seed)
    model = randomize(SeedV1Reference(c), seed).eval()
    pixels = torch.randn(batch, 3, c.image_size, c.image_size, generator=torch.Generator().manual_seed(seed + 1))
    ref = {k: v.numpy() for k, v in model.encode(pixels).items()}
    ref["generation"] = model.embed_codes(torch.from_numpy(ref["codes"])).numpy()
    return model.state_dict(), pixels.permute(0, 2, 3, 1).numpy(), ref


def _compare(tokenizer: SeedTokenizer, pixels, ref) -> dict[str, float]:
    out = tokenizer.encode(pixels, return_intermediates=True)
    assert set(out) == set(INTERMEDIATES)
    errors = {k: relative_error(out[k], ref[k]) for k in INTERMEDIATES if k != "codes"}
    assert_codes_match(out["codes"], ref["codes"], ref["distances"])
    assert np.asarray(out["codes"]).dtype == np.int32
    errors["generation"] = relative_error(tokenizer.embed_codes(ref["codes"]), ref["generation"])
    for name, error in errors.items():
        assert error <= INTERMEDIATE_TOLERANCE, f"{name}: relative error {error:.2e}"
    return errors


def test_tiny_release_checkpoint_matches_the_reference(tmp_path):
    state, pixels, ref = _reference(TINY, batch=3)
    torch.save({"model": state}, tmp_path / "seed_tokenizer.pth")
    assert convert_main(["seed_v1", f"--checkpoint={tmp_path / 'seed_tokenizer.pth'}",
                         f"--out={tmp_path / 'out'}", *_heads(TINY)]) == 0
    tokenizer = SeedTokenizer.load(str(tmp_path / "out"), batch_size=2)  # 3 images: a full and a padded chunk
    errors = _compare(tokenizer, pixels, ref)
    print("tiny seed_v1 relative errors:", {k: f"{v:.1e}" for k, v in errors.items()})


def test_checkpoint_and_out_under_the_home_directory(tmp_path, monkeypatch):
    """--checkpoint=~/x and --out=~/y (a shell leaves a ~ after = as it is) named a folder
    "~" in the current directory; `~` is now the home directory."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    torch.save({"model": _reference(TINY, batch=1)[0]}, tmp_path / "seed_tokenizer.pth")
    assert convert_main(["seed_v1", "--checkpoint=~/seed_tokenizer.pth", "--out=~/out", *_heads(TINY)]) == 0
    assert os.path.isfile(tmp_path / "out" / "model.json") and not os.path.exists(tmp_path / "~")


def test_a_checkpoint_with_the_reconstruction_head_converts_it(tmp_path):
    """SEED's training model also holds `pos_embed` + `blocks.N.*`, the stage-II head
    that rebuilds the causal embeddings from the codes: it converts with the rest."""
    c = dataclasses.replace(TINY, recon_head=True)
    torch.manual_seed(0)
    model = randomize(SeedV1Reference(c), 0).eval()
    codes = torch.randint(0, c.num_codes, (2, c.num_queries), generator=torch.Generator().manual_seed(1))
    state = model.state_dict()
    torch.save({"model": state}, tmp_path / "seed_tokenizer.pth")
    report = convert(["seed_v1", f"--checkpoint={tmp_path / 'seed_tokenizer.pth'}", f"--out={tmp_path / 'out'}",
                      *_heads(c)])
    assert [k for k in report["unused_keys"] if k.startswith(("pos_embed", "blocks."))] == []
    tokenizer = SeedTokenizer.load(str(tmp_path / "out"))
    assert tokenizer.config.recon_head
    ours = tokenizer.model.reconstruct(tokenizer.model.quantize.lookup(jnp.asarray(codes.numpy())))
    assert relative_error(ours, model.reconstruct(codes).numpy()) <= INTERMEDIATE_TOLERANCE
    state = {k: v for k, v in state.items() if not k.startswith("blocks.1.")}
    torch.save({"model": state}, tmp_path / "gap.pth")
    with pytest.raises(KeyError, match="reconstruction head .* has 1 blocks"):
        convert(["seed_v1", f"--checkpoint={tmp_path / 'gap.pth'}", f"--out={tmp_path / 'gap'}", *_heads(c)])


QUIRK_TOLERANCE = 1e-5  # float32 noise here is < 1e-6; a wrong epsilon gives > 0.1, tanh GELU > 1e-4


def _through(blocks, x: torch.Tensor) -> np.ndarray:
    for block in blocks:
        x = block(x)
    return x.numpy()


@torch.no_grad()
def test_epsilons_and_exact_gelu_match_the_reference_where_they_show(tmp_path):
    """DESIGN's LayerNorm epsilons (EVA blocks 1e-6, ln_vision 1e-5, both Q-Formers
    1e-12, blocks_text 1e-6) and exact (erf) GELU move whole-model outputs by less than
    INTERMEDIATE_TOLERANCE: a reference with ln_vision at 1e-6, BERT at 1e-5 or tanh
    GELU in the ViT still passed the tests above. Here each converted module reads inputs
    whose variance is near its epsilon (a wrong one is then an O(1) error), and GELU
    inputs of unit scale (tanh's differs by ~1e-4)."""
    c = TINY
    torch.manual_seed(0)
    ref = randomize(SeedV1Reference(c), 0).eval()
    torch.save({"model": ref.state_dict()}, tmp_path / "seed_tokenizer.pth")
    convert(["seed_v1", f"--checkpoint={tmp_path / 'seed_tokenizer.pth'}", f"--out={tmp_path / 'out'}",
             *_heads(c)])
    ours = SeedTokenizer.load(str(tmp_path / "out")).model
    g = torch.Generator().manual_seed(1)
    tiny_vit_tokens = 1e-3 * torch.randn(2, 1 + (c.image_size // c.patch_size) ** 2, c.vit_width, generator=g)
    tiny_queries = 1e-4 * torch.randn(1, c.num_queries, c.width, generator=g)
    tiny_reverse = 1e-4 * torch.randn(1, c.reverse_queries, c.width, generator=g)
    image = torch.randn(2, tiny_vit_tokens.shape[1], c.vit_width, generator=g)
    codes_up = 1e-3 * torch.randn(2, c.num_queries, c.width, generator=g)
    ours.qformer.query_tokens[...] = jnp.asarray(tiny_queries[0].numpy())
    ours.reverse_qformer.query_tokens[...] = jnp.asarray(tiny_reverse[0].numpy())
    errors = {
        "ln_vision": relative_error(ours.ln_vision(tiny_vit_tokens.numpy()), ref.ln_vision(tiny_vit_tokens).numpy()),
        "vit blocks": relative_error(ours.visual_encoder.blocks(tiny_vit_tokens.numpy()),
                                     _through(ref.visual_encoder.blocks, tiny_vit_tokens)),
        "causal qformer": relative_error(ours.qformer.queries(image.numpy()),
                                         ref.Qformer.bert(tiny_queries.expand(2, -1, -1), image, causal=True).numpy()),
        "blocks_text": relative_error(ours.blocks_text(codes_up.numpy()), _through(ref.blocks_text, codes_up)),
        "reverse qformer": relative_error(
            ours.reverse_qformer.queries(codes_up.numpy()),
            ref.Reverse_Qformer.bert(tiny_reverse.expand(2, -1, -1), codes_up, causal=False).numpy()),
    }
    wrong = {name: f"{error:.1e}" for name, error in errors.items() if error > QUIRK_TOLERANCE}
    assert not wrong, f"relative errors over {QUIRK_TOLERANCE}: {wrong}"


def _with_extra_vit_blocks(vit: dict, depth: int) -> dict:
    """The ViT state dict (keys `blocks.N.*`) grown to `depth` blocks, copies of its last plus one."""
    last = max(int(k.split(".")[1]) for k in vit if k.startswith("blocks."))
    extra = {k.replace(f"blocks.{last}.", f"blocks.{i}.", 1): v + 1 for k, v in vit.items()
             if k.startswith(f"blocks.{last}.") for i in range(last + 1, depth)}
    return {**vit, **extra}


def test_split_release_files_convert_like_one_file(tmp_path, capsys):
    """ViT from LAVIS's eva_vit_g.pth (no prefix), Q-Former from causal_qformer.pth,
    the rest from seed_tokenizer.pth; the main file wins where keys overlap. The ViT
    file is in torch's legacy (pre-zip) format, which cannot be memory-mapped; it holds
    one block more than --vit_depth builds (as eva_vit_g.pth's 40 for 39), left unused."""
    state, pixels, ref = _reference(TINY, batch=2, seed=3)
    vit = {k[len("visual_encoder."):]: v for k, v in state.items() if k.startswith("visual_encoder.")}
    vit = _with_extra_vit_blocks(vit, TINY.vit_depth + 1)
    qformer = {k: v for k, v in state.items() if k.startswith("Qformer.") or k == "query_tokens"}
    main = {k: v for k, v in state.items() if not k.startswith("visual_encoder.") and k not in qformer}
    main["ln_vision.weight"] = state["ln_vision.weight"]
    qformer["ln_vision.weight"] = torch.zeros_like(state["ln_vision.weight"])  # overridden by the main file
    for name, d in (("seed_tokenizer", main), ("causal_qformer", qformer), ("eva_vit_g", vit)):
        torch.save({"model": d} if name != "eva_vit_g" else d, tmp_path / f"{name}.pth",
                   _use_new_zipfile_serialization=name != "eva_vit_g")
    assert convert_main(["seed_v1", f"--checkpoint={tmp_path / 'seed_tokenizer.pth'}",
                         f"--qformer={tmp_path / 'causal_qformer.pth'}", f"--vit={tmp_path / 'eva_vit_g.pth'}",
                         f"--out={tmp_path / 'out'}", *_heads(TINY), f"--vit_depth={TINY.vit_depth}"]) == 0
    assert f"visual_encoder.blocks.{TINY.vit_depth}.mlp.fc1.weight" in capsys.readouterr().out
    _compare(SeedTokenizer.load(str(tmp_path / "out")), pixels, ref)
    deeper = TINY.vit_depth + 2  # one block more than the file holds
    assert convert_main(["seed_v1", f"--checkpoint={tmp_path / 'seed_tokenizer.pth'}",
                         f"--qformer={tmp_path / 'causal_qformer.pth'}", f"--vit={tmp_path / 'eva_vit_g.pth'}",
                         f"--out={tmp_path / 'deeper'}", *_heads(TINY), f"--vit_depth={deeper}"]) != 0
    assert (f"missing key 'visual_encoder.blocks.{deeper - 1}.norm1.weight' (--vit_depth={deeper}, "
            f"{deeper - 1} layers stored)") in capsys.readouterr().err


def test_a_vit_file_converts_with_or_without_the_visual_encoder_prefix(tmp_path, capsys):
    """A --vit file whose keys already carry `visual_encoder.` (a ViT saved from a whole model)
    got the prefix twice, and the conversion failed on a missing ViT key. Both forms now convert
    alike, and as the reference; a file mixing them fails naming a key of each."""
    state, pixels, ref = _reference(TINY, batch=2, seed=4)
    prefix = "visual_encoder."
    main = {k: v for k, v in state.items() if not k.startswith(prefix)}
    torch.save({"model": main}, tmp_path / "seed_tokenizer.pth")
    prefixed = {k: v for k, v in state.items() if k.startswith(prefix)}
    bare = {k[len(prefix):]: v for k, v in prefixed.items()}
    first_prefixed, *_ = prefixed
    _, first_bare, *_ = bare
    mixed = {first_prefixed: prefixed[first_prefixed],
             **{k: v for k, v in bare.items() if prefix + k != first_prefixed}}
    for name, vit in (("bare", bare), ("prefixed", prefixed), ("mixed", mixed)):
        torch.save(vit, tmp_path / f"{name}.pth")

    def run(name):
        return convert_main(["seed_v1", f"--checkpoint={tmp_path / 'seed_tokenizer.pth'}",
                             f"--vit={tmp_path / f'{name}.pth'}", f"--out={tmp_path / name / 'out'}", *_heads(TINY),
                             f"--vit_depth={TINY.vit_depth}"])

    assert run("bare") == 0 and run("prefixed") == 0, capsys.readouterr().err
    assert "visual_encoder.visual_encoder." not in capsys.readouterr().out
    _compare(SeedTokenizer.load(str(tmp_path / "prefixed" / "out")), pixels, ref)
    from_bare = weights.load_params(str(tmp_path / "bare" / "out"))
    for name, value in weights.load_params(str(tmp_path / "prefixed" / "out")).items():
        np.testing.assert_array_equal(value, from_bare[name], err_msg=name)
    assert run("mixed") != 0
    err = capsys.readouterr().err
    assert "--vit: expected every key with the 'visual_encoder.' prefix or none" in err
    assert repr(first_prefixed) in err and repr(first_bare) in err
    assert not os.path.exists(tmp_path / "mixed" / "out" / "params")


def _lavis_runner_save(state: dict, path) -> None:
    """What SEED's LAVIS runner (`SEED_Tokenizer/lavis/runners/runner_base.py`) writes: the
    model state dict beside the optimizer, the config as plain containers, the scaler and
    the epoch."""
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
    torch.save({"model": state, "optimizer": optimizer.state_dict(), "config": {"run": {"init_lr": 1e-4}},
                "scaler": None, "epoch": 9}, path)


def test_files_as_the_reference_training_saves_them_convert(tmp_path):
    """The runner drops frozen parameters but keeps buffers: stage II's seed_tokenizer.pth
    lacks the ViT, ln_vision, the Q-Former and its query tokens (only the Q-Formers'
    position_ids buffers remain); stage I's causal_qformer.pth lacks the ViT but holds
    ln_vision, the Q-Former's text parts (word and position embeddings, the text
    feed-forward, the tied MLM decoder) and the contrastive heads; LAVIS's eva_vit_g.pth
    is a bare fp16 state dict with one block more than is built."""
    c = TINY
    torch.manual_seed(0)
    ref = randomize(SeedV1Reference(c), 0).eval()
    state = ref.state_dict()
    g = torch.Generator().manual_seed(1)
    vit = _with_extra_vit_blocks({k[len("visual_encoder."):]: v.half() for k, v in state.items()
                                  if k.startswith("visual_encoder.")}, c.vit_depth + 1)
    torch.save(vit, tmp_path / "eva_vit_g.pth")
    stage1 = {k: v for k, v in state.items() if k.startswith(("Qformer.", "ln_vision.")) or k == "query_tokens"}
    text = {"embeddings.word_embeddings.weight": (30, c.width), "embeddings.position_embeddings.weight": (8, c.width)}
    for i in range(c.qformer_layers):
        text.update({f"encoder.layer.{i}.intermediate.dense.weight": (c.qformer_mlp, c.width),
                     f"encoder.layer.{i}.intermediate.dense.bias": (c.qformer_mlp,),
                     f"encoder.layer.{i}.output.dense.weight": (c.width, c.qformer_mlp),
                     f"encoder.layer.{i}.output.dense.bias": (c.width,),
                     f"encoder.layer.{i}.output.LayerNorm.weight": (c.width,),
                     f"encoder.layer.{i}.output.LayerNorm.bias": (c.width,)})
    stage1.update({f"Qformer.bert.{k}": torch.randn(shape, generator=g) for k, shape in text.items()})
    stage1["Qformer.cls.predictions.decoder.weight"] = stage1["Qformer.bert.embeddings.word_embeddings.weight"]
    stage1.update({f"{n}_proj.{p}": torch.randn((16, c.width) if p == "weight" else (16,), generator=g)
                   for n in ("vision", "text") for p in ("weight", "bias")})
    stage1["temp"] = torch.tensor(0.07)
    _lavis_runner_save(stage1, tmp_path / "causal_qformer.pth")
    frozen = ("visual_encoder.", "ln_vision.", "Qformer.bert.encoder.", "Qformer.bert.embeddings.LayerNorm.")
    _lavis_runner_save({k: v for k, v in state.items() if not k.startswith(frozen) and k != "query_tokens"},
                       tmp_path / "seed_tokenizer.pth")

    report = convert(["seed_v1", f"--checkpoint={tmp_path / 'seed_tokenizer.pth'}",
                      f"--qformer={tmp_path / 'causal_qformer.pth'}", f"--vit={tmp_path / 'eva_vit_g.pth'}",
                      f"--out={tmp_path / 'out'}", *_heads(c), f"--vit_depth={c.vit_depth}"])
    assert report["overridden_by_checkpoint"] == ["Qformer.bert.embeddings.position_ids"]
    assert not [k for k in report["unused_keys"] if not k.startswith(
        (f"visual_encoder.blocks.{c.vit_depth}.", "Qformer.cls.")) and not k.endswith("position_ids")]
    tokenizer = SeedTokenizer.load(str(tmp_path / "out"))
    assert tokenizer.config.qformer.with_text and tokenizer.config.with_itc_heads
    ref.visual_encoder.load_state_dict({k: v.float() for k, v in vit.items()
                                        if not k.startswith(f"blocks.{c.vit_depth}.")})  # the fp16 weights LAVIS loads
    pixels = torch.randn(2, 3, c.image_size, c.image_size, generator=g)
    with torch.no_grad():
        expected = {k: v.numpy() for k, v in ref.encode(pixels).items()}
        expected["generation"] = ref.embed_codes(torch.from_numpy(expected["codes"])).numpy()
    _compare(tokenizer, pixels.permute(0, 2, 3, 1).numpy(), expected)


def _training_names(key: str) -> str:
    """A release key under the name SEED's training model (blip2_codebook_all_image) gives it."""
    if key == "reverse_tokens":
        return "reverse_tokens_text"
    return "Reverse_Qformer_text." + key[len("Reverse_Qformer."):] if key.startswith("Reverse_Qformer.") else key


@pytest.mark.parametrize("with_image_distillation", [False, True])
def test_a_checkpoint_with_the_training_models_names_converts_as_the_release(tmp_path, with_image_distillation):
    """SEED's training model names the text-space reverse Q-Former Reverse_Qformer_text /
    reverse_tokens_text: a checkpoint it wrote failed on a missing 'reverse_tokens'. With
    image distillation on too, Reverse_Qformer / reverse_tokens is the image one (a
    single query), which the converter took for the text one."""
    state, pixels, ref = _reference(TINY, batch=2, seed=5)
    trained = {_training_names(k): v for k, v in state.items()}
    if with_image_distillation:
        trained.update({k: v.clone() for k, v in state.items() if k.startswith("Reverse_Qformer.")})
        trained["reverse_tokens"] = state["reverse_tokens"][:, :1].clone()
        trained["distill_image_proj.weight"] = torch.zeros(8, state["distill_text_proj.weight"].shape[1])
    torch.save({"model": trained}, tmp_path / "checkpoint_9.pth")
    report = convert(["seed_v1", f"--checkpoint={tmp_path / 'checkpoint_9.pth'}", f"--out={tmp_path / 'out'}",
                      *_heads(TINY)])
    _compare(SeedTokenizer.load(str(tmp_path / "out")), pixels, ref)
    image_side = {k for k in report["unused_keys"] if k.startswith(("reverse_tokens_image", "Reverse_Qformer_image."))}
    assert ("reverse_tokens_image" in image_side) == with_image_distillation


def test_vit_depth_is_the_references_39_or_the_main_checkpoints(tmp_path):
    """A ViT from a 40-block eva_vit_g.pth alone builds 39 blocks, as LAVIS's
    create_eva_vit_g; ViT blocks in the main checkpoint set the depth; a missing
    middle block fails naming it."""
    state, _, _ = _reference(TINY, batch=1)
    vit = {k[len("visual_encoder."):]: v for k, v in state.items() if k.startswith("visual_encoder.")}
    torch.save(_with_extra_vit_blocks(vit, 40), tmp_path / "eva_vit_g.pth")
    torch.save({"model": {k: v for k, v in state.items() if not k.startswith("visual_encoder.")}},
               tmp_path / "seed_tokenizer.pth")
    report = convert(["seed_v1", f"--checkpoint={tmp_path / 'seed_tokenizer.pth'}",
                      f"--vit={tmp_path / 'eva_vit_g.pth'}", f"--out={tmp_path / 'a'}", *_heads(TINY)])
    assert weights.read_config(str(tmp_path / "a"))[1].vit.depth == 39
    assert {k for k in report["unused_keys"] if "blocks." in k} == {f"visual_encoder.blocks.39.{k[len('blocks.0.'):]}"
                                                                    for k in vit if k.startswith("blocks.0.")}

    torch.save({"model": state}, tmp_path / "full.pth")  # its own TINY.vit_depth blocks win over 40 in --vit
    convert(["seed_v1", f"--checkpoint={tmp_path / 'full.pth'}", f"--vit={tmp_path / 'eva_vit_g.pth'}",
             f"--out={tmp_path / 'b'}", *_heads(TINY)])
    assert weights.read_config(str(tmp_path / "b"))[1].vit.depth == TINY.vit_depth

    gap = {k: v for k, v in state.items() if not k.startswith("visual_encoder.blocks.0.")}
    torch.save({"model": gap}, tmp_path / "gap.pth")
    with pytest.raises(KeyError, match=r"missing key 'visual_encoder.blocks.0.norm1.weight', though layer 1"):
        convert(["seed_v1", f"--checkpoint={tmp_path / 'gap.pth'}", f"--out={tmp_path / 'c'}", *_heads(TINY)])


@pytest.mark.parametrize("layout", ["seed_v1", "lavis_blip2"])
def test_a_checkpoint_without_the_vit_fails_saying_to_give_vit(layout, tmp_path, capsys):
    """A checkpoint without its frozen ViT (the training runner's, blip2_pretrained.pth) given
    alone failed on a missing ViT key of a source named "(with --vit)", --vit not given."""
    state, _, _ = _reference(TINY, batch=1)
    torch.save({"model": {k: v for k, v in state.items() if not k.startswith("visual_encoder.")}},
               tmp_path / "no_vit.pth")
    assert convert_main([layout, f"--checkpoint={tmp_path / 'no_vit.pth'}", f"--out={tmp_path / 'o'}"]) == 1
    assert (f"checkpoint {tmp_path / 'no_vit.pth'}: missing key 'visual_encoder.patch_embed.proj.weight' (no ViT): "
            "give LAVIS's eva_vit_g.pth with --vit") in capsys.readouterr().err


def test_missing_key_fails_naming_it_and_unused_keys_are_listed(tmp_path, capsys):
    state, _, _ = _reference(TINY, batch=1)
    state = dict(state)
    del state["blocks_text.1.attn.proj.weight"]
    torch.save({"model": state}, tmp_path / "broken.pth")
    assert convert_main(["seed_v1", f"--checkpoint={tmp_path / 'broken.pth'}", f"--out={tmp_path / 'a'}",
                         *_heads(TINY)]) == 1
    err = capsys.readouterr().err
    assert "blocks_text.1.attn.proj.weight" in err and "blocks_text.blocks.attn.out" in err
    assert not os.path.exists(tmp_path / "a" / "params")

    state["blocks_text.1.attn.proj.weight"] = torch.zeros(TINY.width, TINY.width)
    state["Qformer.cls.predictions.bias"] = torch.zeros(5)
    torch.save({"model": state}, tmp_path / "extra.pth")
    assert convert_main(["seed_v1", f"--checkpoint={tmp_path / 'extra.pth'}", f"--out={tmp_path / 'b'}",
                         *_heads(TINY)]) == 0
    out = capsys.readouterr().out
    assert "Qformer.cls.predictions.bias" in out and "Qformer.bert.embeddings.position_ids" in out

    state["ln_vision.weight"] = torch.zeros(7)  # of another shape than the model's: the key is named
    torch.save({"model": state}, tmp_path / "misfit.pth")
    assert convert_main(["seed_v1", f"--checkpoint={tmp_path / 'misfit.pth'}", f"--out={tmp_path / 'c'}",
                         *_heads(TINY)]) == 1
    assert f"ln_vision.scale: converting ln_vision.weight (7,) gives shape (7,); the model's is ({TINY.vit_width},)" \
        in capsys.readouterr().err


def test_a_seed2_checkpoint_is_named_as_such(tmp_path, capsys):
    """SEED-LLaMA's seed_quantizer.pt (a bare state dict) shares the encoder side but
    decodes the codes to one unCLIP image embedding (blocks_image, image_down,
    distill_image_proj) and has no reverse Q-Former: its conversion failed on
    'reverse_tokens', as if a v1 file had lost keys."""
    state, _, _ = _reference(TINY, batch=1)
    seed2 = {k: v for k, v in state.items()
             if not k.startswith(("blocks_text.", "pos_embed_text", "Reverse_Qformer.", "reverse_tokens",
                                  "distill_text_proj."))}
    seed2.update({k.replace("blocks_text.", "blocks_image.", 1): v for k, v in state.items()
                  if k.startswith("blocks_text.")})
    seed2.update({"pos_embed_image": state["pos_embed_text"], "image_down.0.weight": torch.zeros(16, TINY.width),
                  "distill_image_proj.weight": torch.zeros(1024, TINY.num_queries * 4),
                  "distill_image_proj.bias": torch.zeros(1024)})
    torch.save(seed2, tmp_path / "seed_quantizer.pt")
    assert convert_main(["seed_v1", f"--checkpoint={tmp_path / 'seed_quantizer.pt'}", f"--out={tmp_path / 'o'}",
                         *_heads(TINY)]) == 1
    err = capsys.readouterr().err
    assert "'distill_image_proj.weight': a SEED-2 (SEED-LLaMA) tokenizer checkpoint" in err, err


def test_wrong_head_count_is_a_clear_error(tmp_path, capsys):
    state, _, _ = _reference(TINY, batch=1)
    torch.save({"model": state}, tmp_path / "seed_tokenizer.pth")
    assert convert_main(["seed_v1", f"--checkpoint={tmp_path / 'seed_tokenizer.pth'}", f"--out={tmp_path / 'o'}",
                         "--vit_heads=5", "--qformer_heads=4", "--blocks_heads=2"]) == 1
    assert "vit heads 5 do not divide the ViT width 48" in capsys.readouterr().err


@pytest.mark.parametrize("layout, flag", [("seed_v1", "--vit_heads=0"), ("lavis_blip2", "--qformer_heads=-4"),
                                           ("seed_v1", "--blocks_heads=0"), ("sd", "--unet_heads=0"),
                                           ("sd", "--text_heads=-1"), ("sd", "--norm_groups=0"),
                                           ("sd", "--scaling_factor=-0.5"), ("hf_opt", "--image_tokens=-2")])
def test_a_non_positive_count_or_scale_fails_naming_it_before_reading(layout, flag, tmp_path, capsys):
    """Zero heads crashed with ZeroDivisionError; a zero --norm_groups or --scaling_factor
    was taken as not given; --image_tokens=-2 appended no rows but reported image ids."""
    assert convert_main([layout, f"--checkpoint={tmp_path / 'absent'}", f"--out={tmp_path / 'out'}", flag]) == 1
    assert f"error: {flag}: expected" in capsys.readouterr().err


def test_an_out_that_holds_an_export_fails_before_reading(tmp_path, capsys):
    """It was found only when writing, after the whole conversion (minutes for ViT-g)."""
    (tmp_path / "out" / weights.PARAMS_DIR).mkdir(parents=True)
    (tmp_path / "out" / weights.CONFIG_FILE).write_text("{}")
    assert convert_main(["hf_opt", f"--checkpoint={tmp_path / 'absent'}", f"--out={tmp_path / 'out'}"]) == 1
    assert "already holds an export; choose a new directory" in capsys.readouterr().err
    # params/ alone: a conversion killed while writing (model.json is written last), not an export
    (tmp_path / "out" / weights.CONFIG_FILE).unlink()
    assert convert_main(["hf_opt", f"--checkpoint={tmp_path / 'absent'}", f"--out={tmp_path / 'out'}"]) == 1
    assert (f"already holds a partial export ({weights.PARAMS_DIR}/ without {weights.CONFIG_FILE}: its writing "
            "stopped); remove it, or choose a new directory") in capsys.readouterr().err


@pytest.mark.parametrize("out", ["", "file", "file/sub"])
def test_an_out_that_cannot_be_a_directory_fails_before_reading(out, tmp_path, capsys):
    """--out= wrote the export into the current directory; a file at or above --out failed
    only when writing, after the whole conversion, as "error: 17" (the errno)."""
    (tmp_path / "file").write_text("")
    assert convert_main(["hf_opt", f"--checkpoint={tmp_path / 'absent'}",
                         f"--out={tmp_path / out if out else ''}"]) == 1
    expected = f"out: {tmp_path / 'file'} is a file, not a directory" if out else "out is empty"
    assert f"error: {expected}" in capsys.readouterr().err


def test_an_os_error_while_converting_prints_its_text_and_path(tmp_path, capsys, monkeypatch):
    """An OS error raised by a read printed only its errno ("error: 20")."""
    def fail(args):
        raise NotADirectoryError(20, "Not a directory", "/a/file/sub")
    monkeypatch.setitem(convert_cli.CONVERTERS, "hf_opt", fail)
    assert convert_main(["hf_opt", f"--checkpoint={tmp_path}", f"--out={tmp_path / 'out'}"]) == 1
    assert capsys.readouterr().err == "error: [Errno 20] Not a directory: '/a/file/sub'\n"


def _help_text(argv: list[str], capsys) -> str:
    """What `python -m seed_jax.convert ARGV --help` prints, on one line."""
    with pytest.raises(SystemExit):
        convert_cli.parser().parse_args(argv + ["--help"])
    return " ".join(capsys.readouterr().out.split())


def test_help_describes_each_layout_and_the_head_count_defaults(capsys):
    """--help listed the layouts bare, without the usage lines, and the head counts
    README calls flags with the release's values showed no value."""
    top = _help_text([], capsys)
    assert "python -m seed_jax.convert hf_opt --checkpoint=OPT_FOLDER --out=OUT" in top
    for name in convert_cli.CONVERTERS:
        assert f"{name} {convert_cli.LAYOUT_HELP[name]}" in top
    seed_v1_help = _help_text(["seed_v1"], capsys)
    for flag, heads in (("vit_heads", 16), ("qformer_heads", 12), ("blocks_heads", 12)):
        assert re.search(rf"--{flag} {flag.upper()} (?:(?! --).)*\(default {heads}, the release's", seed_v1_help), flag


def test_help_prints_the_usage_lines_as_written():
    """The seed_v1 usage line's shell continuations (backslash, newline) were read as
    Python's, the docstring's three lines joined into one of 224 columns."""
    text = convert_cli.parser().format_help()
    assert "--checkpoint=DIR/seed_tokenizer.pth \\\n      [--qformer=" in text
    assert max(len(line) for line in text.splitlines()) <= 120


def test_cli_runs_as_a_module(tmp_path, repo_root):
    state, pixels, ref = _reference(TINY, batch=2, seed=5)
    torch.save({"model": state}, tmp_path / "seed_tokenizer.pth")
    result = subprocess.run([sys.executable, "-m", "seed_jax.convert", "seed_v1",
                             f"--checkpoint={tmp_path / 'seed_tokenizer.pth'}", f"--out={tmp_path / 'out'}",
                             *_heads(TINY)], cwd=repo_root, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "wrote seed_tokenizer export" in result.stdout
    _compare(SeedTokenizer.load(str(tmp_path / "out")), pixels, ref)


FULL = ReferenceConfig()  # ViT-g/14 at 224 px, BERT-base Q-Former, 8192 codes


@pytest.mark.slow
@pytest.mark.full_size
def test_full_size_release_checkpoint_matches_the_reference(tmp_path):
    """One image (batches and padding: the tiny tests), converted in this process
    (`python -m`: test_cli_runs_as_a_module)."""
    state, pixels, ref = _reference(FULL, batch=1)
    torch.save({"model": state}, tmp_path / "seed_tokenizer.pth")
    del state
    gc.collect()
    assert convert_main(["seed_v1", f"--checkpoint={tmp_path / 'seed_tokenizer.pth'}",
                         f"--out={tmp_path / 'out'}"]) == 0
    os.remove(tmp_path / "seed_tokenizer.pth")
    tokenizer = SeedTokenizer.load(str(tmp_path / "out"))
    assert tokenizer.config.vit.depth == 39 and tokenizer.config.vit.image_size == 224
    assert tokenizer.config.qformer.cross_attention_freq == 2 and tokenizer.num_codes == 8192
    errors = _compare(tokenizer, pixels, ref)
    print("full-size seed_v1 relative errors:", {k: f"{v:.1e}" for k, v in errors.items()})
