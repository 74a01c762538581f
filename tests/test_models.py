"""Shapes of every module, causality of the Q-Formers, and clear input errors."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import TINY_QFORMER, TINY_REVERSE, TINY_TOKENIZER, TINY_VIT
from seed_jax import weights
from seed_jax.models import layers
from seed_jax.models.clip_text import CLIP_TEXT_PRESETS, CLIPTextEncoder
from seed_jax.models.qformer import QFormer
from seed_jax.models.tokenizer import SeedTokenizer
from seed_jax.models.vit import VIT_PRESETS, VisionTransformer


def test_eva_vit_g_preset_matches_design():
    c = VIT_PRESETS["eva_vit_g"]
    assert (c.image_size, c.patch_size, c.width, c.depth, c.num_heads, c.mlp_dim) == (224, 14, 1408, 39, 16, 6144)
    assert c.num_patches + 1 == 257 and c.width // c.num_heads == 88 and c.mlp_dim == int(1408 * 4.3637)


def test_vit_shapes_and_no_k_bias():
    vit = VisionTransformer(TINY_VIT, rngs=nnx.Rngs(0))
    out = vit(jnp.ones((3, 32, 32, 3)))
    chex.assert_shape(out, (3, 1 + 16, 32))
    attn = vit.blocks.blocks.attn
    assert attn.q_bias is not None and attn.v_bias is not None and attn.k_bias is None
    chex.assert_shape(attn.query[...], (2, 32, 2, 16))  # stacked over 2 layers


def test_vit_rejects_wrong_image_size():
    vit = VisionTransformer(TINY_VIT, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="pixels: expected"):
        vit(jnp.ones((1, 48, 48, 3)))


def test_next_key_draws_the_keys_of_the_streams_own_draws_and_advances_it_alike():
    """`next_key` sets the stream's count whole instead of `rngs.params()`'s `+= 1`
    (whose sharding comparison walks the trace): the keys, and the count the stream
    goes on from, are flax's own, eagerly, under jit and in the vmap of stacked layers."""

    def keys_of(draw):
        def drawn(rngs):
            keys = [draw(rngs) for _ in range(3)] + [rngs.params()]  # the stream goes on from the same count
            return jnp.stack([jax.random.key_data(k) for k in keys])
        return drawn

    ours, flax = keys_of(layers.next_key), keys_of(lambda rngs: rngs.params())
    np.testing.assert_array_equal(ours(nnx.Rngs(3)), flax(nnx.Rngs(3)))
    np.testing.assert_array_equal(jax.jit(lambda: ours(nnx.Rngs(3)))(), flax(nnx.Rngs(3)))

    def stacked_keys(draw):
        class Keys(nnx.Module):
            def __init__(self, rngs):
                self.keys = nnx.Param(keys_of(draw)(rngs))
        return nnx.state(layers.stacked(Keys, 4, nnx.Rngs(params=5)))["keys"][...]

    per_layer = stacked_keys(layers.next_key)
    assert per_layer.shape[0] == 4 and len(np.unique(np.asarray(per_layer).reshape(4, -1), axis=0)) == 4
    np.testing.assert_array_equal(per_layer, stacked_keys(lambda rngs: rngs.params()))


def test_block_stack_scan_matches_a_python_loop():
    config = layers.BlockConfig(16, 2, 32)
    stack = layers.BlockStack(config, 3, rngs=nnx.Rngs(1))
    x = jax.random.normal(jax.random.key(0), (2, 5, 16))
    graphdef, state = nnx.split(stack.blocks)
    manual = x
    for i in range(3):
        manual = nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))(manual)
    np.testing.assert_allclose(stack(x), manual, rtol=1e-5, atol=1e-5)


def test_qformer_shapes():
    qf = QFormer(TINY_QFORMER, rngs=nnx.Rngs(0))
    image = jnp.ones((2, 17, 32))
    chex.assert_shape(qf.queries(image), (2, 32, 32))
    ids = jnp.ones((2, 7), jnp.int32)
    chex.assert_shape(qf.text(ids, jnp.ones_like(ids)), (2, 7, 32))
    # cross-attention on the first layer of every group of cross_attention_freq=2
    group = qf.groups.layers
    assert group[0].cross_attn is not None and group[1].cross_attn is None


def _perturb_query(qf, k):
    """Changes query token k (not by a constant: the embedding LayerNorm would remove it)."""
    tokens = qf.query_tokens[...]
    qf.query_tokens[...] = tokens.at[k].add(jax.random.normal(jax.random.key(7), tokens.shape[1:]))


