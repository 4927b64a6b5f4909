"""The embedded default's pipeline config: data, text tokenizer, the stage files in order, evaluation.

``configs/quickstart/pipeline.yaml`` fills ``QuickstartConfig`` (``_base_`` includes and ``key=value`` overrides as
for run configs); every stage is a run config of ``train.py`` in the same folder (``<stage>.yaml``) whose paths sit
under ``${root}``, so the pipeline's ``root`` moves the whole run. Validated before any work starts.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from datamodules.shapes.questions import check_questions_per_image
from datamodules.shapes.samples import SAMPLE_KINDS
from datamodules.shapes.write import DEFAULT_SAMPLES_PER_SHARD
from vargpt.config import ConfigError
from vargpt.config_io import dataclass_from_dict
from vargpt.quickstart.preferences import ModelPreferenceSettings
from vargpt.quickstart.vision import VisionPretrainingSettings
from vargpt.run_config import RunConfig, load_run_dict, process_count
from vargpt.stages.config import STAGE_NAMES

DEFAULT_PIPELINE = Path("configs") / "quickstart" / "pipeline.yaml"
DATA_DIR = "data"  # <root>/data/<kind>/: the data step's shards, and the DPO pairs drawn from the model
VISION_DIR = "vision"  # <root>/vision/: the pretrained vision tower, when a stage starts from it (init_from.vision)
MODEL_PREFERENCE_KIND = "model_preference"


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass
class DataStepConfig:
    """Shapes-world training shards (``datamodules.shapes.write``): ``count_per_kind`` samples of every kind, or
    ``counts[kind]`` for a kind named there."""

    size: int = 32  # px: the resolution of the last generation phase (the first phase downsamples)
    count_per_kind: int = 4000
    counts: dict[str, int] = field(default_factory=dict)  # kind -> samples, overriding count_per_kind
    seed: int = 0
    questions_per_image: int = 1  # questions per understanding image (a multi-turn chat), 1 .. one per type
    samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD  # every training process (x data worker) reads shards of its own

    def __post_init__(self) -> None:
        _require(self.size >= 8, f"data.size must be >= 8 px, got {self.size}")
        _require(self.count_per_kind >= 1, f"data.count_per_kind must be >= 1, got {self.count_per_kind}")
        for kind, count in self.counts.items():
            _require(kind in SAMPLE_KINDS, f"data.counts names an unknown kind {kind!r}; choose from {SAMPLE_KINDS}")
            _require(
                isinstance(count, int) and not isinstance(count, bool) and count >= 1,
                f"data.counts.{kind} must be an integer >= 1, got {count!r}",
            )
        _require(self.samples_per_shard >= 1, f"data.samples_per_shard must be >= 1, got {self.samples_per_shard}")
        try:
            check_questions_per_image(self.questions_per_image, "data.questions_per_image")
        except ValueError as error:
            raise ConfigError(str(error)) from None

    def count(self, kind: str) -> int:
        """Samples of ``kind`` the data step writes."""
        return self.counts.get(kind, self.count_per_kind)


@dataclass
class TextTokenizerStepConfig:
    """A byte-level BPE trained on the shapes world's texts, plus Qwen2-VL's and VARGPT's special tokens."""

    vocab_size: int = 448  # learned tokens before the 17 special ones: must agree with the model's vocab_size
    corpus_per_kind: int = 1000  # samples of each kind whose texts train it

    def __post_init__(self) -> None:
        _require(self.vocab_size >= 256, f"text_tokenizer.vocab_size must be >= 256, got {self.vocab_size}")
        _require(self.corpus_per_kind >= 1, f"text_tokenizer.corpus_per_kind must be >= 1, got {self.corpus_per_kind}")


