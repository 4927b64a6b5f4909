"""Reading benchmark tables and their images.

Tables are VLMEvalKit TSV files (``MMBench_DEV_EN.tsv``, ``SEEDBench_IMG.tsv``, ``MMMU_DEV_VAL.tsv``,
``POPE.tsv``, ``MME.tsv``: one row per question, an ``index`` column, images base64-encoded in ``image``), or
JSON lines with the same fields. As in VLMEvalKit, an ``image`` cell of at most 64 characters is the ``index`` of
the row holding the picture (shared images are stored once); a cell starting with ``[`` is a list of images; an
``image_path`` cell (JSON lines) may instead name a file relative to the table.
"""

from __future__ import annotations

import ast
import base64
import binascii
import csv
import io
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from vargpt.eval.jsonl import read_jsonl

IMAGE_REFERENCE_MAX_CHARS = 64  # VLMEvalKit: shorter image cells are the index of the row with the image


class BenchmarkDataError(ValueError):
    """A benchmark table is missing, lacks a column, or has a bad row; the message names the file and row."""


@dataclass
class Question:
    """One question as sent to the model: ``prompt`` is the text placed after the images."""

    id: str
    prompt: str
    answer: Any
    images: list[str]
    max_new_tokens: int
    fields: dict[str, Any] = field(default_factory=dict)
    base_dir: Path | None = None

    def load_images(self) -> list[Image.Image]:
        """Decode the question's images (base64 cells, or file paths relative to the table)."""
        return [decode_image(source, self.base_dir, self.id) for source in self.images]


@dataclass
class QuestionSet:
    """The questions of a benchmark file, and counts of rows that were read but not asked (by reason) or added."""

    questions: list[Question]
    counts: dict[str, int] = field(default_factory=dict)


def read_table(path: str | os.PathLike, required: Sequence[str]) -> list[dict[str, Any]]:
    """Rows of a ``.tsv`` or ``.jsonl`` benchmark table; every row must have the ``required`` columns."""
    path = Path(path)
    if not path.is_file():
        raise BenchmarkDataError(f"benchmark file not found: {path}")
    if path.suffix == ".jsonl":
        rows = read_jsonl(path)
    elif path.suffix == ".tsv":
        csv.field_size_limit(sys.maxsize)
        with path.open(encoding="utf-8", newline="") as handle:
            rows = list(csv.DictReader(handle, delimiter="\t"))
    else:
        raise BenchmarkDataError(f"{path}: expected a VLMEvalKit .tsv or a .jsonl table")
    if not rows:
        raise BenchmarkDataError(f"{path}: no rows")
    for number, row in enumerate(rows, start=1):
        missing = [column for column in required if column not in row or row[column] is None]
        if missing:
            raise BenchmarkDataError(f"{path}: row {number} lacks the column(s) {missing}")
    return rows


def present(value: Any) -> bool:
    """Whether a cell holds a value (pandas writes missing cells of TSVs as empty or ``nan``)."""
    return value is not None and str(value).strip() not in ("", "nan", "NaN", "None")


def image_sources(rows: list[dict[str, Any]], path: Path) -> dict[str, list[str]]:
    """Per row index: its images, with VLMEvalKit's short index references resolved. Indices must be unique."""
    cells: dict[str, str] = {}
    for row in rows:
        index = str(row["index"])
        if index in cells:
            raise BenchmarkDataError(f"{path}: index {index!r} appears in more than one row")
        cells[index] = str(row.get("image", "") or "")
    resolved: dict[str, list[str]] = {}
    for row in rows:
        index = str(row["index"])
        cell = cells[index]
        if present(cell) and len(cell) <= IMAGE_REFERENCE_MAX_CHARS:
            if cell not in cells or len(cells[cell]) <= IMAGE_REFERENCE_MAX_CHARS:
                raise BenchmarkDataError(f"{path}: row {index} refers to image row {cell!r}, which holds no image")
            cell = cells[cell]
        if present(cell):
            resolved[index] = ast.literal_eval(cell) if cell.startswith("[") else [cell]
        elif present(row.get("image_path")):
            paths = row["image_path"]
            resolved[index] = list(paths) if isinstance(paths, list) else [str(paths)]
        else:
            resolved[index] = []
    return resolved


def decode_image(source: str, base_dir: Path | None, question_id: str) -> Image.Image:
    """A base64-encoded image, or an image file (relative to ``base_dir``)."""
    candidate = Path(source) if base_dir is None else base_dir / source
    if len(source) < 1024 and candidate.is_file():
        return Image.open(candidate).convert("RGB")
    try:
        return Image.open(io.BytesIO(base64.b64decode(source, validate=True))).convert("RGB")
    except (binascii.Error, ValueError, OSError) as error:
        raise BenchmarkDataError(f"question {question_id}: the image is neither a file nor base64 data") from error
