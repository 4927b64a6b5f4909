"""The exact scorer of the shapes world: GenEval's rules over the objects parsed from an image.

``score_image`` parses the image (``detect.detect_objects``), turns every object of known shape into a GenEval
``Detection`` of its shape class with score 1.0 and its palette colour, and applies ``vargpt.eval.geneval_rules``
unchanged, so shapes-GenEval and real GenEval share one rule engine. ``score_edit`` checks that an edited image
shows exactly the target scene; ``qa_accuracy`` scores understanding answers.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from datamodules.shapes.detect import UNKNOWN, DetectedObject, DetectorConfig, detect_objects
from datamodules.shapes.questions import answers_match
from datamodules.shapes.world import Scene
from vargpt.eval import geneval_rules
from vargpt.eval.geneval_rules import Detection, GenEvalOptions

EDIT_POSITION_TOLERANCE = 0.1  # an edited object's box centre may be this far (fraction of the side) from target


@dataclass
class ScoreResult:
    """The verdict for one image: ``reason`` says what failed (empty when correct); ``objects`` is what was seen."""

    correct: bool
    reason: str
    tag: str
    prompt: str
    objects: list[DetectedObject] = field(default_factory=list)
    details: dict[str, list[list[float]]] = field(default_factory=dict)

    def to_record(self) -> dict[str, Any]:
        """A JSON-serialisable record in the layout of GenEval's per-image results."""
        return {
            "tag": self.tag,
            "prompt": self.prompt,
            "correct": self.correct,
            "reason": self.reason,
            "details": self.details,
            "objects": [
                {
                    "shape": o.shape,
                    "colour": o.colour,
                    "bbox": list(o.bbox),
                    "centroid": list(o.centroid),
                    "area": o.area,
                }
                for o in self.objects
            ],
        }


def objects_to_detections(
    objects: Sequence[DetectedObject], spec: Mapping[str, Any]
) -> tuple[dict[str, list[Detection]], dict[int, str]]:
    """Per-class detections (score 1.0) of the objects of known shape, and each detection's colour by ``id``.

    GenEval's rules take the first ``count`` detections of a class, in confidence order; every parsed object is
    certain, so the tie is broken by putting objects of a colour the spec asks for that class first (an image with
    a pink and a red triangle does show "a pink triangle").
    """
    wanted = {(clause["class"], clause["color"]) for clause in spec.get("include", []) if "color" in clause}
    detections: dict[str, list[Detection]] = {}
    colours: dict[int, str] = {}
    for obj in sorted(objects, key=lambda o: (o.shape, o.colour) not in wanted):
        if obj.shape == UNKNOWN:
            continue
        detection = Detection(box=obj.bbox, score=1.0, label=obj.shape)
        detections.setdefault(obj.shape, []).append(detection)
        colours[id(detection)] = obj.colour
    return detections, colours


def score_objects(
    objects: Sequence[DetectedObject], spec: Mapping[str, Any], options: GenEvalOptions = GenEvalOptions()
) -> ScoreResult:
    """Apply GenEval's rules for ``spec`` to already parsed objects."""
    detections, colours = objects_to_detections(objects, spec)
    verdict = geneval_rules.score_detections(spec, detections, lambda _, d: colours[id(d)], options)
    return ScoreResult(
        correct=verdict.correct,
        reason=verdict.reason,
        tag=spec["tag"],
        prompt=spec.get("prompt", ""),
        objects=list(objects),
        details=verdict.details,
    )


def score_image(
    image: Image.Image | np.ndarray,
    spec: Mapping[str, Any],
    detector: DetectorConfig = DetectorConfig(),
    options: GenEvalOptions = GenEvalOptions(),
) -> ScoreResult:
    """Is ``image`` a correct rendering of the GenEval-format ``spec``? Parse it, then apply GenEval's rules."""
    return score_objects(detect_objects(image, detector), spec, options)


def summarize(results: Iterable[ScoreResult | Mapping[str, Any]]) -> dict[str, Any]:
    """GenEval's summary: ``overall`` = unweighted mean of per-task accuracies, plus each task's accuracy by tag
    and the rule engine's full breakdown under ``tasks``."""
    records = [r.to_record() if isinstance(r, ScoreResult) else r for r in results]
    summary = geneval_rules.summarize(records)
    return {**{tag: task["accuracy"] for tag, task in summary["tasks"].items()}, **summary}


def score_edit(
    output: Image.Image | np.ndarray,
    target: Scene | Mapping[str, Any],
    detector: DetectorConfig = DetectorConfig(),
    tolerance: float = EDIT_POSITION_TOLERANCE,
) -> ScoreResult:
    """Does the edited ``output`` show exactly the ``target`` scene (a ``Scene`` or its ``to_dict``)?

    Correct when the parsed objects pair one-to-one with the target's objects of the same shape and colour, each
    box centre within ``tolerance`` of the image side of its target; anything unrecognised or extra is wrong.
    """
    scene = target if isinstance(target, Scene) else Scene.from_dict(dict(target))
    width, height = output.size if isinstance(output, Image.Image) else (output.shape[1], output.shape[0])
    side = min(height, width)
    objects = detect_objects(output, detector)
    reasons = []
    unrecognised = [obj for obj in objects if not obj.known]
    if unrecognised:
        reasons.append(f"{len(unrecognised)} object(s) of unknown shape or colour")
    for shape, colour in sorted({(o.shape, o.colour) for o in scene.objects}):
        wanted = [
            ((o.x * side + (width - side) / 2), (o.y * side + (height - side) / 2))
            for o in scene.objects
            if (o.shape, o.colour) == (shape, colour)
        ]
        seen = [
            ((o.bbox[0] + o.bbox[2]) / 2, (o.bbox[1] + o.bbox[3]) / 2)
            for o in objects
            if (o.shape, o.colour) == (shape, colour)
        ]
        if len(seen) != len(wanted):
            reasons.append(f"expected {len(wanted)} {colour} {shape}, found {len(seen)}")
        elif not _centres_pair_up(wanted, seen, tolerance * side):
            reasons.append(f"{colour} {shape} not where the target has it")
    target_kinds = {(o.shape, o.colour) for o in scene.objects}
    extra = [o for o in objects if o.known and (o.shape, o.colour) not in target_kinds]
    if extra:
        reasons.append("unexpected " + ", ".join(f"{o.colour} {o.shape}" for o in extra))
    return ScoreResult(not reasons, "\n".join(reasons), "edit", "", objects)


def _centres_pair_up(
    wanted: list[tuple[float, float]], seen: list[tuple[float, float]], tolerance: float
) -> bool:
    """True when some one-to-one pairing puts every seen centre within ``tolerance`` of its wanted centre."""
    return any(
        all(np.hypot(w[0] - s[0], w[1] - s[1]) <= tolerance for w, s in zip(wanted, order))
        for order in itertools.permutations(seen)
    )


def qa_accuracy(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of predicted answers that match their reference after normalisation (``answers_match``)."""
    if len(predictions) != len(references):
        raise ValueError(f"qa_accuracy: {len(predictions)} predictions for {len(references)} references")
    if not references:
        raise ValueError("qa_accuracy: no answers to score")
    return sum(answers_match(p, r) for p, r in zip(predictions, references)) / len(references)
