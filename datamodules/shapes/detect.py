"""Reading an image of the shapes world back into objects: shape, colour, box, centroid and area of each.

The parser inverts the renderer instead of guessing from thresholds:

1. images larger than ``working_size`` are box-averaged down (a 512-px render then equals a supersampled 128-px one);
2. the background colour is the median of the image border; every pixel goes to the nearest of background and the
   eight palette colours, and the non-background pixels form 4-connected components;
3. a component's colour comes from its most saturated pixels (their median): the palette colour whose mix with
   the background, at 60-100% strength, lies nearest; farther than ``max_colour_distance`` is ``"unknown"``;
4. the component's coverage (alpha) follows from linear unmixing against background and its own colour, so its
   area and centroid are blur-invariant; for each shape the area and centroid fix a box, the renderer's coverage of
   that box (optionally blurred) is compared with the alpha, and the best fit wins; a fit error above
   ``max_fit_error`` (noise, merged or half-drawn objects) makes the shape ``"unknown"``.

Objects of unknown shape are reported but never count as any class when scoring.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from datamodules.shapes.components import connected_components
from datamodules.shapes.render import shape_coverage
from datamodules.shapes.vocabulary import CENTROID_DROP, COLOURS, FILL_RATIO, SHAPES

UNKNOWN = "unknown"
_PALETTE = np.asarray(list(COLOURS.values()), dtype=np.float32)
_PALETTE_NAMES = tuple(COLOURS)


@dataclass(frozen=True)
class DetectorConfig:
    """Tolerances of the object parser; sizes are fractions of the image area or working-resolution pixels."""

    working_size: int = 128  # larger images are box-averaged to at most this side
    min_area: float = 0.006  # smaller components (fraction of the image) are noise; a triangle covers >= 0.039
    max_area: float = 0.4  # larger components are not single objects; the largest square is 0.144
    max_colour_distance: float = 75.0  # RGB distance to the nearest palette colour (palette spacing >= 123)
    max_fit_error: float = 0.4  # |alpha - fitted coverage| summed over the patch, relative to the object's area
    blur_sigmas: tuple[float, ...] = (0.0, 0.6, 1.2, 1.8)  # blur hypotheses, in working-resolution pixels


@dataclass(frozen=True)
class DetectedObject:
    """One object found in an image; ``bbox`` is ``(x0, y0, x1, y1)`` and ``centroid`` ``(x, y)`` in input pixels."""

    shape: str
    colour: str
    bbox: tuple[float, float, float, float]
    centroid: tuple[float, float]
    area: float
    fit_error: float

    @property
    def known(self) -> bool:
        """True when both shape and colour were recognised."""
        return self.shape != UNKNOWN and self.colour != UNKNOWN


def image_to_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """An ``(H, W, 3)`` float32 array in 0..255 from a PIL image or an array (uint8, or float in [0, 1])."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32)
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise ValueError(f"image array must be (H, W), (H, W, 3) or (H, W, 4), got shape {array.shape}")
    array = array[..., :3]
    if np.issubdtype(array.dtype, np.floating):
        return np.clip(array.astype(np.float32) * 255.0, 0, 255)
    return array.astype(np.float32)


def _box_reduce(pixels: np.ndarray, factor: int) -> np.ndarray:
    rows, columns = pixels.shape[0] // factor * factor, pixels.shape[1] // factor * factor
    trimmed = pixels[:rows, :columns]
    return trimmed.reshape(rows // factor, factor, columns // factor, factor, 3).mean(axis=(1, 3))


@functools.lru_cache(maxsize=1024)
def _gaussian_matrix(length: int, sigma: float) -> np.ndarray:
    """The ``length x length`` matrix that blurs a 1-D signal with a Gaussian (zero outside)."""
    positions = np.arange(length, dtype=np.float64)
    weights = np.exp(-0.5 * ((positions[:, None] - positions[None, :]) / sigma) ** 2)
    return weights / (sigma * math.sqrt(2 * math.pi))


def detect_objects(image: Image.Image | np.ndarray, config: DetectorConfig = DetectorConfig()) -> list[DetectedObject]:
    """Parse ``image`` into objects, in raster order of their top-left pixel."""
    pixels = image_to_array(image)
    height, width = pixels.shape[:2]
    factor = max(1, math.ceil(max(height, width) / config.working_size))
    if factor > 1:
        pixels = _box_reduce(pixels, factor)
    rows, columns = pixels.shape[:2]
    if rows < 3 or columns < 3:
        return []
    border = np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])
    background = np.median(border, axis=0)
    references = np.concatenate([background[None], _PALETTE])
    # squared distance to each reference, up to the per-pixel constant |p|^2
    distances = (references**2).sum(axis=1) - 2 * pixels.reshape(-1, 3) @ references.T
    foreground = distances.argmin(axis=1).reshape(rows, columns) > 0  # reference 0 is the background
    labels, count = connected_components(foreground)
    areas = np.bincount(labels.ravel(), minlength=count + 1)
    found = []
    for component in range(1, count + 1):
        fraction = areas[component] / (rows * columns)
        if not config.min_area <= fraction <= config.max_area:
            continue
        parsed = _parse_component(pixels, labels, component, background, factor, config)
        if parsed is not None:
            found.append(parsed)
    return found


