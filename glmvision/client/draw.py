"""`glmvision ask --boxes OUT.png`: the answer's grounding boxes drawn over the image, in its pixels."""

from __future__ import annotations

from pathlib import Path
from typing import Any

COLOURS = ((224, 49, 49), (25, 113, 194), (47, 158, 68), (240, 140, 0), (156, 54, 181), (12, 133, 153))


def draw_boxes(source: str, boxes: list[dict[str, Any]], out: str) -> int:
    """Draw `boxes` (the server's, `pixels` as the user sees the image) over `source`; how many were drawn."""
    from PIL import Image, ImageDraw, ImageOps

    with Image.open(source) as opened:
        image = ImageOps.exif_transpose(opened).convert("RGB")  # the pixels the boxes are in
    pen = ImageDraw.Draw(image)
    line = max(2, round(max(image.size) / 250))
    drawn = 0
    for index, box in enumerate(boxes):
        x1, y1, x2, y2 = (float(value) for value in box["pixels"])
        colour = COLOURS[index % len(COLOURS)]
        pen.rectangle((x1, y1, x2, y2), outline=colour, width=line)
        label = box.get("label")
        if label:
            left, top, right, bottom = pen.textbbox((x1, y1), str(label))
            height = bottom - top + 2 * line
            pen.rectangle(
                (x1, max(0, y1 - height), x1 + right - left + 2 * line, max(0, y1 - height) + height),
                fill=colour,
            )
            pen.text((x1 + line, max(0, y1 - height) + line), str(label), fill=(255, 255, 255))
        drawn += 1
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    return drawn
