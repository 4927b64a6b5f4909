"""GenEval's scoring rules as pure functions over detections (djghosh13/geneval ``evaluation/evaluate_images.py``).

The rules are kept exactly as the official evaluator applies them, so that any detector (transformers'
Mask2Former here, mmdet elsewhere, or the exact scorer of the synthetic shapes world) gives comparable verdicts:

1. per class: sort by score, keep score > threshold (0.9 for ``counting`` prompts), keep the first 16, greedy
   IoU suppression only when ``max_overlap < 1`` (off by default);
2. each ``include`` clause takes the first ``count`` objects of its class: too few -> wrong; a ``color`` needs at
   least ``count`` of them classified as that colour; a ``position: [relation, j]`` needs every object to stand in
   ``relation`` to every object of the j-th matched clause;
3. each ``exclude`` clause is wrong when ``len(detected[class]) >= count``.

``summarize`` reproduces ``evaluation/summary_scores.py``: overall = unweighted mean of the per-task accuracies.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# The ten colours of GenEval's colour prompts, in the order its reason strings list them (evaluation.md §1.1).
GENEVAL_COLORS: tuple[str, ...] = (
    "red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white",
)  # fmt: skip
# The four relations of GenEval's position prompts.
GENEVAL_RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
# The six task tags of evaluation_metadata.jsonl.
GENEVAL_TAGS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


class GenEvalMetadataError(ValueError):
    """A GenEval metadata object is malformed; the message names the field and what is allowed."""


@dataclass(frozen=True)
class Detection:
    """One detected object: an ``xyxy`` box in pixels, a confidence, an optional HxW boolean mask and label."""

    box: tuple[float, float, float, float]
    score: float
    mask: np.ndarray | None = None
    label: str | None = None


@dataclass(frozen=True)
class GenEvalOptions:
    """The official evaluator's hyper-parameters (``--options key=value`` there; evaluation.md §1.4)."""

    threshold: float = 0.3  # detection score threshold for every task but counting
    counting_threshold: float = 0.9  # threshold when tag == "counting"
    max_objects: int = 16  # objects kept per class
    max_overlap: float = 1.0  # IoU suppression threshold; 1.0 disables it (the official default)
    position_threshold: float = 0.1  # fraction of the summed box sizes ignored when comparing centres

    def __post_init__(self) -> None:
        for name in ("threshold", "counting_threshold", "position_threshold"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"GenEvalOptions.{name} must be in [0, 1], got {value}")
        if self.max_objects < 1:
            raise ValueError(f"GenEvalOptions.max_objects must be >= 1, got {self.max_objects}")
        if not 0.0 < self.max_overlap <= 1.0:
            raise ValueError(f"GenEvalOptions.max_overlap must be in (0, 1], got {self.max_overlap}")


@dataclass
class GenEvalResult:
    """The verdict for one image: ``reason`` lists every failed rule (newline separated, empty when correct);
    ``details`` maps each class to its kept boxes ``[x0, y0, x1, y1, score]`` as the official ``details`` column."""

    correct: bool
    reason: str
    details: dict[str, list[list[float]]] = field(default_factory=dict)


ColourClassifier = Callable[[str, Detection], str]


