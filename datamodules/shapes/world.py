"""The scene model of the shapes world and seeded, collision-free placement of objects.

Coordinates are fractions of the image side (x to the right, y downward), so one scene renders identically at any
resolution. Every object fills a square box of side ``size`` centred at ``(x, y)``; boxes keep ``Layout.gap`` apart
and ``Layout.margin`` inside the image, which is what lets the scorer separate objects after blur.
All randomness comes from an explicit ``numpy.random.Generator``; nothing touches global random state.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from datamodules.shapes.vocabulary import COLOURS, SHAPES
from vargpt.eval.geneval_rules import relative_position


class PlacementError(RuntimeError):
    """The requested objects do not fit the layout (too many or too large)."""


@dataclass(frozen=True)
class Layout:
    """Sizes and spacing of objects, as fractions of the image side.

    Sizes are chosen for 32 px: the smallest object is 9 px wide and the gap 2.5 px, wide enough that a
    1-px blur leaves the background visible between neighbours. Four objects of ``max_size`` fit in a 2x2 grid.
    """

    min_size: float = 0.28
    max_size: float = 0.38
    margin: float = 0.04  # between any box and the image border
    gap: float = 0.08  # between any two boxes, along x or along y
    max_objects: int = 4

    def __post_init__(self) -> None:
        if not 0 < self.min_size <= self.max_size:
            raise ValueError(
                f"Layout sizes must satisfy 0 < min_size <= max_size, got {self.min_size}, {self.max_size}"
            )
        if 2 * self.margin + 2 * self.max_size + self.gap > 1:
            raise ValueError(
                f"Layout: two objects of max_size={self.max_size} with margin={self.margin} and gap={self.gap} "
                "must fit side by side (2*margin + 2*max_size + gap <= 1)"
            )


@dataclass(frozen=True)
class ShapeObject:
    """One object: a shape of a palette colour, its box centre ``(x, y)`` and box side ``size``."""

    shape: str
    colour: str
    x: float
    y: float
    size: float

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; expected one of {SHAPES}")
        if self.colour not in COLOURS:
            raise ValueError(f"unknown colour {self.colour!r}; expected one of {tuple(COLOURS)}")

    @property
    def box(self) -> tuple[float, float, float, float]:
        """The bounding box ``(x0, y0, x1, y1)`` in fractions of the image side."""
        half = self.size / 2
        return (self.x - half, self.y - half, self.x + half, self.y + half)

    @property
    def name(self) -> str:
        """How prompts and questions refer to the object: "red circle"."""
        return f"{self.colour} {self.shape}"

    def to_dict(self) -> dict[str, Any]:
        return {"shape": self.shape, "colour": self.colour, "x": self.x, "y": self.y, "size": self.size}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ShapeObject:
        return cls(data["shape"], data["colour"], float(data["x"]), float(data["y"]), float(data["size"]))


@dataclass(frozen=True)
class Scene:
    """An ordered collection of objects on the plain background."""

    objects: tuple[ShapeObject, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"objects": [obj.to_dict() for obj in self.objects]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Scene:
        return cls(tuple(ShapeObject.from_dict(obj) for obj in data["objects"]))

    def count(self, shape: str | None = None, colour: str | None = None) -> int:
        """How many objects have the given shape and/or colour (``None`` matches any)."""
        return sum(
            (shape is None or obj.shape == shape) and (colour is None or obj.colour == colour) for obj in self.objects
        )

    def replace_object(self, index: int, **changes: Any) -> Scene:
        """A copy with object ``index`` changed (``shape=``, ``colour=``, ``x=``, ...)."""
        objects = list(self.objects)
        objects[index] = replace(objects[index], **changes)
        return Scene(tuple(objects))

    def without(self, index: int) -> Scene:
        return Scene(self.objects[:index] + self.objects[index + 1 :])

    def with_object(self, obj: ShapeObject) -> Scene:
        return Scene(self.objects + (obj,))


def boxes_apart(a: ShapeObject, b: ShapeObject, gap: float) -> bool:
    """True when the boxes of ``a`` and ``b`` are at least ``gap`` apart along x or along y."""
    ax0, ay0, ax1, ay1 = a.box
    bx0, by0, bx1, by1 = b.box
    return max(bx0 - ax1, ax0 - bx1) >= gap or max(by0 - ay1, ay0 - by1) >= gap


def fits(obj: ShapeObject, others: tuple[ShapeObject, ...], layout: Layout) -> bool:
    """True when ``obj`` stays ``layout.margin`` inside the image and ``layout.gap`` away from ``others``."""
    x0, y0, x1, y1 = obj.box
    inside = min(x0, y0) >= layout.margin - 1e-9 and max(x1, y1) <= 1 - layout.margin + 1e-9
    return inside and all(boxes_apart(obj, other, layout.gap) for other in others)


def relations(a: ShapeObject, b: ShapeObject, threshold: float = 0.1) -> set[str]:
    """GenEval's relations of ``a`` relative to ``b`` ("left of", "above", ...), from the objects' boxes."""
    return relative_position(a.box, b.box, threshold)


def place_objects(
    rng: np.random.Generator,
    kinds: list[tuple[str, str]],
    layout: Layout = Layout(),
    existing: tuple[ShapeObject, ...] = (),
    attempts: int = 60,
) -> Scene:
    """Place one object per ``(shape, colour)`` in ``kinds`` at random sizes and positions, next to ``existing``.

    Objects are placed one by one by rejection sampling; when a full scene fails ``attempts`` times the size range
    shrinks by 10% (never below 60% of ``min_size``), so the call always returns the same scene for the same
    generator state, or raises ``PlacementError`` when the objects cannot fit at all.
    """
    if len(existing) + len(kinds) > layout.max_objects:
        raise PlacementError(
            f"{len(existing)} existing + {len(kinds)} new objects exceed layout.max_objects={layout.max_objects}"
        )
    shrink = 1.0
    while shrink >= 0.6:
        low, high = layout.min_size * shrink, layout.max_size * shrink
        for _ in range(attempts):
            placed = list(existing)
            for shape, colour in kinds:
                obj = _sample_position(rng, shape, colour, low, high, tuple(placed), layout)
                if obj is None:
                    break
                placed.append(obj)
            else:
                return Scene(tuple(placed))
        shrink -= 0.1
    raise PlacementError(f"could not place {kinds} next to {len(existing)} objects with {layout}")


def _sample_position(
    rng: np.random.Generator,
    shape: str,
    colour: str,
    low: float,
    high: float,
    others: tuple[ShapeObject, ...],
    layout: Layout,
    tries: int = 30,
) -> ShapeObject | None:
    for _ in range(tries):
        size = float(rng.uniform(low, high))
        lo, hi = layout.margin + size / 2, 1 - layout.margin - size / 2
        x, y = (float(v) for v in rng.uniform(lo, hi, size=2))
        obj = ShapeObject(shape, colour, round(x, 4), round(y, 4), round(size, 4))
        if fits(obj, others, layout):
            return obj
    return None


def random_kinds(rng: np.random.Generator, count: int, distinct: bool = False) -> list[tuple[str, str]]:
    """``count`` random ``(shape, colour)`` pairs; with ``distinct`` no pair repeats (objects stay nameable)."""
    pairs = [(shape, colour) for shape in SHAPES for colour in COLOURS]
    if distinct:
        chosen = rng.choice(len(pairs), size=count, replace=False)
        return [pairs[int(i)] for i in chosen]
    return [pairs[int(rng.integers(len(pairs)))] for _ in range(count)]


def random_scene(
    rng: np.random.Generator,
    min_objects: int = 1,
    max_objects: int = 4,
    distinct: bool = False,
    layout: Layout = Layout(),
) -> Scene:
    """A scene of ``min_objects``..``max_objects`` random objects."""
    count = int(rng.integers(min_objects, max_objects + 1))
    return place_objects(rng, random_kinds(rng, count, distinct), layout)


# The 3x3 grid of named regions used by "where" questions and by move/add edits: (column, row) in 0..2.
REGIONS: dict[str, tuple[int, int]] = {
    "top left": (0, 0),
    "top": (1, 0),
    "top right": (2, 0),
    "left": (0, 1),
    "center": (1, 1),
    "right": (2, 1),
    "bottom left": (0, 2),
    "bottom": (1, 2),
    "bottom right": (2, 2),
}


def region_of(x: float, y: float, clearance: float = 0.0) -> str | None:
    """The region (image thirds) holding the point ``(x, y)``, or ``None`` when it lies within ``clearance`` of a
    dividing line (so a question about it would have no exact answer)."""
    cells = []
    for value in (x, y):
        if min(abs(value - 1 / 3), abs(value - 2 / 3)) < clearance:
            return None
        cells.append(min(int(value * 3), 2))
    return next(name for name, cell in REGIONS.items() if cell == tuple(cells))


def region_anchor(region: str, size: float, layout: Layout = Layout()) -> tuple[float, float]:
    """Where an object of box side ``size`` goes when put "at the <region>": as far towards that side or corner as
    the margin allows, and centred on the other axis."""
    if region not in REGIONS:
        raise ValueError(f"unknown region {region!r}; expected one of {tuple(REGIONS)}")
    low, high = layout.margin + size / 2, 1 - layout.margin - size / 2
    column, row = REGIONS[region]
    return ((low, 0.5, high)[column], (low, 0.5, high)[row])


SPLITS: dict[str, int] = {"train": 0, "eval": 1}


def sample_rng(seed: int, split: str, stream: str, index: int) -> np.random.Generator:
    """The generator for example ``index`` of ``stream`` (a sample kind or task) in ``split``.

    Splits, streams and indices seed independent ``SeedSequence`` streams, so the eval split is held out from the
    train split for the same base seed, and any example can be regenerated alone.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {tuple(SPLITS)}")
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be non-negative, got seed={seed}, index={index}")
    stream_id = int.from_bytes(stream.encode("utf-8"), "little")  # the whole name: no two streams collide
    return np.random.default_rng([seed, SPLITS[split], stream_id, index])
