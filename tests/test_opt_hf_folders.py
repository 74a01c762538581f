"""Hugging Face OPT folders through the CLI against transformers' `generate` as a
user calls it (the folder's end and padding ids)."""

import json

import numpy as np
import pytest
import torch
from transformers import OPTConfig, OPTForCausalLM

from sd_fixtures import randomize
from seed_jax.api import SeedOPT
from seed_jax.convert.__main__ import convert

pytestmark = pytest.mark.torch

TINY = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
            max_position_embeddings=64)
STEPS = 20


def _save(folder, fields: dict, seed: int = 0, *, half: bool = False, model_class=OPTForCausalLM, **save):
    """A random OPT of `fields` saved to `folder` (in float16 with `half`)."""
    model = randomize(model_class(OPTConfig(**TINY, **fields)), seed)
    (model.half() if half else model).save_pretrained(folder, **save)


def _prompts():
    """Three left-padded prompts of 8, 5 and 2 tokens (B,8) and their mask."""
    ids = np.random.default_rng(0).integers(3, 100, (3, 8))
    mask = np.ones_like(ids)
    for row, pad in ((1, 3), (2, 6)):
        ids[row, :pad], mask[row, :pad] = 1, 0
    return ids, mask


@torch.no_grad()
def _transformers_greedy(hf, ids, mask, **options) -> np.ndarray:
    """`generate`'s greedy tokens (B,STEPS), padded with its pad id where every row
    ended before STEPS (it returns fewer columns then)."""
    out = hf.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), max_new_tokens=STEPS,
                      do_sample=False, num_beams=1, **options).numpy()[:, ids.shape[1]:]
    return np.pad(out, ((0, 0), (0, STEPS - out.shape[1])), constant_values=hf.generation_config.pad_token_id or 0)


def _convert(folder, out) -> SeedOPT:
    convert(["hf_opt", f"--checkpoint={folder}", f"--out={out}", "--image_tokens=0"])
    return SeedOPT.load(str(out))


def _set(path, **entries):
    """Writes `entries` into the JSON file at `path` (None: removes the key)."""
    settings = json.loads(path.read_text())
    settings.update(entries)
    path.write_text(json.dumps({k: v for k, v in settings.items() if v is not None}))


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
    with pytest.raises(ValueError, match=r"eos_id: generate ends rows at one token, got \[2, 5\] .*: pass one as eos_id"):
        lm.generate(np.full((1, 3), 7), 2)
    assert lm.generate(np.full((1, 3), 7), 2, eos_id=5).shape == (1, 2)
