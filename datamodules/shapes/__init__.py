"""The shapes world: the embedded default's procedurally generated data and its exact scorer.

Coloured shapes on a plain background, rendered at any resolution from a seed, with every kind of sample the
pipeline trains on (generation prompts in GenEval's six task types, understanding questions, edits, preference
pairs) and a scorer that reads an image back into objects and applies GenEval's rules.

Modules, one concept each: ``vocabulary`` (shapes, colours, background), ``world`` (scene model, placement,
regions, seeded streams), ``render``, ``captions`` (prompts + specs), ``questions``, ``edits``, ``preferences``,
``components`` (connected components), ``detect`` (image -> objects), ``scorer``, ``samples`` and ``write`` (CLI).
"""

from datamodules.shapes.captions import TASKS, TaskExample, benchmark_examples, make_task_example
from datamodules.shapes.detect import DetectedObject, DetectorConfig, detect_objects
from datamodules.shapes.edits import EDIT_OPERATIONS, EditExample, make_edit
from datamodules.shapes.preferences import VIOLATIONS, PreferencePair, make_preference
from datamodules.shapes.questions import QUESTION_TYPES, Question, answers_match, make_question, normalise_answer
from datamodules.shapes.render import render_scene
from datamodules.shapes.samples import SAMPLE_KINDS, make_sample
from datamodules.shapes.scorer import ScoreResult, qa_accuracy, score_edit, score_image, summarize
from datamodules.shapes.vocabulary import BACKGROUND, COLOURS, SHAPES
from datamodules.shapes.world import Layout, Scene, ShapeObject, place_objects, random_scene, sample_rng

__all__ = [
    "BACKGROUND",
    "COLOURS",
    "EDIT_OPERATIONS",
    "QUESTION_TYPES",
    "SAMPLE_KINDS",
    "SHAPES",
    "TASKS",
    "VIOLATIONS",
    "DetectedObject",
    "DetectorConfig",
    "EditExample",
    "Layout",
    "PreferencePair",
    "Question",
    "Scene",
    "ScoreResult",
    "ShapeObject",
    "TaskExample",
    "answers_match",
    "benchmark_examples",
    "detect_objects",
    "make_edit",
    "make_preference",
    "make_question",
    "make_sample",
    "make_task_example",
    "normalise_answer",
    "place_objects",
    "qa_accuracy",
    "random_scene",
    "render_scene",
    "sample_rng",
    "score_edit",
    "score_image",
    "summarize",
]
