"""The shapes benchmark: generation, understanding and editing of the shapes world, scored exactly.

* generation: ``per_task`` held-out prompts of each of GenEval's six task types (``captions.benchmark_examples`` on
  the eval split), ``samples_per_prompt`` images each, scored by ``scorer.score_image`` with GenEval's rules and
  summarised GenEval-style (overall = unweighted mean of the per-task accuracies);
* understanding: held-out scenes rendered and asked ``questions_per_type`` questions of each type through ``chat``
  (greedy), matched with ``questions.answers_match``;
* editing: ``edits_per_operation`` held-out edits of each operation, the input image in the user turn
  (``generate_images(..., images=[input])``), checked with ``scorer.score_edit`` against the target scene.

Everything is a pure function of ``seed``: held-out examples come from the eval split's own seed streams, and image
seeds from ``geneval.sample_seed``. ``run_shapes_benchmark`` takes a ``VARGPT`` (wrapped by ``model_adapters``) or
any object with the protocol methods, and writes per-sample JSON lines and the images when given a folder.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from datamodules.shapes import (
    EDIT_OPERATIONS,
    QUESTION_TYPES,
    Scene,
    answers_match,
    benchmark_examples,
    make_edit,
    make_question,
    render_scene,
    sample_rng,
    score_edit,
    score_image,
    summarize,
)
from vargpt.eval.geneval import sample_seed
from vargpt.eval.jsonl import write_jsonl
from vargpt.eval.model_adapters import GenerationSettings, as_chat_model, as_image_generator, native_image_size
from vargpt.eval.report import Report
from vargpt.model import VARGPT

PARTS: tuple[str, ...] = ("generation", "understanding", "editing")
DEFAULT_SIZE = 64  # the shapes world's render size (datamodules.shapes.samples.make_sample)
QA_MAX_NEW_TOKENS = 16  # answers are a word or two ("top left", "3")
EDIT_SEED_OFFSET = 1_000_000  # editing image seeds never coincide with generation seeds of the same base seed


def _batches(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[start : start + size] for start in range(0, len(items), size)]


def _save(image: Image.Image, out_dir: Path | None, relative: str) -> str | None:
    if out_dir is None:
        return None
    path = out_dir / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return relative


def evaluate_generation(
    generator: Any,
    per_task: int,
    seed: int,
    samples_per_prompt: int = 1,
    batch_size: int = 8,
    out_dir: Path | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """GenEval-style summary and per-image records of the held-out generation prompts."""
    examples = benchmark_examples(per_task, seed)
    requests = [(index, k) for index in range(len(examples)) for k in range(samples_per_prompt)]
    records = []
    for batch in _batches(requests, batch_size):
        prompts = [examples[index].prompt for index, _ in batch]
        images = generator.generate_images(prompts, [sample_seed(index, k, seed) for index, k in batch])
        if len(images) != len(batch):
            raise ValueError(f"the generator returned {len(images)} images for {len(batch)} prompts")
        for (index, k), image in zip(batch, images):
            example = examples[index]
            result = score_image(image, example.spec)
            record = {"index": index, "sample": k, **result.to_record()}
            record["image"] = _save(image, out_dir, f"shapes_images/generation/{index:05d}_{k:02d}.png")
            records.append(record)
    return summarize(records), records


def evaluate_questions(
    chat_model: Any,
    questions_per_type: int,
    seed: int,
    size: int,
    max_new_tokens: int = QA_MAX_NEW_TOKENS,
    blank: bool = False,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Accuracy overall and per question type on held-out scenes rendered at ``size`` pixels.

    ``blank``: show an empty canvas (the background alone) instead of each question's scene: the accuracy reached
    from the question alone, the language prior an image must beat.
    """
    records = []
    for question_type in QUESTION_TYPES:
        for index in range(questions_per_type):
            question = make_question(question_type, sample_rng(seed, "eval", f"question-{question_type}", index))
            image = render_scene(Scene(()) if blank else question.scene, size)
            answer = chat_model.chat(
                [{"role": "user", "content": question.question}], [image], max_new_tokens=max_new_tokens
            )
            records.append(
                {
                    "type": question_type,
                    "index": index,
                    "question": question.question,
                    "reference": question.answer,
                    "answer": answer,
                    "correct": answers_match(answer, question.answer),
                    "scene": question.scene.to_dict(),
                }
            )
    return _accuracy_summary(records, "type", QUESTION_TYPES), records


