"""OPT in NNX against transformers' OPTForCausalLM with the same random weights:
logits (pre-LN and post-LN with project_in/out, padded batches), the KV cache
against full recomputation, and greedy decoding against `generate()`."""

import contextlib
import copy
import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import torch
from flax import nnx
from safetensors.torch import load_file, save_file
from transformers import OPTConfig, OPTForCausalLM, OPTModel

from parity import INTERMEDIATE_TOLERANCE, relative_error
from sd_fixtures import randomize
from seed_jax import api, generation, parallel, weights
from seed_jax.api import SeedOPT
from seed_jax.api import seed_opt as seed_opt_api
from seed_jax.convert.__main__ import convert
from seed_jax.data import opt_text
from seed_jax.models import opt as opt_model
from seed_jax.models.opt import OPTConfig as OPTConfigOurs
from seed_jax.models.opt import OPT, merge_lora, train_all_filter, trainable_filter
from seed_jax.trainers import global_batches, loop

pytestmark = pytest.mark.torch

TINY = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
            max_position_embeddings=64, pad_token_id=1, bos_token_id=2, eos_token_id=2)
VARIANTS = {"pre_ln": dict(do_layer_norm_before=True, word_embed_proj_dim=32),
            "post_ln": dict(do_layer_norm_before=False, word_embed_proj_dim=16)}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def converted(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    hf = randomize(OPTForCausalLM(OPTConfig(**TINY, **VARIANTS[request.param])), 0).eval()
    hf.save_pretrained(root / "hf")
    report = convert(["hf_opt", f"--checkpoint={root / 'hf'}", f"--out={root / 'export'}", "--image_tokens=0"])
    assert report["kind"] == "opt"
    model, _, config = weights.load_model(str(root / "export"), kind="opt")
    assert config.pre_layer_norm == VARIANTS[request.param]["do_layer_norm_before"]
    return hf, model, str(root / "export")


def test_vocabulary_extension_keeps_the_model_and_appends_code_rows(converted, tmp_path):
    hf, model, export = converted
    folder = tmp_path / "hf"
    hf.save_pretrained(folder)
    report = convert(["hf_opt", f"--checkpoint={folder}", f"--out={tmp_path / 'export'}", "--image_tokens=16"])
    assert (report["image_start_id"], report["image_end_id"], report["first_code_id"]) == (100, 101, 102)
    extended, _, config = weights.load_model(str(tmp_path / "export"), kind="opt")
    assert config.total_vocab_size == 100 + 18
    ids, mask = _prompts()
    logits, _ = extended(ids, mask)
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(logits)[..., :100][real], np.asarray(model(ids, mask)[0])[real], atol=1e-5)
    rows = np.asarray(extended.embed_extra[...])
    old = np.asarray(extended.embed_tokens[...])
    assert rows.shape == (18, old.shape[1]) and len(np.unique(rows.round(6), axis=0)) == 18
    np.testing.assert_allclose(rows.mean(0), old.mean(0), atol=0.1 * old.std(0).max())


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_opt_model_folder_without_lm_head_matches_transformers(variant, tmp_path):
    """The Hub's facebook/opt-* folders hold an `OPTModel` (keys `decoder.*`, no
    lm_head), which transformers loads into OPTForCausalLM with the head tied."""
    randomize(OPTModel(OPTConfig(**TINY, **VARIANTS[variant])), 0).save_pretrained(tmp_path / "hf")
    assert "decoder.embed_tokens.weight" in load_file(tmp_path / "hf" / "model.safetensors")
    hf = OPTForCausalLM.from_pretrained(tmp_path / "hf").eval()
    convert(["hf_opt", f"--checkpoint={tmp_path / 'hf'}", f"--out={tmp_path / 'export'}", "--image_tokens=0"])
    model, _, _ = weights.load_model(str(tmp_path / "export"), kind="opt")
    ids, mask = _prompts()
    with torch.no_grad():
        ref = hf(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
    real = mask.astype(bool)
    assert relative_error(np.asarray(model(ids, mask)[0])[real], ref[real]) <= INTERMEDIATE_TOLERANCE


def test_an_opt_config_json_without_heads_reads_as_transformers_does(tmp_path):
    """A key config.json lacks takes transformers' default (12 heads), as
    `from_pretrained` builds the model; it used to fall back to 32."""
    folder = tmp_path / "hf"
    randomize(OPTForCausalLM(OPTConfig(**{**TINY, "hidden_size": 48, "num_attention_heads": 12},
                                       **VARIANTS["pre_ln"])), 3).save_pretrained(folder)
    settings = json.loads((folder / "config.json").read_text())
    del settings["num_attention_heads"]
    (folder / "config.json").write_text(json.dumps(settings))
    hf = OPTForCausalLM.from_pretrained(folder).eval()
    convert(["hf_opt", f"--checkpoint={folder}", f"--out={tmp_path / 'export'}", "--image_tokens=0"])
    model, _, config = weights.load_model(str(tmp_path / "export"), kind="opt")
    assert config.num_heads == hf.config.num_attention_heads == 12
    ids, mask = _prompts()
    with torch.no_grad():
        ref = hf(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
    real = mask.astype(bool)
    assert relative_error(np.asarray(model(ids, mask)[0])[real], ref[real]) <= INTERMEDIATE_TOLERANCE


def test_the_report_names_the_variant_read(tmp_path):
    """A folder whose weights are a variant's alone is read in it; the report recorded
    no variant, so an export did not say that it came from float16 weights."""
    hf = randomize(OPTForCausalLM(OPTConfig(**TINY, **VARIANTS["pre_ln"])), 4).half()
    hf.save_pretrained(tmp_path / "main")
    hf.save_pretrained(tmp_path / "fp16", variant="fp16")
    reports = {name: convert(["hf_opt", f"--checkpoint={tmp_path / name}", f"--out={tmp_path / name}_export",
                              "--image_tokens=0"]) for name in ("main", "fp16")}
    assert reports["main"]["variant"] is None and reports["fp16"]["variant"] == "fp16"
    exported = [weights.load_params(str(tmp_path / f"{name}_export")) for name in ("main", "fp16")]
    assert exported[0].keys() == exported[1].keys()
    assert all(np.array_equal(exported[0][k], exported[1][k]) for k in exported[0])


def test_a_missing_shard_or_layer_fails_naming_it(tmp_path):
    hf = OPTForCausalLM(OPTConfig(**dict(TINY, num_hidden_layers=4)))
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())["weight_map"]
    shard = index["model.decoder.layers.2.fc1.weight"]
    (tmp_path / "sharded" / shard).unlink()
    with pytest.raises(FileNotFoundError, match=f"lists shards that are missing: {shard}"):
        convert(["hf_opt", f"--checkpoint={tmp_path / 'sharded'}", f"--out={tmp_path / 'a'}", "--image_tokens=0"])
    hf.save_pretrained(tmp_path / "gap")
    state = load_file(tmp_path / "gap" / "model.safetensors")
    save_file({k: v for k, v in state.items() if ".layers.1." not in k}, tmp_path / "gap" / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(KeyError, match="missing key 'model.decoder.layers.1.fc1.weight', though layer 3 has keys"):
        convert(["hf_opt", f"--checkpoint={tmp_path / 'gap'}", f"--out={tmp_path / 'b'}", "--image_tokens=0"])


def _prompts():
    """Two left-padded prompts (B,8) and their mask."""
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 100, (2, 8))
    mask = np.ones((2, 8), np.int64)
    ids[1, :3], mask[1, :3] = 1, 0
    return ids, mask


def test_logits_match_transformers(converted):
    hf, model, export = converted
    ids, mask = _prompts()
    with torch.no_grad():
        ref = hf(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
    ours, _ = model(ids, mask)
    real = mask.astype(bool)  # padded positions' logits are meaningless on both sides
    assert relative_error(np.asarray(ours)[real], ref[real]) <= INTERMEDIATE_TOLERANCE


def _cached_and_full_logits(model, ids, mask) -> tuple[np.ndarray, np.ndarray]:
    """The real tokens' logits of (2,8) prompts decoded with the cache (5 tokens, then
    one at a time) and recomputed in one pass: (N,V) each."""
    full, _ = model(ids, mask)
    cache = model.init_cache(2, 8)
    positions = np.cumsum(mask, 1) * mask - 1
    prefix, cache = model(ids[:, :5], mask, positions=positions[:, :5], cache=cache, cache_index=0)
    steps = [prefix]
    for i in range(5, 8):
        logits, cache = model(ids[:, i:i + 1], mask, positions=positions[:, i:i + 1], cache=cache, cache_index=i)
        steps.append(logits)
    real = mask.astype(bool)
    return np.asarray(np.concatenate(steps, 1)[real]), np.asarray(full)[real]


def test_cached_decoding_equals_full_recomputation(converted):
    _, model, _ = converted
    cached, full = _cached_and_full_logits(model, *_prompts())
    np.testing.assert_allclose(cached, full, atol=1e-5)


def test_greedy_generation_matches_transformers_generate(converted):
    hf, model, export = converted
    ids, mask = _prompts()
    with torch.no_grad():
        ref = hf.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), max_new_tokens=20,
                          do_sample=False, num_beams=1, eos_token_id=None, pad_token_id=1).numpy()[:, 8:]
    ours = jax.jit(lambda i, m: generation.generate(model, i, m, max_new_tokens=20))(ids, mask)
    np.testing.assert_array_equal(np.asarray(ours), ref)


def test_greedy_generation_with_eos_stops_where_transformers_does(converted):
    """Once every row has emitted the end token, decoding stops (it ran all
    max_new_tokens steps before) and the API returns the columns up to the last row's
    end, as transformers' generate. The end tokens tried are those greedy rows emit."""
    hf, model, export = converted
    ids, mask = _prompts()
    steps = 10
    without = np.asarray(jax.jit(lambda i, m: generation.generate(model, i, m, max_new_tokens=steps))(ids, mask))
    stopped_early = 0
    for eos in np.unique(without[:, :4]).tolist():
        with torch.no_grad(), _one_torch_thread():
            ref = hf.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                              max_new_tokens=steps, do_sample=False, num_beams=1, eos_token_id=eos,
                              pad_token_id=1).numpy()[:, 8:]
        for batch_size in (1, 2):
            np.testing.assert_array_equal(SeedOPT.load(export, batch_size=batch_size).generate(
                ids, steps, attention_mask=mask, eos_id=eos), ref, err_msg=f"eos_id={eos} batch_size={batch_size}")
        forward_passes = _forward_passes(model, ids, mask, steps, eos)
        assert forward_passes == min(ref.shape[1], steps - 1) + 1, f"eos_id={eos}"
        stopped_early += ref.shape[1] < steps
    assert stopped_early, "no batch ended before max_new_tokens: the early stop is untested"


def _forward_passes(model, ids, mask, steps: int, eos: int) -> int:
    """How many times greedy `generation.generate` runs the model (the prompt's pass
    included), counted from inside the compiled loop."""
    calls = []

    class Counting:
        config = model.config
        init_cache = model.init_cache

        def __call__(self, *args, **kwargs):
            jax.debug.callback(lambda: calls.append(1))
            return model(*args, **kwargs)

    jax.block_until_ready(jax.jit(lambda i, m: generation.generate(Counting(), i, m, max_new_tokens=steps,
                                                                   eos_id=eos))(ids, mask))
    jax.effects_barrier()
    return len(calls)


def test_generation_may_fill_every_position(converted):
    """The last new token is never fed back, so a prompt of P tokens may take
    max_positions - P + 1 of them, as in transformers; one more is refused."""
    hf, _, export = converted
    steps = 6
    ids = np.random.default_rng(1).integers(3, 100, (1, TINY["max_position_embeddings"] - steps + 1))
    with torch.no_grad():
        ref = hf.generate(input_ids=torch.from_numpy(ids), max_new_tokens=steps, do_sample=False, num_beams=1,
                          eos_token_id=None, pad_token_id=1).numpy()[:, ids.shape[1]:]
    with torch.no_grad():
        beams = hf.generate(input_ids=torch.from_numpy(ids), max_new_tokens=steps, do_sample=False, num_beams=2,
                            eos_token_id=None, pad_token_id=1, early_stopping=False).numpy()[:, ids.shape[1]:]
    lm = SeedOPT.load(export)
    np.testing.assert_array_equal(lm.generate(ids, steps, eos_id=None), ref)
    np.testing.assert_array_equal(lm.generate(ids, steps, num_beams=2, eos_id=None), beams)
    with pytest.raises(ValueError, match=f"max_new_tokens: expected an integer in 1..{steps} .* got {steps + 1}"):
        lm.generate(ids, steps + 1)
    # padding takes no positions, so it takes none of the new tokens' either (it was counted as prompt)
    padded, mask = np.pad(ids, ((0, 0), (9, 0)), constant_values=1), np.arange(ids.shape[1] + 9)[None] >= 9
    np.testing.assert_array_equal(lm.generate(padded, steps, attention_mask=mask, eos_id=None), ref)
    # a prompt longer than the positions is the prompt's fault (it read "max_new_tokens: expected 1..0")
    positions = TINY["max_position_embeddings"]
    with pytest.raises(ValueError, match=f"input_ids: a prompt of {positions + 1} tokens exceeds the model's "
                                         f"{positions} "):
        lm.generate(np.ones((1, positions + 1), np.int64), 1)


