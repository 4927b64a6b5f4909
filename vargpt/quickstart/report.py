"""The embedded default's report in ``<root>/report/``.

* ``metrics.json``: ``shapes_geneval`` (``overall`` and one entry per task type), ``shapes_qa`` (``accuracy``, per
  question type), ``editing`` (``success``, per operation, and ``unchanged``: outputs showing the input scene),
  ``dpo`` (``delta_overall`` with its ``ci95``, before and after), ``wall_seconds`` (all steps) and
  ``step_seconds``, and each target of the issue with whether it was met;
* ``README.md``: the summary; ``stages/<stage>.md``: one page per training stage (settings, trainable groups, losses
  at the start and the end, wall time); ``curves/<stage>.png``: its training curves;
* ``samples/``: generations per task type, edits (input | output | target), before and after DPO (same prompt and
  seed, side by side).
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from vargpt.eval.report import format_value, markdown_table
from vargpt.quickstart.config import QuickstartConfig, vision_dir
from vargpt.eval.jsonl import read_jsonl
from vargpt.quickstart.evaluation import AFTER_DPO, BEFORE_DPO, FINAL
from vargpt.run_config import process_count

# The targets for the embedded default on a 2-core CPU (value path in metrics.json, comparison, threshold).
TARGETS: tuple[tuple[str, str, float], ...] = (
    ("shapes_geneval.overall", ">=", 0.6),
    ("shapes_qa.accuracy", ">=", 0.85),
    ("dpo.delta_overall", ">", 0.0),
    ("editing.success", ">=", 0.5),
    ("wall_seconds", "<=", 1200.0),
)
SMOOTHING = 0.9  # exponential moving average of the plotted curves (the raw points are drawn faintly)
SAMPLE_SCALE = 4  # generated images are tiny: grids upscale them (nearest neighbour) to stay readable


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def _lookup(metrics: Mapping[str, Any], dotted: str) -> Any:
    value: Any = metrics
    for part in dotted.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def check_targets(metrics: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Each target with its measured value and whether it was met (``None`` when not measured)."""
    checks = {}
    for path, comparison, threshold in TARGETS:
        value = _lookup(metrics, path)
        met = None if value is None else (value >= threshold if comparison == ">=" else
                                          value > threshold if comparison == ">" else value <= threshold)
        if path == "dpo.delta_overall" and value is not None:
            met = bool(met) and metrics["dpo"]["ci95"][0] > 0  # raised: the whole interval above zero
        checks[f"{path} {comparison} {threshold:g}"] = {"value": value, "met": met}
    return checks


def collect_metrics(results: Mapping[str, Any], step_seconds: Mapping[str, float]) -> dict[str, Any]:
    """The nested metrics document from the evaluation results and the step timings."""
    final = results[FINAL]
    generation = final["generation"]
    metrics: dict[str, Any] = {
        "shapes_geneval": {"overall": generation["overall"],
                           **{task: values["accuracy"] for task, values in generation["tasks"].items()},
                           "n_images": generation["images"], "clean_images": generation.get("clean_images")},
        "shapes_qa": dict(final["understanding"]),
        "editing": {"success": final["editing"]["accuracy"],
                    **{k: v for k, v in final["editing"].items() if k != "accuracy"}},
        "tokenizer_reconstruction": dict(results["tokenizer_reconstruction"]),
        "generation_given_scales": dict(results["given_scales"]),
        "evaluated_stage": final["stage"],
        "evaluation_settings": final["settings"],
    }
    if "dpo" in results:
        metrics["dpo"] = dict(results["dpo"])
    metrics["wall_seconds"] = sum(step_seconds.values())
    metrics["step_seconds"] = dict(step_seconds)
    metrics["targets"] = check_targets(metrics)
    return metrics


