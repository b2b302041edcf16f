#!/usr/bin/env python3
"""Synthetic gauge photos and their readings, as `glmvision finetune` data: stand-ins for your own.

`.venv/bin/python scripts/gauge_photos.py DIR [--count 100]` draws dial gauges with the needle at a
random reading (varied size, background, tilt and noise) into DIR/photos/ and writes DIR/train.jsonl,
one `{"image", "prompt", "answer"}` line per photo, the image path relative to the file.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

PROMPT = "What does the gauge read? Answer with the value and unit."
ANSWER = "{value:.2f} MPa"
FULL_SCALE = 1.6  # MPa at the end of the dial


def draw_gauge(value: float, rng: random.Random, side: int = 256) -> Image.Image:
    """One photo of a dial reading `value` (0..FULL_SCALE)."""
    background = tuple(rng.randrange(90, 230) for _ in range(3))
    image = Image.new("RGB", (side, side), background)
    draw = ImageDraw.Draw(image)
    margin = side // 10
    box = (margin, margin, side - margin, side - margin)
    draw.ellipse(box, fill=(245, 245, 240), outline=(30, 30, 30), width=max(2, side // 60))
    centre, radius = side / 2, side / 2 - margin
    for tick in range(9):  # ticks every 0.2 MPa over a 270-degree sweep
        angle = math.radians(225 - 270 * tick / 8)
        inner, outer = radius * 0.8, radius * 0.95
        draw.line(
            (
                centre + inner * math.cos(angle),
                centre - inner * math.sin(angle),
                centre + outer * math.cos(angle),
                centre - outer * math.sin(angle),
            ),
            fill=(20, 20, 20),
            width=max(1, side // 120),
        )
    angle = math.radians(225 - 270 * value / FULL_SCALE)
    tip = (centre + radius * 0.75 * math.cos(angle), centre - radius * 0.75 * math.sin(angle))
    draw.line((centre, centre, *tip), fill=(190, 20, 20), width=max(2, side // 50))
    image = image.rotate(rng.uniform(-12, 12), resample=Image.Resampling.BICUBIC, fillcolor=background)
    return image.filter(ImageFilter.GaussianBlur(rng.uniform(0, 1.2)))


def write_dataset(
    directory: Path, count: int, seed: int = 0, prompt: str = PROMPT, answer: str = ANSWER
) -> Path:
    """Draw `count` photos into directory/photos and write directory/train.jsonl; its path."""
    rng = random.Random(seed)
    photos = directory / "photos"
    photos.mkdir(parents=True, exist_ok=True)
    lines = []
    for number in range(count):
        value = round(rng.uniform(0, FULL_SCALE), 2)
        name = f"photos/{number:04d}.png"
        draw_gauge(value, rng, side=rng.choice((192, 256, 320))).save(directory / name)
        lines.append(json.dumps({"image": name, "prompt": prompt, "answer": answer.format(value=value)}))
    data = directory / "train.jsonl"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("directory", type=Path)
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    data = write_dataset(args.directory, args.count, args.seed)
    print(f"{args.count} photos and {data}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
