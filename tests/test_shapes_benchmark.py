"""The shapes benchmark on hand-made models (exact renderers score 1, wrong ones 0) and on the tiny random VARGPT."""

from __future__ import annotations

import json

import pytest

from datamodules.shapes import (
    EDIT_OPERATIONS,
    QUESTION_TYPES,
    TASKS,
    Scene,
    ShapeObject,
    benchmark_examples,
    make_edit,
    make_question,
    render_scene,
    sample_rng,
)
from helpers_tiny_model import TINY_IMAGE_SIZE, tiny_model
from vargpt.eval.model_adapters import VARGPTChatModel, VARGPTImageGenerator
from vargpt.eval.shapes import evaluate_questions, run_shapes_benchmark, shapes_report

PER_TASK = 2
SEED = 3
SIZE = 64


class Oracle:
    """Renders the scene each held-out prompt or edit was made from and answers every question correctly."""

    def __init__(self, per_task: int, seed: int) -> None:
        self.scenes = {example.prompt: example.scene for example in benchmark_examples(per_task, seed)}
        self.edits = {}
        for operation in EDIT_OPERATIONS:
            for index in range(per_task):
                edit = make_edit(operation, sample_rng(seed, "eval", f"edit-{operation}", index))
                self.edits[(edit.instruction, render_scene(edit.source, SIZE).tobytes())] = edit.target
        self.answers = {}
        for question_type in QUESTION_TYPES:
            for index in range(per_task):
                question = make_question(question_type, sample_rng(seed, "eval", f"question-{question_type}", index))
                self.answers[(question.question, render_scene(question.scene, SIZE).tobytes())] = question.answer
        self.seeds_seen = []

    def generate_images(self, prompts, seeds, images=None):
        self.seeds_seen += list(seeds)
        if images is None:
            return [render_scene(self.scenes[prompt], SIZE) for prompt in prompts]
        return [render_scene(self.edits[(p, image.tobytes())], SIZE) for p, image in zip(prompts, images)]

    def chat(self, messages, images, max_new_tokens):
        return "It is " + self.answers[(messages[0]["content"], images[0].tobytes())] + "."


class Liar(Oracle):
    """Always draws the empty background (every prompt and edit target names an object) and answers "purple"."""

    def generate_images(self, prompts, seeds, images=None):
        return [render_scene(Scene(()), SIZE) for _ in prompts]

    def chat(self, messages, images, max_new_tokens):
        return "purple"


def test_an_exact_model_scores_one_everywhere(tmp_path):
    oracle = Oracle(PER_TASK, SEED)
    result = run_shapes_benchmark(oracle, tmp_path, per_task=PER_TASK, seed=SEED, size=SIZE, batch_size=5)
    assert result["metrics"]["generation/overall"] == 1.0
    assert all(result["metrics"][f"generation/{task}"] == 1.0 for task in TASKS)
    assert result["understanding"]["accuracy"] == 1.0
    assert result["editing"]["accuracy"] == 1.0
    assert result["understanding"]["n"] == PER_TASK * len(QUESTION_TYPES)
    generation = [json.loads(line) for line in (tmp_path / "shapes_generation.jsonl").read_text().splitlines()]
    assert len(generation) == PER_TASK * len(TASKS) and all(r["correct"] for r in generation)
    assert all((tmp_path / r["image"]).is_file() for r in generation)
    assert len(set(oracle.seeds_seen)) == len(oracle.seeds_seen)
    report = shapes_report(result)
    assert report.metrics["editing/accuracy"] == 1.0 and report.settings["size"] == SIZE


def test_a_wrong_model_scores_zero(tmp_path):
    result = run_shapes_benchmark(Liar(PER_TASK, SEED), tmp_path, per_task=PER_TASK, seed=SEED, size=SIZE)
    assert result["metrics"]["generation/overall"] == 0.0
    assert result["understanding"]["accuracy"] == 0.0
    assert result["editing"]["accuracy"] == 0.0
    records = [json.loads(line) for line in (tmp_path / "shapes_editing.jsonl").read_text().splitlines()]
    assert all(record["reason"] for record in records)


