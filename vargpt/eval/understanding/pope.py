"""POPE: object-hallucination yes/no questions in three splits (evaluation.md §6.3).

Data: VLMEvalKit ``POPE.tsv`` (or ``.jsonl``) with columns ``index, question, answer (Yes/No), category, image``;
``category`` names the split (``adversarial``, ``popular``, ``random``), possibly several separated by commas
(the row then counts in each). Answers are parsed with LLaVA's ``eval_pope.py`` rule (``answers.parse_yes_no_llava``).
Per split: accuracy, precision, recall, F1 (positive = "yes") and the yes-ratio; the headline is the mean F1 of the
splits, as papers quote it; ``pooled`` pools every row once.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from vargpt.eval.understanding.answers import parse_yes_no_llava
from vargpt.eval.understanding.data import BenchmarkDataError, Question, QuestionSet, image_sources, read_table
from vargpt.eval.understanding.scoring import ScoreResult, lookup_predictions

NAME = "pope"
MAX_NEW_TOKENS = 128  # lmms-eval pope generation_kwargs
POST_PROMPT = "Answer the question using a single word or phrase."


def load_questions(path: str | os.PathLike) -> QuestionSet:
    path = Path(path)
    rows = read_table(path, ["index", "question", "answer", "category"])
    images = image_sources(rows, path)
    questions = []
    for row in rows:
        answer = str(row["answer"]).strip().lower()
        if answer not in ("yes", "no"):
            raise BenchmarkDataError(f"{path}: question {row['index']} has answer {row['answer']!r}, expected Yes/No")
        splits = [s.strip() for s in str(row["category"]).split(",") if s.strip()]
        questions.append(
            Question(
                id=str(row["index"]),
                prompt=f"{row['question']}\n{POST_PROMPT}",
                answer=answer,
                images=images[str(row["index"])],
                max_new_tokens=MAX_NEW_TOKENS,
                fields={"splits": splits},
                base_dir=path.parent,
            )
        )
    return QuestionSet(questions)


def binary_metrics(pairs: Sequence[tuple[str, str]]) -> dict[str, float | int]:
    """Accuracy, precision, recall, F1 and yes-ratio of (parsed, gold) yes/no pairs; 0 where undefined."""
    true_positive = sum(p == "yes" and g == "yes" for p, g in pairs)
    false_positive = sum(p == "yes" and g == "no" for p, g in pairs)
    false_negative = sum(p == "no" and g == "yes" for p, g in pairs)
    precision = true_positive / (true_positive + false_positive) if true_positive + false_positive else 0.0
    recall = true_positive / (true_positive + false_negative) if true_positive + false_negative else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": sum(p == g for p, g in pairs) / len(pairs),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": sum(p == "yes" for p, _ in pairs) / len(pairs),
        "n": len(pairs),
    }


def score(questions: Sequence[Question], predictions: Mapping[str, str]) -> ScoreResult:
    texts, counts = lookup_predictions(questions, predictions)
    records = []
    for question, text in zip(questions, texts, strict=True):
        parsed = None if text is None else parse_yes_no_llava(text)
        records.append(
            {
                "id": question.id,
                "splits": question.fields["splits"],
                "prediction": text,
                "parsed": parsed,
                "answer": question.answer,
                "correct": parsed == question.answer,
            }
        )
    by_split: dict[str, list[tuple[str, str]]] = {}
    for record in records:
        for split in record["splits"]:
            by_split.setdefault(split, []).append((record["parsed"], record["answer"]))
    splits = {name: binary_metrics(pairs) for name, pairs in sorted(by_split.items())}
    mean_f1 = sum(s["f1"] for s in splits.values()) / len(splits)
    pooled = binary_metrics([(r["parsed"], r["answer"]) for r in records])
    summary = {"mean_f1": mean_f1, "splits": splits, "pooled": pooled, **counts}
    metrics = {
        "mean_f1": mean_f1,
        **{f"{name}/f1": s["f1"] for name, s in splits.items()},
        "accuracy": pooled["accuracy"],
        "n": len(records),
        **counts,
    }
    return ScoreResult(records, summary, metrics)
