"""The embedded default's evaluation: the shapes benchmark on the last stage's export, and DPO's effect.

* final: shapes-GenEval (six task types), shapes Q&A and editing on the last stage's export;
* the tokenizer's ceiling: shapes-GenEval of its reconstructions of the held-out prompts' scenes;
* diagnostics: shapes-GenEval when the first k scales come from the tokenizer and the model samples the rest (at
  which scale generation loses the scene), and Q&A accuracy with a blank canvas (what the questions alone give away);
* DPO: shapes-GenEval of the generation SFT export (DPO's starting point and reference) and of the DPO export on
  the same prompts with the same per-image seeds, so the difference is paired; its 95% interval is a paired
  bootstrap over prompts, stratified by task type (the overall score is the unweighted mean of the task accuracies,
  GenEval's summary, so each resample keeps every task's prompt count).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vargpt.eval.jsonl import read_jsonl
from vargpt.quickstart.config import QuickstartConfig, model_preference_dir

logger = logging.getLogger(__name__)

FINAL, BEFORE_DPO, AFTER_DPO = "final", "before_dpo", "after_dpo"


def _overall(correct: np.ndarray, tags: np.ndarray, tag_names: Sequence[str]) -> float:
    return float(np.mean([correct[tags == tag].mean() for tag in tag_names]))


def paired_delta(
    before: Sequence[Mapping[str, Any]],
    after: Sequence[Mapping[str, Any]],
    resamples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Any]:
    """``overall(after) - overall(before)`` over the same (prompt, sample) pairs, with a paired bootstrap interval.

    Records are per image (``index``, ``sample``, ``tag``, ``correct``, as ``evaluate_generation`` writes them);
    both runs must hold exactly the same pairs. The resampled unit is the prompt: each draw takes prompts with
    replacement within each task type, every one with all its samples (images of one prompt are not independent,
    so resampling images would make the interval too narrow).
    """
    def keyed(records: Sequence[Mapping[str, Any]]) -> dict[tuple[int, int], Mapping[str, Any]]:
        return {(int(r["index"]), int(r["sample"])): r for r in records}

    first, second = keyed(before), keyed(after)
    if set(first) != set(second) or not first:
        raise ValueError("paired_delta needs the same non-empty set of (prompt, sample) records before and after")
    keys = sorted(first)
    tags = np.array([first[key]["tag"] for key in keys])
    if any(second[key]["tag"] != first[key]["tag"] for key in keys):
        raise ValueError("paired_delta: a (prompt, sample) pair has different task types before and after")
    difference = np.array([float(second[k]["correct"]) - float(first[k]["correct"]) for k in keys])
    tag_names = list(dict.fromkeys(tags.tolist()))
    delta = _overall(difference, tags, tag_names)
    prompts = np.array([key[0] for key in keys])
    prompt_ids, prompt_of_image = np.unique(prompts, return_inverse=True)
    images_per_prompt = np.bincount(prompt_of_image)
    difference_sum = np.bincount(prompt_of_image, weights=difference)
    prompt_tags = np.empty(prompt_ids.size, dtype=tags.dtype)
    prompt_tags[prompt_of_image] = tags
    if (prompt_tags[prompt_of_image] != tags).any():
        raise ValueError("paired_delta: the images of one prompt have different task types")
    groups = [np.flatnonzero(prompt_tags == tag) for tag in tag_names]
    rng = np.random.default_rng(seed)
    draws = np.empty(resamples)
    for draw in range(resamples):
        picks = [rng.choice(group, size=group.size) for group in groups]
        draws[draw] = np.mean([difference_sum[pick].sum() / images_per_prompt[pick].sum() for pick in picks])
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(draws, [tail, 1.0 - tail])
    return {
        "delta_overall": delta,
        "ci95": [float(low), float(high)],
        "before_overall": _overall(np.array([float(first[k]["correct"]) for k in keys]), tags, tag_names),
        "after_overall": _overall(np.array([float(second[k]["correct"]) for k in keys]), tags, tag_names),
        "n_images": len(keys),
        "n_prompts": int(prompt_ids.size),
        "resamples": resamples,
        "method": "paired bootstrap over prompts, stratified by task type",
    }


def first_images_summary(records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Shapes-GenEval over the first image of each prompt (``sample`` 0), overall and per task type: the images made
    with the seeds that the given-scales diagnostic uses, so its k = 0 row compares like with like."""
    from datamodules.shapes import summarize

    first = [record for record in records if int(record["sample"]) == 0]
    if not first:
        raise ValueError("no record with sample 0: the given-scales diagnostic needs each prompt's first image")
    return task_scores(summarize(first))