def validate_metadata(metadata: Mapping[str, Any]) -> None:
    """Raise ``GenEvalMetadataError`` unless ``metadata`` has a tag and well-formed include/exclude clauses."""
    if not isinstance(metadata.get("tag"), str):
        raise GenEvalMetadataError(f"metadata needs a string 'tag', got {metadata.get('tag')!r}")
    include = metadata.get("include", [])
    exclude = metadata.get("exclude", [])
    for key, clauses in (("include", include), ("exclude", exclude)):
        if not isinstance(clauses, list):
            raise GenEvalMetadataError(f"metadata '{key}' must be a list of clauses, got {type(clauses).__name__}")
        for position, clause in enumerate(clauses):
            if not isinstance(clause, Mapping) or not isinstance(clause.get("class"), str):
                raise GenEvalMetadataError(f"metadata {key}[{position}] needs a string 'class', got {clause!r}")
            count = clause.get("count")
            if not isinstance(count, int) or isinstance(count, bool) or count < 1:
                raise GenEvalMetadataError(f"metadata {key}[{position}].count must be an int >= 1, got {count!r}")
    for position, clause in enumerate(include):
        if "color" in clause and clause["color"] not in GENEVAL_COLORS:
            raise GenEvalMetadataError(
                f"metadata include[{position}].color {clause['color']!r} is not one of {list(GENEVAL_COLORS)}"
            )
        if "position" in clause:
            relation = clause["position"]
            if (
                not isinstance(relation, list | tuple)
                or len(relation) != 2
                or relation[0] not in GENEVAL_RELATIONS
                or not isinstance(relation[1], int)
                or not 0 <= relation[1] < position
            ):
                raise GenEvalMetadataError(
                    f"metadata include[{position}].position must be [relation, index of an earlier include clause] "
                    f"with relation in {list(GENEVAL_RELATIONS)}, got {relation!r}"
                )


def box_iou(box_a: Sequence[float], box_b: Sequence[float]) -> float:
    """IoU of two ``xyxy`` boxes with the +1 pixel convention of the official evaluator."""

    def area(x0: float, y0: float, x1: float, y1: float) -> float:
        return max(x1 - x0 + 1, 0) * max(y1 - y0 + 1, 0)

    intersection = area(
        max(box_a[0], box_b[0]), max(box_a[1], box_b[1]), min(box_a[2], box_b[2]), min(box_a[3], box_b[3])
    )
    union = area(*box_a[:4]) + area(*box_b[:4]) - intersection
    return intersection / union if union else 0.0


