"""MMBench (dev, English) with circular evaluation (evaluation.md §6.3).

Data: VLMEvalKit ``MMBench_DEV_EN.tsv`` (or ``.jsonl``) with columns ``index, question, hint, A, B, C, D, [E],
answer, category, l2-category, image``. Circular copies of a question have ``index + k * 1_000_000``; when the file
holds only the originals, the rotations are made here (option texts shifted by k, the answer letter moved with
its text). A question counts as correct only if every one of its variants is answered correctly.

Answers are matched offline with VLMEvalKit's heuristic (``answers.match_option``); unmatched answers are wrong.
The official protocol falls back to a GPT judge for those; this is flagged in the notes of every result.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from vargpt.eval.understanding.answers import match_option
from vargpt.eval.understanding.data import (
    BenchmarkDataError,
    Question,
    QuestionSet,
    image_sources,
    present,
    read_table,
)
from vargpt.eval.understanding.scoring import ScoreResult, accuracy_by, lookup_predictions

NAME = "mmbench"
CIRCULAR_OFFSET = 1_000_000  # VLMEvalKit / lmms-eval: circular copies have index + k * 1e6
OPTION_COLUMNS = ("A", "B", "C", "D", "E")
MAX_NEW_TOKENS = 1024  # lmms-eval mmbench_en generation_kwargs
POST_PROMPT = "Answer with the option's letter from the given choices directly."
NOTES = ["offline heuristic answer matching without the GPT-3.5 fallback of the official protocol"]


def build_prompt(question: str, hint: str | None, options: Mapping[str, str]) -> str:
    """lmms-eval's ``mmbench_doc_to_text``: hint, question, the options block, then the post prompt."""
    block = "There are several options:\n" + "".join(f"{letter}. {text}\n" for letter, text in options.items())
    body = f"{hint} {question} {block}" if hint else f"{question} {block}"
    return f"{body}\n{POST_PROMPT}"


def load_questions(path: str | os.PathLike, circular: bool = True) -> QuestionSet:
    """Every variant of every question; with ``circular`` the missing rotations are added (and counted)."""
    path = Path(path)
    rows = read_table(path, ["index", "question", "answer", "A", "B"])
    images = image_sources(rows, path)
    by_base: dict[int, list[dict]] = {}
    for row in rows:
        try:
            index = int(float(row["index"]))
        except ValueError as error:
            raise BenchmarkDataError(f"{path}: index {row['index']!r} is not an integer") from error
        by_base.setdefault(index % CIRCULAR_OFFSET, []).append({**row, "_index": index})
    questions: list[Question] = []
    added = 0
    for base, variants in sorted(by_base.items()):
        original = min(variants, key=lambda row: row["_index"])
        options = {letter: str(original[letter]) for letter in OPTION_COLUMNS if present(original.get(letter))}
        if str(original["answer"]) not in options:
            raise BenchmarkDataError(
                f"{path}: question {base} answer {original['answer']!r} is not one of {list(options)}"
            )
        if circular and len(variants) == 1:
            variants = rotations(original, options)
            added += len(variants) - 1
        for row in sorted(variants, key=lambda row: row["_index"]):
            row_options = {letter: str(row[letter]) for letter in OPTION_COLUMNS if present(row.get(letter))}
            hint = str(row["hint"]) if present(row.get("hint")) else None
            questions.append(
                Question(
                    id=str(row["_index"]),
                    prompt=build_prompt(str(row["question"]), hint, row_options),
                    answer=str(row["answer"]),
                    images=images[str(original["index"])],
                    max_new_tokens=MAX_NEW_TOKENS,
                    fields={
                        "group": base,
                        "options": row_options,
                        "category": row.get("category"),
                        "l2_category": row.get("l2-category"),
                    },
                    base_dir=path.parent,
                )
            )
    return QuestionSet(questions, {"added_rotations": added})


def rotations(original: dict, options: Mapping[str, str]) -> list[dict]:
    """The original and its ``n - 1`` circular shifts: variant k shows option ``(i + k) mod n`` at letter i."""
    letters = list(options)
    texts = [options[letter] for letter in letters]
    answer_position = letters.index(str(original["answer"]))
    variants = []
    for shift in range(len(letters)):
        variant = {key: value for key, value in original.items() if key not in OPTION_COLUMNS}
        for position, letter in enumerate(letters):
            variant[letter] = texts[(position + shift) % len(letters)]
        variant["answer"] = letters[(answer_position - shift) % len(letters)]
        variant["_index"] = original["_index"] + shift * CIRCULAR_OFFSET
        variants.append(variant)
    return variants


def score(questions: Sequence[Question], predictions: Mapping[str, str]) -> ScoreResult:
    """Circular accuracy overall, per category and per L2 category; also the plain per-variant accuracy."""
    texts, counts = lookup_predictions(questions, predictions)
    records = []
    for question, text in zip(questions, texts, strict=True):
        parsed = None if text is None else match_option(text, question.fields["options"])
        records.append(
            {
                "id": question.id,
                "group": question.fields["group"],
                "category": question.fields["category"],
                "l2_category": question.fields["l2_category"],
                "prediction": text,
                "parsed": parsed,
                "answer": question.answer,
                "correct": parsed == question.answer,
            }
        )
    groups: dict[int, dict] = {}
    for record in records:
        group = groups.setdefault(record["group"], {**record, "correct": True, "variants": 0})
        group["correct"] = group["correct"] and record["correct"]
        group["variants"] += 1
    circular = list(groups.values())
    overall = sum(g["correct"] for g in circular) / len(circular)
    summary = {
        "circular_accuracy": overall,
        "questions": len(circular),
        "variants": len(records),
        "variant_accuracy": sum(r["correct"] for r in records) / len(records),
        "unmatched_answers": sum(r["parsed"] is None and r["prediction"] is not None for r in records),
        "category": accuracy_by(circular, "category"),
        "l2_category": accuracy_by(circular, "l2_category"),
        **counts,
    }
    metrics = {"accuracy": overall, "questions": len(circular), **counts}
    return ScoreResult(records, summary, metrics, notes=list(NOTES))
