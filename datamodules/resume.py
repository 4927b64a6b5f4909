"""Mid-epoch resume of the training stream: ``ResumableEpochLoader`` counts the batches it hands out in the current
data epoch and, restored from that count, replays the epoch's stream and drops the batches already trained on.

Why the count is enough: a reader's stream is a pure function of (seed, epoch, rank, worker) and of the generation
resolution each batch was assembled at, and a DataLoader returns its workers' batches in a fixed round-robin order.
So re-reading the interrupted epoch and discarding its first ``consumed`` batches gives exactly the batches the
interrupted run would have trained on next, with any ``num_workers``. The skipped batches are read and encoded again
(their random crops advance the readers' generators), which costs data loading time only, no training.

Resolution switches: the loader also records the resolution of every batch it handed out in the epoch (as runs), and
with ``num_workers=0`` the replay re-assembles each skipped batch at its recorded resolution, so a switch inside the
interrupted epoch replays exactly too. With workers, batches are assembled ahead of time (``prefetch_factor``), so
which batches a switch reaches already depends on timing in the uninterrupted run; the replay then reads the skipped
batches at the resolution the run was restored to.

Lightning treats a loader with ``state_dict`` / ``load_state_dict`` as resumable: it saves the loader's state in the
checkpoint's fit-loop state and loads it into the new loader before the first ``iter()`` of a resumed fit, while it
restores its own batch counters (``batch_idx`` goes on from ``consumed``, and the epoch still ends after
``batches_per_epoch`` batches). So the replay must drop exactly ``consumed`` batches, no more and no fewer.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from datamodules.stream import EpochLoader


def first_batch_of_step(step: int, accumulate: int, batches_per_epoch: int) -> int:
    """The index, counted from the start of training over all data epochs, of the first micro-batch of optimizer
    step ``step``: Lightning steps after every ``accumulate`` micro-batches and at the end of each data epoch."""
    per_epoch = -(-batches_per_epoch // accumulate)
    epochs, rest = divmod(step, per_epoch)
    return epochs * batches_per_epoch + rest * accumulate


@dataclass
class EpochPosition:
    """How far the training loop got in data epoch ``epoch``: ``consumed`` batches handed out, whose generation
    resolutions were ``resolutions`` (runs of ``[count, size, schedule]`` in order)."""

    epoch: int
    consumed: int = 0
    resolutions: list[list[Any]] = field(default_factory=list)

    def record(self, batch: dict[str, Any]) -> None:
        """Count one batch handed to the training loop, with the resolution it says it has."""
        self.consumed += 1
        size, schedule = batch.get("gen_size"), batch.get("gen_schedule")
        last = self.resolutions[-1] if self.resolutions else None
        if last is not None and last[1] == size and last[2] == schedule:
            last[0] += 1
        else:
            self.resolutions.append([1, size, schedule])

    def resolution_of_each_batch(self) -> list[tuple[Any, Any]]:
        """(size, schedule) of batch 0, 1, ... ``consumed - 1`` of the epoch."""
        return [(size, schedule) for count, size, schedule in self.resolutions for _ in range(count)]

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "consumed": self.consumed, "resolutions": [list(run) for run in self.resolutions]}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> EpochPosition:
        return cls(int(state["epoch"]), int(state["consumed"]), [list(run) for run in state.get("resolutions", [])])


class ResumableEpochLoader(EpochLoader):
    """An ``EpochLoader`` over a ``ShardStream`` that knows its position in the epoch and can resume from one.

    ``state_dict()`` is the ``EpochPosition`` of the epoch being read. ``load_state_dict(state)`` arranges that the
    next ``iter()`` reads epoch ``state['epoch']`` again and drops its first ``state['consumed']`` batches; a position
    at the end of its epoch (``consumed == len(self)``) just makes the next ``iter()`` start the following epoch.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.position: EpochPosition | None = None
        self._replay: EpochPosition | None = None

    def state_dict(self) -> dict[str, Any]:
        """The current epoch's position (before any ``iter()``: the stream's epoch, nothing consumed)."""
        position = self.position or self._replay or EpochPosition(int(self.dataset.epoch[0]), len(self))
        return position.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume at ``state_dict`` (an ``EpochPosition`` state) on the next ``iter()``."""
        position = EpochPosition.from_state_dict(state_dict)
        if not 0 <= position.consumed <= len(self):
            raise ValueError(f"data position: {position.consumed} batches consumed in epoch {position.epoch}, but an "
                             f"epoch has {len(self)} (data.batches_per_epoch changed since the checkpoint?)")
        if position.consumed == len(self):
            self.dataset.set_epoch(position.epoch)
            self._replay = None
            return
        self.dataset.set_epoch(position.epoch - 1)  # iter() advances to the interrupted epoch itself
        self._replay = position

    def __iter__(self) -> Iterator[dict[str, Any]]:  # type: ignore[override]
        iterator = super().__iter__()
        self.position = EpochPosition(int(self.dataset.epoch[0]))
        replay, self._replay = self._replay, None
        if replay is not None and replay.consumed:
            self._skip(iterator, replay)
        return self._counted(iterator, self.position)

    def _skip(self, iterator: Iterator[dict[str, Any]], replay: EpochPosition) -> None:
        """Read and drop the ``replay.consumed`` batches the interrupted run trained on."""
        resolution = self.dataset.resolution
        current = resolution.get()
        planned = replay.resolution_of_each_batch() if self.num_workers == 0 else []
        for index in range(replay.consumed):
            if index < len(planned) and planned[index][0] is not None:
                resolution.set(*planned[index])  # this next() assembles the batch: at the resolution it had then
            batch = next(iterator, None)
            if batch is None:
                raise RuntimeError(f"data epoch {replay.epoch} ended after {self.position.consumed} batches while "
                                   f"skipping the {replay.consumed} the checkpoint had consumed")
            self.position.record(batch)
        resolution.set(current.size, current.schedule)

    @staticmethod
    def _counted(iterator: Iterator[dict[str, Any]], position: EpochPosition) -> Iterator[dict[str, Any]]:
        """``iterator``'s batches, each recorded in its epoch's ``position`` as it is handed out."""
        for batch in iterator:
            position.record(batch)
            yield batch
