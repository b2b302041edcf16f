"""Grounding boxes in an answer: GLM-4.6V's 0..1000 coordinates, found and put in the user's pixels.

The model writes `<|begin_of_box|>[[x1,y1,x2,y2], ...]<|end_of_box|>` (the answer keeps the list once
its markers are taken out) or JSON objects with `bbox_2d` and `label`, normalised to 0..1000 of the
image it saw. That image is the user's image (EXIF-rotated) scaled to the model's size, so the same
fractions of the user's width and height are the box in the user's pixels.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

SCALE = 1000.0
_NUM = r"-?\d+(?:\.\d+)?"
_QUAD = rf"\[\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*\]"
QUAD = re.compile(_QUAD)
# [[...], [...]]: what the model writes inside its box markers.
GROUP = re.compile(rf"\[\s*{_QUAD}\s*(?:,\s*{_QUAD}\s*)*\]")
# A flat JSON object holding "bbox_2d" (the model's other way of writing boxes, with labels).
LABELLED = re.compile(r"\{[^{}]*\"bbox_2d\"[^{}]*\}")


@dataclass(frozen=True)
class FoundBox:
    """A box as written: normalised coordinates (clamped, ordered), its label, and its group."""

    box: tuple[float, float, float, float]
    label: str | None
    group: int  # boxes written in one [[...]] list, or one JSON object, share a group


@dataclass(frozen=True)
class Box:
    """A box on one of the request's images: normalised, and in that image's pixels as the user sees it."""

    image: int
    box: tuple[float, float, float, float]
    pixels: tuple[float, float, float, float]
    label: str | None = None

    def to_json(self) -> dict[str, object]:
        return {"image": self.image, "box": list(self.box), "pixels": list(self.pixels), "label": self.label}


def normalised(values: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
    """Clamp to 0..1000 and order the corners (x1 <= x2, y1 <= y2)."""
    x1, y1, x2, y2 = (min(SCALE, max(0.0, float(value))) for value in values)
    return (min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2))


def find_boxes(text: str) -> list[FoundBox]:
    """Every well-formed box in the text, in order; partial or malformed ones are left out."""
    found: list[tuple[int, FoundBox]] = []
    group = 0
    for match in LABELLED.finditer(text):
        try:
            value = json.loads(match.group(0))
        except ValueError:
            continue
        coordinates = value.get("bbox_2d") if isinstance(value, dict) else None
        if not _four_numbers(coordinates):
            continue
        label = value.get("label")
        box = FoundBox(normalised(tuple(coordinates)), str(label) if label is not None else None, group)
        found.append((match.start(), box))
        group += 1
    rest = LABELLED.sub(lambda m: " " * len(m.group(0)), text)  # keep positions for the ordering
    for match in GROUP.finditer(rest):
        for quad in QUAD.finditer(match.group(0)):
            numbers = tuple(float(value) for value in quad.groups())
            found.append((match.start() + quad.start(), FoundBox(normalised(numbers), None, group)))  # type: ignore[arg-type]
        group += 1
    found.sort(key=lambda item: item[0])
    return [box for _, box in found]


def _four_numbers(value: object) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 4
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
    )


def to_pixels(
    box: tuple[float, float, float, float], width: int, height: int
) -> tuple[float, float, float, float]:
    """A normalised box in pixels of a `width` x `height` image (rounded to 0.01 px)."""
    x1, y1, x2, y2 = box
    return (
        round(x1 * width / SCALE, 2),
        round(y1 * height / SCALE, 2),
        round(x2 * width / SCALE, 2),
        round(y2 * height / SCALE, 2),
    )


def place_boxes(text: str, sizes: list[tuple[int, int]], last_turn_images: int) -> list[Box]:
    """The answer's boxes on the request's images (`sizes`: each image's width and height as the
    user sees it, in request order; `last_turn_images`: how many the last question carried).

    A box refers to the newest image, unless the last question carried several images and the
    answer wrote exactly one group of boxes per image: then group i is on image i of that question.
    """
    if not sizes:
        return []
    found = find_boxes(text)
    groups = sorted({box.group for box in found})
    first = len(sizes) - max(1, last_turn_images)
    per_image = last_turn_images > 1 and len(groups) == last_turn_images
    boxes = []
    for box in found:
        image = first + groups.index(box.group) if per_image else len(sizes) - 1
        width, height = sizes[image]
        boxes.append(Box(image, box.box, to_pixels(box.box, width, height), box.label))
    return boxes
