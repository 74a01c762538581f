"""A read-only {key: array} whose arrays are read from the checkpoint only when looked up.

Converters look at shapes first and then read each source tensor once, so holding
the whole state dict in memory (as float32, next to the converted parameters) is
never needed: with `LazyArrays` a conversion holds its output plus one source
tensor at a time. Renaming keys and merging files make new mappings over the same
readers, without reading anything.
"""

from __future__ import annotations

from typing import Callable, Iterator, Mapping

import jax.numpy as jnp
import numpy as np

# One entry: (shape, reader); the reader returns the array, float32 when it is floating point.
Entry = tuple[tuple[int, ...], Callable[[], np.ndarray]]


def as_float32(x: np.ndarray) -> np.ndarray:
    """Floating arrays as a float32 copy (never a view of a memory-mapped file);
    integer and boolean arrays as they are."""
    x = np.asarray(x)  # jnp's issubdtype: numpy's does not count ml_dtypes' bfloat16 as floating
    return np.array(x, np.float32) if jnp.issubdtype(x.dtype, jnp.floating) else np.array(x)


class LazyArrays(Mapping[str, np.ndarray]):
    """`arrays[key]` reads that array (every time: nothing is cached);
    `shape(key)`, `in` and iteration read nothing."""

    def __init__(self, entries: dict[str, Entry]):
        self._entries = entries

    @classmethod
    def of(cls, arrays: Mapping[str, np.ndarray]) -> LazyArrays:
        """`arrays` itself if it is lazy, else a lazy view of an in-memory dict."""
        if isinstance(arrays, LazyArrays):
            return arrays
        return cls({k: (np.shape(v), lambda v=v: as_float32(v)) for k, v in arrays.items()})

    @classmethod
    def merged(cls, *parts: Mapping[str, np.ndarray] | None) -> LazyArrays:
        """One key space; a later part's key replaces an earlier one's."""
        entries: dict[str, Entry] = {}
        for part in parts:
            if part is not None:
                entries.update(cls.of(part)._entries)
        return cls(entries)

    def rekeyed(self, new_key: Callable[[str], str | None]) -> LazyArrays:
        """The same arrays under `new_key(key)`; keys it maps to None are left out."""
        entries = {}
        for key, entry in self._entries.items():
            name = new_key(key)
            if name is not None:
                entries[name] = entry
        return LazyArrays(entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._entries[key][0])

    def __getitem__(self, key: str) -> np.ndarray:
        return self._entries[key][1]()

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)
