"""Stable Diffusion's UNet2DConditionModel in NNX, NHWC.

(B,h,w,C_in) noisy latents, (B,) timesteps, (B,S,X) context -> (B,h,w,C_out) noise
prediction. conv_in -> down levels (residual blocks, cross-attention transformers,
stride-2 conv) -> mid (resnet, transformer, resnet) -> up levels (each block takes
one skip from the way down; nearest-2x + conv) -> GN -> SiLU -> conv_out. The
timestep enters every residual block through a sinusoidal embedding and an MLP.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from seed_jax.models import layers
from seed_jax.models.conv_layers import Conv, Downsample, GroupNorm, ResnetBlock, Upsample


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """Defaults are SD v1.x. `attention_levels[i]`: whether down level i (and the
    mirrored up level) has cross-attention; `num_heads[i]` its head count."""
    in_channels: int = 4
    out_channels: int = 4
    sample_size: int = 64  # latent side the model was trained at
    block_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    attention_levels: tuple[bool, ...] = (True, True, True, False)
    num_heads: tuple[int, ...] = (8, 8, 8, 8)
    cross_attention_dim: int = 768
    norm_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    center_input_sample: bool = False  # the UNet first maps its input x to 2x - 1

    def __post_init__(self):
        levels = len(self.block_channels)
        for name in ("attention_levels", "num_heads"):
            if len(getattr(self, name)) != levels:
                raise ValueError(f"{name}: expected {levels} entries (one per level of block_channels), "
                                 f"got {getattr(self, name)}")

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.block_channels[0]

    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


UNET_PRESETS = {
    "sd_v1": UNetConfig(),
    "tiny": UNetConfig(block_channels=(32, 64), attention_levels=(True, False), num_heads=(2, 2),
                       cross_attention_dim=24, norm_groups=8, sample_size=8),
}


def timestep_embedding(timesteps: jax.Array, dim: int, *, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: float = 10000.0) -> jax.Array:
    """(B,) timesteps (any real values) -> (B,dim) float32 [sin | cos] (or [cos | sin])."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift))
    args = timesteps.astype(jnp.float32)[:, None] * freqs[None]
    sin, cos = jnp.sin(args), jnp.cos(args)
    return jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)


