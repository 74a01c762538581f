"""The API classes compute in the dtype their model was built in: a `dtype` naming
another is refused, None reads the model's, and float32 runs at full precision."""

import re

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import TINY_DIFFUSION, TINY_TOKENIZER
from seed_jax import api
from seed_jax.models import layers
from seed_jax.models.opt import OPT, OPTConfig
from seed_jax.models.stable_diffusion import StableDiffusion
from seed_jax.models.tokenizer import SeedTokenizer

TINY_OPT = OPTConfig(vocab_size=20, width=16, depth=1, num_heads=2, mlp_dim=32, max_positions=16)
MODELS = {"StableDiffusion": lambda dtype: StableDiffusion(TINY_DIFFUSION, dtype=dtype, rngs=nnx.Rngs(0)),
          "SeedTokenizer": lambda dtype: SeedTokenizer(TINY_TOKENIZER, dtype=dtype, rngs=nnx.Rngs(0)),
          "SeedOPT": lambda dtype: OPT(TINY_OPT, dtype=dtype, rngs=nnx.Rngs(0))}


def lowered_program(wrapper) -> str:
    """The StableHLO of one of `wrapper`'s jitted programs (text encoder, code embedding, logits)."""
    if isinstance(wrapper, api.StableDiffusion):
        return wrapper._encode_text.lower(wrapper._state, np.zeros((1, 77), np.int32)).as_text()
    if isinstance(wrapper, api.SeedTokenizer):
        return wrapper._embed_codes.lower(wrapper._state, np.zeros((1, 32), np.int32)).as_text()
    ids = np.zeros((1, 16), np.int32)
    return wrapper._logits.lower(wrapper._state, ids, np.ones_like(ids)).as_text()


def matmul_precisions(program: str) -> set[str]:
    """The precisions of the dot products in a StableHLO program."""
    return set(re.findall(r"dot_general .*precision = \[(\w+), \w+\]", program))


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("built, given", [("float32", "bfloat16"), ("bfloat16", "float32")])
def test_a_dtype_other_than_the_models_is_refused(name, built, given):
    """`dtype` only set the matmul precision: a float32 model given "bfloat16" ran float32
    at the default precision (TF32 on GPUs), a bfloat16 model given the default
    "float32" ran bfloat16 while `dtype` said float32."""
    model = MODELS[name](layers.compute_dtype(built))
    message = (f"dtype: '{given}', but the model was built to compute in '{built}'; pass dtype=None .*"
               rf"load\(\.\.\., dtype='{given}'\)")
    with pytest.raises(ValueError, match=message):
        getattr(api, name)(model, dtype=given)
    with pytest.raises(ValueError, match=r"dtype: expected one of \['bfloat16', 'float32'\], got 'bf16'"):
        getattr(api, name)(model, dtype="bf16")
    assert getattr(api, name)(model, dtype=built).dtype == built


@pytest.mark.parametrize("name", MODELS)
def test_dtype_none_computes_in_the_models_dtype(name):
    """The default reads the model's compute dtype: float32 at full precision, bfloat16
    (bfloat16 dot products) at the backend's default."""
    full = getattr(api, name)(MODELS[name](jnp.float32))
    assert full.dtype == "float32" and matmul_precisions(lowered_program(full)) == {"HIGHEST"}
    half = getattr(api, name)(MODELS[name](jnp.bfloat16))
    program = lowered_program(half)
    assert half.dtype == "bfloat16" and "DEFAULT" in matmul_precisions(program)
    assert re.search(r"dot_general .*tensor<[0-9x]*xbf16>", program)


def test_pretokenizing_encodes_at_the_apis_precision():
    """Pre-tokenizing ran the float32 tokenizer at the default matmul precision (TF32 on
    GPUs) while `api.SeedTokenizer` encodes at full float32: codes near a tie between two
    codebook entries could differ between the codes SEED-OPT trains on and the API's."""
    from seed_jax.trainers.pretokenize import LocalEncoder

    def precisions(dtype) -> set[str]:
        encoder = LocalEncoder(MODELS["SeedTokenizer"](dtype))
        pixels = np.zeros((encoder.mesh.size, encoder.image_size, encoder.image_size, 3), np.float32)
        return matmul_precisions(encoder._encode.lower(encoder.state, pixels).as_text())

    assert precisions(jnp.float32) == {"HIGHEST"}
    assert "DEFAULT" in precisions(jnp.bfloat16)


def test_code_retrieval_scores_at_the_apis_precision():
    """CodeRetrieval (SEED-OPT's t2i retrieval) ran a float32 tokenizer's stage-I heads at
    the default matmul precision (TF32 on GPUs), not at the API's full float32."""
    from seed_jax.evaluators.code_retrieval import CodeRetrieval

    def precisions(dtype) -> dict[str, set[str]]:
        scorer = CodeRetrieval(MODELS["SeedTokenizer"](dtype), caption_tokenizer=None)
        ids = np.ones((2, 8), np.int32)
        return {"codes": matmul_precisions(scorer._from_codes.lower(scorer._state, np.zeros((2, 32), np.int32))
                                           .as_text()),
                "text": matmul_precisions(scorer._from_text.lower(scorer._state, ids, ids).as_text())}

    assert precisions(jnp.float32) == {"codes": {"HIGHEST"}, "text": {"HIGHEST"}}
    assert all("DEFAULT" in found for found in precisions(jnp.bfloat16).values())