def read_training_log(folder: Path) -> list[dict[str, float]]:
    """Every row of ``logs/version_*/metrics.csv`` (all launches of the stage), numbers only, ordered by step."""
    rows: list[dict[str, float]] = []
    for path in sorted(folder.glob("logs/version_*/metrics.csv")):
        with path.open(newline="") as stream:
            for row in csv.DictReader(stream):
                values = {}
                for key, text in row.items():
                    try:
                        values[key] = float(text)
                    except (TypeError, ValueError):
                        continue
                if "step" in values:
                    rows.append(values)
    return sorted(rows, key=lambda row: row["step"])


def loss_series(rows: Sequence[Mapping[str, float]]) -> dict[str, list[tuple[float, float]]]:
    """``train/*`` series (losses, accuracies, margins) as (step, value) lists."""
    series: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        for key, value in row.items():
            if key.startswith("train/") and math.isfinite(value):
                series.setdefault(key, []).append((row["step"], value))
    return series


def window_means(points: Sequence[tuple[float, float]], fraction: float = 0.1) -> tuple[float, float]:
    """Mean of the first and of the last ``fraction`` of the logged points (at least one each)."""
    count = max(1, int(len(points) * fraction))
    values = [value for _, value in points]
    return sum(values[:count]) / count, sum(values[-count:]) / count


def plot_curves(series: Mapping[str, Sequence[tuple[float, float]]], title: str, path: Path) -> Path:
    """One panel per series: raw points faint, their exponential moving average on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(series, key=lambda name: (name != "train/loss", name))
    columns = min(3, len(names))
    rows = math.ceil(len(names) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.5 * columns, 3.0 * rows), squeeze=False)
    for axis, name in zip(axes.flat, names):
        steps, values = zip(*series[name])
        smoothed, average = [], values[0]
        for value in values:
            average = SMOOTHING * average + (1 - SMOOTHING) * value
            smoothed.append(average)
        axis.plot(steps, values, color="tab:blue", alpha=0.25, linewidth=0.8)
        axis.plot(steps, smoothed, color="tab:blue", linewidth=1.5)
        axis.set_title(name.removeprefix("train/"), fontsize=9)
        axis.set_xlabel("step", fontsize=8)
        axis.tick_params(labelsize=7)
    for axis in list(axes.flat)[len(names):]:
        axis.axis("off")
    figure.suptitle(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def stage_page(config: QuickstartConfig, stage: str, seconds: float | None, report_dir: Path) -> dict[str, Any]:
    """Write ``stages/<stage>.md`` and ``curves/<stage>.png``; return the stage's loss summary."""
    from omegaconf import OmegaConf

    from vargpt.quickstart.pipeline import stage_dir

    folder = stage_dir(config, stage)
    run = OmegaConf.to_container(OmegaConf.load(folder / "config.yaml"))
    rows = read_training_log(folder)
    series = loss_series(rows)
    parameters = {k.removeprefix("parameters/"): int(v) for row in rows for k, v in row.items()
                  if k.startswith("parameters/")}
    summary: dict[str, Any] = {"stage": stage, "seconds": seconds, "steps": run["trainer"]["max_steps"]}
    lines = [f"# Stage: {stage}", "",
             f"Trained {run['trainer']['max_steps']} optimizer steps in "
             f"{format_value(seconds) if seconds is not None else 'an earlier launch'} s; the resolved config is "
             f"`{folder / 'config.yaml'}`, the export `{folder / 'export'}`.", ""]
    trainer, batch = run["trainer"], run["data"]["batch_size"]
    processes: Any = process_count(trainer["devices"], trainer["num_nodes"])
    samples: Any
    if processes is None:  # "auto": as many as Lightning finds
        processes, samples = f"devices={trainer['devices']}", "(depends on the devices found)"
    else:
        samples = batch * processes * trainer["accumulate_grad_batches"]
    settings = [
        {"setting": "batch size (per process)", "value": batch},
        {"setting": "processes", "value": processes},
        {"setting": "samples per optimizer step", "value": samples},
        {"setting": "learning rate", "value": run["stage"]["optimizer"]["lr"]},
        {"setting": "warmup ratio", "value": run["stage"]["schedule"]["warmup_ratio"]},
        {"setting": "trainable groups", "value": ", ".join(run["stage"]["trainable"] or []) or "(stage default)"},
        {"setting": "generation size (px)", "value": run["data"]["generation_size"]},
        {"setting": "resolution phases", "value": json.dumps(run.get("resolution_phases") or [])},
        {"setting": "init from", "value": json.dumps({k: v for k, v in run["init_from"].items() if v})},
    ]
    if run["stage"]["stage"] == "dpo":
        dpo = run["stage"]["dpo"]
        scales = dpo.get("scales")
        settings += [
            {"setting": "DPO loss, beta", "value": f"{dpo['loss']}, {format_value(dpo['beta'])}"},
            {"setting": "DPO scales compared", "value": "every scale" if scales is None else json.dumps(scales)},
            {"setting": "DPO SFT weight", "value": dpo["sft_weight"]},
        ]
    lines += ["## Settings", "", markdown_table(settings, ["setting", "value"]), ""]
    if parameters:
        lines += ["## Parameters", "", markdown_table(
            [{"group": k, "parameters": v} for k, v in sorted(parameters.items())], ["group", "parameters"]), ""]
    if series:
        loss_rows = []
        for name, points in sorted(series.items()):
            first, last = window_means(points)
            loss_rows.append({"series": name, "first 10%": first, "last 10%": last, "points": len(points)})
        summary["losses"] = {row["series"]: [row["first 10%"], row["last 10%"]] for row in loss_rows}
        curve = plot_curves(series, f"{stage} ({run['trainer']['max_steps']} steps)",
                            report_dir / "curves" / f"{stage}.png")
        lines += ["## Training curves", "", markdown_table(loss_rows, ["series", "first 10%", "last 10%", "points"]),
                  "", f"![{stage}](../curves/{curve.name})", ""]
    _write_text(report_dir / "stages" / f"{stage}.md", "\n".join(lines))
    return summary