def test_seed_opt_api_logits_and_generate(converted):
    hf, model, export = converted
    lm = SeedOPT.load(export)
    ids, mask = _prompts()
    with torch.no_grad():
        ref = hf.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), max_new_tokens=5,
                          do_sample=False, num_beams=1, eos_token_id=None, pad_token_id=1).numpy()[:, 8:]
    np.testing.assert_array_equal(lm.generate(ids, 5, attention_mask=mask, eos_id=None), ref)
    np.testing.assert_allclose(lm.logits(ids[:1]), np.asarray(model(ids[:1])[0]), atol=1e-5)
    one_at_a_time = SeedOPT.load(export, batch_size=1)  # chunks of one row
    np.testing.assert_array_equal(one_at_a_time.generate(ids, 5, attention_mask=mask, eos_id=None), ref)
    real = mask.astype(bool)
    np.testing.assert_allclose(one_at_a_time.logits(ids, mask)[real], np.asarray(model(ids, mask)[0])[real], atol=1e-5)
    with pytest.raises(ValueError, match="input_ids: values must lie"):
        lm.logits(np.full((1, 3), 500))
    with pytest.raises(ValueError, match="max_new_tokens"):
        lm.generate(ids, 100)
    with pytest.raises(ValueError, match="attention_mask"):
        lm.generate(ids, 2, attention_mask=mask[:, :3])


def test_load_rejects_a_diffusion_export_it_would_ignore(converted, tmp_path):
    """`diffusion` is loaded with a SEED tokenizer given as a path; without one, or
    beside a SeedTokenizer already loaded, it was dropped without a word (generate_image
    then asked for what had been passed)."""
    _, _, export = converted
    with pytest.raises(ValueError, match="diffusion: given without a SEED tokenizer export path"):
        SeedOPT.load(export, diffusion=str(tmp_path))
    from helpers import TINY_TOKENIZER
    from seed_jax.api import SeedTokenizer
    from seed_jax.models.tokenizer import SeedTokenizer as SeedTokenizerModel
    tokenizer = SeedTokenizer(SeedTokenizerModel(TINY_TOKENIZER, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="diffusion: given without a SEED tokenizer export path"):
        SeedOPT.load(export, tokenizer=tokenizer, diffusion=str(tmp_path))
    assert SeedOPT.load(export, tokenizer=tokenizer).tokenizer is tokenizer


def test_beam_search_matches_transformers(converted):
    hf, model, export = converted
    ids, mask = _prompts()
    with torch.no_grad():
        ref = hf.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), max_new_tokens=8,
                          do_sample=False, num_beams=3, eos_token_id=None, pad_token_id=1, early_stopping=False,
                          length_penalty=1.0).numpy()[:, 8:]
    ours = jax.jit(lambda i, m: generation.beam_search(model, i, m, max_new_tokens=8, num_beams=3))(ids, mask)
    np.testing.assert_array_equal(np.asarray(ours), ref)
    greedy = jax.jit(lambda i, m: generation.generate(model, i, m, max_new_tokens=8))(ids, mask)
    assert not np.array_equal(np.asarray(greedy), ref), "beam search found the greedy path: the check is vacuous"
    np.testing.assert_array_equal(SeedOPT.load(export).generate(ids, 8, attention_mask=mask, num_beams=3, eos_id=None),
                                  ref)


@contextlib.contextmanager
def _one_torch_thread():
    """Tiny torch models run ~20x faster on one thread than on two contended cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def test_beam_search_with_eos_matches_transformers(converted):
    """With an end token, beams ending among the best are finished hypotheses scored by
    length, as transformers' beam search (length_penalty 0.0 stops the loop early).
    The end tokens tried are those the beams without one emit first."""
    hf, model, export = converted
    ids, mask = _prompts()
    steps, beams = 10, 3
    without = np.asarray(jax.jit(lambda i, m: generation.beam_search(model, i, m, max_new_tokens=steps,
                                                                     num_beams=beams))(ids, mask))
    changed, stopped_early = 0, 0
    for length_penalty in (1.0, 0.0):
        run = jax.jit(lambda i, m, eos: generation.beam_search(
            model, i, m, max_new_tokens=steps, num_beams=beams, eos_id=eos, length_penalty=length_penalty))
        for eos in np.unique(without[:, :3]).tolist():
            with torch.no_grad(), _one_torch_thread():
                ref = hf.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                                  max_new_tokens=steps, do_sample=False, num_beams=beams, eos_token_id=eos,
                                  pad_token_id=1, length_penalty=length_penalty).numpy()[:, 8:]
            stopped_early += ref.shape[1] < steps
            if eos == without[0, 0]:  # the API, one row per chunk, returns transformers' columns
                np.testing.assert_array_equal(SeedOPT.load(export, batch_size=1).generate(
                    ids, steps, attention_mask=mask, num_beams=beams, eos_id=eos, length_penalty=length_penalty), ref)
            ref = np.pad(ref, ((0, 0), (0, steps - ref.shape[1])), constant_values=1)
            np.testing.assert_array_equal(np.asarray(run(ids, mask, eos)), ref,
                                          err_msg=f"eos_id={eos} length_penalty={length_penalty}")
            after_eos = np.cumsum(np.cumsum(without == eos, 1) > 0, 1) > 1
            changed += not np.array_equal(np.where(after_eos, 1, without), ref)
    assert changed, "cutting beams without an end token at eos gives the same tokens: the check is vacuous"
    assert stopped_early, "no batch stopped before max_new_tokens: the early stop is untested"


def test_beam_search_with_allowed_ranges_matches_transformers(converted):
    """Beam search refused `allowed`, so image_codes / generate_image (32 codes, then
    </img>) could not use it. It now restricts step t as transformers'
    `prefix_allowed_tokens_fn` does (-inf outside after the whole vocabulary's
    log-softmax), without an end token and with one a row emits early, the ranges
    traced (one program)."""
    hf, model, export = converted
    ids, mask = _prompts()
    steps, beams = 8, 3
    allowed = [(10, 60)] * 3 + [(40, 42)] + [(0, 100)] + [(7, 8)] + [(20, 30)] * 2
    lm = SeedOPT.load(export)
    free = lm.generate(ids, steps, attention_mask=mask, num_beams=beams, eos_id=None)
    assert ((free < np.asarray(allowed)[:, 0]) | (free >= np.asarray(allowed)[:, 1])).any(), "vacuous"

    def check(eos):
        with torch.no_grad(), _one_torch_thread():
            ref = hf.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                              max_new_tokens=steps, do_sample=False, num_beams=beams, eos_token_id=eos,
                              pad_token_id=1, length_penalty=0.5,
                              prefix_allowed_tokens_fn=lambda _, sent: list(range(*allowed[len(sent) - 8]))
                              ).numpy()[:, 8:]
        tokens = lm.generate(ids, steps, attention_mask=mask, num_beams=beams, eos_id=eos, allowed=allowed,
                             length_penalty=0.5)
        np.testing.assert_array_equal(tokens, ref, err_msg=f"eos_id={eos}")
        greedy = lm.generate(ids, steps, attention_mask=mask, eos_id=eos, allowed=allowed)
        assert not np.array_equal(greedy, tokens), f"eos_id={eos}: beams found the greedy path: vacuous"
        return tokens

    eos = int(check(None)[1, 2])
    assert check(eos).shape[1] < steps, "no row ended before the last step: the end token is untested"
    assert lm._beam_search._cache_size() == 1


def test_beam_search_with_as_many_beams_as_tokens_matches_transformers(tmp_path):
    """With num_beams >= the vocabulary, fewer than K of the first step's candidates go
    on without ending: a candidate ending at eos then took a live slot with its own
    score and ran on, so an answer held a token after its eos. It now runs on dead, as
    transformers' (-1e9)."""
    hf = randomize(OPTForCausalLM(OPTConfig(**{**TINY, "vocab_size": 6}, **VARIANTS["pre_ln"])), 1).eval()
    hf.save_pretrained(tmp_path / "hf")
    convert(["hf_opt", f"--checkpoint={tmp_path / 'hf'}", f"--out={tmp_path / 'export'}", "--image_tokens=0"])
    lm = SeedOPT.load(str(tmp_path / "export"))
    ids, mask = np.asarray([[1, 1, 1, 4, 5], [3, 4, 5, 3, 4]]), np.asarray([[0, 0, 0, 1, 1], [1] * 5])
    eos = 3
    for beams in (6, 8):
        with torch.no_grad(), _one_torch_thread():
            ref = hf.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), max_new_tokens=7,
                              do_sample=False, num_beams=beams, eos_token_id=eos, pad_token_id=1,
                              length_penalty=2.0).numpy()[:, 5:]
        tokens = lm.generate(ids, 7, attention_mask=mask, num_beams=beams, eos_id=eos, length_penalty=2.0)
        np.testing.assert_array_equal(tokens, ref, err_msg=f"num_beams={beams}")
        after_eos = np.cumsum(np.cumsum(tokens == eos, 1) > 0, 1) > 1
        assert (tokens[after_eos] == 1).all() and (tokens == eos).any(), f"num_beams={beams}"


def test_decoding_computes_the_logits_of_the_last_prompt_token_alone():
    """The prompt's pass computed logits at every prompt token, (B,P,V) float32, to keep
    the last: with SEED-OPT's 58k ids, 32 prompts of 2048 tokens took 15 GB for them.
    Greedy, sampled and beam decoding now compute the last token's alone, as
    transformers' generate does (logits_to_keep=1)."""
    config = OPTConfigOurs(vocab_size=20000, width=16, depth=1, num_heads=2, mlp_dim=32, max_positions=256)
    model = weights.build("opt", config)
    ids = jnp.ones((4, 256), jnp.int32)
    prompt_logits_bytes = ids.size * config.vocab_size * 4
    decoders = {"greedy": lambda i, m: generation.generate(model, i, m, max_new_tokens=2),
                "sampled": lambda i, m: generation.generate(model, i, m, max_new_tokens=2, rng=jax.random.key(0),
                                                            sampling=generation.Sampling(1.0, 5, 0.9)),
                "beams": lambda i, m: generation.beam_search(model, i, m, max_new_tokens=2, num_beams=2)}
    for name, decode in decoders.items():
        temporaries = jax.jit(decode).lower(ids, jnp.ones_like(ids)).compile().memory_analysis().temp_size_in_bytes
        assert temporaries < prompt_logits_bytes / 4, f"{name}: {temporaries} bytes of temporaries"


def test_sampling_top_k_1_is_greedy_and_constraints_hold(converted):
    _, model, _ = converted
    ids, mask = _prompts()
    run = jax.jit(lambda i, m, key, allowed, sampling: generation.generate(
        model, i, m, max_new_tokens=6, sampling=sampling, rng=key, allowed=allowed))
    free = generation.allowed_ranges(6, None, 100)
    greedy = run(ids, mask, jax.random.key(0), free, generation.Sampling())
    top1 = run(ids, mask, jax.random.key(1), free, generation.Sampling(temperature=0.7, top_k=1))
    np.testing.assert_array_equal(top1, greedy)
    sampling = generation.Sampling(temperature=1.5, top_p=0.95)
    a, b = (run(ids, mask, jax.random.key(k), free, sampling) for k in (2, 2))
    np.testing.assert_array_equal(a, b)
    constrained = np.asarray(run(ids, mask, jax.random.key(3), generation.allowed_ranges(
        6, [(10, 20)] * 5 + [(7, 8)], 100), sampling))
    assert ((constrained[:, :5] >= 10) & (constrained[:, :5] < 20)).all() and (constrained[:, 5] == 7).all()


def test_sampled_rows_do_not_depend_on_batch_size():
    """Row r samples with the key (seed, r). Each chunk of `batch_size` rows (a memory
    setting) used to take its own key, so the same call sampled rows 4-5 differently
    with batch_size 4 and 8, and a batch of one differently again."""
    ids = np.random.default_rng(0).integers(3, 10, (6, 5))
    runs = [_tiny_seed_opt(batch_size=b).generate(ids, 6, temperature=1.0, seed=7) for b in (1, 4, 8)]
    for run in runs[1:]:
        np.testing.assert_array_equal(run, runs[0])
    assert len(np.unique(runs[0], axis=0)) == 6, "rows sampled alike: the check is vacuous"
    same = _tiny_seed_opt(batch_size=4).generate(ids[[0] * 5], 6, temperature=1.0, seed=7)
    assert len(np.unique(same, axis=0)) > 1, "rows of one prompt share their samples"


def test_new_end_padding_or_length_penalty_values_reuse_the_compiled_decoders():
    """`eos_id`, `pad_id` and `length_penalty` were static: each value compiled greedy
    decoding or beam search again (a sweep over length penalties, one program each).
    They are traced now, and each value still gives the tokens of its own program."""
    lm = _tiny_seed_opt()
    ids = np.random.default_rng(0).integers(3, 10, (4, 5))
    model = lm.model
    free = lm.generate(ids, 8, eos_id=None)
    options = [dict(eos_id=None, pad_id=1), dict(eos_id=int(free[0, 2]), pad_id=0),
               dict(eos_id=int(free[1, 1]), pad_id=7)]
    greedy = [lm.generate(ids, 8, **o) for o in options]
    beams = [lm.generate(ids, 8, num_beams=2, length_penalty=p, **o) for p in (1.0, 0.0, -2.0) for o in options]
    assert lm._generate._cache_size() == 1 and lm._beam_search._cache_size() == 1
    mask = np.ones_like(ids)
    for o, tokens in zip(options, greedy):  # each value compiled alone, as before
        alone = jax.jit(lambda i, m: generation.generate(model, i, m, max_new_tokens=8, **o))(ids, mask)
        np.testing.assert_array_equal(tokens, generation.up_to_last_end(np.asarray(alone), o["eos_id"]))
    assert len({t.tobytes() for t in greedy}) == 3, "the options changed nothing: the check is vacuous"
    for (p, o), tokens in zip([(p, o) for p in (1.0, 0.0, -2.0) for o in options], beams):
        alone = jax.jit(lambda i, m: generation.beam_search(model, i, m, max_new_tokens=8, num_beams=2,
                                                             length_penalty=p, **o))(ids, mask)
        np.testing.assert_array_equal(tokens, generation.up_to_last_end(np.asarray(alone), o["eos_id"]),
                                      err_msg=f"length_penalty={p} {o}")


