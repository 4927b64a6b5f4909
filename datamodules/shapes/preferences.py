"""Preference pairs: a prompt, a chosen scene that satisfies it and a rejected scene that breaks exactly one attribute.

The rejected scene is the chosen one with a single change, so the pair is a minimal contrast for DPO:

- ``colour``:   one object the prompt colours gets a colour the prompt does not mention;
- ``shape``:    one object becomes a shape the prompt does not mention;
- ``count``:    counting adds or removes one object of the counted shape; two-object prompts lose one object;
- ``position``: both objects' centres are mirrored across the image's middle, which reverses the relation.

Only violations that the prompt can notice are used (``VIOLATIONS_BY_TASK``): a single-object prompt names no
colour, so recolouring its object would not be wrong.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from datamodules.shapes.captions import TASKS, TaskExample, make_task_example
from datamodules.shapes.vocabulary import COLOURS, SHAPES
from datamodules.shapes.world import Layout, PlacementError, Scene, ShapeObject, place_objects

VIOLATIONS: tuple[str, ...] = ("colour", "count", "shape", "position")
VIOLATIONS_BY_TASK: dict[str, tuple[str, ...]] = {
    "single_object": ("shape",),
    "two_object": ("shape", "count"),
    "counting": ("count", "shape"),
    "colors": ("colour", "shape"),
    "position": ("position", "colour", "shape"),
    "color_attr": ("colour", "shape"),
}


@dataclass(frozen=True)
class PreferencePair:
    """``chosen`` satisfies ``example.spec``; ``rejected`` differs from it only in ``violation``."""

    example: TaskExample
    rejected: Scene
    violation: str

    @property
    def chosen(self) -> Scene:
        return self.example.scene


def make_preference(
    task: str, rng: np.random.Generator, violation: str | None = None, layout: Layout = Layout()
) -> PreferencePair:
    """A preference pair for a ``task`` prompt; ``violation`` defaults to a random one the task can notice."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    allowed = VIOLATIONS_BY_TASK[task]
    if violation is None:
        violation = allowed[int(rng.integers(len(allowed)))]
    elif violation not in allowed:
        raise ValueError(f"task {task!r} cannot show a {violation!r} violation; allowed: {allowed}")
    example = make_task_example(task, rng, layout)
    rejected = _VIOLATE[violation](example, rng, layout)
    return PreferencePair(example, rejected, violation)


def _spec_values(spec: dict[str, Any], key: str) -> set[str]:
    return {clause[key] for clause in spec["include"] if key in clause}


def _recolour(example: TaskExample, rng: np.random.Generator, layout: Layout) -> Scene:
    scene = example.scene
    named = _spec_values(example.spec, "color")
    coloured = [i for i, obj in enumerate(scene.objects) if obj.colour in named]
    index = coloured[int(rng.integers(len(coloured)))]
    options = [colour for colour in COLOURS if colour not in named]
    return scene.replace_object(index, colour=options[int(rng.integers(len(options)))])


def _reshape(example: TaskExample, rng: np.random.Generator, layout: Layout) -> Scene:
    scene = example.scene
    named = _spec_values(example.spec, "class")
    index = int(rng.integers(len(scene.objects)))
    options = [shape for shape in SHAPES if shape not in named]
    return scene.replace_object(index, shape=options[int(rng.integers(len(options)))])


def _recount(example: TaskExample, rng: np.random.Generator, layout: Layout) -> Scene:
    scene = example.scene
    if example.task == "counting" and len(scene.objects) < layout.max_objects and rng.random() < 0.5:
        shape = scene.objects[0].shape
        colour = tuple(COLOURS)[int(rng.integers(len(COLOURS)))]
        try:
            return place_objects(rng, [(shape, colour)], layout, existing=scene.objects)
        except PlacementError:
            pass  # no room for one more: remove one instead
    return scene.without(int(rng.integers(len(scene.objects))))


def _mirror(example: TaskExample, rng: np.random.Generator, layout: Layout) -> Scene:
    relation = example.spec["include"][1]["position"][0]
    horizontal = relation in ("left of", "right of")
    return Scene(
        tuple(
            ShapeObject(o.shape, o.colour, round(1 - o.x, 4), o.y, o.size)
            if horizontal
            else ShapeObject(o.shape, o.colour, o.x, round(1 - o.y, 4), o.size)
            for o in example.scene.objects
        )
    )


_VIOLATE = {"colour": _recolour, "shape": _reshape, "count": _recount, "position": _mirror}
