"""Rendering scenes at any resolution, with antialiasing by supersampling.

Each object's coverage of every pixel is the fraction of ``k x k`` sample points inside its shape, so a scene
rendered at 32 px and at 512 px shows the same picture, and interior pixels carry the exact palette colour.
``shape_coverage`` is also the scorer's model of a shape: the detector fits it to what it sees.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from datamodules.shapes.vocabulary import BACKGROUND, COLOURS, CROSS_ARM, SHAPES
from datamodules.shapes.world import Scene


def inside_shape(shape: str, dx: np.ndarray, dy: np.ndarray, half: float) -> np.ndarray:
    """Boolean mask of points at offsets ``(dx, dy)`` from the box centre inside ``shape`` of box side ``2*half``."""
    if shape == "circle":
        return dx * dx + dy * dy <= half * half
    if shape == "square":
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if shape == "triangle":  # apex at the top centre, base along the bottom edge
        return (dy <= half) & (np.abs(dx) <= (dy + half) / 2)
    if shape == "cross":
        arm = CROSS_ARM * half
        return ((np.abs(dx) <= half) & (np.abs(dy) <= arm)) | ((np.abs(dx) <= arm) & (np.abs(dy) <= half))
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def shape_coverage(
    shape: str,
    centre_x: float,
    centre_y: float,
    size: float,
    rows: int,
    columns: int,
    supersample: int = 4,
) -> np.ndarray:
    """Fraction of each pixel of a ``rows x columns`` grid covered by ``shape``; coordinates in pixels.

    Pixel ``(r, c)`` spans ``[c, c+1) x [r, r+1)``; the shape's box is centred at ``(centre_x, centre_y)``.
    """
    offsets = (np.arange(supersample) + 0.5) / supersample
    xs = (np.arange(columns)[:, None] + offsets[None, :]).reshape(-1) - centre_x
    ys = (np.arange(rows)[:, None] + offsets[None, :]).reshape(-1) - centre_y
    inside = inside_shape(shape, xs[None, :], ys[:, None], size / 2)
    return inside.reshape(rows, supersample, columns, supersample).mean(axis=(1, 3))


def supersample_factor(side: int) -> int:
    """Sample points per pixel side: at least 2, and enough for ~256 samples across the image."""
    return max(2, min(8, -(-256 // side)))


def render_scene(scene: Scene, size: int | tuple[int, int] = 64) -> Image.Image:
    """Render ``scene`` as an RGB image of ``size`` pixels (an int for square, or ``(width, height)``)."""
    width, height = (size, size) if isinstance(size, int) else size
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {size!r}")
    side = min(width, height)
    factor = supersample_factor(side)
    canvas = np.empty((height, width, 3), dtype=np.float32)
    canvas[:] = BACKGROUND
    for obj in scene.objects:
        # fractions of the image side are measured on the shorter side, centred on the longer one
        centre_x = obj.x * side + (width - side) / 2
        centre_y = obj.y * side + (height - side) / 2
        half = obj.size * side / 2
        x0, x1 = max(int(np.floor(centre_x - half)) - 1, 0), min(int(np.ceil(centre_x + half)) + 1, width)
        y0, y1 = max(int(np.floor(centre_y - half)) - 1, 0), min(int(np.ceil(centre_y + half)) + 1, height)
        if x1 <= x0 or y1 <= y0:
            continue
        alpha = shape_coverage(obj.shape, centre_x - x0, centre_y - y0, 2 * half, y1 - y0, x1 - x0, factor)
        patch = canvas[y0:y1, x0:x1]
        colour = np.asarray(COLOURS[obj.colour], dtype=np.float32)
        patch += alpha[..., None].astype(np.float32) * (colour - patch)
    return Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8), mode="RGB")