def evaluate_editing(
    generator: Any,
    edits_per_operation: int,
    seed: int,
    size: int,
    batch_size: int = 8,
    out_dir: Path | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Success rate overall and per operation: the edited image must show exactly the target scene. ``unchanged``:
    the share of outputs that show exactly the input scene instead (an edit that copies without editing)."""
    edits = [
        (operation, index, make_edit(operation, sample_rng(seed, "eval", f"edit-{operation}", index)))
        for operation in EDIT_OPERATIONS
        for index in range(edits_per_operation)
    ]
    records = []
    for offset, batch in enumerate(_batches(edits, batch_size)):
        inputs = [render_scene(edit.source, size) for _, _, edit in batch]
        first = offset * batch_size
        seeds = [seed + EDIT_SEED_OFFSET + first + i for i in range(len(batch))]
        outputs = generator.generate_images([edit.instruction for _, _, edit in batch], seeds, images=inputs)
        if len(outputs) != len(batch):
            raise ValueError(f"the generator returned {len(outputs)} images for {len(batch)} edits")
        for (operation, index, edit), output in zip(batch, outputs):
            result = score_edit(output, edit.target)
            records.append(
                {
                    "operation": operation,
                    "index": index,
                    "instruction": edit.instruction,
                    "correct": result.correct,
                    "reason": result.reason,
                    "unchanged": score_edit(output, edit.source).correct,
                    "source_scene": edit.source.to_dict(),
                    "target_scene": edit.target.to_dict(),
                    "image": _save(output, out_dir, f"shapes_images/editing/{operation}_{index:05d}.png"),
                }
            )
    summary = _accuracy_summary(records, "operation", EDIT_OPERATIONS)
    summary["unchanged"] = sum(r["unchanged"] for r in records) / len(records)
    return summary, records


def _accuracy_summary(records: list[dict[str, Any]], key: str, groups: Sequence[str]) -> dict[str, Any]:
    """``accuracy`` over all records and per group (the order of ``groups``), with counts."""
    if not records:
        raise ValueError("nothing to summarise: no records")
    summary: dict[str, Any] = {"accuracy": sum(r["correct"] for r in records) / len(records), "n": len(records)}
    for group in groups:
        flags = [r["correct"] for r in records if r[key] == group]
        if flags:
            summary[group] = sum(flags) / len(flags)
    return summary


def run_shapes_benchmark(
    model: Any,
    out_dir: str | os.PathLike | None = None,
    per_task: int = 4,
    seed: int = 0,
    size: int | None = None,
    samples_per_prompt: int = 1,
    questions_per_type: int | None = None,
    edits_per_operation: int | None = None,
    parts: Sequence[str] = PARTS,
    batch_size: int = 8,
    settings: GenerationSettings = GenerationSettings(),
    max_new_tokens: int = QA_MAX_NEW_TOKENS,
) -> dict[str, Any]:
    """Run the chosen ``parts`` of the shapes benchmark on ``model`` and return ``{"metrics", "settings", part:
    summary}``; with ``out_dir``, also write ``shapes_<part>.jsonl`` (one record per sample) and the images.

    ``model``: a ``VARGPT`` or an object with ``generate_images(prompts, seeds, images=None)`` and ``chat``.
    ``size``: generated and rendered image side; default the model's native size (a ``VARGPT``) or 64 px.
    ``questions_per_type`` / ``edits_per_operation`` default to ``per_task``.
    """
    unknown = sorted(set(parts) - set(PARTS))
    if unknown or not parts:
        raise ValueError(f"unknown shapes benchmark parts {unknown or list(parts)}; choose from {PARTS}")
    if per_task < 1 or samples_per_prompt < 1 or batch_size < 1:
        raise ValueError(
            f"per_task, samples_per_prompt and batch_size must be >= 1, got {per_task}, {samples_per_prompt}, "
            f"{batch_size}"
        )
    if isinstance(model, VARGPT):
        settings = GenerationSettings(**{**settings.to_dict(), "size": size if size is not None else settings.size})
        size = native_image_size(model, settings)
    size = size or DEFAULT_SIZE
    folder = Path(out_dir) if out_dir is not None else None
    result: dict[str, Any] = {"metrics": {}}
    records: dict[str, list[dict[str, Any]]] = {}
    if "generation" in parts:
        generator = as_image_generator(model, batch_size, settings)
        summary, records["generation"] = evaluate_generation(
            generator, per_task, seed, samples_per_prompt, batch_size, folder
        )
        result["generation"] = summary
        result["metrics"]["generation/overall"] = summary["overall"]
        for task, values in summary["tasks"].items():
            result["metrics"][f"generation/{task}"] = values["accuracy"]
    if "understanding" in parts:
        summary, records["understanding"] = evaluate_questions(
            as_chat_model(model), questions_per_type or per_task, seed, size, max_new_tokens
        )
        result["understanding"] = summary
        result["metrics"].update({f"understanding/{k}": v for k, v in summary.items() if k != "n"})
    if "editing" in parts:
        generator = as_image_generator(model, batch_size, settings)
        summary, records["editing"] = evaluate_editing(
            generator, edits_per_operation or per_task, seed, size, batch_size, folder
        )
        result["editing"] = summary
        result["metrics"].update({f"editing/{k}": v for k, v in summary.items() if k != "n"})
    result["settings"] = {
        "per_task": per_task,
        "samples_per_prompt": samples_per_prompt,
        "questions_per_type": questions_per_type or per_task,
        "edits_per_operation": edits_per_operation or per_task,
        "seed": seed,
        "size": size,
        "parts": list(parts),
        "sampling": settings.to_dict(),
    }
    if folder is not None:
        for part, part_records in records.items():
            write_jsonl(folder / f"shapes_{part}.jsonl", part_records)
    return result


def shapes_report(result: dict[str, Any]) -> Report:
    """The ``Report`` (JSON + Markdown) of a ``run_shapes_benchmark`` result."""
    details = {part: result[part] for part in PARTS if part in result}
    metrics, settings = dict(result["metrics"]), dict(result["settings"])
    return Report(benchmark="shapes", metrics=metrics, settings=settings, details=details)
