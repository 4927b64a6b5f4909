"""``ShardDataModule``: the LightningDataModule every stage uses to stream WebDataset shards.

    datamodule = ShardDataModule(DataConfig(train_sources=[{"shards": "data/gen-{000000..000015}.tar"}],
                                            batches_per_epoch=500), tokenizer)
    trainer.fit(model, datamodule=datamodule)

Equal batch counts: every rank yields exactly ``batches_per_epoch`` training batches per epoch (and ``val_batches``
validation batches when set), because the training streams never run dry (readers cycle over their shards) and are
cut at that count; ``len(train_dataloader())`` is ``batches_per_epoch``. An "epoch" is therefore a fixed number of
steps, not a pass over the data; set ``batches_per_epoch ~ samples / (batch_size * world_size)`` for roughly one pass.
Validation without ``val_batches`` makes one pass over the rank's shards, which is only allowed on a single process.

Generation resolution: ``set_generation_resolution(size, schedule)`` (for example from a resolution-schedule callback
at a step boundary) writes shared memory that the workers read once per batch, so it reaches forked, spawned and
persistent workers alike. It applies to batches assembled after the call; up to ``num_workers * prefetch_factor``
batches already prefetched keep the old one, and each batch says which resolution it has (``gen_size``,
``gen_schedule``), so the model must follow the batch, not the datamodule.

Checkpointing: ``state_dict`` holds the data epoch and the current resolution, so a resumed run keeps its
resolution. The training loader (``datamodules.resume.ResumableEpochLoader``) is resumable in Lightning's sense: its
own state, saved with the fit loop, is the number of batches of the current epoch already handed to training, and a
resumed fit replays that epoch's stream without those batches, so a resume is exact mid-epoch too.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import lightning
import torch

from datamodules.config import DataConfig, DataConfigError
from datamodules.encoding import SampleEncoder
from datamodules.reading import STAT_COLUMNS
from datamodules.shared_state import GenerationResolution, SharedCounters, SharedGenerationResolution
from datamodules.sources import resolve_shards
from datamodules.resume import ResumableEpochLoader, first_batch_of_step
from datamodules.stream import ResolvedSource, ShardStream
from vargpt.schedules import scale_schedule


def serial_tokenizer_worker(worker_id: int) -> None:
    """A data worker encodes one sample at a time, so the tokenizers library's own thread pool only competes with
    training for the cores; a forked worker has it switched off by the library, a spawned one does not (a 300-step
    generation SFT run with spawned workers took 79.1 s with it, 75.4 s without, 70.6 s forked). A user's own
    ``TOKENIZERS_PARALLELISM`` wins."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class ShardDataModule(lightning.LightningDataModule):
    """Training and validation loaders over WebDataset shards, for the ``sft`` or the ``preference`` mode."""

    def __init__(
        self,
        config: DataConfig | dict[str, Any],
        tokenizer: Any,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        super().__init__()
        self.config = config if isinstance(config, DataConfig) else DataConfig(**config)
        self.tokenizer = tokenizer
        self._rank = rank
        self._world_size = world_size
        schedule = self.config.generation_schedule or scale_schedule(self.config.generation_pn)
        self.resolution = SharedGenerationResolution(
            self.config.generation_size, [tuple(scale) for scale in schedule], self.config.placeholder_multiple
        )
        readers = max(1, self.config.num_workers)
        self.counters = {split: SharedCounters(readers, STAT_COLUMNS) for split in ("train", "val")}
        self.train_stream: ShardStream | None = None
        self.val_stream: ShardStream | None = None
        self._restored_epoch = 0

    def _rank_and_world_size(self) -> tuple[int, int]:
        if self._rank is not None and self._world_size is not None:
            return self._rank, self._world_size
        trainer = self.trainer
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def setup(self, stage: str | None = None) -> None:
        """Resolve the shard lists (clear errors for wrong patterns) and build the streams."""
        rank, world_size = self._rank_and_world_size()
        if not self.config.train_sources and stage in (None, "fit"):
            raise DataConfigError("data.train_sources is empty; give at least one source with 'shards'")
        if self.config.train_sources and self.train_stream is None:
            self.train_stream = self._stream(self.config.train_sources, "train", True, rank, world_size)
            self.train_stream.set_epoch(self._restored_epoch)
        if self.config.val_sources and self.val_stream is None:
            if self.config.val_batches is None and world_size > 1:
                raise DataConfigError(
                    f"data.val_batches must be set when training on {world_size} processes: every rank must run the "
                    "same number of validation batches"
                )
            self.val_stream = self._stream(self.config.val_sources, "val", False, rank, world_size)

    def _stream(self, sources: Sequence[Any], split: str, train: bool, rank: int, world_size: int) -> ShardStream:
        resolved = [
            ResolvedSource(
                source.label, tuple(resolve_shards(source.shards, f"data.{split}_sources[{index}] ({source.label})")),
                source.weight,
            )
            for index, source in enumerate(sources)
        ]
        num_workers = self.config.num_workers
        if not train:  # a small validation set should not fail for want of shards per worker
            per_rank = min(len(source.urls) for source in resolved) // world_size
            num_workers = min(num_workers, max(1, per_rank))
        return ShardStream(
            resolved,
            SampleEncoder(self.tokenizer, self.config, train=train),
            self.config,
            train=train,
            num_batches=self.config.batches_per_epoch if train else self.config.val_batches,
            rank=rank,
            world_size=world_size,
            num_workers=num_workers,
            resolution=self.resolution,
            counters=self.counters[split],
        )

    def _loader(
        self, stream: ShardStream, loader_class: type[torch.utils.data.DataLoader]
    ) -> torch.utils.data.DataLoader:
        workers = stream.num_workers
        return loader_class(
            stream,
            batch_size=None,  # the stream yields whole batches
            num_workers=workers,
            persistent_workers=workers > 0 and self.config.persistent_workers,
            prefetch_factor=self.config.prefetch_factor if workers > 0 else None,
            multiprocessing_context=self.config.worker_start_method if workers > 0 else None,
            worker_init_fn=serial_tokenizer_worker if workers > 0 else None,
        )

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        if self.train_stream is None:
            self.setup("fit")
        assert self.train_stream is not None
        return self._loader(self.train_stream, ResumableEpochLoader)

    def val_dataloader(self) -> torch.utils.data.DataLoader | list:
        if self.val_stream is None and self.config.val_sources:
            self.setup("validate")
        if self.val_stream is None:
            return []
        return self._loader(self.val_stream, torch.utils.data.DataLoader)

    def set_generation_resolution(self, size: int, schedule: Sequence[Sequence[int]]) -> None:
        """Use square ``size`` targets with ``schedule`` (its placeholder count follows) for batches assembled from
        now on, in this process and in every worker."""
        self.resolution.set(size, [tuple(scale) for scale in schedule])

    def set_generation_plan(self, plan: Sequence[tuple[int, int, Sequence[Sequence[int]]]]) -> None:
        """Fix each training batch's resolution by its index from the start of training (``(first_batch, size,
        schedule)`` entries, ``SharedGenerationResolution.set_plan``), so that which batches a switch reaches does not
        depend on how far the workers have read ahead. Workers copy the plan when they start: set it before the
        training loader is first iterated."""
        if plan and self.config.batches_per_epoch is None:
            raise DataConfigError("a resolution plan needs data.batches_per_epoch: a batch's index from the start of "
                                  "training is counted with it")
        stream = self.train_stream
        changed = self.resolution.checked_plan(plan) != self.resolution.plan
        if changed and stream is not None and stream.started and stream.num_workers > 0:
            raise RuntimeError("set_generation_plan with a new plan after the training loader's workers started: they "
                               "would not see it; set it before the fit (ResolutionSchedule does so in its setup hook)")
        self.resolution.set_plan(plan)

    def first_batch_of_step(self, step: int, accumulate: int = 1) -> int:
        """The index (from the start of training) of the first micro-batch of optimizer step ``step`` with this
        DataModule's ``batches_per_epoch`` (``datamodules.resume.first_batch_of_step``)."""
        return first_batch_of_step(step, accumulate, self.config.batches_per_epoch)

    @property
    def generation_resolution(self) -> GenerationResolution:
        return self.resolution.get()

    def skip_stats(self) -> dict[str, dict[str, int]]:
        """Samples read and skipped so far on this rank, per split, summed over workers."""
        return {split: counters.totals() for split, counters in self.counters.items()}

    def state_dict(self) -> dict[str, Any]:
        current = self.resolution.get()
        epoch = int(self.train_stream.epoch[0]) if self.train_stream is not None else self._restored_epoch
        return {
            "epoch": epoch,
            "generation_size": current.size,
            "generation_schedule": [list(scale) for scale in current.schedule],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored_epoch = int(state_dict["epoch"])
        if self.train_stream is not None:
            self.train_stream.set_epoch(self._restored_epoch)
        self.set_generation_resolution(state_dict["generation_size"], state_dict["generation_schedule"])
