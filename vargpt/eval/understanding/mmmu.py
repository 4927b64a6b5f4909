"""MMMU (validation) with the official answer parser (MMMU-Benchmark ``eval_utils.py``; evaluation.md §6.3).

Data: VLMEvalKit ``MMMU_DEV_VAL.tsv`` (or ``.jsonl``) with columns ``index, question, answer`` and the options
either as columns ``A``..``I`` or as an ``options`` cell holding a Python list (the lmms-lab export); optional
``question_type`` (``multiple-choice`` / ``open``; otherwise a question with options is multiple choice),
``split`` (only ``validation`` rows are kept when present; others are counted as dropped), ``subject`` or
``category`` (else taken from an id like ``validation_Art_12``) and ``image`` (one or a list of images).
The question text is sent as written, ``<image i>`` markers included; the images go before it, in order.

Parsing: multiple choice looks for ``(A)``, then `` A `` (padded), then ``A.``; with nothing found and an answer
longer than 5 words, for an option text; several candidates -> the one occurring last; nothing -> a random letter
from a ``random.Random(seed)`` drawn in question order (so the score is reproducible). Open answers: the key part
after indicators ("could be", "so", "is", "thus", "therefore", "final", "answer", "result", and "=" in the last
sentence), numbers extracted, strings lower-cased, numbers rounded to 2 decimals; correct if a gold number equals
a predicted number or a gold string occurs in a predicted string.
"""

from __future__ import annotations

import ast
import os
import random
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vargpt.eval.understanding.answers import option_letters
from vargpt.eval.understanding.data import BenchmarkDataError, Question, QuestionSet, image_sources, present, read_table
from vargpt.eval.understanding.scoring import ScoreResult, accuracy_by, lookup_predictions

NAME = "mmmu"
OPTION_COLUMNS = tuple("ABCDEFGHI")
MAX_NEW_TOKENS = 16  # lmms-eval mmmu_val generation_kwargs
MULTIPLE_CHOICE_PROMPT = "Answer with the option's letter from the given choices directly."
OPEN_PROMPT = "Answer the question using a single word or phrase."
DEFAULT_SEED = 0  # lmms-eval seeds python's random with 0 by default (``--seed 0,1234,1234,1234``)
KEY_INDICATORS = ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ")


def build_prompt(question: str, options: Mapping[str, str]) -> str:
    """Multiple choice: question, ``X. text`` lines, then the letter instruction; open: question, then the
    short-answer instruction (lmms-eval ``mmmu_doc_to_text``)."""
    if options:
        lines = "\n".join(f"{letter}. {text}" for letter, text in options.items())
        return f"{question}\n{lines}\n\n{MULTIPLE_CHOICE_PROMPT}"
    return f"{question}\n\n{OPEN_PROMPT}"


def _options(row: Mapping[str, Any], path: Path) -> dict[str, str]:
    if present(row.get("options")):
        try:
            texts = ast.literal_eval(str(row["options"]))
        except (ValueError, SyntaxError) as error:
            raise BenchmarkDataError(f"{path}: question {row['index']} has an unreadable options list") from error
        return dict(zip(option_letters(len(texts)), (str(t) for t in texts), strict=True)) if texts else {}
    return {letter: str(row[letter]) for letter in OPTION_COLUMNS if present(row.get(letter))}


def _subject(row: Mapping[str, Any]) -> str:
    for column in ("subject", "category"):
        if present(row.get(column)):
            return str(row[column])
    identifier = str(row.get("id", row["index"]))
    match = re.match(r"^(?:dev|validation|test)_(.+)_\d+$", identifier)
    return match.group(1) if match else "unknown"


def _gold(answer: str) -> Any:
    """An answer cell: a list literal for open questions with several accepted answers, else the string."""
    if answer.startswith("["):
        try:
            value = ast.literal_eval(answer)
        except (ValueError, SyntaxError):
            return answer
        return [str(v) for v in value] if isinstance(value, list) else answer
    return answer


def load_questions(path: str | os.PathLike) -> QuestionSet:
    """The validation questions (all rows when there is no ``split`` column)."""
    path = Path(path)
    rows = read_table(path, ["index", "question", "answer"])
    kept = [row for row in rows if not present(row.get("split")) or str(row["split"]) == "validation"]
    images = image_sources(kept, path)
    questions = []
    for row in kept:
        options = _options(row, path)
        kind = (
            str(row["question_type"])
            if present(row.get("question_type"))
            else ("multiple-choice" if options else "open")
        )
        if kind not in ("multiple-choice", "open"):
            raise BenchmarkDataError(f"{path}: question {row['index']} has question_type {kind!r}")
        questions.append(
            Question(
                id=str(row["index"]),
                prompt=build_prompt(str(row["question"]), options if kind == "multiple-choice" else {}),
                answer=_gold(str(row["answer"])),
                images=images[str(row["index"])],
                max_new_tokens=MAX_NEW_TOKENS,
                fields={"options": options, "question_type": kind, "subject": _subject(row)},
                base_dir=path.parent,
            )
        )
    return QuestionSet(questions, {"dropped_other_splits": len(rows) - len(kept)})