def task_scores(summary: Mapping[str, Any]) -> dict[str, float]:
    """``overall`` and each task type's accuracy from a shapes-GenEval ``summarize`` result."""
    return {"overall": summary["overall"], **{tag: summary[tag] for tag in summary["tasks"]}}


def clean_fraction(records: Sequence[Mapping[str, Any]]) -> float:
    """The fraction of generated images in which every object parsed has a known shape and colour.

    GenEval's rules only look for the prompt's objects, so an image cluttered with blobs can still contain one that
    parses as the requested shape; this number says how many images are clean scenes at all.
    """
    clean = [all("unknown" not in (o["shape"], o["colour"]) for o in record["objects"]) for record in records]
    return sum(clean) / len(clean)


def _load(config: QuickstartConfig, stage: str) -> Any:
    """One stage's export as a ``VARGPT`` in eval mode."""
    from vargpt.eval.model_adapters import load_model
    from vargpt.quickstart.pipeline import export_dir

    return load_model(export_dir(config, stage))


def _benchmark(
    config: QuickstartConfig, model: Any, stage: str, out_dir: Path, parts: Sequence[str]
) -> dict[str, Any]:
    """The shapes benchmark's ``parts`` on ``model`` (``stage``'s export), images and records under ``out_dir``."""
    from vargpt.eval.model_adapters import GenerationSettings
    from vargpt.eval.shapes import run_shapes_benchmark

    options = config.evaluation
    settings = GenerationSettings(cfg=options.cfg, temperature=options.temperature, top_p=options.top_p)
    logger.info("evaluation: %s on %s", ", ".join(parts), stage)
    with torch.inference_mode():
        result = run_shapes_benchmark(
            model,
            out_dir,
            per_task=options.per_task,
            seed=options.seed,
            samples_per_prompt=options.samples_per_prompt,
            questions_per_type=options.questions_per_type,
            edits_per_operation=options.edits_per_operation,
            parts=parts,
            batch_size=options.batch_size,
            settings=settings,
        )
    result["stage"] = stage
    return result


@dataclass
class HeldOutBatch:
    """One evaluation batch of the held-out generation prompts: the examples and the image tokenizer's bits of their
    own scenes, per scale."""

    start: int  # index of the first prompt
    examples: list[Any]
    bits: list[torch.Tensor]


def encode_held_out_scenes(config: QuickstartConfig, model: Any) -> list[HeldOutBatch]:
    """The held-out prompts' own scenes, rendered at the model's size and encoded once through its schedule."""
    from datamodules.shapes import benchmark_examples, render_scene

    schedule, size = _model_size(model)
    examples = benchmark_examples(config.evaluation.per_task, config.evaluation.seed)
    batches = []
    with torch.inference_mode():
        for start in range(0, len(examples), config.evaluation.batch_size):
            chosen = examples[start : start + config.evaluation.batch_size]
            pixels = np.stack([np.asarray(render_scene(example.scene, size), dtype=np.float32) for example in chosen])
            images = torch.from_numpy(pixels).permute(0, 3, 1, 2) / 127.5 - 1.0
            batches.append(HeldOutBatch(start, chosen, model.tokenizer.encode(images, schedule)))
    return batches


def _model_size(model: Any) -> tuple[list[tuple[int, int]], int]:
    """The model's generation schedule and the image side it makes."""
    schedule = [tuple(scale) for scale in model.config.schedule]
    return schedule, schedule[-1][0] * model.config.tokenizer.stride