@dataclass
class EvaluationStepConfig:
    """The shapes benchmark after the last stage, and the DPO comparison (generation SFT vs DPO export).

    ``per_task`` prompts of each of the six task types (34 -> 204 prompts, the issue's >= 200 for the DPO interval);
    sampling settings ``None`` keep the model's (cfg 3, temperature 0.5, top-p 0.97, VARGPT §2.4).
    """

    per_task: int = 34
    samples_per_prompt: int = 1
    questions_per_type: int = 50
    edits_per_operation: int = 25
    batch_size: int = 68
    seed: int = 0
    cfg: float | None = None
    temperature: float | None = None
    top_p: float | None = None
    bootstrap_resamples: int = 2000  # paired, stratified by task: the DPO delta's 95% interval
    grid_per_task: int = 8  # images per task type in the report's sample grids

    def __post_init__(self) -> None:
        for name in ("per_task", "samples_per_prompt", "questions_per_type", "edits_per_operation", "batch_size",
                     "bootstrap_resamples", "grid_per_task"):
            _require(getattr(self, name) >= 1, f"evaluation.{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class QuickstartConfig:
    """The whole embedded-default run."""

    root: str = "runs/quickstart"
    stages: list[str] = field(default_factory=lambda: list(STAGE_NAMES))
    overrides: dict[str, list[str]] = field(default_factory=dict)  # stage -> extra train.py key=value overrides
    data: DataStepConfig = field(default_factory=DataStepConfig)
    text_tokenizer: TextTokenizerStepConfig = field(default_factory=TextTokenizerStepConfig)
    evaluation: EvaluationStepConfig = field(default_factory=EvaluationStepConfig)
    # DPO pairs from the generation SFT model's own wrong images, built before DPO when its config reads them
    model_preferences: ModelPreferenceSettings = field(default_factory=ModelPreferenceSettings)
    # the vision tower's pretraining, run first when a stage starts from <root>/vision (init_from.vision)
    vision: VisionPretrainingSettings = field(default_factory=VisionPretrainingSettings)
    stage_dir: str = ""  # where <stage>.yaml lives; set from the pipeline file's folder when empty

    def __post_init__(self) -> None:
        _require(bool(self.root), "root must not be empty")
        unknown = [stage for stage in self.stages if stage not in STAGE_NAMES]
        _require(not unknown, f"stages: unknown stage(s) {unknown}; valid: {list(STAGE_NAMES)}")
        _require(list(self.stages) == sorted(self.stages, key=STAGE_NAMES.index),
                 f"stages must keep the pipeline order {list(STAGE_NAMES)}, got {self.stages}")
        _require(bool(self.stages) and self.stages[-1] != "tokenizer",
                 f"stages must end with a VARGPT stage (the evaluation needs a model), got {self.stages}")
        stray = [stage for stage in self.overrides if stage not in self.stages]
        _require(not stray, f"overrides: {stray} are not among the stages {self.stages}")

    def stage_file(self, stage: str) -> Path:
        return Path(self.stage_dir) / f"{stage}.yaml"

    def stage_arguments(self, stage: str) -> list[str]:
        """The ``key=value`` overrides ``train.py`` gets for ``stage``: the root, then the pipeline's own."""
        return [f"root={self.root}", *self.overrides.get(stage, [])]


def load_quickstart_config(
    path: str | os.PathLike[str] = DEFAULT_PIPELINE, overrides: Iterable[str] = ()
) -> QuickstartConfig:
    """Read, merge and validate the pipeline file, and each stage's run config with its overrides (so a typo in
    any stage file fails now, not an hour into the run)."""
    from vargpt.run_config import load_run_config

    path = Path(path)
    config = dataclass_from_dict(QuickstartConfig, load_run_dict(path, overrides), where="quickstart")
    if not config.stage_dir:
        config.stage_dir = str(path.parent)
    for stage in config.stages:
        run = load_run_config(config.stage_file(stage), config.stage_arguments(stage))
        _require(run.stage.stage == stage,
                 f"{config.stage_file(stage)} runs stage {run.stage.stage!r}, but the pipeline expects {stage!r}")
        _check_enough_shards(config, stage, run)
    return config


def model_preference_dir(config: QuickstartConfig) -> Path:
    """Where the pipeline writes the DPO pairs of ``vargpt.quickstart.preferences``."""
    return Path(config.root) / DATA_DIR / MODEL_PREFERENCE_KIND


def vision_dir(config: QuickstartConfig) -> Path:
    """Where the pipeline writes the pretrained vision tower of ``vargpt.quickstart.vision``."""
    return Path(config.root) / VISION_DIR


def starts_from_pipeline_vision(config: QuickstartConfig, run: RunConfig) -> bool:
    """Whether ``run`` loads the vision tower the pipeline pretrains (its ``init_from.vision`` names that folder)."""
    return run.init_from.vision is not None and Path(run.init_from.vision).resolve() == vision_dir(config).resolve()


def reads_model_preferences(config: QuickstartConfig, run: RunConfig) -> bool:
    """Whether ``run`` (the DPO stage) trains on the pairs the pipeline builds from the generation SFT model: a source
    names their folder, or a glob / brace pattern of shards in it."""
    folder = model_preference_dir(config).resolve()
    for source in run.data.train_sources:
        patterns = [source.shards] if isinstance(source.shards, str) else source.shards
        resolved = [Path(pattern).resolve() for pattern in patterns]
        if any(folder in (path, path.parent) for path in resolved):
            return True
    return False


def _check_enough_shards(config: QuickstartConfig, stage: str, run: RunConfig) -> None:
    """Each (process, data worker) of a stage reads its own shards of every kind: the data step must write enough.
    ``trainer.devices: auto`` counts as one process here (the datamodule checks again once the devices are known)."""
    readers = (process_count(run.trainer.devices, run.trainer.num_nodes) or 1) * max(1, run.data.num_workers)
    if reads_model_preferences(config, run):
        _require(
            run.data.shard_sampling != "split" or config.model_preferences.shards >= readers,
            f"{stage} reads with {readers} data readers (trainer.devices x num_nodes x data.num_workers) but "
            f"model_preferences.shards is {config.model_preferences.shards}: raise it",
        )
        return
    kind = min(SAMPLE_KINDS, key=config.data.count)  # the kind with the fewest shards
    shards = math.ceil(config.data.count(kind) / config.data.samples_per_shard)
    _require(
        run.data.shard_sampling != "split" or shards >= readers,
        f"{stage} reads with {readers} data readers (trainer.devices x num_nodes x data.num_workers) but the data step "
        f"writes {shards} shard(s) of {kind} samples ({config.data.count(kind)}, "
        f"data.samples_per_shard={config.data.samples_per_shard}): lower data.samples_per_shard",
    )
