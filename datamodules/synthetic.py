"""Small synthetic samples of every kind (PIL-drawn images, template captions) for tests and the data benchmark.

Not a dataset for training (that is the shapes world): just valid, varied samples, reproducible from a seed.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

from datamodules.schema import Sample
from datamodules.shards import ShardWriter

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square")


def draw_picture(rng: random.Random, size: int) -> tuple[Image.Image, str]:
    """A random shape of a random colour on a light background, and its caption."""
    colour, shape = rng.choice(sorted(COLOURS)), rng.choice(SHAPES)
    image = Image.new("RGB", (size, size), (245, 245, 240))
    draw = ImageDraw.Draw(image)
    radius = rng.randint(size // 6, size // 3)
    cx, cy = rng.randint(radius, size - radius), rng.randint(radius, size - radius)
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLOURS[colour])
    return image, f"a {colour} {shape}"


def synthetic_sample(kind: str, key: str, rng: random.Random, size: int = 64) -> Sample:
    """One valid sample of ``kind`` with ``size`` x ``size`` images."""
    image, caption = draw_picture(rng, size)
    user, assistant = "user", "assistant"
    if kind == "understanding":
        messages = [
            {"role": user, "content": "What is in <image>?"},
            {"role": assistant, "content": f"It shows {caption}."},
        ]
        return Sample(key, kind, messages, {"input_0.png": image})
    if kind == "generation":
        messages = [
            {"role": user, "content": f"Draw {caption}."},
            {"role": assistant, "content": "Here it is: <image_gen>"},
        ]
        return Sample(key, kind, messages, {"target.png": image})
    if kind == "editing":
        target, target_caption = draw_picture(rng, size)
        messages = [
            {"role": user, "content": f"Change <image> into {target_caption}."},
            {"role": assistant, "content": "The output image is: <image_gen>"},
        ]
        return Sample(key, kind, messages, {"input_0.png": image, "target.png": target})
    if kind == "preference":
        rejected, _ = draw_picture(rng, size)
        messages = [{"role": user, "content": f"Draw {caption}."}]
        chosen_turn = {"role": assistant, "content": "Here it is: <image_gen>"}
        return Sample(key, kind, messages, {"chosen.png": image, "rejected.png": rejected},
                      chosen=chosen_turn, rejected=dict(chosen_turn))
    if kind == "text":
        messages = [
            {"role": user, "content": f"Describe {caption}."},
            {"role": assistant, "content": f"It is {caption}."},
        ]
        return Sample(key, kind, messages)
    raise ValueError(f"unknown kind {kind!r}")


def write_synthetic_shards(
    directory: str | Path,
    num_samples: int,
    kinds: Sequence[str] = ("generation",),
    size: int = 64,
    samples_per_shard: int = 10,
    seed: int = 0,
    prefix: str = "shard",
) -> list[Path]:
    """Write ``num_samples`` samples cycling through ``kinds`` into shards; keys are ``<prefix>_<index>``."""
    rng = random.Random(seed)
    with ShardWriter(directory, prefix=prefix, max_samples=samples_per_shard) as writer:
        for index in range(num_samples):
            writer.write(synthetic_sample(kinds[index % len(kinds)], f"{prefix}_{index:06d}", rng, size))
    return writer.paths