def test_causal_qformer_is_causal():
    qf = QFormer(TINY_QFORMER, rngs=nnx.Rngs(0))
    image = jax.random.normal(jax.random.key(1), (2, 17, 32))
    before = qf.queries(image)
    k = 10
    _perturb_query(qf, k)
    after = qf.queries(image)
    np.testing.assert_allclose(after[:, :k], before[:, :k], rtol=0, atol=1e-6)
    assert np.abs(after[:, k:] - before[:, k:]).max() > 1e-3


def test_reverse_qformer_is_bidirectional():
    qf = QFormer(TINY_REVERSE, rngs=nnx.Rngs(0))
    context = jax.random.normal(jax.random.key(1), (2, 32, 32))
    before = qf.queries(context)
    _perturb_query(qf, 60)
    after = qf.queries(context)
    assert np.abs(after[:, :60] - before[:, :60]).max() > 1e-3


def test_text_padding_does_not_leak():
    qf = QFormer(TINY_QFORMER, rngs=nnx.Rngs(0))
    ids = jnp.array([[2, 5, 6, 3, 0, 0]])
    mask = (ids != 0).astype(jnp.int32)
    other = ids.at[0, 5].set(9)  # change a padded token
    np.testing.assert_allclose(qf.text(ids, mask)[:, :4], qf.text(other, mask)[:, :4], atol=1e-6)


def test_clip_text_shapes_and_causality():
    enc = CLIPTextEncoder(CLIP_TEXT_PRESETS["tiny"], rngs=nnx.Rngs(0))
    ids = jax.random.randint(jax.random.key(0), (2, 77), 0, 128)
    out = enc(ids)
    chex.assert_shape(out, (2, 77, 32))
    changed = enc(ids.at[:, 40].set((ids[:, 40] + 1) % 128))
    np.testing.assert_allclose(changed[:, :40], out[:, :40], atol=1e-6)
    with pytest.raises(ValueError, match="input_ids"):
        enc(jnp.ones((2, 78), jnp.int32))


def test_the_reconstruction_head_is_the_generation_blocks_design_and_leaves_the_rest_alone():
    """`recon_head` adds pos_embed + blocks (training only; the release has none): the
    other parameters draw the same values with or without it, the generation path
    ignores it, and with blocks_text's weights it gives what blocks_text gives."""
    plain = SeedTokenizer(TINY_TOKENIZER, rngs=nnx.Rngs(0))
    headed = SeedTokenizer(dataclasses.replace(TINY_TOKENIZER, recon_head=True), rngs=nnx.Rngs(0))
    plain_params, headed_params = weights.flat_params(plain), weights.flat_params(headed)
    added = sorted({k.split(".")[0] for k in set(headed_params) - set(plain_params)})
    assert added == ["blocks", "pos_embed"]
    for key, value in plain_params.items():
        np.testing.assert_array_equal(headed_params[key], value, err_msg=key)
    codes = jax.random.randint(jax.random.key(1), (2, 32), 0, TINY_TOKENIZER.num_codes)
    quantized = plain.quantize.lookup(codes)
    np.testing.assert_array_equal(plain.reconstruct(quantized), plain.generation_tokens(quantized))
    np.testing.assert_array_equal(headed.embed_codes(codes), plain.embed_codes(codes))
    assert np.abs(headed.reconstruct(quantized) - plain.reconstruct(quantized)).max() > 1e-3
    nnx.update(headed.blocks, nnx.state(headed.blocks_text))
    headed.pos_embed[...] = headed.pos_embed_text[...]
    np.testing.assert_array_equal(headed.reconstruct(quantized), plain.reconstruct(quantized))


def test_seed_tokenizer_encode_and_embed_codes_shapes():
    tok = SeedTokenizer(TINY_TOKENIZER, rngs=nnx.Rngs(0))
    out = tok.encode(jnp.ones((2, 32, 32, 3)))
    chex.assert_shape(out["vit_features"], (2, 17, 32))
    chex.assert_shape(out["image_embeds"], (2, 17, 32))
    chex.assert_shape(out["causal_embeddings"], (2, 32, 32))
    chex.assert_shape(out["quant_input"], (2, 32, 8))
    chex.assert_shape(out["codes"], (2, 32))
    chex.assert_type(out["codes"], jnp.int32)
    chex.assert_shape(out["quantized"], (2, 32, 8))
    chex.assert_shape(tok.reconstruct(out["quantized"]), (2, 32, 32))
    chex.assert_shape(tok.embed_codes(out["codes"]), (2, 77, 24))
    feats = tok.image_features(out["causal_embeddings"])
    chex.assert_shape(feats, (2, 16))
    np.testing.assert_allclose(np.linalg.norm(feats, axis=-1), 1.0, rtol=1e-5)
    ids = jnp.ones((2, 6), jnp.int32)
    chex.assert_shape(tok.text_features(ids, ids), (2, 16))


