"""Atomic writes (vargpt/atomic.py): a completed block replaces the file, a failed one leaves it as it was."""

from __future__ import annotations

from pathlib import Path

import pytest

from vargpt.atomic import atomic_open


def test_a_completed_write_replaces_the_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "new" / "out.txt"
    with atomic_open(target) as handle:
        handle.write("first")
    with atomic_open(target, "wb", fsync=True) as handle:
        handle.write(b"second")
    assert target.read_text() == "second"
    assert [path.name for path in target.parent.iterdir()] == ["out.txt"]


def test_a_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="interrupted"):
        with atomic_open(target) as handle:
            handle.write("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert [path.name for path in tmp_path.iterdir()] == ["out.txt"]
    with pytest.raises(ValueError, match="mode must be 'w' or 'wb'"):
        with atomic_open(target, "a"):
            pass
