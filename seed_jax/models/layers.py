"""Building blocks shared by the models: dense layers, norms, attention, MLPs,
pre-LN transformer blocks and scanned layer stacks.

Shape letters: B batch, L query length, S key length, D model width, N heads,
H head dim, F MLP width.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from seed_jax import parallel

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
MASK_VALUE = -10000.0  # what the reference adds to masked attention scores


def compute_dtype(name: str, field: str = "dtype"):
    """The compute dtype called `name`, else a ValueError naming the config `field`."""
    if name not in COMPUTE_DTYPES:
        raise ValueError(f"{field}: expected one of {sorted(COMPUTE_DTYPES)}, got {name!r}")
    return COMPUTE_DTYPES[name]


@jax.jit
def _fold_in_count(key: jax.Array, count: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(the stream's key for `count`, the next count): what `nnx.RngStream.__call__` draws."""
    return jax.random.fold_in(key, count), count + 1


def next_key(rngs: nnx.Rngs) -> jax.Array:
    """The params stream's next key: the key `rngs.params()` would draw, drawn faster.

    `rngs.params()` writes the new count with `count[...] += 1`, and flax then compares
    the new count's sharding with the old one's. Inside a trace (`nnx.eval_shape`, a
    jitted init, or the vmap that builds stacked layers) a tracer has no `.sharding`, and
    the AttributeError it raises builds its message by walking the trace so far, which
    makes building a model with hundreds of parameters quadratic in their number. The
    count is set whole here, which compares nothing: SD v1 builds abstractly in 1.0 s
    instead of 16 s (`python benchmarks/model_build.py`)."""
    stream = rngs.params
    key, count = _fold_in_count(stream.key[...], stream.count[...])
    stream.count.set_value(count)
    return key


def param(rngs: nnx.Rngs, init: Callable, shape: Sequence[int], axes: Sequence[str | None]) -> nnx.Param:
    """A float32 parameter carrying logical axis names for sharding."""
    if len(axes) != len(shape):
        raise ValueError(f"param: axes {axes} do not match shape {shape}")
    return nnx.Param(init(next_key(rngs), tuple(shape), jnp.float32),
                     out_sharding=tuple(axes), eager_sharding=False)


def lora_param(rngs: nnx.Rngs, init: Callable, shape: Sequence[int], axes: Sequence[str | None]) -> nnx.LoRAParam:
    """A float32 low-rank adapter factor (trains while the base weights stay frozen)."""
    return nnx.LoRAParam(init(next_key(rngs), tuple(shape), jnp.float32), out_sharding=tuple(axes),
                         eager_sharding=False)


LORA_TARGETS = ("query", "key", "value", "out", "fc1", "fc2")


@dataclasses.dataclass(frozen=True)
class LoRA:
    """Low-rank adapters W + (alpha / rank) A B on the named projections
    (Attention: query, key, value, out; MLP: fc1, fc2). A starts as peft's
    (`lora_a_init`) and B at zero, so an adapted model starts equal to its base. An
    unknown target name raises: it would otherwise leave that projection without an
    adapter, silently. `dropout` drops the adapter's input x in x A B when a call
    passes an rng (peft's lora_dropout; the frozen path x W sees all of x)."""
    rank: int = 16
    alpha: float = 32.0
    targets: tuple[str, ...] = LORA_TARGETS
    dropout: float = 0.0

    def __post_init__(self):
        check_rate("lora.dropout", self.dropout)
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"lora.rank: expected a positive integer, got {self.rank!r}")
        if isinstance(self.targets, str) or not self.targets:
            raise ValueError(f"lora.targets: expected a non-empty sequence of names from {LORA_TARGETS}, "
                             f"got {self.targets!r}")
        unknown = [t for t in self.targets if t not in LORA_TARGETS]
        if unknown:
            raise ValueError(f"lora.targets: {unknown} are not adaptable projections; expected names from "
                             f"{LORA_TARGETS}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


normal = nnx.initializers.normal
zeros = nnx.initializers.zeros
ones = nnx.initializers.ones


def fan_in(in_axes: Sequence[int] = (0,)):
    """Truncated normal with variance 1/fan_in over `in_axes` (weights trained from
    scratch; released checkpoints overwrite them)."""
    return nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=tuple(in_axes),
                                             out_axis=-1)


