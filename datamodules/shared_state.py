"""State that the training process changes and DataLoader worker processes must see: the generation resolution, the
epoch number, and the per-worker read/skip counters.

Workers hold a copy of the dataset, made when they start (and kept for the whole run with persistent workers), so a
plain attribute set in the main process never reaches them. These values live in shared-memory tensors instead:
the dataset object carries the tensors, a worker reads them when it starts an epoch or a batch, and a write in the
main process is visible to every worker from then on, whether workers are forked, spawned or persistent.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vargpt.schedules import placeholder_count, validate_schedule

MAX_SCALES = 64  # room for any schedule (Infinity's templates have at most 13 scales)


@dataclass(frozen=True)
class GenerationResolution:
    """Side of the square generation targets, their scale schedule and the LLM placeholder count it implies."""

    size: int
    schedule: tuple[tuple[int, int], ...]
    placeholder_count: int


class SharedGenerationResolution:
    """The current ``GenerationResolution`` in shared memory, written by the main process and read by workers.

    Layout: ``[version, size, multiple, num_scales, h0, w0, h1, w1, ...]``. A writer makes ``version`` odd while it
    writes and even when done, and a reader retries until it sees the same even version before and after copying
    (a sequence lock), so a batch never mixes an old size with a new schedule.
    """

    def __init__(self, size: int, schedule: Sequence[Sequence[int]], multiple: int) -> None:
        self.tensor = torch.zeros(4 + 2 * MAX_SCALES, dtype=torch.int64).share_memory_()
        self.tensor[2] = multiple
        self.plan: tuple[tuple[int, GenerationResolution], ...] = ()
        self.set(size, schedule)

    def set(self, size: int, schedule: Sequence[Sequence[int]]) -> None:
        """Make ``size`` and ``schedule`` current for every batch assembled from now on (batches without a plan)."""
        checked = _checked(size, schedule)
        flat = torch.tensor([value for scale in checked for value in scale], dtype=torch.int64)
        self.tensor[0] += 1
        self.tensor[1] = size
        self.tensor[3] = len(checked)
        self.tensor[4 : 4 + flat.numel()] = flat
        self.tensor[0] += 1

    def set_plan(self, plan: Sequence[tuple[int, int, Sequence[Sequence[int]]]]) -> None:
        """Fix the resolution of every training batch by its place in the stream: ``(first_batch, size, schedule)``
        entries, the first at batch 0, each in force from its ``first_batch`` (the micro-batch index counted from the
        start of training over all data epochs) until the next. A plan is copied into worker processes when they
        start, so it must be set before the loader's workers do; ``()`` removes it."""
        self.plan = self.checked_plan(plan)

    def checked_plan(
        self, plan: Sequence[tuple[int, int, Sequence[Sequence[int]]]]
    ) -> tuple[tuple[int, GenerationResolution], ...]:
        """``plan`` validated and sorted, as ``set_plan`` stores it."""
        entries = []
        for first, size, schedule in sorted(plan, key=lambda entry: entry[0]):
            checked = _checked(size, schedule)
            entries.append((int(first), GenerationResolution(size, checked, placeholder_count(checked, self.multiple))))
        starts = [first for first, _ in entries]
        if entries and starts[0] != 0:
            raise ValueError(f"a resolution plan starts at batch 0, got {starts[0]}")
        if len(set(starts)) != len(starts):
            raise ValueError(f"resolution plan entries must start at distinct batches, got {starts}")
        return tuple(entries)

    @property
    def multiple(self) -> int:
        return int(self.tensor[2])

    def at_batch(self, index: int | None) -> GenerationResolution:
        """The resolution of training batch ``index``: from the plan when there is one and the index is known,
        otherwise the current one (``get``)."""
        if not self.plan or index is None:
            return self.get()
        return [resolution for first, resolution in self.plan if first <= index][-1]

    def get(self) -> GenerationResolution:
        """A consistent snapshot of the current resolution."""
        while True:
            before = int(self.tensor[0])
            snapshot = self.tensor.clone()
            if before % 2 == 0 and int(self.tensor[0]) == before:
                break
        size, multiple, num_scales = (int(v) for v in snapshot[1:4])
        values = snapshot[4 : 4 + 2 * num_scales].tolist()
        schedule = tuple((values[2 * i], values[2 * i + 1]) for i in range(num_scales))
        return GenerationResolution(size, schedule, placeholder_count(schedule, multiple))


def _checked(size: int, schedule: Sequence[Sequence[int]]) -> tuple[tuple[int, int], ...]:
    checked = validate_schedule(schedule)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"generation size must be an int >= 1, got {size!r}")
    if len(checked) > MAX_SCALES:
        raise ValueError(f"a schedule may have at most {MAX_SCALES} scales, got {len(checked)}")
    return tuple(tuple(scale) for scale in checked)


class SharedCounters:
    """Per-reader counters in shared memory: one row per worker (row 0 when loading in the main process)."""

    def __init__(self, rows: int, columns: Sequence[str]) -> None:
        self.columns = tuple(columns)
        self.tensor = torch.zeros(max(1, rows), len(self.columns), dtype=torch.int64).share_memory_()

    def add(self, row: int, column: str, amount: int = 1) -> None:
        self.tensor[row, self.columns.index(column)] += amount

    def totals(self) -> dict[str, int]:
        return {name: int(value) for name, value in zip(self.columns, self.tensor.sum(dim=0).tolist())}

    def reset(self) -> None:
        self.tensor.zero_()
