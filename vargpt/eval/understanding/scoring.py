"""What every understanding scorer returns, and how predictions are matched to questions."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from vargpt.eval.understanding.data import Question


@dataclass
class ScoreResult:
    """Per-sample ``records``, the full ``summary`` and the headline ``metrics`` (flat, for the report table)."""

    records: list[dict[str, Any]]
    summary: dict[str, Any]
    metrics: dict[str, float | int]
    notes: list[str] = field(default_factory=list)


def lookup_predictions(
    questions: Sequence[Question], predictions: Mapping[str, str]
) -> tuple[list[str | None], dict[str, int]]:
    """The prediction text of every question (None when missing) and counts of missing and unmatched predictions,
    so a partial predictions file is scored (a missing answer is wrong, never parsed) but never silently."""
    ids = {question.id for question in questions}
    texts = [predictions.get(question.id) for question in questions]
    counts = {
        "missing_predictions": sum(question.id not in predictions for question in questions),
        "unmatched_predictions": sum(key not in ids for key in predictions),
    }
    return texts, counts


def accuracy_by(records: Sequence[Mapping[str, Any]], key: str, value: str = "correct") -> dict[str, float]:
    """Mean of ``record[value]`` per distinct ``record[key]`` (records without the key are left out)."""
    groups: dict[str, list[float]] = {}
    for record in records:
        if record.get(key) not in (None, ""):
            groups.setdefault(str(record[key]), []).append(float(record[value]))
    return {name: sum(values) / len(values) for name, values in sorted(groups.items())}
