"""The streaming dataset: shards -> samples -> shuffled, mixed, encoded, collated batches, a fixed number per rank.

How one reader (worker ``w`` of ``W`` on rank ``r`` of ``R``; the main process counts as worker 0 of 1) works:

* Shards. ``split`` (default): the reader owns every ``R*W``-th shard of each source, so ranks and workers see
  disjoint data; a training reader cycles through its shards forever, reshuffling their order each pass.
  ``resampled``: it draws shards at random with replacement from the whole source (for sources with fewer shards
  than readers; readers may then see the same samples).
* Randomness. One ``random.Random`` per reader and epoch, seeded from ``(seed, epoch, rank, worker)``: shard order,
  the shuffle buffer (webdataset's ``shuffle``), source mixing and random crops are reproducible for a given seed and
  epoch, and differ across readers and epochs. Validation always uses epoch 0 and no shuffling.
* Mixing. Several sources are interleaved by drawing the source of each sample with probability proportional to its
  ``weight``.
* Length. With ``num_batches`` set the readers of a rank share it (``num_batches // W`` each, the first
  ``num_batches % W`` readers one more): every rank yields exactly ``num_batches`` batches per epoch whatever its
  data, which DDP/FSDP collectives need, and ``len()`` reports it. This is webdataset's ``with_epoch`` on the loader,
  with the per-worker split done here. Without it (validation, single process) each reader makes one pass.
* Epochs. ``next_epoch`` is called by ``EpochLoader.__iter__`` in the main process; the epoch number sits in shared
  memory, so forked, spawned and persistent workers all start the new epoch with new seeds.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.filters import shuffle

from datamodules.collate import collate_samples
from datamodules.config import DataConfig
from datamodules.encoding import SampleEncoder
from datamodules.reading import DataQualityError, SkipTracker, decode_samples, iter_raw_samples
from datamodules.schema import Sample, SampleError
from datamodules.shared_state import SharedCounters, SharedGenerationResolution
from datamodules.sources import split_shards

MODE_KINDS = {"sft": ("understanding", "generation", "editing", "text"), "preference": ("preference",)}


@dataclass(frozen=True)
class ResolvedSource:
    """A source whose shard list has been resolved to URLs."""

    label: str
    urls: tuple[str, ...]
    weight: float


class ShardStream(IterableDataset):
    """Batches from WebDataset shards for one split; see the module docstring for the reading rules."""

    def __init__(
        self,
        sources: list[ResolvedSource],
        encoder: SampleEncoder,
        config: DataConfig,
        *,
        train: bool,
        num_batches: int | None,
        rank: int,
        world_size: int,
        num_workers: int,
        resolution: SharedGenerationResolution,
        counters: SharedCounters,
    ) -> None:
        if not sources:
            raise ValueError("a ShardStream needs at least one source")
        self.sources = sources
        self.encoder = encoder
        self.config = config
        self.train = train
        self.num_batches = num_batches
        self.rank = rank
        self.world_size = world_size
        self.num_workers = num_workers
        self.resolution = resolution
        self.counters = counters
        self.pad_id = encoder.token_ids.pad
        self.accepted_kinds = MODE_KINDS[config.mode]
        self.epoch = torch.zeros(1, dtype=torch.int64).share_memory_()
        self.started = False  # set by the loaders when first iterated (main process)
        readers = max(1, num_workers)
        for source in sources:  # fail in the main process, before any worker starts
            if not (train and config.shard_sampling == "resampled"):
                split_shards(source.urls, rank, world_size, readers - 1, readers, source.label)

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("a one-pass stream has no length")
        return self.num_batches

    def next_epoch(self) -> None:
        """Advance the epoch used to seed every reader (main process; visible to workers through shared memory)."""
        self.epoch += 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch.fill_(epoch)

    def _accept(self, sample: Sample) -> str | None:
        if sample.kind not in self.accepted_kinds:
            return f"kind {sample.kind!r} is not used in data.mode={self.config.mode!r} (uses {self.accepted_kinds})"
        return None

    def _pass_urls(self, source: ResolvedSource, rng: random.Random, worker: int, workers: int) -> list[str]:
        """The shards of one pass of this reader over ``source``."""
        if self.train and self.config.shard_sampling == "resampled":
            return [rng.choice(source.urls) for _ in source.urls]
        urls = split_shards(source.urls, self.rank, self.world_size, worker, workers, source.label)
        if self.train:
            rng.shuffle(urls)
        return urls

    def _source_samples(
        self, source: ResolvedSource, rng: random.Random, worker: int, workers: int, tracker: SkipTracker
    ) -> Iterator[tuple[str, Sample]]:
        endless = self.num_batches is not None
        while True:
            urls = self._pass_urls(source, rng, worker, workers)
            raw: Iterator[dict[str, Any]] = iter_raw_samples(urls, tracker)
            if self.train:
                raw = shuffle(self.config.shuffle_buffer, initial=self.config.shuffle_buffer, rng=rng)(raw)
            produced = 0
            for item in decode_samples(raw, tracker, self._accept):
                produced += 1
                yield item
            if not endless:
                return
            if produced == 0:
                raise DataQualityError(
                    f"{tracker.where}: a whole pass over {len(urls)} shard(s) of source {source.label!r} gave no "
                    f"usable sample; last problem: {tracker.last_reason or 'the shards are empty'}"
                )

    def _mixed_samples(
        self, rng: random.Random, worker: int, workers: int, tracker: SkipTracker
    ) -> Iterator[tuple[str, Sample]]:
        streams = [self._source_samples(source, rng, worker, workers, tracker) for source in self.sources]
        if len(streams) == 1 or self.num_batches is None:
            for stream in streams:
                yield from stream
            return
        weights = [source.weight for source in self.sources]
        while True:
            yield next(streams[rng.choices(range(len(streams)), weights)[0]])

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch = int(self.epoch[0]) if self.train else 0
        seed = int(np.random.SeedSequence([self.config.seed, epoch, self.rank, worker]).generate_state(1)[0])
        rng = random.Random(seed)
        split = "train" if self.train else "val"
        tracker = SkipTracker(
            f"{split} rank {self.rank} worker {worker}",
            self.config.max_skip_fraction,
            self.config.min_samples_before_skip_check,
            self.counters,
            row=worker,
        )
        quota = None
        if self.num_batches is not None:
            quota = self.num_batches // workers + (1 if worker < self.num_batches % workers else 0)
        samples = self._mixed_samples(rng, worker, workers, tracker)
        # the batch's index from the start of training: the DataLoader hands out its workers' batches in turn, so
        # this worker's n-th batch of the epoch is the epoch's (n * workers + worker)-th; loaders count epochs from 1
        first = max(epoch - 1, 0) * self.num_batches if self.train and self.num_batches is not None else None
        produced = 0
        while quota is None or produced < quota:
            index = None if first is None else first + produced * workers + worker
            resolution = self.resolution.at_batch(index)  # once per batch: a batch never mixes resolutions
            encoded = []
            for shard, sample in samples:
                try:
                    encoded.append(self.encoder.encode(sample, resolution, rng))
                except SampleError as error:
                    tracker.skip(shard, sample.key, str(error), already_read=True)
                    continue
                if len(encoded) == self.config.batch_size:
                    break
            if not encoded:
                break
            yield collate_samples(encoded, resolution, self.pad_id, "right", self.config.pad_to_multiple_of)
            produced += 1
        tracker.check()


class EpochLoader(DataLoader):
    """A DataLoader over a ``ShardStream`` that starts a new data epoch each time it is iterated."""

    def __iter__(self):  # type: ignore[override]
        self.dataset.next_epoch()
        self.dataset.started = True
        return super().__iter__()
