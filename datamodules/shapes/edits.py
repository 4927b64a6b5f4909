"""Editing examples: an instruction, the input scene and the target scene, for four operations.

- ``recolour``: "Make the red circle blue."      (one object changes colour, nothing moves)
- ``move``:     "Move the red circle to the top left."  (to ``region_anchor``: as far into that region as fits)
- ``add``:      "Add a blue square at the bottom right."
- ``remove``:   "Remove the red circle."

Input scenes never repeat a (shape, colour) pair, so "the red circle" always names one object; the target keeps
every other object exactly where it was, which is what ``scorer.score_edit`` checks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from datamodules.shapes.captions import with_article
from datamodules.shapes.vocabulary import COLOURS, SHAPES
from datamodules.shapes.world import (
    REGIONS,
    Layout,
    Scene,
    ShapeObject,
    fits,
    random_scene,
    region_anchor,
)

EDIT_OPERATIONS: tuple[str, ...] = ("recolour", "move", "add", "remove")
MIN_MOVE = 0.2  # a move shifts the object's centre by at least this fraction of the side (2x the scorer tolerance)


@dataclass(frozen=True)
class EditExample:
    """An instruction that turns ``source`` into ``target``."""

    operation: str
    instruction: str
    source: Scene
    target: Scene


def make_edit(operation: str, rng: np.random.Generator, layout: Layout = Layout(), attempts: int = 100) -> EditExample:
    """A random input scene and an ``operation`` edit of it whose target is well defined."""
    if operation not in EDIT_OPERATIONS:
        raise ValueError(f"unknown edit operation {operation!r}; expected one of {EDIT_OPERATIONS}")
    low, high = {"recolour": (1, 4), "move": (1, 3), "add": (1, 3), "remove": (2, 4)}[operation]
    for _ in range(attempts):
        source = random_scene(rng, low, min(high, layout.max_objects), distinct=True, layout=layout)
        edit = _EDIT[operation](source, rng, layout)
        if edit is not None:
            return EditExample(operation, edit[0], source, edit[1])
    raise RuntimeError(f"no valid {operation!r} edit found in {attempts} random scenes")


def _recolour(scene: Scene, rng: np.random.Generator, layout: Layout) -> tuple[str, Scene] | None:
    index = int(rng.integers(len(scene.objects)))
    obj = scene.objects[index]
    taken = {o.colour for o in scene.objects if o.shape == obj.shape}
    options = [colour for colour in COLOURS if colour not in taken]
    colour = options[int(rng.integers(len(options)))]
    template = ("Make the {name} {colour}.", "Change the colour of the {name} to {colour}.")[int(rng.integers(2))]
    return template.format(name=obj.name, colour=colour), scene.replace_object(index, colour=colour)


def _move(scene: Scene, rng: np.random.Generator, layout: Layout) -> tuple[str, Scene] | None:
    index = int(rng.integers(len(scene.objects)))
    obj = scene.objects[index]
    others = scene.without(index).objects
    regions = list(REGIONS)
    for region_index in rng.permutation(len(regions)):
        region = regions[int(region_index)]
        x, y = region_anchor(region, obj.size, layout)
        moved = ShapeObject(obj.shape, obj.colour, round(x, 4), round(y, 4), obj.size)
        if np.hypot(x - obj.x, y - obj.y) >= MIN_MOVE and fits(moved, others, layout):
            where = "the center" if region == "center" else f"the {region}"
            return f"Move the {obj.name} to {where}.", scene.replace_object(index, x=moved.x, y=moved.y)
    return None


def _add(scene: Scene, rng: np.random.Generator, layout: Layout) -> tuple[str, Scene] | None:
    present = {(o.shape, o.colour) for o in scene.objects}
    options = [(s, c) for s in SHAPES for c in COLOURS if (s, c) not in present]
    shape, colour = options[int(rng.integers(len(options)))]
    size = round(float(rng.uniform(layout.min_size, layout.max_size)), 4)
    regions = list(REGIONS)
    for region_index in rng.permutation(len(regions)):
        region = regions[int(region_index)]
        x, y = region_anchor(region, size, layout)
        added = ShapeObject(shape, colour, round(x, 4), round(y, 4), size)
        if fits(added, scene.objects, layout):
            where = "in the center" if region == "center" else f"at the {region}"
            return f"Add {with_article(added.name)} {where}.", scene.with_object(added)
    return None


def _remove(scene: Scene, rng: np.random.Generator, layout: Layout) -> tuple[str, Scene] | None:
    index = int(rng.integers(len(scene.objects)))
    return f"Remove the {scene.objects[index].name}.", scene.without(index)


_EDIT = {"recolour": _recolour, "move": _move, "add": _add, "remove": _remove}