def _parse_component(
    pixels: np.ndarray,
    labels: np.ndarray,
    component: int,
    background: np.ndarray,
    factor: int,
    config: DetectorConfig,
) -> DetectedObject | None:
    rows, columns = labels.shape
    ys, xs = np.nonzero(labels == component)
    pad = 3
    y0, y1 = max(ys.min() - pad, 0), min(ys.max() + pad + 1, rows)
    x0, x1 = max(xs.min() - pad, 0), min(xs.max() + pad + 1, columns)
    own = labels[y0:y1, x0:x1] == component
    patch = pixels[y0:y1, x0:x1]
    colour, peak_colour = _classify_colour(patch[own], background, config.max_colour_distance)

    # coverage by linear unmixing, inside the component grown by one pixel (blur tails) but not into other objects
    grown = own.copy()
    grown[1:] |= own[:-1]
    grown[:-1] |= own[1:]
    grown[:, 1:] |= own[:, :-1]
    grown[:, :-1] |= own[:, 1:]
    region = grown & ((labels[y0:y1, x0:x1] == 0) | own)
    direction = peak_colour - background
    alpha = np.clip((patch - background) @ direction / max(float(direction @ direction), 1.0), 0.0, 1.0) * region
    area = float(alpha.sum())
    if area < 1.0:  # nothing along the colour direction: not an object of this colour
        return None
    grid_y, grid_x = np.mgrid[0 : y1 - y0, 0 : x1 - x0]
    centre_x = float((alpha * (grid_x + 0.5)).sum() / area)
    centre_y = float((alpha * (grid_y + 0.5)).sum() / area)
    shape, size, box_centre_y, fit_error = _fit_shape(alpha, area, centre_x, centre_y, config.blur_sigmas)
    if fit_error > config.max_fit_error:
        shape = UNKNOWN
    half = size / 2
    box = (
        (x0 + centre_x - half) * factor,
        (y0 + box_centre_y - half) * factor,
        (x0 + centre_x + half) * factor,
        (y0 + box_centre_y + half) * factor,
    )
    return DetectedObject(
        shape=shape,
        colour=colour,
        bbox=tuple(float(v) for v in box),  # type: ignore[arg-type]
        centroid=((x0 + centre_x) * factor, (y0 + centre_y) * factor),
        area=area * factor * factor,
        fit_error=fit_error,
    )


def _classify_colour(
    component_pixels: np.ndarray, background: np.ndarray, max_distance: float
) -> tuple[str, np.ndarray]:
    """The palette colour of a component and its full-strength colour (for unmixing).

    The most saturated pixels (farthest from the background) are the object's own colour, possibly still mixed
    with background when a small object is blurred; so each palette colour ``c`` is compared with the nearest point
    of the segment from ``c`` at 60% strength to ``c``, and the colour is scaled back to full strength.
    """
    offsets = component_pixels - background
    strength = np.linalg.norm(offsets, axis=1)
    peak = np.median(component_pixels[strength >= 0.8 * np.percentile(strength, 95)], axis=0)
    directions = _PALETTE - background
    mix = np.clip(directions @ (peak - background) / np.maximum((directions**2).sum(axis=1), 1.0), 0.6, 1.0)
    distances = np.linalg.norm(background + mix[:, None] * directions - peak, axis=1)
    best = int(distances.argmin())
    colour = _PALETTE_NAMES[best] if distances[best] <= max_distance else UNKNOWN
    return colour, background + (peak - background) / mix[best]


def _fit_shape(
    alpha: np.ndarray, area: float, centre_x: float, centre_y: float, blur_sigmas: tuple[float, ...]
) -> tuple[str, float, float, float]:
    """The shape (with its box side and box-centre y) whose rendered coverage best explains ``alpha``."""
    rows, columns = alpha.shape
    sizes = [math.sqrt(area / FILL_RATIO[shape]) for shape in SHAPES]
    box_centres_y = [centre_y - CENTROID_DROP[shape] * size for shape, size in zip(SHAPES, sizes)]
    templates = np.stack(
        [
            shape_coverage(shape, centre_x, box_centre_y, size, rows, columns)
            for shape, size, box_centre_y in zip(SHAPES, sizes, box_centres_y)
        ]
    )
    candidates = [templates] + [
        _gaussian_matrix(rows, sigma) @ templates @ _gaussian_matrix(columns, sigma).T
        for sigma in blur_sigmas
        if sigma > 0
    ]
    errors = np.abs(np.stack(candidates) - alpha).sum(axis=(2, 3)).min(axis=0) / area
    best = int(errors.argmin())
    return SHAPES[best], sizes[best], box_centres_y[best], float(errors[best])