def test_encode_is_jittable_and_bf16_close():
    tok = SeedTokenizer(TINY_TOKENIZER, rngs=nnx.Rngs(0))
    pixels = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    graphdef, state = nnx.split(tok)
    f32 = jax.jit(lambda s, x: nnx.merge(graphdef, s).encode(x))(state, pixels)["causal_embeddings"]
    bf16_tok = SeedTokenizer(TINY_TOKENIZER, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    bf16 = bf16_tok.encode(pixels)["causal_embeddings"]
    rel = np.linalg.norm(np.asarray(bf16, np.float32) - f32) / np.linalg.norm(f32)
    assert rel < 0.05, rel


def test_bfloat16_tokenizer_picks_the_codes_of_a_float32_encode_task_layer():
    """SEED runs encode_task_layer in float32 (outside autocast). In a bfloat16 model it
    ran bfloat16: the float32 VQ distance read an input ~1e-2 off, and near-ties took
    another code (9 of these 2048). It now runs float32 whatever the compute dtype: the
    codes of bfloat16 causal embeddings are those of a float32 model given the same values."""
    f32 = SeedTokenizer(TINY_TOKENIZER, rngs=nnx.Rngs(0))
    bf16 = SeedTokenizer(TINY_TOKENIZER, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    causal = jax.random.normal(jax.random.key(1), (64, 32, 32)).astype(jnp.bfloat16)
    got = bf16.quantize_embeddings(causal)
    want = f32.quantize_embeddings(causal.astype(jnp.float32))
    np.testing.assert_array_equal(got["codes"], want["codes"])
    assert got["quant_input"].dtype == jnp.float32
    np.testing.assert_array_equal(got["quant_input"], want["quant_input"])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_codes_are_chosen_from_full_precision_float32_matmuls(dtype):
    """The VQ distance pins HIGHEST precision (GPUs' default for float32 matmuls, TF32,
    rounds their inputs); the encode_task_layer before it ran at the default, so its
    output, which the distance reads, was rounded there. Every matmul from the causal
    embeddings to the codes is now float32 at HIGHEST (what this CPU cannot show
    numerically, the program says)."""
    tok = SeedTokenizer(TINY_TOKENIZER, dtype=dtype, rngs=nnx.Rngs(0))
    jaxpr = jax.make_jaxpr(lambda x: tok.quantize_embeddings(x)["codes"])(jnp.ones((2, 32, 32), dtype))
    dots = [e for e in jaxpr.eqns if e.primitive.name == "dot_general"]
    assert len(dots) == 3  # fc1, fc2, the distance
    for dot in dots:
        assert [v.aval.dtype for v in dot.invars] == [jnp.float32] * 2
        assert dot.params["precision"] in ((jax.lax.Precision.HIGHEST,) * 2, jax.lax.Precision.HIGHEST), dot


def test_bfloat16_attention_scores_reach_the_float32_softmax_unrounded():
    """DESIGN: softmax in float32. A bfloat16 Attention's q.k scores left the einsum
    rounded to bfloat16 (0.25 apart near 100) before the cast: its output was 2% off the
    same attention given float32 scores of the same bfloat16 q and k."""
    attn = layers.Attention(64, 2, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    x = 8.0 * jax.random.normal(jax.random.key(1), (1, 50, 64))
    q = attn.project(x, "query") * attn.head_dim ** -0.5
    scores = jnp.einsum("BLNH,BSNH->BNLS", q.astype(jnp.float32), attn.project(x, "key").astype(jnp.float32))
    assert float(jnp.abs(scores).max()) > 64  # where bfloat16 holds scores to 0.25 or worse
    probs = jax.nn.softmax(scores, axis=-1).astype(jnp.bfloat16)
    expected = attn.output(jnp.einsum("BNLS,BSNH->BLNH", probs, attn.project(x, "value")))
    error = np.linalg.norm(np.asarray(attn(x) - expected, np.float32)) / np.linalg.norm(np.asarray(expected, np.float32))
    assert error < 1e-3, error
