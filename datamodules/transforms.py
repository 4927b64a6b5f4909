"""Image transforms: generation targets to square tensors in [-1, 1], understanding images through Qwen2-VL's processor.

Generation targets (and preference pairs) follow the reference's ``build_transforms`` (VARGPT §5) without its
NEAREST pre-shrink (VARGPT §8.1.8): LANCZOS-resize the shorter side to ``round(resize_ratio * size)``, then a random
crop of ``size`` x ``size`` in training or a centre crop in evaluation, then ``x / 127.5 - 1``.

Understanding images (``<image>`` inputs, including the input of an editing sample) go through transformers'
``Qwen2VLImageProcessor`` with configurable ``min_pixels`` / ``max_pixels``; its ``smart_resize`` plays the role of
the reference's 512*512-pixel cap (VARGPT §1.3). It returns flattened patches and each image's ``(t, h, w)`` grid.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from transformers import Qwen2VLImageProcessor

from datamodules.schema import SampleError


def _rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "P"):  # composite transparency on white rather than on black
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    return image.convert("RGB")


class GenerationImageTransform:
    """Square ``size`` crop of a generation target as a float tensor (3, size, size) in [-1, 1]."""

    def __init__(self, size: int, train: bool, resize_ratio: float = 1.125) -> None:
        if size < 1:
            raise ValueError(f"generation size must be >= 1, got {size}")
        self.size = size
        self.train = train
        self.resize_ratio = resize_ratio  # VARGPT §5: Resize(round(1.125 * 512) = 576, LANCZOS)

    def __call__(self, image: Image.Image, rng: random.Random) -> torch.Tensor:
        image = _rgb(image)
        shorter = max(self.size, round(self.resize_ratio * self.size))
        width, height = image.size
        scale = shorter / min(width, height)
        resized_size = (max(shorter, round(width * scale)), max(shorter, round(height * scale)))
        image = image.resize(resized_size, Image.Resampling.LANCZOS)
        if self.train:
            left = rng.randint(0, resized_size[0] - self.size)
            top = rng.randint(0, resized_size[1] - self.size)
        else:
            left = (resized_size[0] - self.size) // 2
            top = (resized_size[1] - self.size) // 2
        image = image.crop((left, top, left + self.size, top + self.size))
        pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
        return pixels.float().div_(127.5).sub_(1.0)


class UnderstandingImageTransform:
    """Qwen2-VL preprocessing of the ``<image>`` inputs of one sample: patches and (t, h, w) grids."""

    def __init__(self, min_pixels: int = 56 * 56, max_pixels: int = 512 * 512) -> None:
        self.processor = Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels)
        self.merge_size = int(self.processor.merge_size)

    def __call__(self, images: Sequence[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        """``pixel_values`` (patches, 3 * temporal * patch * patch) float32 and ``image_grid_thw`` (n, 3) int64."""
        try:
            out = self.processor(images=[_rgb(image) for image in images], return_tensors="pt")
        except ValueError as error:  # e.g. an aspect ratio above 200 that smart_resize refuses
            raise SampleError(f"understanding image cannot be preprocessed: {error}") from error
        return out["pixel_values"].float(), out["image_grid_thw"].long()
