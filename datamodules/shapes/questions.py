"""Understanding questions about a scene with short exact answers, and the answer matcher used for accuracy.

Four question types: ``shape`` (what), ``count`` (how many), ``colour`` (which colour), ``where`` (one of the nine
``REGIONS`` of the image, or left/right/above/below relative to another object). A question is only asked when its
answer is exact: the object it names is unique in the scene, a region answer is not within ``REGION_CLEARANCE`` of a
dividing line, and a relative answer holds with the robust margin used by the position prompts.
Answers are single words or short phrases ("circle", "3", "red", "top left", "left"), easy for a tiny model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from datamodules.shapes.captions import ROBUST_POSITION_THRESHOLD
from datamodules.shapes.vocabulary import COLOURS, NUMBER_WORDS, SHAPES, plural
from datamodules.shapes.world import Layout, Scene, ShapeObject, random_scene, region_of, relations

QUESTION_TYPES: tuple[str, ...] = ("shape", "count", "colour", "where")
REGION_CLEARANCE = 0.05  # an object centre this close to a third of the image has no exact region


@dataclass(frozen=True)
class Question:
    """A question about ``scene`` with its exact ``answer``."""

    question_type: str
    question: str
    answer: str
    scene: Scene


def make_question(
    question_type: str, rng: np.random.Generator, layout: Layout = Layout(), attempts: int = 100
) -> Question:
    """A random scene and an answerable question of ``question_type`` about it."""
    if question_type not in QUESTION_TYPES:
        raise ValueError(f"unknown question type {question_type!r}; expected one of {QUESTION_TYPES}")
    for _ in range(attempts):
        scene = random_scene(rng, 1, layout.max_objects, layout=layout)
        asked = _ASK[question_type](scene, rng)
        if asked is not None:
            return Question(question_type, asked[0], asked[1], scene)
    raise RuntimeError(f"no answerable {question_type!r} question in {attempts} random scenes")


def check_questions_per_image(value: int, name: str = "questions_per_image") -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is a question count per image: 1 .. one per type."""
    if not 1 <= value <= len(QUESTION_TYPES):
        raise ValueError(f"{name} must be in [1, {len(QUESTION_TYPES)}] (one question per type at most), got {value}")


def follow_up_questions(first: Question, count: int, rng: np.random.Generator) -> list[Question]:
    """Up to ``count`` more questions about ``first.scene``, one per other question type in random order; a type
    with no exact question about this scene is skipped."""
    others = [kind for kind in QUESTION_TYPES if kind != first.question_type]
    questions: list[Question] = []
    for position in rng.permutation(len(others)).tolist():
        if len(questions) == count:
            break
        asked = _ASK[others[position]](first.scene, rng)
        if asked is not None:
            questions.append(Question(others[position], asked[0], asked[1], first.scene))
    return questions


def _unique(scene: Scene, **attributes: str) -> list[ShapeObject]:
    """Objects that are the only one in the scene with their value of each named attribute."""
    return [
        obj
        for obj in scene.objects
        if all(sum(getattr(other, key) == getattr(obj, key) for other in scene.objects) == 1 for key in attributes)
    ]


def _ask_shape(scene: Scene, rng: np.random.Generator) -> tuple[str, str] | None:
    if len(scene.objects) == 1:
        return "What shape is this?", scene.objects[0].shape
    candidates = _unique(scene, colour="colour")
    if not candidates:
        return None
    obj = candidates[int(rng.integers(len(candidates)))]
    return f"What shape is the {obj.colour} object?", obj.shape


def _ask_count(scene: Scene, rng: np.random.Generator) -> tuple[str, str]:
    form = int(rng.integers(3))
    if form == 0:
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        return f"How many {plural(shape)} are there?", str(scene.count(shape=shape))
    if form == 1:
        return "How many objects are there?", str(len(scene.objects))
    colour = tuple(COLOURS)[int(rng.integers(len(COLOURS)))]
    return f"How many {colour} objects are there?", str(scene.count(colour=colour))


def _ask_colour(scene: Scene, rng: np.random.Generator) -> tuple[str, str] | None:
    candidates = _unique(scene, shape="shape")
    if not candidates:
        return None
    obj = candidates[int(rng.integers(len(candidates)))]
    return f"What colour is the {obj.shape}?", obj.colour


def _ask_where(scene: Scene, rng: np.random.Generator) -> tuple[str, str] | None:
    named = [obj for obj in scene.objects if scene.count(obj.shape, obj.colour) == 1]
    if len(named) >= 2 and rng.random() < 0.5:
        first, second = (named[int(i)] for i in rng.choice(len(named), size=2, replace=False))
        held = relations(first, second, ROBUST_POSITION_THRESHOLD)
        for pair in (("left of", "right of"), ("above", "below")):
            for relation in pair:
                if relation in held:
                    answer = relation.removesuffix(" of")
                    options = " or ".join(r.removesuffix(" of") for r in pair)
                    suffix = " of" if pair[0] == "left of" else ""
                    return f"Is the {first.name} {options}{suffix} the {second.name}?", answer
        return None
    placed = [(obj, region_of(obj.x, obj.y, REGION_CLEARANCE)) for obj in named]
    placed = [(obj, region) for obj, region in placed if region is not None]
    if not placed:
        return None
    obj, region = placed[int(rng.integers(len(placed)))]
    return f"Where is the {obj.name}?", region


_ASK = {"shape": _ask_shape, "count": _ask_count, "colour": _ask_colour, "where": _ask_where}

_NUMBERS = {word: str(number) for number, word in NUMBER_WORDS.items()}
_SYNONYMS = {"centre": "center", "middle": "center", "upper": "top", "lower": "bottom", "gray": "grey", "plus": "cross"}
_SINGULAR = {plural(shape): shape for shape in SHAPES}
_FILLER = {"a", "an", "the", "it", "is", "its", "it's", "to", "of", "there", "are", "in", "at", "side", "corner"}


def normalise_answer(text: str) -> str:
    """Lower-case, drop punctuation, articles and filler words, and map number words, plurals and synonyms, so that
    "Three.", "3", "It is the top-left corner" and "top left" compare equal to their references."""
    words = re.sub(r"[^a-z0-9' ]+", " ", text.lower().replace("-", " ")).split()
    kept = []
    for word in words:
        word = _SYNONYMS.get(word, _NUMBERS.get(word, _SINGULAR.get(word, word)))
        if word not in _FILLER:
            kept.append(word)
    return " ".join(kept)


def answers_match(prediction: str, reference: str) -> bool:
    """True when ``prediction`` equals ``reference`` after ``normalise_answer``."""
    return normalise_answer(prediction) == normalise_answer(reference)
