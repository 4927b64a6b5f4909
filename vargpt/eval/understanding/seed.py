"""SEED-Bench, image subset, multiple choice (evaluation.md §6.3).

Data: VLMEvalKit ``SEEDBench_IMG.tsv`` (or ``.jsonl``) with columns ``index, question, A, B, C, D, answer,
category, image``. If a ``data_type`` column is present (the lmms-lab export), only ``image`` rows are kept and
the others are counted as ``dropped_non_image``. The prediction is the first character of the stripped answer
(lmms-eval ``seed_process_result``), compared with the answer letter.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from vargpt.eval.understanding.data import Question, QuestionSet, image_sources, present, read_table
from vargpt.eval.understanding.scoring import ScoreResult, accuracy_by, lookup_predictions

NAME = "seed"
OPTION_COLUMNS = ("A", "B", "C", "D")
MAX_NEW_TOKENS = 16  # a single letter is expected; the first character is all that is scored
POST_PROMPT = "Answer with the option's letter from the given choices directly."


def build_prompt(question: str, options: Mapping[str, str]) -> str:
    """The question, one ``X. text`` line per option, then the post prompt."""
    lines = "\n".join(f"{letter}. {text}" for letter, text in options.items())
    return f"{question}\n{lines}\n{POST_PROMPT}"


def load_questions(path: str | os.PathLike) -> QuestionSet:
    """The image questions; non-image rows are dropped and counted."""
    path = Path(path)
    rows = read_table(path, ["index", "question", "answer", *OPTION_COLUMNS])
    kept = [row for row in rows if str(row.get("data_type", "image")) == "image"]
    images = image_sources(kept, path)
    questions = []
    for row in kept:
        options = {letter: str(row[letter]) for letter in OPTION_COLUMNS if present(row.get(letter))}
        questions.append(
            Question(
                id=str(row["index"]),
                prompt=build_prompt(str(row["question"]), options),
                answer=str(row["answer"]).strip(),
                images=images[str(row["index"])],
                max_new_tokens=MAX_NEW_TOKENS,
                fields={"category": row.get("category") or row.get("question_type_id")},
                base_dir=path.parent,
            )
        )
    return QuestionSet(questions, {"dropped_non_image": len(rows) - len(kept)})


def score(questions: Sequence[Question], predictions: Mapping[str, str]) -> ScoreResult:
    """Accuracy overall and per category."""
    texts, counts = lookup_predictions(questions, predictions)
    records = []
    for question, text in zip(questions, texts, strict=True):
        stripped = "" if text is None else text.strip()
        parsed = stripped[0] if stripped else None
        records.append(
            {
                "id": question.id,
                "category": question.fields["category"],
                "prediction": text,
                "parsed": parsed,
                "answer": question.answer,
                "correct": parsed == question.answer,
            }
        )
    accuracy = sum(r["correct"] for r in records) / len(records)
    summary = {"accuracy": accuracy, "n": len(records), "category": accuracy_by(records, "category"), **counts}
    return ScoreResult(records, summary, {"accuracy": accuracy, "n": len(records), **counts})