def test_an_edit_that_returns_its_input_counts_as_unchanged_not_correct(tmp_path):
    class Copier(Oracle):
        def generate_images(self, prompts, seeds, images=None):
            return list(images) if images is not None else super().generate_images(prompts, seeds)

    exact = run_shapes_benchmark(Oracle(PER_TASK, SEED), tmp_path / "exact", per_task=PER_TASK, seed=SEED, size=SIZE,
                                 parts=["editing"])
    assert exact["editing"]["accuracy"] == 1.0 and exact["editing"]["unchanged"] == 0.0
    copied = run_shapes_benchmark(Copier(PER_TASK, SEED), tmp_path / "copy", per_task=PER_TASK, seed=SEED, size=SIZE,
                                  parts=["editing"])
    assert copied["editing"]["accuracy"] == 0.0 and copied["editing"]["unchanged"] == 1.0
    records = [json.loads(line) for line in (tmp_path / "copy" / "shapes_editing.jsonl").read_text().splitlines()]
    assert all(record["unchanged"] and not record["correct"] for record in records)


def test_blank_canvas_questions_show_only_the_background():
    seen = []

    class Recorder:
        def chat(self, messages, images, max_new_tokens):
            seen.append(images[0])
            return "0"

    summary, records = evaluate_questions(Recorder(), 2, SEED, SIZE, blank=True)
    background = render_scene(Scene(()), SIZE).tobytes()
    assert len(seen) == 2 * len(QUESTION_TYPES) and all(image.tobytes() == background for image in seen)
    # the questions and references are those of the real benchmark; only counting questions can be right ("0")
    assert summary["n"] == len(records) == 2 * len(QUESTION_TYPES)
    assert all(record["correct"] == (record["reference"] == "0") for record in records)


def test_unknown_parts_are_named():
    with pytest.raises(ValueError, match="painting"):
        run_shapes_benchmark(Oracle(1, 0), parts=("generation", "painting"))


def test_the_tiny_random_model_runs_through_every_part(tmp_path):
    model = tiny_model(seed=1)
    result = run_shapes_benchmark(model, tmp_path, per_task=1, seed=0, batch_size=4)
    assert result["settings"]["size"] == TINY_IMAGE_SIZE
    for name in ("generation/overall", "understanding/accuracy", "editing/accuracy"):
        assert 0.0 <= result["metrics"][name] <= 1.0
    records = [json.loads(line) for line in (tmp_path / "shapes_understanding.jsonl").read_text().splitlines()]
    assert len(records) == len(QUESTION_TYPES) and all(isinstance(r["answer"], str) for r in records)


def test_batched_generation_gives_the_same_image_per_seed_as_one_at_a_time():
    model = tiny_model(seed=2)
    prompts = ["a photo of a red circle", "a photo of two stars", "a photo of a blue square"]
    batched = VARGPTImageGenerator(model, batch_size=3).generate_images(prompts, [7, 8, 9])
    single = VARGPTImageGenerator(model, batch_size=1).generate_images(prompts[1:2], [8])
    assert batched[1].size == (TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
    again = VARGPTImageGenerator(model, batch_size=3).generate_images(prompts, [7, 8, 9])
    assert [image.tobytes() for image in batched] == [image.tobytes() for image in again]
    assert single[0].tobytes() == batched[1].tobytes()


def test_chat_adapter_places_one_placeholder_per_image_and_rejects_a_mismatch():
    chat = VARGPTChatModel(tiny_model(seed=2))
    image = render_scene(Scene((ShapeObject("circle", "red", 0.5, 0.5, 0.3),)), 56)
    answer = chat.chat([{"role": "user", "content": "What shape is this?"}], [image], max_new_tokens=4)
    assert isinstance(answer, str)
    with pytest.raises(ValueError, match="placeholders"):
        chat.chat([{"role": "user", "content": "<image><image> compare"}], [image], max_new_tokens=4)


def test_a_size_at_the_models_own_grid_keeps_the_schedule_it_was_trained_on():
    from vargpt.eval.model_adapters import GenerationSettings, resolve_schedule
    from vargpt.schedules import schedule_for_latent

    trained = [(1, 1), (2, 2), (3, 3), (4, 4)]  # 16 px, not the default for a 4 x 4 grid
    model = tiny_model(generation_schedule=[list(scale) for scale in trained])
    assert schedule_for_latent(4, 4) != trained
    assert resolve_schedule(model, GenerationSettings(size=TINY_IMAGE_SIZE)) == trained
    assert resolve_schedule(model, GenerationSettings(size=32)) == [tuple(s) for s in schedule_for_latent(8, 8)]
