"""Which parts of a shapes-world caption a captioner gets right.

Exact match hides where captions go wrong; here generated captions are parsed back
into objects (`synthetic.parse_caption`) and compared with the reference by grid
cell: how many generated captions follow the grammar, how many reference objects
get an object in their cell, and, for those, how often size, colour and shape agree.
"""

from __future__ import annotations

from typing import Sequence

from seed_jax.data import synthetic

ATTRIBUTES = ("size", "colour", "shape")


def attribute_scores(generated: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Scores in [0, 1]: `grammatical` (generated captions that parse), `object_count`
    (as many objects as the reference), `cell_recall` (reference objects whose cell
    holds a generated object), `cell_precision` (generated objects, of captions that
    parse, whose cell holds a reference object) and `{size,colour,shape}_accuracy` over
    the objects found (left out when there are none). Raises ValueError if a reference
    is not a shapes caption."""
    if len(generated) != len(references):
        raise ValueError(f"generated: {len(generated)} captions for {len(references)} references")
    parsed, counts, found = 0, 0, 0
    agree = {name: 0 for name in ATTRIBUTES}
    total_objects, generated_objects, placed = 0, 0, 0
    for text, reference in zip(generated, references):
        truth = synthetic.parse_caption(reference)
        if truth is None:
            raise ValueError(f"references: {reference!r} is not a shapes-world caption")
        total_objects += len(truth)
        guess = synthetic.parse_caption(text)
        if guess is None:
            continue
        parsed += 1
        counts += len(guess) == len(truth)
        generated_objects += len(guess)
        placed += len({obj.cell for obj in guess} & {obj.cell for obj in truth})
        by_cell = {obj.cell: obj for obj in guess}
        for obj in truth:
            match = by_cell.get(obj.cell)
            if match is not None:
                found += 1
                for name in ATTRIBUTES:
                    agree[name] += getattr(match, name) == getattr(obj, name)
    n = max(len(references), 1)
    scores = {"grammatical": parsed / n, "object_count": counts / n, "cell_recall": found / max(total_objects, 1),
              "cell_precision": placed / max(generated_objects, 1)}
    if found:
        scores.update({f"{name}_accuracy": agree[name] / found for name in ATTRIBUTES})
    return scores


def all_shapes_captions(captions: Sequence[str]) -> bool:
    """True when every caption is a shapes-world caption (the demo's data)."""
    return bool(captions) and all(synthetic.parse_caption(c) is not None for c in captions)
