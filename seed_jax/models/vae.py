"""Stable Diffusion's AutoencoderKL in NNX, NHWC.

Encoder: image (B,H,W,3) in [-1,1] -> conv_in -> down levels (residual blocks,
stride-2 conv) -> mid (resnet, single-head attention, resnet) -> GN -> SiLU -> conv_out
-> quant_conv -> mean and log-variance (B,H/f,W/f,Z) each, f = 2^(levels-1).
Decoder: latents -> post_quant_conv -> conv_in -> mid -> up levels (one more resnet
per level, nearest-2x + conv) -> GN -> SiLU -> conv_out -> image. Latents for the
UNet are the encoder's mean (or a sample) times `scaling_factor`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from seed_jax.models.conv_layers import Conv, Downsample, GroupNorm, ResnetBlock, SpatialSelfAttention, Upsample


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Defaults are SD v1.x's autoencoder."""
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_groups: int = 32
    norm_eps: float = 1e-6
    scaling_factor: float = 0.18215

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.block_channels) - 1)

    @classmethod
    def from_dict(cls, d: dict) -> "VAEConfig":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


class MidBlock(nnx.Module):
    def __init__(self, channels: int, c: VAEConfig, *, dtype, rngs: nnx.Rngs):
        kw = dict(time_channels=None, groups=c.norm_groups, eps=c.norm_eps, dtype=dtype, rngs=rngs)
        self.resnet1 = ResnetBlock(channels, channels, **kw)
        self.attention = SpatialSelfAttention(channels, groups=c.norm_groups, eps=c.norm_eps, dtype=dtype, rngs=rngs)
        self.resnet2 = ResnetBlock(channels, channels, **kw)

    def __call__(self, x):
        return self.resnet2(self.attention(self.resnet1(x)))


class Level(nnx.Module):
    """`num_layers` residual blocks, then an optional resampling conv."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, c: VAEConfig, *, resample: str | None,
                 dtype, rngs: nnx.Rngs):
        self.resnets = nnx.List([
            ResnetBlock(in_channels if j == 0 else out_channels, out_channels, time_channels=None,
                        groups=c.norm_groups, eps=c.norm_eps, dtype=dtype, rngs=rngs) for j in range(num_layers)])
        self.downsample = (Downsample(out_channels, asymmetric_padding=True, dtype=dtype, rngs=rngs)
                           if resample == "down" else None)
        self.upsample = Upsample(out_channels, dtype=dtype, rngs=rngs) if resample == "up" else None

    def __call__(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsample is not None:
            x = self.downsample(x)
        return x if self.upsample is None else self.upsample(x)


class Encoder(nnx.Module):
    def __init__(self, c: VAEConfig, *, dtype, rngs: nnx.Rngs):
        ch = c.block_channels
        self.conv_in = Conv(c.in_channels, ch[0], dtype=dtype, rngs=rngs)
        self.down_blocks = nnx.List([
            Level(ch[max(i - 1, 0)], ch[i], c.layers_per_block, c, resample="down" if i < len(ch) - 1 else None,
                  dtype=dtype, rngs=rngs) for i in range(len(ch))])
        self.mid_block = MidBlock(ch[-1], c, dtype=dtype, rngs=rngs)
        self.conv_norm_out = GroupNorm(ch[-1], groups=c.norm_groups, eps=c.norm_eps, dtype=dtype, rngs=rngs)
        self.conv_out = Conv(ch[-1], 2 * c.latent_channels, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        x = self.conv_in(x)
        for level in self.down_blocks:
            x = level(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(self.mid_block(x))))


class Decoder(nnx.Module):
    def __init__(self, c: VAEConfig, *, dtype, rngs: nnx.Rngs):
        ch = tuple(reversed(c.block_channels))
        self.conv_in = Conv(c.latent_channels, ch[0], dtype=dtype, rngs=rngs)
        self.mid_block = MidBlock(ch[0], c, dtype=dtype, rngs=rngs)
        self.up_blocks = nnx.List([
            Level(ch[max(i - 1, 0)], ch[i], c.layers_per_block + 1, c, resample="up" if i < len(ch) - 1 else None,
                  dtype=dtype, rngs=rngs) for i in range(len(ch))])
        self.conv_norm_out = GroupNorm(ch[-1], groups=c.norm_groups, eps=c.norm_eps, dtype=dtype, rngs=rngs)
        self.conv_out = Conv(ch[-1], c.out_channels, dtype=dtype, rngs=rngs)

    def __call__(self, z):
        x = self.mid_block(self.conv_in(z))
        for level in self.up_blocks:
            x = level(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):

    def __init__(self, config: VAEConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        c = self.config = config
        self.encoder = Encoder(c, dtype=dtype, rngs=rngs)
        self.quant_conv = Conv(2 * c.latent_channels, 2 * c.latent_channels, 1, dtype=dtype, rngs=rngs)
        self.post_quant_conv = Conv(c.latent_channels, c.latent_channels, 1, dtype=dtype, rngs=rngs)
        self.decoder = Decoder(c, dtype=dtype, rngs=rngs)

    def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """images (B,H,W,3) in [-1,1], H and W multiples of the downscale -> (mean,
        log-variance clipped to [-30, 20]), each (B,H/f,W/f,Z) float32, unscaled."""
        c = self.config
        if images.ndim != 4 or images.shape[-1] != c.in_channels or images.shape[1] % c.downscale \
                or images.shape[2] % c.downscale:
            raise ValueError(f"images: expected (B,H,W,{c.in_channels}) with H and W multiples of {c.downscale}, "
                             f"got {images.shape}")
        moments = self.quant_conv(self.encoder(images)).astype(jnp.float32)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, latents: jax.Array) -> jax.Array:
        """Unscaled latents (B,h,w,Z) -> images (B,h*f,w*f,3) float32 (about [-1,1], not clipped)."""
        c = self.config
        if latents.ndim != 4 or latents.shape[-1] != c.latent_channels:
            raise ValueError(f"latents: expected (B,h,w,{c.latent_channels}), got {latents.shape}")
        return self.decoder(self.post_quant_conv(latents)).astype(jnp.float32)
