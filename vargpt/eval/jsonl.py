"""JSON-lines files: reading with errors that name the line, writing atomically, appending for resumable runs."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from vargpt.atomic import atomic_open


class JsonlError(ValueError):
    """A JSON-lines file is missing or malformed; the message names the file and the line."""


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every line of ``path`` as a JSON object; an empty or malformed line raises ``JsonlError`` with its number."""
    path = Path(path)
    if not path.is_file():
        raise JsonlError(f"JSON-lines file not found: {path}")
    records = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                raise JsonlError(f"{path}:{number}: empty line (every line must hold one JSON object)")
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise JsonlError(f"{path}:{number}: not valid JSON ({error.msg} at column {error.colno})") from error
            if not isinstance(record, dict):
                raise JsonlError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
            records.append(record)
    return records


def write_jsonl(path: str | os.PathLike, records: Iterable[Mapping[str, Any]]) -> Path:
    """Write ``records`` one per line, atomically (a temporary file renamed into place)."""
    path = Path(path)
    with atomic_open(path) as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def append_jsonl(path: str | os.PathLike, record: Mapping[str, Any]) -> None:
    """Append one record and flush it, so an interrupted run keeps every finished record."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        handle.flush()