def tokenizer_ceiling(model: Any, held_out: Sequence[HeldOutBatch]) -> dict[str, Any]:
    """Shapes-GenEval of ``model``'s image tokenizer's reconstructions of the held-out prompts' own scenes, through
    the generation schedule: the most a generator using this tokenizer can score."""
    from PIL import Image

    from datamodules.shapes import score_image, summarize

    results = []
    with torch.inference_mode():
        for batch in held_out:
            decoded = model.tokenizer.decode(batch.bits)
            arrays = ((decoded.permute(0, 2, 3, 1) + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
            results += [score_image(Image.fromarray(a), example.spec) for a, example in zip(arrays, batch.examples)]
    summary = summarize(results)
    return {**task_scores(summary), "n_images": summary["images"], "size": _model_size(model)[1]}


def generation_given_scales(
    config: QuickstartConfig,
    model: Any,
    held_out: Sequence[HeldOutBatch],
    plain: Mapping[str, float],
    ceiling: Mapping[str, Any],
) -> dict[str, Any]:
    """Shapes-GenEval when the first k scales of each image are given (the image tokenizer's encoding of the prompt's
    own held-out scene) and the model samples the rest, for k = 1 .. K - 1, one image per prompt with the seed of the
    benchmark's first image; k = 0 is ``plain``, the benchmark's score over those first images
    (``first_images_summary``), k = K, every scale given, the tokenizer's ``ceiling``. ``overall`` maps k to the
    score, ``tasks`` each task type to its k -> accuracy: where the score drops along k is where generation loses the
    scene, and the task types say for which prompts (e.g. those that leave an object's colour open)."""
    from datamodules.shapes import TASKS, score_image, summarize
    from vargpt.eval.geneval import sample_seed

    schedule, _ = _model_size(model)
    options = config.evaluation
    summaries: dict[str, Mapping[str, Any]] = {"0": plain}
    with torch.inference_mode():
        for given in range(1, len(schedule)):
            results = []
            for batch in held_out:
                seeds = [sample_seed(batch.start + offset, 0, options.seed) for offset in range(len(batch.examples))]
                pictures = model.generate_images(
                    [example.prompt for example in batch.examples], cfg=options.cfg,
                    temperature=options.temperature, top_p=options.top_p, seed=seeds,
                    forced_bits=batch.bits[:given],
                )
                results += [score_image(picture, example.spec) for picture, example in zip(pictures, batch.examples)]
            summaries[str(given)] = task_scores(summarize(results))
    summaries[str(len(schedule))] = ceiling
    tasks = [task for task in TASKS if all(task in scores for scores in summaries.values())]
    return {"overall": {k: scores["overall"] for k, scores in summaries.items()},
            "tasks": {task: {k: scores[task] for k, scores in summaries.items()} for task in tasks},
            "schedule": [list(scale) for scale in schedule],
            "n_images": sum(len(batch.examples) for batch in held_out)}


def blank_image_accuracy(config: QuickstartConfig, model: Any) -> float:
    """Shapes Q&A accuracy with an empty canvas in place of every scene: what the questions alone give away."""
    from vargpt.eval.model_adapters import as_chat_model
    from vargpt.eval.shapes import evaluate_questions

    _, size = _model_size(model)
    with torch.inference_mode():
        summary, _ = evaluate_questions(
            as_chat_model(model), config.evaluation.questions_per_type, config.evaluation.seed, size, blank=True
        )
    return summary["accuracy"]


def evaluate_pipeline(config: QuickstartConfig, out_dir: Path) -> dict[str, Any]:
    """``{"final": benchmark, "before_dpo"/"after_dpo": generation benchmarks, "dpo": paired_delta}``; the last
    two only when the pipeline has both generation SFT and DPO."""
    from vargpt.eval.shapes import PARTS

    final = _load(config, config.stages[-1])
    results: dict[str, Any] = {FINAL: _benchmark(config, final, config.stages[-1], out_dir / FINAL, PARTS)}
    final_records = read_jsonl(out_dir / FINAL / "shapes_generation.jsonl")
    results[FINAL]["generation"]["clean_images"] = clean_fraction(final_records)
    held_out = encode_held_out_scenes(config, final)
    results["tokenizer_reconstruction"] = tokenizer_ceiling(final, held_out)
    results["given_scales"] = generation_given_scales(
        config, final, held_out, first_images_summary(final_records), results["tokenizer_reconstruction"]
    )
    results[FINAL]["understanding"]["blank_image_accuracy"] = blank_image_accuracy(config, final)
    del final
    if {"generation_sft", "dpo"} <= set(config.stages):
        for name, stage in ((BEFORE_DPO, "generation_sft"), (AFTER_DPO, "dpo")):
            results[name] = _benchmark(config, _load(config, stage), stage, out_dir / name, ("generation",))
        records = [read_jsonl(out_dir / name / "shapes_generation.jsonl") for name in (BEFORE_DPO, AFTER_DPO)]
        results["dpo"] = paired_delta(
            *records, resamples=config.evaluation.bootstrap_resamples, seed=config.evaluation.seed
        )
        pairs = model_preference_summary(config)
        if pairs is not None:
            results["dpo"]["pairs"] = pairs
    return results


def model_preference_summary(config: QuickstartConfig) -> dict[str, Any] | None:
    """What the DPO pairs drawn from the generation SFT model were (``vargpt.quickstart.preferences``): their count,
    the prompts, and that model's accuracy on them; None when DPO did not train on them."""
    from vargpt.quickstart.pipeline import model_preference_source
    from vargpt.quickstart.preferences import SUMMARY_FILE

    path = model_preference_dir(config) / SUMMARY_FILE
    if model_preference_source(config) is None or not path.is_file():
        return None
    summary = json.loads(path.read_text())
    return {key: summary[key] for key in ("pairs", "prompts", "prompts_with_pairs", "sample_accuracy")}