def test_other_max_new_tokens_reuse_the_compiled_decoders():
    """Each max_new_tokens compiled greedy, sampled and beam decoding again. The
    decoders now compile the next power of two of columns (at least 16) and stop after
    max_new_tokens (traced): 1..16 new tokens share one program each, and every count
    gives the tokens of its own program, exactly max_new_tokens columns when no row ends."""
    lm = _tiny_seed_opt()
    ids = np.random.default_rng(0).integers(3, 10, (4, 5))
    model, mask, key = lm.model, np.ones_like(ids), jax.random.fold_in(jax.random.key(1), 0)
    free = lm.generate(ids, 16, eos_id=None)
    for steps in (1, 5, 16):
        for eos in (None, int(free[0, 2])):
            greedy = lm.generate(ids, steps, eos_id=eos)
            sampled = lm.generate(ids[:1], steps, eos_id=eos, temperature=1.0, seed=1)
            beams = lm.generate(ids, steps, eos_id=eos, num_beams=2)
            alone = [jax.jit(lambda i, m: generation.generate(model, i, m, max_new_tokens=steps, eos_id=eos))(
                         ids, mask),
                     jax.jit(lambda i, m: generation.generate(model, i, m, max_new_tokens=steps, eos_id=eos,
                                                              rng=key[None], sampling=generation.Sampling(1.0, 50)))(
                         ids[:1], mask[:1]),
                     jax.jit(lambda i, m: generation.beam_search(model, i, m, max_new_tokens=steps, num_beams=2,
                                                                 eos_id=eos))(ids, mask)]
            for tokens, expected in zip((greedy, sampled, beams), alone):
                np.testing.assert_array_equal(tokens, generation.up_to_last_end(np.asarray(expected), eos),
                                              err_msg=f"max_new_tokens={steps} eos_id={eos}")
            if eos is None:
                assert greedy.shape == beams.shape == (4, steps) and sampled.shape == (1, steps)
    assert lm._generate._cache_size() == 2 and lm._beam_search._cache_size() == 1  # greedy, sampled; beams
    lm.generate(ids, 17)
    assert lm._generate._cache_size() == 3  # 32 columns


def test_sampling_keeps_the_50_likeliest_tokens_by_default_as_transformers():
    """transformers' `generate(do_sample=True)` keeps the 50 likeliest tokens unless told
    a top_k (GenerationConfig's default; OPT checkpoints set none); ours sampled from the
    whole vocabulary. Nearly uniform sampling over 200 tokens now keeps to each step's
    50 likeliest, and top_k=0 still leaves them all."""
    lm = SeedOPT(weights.build("opt", OPTConfigOurs(vocab_size=200, width=16, depth=1, num_heads=2, mlp_dim=32,
                                                    max_positions=64)))
    ids = np.random.default_rng(0).integers(3, 200, (16, 4))

    def likelier(**options):  # per new token: how many tokens were likelier at its step
        tokens = lm.generate(ids, 4, temperature=100.0, **options)
        logits = lm.logits(np.concatenate([ids, tokens], 1))[:, ids.shape[1] - 1:-1]
        return (logits > np.take_along_axis(logits, tokens[..., None], -1)).sum(-1)

    assert likelier().max() < 50
    assert likelier(top_k=0).max() >= 50, "every token sampled among the 50 likeliest anyway: the check is vacuous"


def test_new_temperature_top_k_or_top_p_values_reuse_the_compiled_decoder():
    """temperature, top_k and top_p are traced: a sweep over them compiles once per mode
    (greedy; sampling with top-k or top-p; with neither), and the values still act.
    Greedy decoding compiled again for each top_k and for top-p, which it does not read;
    sampling for each top_k and for top-p."""
    lm = _tiny_seed_opt()
    ids = np.random.default_rng(0).integers(3, 10, (4, 5))
    greedy = lm.generate(ids, 6)
    sampled = {t: lm.generate(ids, 6, temperature=t, seed=1) for t in (0.5, 1.0, 50.0)}
    assert lm._generate._cache_size() == 2
    assert not np.array_equal(sampled[0.5], sampled[50.0]), "the temperature did not reach the compiled decoder"
    nucleus = {p: lm.generate(ids, 6, temperature=50.0, top_p=p, seed=1) for p in (0.999, 1e-6)}
    top = {k: lm.generate(ids, 6, temperature=50.0, top_k=k, seed=1) for k in (1, 7, 2**40)}
    for options in [dict(top_k=0), dict(top_k=3), dict(top_p=0.5), dict(top_k=1, top_p=1e-6)]:  # greedy reads neither
        np.testing.assert_array_equal(lm.generate(ids, 6, **options), greedy)
    assert lm._generate._cache_size() == 2
    top[0] = lm.generate(ids, 6, temperature=50.0, top_k=0, seed=1)
    assert lm._generate._cache_size() == 3
    np.testing.assert_array_equal(top[2**40], top[0])  # beyond the vocabulary: all of it
    np.testing.assert_array_equal(nucleus[1e-6], greedy)  # only the most likely token is left
    np.testing.assert_array_equal(top[1], greedy)
    assert not np.array_equal(nucleus[0.999], greedy), "top_p did not reach the compiled decoder"
    assert not np.array_equal(top[7], top[0]), "top_k did not reach the compiled decoder"


