"""Running an understanding benchmark: predictions in (from a file or a ``ChatModel``), records and report out.

Predictions are JSON lines ``{"id": <question id>, "answer": <model output text>}``; ids are the ``index`` of
the benchmark table (for MMBench's circular variants, ``index + k * 1_000_000``). Generation appends one line per
answered question, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from vargpt.eval.jsonl import JsonlError, append_jsonl, read_jsonl, write_jsonl
from vargpt.eval.protocols import ChatModel
from vargpt.eval.report import Report
from vargpt.eval.understanding import mmbench, mme, mmmu, pope, seed
from vargpt.eval.understanding.data import Question, QuestionSet
from vargpt.eval.understanding.scoring import ScoreResult

UNDERSTANDING_BENCHMARKS = ("mmbench", "seed", "mmmu", "pope", "mme")


@dataclass(frozen=True)
class Benchmark:
    """A benchmark's loader and scorer, and a line on its answer parsing for the report."""

    name: str
    load: Callable[[Path], QuestionSet]
    score: Callable[[Sequence[Question], Mapping[str, str]], ScoreResult]
    parser: str


def get_benchmark(name: str, seed_value: int = mmmu.DEFAULT_SEED) -> Benchmark:
    """The benchmark called ``name``; ``seed_value`` seeds MMMU's random fallback."""
    table = {
        "mmbench": Benchmark("mmbench", mmbench.load_questions, mmbench.score, "VLMEvalKit can_infer, circular"),
        "seed": Benchmark("seed", seed.load_questions, seed.score, "first character (lmms-eval)"),
        "mmmu": Benchmark(
            "mmmu", mmmu.load_questions, functools.partial(mmmu.score, seed=seed_value), "official MMMU parser"
        ),
        "pope": Benchmark("pope", pope.load_questions, pope.score, "LLaVA eval_pope yes/no"),
        "mme": Benchmark("mme", mme.load_questions, mme.score, "lmms-eval parse_pred_ans yes/no"),
    }
    if name not in table:
        raise ValueError(f"unknown understanding benchmark {name!r}; known: {sorted(table)}")
    return table[name]


def read_predictions(path: str | os.PathLike) -> dict[str, str]:
    """Question id -> answer text; a line without both fields, or a repeated id, is an error naming the line."""
    predictions: dict[str, str] = {}
    for number, record in enumerate(read_jsonl(path), start=1):
        if "id" not in record or not isinstance(record.get("answer"), str):
            raise JsonlError(f"{path}:{number}: expected fields 'id' and 'answer' (a string)")
        key = str(record["id"])
        if key in predictions:
            raise JsonlError(f"{path}:{number}: id {key!r} appears twice")
        predictions[key] = record["answer"]
    return predictions


def generate_predictions(
    chat_model: ChatModel, questions: Sequence[Question], out_path: str | os.PathLike, progress: bool = True
) -> dict[str, str]:
    """Answer every question not yet in ``out_path`` (greedy, the benchmark's token limit) and append it there."""
    out_path = Path(out_path)
    predictions = read_predictions(out_path) if out_path.is_file() else {}
    pending = [question for question in questions if question.id not in predictions]
    for question in tqdm(pending, desc="answering", disable=not progress):
        answer = chat_model.chat(
            [{"role": "user", "content": question.prompt}],
            question.load_images(),
            max_new_tokens=question.max_new_tokens,
        )
        append_jsonl(out_path, {"id": question.id, "answer": answer})
        predictions[question.id] = answer
    return predictions


def evaluate_understanding(
    benchmark: Benchmark,
    question_set: QuestionSet,
    predictions: Mapping[str, str],
    out_dir: str | os.PathLike,
    data_name: str,
) -> Report:
    """Score, write ``<name>_samples.jsonl`` (one record per question) and return the report."""
    result = benchmark.score(question_set.questions, predictions)
    write_jsonl(Path(out_dir) / f"{benchmark.name}_samples.jsonl", result.records)
    settings = {
        "data": data_name,
        "questions": len(question_set.questions),
        **question_set.counts,
        "parser": benchmark.parser,
        "gpt_judge": "no",
        "notes": result.notes,
    }
    return Report(benchmark=benchmark.name, metrics=dict(result.metrics), settings=settings, details=result.summary)