def relative_position(a_box: Sequence[float], b_box: Sequence[float], threshold: float = 0.1) -> set[str]:
    """Relations of box ``a`` relative to box ``b`` ("left of", "right of", "above", "below"; y grows downward).

    The centre offset is shrunk by ``threshold`` x the summed box sizes per axis; if nothing is left there is no
    relation, otherwise a relation holds where the shrunk offset, divided by the full offset's length, exceeds 0.5.
    """
    a = np.asarray(a_box[:4], dtype=np.float64)
    b = np.asarray(b_box[:4], dtype=np.float64)
    centre_a, centre_b = (a[:2] + a[2:]) / 2, (b[:2] + b[2:]) / 2
    size_a, size_b = np.abs(a[2:] - a[:2]), np.abs(b[2:] - b[:2])
    offset = centre_a - centre_b
    revised = np.maximum(np.abs(offset) - threshold * (size_a + size_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


def select_detections(
    detections: Mapping[str, Sequence[Detection]], tag: str, options: GenEvalOptions = GenEvalOptions()
) -> dict[str, list[Detection]]:
    """Per class: sort by score, keep score > threshold (counting: the counting threshold), keep at most
    ``max_objects``, then greedy IoU suppression if ``max_overlap < 1``. Classes left empty are dropped."""
    threshold = options.counting_threshold if tag == "counting" else options.threshold
    kept: dict[str, list[Detection]] = {}
    for classname, candidates in detections.items():
        ordered = sorted(candidates, key=lambda detection: detection.score, reverse=True)
        queue = [detection for detection in ordered if detection.score > threshold][: options.max_objects]
        chosen: list[Detection] = []
        while queue:
            best = queue.pop(0)
            chosen.append(best)
            if options.max_overlap < 1.0:
                queue = [other for other in queue if box_iou(best.box, other.box) < options.max_overlap]
        if chosen:
            kept[classname] = chosen
    return kept


def score_detections(
    metadata: Mapping[str, Any],
    detections: Mapping[str, Sequence[Detection]],
    classify_colour: ColourClassifier | None = None,
    options: GenEvalOptions = GenEvalOptions(),
) -> GenEvalResult:
    """Apply GenEval's include / colour / position / exclude rules to raw per-class detections of one image.

    ``detections`` maps GenEval class names to every candidate (thresholding happens here). ``classify_colour``
    names the colour of one kept object of a class; it is required only when a clause asks for a colour.
    """
    validate_metadata(metadata)
    detected = select_detections(detections, metadata["tag"], options)
    correct = True
    reasons: list[str] = []
    matched_groups: list[list[Detection] | None] = []
    for clause in metadata.get("include", []):
        classname, count = clause["class"], clause["count"]
        found = detected.get(classname, [])[:count]
        matched = len(found) >= count
        if not matched:
            reasons.append(f"expected {classname}>={count}, found {len(found)}")
        else:
            if "color" in clause:
                if classify_colour is None:
                    raise ValueError(
                        f"metadata asks for a {clause['color']} {classname} but no colour classifier was given"
                    )
                colours = [classify_colour(classname, detection) for detection in found]
                wanted = clause["color"]
                if colours.count(wanted) < count:
                    matched = False
                    seen = ", ".join(f"{colours.count(c)} {c}" for c in GENEVAL_COLORS if c in colours)
                    reasons.append(
                        f"expected {wanted} {classname}>={count}, found {colours.count(wanted)} {wanted}; and {seen}"
                    )
            if "position" in clause and matched:
                relation, target_index = clause["position"]
                targets = matched_groups[target_index]
                if targets is None:
                    matched = False
                    reasons.append(f"no target for {classname} to be {relation}")
                else:
                    matched, reason = _check_position(classname, relation, found, targets, options)
                    if not matched:
                        reasons.append(reason)
        correct = correct and matched
        matched_groups.append(found if matched else None)
    for clause in metadata.get("exclude", []):
        classname, count = clause["class"], clause["count"]
        present = len(detected.get(classname, []))
        if present >= count:
            correct = False
            reasons.append(f"expected {classname}<{count}, found {present}")
    details = {
        classname: [[float(v) for v in detection.box] + [float(detection.score)] for detection in kept]
        for classname, kept in detected.items()
    }
    return GenEvalResult(correct=correct, reason="\n".join(reasons), details=details)


def _check_position(
    classname: str,
    relation: str,
    found: Sequence[Detection],
    targets: Sequence[Detection],
    options: GenEvalOptions,
) -> tuple[bool, str]:
    """Every found object must stand in ``relation`` to every target object; report the first that does not."""
    for detection in found:
        for target in targets:
            relations = relative_position(detection.box, target.box, options.position_threshold)
            if relation not in relations:
                return False, f"expected {classname} {relation} target, found {' and '.join(sorted(relations))} target"
    return True, ""


def summarize(records: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Aggregate per-image records (``tag``, ``correct`` and ``metadata`` or ``prompt``) as ``summary_scores.py``.

    Returns ``overall`` (unweighted mean of the per-task accuracies), ``tasks`` (tag -> accuracy, correct, images,
    in first-seen order), ``images``, ``prompts``, ``correct_images`` (fraction) and ``correct_prompts`` (fraction
    of prompts with at least one correct image).
    """
    tasks: dict[str, list[bool]] = {}
    prompts: dict[str, bool] = {}
    for record in records:
        correct = bool(record["correct"])
        tasks.setdefault(record["tag"], []).append(correct)
        prompt_key = record.get("metadata") or record["prompt"]
        if not isinstance(prompt_key, str):
            prompt_key = json.dumps(prompt_key, sort_keys=True)
        prompts[prompt_key] = prompts.get(prompt_key, False) or correct
    images = sum(len(flags) for flags in tasks.values())
    if images == 0:
        raise ValueError("cannot summarise GenEval results: no records")
    per_task = {
        tag: {"accuracy": sum(flags) / len(flags), "correct": sum(flags), "images": len(flags)}
        for tag, flags in tasks.items()
    }
    overall = math.fsum(task["accuracy"] for task in per_task.values()) / len(per_task)
    return {
        "overall": overall,
        "tasks": per_task,
        "images": images,
        "prompts": len(prompts),
        "correct_images": sum(sum(flags) for flags in tasks.values()) / images,
        "correct_prompts": sum(prompts.values()) / len(prompts),
    }