def _half_padded(ids: np.ndarray) -> np.ndarray:
    """The mask of (2,P) prompts: row 0's first half padding, row 1 whole."""
    return (np.arange(ids.shape[1]) >= np.asarray([[ids.shape[1] // 2], [0]])).astype(np.int32)


def test_prompts_of_other_lengths_reuse_the_compiled_decoder(monkeypatch):
    """The decoder was compiled again for every prompt length, so `answer` recompiled
    for nearly every batch of questions and `generate_image` for nearly every prompt.
    Prompts are now left-padded to a multiple of 16 tokens (at most the model's
    positions), and the tokens are those of the unpadded prompts."""
    lm = _tiny_seed_opt()
    rng = np.random.default_rng(0)
    calls = [(rng.integers(3, 20, (2, length)), options) for length in (3, 7, 16)
             for options in [dict(), dict(temperature=1.0, seed=1), dict(num_beams=2)]]
    padded = [lm.generate(ids, 6, attention_mask=_half_padded(ids), **options) for ids, options in calls]
    assert lm._generate._cache_size() == 2 and lm._beam_search._cache_size() == 1  # greedy, sampled; beams
    lm.image_codes(["a", "a red star star red a red"])  # prompts of 20 and 26 tokens
    lm.image_codes(["a red star a red star", "red"])  # 25 and 20
    assert lm._generate._cache_size() == 3  # one more: `allowed` and 33 steps
    # padding takes no positions: the longest decode a prompt allows stays allowed
    lm.generate(np.full((1, 5), 4), 60)  # 5 + 60 - 1 positions of 64, 16 + 60 cached columns
    lm.generate(np.full((1, 50), 4), 15)  # padded to 64 columns
    monkeypatch.setattr(seed_opt_api, "LENGTH_STEP", 1)  # no padding
    for (ids, options), tokens in zip(calls, padded):
        np.testing.assert_array_equal(tokens, lm.generate(ids, 6, attention_mask=_half_padded(ids), **options))


def test_logits_take_ids_padded_beyond_the_positions_as_generate_does():
    """logits refused ids wider than the model's positions though padding takes none
    (generate takes such prompts): the columns padding in every row are now left out,
    the real tokens' logits unchanged and the padding's 0. Real tokens spanning more
    columns than the positions are still refused, naming them."""
    lm = _tiny_seed_opt()  # 64 positions
    ids = np.random.default_rng(0).integers(3, 20, (2, 40))
    mask = _half_padded(ids)
    expected = lm.logits(ids, mask)
    real = np.broadcast_to(mask.astype(bool)[..., None], expected.shape)
    for left in (True, False):
        columns = (30, 0) if left else (0, 30)
        logits = lm.logits(np.pad(ids, ((0, 0), columns)), np.pad(mask, ((0, 0), columns)))
        kept = slice(30, None) if left else slice(None, 40)
        np.testing.assert_allclose(logits[:, kept][real], expected[real], rtol=1e-5, atol=1e-6)
        assert not np.any(logits[:, slice(None, 30) if left else slice(40, None)])
    with pytest.raises(ValueError, match="input_ids: length 65 exceeds the model's 64 positions"):
        lm.logits(np.full((1, 70), 5), np.arange(70)[None] >= 5)
    apart = np.asarray([[0] * 10 + [1] * 60, [1] * 60 + [0] * 10])
    with pytest.raises(ValueError, match="attention_mask: real tokens in 70 columns, more than the model's 64 "):
        lm.logits(np.full((2, 70), 5), apart)


def test_ids_of_other_lengths_reuse_the_compiled_logits(monkeypatch):
    """logits was compiled again for every length of its ids (scoring texts batch by
    batch recompiled for nearly every batch); ids are now right-padded to a multiple
    of 16 tokens under mask 0, and the logits of the real ones are unchanged."""
    lm = _tiny_seed_opt()
    rng = np.random.default_rng(0)
    calls = [(rng.integers(3, 20, (2, length)), mask) for length in (3, 7, 16, 61)
             for mask in (None, "right-padded")]
    calls = [(ids, None if mask is None else _half_padded(ids)[::-1, ::-1]) for ids, mask in calls]
    padded = [lm.logits(ids, mask) for ids, mask in calls]
    assert lm._logits._cache_size() == 2  # lengths 16 and 64, the model's positions
    monkeypatch.setattr(seed_opt_api, "LENGTH_STEP", 1)  # no padding
    for (ids, mask), logits in zip(calls, padded):
        assert logits.shape == (*ids.shape, lm.config.total_vocab_size)
        real = np.ones(ids.shape, bool) if mask is None else mask.astype(bool)
        np.testing.assert_allclose(logits[real], lm.logits(ids, mask)[real], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("temperature", [1e-40, 1e-50])
def test_a_tiny_temperature_samples_greedily(temperature):
    """Logits divided by 1e-40 overflowed to inf, and sampling among the infs took
    the lowest allowed token; 1e-50 is 0 in float32 and divided by zero."""
    lm = _tiny_seed_opt()
    ids = np.random.default_rng(0).integers(3, 10, (4, 5))
    allowed = [(3, lm.config.total_vocab_size)] * 6
    greedy = lm.generate(ids, 6, allowed=allowed)
    assert (greedy != 3).any(), "greedy picks the lowest allowed token: the check is vacuous"
    np.testing.assert_array_equal(lm.generate(ids, 6, allowed=allowed, temperature=temperature, seed=2), greedy)


def test_allowed_ranges_given_as_an_array_decode_as_the_list():
    """A (T,2) array failed with numpy's "truth value of an array is ambiguous"."""
    lm = _tiny_seed_opt()
    ids = np.random.default_rng(0).integers(3, 10, (2, 5))
    allowed = [(3, 9)] * 4 + [(12, 13)]
    np.testing.assert_array_equal(lm.generate(ids, 5, allowed=np.asarray(allowed)), lm.generate(ids, 5, allowed=allowed))
    for bad in ([(3, 9, 1)], [(3.0, 9.0)], np.asarray([[9, 3]])):
        with pytest.raises(ValueError, match=r"allowed\[0\]: expected integers \(low, high\)"):
            lm.generate(ids, 5, allowed=bad)


@pytest.mark.parametrize("seed", [2**32, 2**40, -1, 1.5, True])
def test_a_seed_jax_would_truncate_fails_naming_it(seed):
    """With 64-bit mode off jax keeps a seed's low 32 bits: 2**32 sampled as seed 0."""
    with pytest.raises(ValueError, match="seed: expected an integer in"):
        _tiny_seed_opt().generate(np.full((1, 3), 4), 2, temperature=1.0, seed=seed)
    with pytest.raises(ValueError, match="seed: expected an integer in"):
        api.seed_key(seed)


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = np.array([[0.5, 0.3, 0.15, 0.05]])
    logits = generation.filter_logits(np.log(probs), generation.Sampling(temperature=1.0, top_p=0.8))
    assert np.isfinite(np.asarray(logits)).tolist() == [[True, True, False, False]]
    logits = generation.filter_logits(np.log(probs), generation.Sampling(temperature=1.0, top_k=3))
    assert np.isfinite(np.asarray(logits)).tolist() == [[True, True, True, False]]
    logits = generation.filter_logits(np.log(probs), generation.Sampling(temperature=1.0, top_k=10))
    assert np.isfinite(np.asarray(logits)).all()  # top_k beyond the vocabulary keeps everything


def test_sampling_filters_match_transformers_warpers_with_one_program():
    """Top-k compiled one program per value (lax.top_k's static k), and top-p kept every
    token tied with its cut where transformers' TopPLogitsWarper keeps as many as the mass
    asks: on tied logits the kept set was larger. Now temperature, top_k and top_p are
    traced (one program for every filter, one for none) and the filters equal
    transformers' warpers, in `generate`'s order: exactly where torch.sort is stable (at
    most 16 tokens), the same count and values of kept tokens beyond (which tied ids,
    torch's unstable order tells)."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
    rng = np.random.default_rng(0)
    run = jax.jit(generation.filter_logits)
    for vocab in (16, 40):
        for t, k, p in [(1.0, 1, 1.0), (1.0, 3, 1.0), (0.7, 5, 1.0), (1.0, 100, 1.0), (1.0, 0, 0.5), (2.0, 0, 1e-6),
                        (1.0, 0, 0.75), (0.7, 6, 0.9), (1.0, 4, 1 / 3), (2.0, 0, 1.0), (1.0, 10, 0.6)]:
            logits = rng.integers(-3, 1, (8, vocab)).astype(np.float32)  # many ties, each row's maximum 0
            logits[0, -1] = 0.0  # every row has a token left after temperature
            ref = torch.from_numpy(logits)
            for on, warper in [(t != 1.0, lambda: TemperatureLogitsWarper(t)), (k != 0, lambda: TopKLogitsWarper(k)),
                               (p < 1.0, lambda: TopPLogitsWarper(p))]:  # generate's conditions and order
                ref = warper()(None, ref) if on else ref
            ref, ours = ref.numpy(), np.asarray(run(logits, generation.Sampling(t, k, p)))
            case = f"vocab={vocab} temperature={t} top_k={k} top_p={p}"
            if vocab <= 16:
                np.testing.assert_allclose(ours, ref, rtol=1e-6, err_msg=case)
            else:
                np.testing.assert_allclose(np.sort(ours, -1), np.sort(ref, -1), rtol=1e-6, err_msg=case)
            filtering = (0 < k < vocab) or p < 1.0
            assert (np.isfinite(ref).sum() < ref.size) == filtering, f"{case}: filtered {filtering}, the check is vacuous"
    assert run._cache_size() == 4  # per vocabulary size: filtered, and temperature alone


def test_top_k_and_top_p_none_keep_the_tokens_transformers_generate_keeps():
    """`generate(top_k=None)` was refused, top_p=None failed with a TypeError. transformers'
    `generate` sets the generation config's value to an argument None and then skips its
    warper: top_k=None keeps every token, not the default 50. Our filter keeps the tokens
    the warpers transformers' `generate` builds for the same arguments keep."""
    from transformers import LogitsProcessorList

    hf, lm = OPTForCausalLM(OPTConfig(**TINY)), _tiny_seed_opt()
    logits = np.random.default_rng(0).standard_normal((4, 100)).astype(np.float32)  # distinct values: no ties
    for options, kept in [({}, 50), (dict(top_k=None), 100), (dict(top_k=5, top_p=None), 5),
                          (dict(top_k=None, top_p=0.9), None)]:
        config, _ = hf._prepare_generation_config(None, do_sample=True, temperature=0.7, **options)
        warpers = hf._get_logits_processor(config, input_ids_seq_length=1, encoder_input_ids=torch.zeros(1, 1),
                                           prefix_allowed_tokens_fn=None, logits_processor=LogitsProcessorList(),
                                           device="cpu")
        ref = np.isfinite(warpers(None, torch.from_numpy(logits)).numpy())
        ours = np.isfinite(np.asarray(generation.filter_logits(logits, lm._decoding(1, 1, temperature=0.7,
                                                                                    **options).sampling)))
        np.testing.assert_array_equal(ours, ref, err_msg=str(options))
        if kept is not None:  # transformers' reading, shown
            assert ref.sum(-1).tolist() == [kept] * 4, options
    assert 50 < ref.sum(-1).max() < 100  # top_p 0.9 alone: it cut some, where a top_k of 50 would cut more


def _tiny_seed_opt(max_positions: int = 64, **options):
    """A random SeedOPT with a word-level text tokenizer and 16 codes."""
    text = opt_text.OPTTextTokenizer(opt_text.word_bpe(["a", "red", "star"]))
    config = OPTConfigOurs(vocab_size=text.vocab_size, width=16, depth=1, num_heads=2, mlp_dim=32,
                           max_positions=max_positions, extra_tokens=2 + 16)
    ids = dict(image_start_id=text.vocab_size, image_end_id=text.vocab_size + 1, first_code_id=text.vocab_size + 2)
    return SeedOPT(weights.build("opt", config), image_token_ids=ids, text_tokenizer=text, **options)


def test_an_answer_holding_image_tokens_shows_them(monkeypatch):
    """Image tokens in a generated caption used to be dropped in decoding, so a caption
    with a code token inside it read as (and scored as an exact match of) the clean one."""
    lm = _tiny_seed_opt()
    text, image = lm.text_tokenizer, lm.builder.image
    words = text.encode(" a red star")
    generated = [words[:1] + [image.first_code + 3] + words[1:] + [image.end, text.eos_id],
                 words + [text.eos_id, image.start, text.pad_id]]
    monkeypatch.setattr(lm, "generate", lambda ids, *args, **kwargs: np.asarray(generated))
    assert lm.caption_codes(np.zeros((2, 32), int)) == ["a<img_00003> red star</img>", "a red star"]


def test_an_api_built_once_reads_the_parameters_training_writes_into_the_model():
    """Training evaluators keep one SeedOPT across evaluations, compiled once: it holds
    the model's variables, so it reads what `nnx.update` (the train loop) writes."""
    lm = _tiny_seed_opt()
    ids = np.random.default_rng(0).integers(3, 10, (2, 4))
    before, generated = lm.logits(ids), lm.generate(ids, 4)
    nnx.update(lm.model, jax.tree.map(lambda x: x * 1.5 + 0.1, nnx.state(lm.model, nnx.Param)))
    fresh = SeedOPT(lm.model, image_token_ids=lm.image_token_ids, text_tokenizer=lm.text_tokenizer)
    np.testing.assert_array_equal(lm.logits(ids), fresh.logits(ids))
    assert not np.allclose(lm.logits(ids), before)
    np.testing.assert_array_equal(lm.generate(ids, 4), fresh.generate(ids, 4))
    assert lm._generate._cache_size() == 1 and generated.shape == (2, 4)


def test_seed_opt_rejects_inputs_it_would_mishandle():
    lm = _tiny_seed_opt()
    vocab = lm.config.total_vocab_size
    ids = np.full((2, 4), 5)
    mask = np.ones_like(ids)
    for bad, message in [([[1, 1, 1, 0], [1, 1, 1, 1]], r"expected left-padded prompts .* rows \[0\] end in padding"),
                         ([[0, 2, 2, 2], [1, 1, 1, 1]], r"expected values 0 and 1, got \[0, 1, 2\]"),
                         ([[0, 0, 0, 0], [1, 1, 1, 1]], r"expected a 1 in every row, rows \[0\] are all 0")]:
        with pytest.raises(ValueError, match="attention_mask: " + message):
            lm.generate(ids, 2, attention_mask=np.asarray(bad))
    words = np.asarray([[5, 6, 7, 8]] * 2)  # right padding is fine for logits, not for generation
    right = lm.logits(words, np.asarray([[1, 1, 0, 0], [1, 1, 1, 1]]))
    left = lm.logits(np.roll(words, 2, 1), np.asarray([[0, 0, 1, 1], [1, 1, 1, 1]]))
    np.testing.assert_allclose(right[0, :2], left[0, 2:], atol=1e-5)
    with pytest.raises(ValueError, match="attention_mask: expected a 1 in every row"):
        lm.logits(ids, np.asarray([[1, 1, 0, 0], [0, 0, 0, 0]]))
    with pytest.raises(ValueError, match=r"input_ids: expected integer \(B,L\) with B, L >= 1"):
        lm.generate(np.zeros((0, 4), int), 2)
    with pytest.raises(ValueError, match="input_ids: length 65 exceeds the model's 64 positions"):
        lm.logits(np.full((1, 65), 5))
    for allowed, message in [([(5, 5)], r"allowed\[0\]: expected .* 0 <= low < high <= " + str(vocab)),
                             ([(0, 3), (vocab, vocab + 2)], r"allowed\[1\]: expected"),
                             ([(0, 3)] * 3, "allowed: expected at most max_new_tokens=2 ranges, got 3")]:
        for beams in (1, 2):
            with pytest.raises(ValueError, match=message):
                lm.generate(ids, 2, attention_mask=mask, allowed=allowed, num_beams=beams)
    with pytest.raises(ValueError, match=r"num_beams: expected an integer >= 1 \(1: no beam search\), got 0"):
        lm.generate(ids, 2, num_beams=0)
    with pytest.raises(ValueError, match="length_penalty=2.0 applies to beam search only"):
        lm.generate(ids, 2, length_penalty=2.0)
    for option in [dict(temperature=0.7), dict(top_k=5), dict(top_p=0.9), dict(seed=3)]:
        with pytest.raises(ValueError, match=f"num_beams > 1 \\(beam search\\) takes no {next(iter(option))}"):
            lm.generate(ids, 2, num_beams=2, **option)
    assert lm._decoding(4, 2, num_beams=2, top_k=None, top_p=None).num_beams == 2  # None: not given, as transformers
    with pytest.raises(ValueError, match="takes no temperature"):
        lm.caption_codes(np.zeros((1, 32), int), max_new_tokens=3, num_beams=2, temperature=1.0)
    with pytest.raises(ValueError, match=r"codes: expected integer \(B,32\), got int64 \(1, 5\)"):
        lm.caption_codes(np.zeros((1, 5), np.int64))
    with pytest.raises(ValueError, match="batch_size: expected an integer >= 1, got 0"):
        _tiny_seed_opt(batch_size=0)
    # given to SeedOPT directly (`load` reads the one training checked): 0 emptied every prompt's text
    # silently, 2.5 failed slicing the first caption's ids
    for max_text_tokens in (0, 2.5):
        with pytest.raises(ValueError, match=f"^max_text_tokens: expected an integer >= 1, got {max_text_tokens}$"):
            _tiny_seed_opt(max_text_tokens=max_text_tokens)


def test_unpadded_ids_masks_or_codes_fail_naming_them():
    """Prompts' ids as lists of different lengths (not yet padded), and such a mask or
    such codes, failed in numpy ("setting an array element with a sequence. The
    requested array has an inhomogeneous shape"), naming no argument."""
    lm = _tiny_seed_opt()
    ragged = [[5, 6, 7], [5, 6]]
    for call, name in [(lambda: lm.generate(ragged, 2), "input_ids"), (lambda: lm.logits(ragged), "input_ids"),
                       (lambda: lm.generate([[5, 6, 7]] * 2, 2, attention_mask=[[1, 1, 1], [1, 1]]),
                        "attention_mask"),
                       (lambda: lm.caption_codes([[0] * 32, [0] * 31]), "codes"),
                       (lambda: lm.answer_codes([[0] * 32, [0] * 31], ["a", "red"]), "codes")]:
        with pytest.raises(ValueError, match=rf"^{name}: expected an array \(nested lists with rows of one length\)"):
            call()


def test_questions_and_prompts_that_are_not_strings_fail_naming_them():
    """format() wrote a question None as "Question: None Short answer." and a prompt 3
    as "Generate an image: 3", silently; a numpy array of prompts failed with "the truth
    value of an array ... is ambiguous"."""
    lm = _tiny_seed_opt()
    codes = np.zeros((2, 32), int)
    with pytest.raises(ValueError, match="questions\\[0\\]: expected a string, got None"):
        lm.answer_codes(codes, [None, "a red star"], max_new_tokens=2)
    with pytest.raises(ValueError, match="questions: expected a list of 2 strings, one per image, got 1 of them"):
        lm.answer_codes(codes, ["a"], max_new_tokens=2)
    with pytest.raises(ValueError, match="questions: expected a list of 2 strings, one per image, got 'a red star'"):
        lm.answer_codes(codes, "a red star", max_new_tokens=2)
    with pytest.raises(ValueError, match="prompts\\[1\\]: expected a string, got 3"):
        lm.image_codes(["a red star", 3])
    with pytest.raises(ValueError, match="prompts: expected a non-empty list of strings, got 0 of them"):
        lm.image_codes([])
    prompts = ["a red star", "star"]
    np.testing.assert_array_equal(lm.image_codes(np.asarray(prompts)), lm.image_codes(prompts))


@pytest.mark.parametrize("option, message", [
    (dict(temperature=float("nan")), "temperature: expected a finite number >= 0"),
    (dict(temperature=float("inf")), "temperature: expected a finite number >= 0"),
    (dict(temperature=-0.5), "temperature: expected a finite number >= 0"),
    (dict(temperature=None), "temperature: .*got None, which transformers' generate reads as 1.0 with do_sample=True "
                             "and as greedy without"),
    (dict(temperature=1.0, top_k=2.5), "top_k: expected an integer >= 0"),
    (dict(temperature=1.0, top_k=-1), "top_k: expected an integer >= 0"),
    (dict(temperature=1.0, top_p=float("nan")), "top_p: expected a number 0 < top_p <= 1"),
    (dict(temperature=1.0, top_p=0.0), "top_p: expected a number 0 < top_p <= 1"),
    # of the wrong type: a string failed in numpy or in a comparison (TypeError), a bool was read as 1
    (dict(temperature="0.7"), "temperature: expected a finite number >= 0 .*got '0.7'"),
    (dict(temperature=True), "temperature: expected a finite number >= 0 .*got True"),
    (dict(temperature=1.0, top_p="0.9"), "top_p: expected a number 0 < top_p <= 1 .*got '0.9'"),
    (dict(temperature=1.0, top_p=[0.9]), r"top_p: expected a number 0 < top_p <= 1 .*got \[0.9\]"),
    (dict(temperature=1.0, top_p=True), "top_p: expected a number 0 < top_p <= 1 .*got True"),
    (dict(temperature=1.0, top_k="5"), "top_k: expected an integer >= 0 .*got '5'"),
    (dict(temperature=1.0, top_k=True), "top_k: expected an integer >= 0 .*got True"),
    (dict(temperature=1.0, seed=1.5), r"seed: expected an integer in \[0, 2\*\*32\), got 1.5"),
    (dict(temperature=1.0, seed="1"), r"seed: expected an integer in \[0, 2\*\*32\), got '1'"),
])
def test_sampling_options_outside_their_range_fail_naming_them(option, message):
    """A NaN temperature sampled token 0 at every step, an infinite one turned the
    `allowed` ranges' -inf into NaN and emitted token 0 outside them (an image code
    that is not a code token); a fractional top_k failed inside lax.top_k. A string
    temperature or top_p failed with numpy's or a comparison's TypeError, naming neither
    (through generate, caption_codes and image_codes); True was read as 1."""
    lm = _tiny_seed_opt()
    with pytest.raises(ValueError, match=message):
        lm.generate(np.full((2, 4), 5), 3, allowed=[(10, 20)] * 3, **option)
    if "temperature" in option:  # the SEED methods hand them to the same check
        with pytest.raises(ValueError, match=message):
            lm.caption_codes(np.zeros((1, lm.num_queries), np.int32), max_new_tokens=2, **option)
        with pytest.raises(ValueError, match=message):
            lm.image_codes(["a red star"], **option)


@pytest.mark.parametrize("option, message", [
    (dict(num_beams=2, length_penalty=float("nan")), "length_penalty: expected a finite number, got nan"),
    (dict(num_beams=2, length_penalty=float("inf")), "length_penalty: expected a finite number, got inf"),
    (dict(num_beams=2, length_penalty=-float("inf")), "length_penalty: expected a finite number, got -inf"),
    (dict(num_beams=2, length_penalty="2"), "length_penalty: expected a finite number, got '2'"),
    (dict(num_beams=2.0), r"num_beams: expected an integer >= 1 \(1: no beam search\), got 2.0"),
    (dict(max_new_tokens=3.0), r"max_new_tokens: expected an integer in 1..61 \(the model has 64 positions\), "
                               "got 3.0"),
    (dict(max_new_tokens=True), "max_new_tokens: expected an integer in 1..61"),
    (dict(eos_id=10**6), r"eos_id: expected None or a token id in \[0, \d+\), got 1000000"),
    (dict(eos_id=-1, num_beams=2), r"eos_id: expected None or a token id in \[0, \d+\), got -1"),
    (dict(eos_id=[2, 3]), r"eos_id: generate ends rows at one token, got \[2, 3\]"),
    (dict(pad_id=1.5), r"pad_id: expected a token id in \[0, \d+\), got 1.5"),
    (dict(pad_id=2**31), r"pad_id: expected a token id in \[0, \d+\), got 2147483648"),
    (dict(pad_id=2**31, num_beams=2), r"pad_id: expected a token id in \[0, \d+\), got 2147483648"),
    (dict(pad_id=-1), r"pad_id: expected a token id in \[0, \d+\), got -1"),
    (dict(eos_id=2**31), r"eos_id: expected None or a token id in \[0, \d+\), got 2147483648"),
])
def test_decoding_options_of_the_wrong_kind_fail_naming_them(option, message):
    """A NaN or -inf length_penalty scored every finished hypothesis NaN, and beam
    search returned pad tokens alone: captions came back empty, silently (+inf scored
    every hypothesis longer than one token 0, a tie). An eos_id outside the vocabulary
    ended no row, silently. A float num_beams or max_new_tokens failed inside jit
    ("broadcast_in_dim shape must have every element be an integer type"), a list of
    eos ids as a "non-hashable static argument", naming neither. A pad_id past int32 failed
    in numpy (OverflowError) and one outside the vocabulary padded with no token."""
    options = {"max_new_tokens": 3, **option}
    with pytest.raises(ValueError, match=message):
        _tiny_seed_opt().generate(np.full((2, 4), 5), **options)


@pytest.mark.parametrize("num_beams", [1, 2])
def test_a_numpy_integer_max_new_tokens_decodes_as_the_python_integer(num_beams):
    """A numpy max_new_tokens (e.g. computed from the prompts' mask) passed the check,
    then failed: "'numpy.int64' object has no attribute 'bit_length'"."""
    lm = _tiny_seed_opt()
    ids = np.random.default_rng(0).integers(3, 10, (2, 4))
    for steps in (np.int64(5), np.int32(5)):
        np.testing.assert_array_equal(lm.generate(ids, steps, num_beams=num_beams),
                                      lm.generate(ids, 5, num_beams=num_beams))


def test_a_list_of_end_ids_is_named_as_the_model_s_only_when_it_is():
    """A list passed as eos_id was reported as "the converted model's end tokens",
    though the model here has none: only the model's own list is named so."""
    lm = _tiny_seed_opt()
    assert lm.eos_id is None
    with pytest.raises(ValueError, match=r"^eos_id: generate ends rows at one token, got \[2, 3\]: pass one") as given:
        lm.generate(np.full((2, 4), 5), 3, eos_id=[2, 3])
    assert "converted model" not in str(given.value)
    listing = _tiny_seed_opt(eos_id=[2, 3])  # as `load` makes it of a folder whose eos_token_id lists two
    with pytest.raises(ValueError, match=r"got \[2, 3\] \(the converted model's end tokens\): pass one"):
        listing.generate(np.full((2, 4), 5), 3)


@pytest.mark.parametrize("batch_size", [2.5, 0, True])
def test_a_batch_size_that_is_no_count_fails_naming_it(batch_size):
    """A float batch_size failed at the first call, in range(): "'float' object cannot
    be interpreted as an integer"."""
    with pytest.raises(ValueError, match=f"batch_size: expected an integer >= 1, got {batch_size}"):
        _tiny_seed_opt(batch_size=batch_size)


@pytest.mark.parametrize("name", ["temperature", "top_k", "top_p"])
def test_a_sampling_built_from_traced_values_fails_naming_them(name):
    """Whether it samples, and its checked values, are told when a Sampling is built, so
    it cannot be built inside jit from traced ones: that failed with a tracer
    conversion error naming none."""
    build = {"temperature": lambda value: generation.Sampling(temperature=value),
             "top_k": lambda value: generation.Sampling(temperature=1.0, top_k=value),
             "top_p": lambda value: generation.Sampling(temperature=1.0, top_p=value)}[name]
    with pytest.raises(ValueError, match=f"{name}: expected a number, got a traced value: build the Sampling outside"):
        jax.jit(lambda value: build(value).top_k)(0.5)


def test_a_seed_tokenizer_with_another_number_of_codes_is_rejected():
    """generate_image painted the model's 16 code tokens as the first 16 of the SEED
    tokenizer's 64 codes, and caption failed with "codes: values must lie in [0, 16)"
    for images: the pair must agree on the number of codes."""
    from helpers import TINY_TOKENIZER
    from seed_jax.api import SeedTokenizer
    from seed_jax.models.tokenizer import SeedTokenizer as SeedTokenizerModel

    tokenizer = SeedTokenizer(SeedTokenizerModel(TINY_TOKENIZER, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="tokenizer: its 64 codes, the model's image tokens hold 16 codes"):
        _tiny_seed_opt(tokenizer=tokenizer)
    assert _tiny_seed_opt().image_codes(["a red star"]).shape == (1, 32)  # without a tokenizer: no check


def test_a_text_tokenizer_reaching_the_image_tokens_is_rejected():
    """A text tokenizer with more ids than the model's text vocabulary was accepted: its
    ids from there on are the image tokens, so a question's " red" read as <img_00000>,
    and answers came from a prompt training never saw, without an error."""
    lm = _tiny_seed_opt()
    larger = opt_text.OPTTextTokenizer(opt_text.word_bpe(["a", "red", "star", "photo", "of", "photograph"]))
    assert lm.builder.image.name(larger.encode(" red")[0]) == "<img_00000>"
    with pytest.raises(ValueError, match=rf"text_tokenizer: its {larger.vocab_size} ids exceed the model's text "
                                         rf"vocabulary of {lm.config.vocab_size}"):
        SeedOPT(lm.model, image_token_ids=lm.image_token_ids, text_tokenizer=larger)


def test_a_text_tokenizer_file_that_is_no_tokenizer_json_is_named(tmp_path):
    """SeedOPT.load(text_tokenizer=) of OPT's vocab.json (any file but a tokenizers
    JSON) failed as the tokenizers library's bare Exception, "expected `,` or `}` at
    line 1 column 5", naming no file; the error now names it and what it must be."""
    lm = _tiny_seed_opt()
    out = str(tmp_path / "export")
    weights.save(out, "opt", lm.config, weights.flat_params(lm.model))
    vocab = tmp_path / "vocab.json"
    vocab.write_text(json.dumps({"a": 0, "b": 1}))
    with pytest.raises(ValueError, match=rf"text tokenizer: '{vocab}' is not a tokenizer.json of the tokenizers "
                                         r"library \(expected .*\); OPT's vocab.json and merges.txt are read from "
                                         "their folder"):
        SeedOPT.load(out, text_tokenizer=str(vocab))


def _tiny_diffusion():
    """A StableDiffusion API over a random pixel-space tiny UNet for the tiny SEED tokenizer's 24-wide embeddings."""
    from helpers import TINY_DIFFUSION
    from seed_jax.models.stable_diffusion import StableDiffusion as StableDiffusionModel

    return api.StableDiffusion(StableDiffusionModel(TINY_DIFFUSION, rngs=nnx.Rngs(0)))


@pytest.mark.parametrize("diffusion, options, message", [
    (None, {}, r"generate_image needs a diffusion model: SeedOPT.load\(\.\.\., tokenizer=SEED_EXPORT, "
               "diffusion=SD_EXPORT\\)"),
    (True, dict(sampler="euler"), "sampler: expected one of"),
    (True, dict(num_steps=0), "num_steps: expected"),
    (True, dict(guidance_scale=float("nan")), "guidance_scale: expected a finite number"),
])
def test_generate_image_checks_its_decode_options_before_the_language_model_runs(diffusion, options, message,
                                                                                  monkeypatch):
    """generate_image ran the language model's 33 decoding steps, then failed on a bad
    sampler, num_steps or guidance_scale, or for want of a diffusion model or of the
    SEED tokenizer; all are now checked first. Without a diffusion model it said to give
    one to SeedTokenizer.load; it now names SeedOPT.load's."""
    from helpers import TINY_TOKENIZER
    from seed_jax.api import SeedTokenizer
    from seed_jax.models.tokenizer import SeedTokenizer as SeedTokenizerModel

    lm = _tiny_seed_opt()

    def generate(*args, **kwargs):
        raise AssertionError("the language model ran before the options were checked")

    monkeypatch.setattr(lm, "generate", generate)
    with pytest.raises(ValueError, match="images need the SEED tokenizer"):
        lm.generate_image(["a red star"], **options)
    model = SeedTokenizerModel(dataclasses.replace(TINY_TOKENIZER, num_codes=16), rngs=nnx.Rngs(0))
    lm.tokenizer = SeedTokenizer(model, diffusion=_tiny_diffusion() if diffusion else None)
    with pytest.raises(ValueError, match=message):
        lm.generate_image(["a red star"], **options)
    with pytest.raises(TypeError, match="unexpected keyword argument 'steps'"):
        lm.generate_image(["a red star"], steps=3)


def _seed_opt_with_images(diffusion: bool = True) -> SeedOPT:
    """`_tiny_seed_opt` with a random tiny SEED tokenizer of 16 codes (and `_tiny_diffusion`)."""
    from helpers import TINY_TOKENIZER
    from seed_jax.api import SeedTokenizer
    from seed_jax.models.tokenizer import SeedTokenizer as SeedTokenizerModel

    model = SeedTokenizerModel(dataclasses.replace(TINY_TOKENIZER, num_codes=16), rngs=nnx.Rngs(0))
    return _tiny_seed_opt(tokenizer=SeedTokenizer(model, diffusion=_tiny_diffusion() if diffusion else None))


@pytest.mark.parametrize("method, arguments, options, message", [
    ("answer", [["a red star"]], {}, "questions: expected a list of 2 strings, one per image, got 1 of them"),
    ("answer", [None], {}, "questions: expected a list of 2 strings, one per image, got None"),
    ("answer", [["a", "red"]], dict(text_tokenizer=None), "this SeedOPT has no text tokenizer"),
    ("caption", [], dict(text_tokenizer=None), "this SeedOPT has no text tokenizer"),
    ("reconstruct", [], dict(num_steps=0), "num_steps: expected"),
    ("reconstruct", [], dict(sampler="euler"), "sampler: expected one of"),
    ("reconstruct", [], dict(diffusion=None), "decode needs a diffusion model"),
    ("caption", [], dict(max_new_tokens=0), r"max_new_tokens: expected an integer in 1\.\.\d+ \(the model has 64"),
    ("caption", [], dict(max_new_tokens=60), r"max_new_tokens: expected an integer in 1\.\.\d+ \(the model has 64"),
    ("caption", [], dict(num_beams=2, top_k=3), r"num_beams > 1 \(beam search\) takes no top_k"),
    ("caption", [], dict(length_penalty=2.0), "length_penalty=2.0 applies to beam search only"),
    ("answer", [["a", "red"]], dict(top_p=0.0), "top_p: expected a number 0 < top_p <= 1"),
    ("answer", [["a", "red"]], dict(seed=-1), "seed: expected an integer in"),
    ("answer", [["a", "red"]], dict(num_beams=0), "num_beams: expected an integer >= 1"),
])
def test_images_are_not_encoded_before_the_other_arguments_are_checked(method, arguments, options, message,
                                                                       monkeypatch):
    """answer encoded every image, then failed for a question list of another length
    (or for want of a text tokenizer, as caption did); reconstruct encoded every image,
    then failed on a bad decode option or for want of a diffusion model; both encoded
    every image, then failed on a bad generation option."""
    lm = _seed_opt_with_images(diffusion=options.pop("diffusion", True) is not None)
    if "text_tokenizer" in options:
        lm.text_tokenizer = options.pop("text_tokenizer")

    def encode(*args, **kwargs):
        raise AssertionError("the images were encoded before the arguments were checked")

    monkeypatch.setattr(lm.tokenizer, "_encode", encode)  # the compiled encoder, whichever method runs it
    run = getattr(lm.tokenizer, method) if method == "reconstruct" else getattr(lm, method)
    with pytest.raises(ValueError, match=message):
        run(np.zeros((2, 40, 40, 3), np.uint8), *arguments, **options)


def test_image_codes_and_generate_image_take_beam_search(monkeypatch):
    """image_codes and generate_image had no num_beams (beam search refused their
    `allowed` ranges). With num_beams > 1 they now search beams over the same steps:
    32 codes in range, then </img>; generate_image's seed then seeds the diffusion alone."""
    lm = _tiny_seed_opt()
    image, prompts = lm.builder.image, ["a red star", "red"]
    generate, generated, decoded = lm.generate, [], []
    monkeypatch.setattr(lm, "generate", lambda *a, **o: generated.append((o, generate(*a, **o))) or generated[-1][1])
    codes = lm.image_codes(prompts, num_beams=3)
    (options, tokens), = generated
    assert (options["num_beams"], tokens.shape) == (3, (2, 33))
    assert ((tokens[:, :32] >= image.first_code) & (tokens[:, :32] < image.first_code + 16)).all()
    assert (tokens[:, 32] == image.end).all()
    np.testing.assert_array_equal(codes, image.to_codes(tokens[:, :32]))

    class Tokenizer:  # the SEED tokenizer's decoding, recorded
        def check_decode_options(self, **options):
            pass

        def decode(self, codes, **options):
            decoded.append((codes, options))

    lm.tokenizer = Tokenizer()
    lm.generate_image(prompts, num_beams=3, seed=5, num_steps=2)
    np.testing.assert_array_equal(decoded[0][0], codes)
    assert decoded[0][1] == dict(seed=5, num_steps=2) and len(generated) == 2
    with pytest.raises(ValueError, match=r"num_beams > 1 \(beam search\) takes no temperature"):
        lm.generate_image(prompts, num_beams=3, temperature=1.0)


def test_a_misspelt_caption_option_fails_before_the_images_are_encoded(monkeypatch):
    lm = _seed_opt_with_images(diffusion=False)
    monkeypatch.setattr(lm.tokenizer, "_encode", lambda *args, **kwargs: pytest.fail("images encoded"))
    with pytest.raises(TypeError, match=r"unexpected options \['temprature'\]: captions and answers take"):
        lm.caption(np.zeros((2, 40, 40, 3), np.uint8), temprature=1.0)


def test_default_caption_and_answer_lengths_fit_the_models_positions(monkeypatch):
    """caption_codes' default of 30 new tokens failed on a 64-position model, whose
    45-token caption prompt leaves room for 20, though the user passed nothing (as did
    answer_codes' 10 after a longer question); where there is room the defaults stay
    30 and 10."""
    lm = _tiny_seed_opt()
    codes = np.zeros((2, 32), int)
    room = lm.config.max_positions + 1 - len(lm.builder.caption_prompt(codes[0]))
    answer_room = lm.config.max_positions + 1 - len(lm.builder.question_prompt(codes[0], "a red star a red star"))
    assert room < 30 and answer_room < 10
    assert lm.caption_codes(codes) == lm.caption_codes(codes, max_new_tokens=room)
    asked = []
    generate = lm.generate
    monkeypatch.setattr(lm, "generate", lambda ids, **kwargs: asked.append(kwargs["max_new_tokens"])
                        or generate(ids, **kwargs))
    lm.caption_codes(codes)
    lm.answer_codes(codes, ["a", "a red star a red star"])
    big = _tiny_seed_opt(max_positions=128)
    monkeypatch.setattr(big, "generate", lambda ids, **kwargs: asked.append(kwargs["max_new_tokens"])
                        or np.full((len(ids), 1), big.text_tokenizer.eos_id))
    big.caption_codes(codes)
    big.answer_codes(codes, ["a", "red"])
    assert asked == [room, answer_room, 30, 10]


def test_answer_of_images_is_answer_codes_of_their_codes():
    lm = _seed_opt_with_images(diffusion=False)
    images = np.random.default_rng(0).integers(0, 256, (2, 40, 40, 3), np.uint8)
    questions = ["a red star", "star"]
    expected = lm.answer_codes(lm.tokenizer.encode(lm.tokenizer.preprocess(images)), questions, max_new_tokens=2)
    assert lm.answer(images, (q for q in questions), max_new_tokens=2) == expected  # questions read once


def _adapted(model, config, rank=4, extra=6):
    """`model` with LoRA on every target and `extra` appended token rows, all set to
    non-zero random values (B starts at zero; that would hide a wrong merge)."""
    adapted_config = dataclasses.replace(config, lora_rank=rank, extra_tokens=extra)
    adapted = weights.build("opt", adapted_config)
    weights.assign(adapted, weights.flat_params(model))
    rng = np.random.default_rng(3)
    extra_params = {k: 0.05 * rng.standard_normal(v.shape).astype(np.float32)
                    for k, v in weights.flat_params(adapted).items() if "lora_" in k or k == "embed_extra"}
    weights.assign(adapted, extra_params)
    return adapted, adapted_config


def test_lora_a_starts_as_pefts(converted):
    """peft starts A as torch's Linear: kaiming-uniform with a = sqrt(5), bound
    gain * sqrt(3 / fan_in) (1 / sqrt(fan_in)); it started as a truncated normal of
    std 1 / sqrt(fan_in), which under Adam takes LoRA's first steps sqrt(3) times as far."""
    _, model, _ = converted
    adapted = weights.build("opt", dataclasses.replace(model.config, lora_rank=8))
    scaled = []  # each A over its bound: uniform in [-1, 1] as peft draws it
    for name, a in weights.flat_params(adapted).items():
        if "lora_a" in name:
            fan_in = int(np.prod(a.shape[1:-1]))  # (layers, *in, rank)
            bound = torch.nn.init.calculate_gain("leaky_relu", math.sqrt(5)) * math.sqrt(3 / fan_in)
            scaled.append(np.asarray(a).ravel() / bound)
    scaled = np.concatenate(scaled)
    assert len(scaled) > 3000 and np.abs(scaled).max() <= 1 + 1e-6
    np.testing.assert_allclose(scaled.std(), 1 / math.sqrt(3), rtol=0.05)
    np.testing.assert_allclose(np.mean(np.abs(scaled) > 0.9), 0.1, atol=0.03)


def test_lora_merge_gives_the_adapted_model(converted):
    _, model, _ = converted
    adapted, config = _adapted(model, model.config)
    ids = np.random.default_rng(0).integers(0, config.total_vocab_size, (2, 9))
    merged_config, merged_params = merge_lora(config, weights.flat_params(adapted))
    assert merged_config.lora_rank == 0 and not [k for k in merged_params if "lora" in k]
    merged = weights.materialize(weights.build("opt", merged_config, abstract=True), merged_params)
    np.testing.assert_allclose(merged(ids)[0], adapted(ids)[0], atol=1e-4)
    base_ids = ids % 100  # the base model's vocabulary: adapters alone must change its logits
    assert not np.allclose(adapted(base_ids)[0][..., :100], model(base_ids)[0], atol=1e-4)


def _with_peft_style_lora(hf, params, config):
    """A copy of `hf` with `params`' appended rows in its tied embedding and their LoRA
    restated as peft computes it: each adapted projection's output gains
    (alpha / rank) x A B (A: in -> rank, B: rank -> out)."""
    hf = copy.deepcopy(hf)
    hf.resize_token_embeddings(config.total_vocab_size, mean_resizing=False)
    with torch.no_grad():
        hf.model.decoder.embed_tokens.weight[config.vocab_size:] = torch.tensor(np.asarray(params["embed_extra"]))
    scale, rank = config.lora_alpha / config.lora_rank, config.lora_rank

    def add_lora(module, a, b):
        a, b = torch.tensor(np.asarray(a)).reshape(-1, rank), torch.tensor(np.asarray(b)).reshape(rank, -1)
        module.register_forward_hook(lambda _, inputs, out: out + scale * (inputs[0] @ a) @ b)

    for i, layer in enumerate(hf.model.decoder.layers):
        attn = layer.self_attn
        for ours, module in (("query", attn.q_proj), ("key", attn.k_proj), ("value", attn.v_proj),
                             ("out", attn.out_proj)):
            add_lora(module, params[f"layers.self_attn.{ours}_lora_a"][i], params[f"layers.self_attn.{ours}_lora_b"][i])
        for name in ("fc1", "fc2"):
            add_lora(getattr(layer, name), params[f"layers.{name}.lora_a"][i], params[f"layers.{name}.lora_b"][i])
    return hf


def test_packed_lora_loss_is_transformers_loss_of_each_sequence_alone(converted):
    """SEED-OPT's training loss on a packed row (three sequences and padding, LoRA at
    alpha / rank = 3 and appended rows) is the masked mean cross-entropy transformers
    gives each sequence run alone (labels shifted in the sequence, -100 off the mask),
    pooled over the targets of all sequences: attention and positions restart at each
    segment and no target crosses a boundary."""
    from seed_jax.trainers.seed_opt import lm_loss

    hf, model, _ = converted
    adapted, config = _adapted(model, dataclasses.replace(model.config, lora_alpha=12.0))
    reference = _with_peft_style_lora(hf, weights.flat_params(adapted), config)
    rng = np.random.default_rng(4)
    sequences = [rng.integers(3, config.total_vocab_size, n) for n in (8, 6, 10)]
    masks = [rng.integers(0, 2, len(s)) for s in sequences]  # masks[k][i]: sequences[k][i] is a target
    total, count = 0.0, 0
    for ids, mask in zip(sequences, masks):  # transformers shifts the labels itself
        with torch.no_grad():
            out = reference(torch.tensor(ids[None]), labels=torch.tensor(np.where(mask > 0, ids, -100)[None]))
        total += out.loss.item() * mask[1:].sum()
        count += mask[1:].sum()
    starts = np.cumsum([0] + [len(s) - 1 for s in sequences])
    inputs = np.concatenate([s[:-1] for s in sequences] + [np.full(3, 1)])
    target_index = np.concatenate([start + np.nonzero(m[1:])[0] for start, m in zip(starts, masks)])
    target_ids = np.concatenate([s[1:][np.nonzero(m[1:])[0]] for s, m in zip(sequences, masks)])
    padded = lambda x: np.concatenate([x, np.zeros(4, int)])[None].astype(np.int32)  # noqa: E731
    batch = {"inputs": inputs[None].astype(np.int32),
             "segment_ids": np.concatenate([np.full(len(s) - 1, k + 1) for k, s in enumerate(sequences)]
                                           + [np.zeros(3, int)])[None].astype(np.int32),
             "positions": np.concatenate([np.arange(len(s) - 1) for s in sequences] + [np.zeros(3, int)])[None]
                          .astype(np.int32),
             "target_index": padded(target_index), "target_ids": padded(target_ids),
             "target_mask": padded(np.ones(count, int))}
    loss, (metrics, _) = lm_loss(adapted, batch, None)
    assert int(metrics["target_tokens"]) == count
    np.testing.assert_allclose(float(loss), total / count, rtol=1e-5)


def test_only_adapters_and_new_token_rows_train(converted):
    """A train step with the SEED-OPT split (LoRA factors and appended rows trainable,
    the rest frozen) changes exactly those parameters."""
    _, model, _ = converted
    adapted, config = _adapted(model, model.config)
    graphdef, trainable, frozen = nnx.split(adapted, trainable_filter, ...)
    tx = optax.adam(1e-2)
    ids = np.random.default_rng(1).integers(0, config.total_vocab_size, (2, 9))

    def loss(params):
        logits, _ = nnx.merge(graphdef, params, frozen)(ids[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

    grads = jax.grad(loss)(trainable)
    updates, _ = tx.update(grads, tx.init(trainable), trainable)
    new = optax.apply_updates(trainable, updates)
    names = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(trainable)}
    assert names == {k for k in weights.flat_params(adapted) if "lora_" in k or k == "embed_extra"}
    changed = jax.tree.leaves(jax.tree.map(lambda a, b: not np.array_equal(a, b), trainable, new))
    assert all(changed)


def test_a_loop_step_keeps_frozen_weights_bit_identical_and_state_only_for_trainables(converted):
    """The shared loop's step on the SEED-OPT split, with weight decay: the base
    weights and the vocabulary's own (tied input and output) rows stay bit-identical,
    every adapter factor and appended row moves, and AdamW holds moments for those alone."""
    _, model, _ = converted
    adapted, config = _adapted(model, model.config)
    before = {k: np.array(v) for k, v in weights.flat_params(adapted).items()}
    stage = ml_collections.ConfigDict(dict(lr=1e-2, init_lr=1e-2, end_lr=1e-3, warmup_steps=0, num_steps=2,
                                           weight_decay=0.1, b1=0.9, b2=0.98))
    run = ml_collections.ConfigDict(dict(axis_rules=parallel.DEFAULT_RULES, seed=0))

    def loss_fn(model, batch, rng):
        logits, _ = model(batch["ids"][:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["ids"][:, 1:]).mean(), ({}, {})

    mesh = parallel.make_mesh({"data": 1}, devices=jax.devices()[:1])
    setup = loop.prepare_stage(adapted, trainable_filter, loss_fn, stage, run, mesh)
    trained = {k for k in before if "lora_" in k or k == "embed_extra"}
    moments = sum(x.size for x in jax.tree.leaves(setup.state["opt_state"]) if x.ndim)
    assert moments == 2 * sum(before[k].size for k in trained)
    ids = np.random.default_rng(1).integers(0, config.total_vocab_size, (2, 9)).astype(np.int32)
    state, _ = setup.train_step(setup.state, setup.frozen, global_batches.global_batch({"ids": ids}, mesh,
                                                                                        run.axis_rules))
    nnx.update(adapted, state["params"])
    after = {k: np.asarray(v) for k, v in weights.flat_params(adapted).items()}
    assert {k for k in before if not np.array_equal(before[k], after[k])} == trained


def _projected(rank=4, num_codes=12, code_dim=8, **fields):
    """A tiny OPT with LoRA whose code tokens go through the codebook projection,
    every parameter (code vectors included) set to non-zero random values."""
    config = OPTConfigOurs(vocab_size=100, width=32, depth=2, num_heads=4, mlp_dim=64, max_positions=64,
                           extra_tokens=2 + num_codes, code_dim=code_dim, lora_rank=rank, **fields)
    model = weights.build("opt", config)
    rng = np.random.default_rng(5)
    weights.assign(model, {k: 0.05 * rng.standard_normal(v.shape).astype(np.float32)
                           for k, v in weights.flat_params(model).items()})
    return model, config


def test_codebook_projection_embeds_codes_as_a_linear_map_of_the_codebook():
    model, config = _projected()
    params = {k: np.asarray(v) for k, v in weights.flat_params(model).items()}
    assert params["embed_extra"].shape == (2, 32) and params["code_vectors"].shape == (12, 8)
    expected = params["code_vectors"] @ params["code_projection.kernel"] + params["code_projection.bias"]
    table = np.asarray(model.token_table())
    assert table.shape == (config.total_vocab_size, 32)
    np.testing.assert_allclose(table[102:], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(table[100:102], params["embed_extra"])
    ids = np.asarray([[5, 100, 102, 113, 101]])  # text, <img>, codes 0 and 11, </img>
    logits, _ = model(ids)
    assert logits.shape == (1, 5, 114)
    with pytest.raises(ValueError, match="code_dim: needs codes appended"):
        weights.build("opt", dataclasses.replace(config, extra_tokens=2))


@pytest.mark.parametrize("head", ["tied", "untied"])
def test_few_rows_read_the_token_blocks_apart_as_many_rows_read_one_table(head):
    """The token table is three blocks here (vocabulary, <img> and </img>, projected codes).
    Ids at every block's edges look up the table's rows (an id past the end its last row),
    and the logits of one row of 6 tokens (6 <= the width 32: each block's logits,
    concatenated) are those of the same row among 8 (48 > 32: through the concatenated table)."""
    model, config = _projected(tie_embeddings=head == "tied")
    ids = np.asarray([[0, 99, 100, 101, 102, 113]])  # the vocabulary's first and last, <img>, </img>, codes 0 and 11
    table = np.asarray(model.token_table())
    looked_up = np.asarray(opt_model._look_up(model._token_blocks(), jnp.asarray(np.append(ids, [[114]], 1))))
    np.testing.assert_array_equal(looked_up[0], table[[*ids[0], 113]])
    few, _ = model(ids)
    many, _ = model(np.tile(ids, (8, 1)))
    assert few.shape == (1, 6, config.total_vocab_size)
    np.testing.assert_allclose(few[0], many[3], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("split", ["lora", "train_all"])
def test_codebook_projection_trains_and_the_codebook_stays_frozen(split):
    model, config = _projected()
    filter_ = trainable_filter if split == "lora" else train_all_filter
    graphdef, trainable, frozen = nnx.split(model, filter_, ...)
    names = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(trainable)}
    every = set(weights.flat_params(model))
    if split == "lora":
        assert names == {k for k in every if "lora_" in k or k == "embed_extra" or k.startswith("code_projection")}
    else:
        assert names == every - {"code_vectors"}
    ids = np.random.default_rng(1).integers(0, config.total_vocab_size, (2, 9))

    def loss(params):
        logits, _ = nnx.merge(graphdef, params, frozen)(ids[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

    tx = optax.adam(1e-2)
    updates, _ = tx.update(jax.grad(loss)(trainable), tx.init(trainable), trainable)
    new = optax.apply_updates(trainable, updates)
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: not np.array_equal(a, b), trainable, new)))


def test_codebook_projection_survives_lora_merge_and_export(tmp_path):
    model, config = _projected()
    ids = np.random.default_rng(2).integers(0, config.total_vocab_size, (2, 9))
    merged_config, merged_params = merge_lora(config, weights.flat_params(model))
    weights.save(str(tmp_path / "export"), "opt", merged_config, merged_params)
    loaded, _, loaded_config = weights.load_model(str(tmp_path / "export"), kind="opt")
    assert loaded_config.code_dim == 8 and loaded_config.lora_rank == 0
    np.testing.assert_allclose(loaded(ids)[0], model(ids)[0], atol=1e-4)


def _lora_losses(mesh, num_steps=3):
    config = OPTConfigOurs(vocab_size=100, width=32, depth=2, num_heads=4, mlp_dim=64, max_positions=64,
                           extra_tokens=10, lora_rank=4)
    model = weights.build("opt", config)
    stage = ml_collections.ConfigDict(dict(lr=1e-2, init_lr=1e-3, end_lr=1e-3, warmup_steps=1, num_steps=num_steps,
                                           weight_decay=0.0, b1=0.9, b2=0.999))
    run = ml_collections.ConfigDict(dict(axis_rules=parallel.DEFAULT_RULES, seed=0))

    def loss_fn(model, batch, rng):
        logits, _ = model(batch["ids"][:, :-1])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["ids"][:, 1:]).mean()
        return loss, ({}, {})

    setup = loop.prepare_stage(model, trainable_filter, loss_fn, stage, run, mesh)
    # one batch throughout: uniform random tokens anew each step leave nothing to learn
    # beyond ln(110), so the loss need not fall; on one batch it must
    ids = np.random.default_rng(0).integers(0, 110, (8, 12)).astype(np.int32)
    state, losses = setup.state, []
    for _ in range(num_steps):
        batch = global_batches.global_batch({"ids": ids}, mesh, run.axis_rules)
        state, metrics = setup.train_step(state, setup.frozen, batch)
        losses.append(float(metrics["loss"]))
    return losses, state


def test_lora_train_step_same_loss_on_1_and_8_devices():
    losses_1, _ = _lora_losses(parallel.make_mesh({"data": 1}, devices=jax.devices()[:1]))
    losses_8, state_8 = _lora_losses(parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}))
    np.testing.assert_allclose(losses_8, losses_1, rtol=1e-4)
    assert losses_1[-1] < losses_1[0]
    specs = " ".join(str(leaf.sharding.spec) for leaf in jax.tree.leaves(state_8["params"]))
    assert "fsdp" in specs and "tensor" in specs, specs


MID_SIZE = {  # opt_125m's shape; a 350m-like post-LN one with project_in/out at a third of its depth
    "pre_ln_125m": dict(vocab_size=50272, hidden_size=768, num_hidden_layers=12, ffn_dim=3072, num_attention_heads=12,
                        word_embed_proj_dim=768, do_layer_norm_before=True),
    "post_ln_350m_shallow": dict(vocab_size=50272, hidden_size=1024, num_hidden_layers=8, ffn_dim=4096,
                                 num_attention_heads=16, word_embed_proj_dim=512, do_layer_norm_before=False),
}


@pytest.mark.slow
@pytest.mark.parametrize("variant", sorted(MID_SIZE))
def test_mid_size_logits_and_greedy_tokens_match_transformers(variant, tmp_path):
    """A mid-size Hugging Face OPT folder from random weights, through the CLI with
    the SEED vocabulary extension: transformers' logits on the original vocabulary
    (relative error <= 1e-4) and its greedy tokens for 20 steps."""
    hf_config = OPTConfig(**MID_SIZE[variant], max_position_embeddings=2048, pad_token_id=1, bos_token_id=2,
                          eos_token_id=2)
    hf = randomize(OPTForCausalLM(hf_config), 1).eval()
    hf.save_pretrained(tmp_path / "hf")
    convert(["hf_opt", f"--checkpoint={tmp_path / 'hf'}", f"--out={tmp_path / 'export'}"])
    model = SeedOPT.load(str(tmp_path / "export"))
    assert model.config.total_vocab_size == 50272 + 8194
    rng = np.random.default_rng(0)
    ids = rng.integers(4, 50272, (2, 24)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :7] = 0
    ids[1, :7] = 1
    with torch.no_grad():
        ref = hf(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
        ref_tokens = hf.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                                 max_new_tokens=20, do_sample=False, num_beams=1, eos_token_id=None,
                                 pad_token_id=1).numpy()[:, 24:]
    ours = model.logits(ids, mask)[..., :50272]
    real = mask.astype(bool)
    error = relative_error(ours[real], ref[real])
    print(f"{variant}: logits relative error {error:.2e}")
    assert error <= INTERMEDIATE_TOLERANCE
    # greedy over the extended vocabulary: appended rows must not win, as the reference has none
    tokens = model.generate(ids, 20, attention_mask=mask, allowed=[(0, 50272)] * 20, eos_id=None)
    np.testing.assert_array_equal(tokens, ref_tokens)


def test_bfloat16_logits_are_accumulated_and_kept_in_float32():
    """With bfloat16 compute the logits came out rounded to bfloat16 (8 significant bits),
    what the loss and sampling then read."""
    config = OPTConfigOurs(vocab_size=100, width=32, depth=1, num_heads=2, mlp_dim=64, max_positions=16)
    model = OPT(config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    logits = np.asarray(model(np.arange(3, 11)[None], np.ones((1, 8), np.int32))[0])
    assert logits.dtype == np.float32
    rounded = logits.astype(jnp.bfloat16).astype(np.float32)
    assert (logits != rounded).mean() > 0.5


def test_bfloat16_attention_scores_reach_the_float32_softmax_unrounded():
    """The q.k scores of a bfloat16 layer left the einsum rounded to bfloat16 (0.25 apart
    near 100) before the float32 softmax: the attention output was 2% off the same
    attention given float32 scores of the same bfloat16 q and k."""
    from seed_jax.models.opt import DROPOUT_SITES, DecoderLayer

    config = OPTConfigOurs(vocab_size=100, width=64, depth=1, num_heads=2, mlp_dim=64, max_positions=64)
    layer = DecoderLayer(config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    x = 8.0 * jax.random.normal(jax.random.key(1), (1, 50, 64))
    mask = jnp.tril(jnp.ones((50, 50), bool))[None, None]
    out, _ = layer._attend(x, mask, None, 0, dict.fromkeys(DROPOUT_SITES))
    attn = layer.self_attn
    q = attn.project(x, "query") * attn.head_dim ** -0.5
    scores = jnp.einsum("BLNH,BSNH->BNLS", q.astype(jnp.float32), attn.project(x, "key").astype(jnp.float32))
    assert float(jnp.abs(scores).max()) > 64  # where bfloat16 holds scores to 0.25 or worse
    probs = jax.nn.softmax(jnp.where(mask, scores, jnp.finfo(jnp.float32).min), axis=-1).astype(jnp.bfloat16)
    expected = attn.output(jnp.einsum("BNLS,BSNH->BLNH", probs, attn.project(x, "value")))
    assert relative_error(np.asarray(out, np.float32), np.asarray(expected, np.float32)) < 1e-3


def test_bfloat16_generation_caches_keys_and_values_in_bfloat16():
    """The key/value cache was float32 whatever the compute dtype: a bfloat16 model's
    keys and values, bfloat16 already, took twice the memory (OPT-2.7B, 64 rows of
    2048 positions: 86 GB instead of 43). Generation builds its cache in the compute
    dtype, and cached decoding still follows full recomputation."""
    config = OPTConfigOurs(vocab_size=100, width=32, depth=2, num_heads=2, mlp_dim=64, max_positions=16)
    model = OPT(config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    assert {c.dtype for c in model.init_cache(2, 8).values()} == {jnp.dtype(jnp.bfloat16)}
    cache_dtypes = set()

    class Recording:  # the model generation runs, recording the cache it is given
        config = model.config
        init_cache = model.init_cache

        def __call__(self, *args, cache, **kwargs):
            cache_dtypes.update(c.dtype for c in cache.values())
            return model(*args, cache=cache, **kwargs)

    ids, mask = _prompts()
    generation.generate(Recording(), jnp.asarray(ids), jnp.asarray(mask), max_new_tokens=3)
    assert cache_dtypes == {jnp.dtype(jnp.bfloat16)}
    assert relative_error(*_cached_and_full_logits(model, ids, mask)) <= 1e-2


def test_sharded_bfloat16_folder_converts_to_the_bfloat16_weights(converted, tmp_path):
    """Hub OPT checkpoints are half precision and often sharded: read without torch,
    bfloat16 widens exactly to the float32 export of the same weights."""
    hf, _, _ = converted
    half = copy.deepcopy(hf).to(torch.bfloat16)
    half.save_pretrained(tmp_path / "bf16", max_shard_size="20KB")
    assert len(list((tmp_path / "bf16").glob("*.safetensors"))) > 1
    half.float().save_pretrained(tmp_path / "f32")
    for name in ("bf16", "f32"):
        convert(["hf_opt", f"--checkpoint={tmp_path / name}", f"--out={tmp_path / name}_export", "--image_tokens=0"])
    exported = [nnx.state(weights.load_model(str(tmp_path / f"{name}_export"), kind="opt")[0])
                for name in ("bf16", "f32")]
    jax.tree.map(np.testing.assert_array_equal, *exported)


def test_unknown_lora_targets_or_rank_fail_naming_them():
    """A misspelled target (or PEFT's q_proj naming) used to build a model without
    that adapter, silently; an empty or string target list, or a negative rank, too."""
    base = dict(vocab_size=100, width=32, depth=2, num_heads=4, mlp_dim=64, max_positions=64, lora_rank=4)
    for targets in [("query", "valu"), ("q_proj", "v_proj"), (), "query"]:
        with pytest.raises(ValueError, match=r"lora\.targets: .*expected .*names from"):
            OPTConfigOurs(**base, lora_targets=targets)
    with pytest.raises(ValueError, match=r"lora\.rank: expected a positive integer, got -2"):
        OPTConfigOurs(**{**base, "lora_rank": -2})
    model = weights.build("opt", OPTConfigOurs(**base, lora_targets=("value", "fc2")))
    assert sorted(k for k in weights.flat_params(model) if "lora" in k) == [
        "layers.fc2.lora_a", "layers.fc2.lora_b", "layers.self_attn.value_lora_a", "layers.self_attn.value_lora_b"]


# ---------------------------------------------------------------- training-time dropout
def _random_opt(pre_layer_norm=True, branch=0.3, **fields):
    """A tiny OPT with LoRA (rank 4, scale 1) on every target and random parameters:
    LayerNorm scales 1, embeddings N(0, 1), the residual branches' last weights (out,
    fc2) and lora_b N(0, branch^2), the rest N(0, 0.3^2)."""
    config = OPTConfigOurs(vocab_size=100, width=32, depth=2, num_heads=4, mlp_dim=64, max_positions=64,
                           lora_rank=4, lora_alpha=4.0, pre_layer_norm=pre_layer_norm, **fields)
    model = weights.build("opt", config)
    rng = np.random.default_rng(7)

    def value(name, shape):
        if name.endswith("layer_norm.scale"):
            return np.ones(shape, np.float32)
        std = 1.0 if name in ("embed_tokens", "embed_positions") else (
            branch if any(s in name for s in ("self_attn.out", "fc2", "lora_b")) else 0.3)
        return (std * rng.standard_normal(shape)).astype(np.float32)

    weights.assign(model, {k: value(k, v.shape) for k, v in weights.flat_params(model).items()})
    return model


def _with(model, **fields):
    """`model`'s weights (those it still has) under a config with `fields` replaced."""
    other = weights.build("opt", dataclasses.replace(model.config, **fields))
    params = weights.flat_params(model)
    weights.assign(other, {k: params[k] for k in weights.flat_params(other)})
    return other


IDS = np.random.default_rng(0).integers(0, 100, (2, 8))
RATES = dict(dropout=0.1, attention_dropout=0.1, lora_dropout=0.1)


def test_without_a_key_or_with_zero_rates_dropout_changes_nothing():
    """No key (evaluation, generation) or every rate 0 computes exactly as a model without
    dropout: the same values from the same program (no key is even split)."""
    dropping = _random_opt(**RATES)
    plain = _with(dropping, dropout=0.0, attention_dropout=0.0, lora_dropout=0.0)
    expected = np.asarray(plain(IDS)[0])
    np.testing.assert_array_equal(dropping(IDS)[0], expected)
    np.testing.assert_array_equal(dropping(IDS, dropout_rng=None)[0], expected)
    np.testing.assert_array_equal(plain(IDS, dropout_rng=jax.random.key(0))[0], expected)
    program = str(jax.make_jaxpr(lambda key: plain(IDS)[0])(jax.random.key(0)))
    assert str(jax.make_jaxpr(lambda key: dropping(IDS)[0])(jax.random.key(0))) == program
    assert str(jax.make_jaxpr(lambda key: plain(IDS, dropout_rng=key)[0])(jax.random.key(0))) == program
    # lora_dropout without adapters drops nothing either
    no_lora = _with(plain, lora_rank=0, lora_dropout=0.5)
    np.testing.assert_array_equal(no_lora(IDS, dropout_rng=jax.random.key(0))[0], no_lora(IDS)[0])


@pytest.mark.parametrize("rate", sorted(RATES))
def test_a_key_drops_reproducibly_and_another_key_differently(rate):
    model = _random_opt(**{rate: 0.1})
    plain = np.asarray(model(IDS)[0])
    first = np.asarray(model(IDS, dropout_rng=jax.random.key(1))[0])
    assert not np.allclose(first, plain, atol=1e-3)
    np.testing.assert_array_equal(model(IDS, dropout_rng=jax.random.key(1))[0], first)
    assert not np.allclose(model(IDS, dropout_rng=jax.random.key(2))[0], first, atol=1e-3)


@pytest.mark.parametrize("pre_layer_norm", [True, False])
@pytest.mark.parametrize("rate", sorted(RATES))
def test_logits_averaged_over_keys_are_the_logits_without_dropout(rate, pre_layer_norm):
    """Inverted dropout keeps each dropped value's expectation. The logits are not linear
    in what drops (LayerNorm, softmax and relu follow), but with small residual branches
    and adapters (weights 0.003 against a residual stream of norm ~6) that bias is second
    order in them while the Monte-Carlo error is first order, so the mean over 1024 keys
    differs from the plain logits by about its standard error: root-mean-square z over
    the 1600 logits 0.98-1.11 (measured for each site and LayerNorm placement), as
    unbiased means give. Dropout without the 1/(1-rate) rescaling gives 10.4-11.6, so
    a bound of 2 separates the two."""
    model = _random_opt(pre_layer_norm, branch=0.003, **{rate: 0.1})
    graphdef, state = nnx.split(model)
    keys = jax.random.split(jax.random.key(3), 1024)
    samples = np.asarray(jax.jit(jax.vmap(lambda key: nnx.merge(graphdef, state)(IDS, dropout_rng=key)[0]))(keys),
                         np.float64)
    standard_error = samples.std(0) / np.sqrt(len(keys))
    z = (samples.mean(0) - np.asarray(model(IDS)[0])) / standard_error
    assert np.sqrt(np.mean(z ** 2)) < 2.0


def _zeroed(model, names):
    """`model` with the parameters whose dotted path contains one of `names` set to zero."""
    weights.assign(model, {k: np.zeros(v.shape, np.float32) for k, v in weights.flat_params(model).items()
                           if any(n in k for n in names)})
    return model


def test_dropout_sits_on_the_residual_branches_attention_probabilities_and_adapter_inputs():
    """Each rate acts only where transformers' OPT (and peft's LoRA) applies it: with
    what a site drops made zero, its rate changes nothing even with a key; the
    embeddings and the residual stream itself never drop."""
    key = jax.random.key(4)

    def changes(model):
        return not np.allclose(model(IDS, dropout_rng=key)[0], model(IDS)[0], atol=1e-5)

    branches = ("self_attn.out", "fc2.")  # the attention block's output and fc2's: kernels, biases, adapters
    for pre_layer_norm in (True, False):
        assert not changes(_zeroed(_random_opt(pre_layer_norm, dropout=0.5), branches))
        assert changes(_zeroed(_random_opt(pre_layer_norm, dropout=0.5), ("self_attn.out",)))
        assert changes(_zeroed(_random_opt(pre_layer_norm, dropout=0.5), ("fc2.",)))
        # the probabilities weigh the values: with values zero, dropping them changes nothing
        assert not changes(_zeroed(_random_opt(pre_layer_norm, attention_dropout=0.5), ("self_attn.value", "v_bias")))
        assert changes(_random_opt(pre_layer_norm, attention_dropout=0.5))
        # lora_dropout drops the adapters' inputs, not the frozen path: nothing while lora_b is zero
        adapted = _zeroed(_random_opt(pre_layer_norm, lora_dropout=0.5), ("lora_b",))
        assert not changes(adapted)
        weights.assign(adapted, {k: 0.3 * np.ones(v.shape, np.float32)
                                 for k, v in weights.flat_params(adapted).items() if "lora_b" in k})
        assert changes(adapted)


def test_each_layer_and_each_residual_branch_draws_its_own_mask():
    """Both residual branches of both layers output ones whatever their input (weights
    zero, output biases one) onto a zero residual stream (zero embedding rows and
    positions), so the final stream counts the kept branches per element: 0-4 over
    four independent masks, scaled by 2 at rate 0.5. A key shared by the layers, or by
    the two branches of a layer, gives even counts only (at most 3 levels per row).
    The final LayerNorm maps a row's counts affinely and the table's first 32 rows
    are the identity, so logits[..., :32] show each row's levels."""
    model = _random_opt(dropout=0.5)
    params = {k: np.zeros(v.shape, np.float32) for k, v in weights.flat_params(model).items()
              if not k.startswith("layers.") or "self_attn." in k or "fc2." in k}
    params["embed_tokens"][:32] = np.eye(32)
    params["layers.self_attn.out_bias"] = np.ones((2, 32), np.float32)
    params["layers.fc2.bias"] = np.ones((2, 32), np.float32)
    params.update({k: np.ones(v.shape, np.float32) for k, v in weights.flat_params(model).items()
                   if k.endswith("layer_norm.scale")})
    weights.assign(model, params)
    ids = np.full((2, 8), 50)  # a zero embedding row
    assert len(np.unique(np.round(np.asarray(model(ids)[0][..., :32]), 4))) == 1  # no key: every count 4
    stream = np.asarray(model(ids, dropout_rng=jax.random.key(5))[0][..., :32]).reshape(-1, 32)
    levels = [len(np.unique(np.round(row, 4))) for row in stream]
    assert max(levels) >= 4, levels


def test_dropout_keeps_attention_causal():
    """Dropped probabilities of masked keys stay zero: with every rate on and the same
    key, a later token does not change an earlier position's logits."""
    model = _random_opt(dropout=0.3, attention_dropout=0.3, lora_dropout=0.3)
    changed = IDS.copy()
    changed[:, -1] = (changed[:, -1] + 1) % 100
    key = jax.random.key(6)
    np.testing.assert_array_equal(model(changed, dropout_rng=key)[0][:, :-1], model(IDS, dropout_rng=key)[0][:, :-1])


@pytest.mark.parametrize("field", ["dropout", "attention_dropout", "lora_dropout"])
@pytest.mark.parametrize("rate", [1.0, -0.1, None, True])
def test_a_rate_outside_0_to_1_fails_naming_it(field, rate):
    with pytest.raises(ValueError, match=f"{field}: expected a dropout rate in \\[0, 1\\), got {rate}"):
        OPTConfigOurs(**{field: rate})


def test_conversion_records_the_dropout_rates_of_config_json(tmp_path):
    """config.json's dropout and attention_dropout are the export's; a folder without
    them takes transformers' OPTConfig defaults, as `from_pretrained` reads it."""
    folder = tmp_path / "hf"
    OPTForCausalLM(OPTConfig(**TINY, dropout=0.2, attention_dropout=0.05)).save_pretrained(folder)
    convert(["hf_opt", f"--checkpoint={folder}", f"--out={tmp_path / 'set'}", "--image_tokens=0"])
    _, config, _ = weights.read_config(str(tmp_path / "set"))
    assert (config.dropout, config.attention_dropout, config.lora_dropout) == (0.2, 0.05, 0.0)
    settings = json.loads((folder / "config.json").read_text())
    del settings["dropout"], settings["attention_dropout"]
    (folder / "config.json").write_text(json.dumps(settings))
    hf = OPTForCausalLM.from_pretrained(folder)
    convert(["hf_opt", f"--checkpoint={folder}", f"--out={tmp_path / 'defaults'}", "--image_tokens=0"])
    _, config, _ = weights.read_config(str(tmp_path / "defaults"))
    assert (config.dropout, config.attention_dropout) == (hf.config.dropout, hf.config.attention_dropout) == (0.1, 0.0)


def test_an_export_written_before_dropout_rates_loads_without_dropout(tmp_path):
    """model.json without the rates (written before OPTConfig had them) loads with 0.0:
    the computation that export had; the fields it lacks are reported."""
    model = _random_opt(**RATES)
    weights.save(str(tmp_path / "export"), "opt", model.config, weights.flat_params(model))
    path = tmp_path / "export" / weights.CONFIG_FILE
    meta = json.loads(path.read_text())
    assert meta["config"]["dropout"] == 0.1
    for name in RATES:
        del meta["config"][name]
    path.write_text(json.dumps(meta))
    loaded, _, config = weights.load_model(str(tmp_path / "export"), kind="opt")
    assert (config.dropout, config.attention_dropout, config.lora_dropout) == (0.0, 0.0, 0.0)
    assert not set(RATES) & weights.stored_config_fields(str(tmp_path / "export"))
    np.testing.assert_array_equal(loaded(IDS, dropout_rng=jax.random.key(0))[0], model(IDS)[0])


def test_ids_longer_than_the_positions_fail_naming_them():
    """Beyond `max_positions` the position lookup read the table's last row for every
    later position (JAX clamps indices) and returned logits, silently; transformers
    raises. Exactly `max_positions` ids, plain or packed, still run."""
    model = OPT(OPTConfigOurs(vocab_size=100, width=32, depth=1, num_heads=2, mlp_dim=64, max_positions=8),
                rngs=nnx.Rngs(0))
    assert model(np.arange(3, 11)[None])[0].shape == (1, 8, 100)
    ids = np.arange(3, 12)[None]
    with pytest.raises(ValueError, match=r"^input_ids: length 9 exceeds the model's 8 positions$"):
        model(ids)
    with pytest.raises(ValueError, match=r"^input_ids: length 9 exceeds the model's 8 positions$"):
        model(ids, positions=np.arange(9)[None], segment_ids=np.ones((1, 9), np.int32))
