"""Mapping tables from source checkpoints to our parameters, and the hooks they use.

A table maps each of our parameters (dotted path) to a `Rule`: the source key(s),
a hook that turns the source arrays into our layout, and, for scanned stacks, the
source layer indices whose results are stacked on a leading axis. Source keys may
hold `{i}`, the layer index. PyTorch stores a Linear weight as (out, in); we store
(in, out), and attention kernels split into heads: (in, N, H) and (N, H, out).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Mapping, Sequence

import numpy as np

from seed_jax.convert.lazy_arrays import LazyArrays


@dataclasses.dataclass(frozen=True)
class Rule:
    sources: tuple[str, ...]
    hook: Callable[..., np.ndarray] = lambda x: x
    layers: tuple[int, ...] | None = None  # stack over these source layer indices


def rule(*sources: str, hook: Callable = lambda x: x, layers: Sequence[int] | None = None) -> Rule:
    return Rule(tuple(sources), hook, None if layers is None else tuple(layers))


class Source:
    """A state dict that remembers which keys were read; arrays are read from the
    checkpoint only when looked up (`LazyArrays`)."""

    def __init__(self, arrays: Mapping[str, np.ndarray], name: str):
        self.arrays, self.name, self.used = LazyArrays.of(arrays), name, set()

    def __contains__(self, key: str) -> bool:
        return key in self.arrays

    def __getitem__(self, key: str) -> np.ndarray:
        self._check(key)
        self.used.add(key)
        return self.arrays[key]

    def shape(self, key: str) -> tuple[int, ...]:
        """The shape of `key`'s array, without reading it."""
        self._check(key)
        return self.arrays.shape(key)

    def _check(self, key: str) -> None:
        if key not in self.arrays:
            raise KeyError(f"{self.name}: missing key {key!r}")

    def count(self, template: str) -> int:
        """How many consecutive layers `template` (with `{i}`) has, from 0. A gap is a
        KeyError naming the first missing key: layer n lacks it while keys of layer n
        or later exist under the template's prefix (a missing layer or shard)."""
        n = 0
        while template.format(i=n) in self.arrays:
            n += 1
        layer = re.compile(re.escape(template.split("{i}")[0]) + r"(\d+)\.")
        later = [int(m[1]) for key in self.arrays if (m := layer.match(key)) and int(m[1]) >= n]
        if later:
            raise KeyError(f"{self.name}: missing key {template.format(i=n)!r}, though layer {max(later)} "
                           "has keys (a missing layer or shard?)")
        return n

    def unused(self) -> list[str]:
        return sorted(set(self.arrays) - self.used)


def apply(table: dict[str, Rule], source: Source,
          shapes: Mapping[str, tuple[int, ...]] | None = None) -> dict[str, np.ndarray]:
    """Our dotted path -> array, every rule evaluated against `source`; a result of
    another shape than `shapes` (the model's) gives fails naming the source keys."""
    out = {}
    for target, r in table.items():
        expected = None if shapes is None or target not in shapes else tuple(shapes[target])
        try:
            if r.layers is None:
                out[target] = np.asarray(_through_hook(target, r.hook, r.sources, source, expected), np.float32)
            else:
                out[target] = _stack(target, r, source, expected and expected[1:])
        except KeyError as e:
            raise KeyError(f"{e.args[0]} (needed for {target})") from None
    return out


def _through_hook(target: str, hook: Callable, keys: Sequence[str], source: Source,
                  expected: tuple[int, ...] | None = None) -> np.ndarray:
    """`hook` over the source arrays at `keys`; a ValueError or IndexError it raises (a
    reshape or split that does not fit), or a result not of the `expected` shape, is a
    ValueError naming `target` and each key with its shape."""
    arrays = [source[k] for k in keys]
    read = ", ".join(f"{k} {tuple(np.shape(a))}" for k, a in zip(keys, arrays))
    try:
        result = hook(*arrays)
    except (ValueError, IndexError) as e:
        raise ValueError(f"{target}: converting {read} failed: {e}") from e
    if expected is not None and np.shape(result) != expected:
        raise ValueError(f"{target}: converting {read} gives shape {np.shape(result)}; the model's is {expected}")
    return result


def _stack(target: str, r: Rule, source: Source, expected: tuple[int, ...] | None = None) -> np.ndarray:
    """Each of `r.layers` through the hook (each of the `expected` shape, when given),
    written into one float32 (L, ...) array as it comes: never a list of all layers
    next to their stack."""
    stack = None
    for n, i in enumerate(r.layers):
        layer = _through_hook(target, r.hook, [k.format(i=i) for k in r.sources], source, expected)
        if stack is None:
            stack = np.empty((len(r.layers),) + np.shape(layer), np.float32)
        if np.shape(layer) != stack.shape[1:]:
            raise ValueError(f"{target}: layer {i} gives shape {np.shape(layer)}, layer {r.layers[0]} gave "
                             f"{stack.shape[1:]}")
        stack[n] = layer
    if stack is None:
        raise ValueError(f"{target}: a stacked parameter with no layers")
    return stack


# ---- hooks (source arrays -> our layout)
def linear(w):
    """torch Linear weight (out, in) -> kernel (in, out)."""
    return w.T


def squeeze_leading(x):
    """(1, ...) -> (...), e.g. query tokens (1, Q, D) -> (Q, D)."""
    if x.shape[0] != 1:
        raise ValueError(f"expected a leading axis of 1, got shape {x.shape}")
    return x[0]


def scalar(x):
    return np.asarray(x, np.float32).reshape(())


def patch_conv(w):
    """Conv2d weight (D, 3, P, P) -> patch kernel (P, P, 3, D)."""
    return w.transpose(2, 3, 1, 0)


def heads_in(num_heads: int):
    """(N*H, in) -> (in, N, H): a q/k/v projection."""
    def hook(w):
        out, width = w.shape
        return w.T.reshape(width, num_heads, out // num_heads)
    return hook


def heads_bias(num_heads: int):
    """(N*H,) -> (N, H)."""
    return lambda b: b.reshape(num_heads, -1)


def heads_out(num_heads: int):
    """(out, N*H) -> (N, H, out): the attention output projection."""
    def hook(w):
        out, inner = w.shape
        return w.T.reshape(num_heads, inner // num_heads, out)
    return hook


def fused_part(part: int, hook: Callable):
    """Part `part` (0 q, 1 k, 2 v) of a fused qkv weight (3*D, ...) or bias (3*D,), then `hook`."""
    def split(x):
        return hook(np.split(x, 3, axis=0)[part])
    return split
