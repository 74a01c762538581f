"""Convolutional building blocks shared by the UNet and the VAE (NHWC throughout):
convolutions, group norm, residual blocks, down/up-sampling and spatial attention.

Shape letters: B batch, H/W height/width, C channels, T = H*W tokens, S context
length, N heads, K head dim, E time-embedding width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from seed_jax import parallel
from seed_jax.models import layers


class Conv(nnx.Module):
    """2-D convolution, kernel (kh, kw, C_in, C_out), `padding` pixels on every side
    (or "right_bottom": one extra row/column after, none before, as the VAE's
    stride-2 downsampling pads)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, *, stride: int = 1,
                 padding: int | str | None = None, dtype=jnp.float32, rngs: nnx.Rngs):
        self.kernel = layers.param(rngs, layers.fan_in((0, 1, 2)), (kernel_size, kernel_size, in_channels,
                                                                    out_channels), (None, None, "embed", "mlp"))
        self.bias = layers.param(rngs, layers.zeros, (out_channels,), ("mlp",))
        padding = kernel_size // 2 if padding is None else padding
        self.padding = ((0, 1), (0, 1)) if padding == "right_bottom" else ((padding, padding), (padding, padding))
        self.stride = stride
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        """(B,H,W,C_in) -> (B,H',W',C_out)."""
        # Split by batch alone, not by the last conv's output channels: on a mesh with data,
        # fsdp and tensor > 1, XLA's partitioner got chained convs' kernel gradients wrong.
        x = parallel.constrain(x, ("batch", "length", "length", "embed"))
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype), self.kernel[...].astype(self.dtype), (self.stride, self.stride), self.padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + self.bias[...].astype(self.dtype)


class GroupNorm(nnx.Module):
    """GroupNorm over (H, W, C/groups) in float32, returned in `dtype`."""

    def __init__(self, channels: int, *, groups: int = 32, eps: float, dtype=jnp.float32, rngs: nnx.Rngs):
        if channels % groups:
            raise ValueError(f"groups: {groups} must divide the channel count {channels}")
        self.scale = layers.param(rngs, layers.ones, (channels,), ("embed",))
        self.bias = layers.param(rngs, layers.zeros, (channels,), ("embed",))
        self.groups, self.eps, self.dtype = groups, eps, dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        """(B,...,C) -> same shape; statistics per example and group over all other axes."""
        shape = x.shape
        grouped = x.astype(jnp.float32).reshape(shape[0], -1, self.groups, shape[-1] // self.groups)
        mean = grouped.mean(axis=(1, 3), keepdims=True)
        var = jnp.square(grouped - mean).mean(axis=(1, 3), keepdims=True)
        normed = ((grouped - mean) * jax.lax.rsqrt(var + self.eps)).reshape(shape)
        return (normed * self.scale[...] + self.bias[...]).astype(self.dtype)


class ResnetBlock(nnx.Module):
    """GN -> SiLU -> conv3x3 (+ time projection) -> GN -> SiLU -> conv3x3, plus the
    input (through a 1x1 conv when the width changes). (B,H,W,C_in) -> (B,H,W,C_out)."""

    def __init__(self, in_channels: int, out_channels: int, *, time_channels: int | None, groups: int,
                 eps: float, dtype=jnp.float32, rngs: nnx.Rngs):
        self.norm1 = GroupNorm(in_channels, groups=groups, eps=eps, dtype=dtype, rngs=rngs)
        self.conv1 = Conv(in_channels, out_channels, dtype=dtype, rngs=rngs)
        self.time_emb_proj = (layers.Dense(time_channels, out_channels, axes=(None, "mlp"), dtype=dtype, rngs=rngs)
                              if time_channels else None)
        self.norm2 = GroupNorm(out_channels, groups=groups, eps=eps, dtype=dtype, rngs=rngs)
        self.conv2 = Conv(out_channels, out_channels, dtype=dtype, rngs=rngs)
        self.conv_shortcut = (Conv(in_channels, out_channels, 1, dtype=dtype, rngs=rngs)
                              if in_channels != out_channels else None)

    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        """x (B,H,W,C_in), temb (B,E) or None -> (B,H,W,C_out)."""
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(jax.nn.silu(temb))[:, None, None, :]
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return shortcut.astype(h.dtype) + h


class Downsample(nnx.Module):
    """Stride-2 3x3 conv: (B,H,W,C) -> (B,H/2,W/2,C). The UNet pads 1 on every side;
    the VAE pads one row/column on the bottom/right only."""

    def __init__(self, channels: int, *, asymmetric_padding: bool = False, dtype=jnp.float32, rngs: nnx.Rngs):
        self.conv = Conv(channels, channels, stride=2, padding="right_bottom" if asymmetric_padding else 1,
                         dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


class Upsample(nnx.Module):
    """Nearest-neighbour 2x then a 3x3 conv: (B,H,W,C) -> (B,2H,2W,C), or to `size`
    (h, w), each 2H or 2H - 1 (the size a stride-2 conv halved, rounding up): the
    last row/column is dropped, which picks the rows torch's nearest interpolation
    to that size picks."""

    def __init__(self, channels: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.conv = Conv(channels, channels, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, size: tuple[int, int] | None = None) -> jax.Array:
        doubled = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        if size is not None:
            doubled = doubled[:, :size[0], :size[1]]
        return self.conv(doubled)


class SpatialSelfAttention(nnx.Module):
    """The VAE's mid-block attention: GN, one head over all H*W positions, output
    projection, residual. (B,H,W,C) -> (B,H,W,C)."""

    def __init__(self, channels: int, *, groups: int, eps: float, dtype=jnp.float32, rngs: nnx.Rngs):
        self.norm = GroupNorm(channels, groups=groups, eps=eps, dtype=dtype, rngs=rngs)
        self.attn = layers.Attention(channels, 1, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        tokens = self.norm(x).reshape(b, h * w, c)
        return x + self.attn.dot_product(tokens).reshape(b, h, w, c).astype(x.dtype)

