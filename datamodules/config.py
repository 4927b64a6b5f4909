"""Dataclass configs for the data pipeline (sources, batching, images, tokenization, robustness).

Numbers default to the reference's values (VARGPT §1.3, §5) with a comment saying where they come from; the embedded
default and the tests override them from YAML or in code. Validation happens in ``__post_init__`` so a bad value
fails when the config is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MODES = ("sft", "preference")
SHARD_SAMPLING = ("split", "resampled")
WORKER_START_METHODS = ("fork", "forkserver", "spawn")
LABEL_MODES = ("assistant", "reference_compat")


class DataConfigError(ValueError):
    """A data config value is invalid; the message names the field and what is allowed."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise DataConfigError(message)


@dataclass
class SourceConfig:
    """One stream of shards: a brace pattern (``data/gen-{000000..000099}.tar``), a directory of ``.tar`` files, a
    single shard, or a list of any of these; ``weight`` is its share when several sources are mixed."""

    shards: str | list[str] = ""
    weight: float = 1.0
    name: str = ""

    def __post_init__(self) -> None:
        _require(self.weight > 0, f"source {self.label!r}: weight must be > 0, got {self.weight}")

    @property
    def label(self) -> str:
        return self.name or (self.shards if isinstance(self.shards, str) else f"{len(self.shards)} shard patterns")


@dataclass
class DataConfig:
    """Everything the ``ShardDataModule`` needs besides the tokenizer."""

    train_sources: list[SourceConfig] = field(default_factory=list)
    val_sources: list[SourceConfig] = field(default_factory=list)
    mode: str = "sft"  # "sft": understanding/generation/editing/text samples; "preference": chosen/rejected pairs
    batch_size: int = 1  # per rank (VARGPT §4.3: per_device_train_batch_size 1)
    batches_per_epoch: int = 1000  # per rank; every rank yields exactly this many training batches per epoch
    val_batches: int | None = None  # per rank; None = one pass over the validation shards (single process only)
    num_workers: int = 2
    persistent_workers: bool = True
    # how DataLoader workers start: None = the platform's default (fork on Linux). Forking a training process whose
    # other threads (DDP's gloo loops, OpenMP) run Python can hang the worker for good (CPython 3.11 waits in the
    # child for a lock the fork copied held); "spawn" / "forkserver" start workers from a clean process
    worker_start_method: str | None = None
    prefetch_factor: int = 2
    shard_sampling: str = "split"  # "split": disjoint shards per rank and worker; "resampled": random with replacement
    shuffle_buffer: int = 1000  # raw (encoded) samples held for shuffling per worker, in training; costs their bytes
    seed: int = 0
    generation_size: int = 512  # square side of generation targets (VARGPT §1.7: 512 px in stage 3)
    generation_pn: str = "0.25M"  # scale schedule preset for generation_size (VARGPT §1.7: 0.25M at 512 px)
    generation_schedule: list[list[int]] | None = None  # explicit (h, w) scales; overrides generation_pn (tiny VAEs)
    placeholder_multiple: int = 128  # generation placeholders are padded up to a multiple of this (VARGPT §1.7)
    resize_ratio: float = 1.125  # shorter side -> round(1.125 * size) before cropping (VARGPT §5)
    understanding_min_pixels: int = 56 * 56  # Qwen2VLImageProcessor class default (VARGPT §1.3)
    understanding_max_pixels: int = 512 * 512  # LLaMA-Factory image_resolution in training (VARGPT §1.3)
    label_mode: str = "assistant"  # or "reference_compat" (VARGPT §3.2)
    system_prompt: str | None = "You are a helpful assistant."  # LLaMA-Factory qwen2_vl default system (VARGPT §2.2)
    max_length: int = 8192  # cutoff_len in training (VARGPT §5); longer samples are skipped, not truncated
    pad_to_multiple_of: int = 8  # LLaMA-Factory collator (VARGPT §3.2)
    max_skip_fraction: float = 0.01  # skipped / read samples in one worker above this stops the run
    min_samples_before_skip_check: int = 200  # the fraction is checked once a worker has read this many samples

    def __post_init__(self) -> None:
        self.train_sources = [s if isinstance(s, SourceConfig) else SourceConfig(**s) for s in self.train_sources]
        self.val_sources = [s if isinstance(s, SourceConfig) else SourceConfig(**s) for s in self.val_sources]
        _require(self.mode in MODES, f"data.mode must be one of {MODES}, got {self.mode!r}")
        _require(
            self.shard_sampling in SHARD_SAMPLING,
            f"data.shard_sampling must be one of {SHARD_SAMPLING}, got {self.shard_sampling!r}",
        )
        _require(
            self.label_mode in LABEL_MODES, f"data.label_mode must be one of {LABEL_MODES}, got {self.label_mode!r}"
        )
        for name in ("batch_size", "batches_per_epoch", "generation_size", "placeholder_multiple", "max_length"):
            _require(getattr(self, name) >= 1, f"data.{name} must be >= 1, got {getattr(self, name)}")
        _require(
            self.val_batches is None or self.val_batches >= 1,
            f"data.val_batches must be None or >= 1, got {self.val_batches}",
        )
        _require(self.num_workers >= 0, f"data.num_workers must be >= 0, got {self.num_workers}")
        _require(
            self.worker_start_method is None or self.worker_start_method in WORKER_START_METHODS,
            f"data.worker_start_method must be null or one of {WORKER_START_METHODS}, got {self.worker_start_method!r}",
        )
        _require(self.shuffle_buffer >= 1, f"data.shuffle_buffer must be >= 1, got {self.shuffle_buffer}")
        _require(self.resize_ratio >= 1.0, f"data.resize_ratio must be >= 1, got {self.resize_ratio}")
        _require(
            0.0 <= self.max_skip_fraction <= 1.0,
            f"data.max_skip_fraction must be in [0, 1], got {self.max_skip_fraction}",
        )
        _require(
            0 < self.understanding_min_pixels <= self.understanding_max_pixels,
            f"data.understanding_min_pixels ({self.understanding_min_pixels}) must be in (0, understanding_max_pixels "
            f"({self.understanding_max_pixels})]",
        )
