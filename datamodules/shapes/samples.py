"""``datamodules.schema.Sample`` objects of every kind from the shapes world.

Conversations have no system turn (a tiny model need not learn one). Phrasing varies lightly and from the sample's
own generator: a generation request is the bare GenEval prompt ("a photo of a red circle", the form the shapes
benchmark uses) or "Draw a red circle." / "Generate an image of a red circle."; replies are "<image_gen>" or
"Here is a red circle. <image_gen>". Understanding answers are the exact short answers of ``questions``.
Every sample's ``metadata`` is JSON-serialisable and carries the task type and the structured spec or scenes, so
a scorer never parses the text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from datamodules.schema import IMAGE_GEN_PLACEHOLDER, IMAGE_PLACEHOLDER, Sample
from datamodules.shapes.captions import TASKS, TaskExample, make_task_example
from datamodules.shapes.edits import EDIT_OPERATIONS, EditExample, make_edit
from datamodules.shapes.preferences import PreferencePair, make_preference
from datamodules.shapes.questions import (
    QUESTION_TYPES,
    Question,
    check_questions_per_image,
    follow_up_questions,
    make_question,
)
from datamodules.shapes.render import render_scene
from datamodules.shapes.world import sample_rng

SAMPLE_KINDS: tuple[str, ...] = ("generation", "understanding", "editing", "preference")
GENERATION_REQUESTS: tuple[str, ...] = ("{prompt}", "Draw {description}.", "Generate an image of {description}.")
GENERATION_REPLIES: tuple[str, ...] = (IMAGE_GEN_PLACEHOLDER, "Here is {description}. " + IMAGE_GEN_PLACEHOLDER)
EDIT_REPLIES: tuple[str, ...] = (IMAGE_GEN_PLACEHOLDER, "Here is the edited image. " + IMAGE_GEN_PLACEHOLDER)


def _choose(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def generation_sample(
    example: TaskExample, key: str, size: int, rng: np.random.Generator, metadata: dict[str, Any] | None = None
) -> Sample:
    """Prompt -> image of a scene that satisfies it."""
    request = _choose(rng, GENERATION_REQUESTS).format(prompt=example.prompt, description=example.description)
    reply = _choose(rng, GENERATION_REPLIES).format(description=example.description)
    return Sample(
        key=key,
        kind="generation",
        messages=[{"role": "user", "content": request}, {"role": "assistant", "content": reply}],
        images={"target.png": render_scene(example.scene, size)},
        metadata={
            **(metadata or {}),
            "task": example.task,
            "spec": example.spec,
            "scene": example.scene.to_dict(),
        },
    )


def understanding_sample(
    questions: Question | Sequence[Question], key: str, size: int, metadata: dict[str, Any] | None = None
) -> Sample:
    """Image + question -> exact short answer; several questions about the same scene make a multi-turn chat."""
    questions = [questions] if isinstance(questions, Question) else list(questions)
    if not questions or any(question.scene != questions[0].scene for question in questions):
        raise ValueError("an understanding sample needs one or more questions about the same scene")
    first = questions[0]
    messages = []
    for index, question in enumerate(questions):
        prefix = f"{IMAGE_PLACEHOLDER}\n" if index == 0 else ""
        messages += [
            {"role": "user", "content": prefix + question.question},
            {"role": "assistant", "content": question.answer},
        ]
    extra = {}
    if len(questions) > 1:
        extra["questions"] = [
            {"task": question.question_type, "question": question.question, "answer": question.answer}
            for question in questions
        ]
    return Sample(
        key=key,
        kind="understanding",
        messages=messages,
        images={"input_0.png": render_scene(first.scene, size)},
        metadata={
            **(metadata or {}),
            "task": first.question_type,
            "answer": first.answer,
            "scene": first.scene.to_dict(),
            **extra,
        },
    )


def editing_sample(
    edit: EditExample, key: str, size: int, rng: np.random.Generator, metadata: dict[str, Any] | None = None
) -> Sample:
    """Input image + instruction -> edited image."""
    return Sample(
        key=key,
        kind="editing",
        messages=[
            {"role": "user", "content": f"{IMAGE_PLACEHOLDER}\n{edit.instruction}"},
            {"role": "assistant", "content": _choose(rng, EDIT_REPLIES)},
        ],
        images={"input_0.png": render_scene(edit.source, size), "target.png": render_scene(edit.target, size)},
        metadata={
            **(metadata or {}),
            "task": edit.operation,
            "source_scene": edit.source.to_dict(),
            "target_scene": edit.target.to_dict(),
        },
    )


def preference_sample(
    pair: PreferencePair, key: str, size: int, rng: np.random.Generator, metadata: dict[str, Any] | None = None
) -> Sample:
    """Prompt with a chosen (matching) and a rejected (one attribute wrong) image; both replies read the same."""
    example = pair.example
    request = _choose(rng, GENERATION_REQUESTS).format(prompt=example.prompt, description=example.description)
    reply = _choose(rng, GENERATION_REPLIES).format(description=example.description)
    return Sample(
        key=key,
        kind="preference",
        messages=[{"role": "user", "content": request}],
        images={"chosen.png": render_scene(pair.chosen, size), "rejected.png": render_scene(pair.rejected, size)},
        metadata={
            **(metadata or {}),
            "task": example.task,
            "spec": example.spec,
            "violation": pair.violation,
            "chosen_scene": pair.chosen.to_dict(),
            "rejected_scene": pair.rejected.to_dict(),
        },
        chosen={"role": "assistant", "content": reply},
        rejected={"role": "assistant", "content": reply},
    )


def make_sample(
    kind: str, index: int, seed: int, split: str = "train", size: int = 64, questions_per_image: int = 1
) -> Sample:
    """Sample ``index`` of ``kind`` for ``split``: a pure function of its arguments.

    Task types cycle with the index (``index % len(types)``) so every type is equally represented. An understanding
    sample asks its type's question, then up to ``questions_per_image - 1`` questions of the other types about the
    same scene (a multi-turn chat: more supervision per image; 1 gives the single-question samples unchanged).
    """
    if kind not in SAMPLE_KINDS:
        raise ValueError(f"unknown sample kind {kind!r}; expected one of {SAMPLE_KINDS}")
    check_questions_per_image(questions_per_image)
    rng = sample_rng(seed, split, kind, index)
    key = f"shapes_{split}_{kind}_{seed}_{index:08d}"
    metadata = {"source": "shapes", "split": split, "seed": seed, "index": index, "size": size}
    if kind == "generation":
        example = make_task_example(TASKS[index % len(TASKS)], rng)
        return generation_sample(example, key, size, rng, metadata)
    if kind == "understanding":
        question = make_question(QUESTION_TYPES[index % len(QUESTION_TYPES)], rng)
        more = follow_up_questions(question, questions_per_image - 1, rng) if questions_per_image > 1 else []
        return understanding_sample([question, *more], key, size, metadata)
    if kind == "editing":
        edit = make_edit(EDIT_OPERATIONS[index % len(EDIT_OPERATIONS)], rng)
        return editing_sample(edit, key, size, rng, metadata)
    pair = make_preference(TASKS[index % len(TASKS)], rng)
    return preference_sample(pair, key, size, rng, metadata)
