"""OPT (Zhang et al., 2022) decoder-only language model in NNX.

ids (B,L) -> token embedding (V,W) [-> project_in W->D] + learned positions
(offset 2, counted over the attention mask) -> scanned decoder layers (pre-LN for
every size but 350M, which is post-LN) -> final LayerNorm (pre-LN only, unless
`final_norm` is off) [-> project_out D->W] -> logits through the tied token embedding
(B,L,V), or through a separate `lm_head` (V,W) (`tie_embeddings` off).
Transformers' OPTConfig options map to `bias` (enable_bias: the attention's and MLP's
biases) and `norm_affine` (layer_norm_elementwise_affine: LayerNorm scales and biases).

SEED-OPT appends `extra_tokens` ids to the vocabulary: <img>, </img> and the K codes.
They are plain trainable rows, or (`code_dim` > 0, SEED-OPT's "codebook projection")
<img> and </img> are rows and code k is `code_projection(code_vectors[k])`: a linear
map of the tokenizer's frozen (K,C) codebook, so codes near in the codebook start
near in the model. Either way the appended ids are part of the tied output table
(also with an untied `lm_head`, which covers the original vocabulary only).

Training-time dropout (as transformers' OPT in train mode), only when a call passes
`dropout_rng`: `dropout` on the attention block's output and on fc2's output before
each residual add, `attention_dropout` on the attention probabilities, and
`lora_dropout` on each adapter's input; none on the embeddings. Each scanned layer
gets its own key, each of its dropout sites a subkey of it.

Generation keeps a key/value cache per layer: `(B,N,S,H)` arrays stacked on a leading
layers axis, written at each step's position (see `init_cache`).

Shape letters: B batch, L new tokens, S cache length, D width, N heads, H head dim,
F MLP width, V vocabulary, W embedding width.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from seed_jax import parallel
from seed_jax.models import layers

POSITION_OFFSET = 2  # OPT's learned position table starts two rows in
IMAGE_MARKERS = 2  # <img> and </img>, the appended ids before the codes
NEW_ROW_NOISE = 0.1  # appended rows start at the old rows' mean plus noise at this fraction of their spread


@dataclasses.dataclass(frozen=True)
class OPTConfig:
    vocab_size: int = 50272
    width: int = 2560
    depth: int = 32
    num_heads: int = 32
    mlp_dim: int = 10240
    max_positions: int = 2048
    embed_width: int | None = None  # word_embed_proj_dim when it differs from `width` (350M)
    pre_layer_norm: bool = True  # do_layer_norm_before
    final_norm: bool = True  # pre-LN only: the LayerNorm after the last layer (not _remove_final_layer_norm)
    bias: bool = True  # enable_bias: q/k/v/out and fc1/fc2 biases
    norm_affine: bool = True  # layer_norm_elementwise_affine: LayerNorm scales and biases
    tie_embeddings: bool = True  # False: the vocabulary's output rows are a separate lm_head (V,W)
    eps: float = 1e-5
    dropout: float = 0.0  # training only: the attention block's and fc2's outputs, before the residual add
    attention_dropout: float = 0.0  # training only: the attention probabilities
    extra_tokens: int = 0  # ids appended to the vocabulary (SEED-OPT: <img>, </img>, 8192 codes), trainable
    code_dim: int = 0  # > 0: the appended ids after the first two embed as code_projection(code_vectors)
    lora_rank: int = 0  # 0: no adapters
    lora_alpha: float = 32.0
    lora_targets: tuple[str, ...] = layers.LORA_TARGETS
    lora_dropout: float = 0.0  # training only: each adapter's input

    def __post_init__(self):
        for name in ("dropout", "attention_dropout", "lora_dropout"):
            layers.check_rate(name, getattr(self, name))
        if self.lora_rank:  # checks the rank and the targets: a misspelled one would add no adapter
            layers.LoRA(self.lora_rank, self.lora_alpha, self.lora_targets)

    @property
    def token_width(self) -> int:
        return self.embed_width or self.width

    @property
    def num_projected_codes(self) -> int:
        """Appended ids embedded through the codebook projection (0 without it)."""
        return self.extra_tokens - IMAGE_MARKERS if self.code_dim else 0

    @property
    def total_vocab_size(self) -> int:
        return self.vocab_size + self.extra_tokens

    @property
    def lora(self) -> layers.LoRA | None:
        return (layers.LoRA(self.lora_rank, self.lora_alpha, tuple(self.lora_targets), self.lora_dropout)
                if self.lora_rank else None)

    @property
    def drops(self) -> bool:
        """Whether a call with a `dropout_rng` drops anything (some rate is above 0)."""
        return bool(self.dropout or self.attention_dropout or (self.lora_rank and self.lora_dropout))

    @classmethod
    def from_dict(cls, d: dict) -> "OPTConfig":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


OPT_PRESETS = {
    "opt_2.7b": OPTConfig(),
    "opt_350m": OPTConfig(width=1024, depth=24, num_heads=16, mlp_dim=4096, embed_width=512, pre_layer_norm=False),
    "opt_125m": OPTConfig(width=768, depth=12, num_heads=12, mlp_dim=3072),
    "tiny": OPTConfig(vocab_size=128, width=32, depth=2, num_heads=4, mlp_dim=64, max_positions=64),
}


DROPOUT_SITES = ("probs", "attention", "mlp") + layers.LORA_TARGETS  # each takes its own subkey of a layer's key


class DecoderLayer(nnx.Module):

    def __init__(self, c: OPTConfig, *, dtype, rngs: nnx.Rngs):
        self.self_attn_layer_norm = layers.LayerNorm(c.width, eps=c.eps, affine=c.norm_affine, dtype=dtype,
                                                     rngs=rngs)
        lora = c.lora
        self.self_attn = layers.Attention(c.width, c.num_heads, bias="qkv" if c.bias else "", out_bias=c.bias,
                                          lora=lora, dtype=dtype, rngs=rngs)
        self.final_layer_norm = layers.LayerNorm(c.width, eps=c.eps, affine=c.norm_affine, dtype=dtype, rngs=rngs)
        mlp_lora = lambda name: lora if lora and name in lora.targets else None  # noqa: E731
        self.fc1 = layers.Dense(c.width, c.mlp_dim, axes=("embed", "mlp"), use_bias=c.bias, lora=mlp_lora("fc1"),
                                dtype=dtype, rngs=rngs)
        self.fc2 = layers.Dense(c.mlp_dim, c.width, axes=("mlp", "embed"), use_bias=c.bias, lora=mlp_lora("fc2"),
                                dtype=dtype, rngs=rngs)
        self.pre_layer_norm = c.pre_layer_norm
        self.dropout, self.attention_dropout = c.dropout, c.attention_dropout
        self.dtype = dtype

    def _attend(self, x, mask, cache, index, keys):
        """x (B,L,D), mask (B,1,L,S) -> (B,L,D) and the updated cache {k, v} (B,N,S,H);
        `keys`: a key (or None) per dropout site."""
        attn = self.self_attn
        q = attn.project(x, "query", keys["query"]) * attn.head_dim ** -0.5
        k = attn.project(x, "key", keys["key"]).transpose(0, 2, 1, 3)
        v = attn.project(x, "value", keys["value"]).transpose(0, 2, 1, 3)
        if cache is not None:
            k = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype), index, axis=2)
            v = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype), index, axis=2)
            cache = {"k": k, "v": v}
        scores = layers.attention_scores("BLNH,BNSH->BNLS", q, k.astype(q.dtype))
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
        probs = layers.dropout(jax.nn.softmax(scores, axis=-1), self.attention_dropout, keys["probs"])
        y = jnp.einsum("BNLS,BNSH->BLNH", probs.astype(self.dtype), v.astype(self.dtype))
        return attn.output(y, keys["out"]), cache

    def _mlp(self, x, keys):
        """x (B,L,D) -> fc2(relu(fc1(x))) (B,L,D)."""
        return self.fc2(jax.nn.relu(self.fc1(x, keys["fc1"])), keys["fc2"])

    def __call__(self, x, mask, cache=None, index=0, rng=None):
        """x (B,L,D) -> (B,L,D) and the updated cache; `rng` (this layer's key) enables dropout."""
        x = parallel.constrain(x, ("batch", "length", "embed"))
        keys = dict(zip(DROPOUT_SITES, layers.split_rng(rng, len(DROPOUT_SITES))))
        drop = lambda h, site: layers.dropout(h, self.dropout, keys[site])  # noqa: E731
        if self.pre_layer_norm:
            h, cache = self._attend(self.self_attn_layer_norm(x), mask, cache, index, keys)
            x = x + drop(h, "attention")
            return x + drop(self._mlp(self.final_layer_norm(x), keys), "mlp"), cache
        h, cache = self._attend(x, mask, cache, index, keys)
        x = self.self_attn_layer_norm(x + drop(h, "attention"))
        return self.final_layer_norm(x + drop(self._mlp(x, keys), "mlp")), cache


class OPT(nnx.Module):

    def __init__(self, config: OPTConfig, *, dtype=jnp.float32, remat: bool = False, rngs: nnx.Rngs):
        c = self.config = config
        self.embed_tokens = layers.param(rngs, layers.normal(0.02), (c.vocab_size, c.token_width), ("vocab", "embed"))
        if c.code_dim and c.extra_tokens <= IMAGE_MARKERS:
            raise ValueError(f"code_dim: needs codes appended after <img>, </img>; extra_tokens is {c.extra_tokens}")
        rows = c.extra_tokens - c.num_projected_codes
        self.embed_extra = (layers.param(rngs, layers.normal(0.02), (rows, c.token_width), ("vocab", "embed"))
                            if rows else None)
        # The tokenizer's codebook (frozen: see `trainable_filter`), set by whoever builds SEED-OPT.
        self.code_vectors = (layers.param(rngs, layers.zeros, (c.num_projected_codes, c.code_dim), ("vocab", None))
                             if c.code_dim else None)
        # Code vectors have unit RMS: projected rows start at the plain rows' scale (std 0.02).
        self.code_projection = (layers.Dense(c.code_dim, c.token_width, axes=(None, "embed"), dtype=jnp.float32,
                                             kernel_init=layers.normal(0.02 / c.code_dim ** 0.5), rngs=rngs)
                                if c.code_dim else None)
        self.lm_head = (None if c.tie_embeddings else
                        layers.param(rngs, layers.normal(0.02), (c.vocab_size, c.token_width), ("vocab", "embed")))
        self.embed_positions = layers.param(rngs, layers.normal(0.02), (c.max_positions + POSITION_OFFSET, c.width),
                                            ("length", "embed"))
        self.project_in = (layers.Dense(c.token_width, c.width, axes=(None, "embed"), use_bias=False, dtype=dtype,
                                        rngs=rngs) if c.embed_width else None)
        self.layers = layers.stacked(lambda r: DecoderLayer(c, dtype=dtype, rngs=r), c.depth, rngs)
        self.final_layer_norm = (layers.LayerNorm(c.width, eps=c.eps, affine=c.norm_affine, dtype=dtype, rngs=rngs)
                                 if c.pre_layer_norm and c.final_norm else None)
        self.project_out = (layers.Dense(c.width, c.token_width, axes=("embed", None), use_bias=False, dtype=dtype,
                                         rngs=rngs) if c.embed_width else None)
        self.remat, self.dtype = remat, dtype

    def init_cache(self, batch: int, length: int) -> dict:
        """Empty key/value cache for `length` positions: {k, v} (layers,B,N,S,H) in the
        compute dtype, in which the keys and values are computed."""
        c = self.config
        shape = (c.depth, batch, c.num_heads, length, c.width // c.num_heads)
        return {"k": jnp.zeros(shape, self.dtype), "v": jnp.zeros(shape, self.dtype)}

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *, positions=None,
                 segment_ids: jax.Array | None = None, cache: dict | None = None,
                 cache_index: jax.Array | int = 0, logits_at: jax.Array | None = None,
                 dropout_rng: jax.Array | None = None):
        """input_ids (B,L) -> (logits (B,L,V) float32, updated cache or None);
        `logits_at` (B,K) positions give logits (B,K,V) at those positions only.

        Without a cache: `attention_mask` (B,L) 1/0 (default all ones) masks padding,
        positions count the mask as transformers does. Packed rows instead pass
        `segment_ids` (B,L) (0 = padding; a token attends only within its segment)
        and `positions` (B,L) counted from 0 in each segment. With a cache of S positions:
        the new tokens go to [cache_index, cache_index+L), `attention_mask` (B,S)
        covers the whole cache, and `positions` (B,L) must be given. `dropout_rng` (a
        key; training) enables the config's dropout; None (evaluation, generation) or
        every rate 0 computes exactly as without it. Without a cache, L is at most
        `max_positions` (the position table's rows; a lookup beyond reads its last row)."""
        batch, length = input_ids.shape
        if cache is None and length > self.config.max_positions:
            raise ValueError(f"input_ids: length {length} exceeds the model's {self.config.max_positions} positions")
        if segment_ids is not None:
            if cache is not None or attention_mask is not None or positions is None:
                raise ValueError("segment_ids (packed rows) take `positions` and no attention_mask or cache")
            attention_mask = (segment_ids > 0).astype(jnp.int32)
        if cache is None:
            attention_mask = jnp.ones((batch, length), jnp.int32) if attention_mask is None else attention_mask
            if positions is None:
                positions = jnp.cumsum(attention_mask, axis=1) * attention_mask - 1
            key_mask = attention_mask.astype(bool)
            query_index = jnp.arange(length)
        else:
            if positions is None or attention_mask is None:
                raise ValueError("with a cache, pass `positions` (B,L) and `attention_mask` over the cache (B,S)")
            key_mask = attention_mask.astype(bool)
            query_index = cache_index + jnp.arange(length)
        key_index = jnp.arange(key_mask.shape[1])
        mask = (key_index[None, :] <= query_index[:, None])[None, None] & key_mask[:, None, None, :]
        if segment_ids is not None:
            mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
        blocks = self._token_blocks()
        x = _look_up(blocks, input_ids).astype(self.dtype)
        if self.project_in is not None:
            x = self.project_in(x)
        position_table = parallel.constrain(self.embed_positions[...], (None, None))
        x = x + position_table[positions + POSITION_OFFSET].astype(self.dtype)

        graphdef, state = nnx.split(self.layers)

        def body(h, inputs):
            layer_state, layer_cache, layer_rng = inputs
            h, layer_cache = nnx.merge(graphdef, layer_state)(h, mask, layer_cache, cache_index, layer_rng)
            return h, layer_cache

        if self.remat:
            body = jax.checkpoint(body)
        x, cache = jax.lax.scan(body, x, (state, cache, self._layer_rngs(dropout_rng)))
        if self.final_layer_norm is not None:
            x = self.final_layer_norm(x)
        if logits_at is not None:
            x = jnp.take_along_axis(x, logits_at[..., None], axis=1)
        if self.project_out is not None:
            x = self.project_out(x)
        return self._logits(x, blocks), cache

    def _logits(self, x: jax.Array, blocks: list[jax.Array]) -> jax.Array:
        """x (B,L,W) -> (B,L,V + extra) float32 through the output rows: the token `blocks`
        (tied), or lm_head's rows then the appended blocks. Of the blocks' logits and the
        blocks, the smaller is concatenated: a few rows (decoding) take each block's logits,
        many (training) one table."""
        head = blocks if self.lm_head is None else [self.lm_head[...]] + blocks[1:]

        def product(table):  # float32, not rounded to bfloat16: a loss over ~50k logits needs them exact
            return jnp.einsum("BLW,VW->BLV", x.astype(self.dtype), table.astype(self.dtype),
                              preferred_element_type=jnp.float32)

        if len(head) > 1 and x.shape[0] * x.shape[1] <= x.shape[2]:
            return jnp.concatenate([product(block) for block in head], -1)
        return product(jnp.concatenate(head) if len(head) > 1 else head[0])

    def _layer_rngs(self, dropout_rng: jax.Array | None) -> jax.Array | None:
        """One key per layer (depth,), or None when nothing drops."""
        if dropout_rng is None or not self.config.drops:
            return None
        return jax.random.split(dropout_rng, self.config.depth)

    def _token_blocks(self) -> list[jax.Array]:
        """The token table's row blocks in id order, each (rows, W) float32: the
        vocabulary's, the appended rows, the projected codes (those the config has).
        Kept apart where they can be: one table is a fresh copy of them all at each call
        (60 MB for OPT with SEED's image tokens at width 256; most of a short prompt's
        prefill on a CPU)."""
        blocks = [self.embed_tokens[...]]
        if self.embed_extra is not None:
            blocks.append(self.embed_extra[...])
        if self.code_projection is not None:
            blocks.append(self.code_projection(self.code_vectors[...]))
        return blocks

    def token_table(self) -> jax.Array:
        """(V + extra, W) float32: the vocabulary's rows then the appended ones (input and tied output)."""
        blocks = self._token_blocks()
        return jnp.concatenate(blocks) if len(blocks) > 1 else blocks[0]


def _look_up(blocks: list[jax.Array], ids: jax.Array) -> jax.Array:
    """ids (B,L) -> their rows (B,L,W) of the table the row `blocks` make in id order
    (ids beyond it read its last row, as a gather from one table does).

    Each lookup reads a whole block: a table split over `fsdp` along its width, looked up by
    ids split over the batch axes, made XLA's partitioner copy the looked-up (B,L,D) rows of
    the whole batch to every device on meshes with data > 1 ("involuntary full
    rematerialization", across hosts on gpu8x8); gathering a table whole stays within the
    devices that hold one batch shard (OPT-2.7B's token table: 0.6 GB in float32)."""
    rows, start = None, 0
    for block in blocks:
        found = parallel.constrain(block, (None, None))[jnp.clip(ids - start, 0, len(block) - 1)]
        rows = found if rows is None else jnp.where((ids >= start)[..., None], found, rows)
        start += len(block)
    return rows


def rows_in_distribution(mean: np.ndarray, spread: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """(count,W) new token rows: `mean` (W,), the old rows' mean, plus normal noise at
    NEW_ROW_NOISE of their per-dimension `spread` (W,), so that they start distinct but
    in distribution."""
    return mean + NEW_ROW_NOISE * spread * rng.standard_normal((count, mean.shape[0]))


def trainable_filter(path, value) -> bool:
    """nnx filter for SEED-OPT training: the adapters, the appended token rows and
    the codebook projection (not the codebook itself)."""
    return isinstance(value, nnx.LoRAParam) or (
        isinstance(value, nnx.Param) and ("embed_extra" in path or "code_projection" in path))


def train_all_filter(path, value) -> bool:
    """nnx filter for a model trained from scratch: every parameter but the tokenizer's codebook."""
    return isinstance(value, nnx.Param) and "code_vectors" not in path


def merge_lora(config: OPTConfig, params: dict) -> tuple[OPTConfig, dict]:
    """(config, dotted-path params) of an adapted model -> the same model without
    adapters: every W becomes W + (alpha / rank) A B."""
    if not config.lora_rank:
        return config, dict(params)
    scale = config.lora_alpha / config.lora_rank
    merged = {k: v for k, v in params.items() if "lora_" not in k}
    for key in [k for k in params if k.endswith("lora_a")]:
        # Dense: "fc1.lora_a" adapts "fc1.kernel"; Attention: "query_lora_a" adapts "query".
        base = key[:-len(".lora_a")] + ".kernel" if key.endswith(".lora_a") else key[:-len("_lora_a")]
        delta = _low_rank_product(jnp.asarray(params[key]), jnp.asarray(params[key[:-1] + "b"]))
        merged[base] = jnp.asarray(params[base]) + scale * delta
    return dataclasses.replace(config, lora_rank=0), merged


def _low_rank_product(a: jax.Array, b: jax.Array) -> jax.Array:
    """Stacked factors a (Lyr, *in, R) and b (Lyr, R, *out) -> (Lyr, *in, *out)."""
    layers_, rank = a.shape[0], a.shape[-1]
    in_shape, out_shape = a.shape[1:-1], b.shape[2:]
    product = jnp.einsum("lir,lro->lio", a.reshape(layers_, -1, rank), b.reshape(layers_, rank, -1))
    return product.reshape((layers_,) + in_shape + out_shape)