def lora_a_init(in_axes: Sequence[int] = (0,)):
    """LoRA's A as peft starts it (kaiming-uniform with a = sqrt(5), as torch's Linear):
    uniform in +-1/sqrt(fan_in) over `in_axes`, a standard deviation of 1/sqrt(3 fan_in)."""
    return nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform", in_axis=tuple(in_axes), out_axis=-1)


def check_rate(name: str, rate) -> None:
    """A ValueError naming `name` unless `rate` is a dropout rate in [0, 1)."""
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
        raise ValueError(f"{name}: expected a dropout rate in [0, 1), got {rate!r}")


def dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
    """Inverted dropout; identity when `rng` is None or rate is 0."""
    if rng is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


def split_rng(rng: jax.Array | None, num: int) -> list[jax.Array | None]:
    return [None] * num if rng is None else list(jax.random.split(rng, num))


class Dense(nnx.Module):
    """y = x W + b with W (in, out), computed in `dtype` (the matmul at `precision`)."""

    def __init__(self, in_features: int, out_features: int, *, axes=("embed", "mlp"),
                 use_bias: bool = True, lora: LoRA | None = None, dtype=jnp.float32, kernel_init=None,
                 precision: jax.lax.Precision | None = None, rngs: nnx.Rngs):
        self.kernel = param(rngs, kernel_init or fan_in(), (in_features, out_features), axes)
        self.bias = param(rngs, zeros, (out_features,), axes[1:]) if use_bias else None
        self.lora_a = lora_param(rngs, lora_a_init(), (in_features, lora.rank), (axes[0], None)) if lora else None
        self.lora_b = lora_param(rngs, zeros, (lora.rank, out_features), (None, axes[1])) if lora else None
        self.lora_scale = lora.scale if lora else 0.0
        self.lora_dropout = lora.dropout if lora else 0.0
        self.dtype, self.precision = dtype, precision

    def __call__(self, x: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        """x (..., in) -> (..., out); `rng` drops the adapter's input at the LoRA dropout rate."""
        x = x.astype(self.dtype)
        y = jnp.einsum("...i,io->...o", x, self.kernel[...].astype(self.dtype), precision=self.precision)
        if self.lora_a is not None:
            low = jnp.einsum("...i,ir->...r", dropout(x, self.lora_dropout, rng), self.lora_a[...].astype(self.dtype))
            y = y + self.lora_scale * jnp.einsum("...r,ro->...o", low, self.lora_b[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class LayerNorm(nnx.Module):
    """LayerNorm computed in float32, returned in `dtype`; `affine=False`: no scale
    and bias (torch's elementwise_affine=False)."""

    def __init__(self, width: int, *, eps: float, affine: bool = True, dtype=jnp.float32, rngs: nnx.Rngs):
        self.scale = param(rngs, ones, (width,), ("embed",)) if affine else None
        self.bias = param(rngs, zeros, (width,), ("embed",)) if affine else None
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        mean = x.mean(-1, keepdims=True)
        var = jnp.square(x - mean).mean(-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.eps)
        if self.scale is not None:
            y = y * self.scale[...] + self.bias[...]
        return y.astype(self.dtype)


ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}


class Mlp(nnx.Module):
    """fc1 -> activation -> fc2."""

    def __init__(self, width: int, hidden: int, *, activation: str = "gelu", dtype=jnp.float32,
                 rngs: nnx.Rngs):
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation: expected one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.fc1 = Dense(width, hidden, axes=("embed", "mlp"), dtype=dtype, rngs=rngs)
        self.fc2 = Dense(hidden, width, axes=("mlp", "embed"), dtype=dtype, rngs=rngs)
        self.activation = activation

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(ACTIVATIONS[self.activation](self.fc1(x)))


class Attention(nnx.Module):
    """Multi-head attention with separate q/k/v projections (self or cross).

    q: (D_q -> N, H), k/v: (D_kv -> N, H), out: (N, H -> D_q). `bias` says which of
    q, k, v carry a bias (EVA has none on k); the output projection has one unless
    `out_bias` is False.
    """

    def __init__(self, width: int, num_heads: int, *, kv_width: int | None = None,
                 bias: str = "qkv", out_bias: bool = True, lora: LoRA | None = None, dtype=jnp.float32,
                 rngs: nnx.Rngs):
        if width % num_heads:
            raise ValueError(f"num_heads: {num_heads} must divide width {width}")
        kv_width = kv_width or width
        head_dim = width // num_heads
        self.query = param(rngs, fan_in(), (width, num_heads, head_dim), ("embed", "heads", "kv"))
        self.key = param(rngs, fan_in(), (kv_width, num_heads, head_dim), ("embed", "heads", "kv"))
        self.value = param(rngs, fan_in(), (kv_width, num_heads, head_dim), ("embed", "heads", "kv"))
        for name in "qkv":
            bias_param = (param(rngs, zeros, (num_heads, head_dim), ("heads", "kv"))
                          if name in bias else None)
            setattr(self, f"{name}_bias", bias_param)
        self.out = param(rngs, fan_in((0, 1)), (num_heads, head_dim, width), ("heads", "kv", "embed"))
        self.out_bias = param(rngs, zeros, (width,), ("embed",)) if out_bias else None
        targets = lora.targets if lora else ()
        for name, d_in in (("query", width), ("key", kv_width), ("value", kv_width)):
            adapted = name in targets
            setattr(self, f"{name}_lora_a", lora_param(rngs, lora_a_init(), (d_in, lora.rank), ("embed", None))
                    if adapted else None)
            setattr(self, f"{name}_lora_b", lora_param(rngs, zeros, (lora.rank, num_heads, head_dim),
                                                       (None, "heads", "kv")) if adapted else None)
        self.out_lora_a = (lora_param(rngs, lora_a_init((0, 1)), (num_heads, head_dim, lora.rank),
                                      ("heads", "kv", None)) if "out" in targets else None)
        self.out_lora_b = lora_param(rngs, zeros, (lora.rank, width), (None, "embed")) if "out" in targets else None
        self.lora_scale = lora.scale if lora else 0.0
        self.lora_dropout = lora.dropout if lora else 0.0
        self.head_dim = head_dim
        self.dtype = dtype

    def project(self, x: jax.Array, name: str, rng: jax.Array | None = None) -> jax.Array:
        """The `name` ("query", "key" or "value") projection: (B,L,D) -> (B,L,N,H);
        `rng` drops the adapter's input at the LoRA dropout rate."""
        x = x.astype(self.dtype)
        y = jnp.einsum("BLD,DNH->BLNH", x, getattr(self, name)[...].astype(self.dtype))
        lora_a = getattr(self, f"{name}_lora_a")
        if lora_a is not None:
            low = jnp.einsum("BLD,DR->BLR", dropout(x, self.lora_dropout, rng), lora_a[...].astype(self.dtype))
            y = y + self.lora_scale * jnp.einsum("BLR,RNH->BLNH", low,
                                                 getattr(self, f"{name}_lora_b")[...].astype(self.dtype))
        bias = getattr(self, f"{name[0]}_bias")
        return y if bias is None else y + bias[...].astype(self.dtype)

    def __call__(self, x: jax.Array, context: jax.Array | None = None,
                 mask: jax.Array | None = None, dropout_rate: float = 0.0,
                 rng: jax.Array | None = None) -> jax.Array:
        """x (B,L,D), context (B,S,D_kv) or None for self-attention, mask broadcastable
        to (B,N,L,S) with True = attend. Returns (B,L,D)."""
        context = x if context is None else context
        q = self.project(x, "query") * self.head_dim ** -0.5
        k = self.project(context, "key")
        v = self.project(context, "value")
        scores = attention_scores("BLNH,BSNH->BNLS", q, k)
        if mask is not None:
            scores = scores + jnp.where(mask, 0.0, MASK_VALUE)
        probs = dropout(jax.nn.softmax(scores, axis=-1), dropout_rate, rng).astype(self.dtype)
        y = jnp.einsum("BNLS,BSNH->BLNH", probs, v)
        return self.output(y)

    def output(self, y: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        """The output projection: (B,L,N,H) -> (B,L,D); `rng` drops the adapter's
        input at the LoRA dropout rate."""
        out = jnp.einsum("BLNH,NHD->BLD", y, self.out[...].astype(self.dtype))
        if self.out_lora_a is not None:
            low = jnp.einsum("BLNH,NHR->BLR", dropout(y, self.lora_dropout, rng),
                             self.out_lora_a[...].astype(self.dtype))
            out = out + self.lora_scale * jnp.einsum("BLR,RD->BLD", low, self.out_lora_b[...].astype(self.dtype))
        return out if self.out_bias is None else out + self.out_bias[...].astype(self.dtype)

    def dot_product(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        """Unmasked attention through `jax.nn.dot_product_attention` with no
        implementation named, which JAX 0.10 runs as its XLA path on every backend
        (not cuDNN's fused kernel: that takes implementation="cudnn").
        x (B,L,D), context (B,S,D_kv) or None -> (B,L,D)."""
        context = x if context is None else context
        y = jax.nn.dot_product_attention(self.project(x, "query"), self.project(context, "key"),
                                         self.project(context, "value"))
        return self.output(y)


def attention_scores(spec: str, q: jax.Array, k: jax.Array) -> jax.Array:
    """The q·k scores in float32 for the float32 softmax: bfloat16 q and k accumulate into
    float32 and stay there (as in `jax.nn.dot_product_attention`), not rounded to bfloat16
    first (0.25 apart near 100)."""
    return jnp.einsum(spec, q, k, preferred_element_type=jnp.float32)


def causal_mask(length: int) -> jax.Array:
    """(1,1,L,L) lower-triangular mask, diagonal included."""
    return jnp.tril(jnp.ones((length, length), bool))[None, None]


def padding_mask(token_mask: jax.Array) -> jax.Array:
    """(B,S) 1/0 key mask -> (B,1,1,S) boolean attention mask."""
    return token_mask.astype(bool)[:, None, None, :]


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    """A pre-LN transformer block (ViT / CLIP style)."""
    width: int
    num_heads: int
    mlp_dim: int
    eps: float = 1e-6
    qkv_bias: str = "qkv"  # which of q, k, v have a bias: "qkv", "qv" (EVA), ""
    activation: str = "gelu"
    causal: bool = False


class PreLNBlock(nnx.Module):
    """x + attn(norm1(x)); x + mlp(norm2(x))."""

    def __init__(self, config: BlockConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        c = config
        self.norm1 = LayerNorm(c.width, eps=c.eps, dtype=dtype, rngs=rngs)
        self.attn = Attention(c.width, c.num_heads, bias=c.qkv_bias, dtype=dtype, rngs=rngs)
        self.norm2 = LayerNorm(c.width, eps=c.eps, dtype=dtype, rngs=rngs)
        self.mlp = Mlp(c.width, c.mlp_dim, activation=c.activation, dtype=dtype, rngs=rngs)
        self.causal = c.causal

    def __call__(self, x: jax.Array) -> jax.Array:
        x = parallel.constrain(x, ("batch", "length", "embed"))
        mask = causal_mask(x.shape[1]) if self.causal else None
        x = x + self.attn(self.norm1(x), mask=mask)
        return x + self.mlp(self.norm2(x))


def stacked(make_layer: Callable[[nnx.Rngs], nnx.Module], num_layers: int, rngs: nnx.Rngs) -> nnx.Module:
    """`num_layers` copies of a layer with parameters stacked on a leading `layers` axis."""

    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def create(rngs):
        return make_layer(rngs)

    return create(rngs)


def scan(layers: nnx.Module, step: Callable, carry, xs=None, *, remat: bool = False):
    """Runs `step(layer, carry, x) -> carry` over stacked `layers` with lax.scan.

    `xs` is an optional pytree with a leading layers axis (e.g. per-layer rngs).
    Returns the final carry.
    """
    graphdef, state = nnx.split(layers)

    def body(carry, inputs):
        layer_state, x = inputs
        return step(nnx.merge(graphdef, layer_state), carry, x), None

    if remat:
        body = jax.checkpoint(body)
    return jax.lax.scan(body, carry, (state, xs))[0]


class BlockStack(nnx.Module):
    """`depth` scanned pre-LN blocks. (B,L,D) -> (B,L,D)."""

    def __init__(self, config: BlockConfig, depth: int, *, dtype=jnp.float32, remat: bool = False,
                 rngs: nnx.Rngs):
        self.blocks = stacked(lambda r: PreLNBlock(config, dtype=dtype, rngs=r), depth, rngs)
        self.remat = remat

    def __call__(self, x: jax.Array) -> jax.Array:
        return scan(self.blocks, lambda block, h, _: block(h), x, remat=self.remat)