def _upscaled(path: Path) -> Image.Image:
    image = Image.open(path).convert("RGB")
    return image.resize((image.width * SAMPLE_SCALE, image.height * SAMPLE_SCALE), Image.NEAREST)


def _grid(rows: Sequence[Sequence[Image.Image]], gap: int = 4) -> Image.Image:
    width, height = rows[0][0].size
    columns = max(len(row) for row in rows)
    grid = Image.new("RGB", (columns * (width + gap) + gap, len(rows) * (height + gap) + gap), "white")
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            grid.paste(image, (gap + c * (width + gap), gap + r * (height + gap)))
    return grid


LABEL_HEIGHT = 14  # pixels above a grid for its label: one line of PIL's default bitmap font


def _save(image: Image.Image, path: Path) -> str:
    """Write a grid with a one-line label above it (its file name; PIL's default bitmap font)."""
    labelled = Image.new("RGB", (image.width, image.height + LABEL_HEIGHT), "white")
    labelled.paste(image, (0, LABEL_HEIGHT))
    ImageDraw.Draw(labelled).text((4, 1), path.stem.replace("_", " "), fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    labelled.save(path)
    return path.name


def _first_samples_first(record: Mapping[str, Any]) -> tuple[int, int]:
    """Sort key of generation records: every prompt's first image, then every prompt's second, ... (a grid of n
    images shows n prompts when there are that many)."""
    return int(record["sample"]), int(record["index"])


def sample_grids(config: QuickstartConfig, eval_dir: Path, report_dir: Path) -> dict[str, list[str]]:
    """PNG grids under ``samples/``, with the prompts or instructions of their rows (for the Markdown)."""
    from datamodules.shapes.render import render_scene
    from datamodules.shapes.world import Scene

    per_task = config.evaluation.grid_per_task
    written: dict[str, list[str]] = {}
    generation = read_jsonl(eval_dir / FINAL / "shapes_generation.jsonl")
    for tag in dict.fromkeys(record["tag"] for record in generation):
        chosen = sorted((r for r in generation if r["tag"] == tag and r["image"]), key=_first_samples_first)[:per_task]
        images = [_upscaled(eval_dir / FINAL / r["image"]) for r in chosen]
        name = _save(_grid([images]), report_dir / "samples" / f"generation_{tag}.png")
        written[name] = [f"{r['prompt']} ({'correct' if r['correct'] else 'wrong'})" for r in chosen]
    edits = [r for r in read_jsonl(eval_dir / FINAL / "shapes_editing.jsonl") if r["image"]]
    chosen = [r for operation in dict.fromkeys(r["operation"] for r in edits)
              for r in [e for e in edits if e["operation"] == operation][:2]]
    if chosen:
        rows = []
        for record in chosen:
            output = _upscaled(eval_dir / FINAL / record["image"])
            size = output.width // SAMPLE_SCALE
            scenes = [Scene.from_dict(record[key]) for key in ("source_scene", "target_scene")]
            source, target = (render_scene(scene, size).resize(output.size, Image.NEAREST) for scene in scenes)
            rows.append([source, output, target])
        name = _save(_grid(rows), report_dir / "samples" / "edits.png")
        written[name] = [f"{r['instruction']} ({'correct' if r['correct'] else 'wrong'}): input | output | target"
                         for r in chosen]
    if (eval_dir / BEFORE_DPO).is_dir():
        before, after = (read_jsonl(eval_dir / name / "shapes_generation.jsonl") for name in (BEFORE_DPO, AFTER_DPO))
        after_of = {(r["index"], r["sample"]): r for r in after}
        pairs = [(b, after_of[(b["index"], b["sample"])]) for tag in dict.fromkeys(r["tag"] for r in before)
                 for b in sorted((r for r in before if r["tag"] == tag), key=_first_samples_first)[:2]]
        rows = [[_upscaled(eval_dir / BEFORE_DPO / b["image"]), _upscaled(eval_dir / AFTER_DPO / a["image"])]
                for b, a in pairs]
        name = _save(_grid(rows), report_dir / "samples" / "dpo_before_after.png")
        written[name] = [f"{b['prompt']}: before {'correct' if b['correct'] else 'wrong'} | after "
                         f"{'correct' if a['correct'] else 'wrong'}" for b, a in pairs]
    return written


def given_scales_table(given: Mapping[str, Any]) -> str:
    """One row per number of given scales k: the overall score, then each task type's accuracy (when recorded)."""
    tasks = list(given.get("tasks", {}))
    rows = [{"scales given": k, "of": len(given["schedule"]), "overall": score,
             **{task: given["tasks"][task][k] for task in tasks}} for k, score in given["overall"].items()]
    return markdown_table(rows, ["scales given", "of", "overall", *tasks])


def vision_pretraining_summary(config: QuickstartConfig) -> dict[str, Any] | None:
    """The vision step's held-out per-token accuracy and steps, or None when the pipeline did not pretrain one."""
    from vargpt.checkpoints.vision import CONFIG_FILE, METRICS_FILE

    folder = vision_dir(config)
    if not (folder / METRICS_FILE).is_file():
        return None
    settings = json.loads((folder / CONFIG_FILE).read_text())["settings"]
    return {**json.loads((folder / METRICS_FILE).read_text())["held_out"], "steps": settings["steps"]}


def write_report(
    config: QuickstartConfig, results: Mapping[str, Any], step_seconds: Mapping[str, float], report_dir: Path
) -> dict[str, Any]:
    """Everything under ``report_dir``; returns the metrics document."""
    from vargpt.quickstart.pipeline import EVAL_DIR

    metrics = collect_metrics(results, step_seconds)
    vision = vision_pretraining_summary(config)
    if vision is not None:
        metrics["vision_pretraining"] = vision
    stages = [stage_page(config, stage, step_seconds.get(stage), report_dir) for stage in config.stages]
    metrics["stages"] = {summary["stage"]: summary for summary in stages}
    _write_text(report_dir / "metrics.json", json.dumps(metrics, indent=2))
    grids = sample_grids(config, report_dir / EVAL_DIR, report_dir)
    target_rows = [{"target": name, "value": check["value"],
                    "met": {True: "yes", False: "MISSED", None: "not measured"}[check["met"]]}
                   for name, check in metrics["targets"].items()]
    lines = ["# Quickstart report", "",
             f"The shapes benchmark on the `{metrics['evaluated_stage']}` export; the whole pipeline took "
             f"{metrics['wall_seconds']:.0f} s.", "", "## Targets", "",
             markdown_table(target_rows, ["target", "value", "met"]), "", "## Shapes-GenEval by task", "",
             markdown_table([{"task": k, "accuracy": v} for k, v in metrics["shapes_geneval"].items()],
                            ["task", "accuracy"]), "",
             f"The image tokenizer's own reconstructions of these prompts' scenes score "
             f"{metrics['tokenizer_reconstruction']['overall']:.3f}: the ceiling of any generator that uses it.", "",
             "With the first k scales of each image given (the tokenizer's encoding of the prompt's own scene) and the "
             "rest sampled, shapes-GenEval is (one image per prompt: k = 0 scores the benchmark's first image of each "
             "prompt, k = K the tokenizer's reconstructions):", "",
             given_scales_table(metrics["generation_given_scales"]), "",
             f"Shapes Q&A: {metrics['shapes_qa']['accuracy']:.3f}; with a blank canvas instead of each scene "
             f"{metrics['shapes_qa']['blank_image_accuracy']:.3f} (what the questions alone give away).", "",
             *([] if vision is None else [
                 f"The vision tower was pretrained for {vision['steps']} steps: on held-out scenes a linear head on "
                 f"its image tokens tells the colour of the object a token covers {vision['colour_on_objects']:.3f} "
                 f"and its shape {vision['shape_on_objects']:.3f} of the time"
                 + (f", and each token's place (row and column) {vision['place']:.3f}." if "place" in vision else "."),
                 ""]),
             f"Editing: {metrics['editing']['success']:.2f} of the edits show exactly the target scene; "
             f"{metrics['editing']['unchanged']:.2f} show the input scene unchanged (copied, not "
             "edited).", ""]
    if "dpo" in metrics:
        dpo = metrics["dpo"]
        lines += ["## DPO", "", f"Shapes-GenEval overall {dpo['before_overall']:.3f} (generation SFT) -> "
                  f"{dpo['after_overall']:.3f} (DPO): delta {dpo['delta_overall']:+.3f}, 95% interval "
                  f"[{dpo['ci95'][0]:+.3f}, {dpo['ci95'][1]:+.3f}] over {dpo['n_prompts']} prompts ({dpo['method']}).",
                  ""]
        if "pairs" in dpo:
            pairs = dpo["pairs"]
            accuracy = ", ".join(f"{task} {value:.2f}" for task, value in pairs["sample_accuracy"].items())
            lines += [f"DPO trained on {pairs['pairs']} pairs of the generation SFT model's own wrong images (chosen: "
                      f"the render of the prompt) from {pairs['prompts_with_pairs']} of {pairs['prompts']} held-out "
                      f"training prompts; that model's accuracy on them: {accuracy}.", ""]
    lines += ["## Stages", "", markdown_table(
        [{"stage": f"[{s['stage']}](stages/{s['stage']}.md)", "steps": s["steps"], "seconds": s["seconds"],
          "loss first 10%": (s.get("losses", {}).get("train/loss") or [None])[0],
          "loss last 10%": (s.get("losses", {}).get("train/loss") or [None, None])[-1]} for s in stages],
        ["stage", "steps", "seconds", "loss first 10%", "loss last 10%"]), "",
        "Step times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in step_seconds.items()), "", "## Samples", ""]
    for name, captions in grids.items():
        lines += [f"### {name}", "", f"![{name}](samples/{name})", "", *[f"- {c}" for c in captions], ""]
    _write_text(report_dir / "README.md", "\n".join(lines))
    return metrics
