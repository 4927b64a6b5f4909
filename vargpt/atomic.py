"""Atomic file writes: a temporary file of this writer's own beside the target, renamed into place when complete.

A reader never sees a half-written file, an interrupted write leaves the old file (and no temporary) behind, and
several processes may write the same target at once (every process of a ``torchrun`` launch writes a stage's resolved
config before Lightning knows its rank): each renames its own file, and the last rename wins.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


@contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "w", fsync: bool = False) -> Iterator[IO[Any]]:
    """Open a temporary file for writing (``mode`` ``"w"``, UTF-8 text, or ``"wb"``) that replaces ``path`` when the
    block ends without an error; ``fsync`` flushes it to disk first. The parent folder is created."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open: mode must be 'w' or 'wb', got {mode!r}")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as handle:
            yield handle
            if fsync:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
