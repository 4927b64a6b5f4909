"""GenEval-style prompts for the shapes world, each with its structured spec and a scene that satisfies it.

The six task types and the spec format are GenEval's (evaluation.md §1.1): ``{"tag", "include": [{"class",
"count", "color"?, "position": [relation, include index]?}], "exclude"?, "prompt"}``, with shapes as classes, so
``vargpt.eval.geneval_rules`` scores them unchanged and no scorer ever parses text. One deliberate difference:
``position`` prompts name colours too ("a photo of a blue triangle left of a yellow circle"), which lets two
objects of one shape be told apart and gives the relation a colour-bound referent.

Scenes hold exactly the objects the prompt names; positions are placed so that the relation still holds with the
stricter ``ROBUST_POSITION_THRESHOLD``, leaving room for a generator's small offsets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from datamodules.shapes.vocabulary import COLOURS, NUMBER_WORDS, SHAPES, plural
from datamodules.shapes.world import Layout, Scene, place_objects, relations, sample_rng

TASKS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
COUNTS: tuple[int, ...] = (2, 3, 4)  # GenEval's counting prompts use 2-4 (evaluation.md §1.1)
ROBUST_POSITION_THRESHOLD = 0.2  # relations in generated scenes hold even at twice GenEval's 0.1 margin


@dataclass(frozen=True)
class TaskExample:
    """A prompt, its GenEval-format spec and a scene that satisfies the spec."""

    task: str
    prompt: str
    spec: dict[str, Any]
    scene: Scene

    @property
    def description(self) -> str:
        """The prompt without "a photo of " ("a red circle"), for assistant replies."""
        return self.prompt.removeprefix("a photo of ")


def with_article(noun_phrase: str) -> str:
    """ "a red circle", "an orange square"."""
    return ("an " if noun_phrase[0] in "aeiou" else "a ") + noun_phrase


def _pick(rng: np.random.Generator, options: tuple[str, ...], count: int) -> list[str]:
    return [options[int(i)] for i in rng.choice(len(options), size=count, replace=False)]


def make_task_example(task: str, rng: np.random.Generator, layout: Layout = Layout()) -> TaskExample:
    """A random example of ``task`` (one of ``TASKS``) drawn from ``rng``."""
    if task == "single_object":
        (shape,) = _pick(rng, SHAPES, 1)
        (colour,) = _pick(rng, tuple(COLOURS), 1)
        include = [{"class": shape, "count": 1}]
        prompt = f"a photo of {with_article(shape)}"
        kinds = [(shape, colour)]
    elif task == "two_object":
        shapes = _pick(rng, SHAPES, 2)
        colours = [_pick(rng, tuple(COLOURS), 1)[0] for _ in shapes]
        include = [{"class": shape, "count": 1} for shape in shapes]
        prompt = f"a photo of {with_article(shapes[0])} and {with_article(shapes[1])}"
        kinds = list(zip(shapes, colours))
    elif task == "counting":
        (shape,) = _pick(rng, SHAPES, 1)
        count = COUNTS[int(rng.integers(len(COUNTS)))]
        include = [{"class": shape, "count": count}]
        prompt = f"a photo of {NUMBER_WORDS[count]} {plural(shape)}"
        kinds = [(shape, _pick(rng, tuple(COLOURS), 1)[0]) for _ in range(count)]
        return TaskExample(
            task,
            prompt,
            {"tag": task, "include": include, "exclude": [{"class": shape, "count": count + 1}], "prompt": prompt},
            place_objects(rng, kinds, layout),
        )
    elif task == "colors":
        (shape,) = _pick(rng, SHAPES, 1)
        (colour,) = _pick(rng, tuple(COLOURS), 1)
        include = [{"class": shape, "count": 1, "color": colour}]
        prompt = f"a photo of {with_article(f'{colour} {shape}')}"
        kinds = [(shape, colour)]
    elif task == "color_attr":
        shapes = _pick(rng, SHAPES, 2)
        colours = _pick(rng, tuple(COLOURS), 2)
        include = [{"class": s, "count": 1, "color": c} for s, c in zip(shapes, colours)]
        named = [with_article(f"{c} {s}") for s, c in zip(shapes, colours)]
        prompt = f"a photo of {named[0]} and {named[1]}"
        kinds = list(zip(shapes, colours))
    elif task == "position":
        return _position_example(rng, layout)
    else:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    spec = {"tag": task, "include": include, "prompt": prompt}
    return TaskExample(task, prompt, spec, place_objects(rng, kinds, layout))


def _position_example(rng: np.random.Generator, layout: Layout) -> TaskExample:
    """ "a photo of A <relation> B": B is include[0], A is include[1] with ``position: [relation, 0]`` (GenEval)."""
    subject_shape, reference_shape = _pick(rng, SHAPES, 2)
    subject_colour, reference_colour = _pick(rng, tuple(COLOURS), 2)
    relation = RELATIONS[int(rng.integers(len(RELATIONS)))]
    for _ in range(200):  # about one placement in four has the relation
        scene = place_objects(rng, [(reference_shape, reference_colour), (subject_shape, subject_colour)], layout)
        reference, subject = scene.objects
        if relation in relations(subject, reference, ROBUST_POSITION_THRESHOLD):
            break
    else:
        raise RuntimeError(f"no placement puts a {subject_shape} {relation} a {reference_shape} with {layout}")
    subject_name = with_article(f"{subject_colour} {subject_shape}")
    reference_name = with_article(f"{reference_colour} {reference_shape}")
    prompt = f"a photo of {subject_name} {relation} {reference_name}"
    spec = {
        "tag": "position",
        "include": [
            {"class": reference_shape, "count": 1, "color": reference_colour},
            {"class": subject_shape, "count": 1, "color": subject_colour, "position": [relation, 0]},
        ],
        "prompt": prompt,
    }
    return TaskExample("position", prompt, spec, scene)


def benchmark_examples(per_task: int, seed: int, split: str = "eval") -> list[TaskExample]:
    """A fixed list of ``per_task`` examples of every task (the shapes analogue of GenEval's 553 prompts)."""
    return [
        make_task_example(task, sample_rng(seed, split, f"geneval-{task}", index))
        for task in TASKS
        for index in range(per_task)
    ]