class TimestepMLP(nnx.Module):
    """linear_1 -> SiLU -> linear_2: (B,C0) -> (B,E)."""

    def __init__(self, in_dim: int, out_dim: int, *, dtype, rngs: nnx.Rngs):
        self.linear_1 = layers.Dense(in_dim, out_dim, axes=(None, "mlp"), dtype=dtype, rngs=rngs)
        self.linear_2 = layers.Dense(out_dim, out_dim, axes=("mlp", None), dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.linear_2(jax.nn.silu(self.linear_1(x)))


class GegluFeedForward(nnx.Module):
    """proj (D -> 2F) split into value and gate, value * GELU(gate), out (F -> D)."""

    def __init__(self, width: int, *, dtype, rngs: nnx.Rngs):
        self.proj = layers.Dense(width, 8 * width, axes=("embed", "mlp"), dtype=dtype, rngs=rngs)
        self.out = layers.Dense(4 * width, width, axes=("mlp", "embed"), dtype=dtype, rngs=rngs)

    def __call__(self, x):
        value, gate = jnp.split(self.proj(x), 2, axis=-1)
        return self.out(value * jax.nn.gelu(gate, approximate=False))


class TransformerBlock(nnx.Module):
    """x + self-attn(LN x); x + cross-attn(LN x, context); x + GEGLU(LN x). (B,T,C)."""

    def __init__(self, width: int, num_heads: int, context_dim: int, *, dtype, rngs: nnx.Rngs):
        self.norm1 = layers.LayerNorm(width, eps=1e-5, dtype=dtype, rngs=rngs)
        self.attn1 = layers.Attention(width, num_heads, bias="", dtype=dtype, rngs=rngs)
        self.norm2 = layers.LayerNorm(width, eps=1e-5, dtype=dtype, rngs=rngs)
        self.attn2 = layers.Attention(width, num_heads, kv_width=context_dim, bias="", dtype=dtype, rngs=rngs)
        self.norm3 = layers.LayerNorm(width, eps=1e-5, dtype=dtype, rngs=rngs)
        self.ff = GegluFeedForward(width, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        x = x + self.attn1.dot_product(self.norm1(x))
        x = x + self.attn2.dot_product(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nnx.Module):
    """GN -> proj_in -> transformer block over the H*W positions -> proj_out, plus
    the input. (B,H,W,C), context (B,S,X) -> (B,H,W,C)."""

    def __init__(self, channels: int, num_heads: int, context_dim: int, *, groups: int, dtype, rngs: nnx.Rngs):
        self.norm = GroupNorm(channels, groups=groups, eps=1e-6, dtype=dtype, rngs=rngs)
        self.proj_in = layers.Dense(channels, channels, axes=("embed", "mlp"), dtype=dtype, rngs=rngs)
        self.block = TransformerBlock(channels, num_heads, context_dim, dtype=dtype, rngs=rngs)
        self.proj_out = layers.Dense(channels, channels, axes=("mlp", "embed"), dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        tokens = self.proj_in(self.norm(x).reshape(b, h * w, c))
        tokens = self.proj_out(self.block(tokens, context))
        return x + tokens.reshape(b, h, w, c).astype(x.dtype)


class DownLevel(nnx.Module):
    def __init__(self, in_channels: int, out_channels: int, *, num_layers: int, attention: bool, num_heads: int,
                 downsample: bool, c: UNetConfig, dtype, rngs: nnx.Rngs):
        self.resnets = nnx.List([
            ResnetBlock(in_channels if j == 0 else out_channels, out_channels, time_channels=c.time_embed_dim,
                        groups=c.norm_groups, eps=c.norm_eps, dtype=dtype, rngs=rngs) for j in range(num_layers)])
        self.attentions = nnx.List([
            SpatialTransformer(out_channels, num_heads, c.cross_attention_dim, groups=c.norm_groups, dtype=dtype,
                               rngs=rngs) for _ in range(num_layers)]) if attention else None
        self.downsample = Downsample(out_channels, dtype=dtype, rngs=rngs) if downsample else None

    def __call__(self, x, temb, context) -> tuple[jax.Array, list[jax.Array]]:
        """Returns the output and the skips it leaves for the up levels."""
        skips = []
        for j, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[j](x, context)
            skips.append(x)
        if self.downsample is not None:
            x = self.downsample(x)
            skips.append(x)
        return x, skips


class UpLevel(nnx.Module):
    def __init__(self, in_channels: int, out_channels: int, skip_channels: list[int], *, attention: bool,
                 num_heads: int, upsample: bool, c: UNetConfig, dtype, rngs: nnx.Rngs):
        self.resnets = nnx.List([
            ResnetBlock((in_channels if j == 0 else out_channels) + skip, out_channels,
                        time_channels=c.time_embed_dim, groups=c.norm_groups, eps=c.norm_eps, dtype=dtype, rngs=rngs)
            for j, skip in enumerate(skip_channels)])
        self.attentions = nnx.List([
            SpatialTransformer(out_channels, num_heads, c.cross_attention_dim, groups=c.norm_groups, dtype=dtype,
                               rngs=rngs) for _ in skip_channels]) if attention else None
        self.upsample = Upsample(out_channels, dtype=dtype, rngs=rngs) if upsample else None

    def __call__(self, x, skips: list[jax.Array], temb, context) -> jax.Array:
        """`skips` are consumed last first; the upsampling matches the next one's size
        (odd where the way down halved an odd size)."""
        for j, resnet in enumerate(self.resnets):
            x = resnet(jnp.concatenate([x, skips.pop().astype(x.dtype)], axis=-1), temb)
            if self.attentions is not None:
                x = self.attentions[j](x, context)
        return x if self.upsample is None else self.upsample(x, skips[-1].shape[1:3])


class MidLevel(nnx.Module):
    def __init__(self, channels: int, num_heads: int, *, c: UNetConfig, dtype, rngs: nnx.Rngs):
        make_resnet = lambda: ResnetBlock(channels, channels, time_channels=c.time_embed_dim,  # noqa: E731
                                          groups=c.norm_groups, eps=c.norm_eps, dtype=dtype, rngs=rngs)
        self.resnet1 = make_resnet()
        self.attention = SpatialTransformer(channels, num_heads, c.cross_attention_dim, groups=c.norm_groups,
                                            dtype=dtype, rngs=rngs)
        self.resnet2 = make_resnet()

    def __call__(self, x, temb, context):
        return self.resnet2(self.attention(self.resnet1(x, temb), context), temb)


class UNet(nnx.Module):

    def __init__(self, config: UNetConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        c = self.config = config
        channels, levels = c.block_channels, len(c.block_channels)
        self.conv_in = Conv(c.in_channels, channels[0], dtype=dtype, rngs=rngs)
        self.time_embedding = TimestepMLP(channels[0], c.time_embed_dim, dtype=dtype, rngs=rngs)
        down, skip_channels = [], [channels[0]]
        for i in range(levels):
            last = i == levels - 1
            down.append(DownLevel(channels[max(i - 1, 0)], channels[i], num_layers=c.layers_per_block,
                                  attention=c.attention_levels[i], num_heads=c.num_heads[i], downsample=not last,
                                  c=c, dtype=dtype, rngs=rngs))
            skip_channels += [channels[i]] * (c.layers_per_block + (not last))
        self.down_blocks = nnx.List(down)
        self.mid_block = MidLevel(channels[-1], c.num_heads[-1], c=c, dtype=dtype, rngs=rngs)
        up = []
        for i in reversed(range(levels)):
            skips = [skip_channels.pop() for _ in range(c.layers_per_block + 1)]
            up.append(UpLevel(channels[min(i + 1, levels - 1)], channels[i], skips, attention=c.attention_levels[i],
                              num_heads=c.num_heads[i], upsample=i > 0, c=c, dtype=dtype, rngs=rngs))
        self.up_blocks = nnx.List(up)
        self.conv_norm_out = GroupNorm(channels[0], groups=c.norm_groups, eps=c.norm_eps, dtype=dtype, rngs=rngs)
        self.conv_out = Conv(channels[0], c.out_channels, dtype=dtype, rngs=rngs)
        self.dtype = dtype

    def __call__(self, sample: jax.Array, timesteps: jax.Array, context: jax.Array) -> jax.Array:
        """sample (B,h,w,C_in), timesteps (B,) or scalar, context (B,S,X) -> (B,h,w,C_out) float32.
        Any h, w: a level halving an odd size rounds up, its upsampling crops back."""
        c = self.config
        if sample.ndim != 4 or sample.shape[-1] != c.in_channels:
            raise ValueError(f"sample: expected (B,h,w,{c.in_channels}), got {sample.shape}")
        if context.ndim != 3 or context.shape[-1] != c.cross_attention_dim:
            raise ValueError(f"context: expected (B,S,{c.cross_attention_dim}), got {context.shape}")
        timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (sample.shape[0],))
        temb = self.time_embedding(timestep_embedding(timesteps, c.block_channels[0],
                                                      flip_sin_to_cos=c.flip_sin_to_cos, freq_shift=c.freq_shift))
        context = context.astype(self.dtype)
        x = self.conv_in(2 * sample - 1 if c.center_input_sample else sample)
        skips = [x]
        for level in self.down_blocks:
            x, level_skips = level(x, temb, context)
            skips += level_skips
        x = self.mid_block(x, temb, context)
        for level in self.up_blocks:
            x = level(x, skips, temb, context)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x))).astype(jnp.float32)