def parse_multiple_choice(response: str, options: Mapping[str, str], rng: random.Random) -> tuple[str, bool]:
    """The chosen letter and whether it was guessed at random (nothing parsed)."""
    for character in (",", ".", "!", "?", ";", ":", "'"):
        response = response.strip(character)
    padded = f" {response} "
    letters = list(options)
    patterns = [lambda c: f"({c})", lambda c: f" {c} ", lambda c: f"{c}."]
    for pattern in patterns:
        candidates = [c for c in letters if pattern(c) in padded]
        if candidates:
            return max(candidates, key=lambda c: padded.rfind(pattern(c))), False
    if len(padded.split()) > 5:
        lowered = padded.lower()
        candidates = [c for c in letters if options[c].lower() in lowered]
        if candidates:
            return max(candidates, key=lambda c: lowered.rfind(options[c].lower())), False
    return rng.choice(letters), True


def _numbers(text: str) -> list[str]:
    with_commas = re.findall(r"-?\b\d{1,3}(?:,\d{3})+\b", text)
    scientific = re.findall(r"-?\d+(?:\.\d+)?[eE][+-]?\d+", text)
    simple = re.findall(r"-?(?:\d+\.\d+|\.\d+|\d+)(?![eE][+-]?\d+)(?![,\d])", text)
    return with_commas + scientific + simple


def _normalise(text: str) -> list[float | str]:
    """A number -> [rounded float]; a string -> lower-cased (a single character padded with a space)."""
    text = text.strip()
    try:
        return [round(float(text.replace(",", "")), 2)]
    except ValueError:
        pass
    text = text.lower()
    return [" " + text, text + " "] if len(text) == 1 else [text]


def _key_parts(response: str) -> list[str]:
    response = response.strip().strip(".").lower()
    sentences = re.split(r"\.\s(?=[A-Z])|\n", response)
    parts = []
    for position, sentence in enumerate(sentences):
        indicators = KEY_INDICATORS + (("=",) if position == len(sentences) - 1 else ())
        tails = [sentence.split(indicator)[-1].strip() for indicator in indicators if indicator in sentence]
        if tails:
            shortest = min(tails, key=len)
            if shortest not in (":", ",", ".", "!", "?", ";", "'"):
                parts.append(shortest)
    return parts or [response]


def parse_open(response: str) -> list[float | str]:
    """Candidate answers (normalised strings and numbers) of a free-form open answer."""
    parts = _key_parts(response)
    candidates = list(parts)
    for part in parts:
        candidates.extend(_numbers(part))
    normalised: list[float | str] = []
    for candidate in candidates:
        normalised.extend(_normalise(candidate))
    return list(dict.fromkeys(normalised))


def open_is_correct(gold: Any, candidates: Sequence[float | str]) -> bool:
    """A gold number equal to a predicted number, or a gold string inside a predicted string."""
    golds: list[float | str] = []
    for answer in gold if isinstance(gold, list) else [gold]:
        golds.extend(_normalise(str(answer)))
    for candidate in candidates:
        if isinstance(candidate, str):
            if any(isinstance(g, str) and g in candidate for g in golds):
                return True
        elif candidate in golds:
            return True
    return False


def score(questions: Sequence[Question], predictions: Mapping[str, str], seed: int = DEFAULT_SEED) -> ScoreResult:
    """Micro accuracy over all questions, per subject and per question type."""
    texts, counts = lookup_predictions(questions, predictions)
    rng = random.Random(seed)
    records = []
    for question, text in zip(questions, texts, strict=True):
        if text is None:
            parsed, guessed, correct = None, False, False
        elif question.fields["question_type"] == "multiple-choice":
            parsed, guessed = parse_multiple_choice(text, question.fields["options"], rng)
            gold = question.answer if isinstance(question.answer, list) else [question.answer]
            correct = parsed in gold
        else:
            parsed, guessed = parse_open(text), False
            correct = open_is_correct(question.answer, parsed)
        records.append(
            {
                "id": question.id,
                "subject": question.fields["subject"],
                "question_type": question.fields["question_type"],
                "prediction": text,
                "parsed": parsed,
                "random_guess": guessed,
                "answer": question.answer,
                "correct": correct,
            }
        )
    accuracy = sum(r["correct"] for r in records) / len(records)
    summary = {
        "accuracy": accuracy,
        "n": len(records),
        "random_guesses": sum(r["random_guess"] for r in records),
        "seed": seed,
        "subject": accuracy_by(records, "subject"),
        "question_type": accuracy_by(records, "question_type"),
        **counts,
    }
    return ScoreResult(records, summary, {"accuracy": accuracy, "n": len(records), **counts})
