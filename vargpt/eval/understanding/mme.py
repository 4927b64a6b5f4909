"""MME: yes/no questions, two per image, in 14 subtasks (evaluation.md §6.3).

Data: VLMEvalKit ``MME.tsv`` (or ``.jsonl``) with columns ``index, question, answer (Yes/No), category (the
subtask), image_path, image``; ``image_path`` groups the two questions of an image (lmms-lab's ``question_id``
plays that role and is accepted instead). Answers are parsed with lmms-eval's rule (``answers.parse_yes_no_mme``).
Per subtask: acc (% of questions) + acc+ (% of images with both questions right); perception = the sum over its
10 subtasks (max 2000), cognition over 4 (max 800). Subtasks absent from the data are listed, never filled in.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from vargpt.eval.understanding.answers import parse_yes_no_mme
from vargpt.eval.understanding.data import BenchmarkDataError, Question, QuestionSet, image_sources, present, read_table
from vargpt.eval.understanding.scoring import ScoreResult, lookup_predictions

NAME = "mme"
MAX_NEW_TOKENS = 16  # lmms-eval mme generation_kwargs
POST_PROMPT = "Answer the question using a single word or phrase."
OFFICIAL_SUFFIX = " Please answer yes or no."
PERCEPTION = (
    "OCR",
    "artwork",
    "celebrity",
    "color",
    "count",
    "existence",
    "landmark",
    "position",
    "posters",
    "scene",
)
COGNITION = ("code_reasoning", "commonsense_reasoning", "numerical_calculation", "text_translation")


def build_prompt(question: str) -> str:
    """The question without MME's own " Please answer yes or no.", then the short-answer instruction."""
    return f"{question.replace(OFFICIAL_SUFFIX, '')}\n{POST_PROMPT}"


def load_questions(path: str | os.PathLike) -> QuestionSet:
    path = Path(path)
    rows = read_table(path, ["index", "question", "answer", "category"])
    images = image_sources(rows, path)
    questions = []
    for row in rows:
        answer = str(row["answer"]).strip().lower()
        if answer not in ("yes", "no"):
            raise BenchmarkDataError(f"{path}: question {row['index']} has answer {row['answer']!r}, expected Yes/No")
        group = row.get("image_path") if present(row.get("image_path")) else row.get("question_id")
        if not present(group):
            raise BenchmarkDataError(f"{path}: question {row['index']} has neither image_path nor question_id")
        questions.append(
            Question(
                id=str(row["index"]),
                prompt=build_prompt(str(row["question"])),
                answer=answer,
                images=images[str(row["index"])],
                max_new_tokens=MAX_NEW_TOKENS,
                fields={"subtask": str(row["category"]), "image_group": str(group)},
                base_dir=path.parent,
            )
        )
    return QuestionSet(questions)


def score(questions: Sequence[Question], predictions: Mapping[str, str]) -> ScoreResult:
    texts, counts = lookup_predictions(questions, predictions)
    records = []
    for question, text in zip(questions, texts, strict=True):
        parsed = None if text is None else parse_yes_no_mme(text)
        records.append(
            {
                "id": question.id,
                "subtask": question.fields["subtask"],
                "image_group": question.fields["image_group"],
                "prediction": text,
                "parsed": parsed,
                "answer": question.answer,
                "correct": parsed == question.answer,
            }
        )
    subtasks: dict[str, dict[str, list[bool]]] = {}
    for record in records:
        images = subtasks.setdefault(record["subtask"], {})
        images.setdefault(record["image_group"], []).append(record["correct"])
    scores = {}
    for name, images in sorted(subtasks.items()):
        answers = [correct for group in images.values() for correct in group]
        acc = 100 * sum(answers) / len(answers)
        acc_plus = 100 * sum(all(group) for group in images.values()) / len(images)
        scores[name] = {
            "acc": acc,
            "acc_plus": acc_plus,
            "score": acc + acc_plus,
            "questions": len(answers),
            "images": len(images),
        }
    unknown = sorted(set(scores) - set(PERCEPTION) - set(COGNITION))
    summary = {
        "perception": sum(scores[name]["score"] for name in PERCEPTION if name in scores),
        "cognition": sum(scores[name]["score"] for name in COGNITION if name in scores),
        "subtasks": scores,
        "missing_subtasks": [name for name in PERCEPTION + COGNITION if name not in scores],
        "unknown_subtasks": unknown,
        "n": len(records),
        **counts,
    }
    metrics = {
        "perception": summary["perception"],
        "cognition": summary["cognition"],
        "missing_subtasks": len(summary["missing_subtasks"]),
        "n": len(records),
        **counts,
    }
    notes = [] if not unknown else [f"subtasks outside MME's 14 are scored but not summed: {unknown}"]
    return ScoreResult(records, summary, metrics, notes)
