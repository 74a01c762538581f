"""A seeded synthetic "captioned shapes world".

Each image shows one or two coloured shapes, each in its own cell of a 3x3
grid, on a muted background. The caption names every object's size, colour,
shape and position, objects in reading order of their cells, e.g.
"a large red circle at the top left and a small blue star in the centre".
Every example is fully determined by ``(seed, index)``.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import os
import zlib
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw

from seed_jax.data import records, workers

# Bump when rendering or captions change, so cached datasets are regenerated.
GENERATOR_VERSION = 1

COLOURS = {
    "red": (215, 25, 30),
    "green": (20, 170, 45),
    "blue": (30, 70, 225),
    "yellow": (250, 225, 20),
    "purple": (140, 40, 190),
    "orange": (250, 130, 10),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}
# Object extent as a fraction of the image side; a grid cell is 1/3 of it.
SIZES = {"small": 0.16, "large": 0.28}
POSITIONS = (
    "at the top left",
    "at the top",
    "at the top right",
    "on the left",
    "in the centre",
    "on the right",
    "at the bottom left",
    "at the bottom",
    "at the bottom right",
)
# Low-saturation mid tones: far from every object colour, black and white included.
BACKGROUND_TONES = (
    (128, 128, 128),
    (102, 102, 108),
    (158, 158, 152),
    (112, 126, 142),
    (148, 134, 114),
    (114, 134, 114),
    (134, 114, 130),
    (124, 138, 138),
)
BACKGROUND_STYLES = ("plain", "vertical_gradient", "horizontal_gradient", "noise")
_NOISE_STD = 8.0
_SUPERSAMPLE = 4
_MAX_JITTER = 0.04  # of the image side
_CELL_MARGIN = 0.005  # of the image side, kept clear between an object and its cell edge
_EXAMPLES_PER_TASK = 500  # work unit of the parallel generator


def _star(points: int, inner: float) -> np.ndarray:
    angles = -np.pi / 2 + np.arange(2 * points) * np.pi / points
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


# Outlines in unit coordinates (x right, y down) inside the square [-1, 1]^2;
# the circle is drawn as an ellipse instead.
_OUTLINES = {
    "square": np.array([[-0.85, -0.85], [0.85, -0.85], [0.85, 0.85], [-0.85, 0.85]]),
    "triangle": np.array([[0.0, -1.0], [1.0, 0.8], [-1.0, 0.8]]),
    "star": _star(5, 0.5),
    "cross": np.array(
        [[-0.33, -1], [0.33, -1], [0.33, -0.33], [1, -0.33], [1, 0.33], [0.33, 0.33],
         [0.33, 1], [-0.33, 1], [-0.33, 0.33], [-1, 0.33], [-1, -0.33], [-0.33, -0.33]]
    ),
    "diamond": np.array([[0.0, -1.0], [0.7, 0.0], [0.0, 1.0], [-0.7, 0.0]]),
}
SHAPES = ("circle",) + tuple(_OUTLINES)
_COLOUR_NAMES = tuple(COLOURS)
_SIZE_NAMES = tuple(SIZES)


@dataclasses.dataclass(frozen=True)
class SceneObject:
    """One shape; ``cell`` indexes the 3x3 grid in reading order (0 = top left)."""

    shape: str
    colour: str
    size: str
    cell: int


@dataclasses.dataclass(frozen=True)
class Scene:
    """Objects sorted by cell, and a background style with its two tones."""

    objects: tuple[SceneObject, ...]
    background_style: str
    background_tones: tuple[tuple[int, int, int], tuple[int, int, int]]


def sample_scene(rng: np.random.Generator) -> Scene:
    """Draws one or two objects in distinct cells, plus a background."""
    num_objects = int(rng.integers(1, 3))
    cells = sorted(int(c) for c in rng.choice(len(POSITIONS), size=num_objects, replace=False))
    objects = tuple(
        SceneObject(
            shape=SHAPES[rng.integers(len(SHAPES))],
            colour=_COLOUR_NAMES[rng.integers(len(_COLOUR_NAMES))],
            size=_SIZE_NAMES[rng.integers(len(_SIZE_NAMES))],
            cell=cell,
        )
        for cell in cells
    )
    tones = rng.choice(len(BACKGROUND_TONES), size=2, replace=False)
    return Scene(
        objects=objects,
        background_style=BACKGROUND_STYLES[rng.integers(len(BACKGROUND_STYLES))],
        background_tones=(BACKGROUND_TONES[tones[0]], BACKGROUND_TONES[tones[1]]),
    )


def _background(scene: Scene, image_size: int, rng: np.random.Generator) -> np.ndarray:
    first, second = (np.asarray(t, np.float32) for t in scene.background_tones)
    ramp = np.linspace(0.0, 1.0, image_size, dtype=np.float32)[:, None, None]
    if scene.background_style == "vertical_gradient":
        return np.broadcast_to(first + ramp * (second - first), (image_size, image_size, 3)).copy()
    if scene.background_style == "horizontal_gradient":
        return np.broadcast_to(
            first + ramp.transpose(1, 0, 2) * (second - first), (image_size, image_size, 3)
        ).copy()
    canvas = np.broadcast_to(first, (image_size, image_size, 3)).copy()
    if scene.background_style == "noise":
        canvas += rng.normal(0.0, _NOISE_STD, canvas.shape).astype(np.float32)
    return canvas


def _coverage(obj: SceneObject, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """Anti-aliased (S, S, 1) coverage of one object, jittered inside its cell.

    The object is drawn at ``_SUPERSAMPLE`` times the resolution in a patch just
    around it, then downsampled with LANCZOS.
    """
    extent = SIZES[obj.size]
    max_jitter = min(_MAX_JITTER, (1 / 3 - extent) / 2 - _CELL_MARGIN)
    row, col = divmod(obj.cell, 3)
    centre = ((np.array([col, row]) + 0.5) / 3 + rng.uniform(-max_jitter, max_jitter, 2)) * image_size
    radius = extent / 2 * image_size
    # Patch in output pixels, with room for the LANCZOS kernel (3 pixels wide).
    low = np.maximum(np.floor(centre - radius).astype(int) - 3, 0)
    high = np.minimum(np.ceil(centre + radius).astype(int) + 3, image_size)
    width, height = high - low
    patch = Image.new("L", (width * _SUPERSAMPLE, height * _SUPERSAMPLE), 0)
    draw = ImageDraw.Draw(patch)
    centre_px, radius_px = (centre - low) * _SUPERSAMPLE, radius * _SUPERSAMPLE
    if obj.shape == "circle":
        draw.ellipse([*(centre_px - radius_px), *(centre_px + radius_px)], fill=255)
    else:
        outline = centre_px + radius_px * _OUTLINES[obj.shape]
        draw.polygon([tuple(p) for p in outline], fill=255)
    coverage = np.zeros((image_size, image_size, 1), np.float32)
    coverage[low[1] : high[1], low[0] : high[0], 0] = (
        np.asarray(patch.resize((width, height), Image.LANCZOS), np.float32) / 255.0
    )
    return coverage


def render(scene: Scene, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """Renders ``scene`` as a uint8 (S, S, 3) image; ``rng`` drives jitter and noise."""
    canvas = _background(scene, image_size, rng)
    for obj in scene.objects:
        coverage = _coverage(obj, image_size, rng)
        canvas += coverage * (np.asarray(COLOURS[obj.colour], np.float32) - canvas)
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8)


def caption(scene: Scene) -> str:
    """English description of all objects in reading order."""
    return objects_caption(scene.objects)


def objects_caption(objects: tuple[SceneObject, ...]) -> str:
    """The caption of objects sorted by cell."""
    return " and ".join(f"a {obj.size} {obj.colour} {obj.shape} {POSITIONS[obj.cell]}" for obj in objects)


def parse_caption(text: str) -> tuple[SceneObject, ...] | None:
    """The objects a caption names (the inverse of `caption`), or None when the text
    does not follow the caption grammar."""
    objects = []
    for phrase in text.split(" and "):
        words = phrase.split(" ")
        position = " ".join(words[4:])
        if (len(words) < 6 or words[0] != "a" or words[1] not in SIZES or words[2] not in COLOURS
                or words[3] not in SHAPES or position not in POSITIONS):
            return None
        objects.append(SceneObject(shape=words[3], colour=words[2], size=words[1], cell=POSITIONS.index(position)))
    cells = [obj.cell for obj in objects]
    return tuple(objects) if cells == sorted(set(cells)) else None


def caption_vocabulary() -> list[str]:
    """Every word the caption grammar can produce, sorted."""
    words = {"a", "and", *SIZES, *COLOURS, *SHAPES}
    for phrase in POSITIONS:
        words.update(phrase.split())
    return sorted(words)


def make_example(index: int, seed: int, image_size: int) -> dict:
    """The record for example ``index`` of the stream seeded by ``seed``."""
    rng = np.random.default_rng([seed, index])
    scene = sample_scene(rng)
    buffer = io.BytesIO()
    Image.fromarray(render(scene, image_size, rng)).save(buffer, format="PNG", compress_level=1)
    return {"image": buffer.getvalue(), "caption": caption(scene), "id": f"shapes-{seed}-{index:07d}"}


def _make_examples(indices: range, seed: int, image_size: int) -> list[dict]:
    return [make_example(i, seed, image_size) for i in indices]


def generate_examples(
    num_examples: int, seed: int, image_size: int, num_workers: int | None = None
) -> Iterator[dict]:
    """Yields examples ``0 .. num_examples - 1`` in order, made on ``num_workers``
    spawned processes (default: all usable CPUs; see ``workers.map_in_order``)."""
    tasks = [
        range(start, min(start + _EXAMPLES_PER_TASK, num_examples))
        for start in range(0, num_examples, _EXAMPLES_PER_TASK)
    ]
    num_workers = min(num_workers or workers.usable_cpus(), len(tasks))
    make = functools.partial(_make_examples, seed=seed, image_size=image_size)
    for chunk in workers.map_in_order(make, tasks, num_workers):
        yield from chunk


def split_seed(seed: int, split: str) -> int:
    """A per-split seed, so different splits never share examples."""
    return int(np.random.SeedSequence([seed, zlib.crc32(split.encode("utf-8"))]).generate_state(1)[0])


def _read_marker(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def check_can_write(directory: str, split: str) -> None:
    """A ValueError naming `directory` where it holds `split` shards without the marker
    `write_shapes_dataset` writes beside its own (e.g. real data), which writing the split
    there would replace."""
    if not os.path.exists(os.path.join(directory, f"{split}.json")) and records.existing_shards(directory, split):
        raise ValueError(f"{directory}: holds {split!r} shards the shapes world did not write (no {split}.json "
                         "beside them); writing its shards there would replace them: give another folder")


def write_shapes_dataset(
    directory: str,
    *,
    split: str,
    num_examples: int,
    seed: int,
    image_size: int,
    num_shards: int,
    num_workers: int | None = None,
) -> list[str]:
    """Writes a split as ArrayRecord shards, or reuses them if already written.

    Example ``i`` of the split is ``make_example(i, split_seed(seed, split),
    image_size)``. A marker ``{split}.json`` with the settings is written after
    the shards; when it matches and all shards exist, nothing is regenerated.
    Shards of ``split`` without a marker (not written here, e.g. real data) are
    not replaced: a ValueError names the directory.
    """
    settings = {
        "generator_version": GENERATOR_VERSION,
        "split": split,
        "num_examples": num_examples,
        "seed": seed,
        "image_size": image_size,
        "num_shards": num_shards,
    }
    marker = os.path.join(directory, f"{split}.json")
    expected = [records.shard_path(directory, split, i, num_shards) for i in range(num_shards)]
    if _read_marker(marker) == settings and all(os.path.exists(p) for p in expected):
        return expected
    check_can_write(directory, split)
    os.makedirs(directory, exist_ok=True)
    records.write_json(marker, {**settings, "complete": False})  # the shards are ours while they are replaced
    examples = generate_examples(num_examples, split_seed(seed, split), image_size, num_workers)
    paths = records.write_array_record_shards(examples, directory, split, num_shards)
    records.write_json(marker, settings)
    return paths
