"""The run config of ``train.py``: model, data, stage, trainer, ``init_from``, resolution phases, callbacks, output.

One YAML file per stage (``configs/quickstart/*.yaml``, ``configs/vargpt_v1_1/*.yaml``) fills ``RunConfig``. A file
may include others with ``_base_: path`` (or ``defaults: [path, ...]``), paths relative to the including file; the
including file wins. ``key.sub=value`` dotlist overrides are applied last. Everything is validated against the
dataclasses before any work starts: an unknown key is an error naming it and the valid keys, a bad value names its
field (``vargpt.config_io.dataclass_from_dict``). OmegaConf interpolations are resolved first, so a file can put every
path under ``root`` (``output_dir: ${root}/alignment``) and ``root=elsewhere`` moves the whole run. Trainer defaults
are the reference's (VARGPT §4.3).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from datamodules.config import DataConfig, DataConfigError
from vargpt.atomic import atomic_open
from vargpt.config import ConfigError, VARGPTConfig
from vargpt.config_io import config_to_dict, dataclass_from_dict, load_model_config

STRATEGIES = ("auto", "ddp", "fsdp", "deepspeed")
SHARDING_STRATEGIES = ("fsdp", "deepspeed")  # those that split parameters across ranks
COMPILE_TARGETS = ("llm", "vision", "decoder")  # the repeated blocks vargpt.compile compiles
COMPILE_FALLBACKS = ("error", "eager")
INCLUDE_KEYS = ("_base_", "defaults")
RESOLVED_CONFIG_FILE = "config.yaml"


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass
class StrategyConfig:
    """The Lightning strategy and the options of each kind (only those of ``name`` are used)."""

    name: str = "auto"  # "auto" | "ddp" | "fsdp" | "deepspeed"
    process_group_backend: str | None = None  # None = Lightning's choice (nccl on GPU, gloo on CPU)
    find_unused_parameters: bool = True  # ddp: a batch without generation targets (or without a dropped condition)
    # leaves trainable decoder parameters without gradients; set false only for data where every batch uses all
    sharding_strategy: str = "FULL_SHARD"  # fsdp: ZeRO-3-like, as the reference's DeepSpeed ZeRO-3 (VARGPT §4.3)
    state_dict_type: str = "sharded"  # fsdp: one checkpoint shard per rank; "full" gathers on rank 0
    cpu_offload: bool = False  # fsdp
    deepspeed_stage: int = 3  # deepspeed: ds_z3_config.json (VARGPT §4.3)
    offload_optimizer: bool = False  # deepspeed

    def __post_init__(self) -> None:
        _require(self.name in STRATEGIES, f"trainer.strategy.name must be one of {STRATEGIES}, got {self.name!r}")
        _require(
            self.state_dict_type in ("sharded", "full"),
            f"trainer.strategy.state_dict_type must be 'sharded' or 'full', got {self.state_dict_type!r}",
        )
        _require(
            self.deepspeed_stage in (1, 2, 3),
            f"trainer.strategy.deepspeed_stage must be 1, 2 or 3, got {self.deepspeed_stage}",
        )


def process_count(devices: int | str, num_nodes: int) -> int | None:
    """Training processes of a run (``devices`` x ``num_nodes``); None while ``devices`` is a string ("auto", a device
    list): Lightning decides then, from what it finds."""
    return devices * num_nodes if isinstance(devices, int) else None


@dataclass
class CompileConfig:
    """``torch.compile`` of the transformer blocks for training steps (``vargpt.compile``); off by default."""

    enabled: bool = False
    targets: list[str] = field(default_factory=lambda: list(COMPILE_TARGETS))  # "llm", "vision", "decoder"
    backend: str = "inductor"
    mode: str | None = None  # torch.compile's: null (its default), "reduce-overhead", "max-autotune", ...
    dynamic: bool | None = True  # sequence lengths vary by batch: symbolic shapes, not a recompile per length
    if_unavailable: str = "error"  # when compiling fails (no C++ compiler for Inductor on CPU): "error" | "eager"

    def __post_init__(self) -> None:
        check_compile_targets(self.targets, self.if_unavailable)
        _require(bool(self.backend), "trainer.compile.backend must not be empty")


def check_compile_targets(targets: Any, if_unavailable: str) -> None:
    """``trainer.compile.targets`` (distinct names among ``COMPILE_TARGETS``) and ``if_unavailable``: the checks the
    config and ``vargpt.compile.compile_regions`` share."""
    names = list(targets) if isinstance(targets, (list, tuple)) else []
    targets_ok = bool(names) and all(isinstance(name, str) and name in COMPILE_TARGETS for name in names)
    _require(
        targets_ok and len(set(names)) == len(names),
        f"trainer.compile.targets must be a list of distinct names among {COMPILE_TARGETS}, got {targets!r}",
    )
    _require(
        if_unavailable in COMPILE_FALLBACKS,
        f"trainer.compile.if_unavailable must be one of {COMPILE_FALLBACKS}, got {if_unavailable!r}",
    )


@dataclass
class TrainerConfig:
    """Arguments of ``lightning.Trainer`` that a run chooses."""

    accelerator: str = "auto"
    devices: int | str = "auto"
    num_nodes: int = 1
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    precision: str = "bf16-mixed"  # bf16: true (VARGPT §4.3)
    max_steps: int = 1000
    gradient_clip_val: float | None = 1.0  # HF Trainer default max_grad_norm (VARGPT §4.3)
    accumulate_grad_batches: int = 2  # gradient_accumulation_steps: 2 (VARGPT §4.3)
    log_every_n_steps: int = 10  # logging_steps: 10 (VARGPT §4.3)
    val_every_n_steps: int | None = None  # None = no validation during training
    limit_val_batches: int | None = None
    checkpoint_every_n_steps: int = 1000  # save_steps: 1000 (VARGPT §4.3)
    keep_checkpoints: int = 2  # step checkpoints kept besides last.ckpt; -1 keeps all
    progress_bar: bool = True
    deterministic: bool = False
    compile: CompileConfig = field(default_factory=CompileConfig)

    def __post_init__(self) -> None:
        for name in ("max_steps", "accumulate_grad_batches", "log_every_n_steps", "checkpoint_every_n_steps"):
            _require(getattr(self, name) >= 1, f"trainer.{name} must be >= 1, got {getattr(self, name)}")
        _require(
            self.gradient_clip_val is None or self.gradient_clip_val > 0,
            f"trainer.gradient_clip_val must be null or > 0, got {self.gradient_clip_val}",
        )
        _require(self.keep_checkpoints >= -1, f"trainer.keep_checkpoints must be >= -1, got {self.keep_checkpoints}")


@dataclass
class InitFromConfig:
    """Where the weights start: a previous stage's export folder, or the released/pretrained parts (VARGPT §4.5).

    All empty = a fresh random model (the embedded default's first stages)."""

    export: str | None = None  # a folder written by save_pretrained (or the released VARGPT-v1.1 folder)
    qwen2_vl: str | None = None  # Qwen2-VL model folder (safetensors)
    infinity: str | None = None  # Infinity-2B .pth
    bsq_vae: str | None = None  # BSQ-VAE .pth; alone (without qwen2_vl/infinity): only the tokenizer is loaded
    vision: str | None = None  # a vision tower folder (vargpt.quickstart.vision) loaded into an otherwise fresh model
    allow_missing: list[str] = field(default_factory=list)  # regexes of parameters that may start fresh

    def __post_init__(self) -> None:
        parts = [self.qwen2_vl, self.infinity]
        _require(
            self.export is None or not any(parts + [self.bsq_vae]),
            "init_from: give either export or parts (qwen2_vl, infinity, bsq_vae), not both",
        )
        _require(
            all(parts) or not any(parts),
            "init_from: qwen2_vl and infinity go together (with bsq_vae), got only one of them",
        )
        _require(
            self.vision is None or not (self.export or self.qwen2_vl),
            "init_from.vision loads a vision tower into a fresh model; an export or qwen2_vl brings its own",
        )

    @property
    def is_fresh(self) -> bool:
        return not any((self.export, self.qwen2_vl, self.infinity, self.bsq_vae, self.vision))


@dataclass
class ResolutionPhaseConfig:
    """From ``step`` on, generation targets are ``size`` px with exactly one of ``pn``, ``schedule`` or ``stride``."""

    step: int = 0
    size: int = 256
    pn: str | None = None
    schedule: list[list[int]] | None = None
    stride: int | None = None


@dataclass
class SamplesConfig:
    """Periodic sample grids (``callbacks.samples.SampleGrid``); ``every_n_steps: 0`` turns them off."""

    every_n_steps: int = 0
    prompts: list[str] = field(default_factory=list)
    seed: int = 0
    cfg: float = 3.0  # VARGPT §2.4
    temperature: float = 0.5  # VARGPT §2.4
    top_p: float = 0.97  # VARGPT §2.4

    def __post_init__(self) -> None:
        _require(self.every_n_steps >= 0, f"callbacks.samples.every_n_steps must be >= 0, got {self.every_n_steps}")
        _require(
            self.every_n_steps == 0 or bool(self.prompts),
            "callbacks.samples.prompts must not be empty when every_n_steps > 0",
        )


@dataclass
class ThroughputConfig:
    """Samples/s, tokens/s and MFU (``callbacks.throughput.Throughput``)."""

    enabled: bool = True
    peak_flops: float = 989e12  # per device: H100 SXM dense bf16 (NVIDIA datasheet); set to your hardware
    window: int = 10  # steps averaged


def _check_sampling(where: str, cfg: float, temperature: float, top_p: float) -> None:
    _require(cfg >= 0, f"{where}.cfg must be >= 0, got {cfg}")
    _require(temperature > 0, f"{where}.temperature must be > 0, got {temperature}")
    _require(0 < top_p <= 1, f"{where}.top_p must be in (0, 1], got {top_p}")


@dataclass
class ShapesEvalConfig:
    """The shapes benchmark's generation score during training (``callbacks.evaluation.ShapesEvaluation``): fixed
    held-out prompts of the six GenEval task types, scored exactly; ``every_n_steps: 0`` turns it off."""

    every_n_steps: int = 0
    per_task: int = 2  # prompts per task type
    seed: int = 0
    size: int | None = None  # generated side in pixels; None = the model's native size
    batch_size: int = 12
    cfg: float = 3.0  # VARGPT §2.4
    temperature: float = 0.5  # VARGPT §2.4
    top_p: float = 0.97  # VARGPT §2.4

    def __post_init__(self) -> None:
        where = "callbacks.shapes_eval"
        _require(self.every_n_steps >= 0, f"{where}.every_n_steps must be >= 0, got {self.every_n_steps}")
        _require(self.per_task >= 1, f"{where}.per_task must be >= 1, got {self.per_task}")
        _require(self.batch_size >= 1, f"{where}.batch_size must be >= 1, got {self.batch_size}")
        _require(self.size is None or self.size >= 1, f"{where}.size must be null or >= 1, got {self.size}")
        _check_sampling(where, self.cfg, self.temperature, self.top_p)


@dataclass
class FIDEvalConfig:
    """FID (and KID) of images generated from fixed prompts against a reference image folder during training
    (``callbacks.evaluation.FIDEvaluation``); ``every_n_steps: 0`` turns it off. Prompt i is generated with seed
    ``seed + i``; give the prompts inline or as a text file, one per line (n = their number)."""

    every_n_steps: int = 0
    reference: str | None = None  # folder of reference images (e.g. an MJHQ-30K category)
    inception_weights: str | None = None  # torch-fidelity's Inception weights file (never downloaded)
    prompts: list[str] = field(default_factory=list)
    prompts_file: str | None = None
    seed: int = 0
    resolution: int | None = None  # both sets resized (bicubic) to this side; None = the generated size
    batch_size: int = 8
    kid: bool = True
    cfg: float = 3.0  # VARGPT §2.4
    temperature: float = 0.5  # VARGPT §2.4
    top_p: float = 0.97  # VARGPT §2.4

    def __post_init__(self) -> None:
        where = "callbacks.fid_eval"
        _require(self.every_n_steps >= 0, f"{where}.every_n_steps must be >= 0, got {self.every_n_steps}")
        _require(self.batch_size >= 1, f"{where}.batch_size must be >= 1, got {self.batch_size}")
        _require(
            self.resolution is None or self.resolution >= 1,
            f"{where}.resolution must be null or >= 1, got {self.resolution}",
        )
        _require(
            not (self.prompts and self.prompts_file), f"{where}: give prompts or prompts_file, not both"
        )
        _check_sampling(where, self.cfg, self.temperature, self.top_p)
        if self.every_n_steps:
            for name in ("reference", "inception_weights"):
                _require(bool(getattr(self, name)), f"{where}.{name} must be set when every_n_steps > 0")
            _require(
                bool(self.prompts) or bool(self.prompts_file),
                f"{where}.prompts (or prompts_file) must be set when every_n_steps > 0",
            )
            _require(
                self.prompts_file is not None or len(self.prompts) >= 2,
                f"{where}.prompts needs at least 2 prompts (FID of one image is undefined), got {len(self.prompts)}",
            )

    def prompt_list(self) -> list[str]:
        """The prompts, read from ``prompts_file`` (one per non-empty line) when that is given."""
        if self.prompts_file is None:
            return list(self.prompts)
        path = Path(self.prompts_file)
        if not path.is_file():
            raise ConfigError(f"callbacks.fid_eval.prompts_file not found: {path}")
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        _require(
            len(prompts) >= 2,
            f"callbacks.fid_eval.prompts_file {path} needs at least 2 prompts (FID of one image), got {len(prompts)}",
        )
        return prompts


@dataclass
class CallbacksConfig:
    samples: SamplesConfig = field(default_factory=SamplesConfig)
    throughput: ThroughputConfig = field(default_factory=ThroughputConfig)
    shapes_eval: ShapesEvalConfig = field(default_factory=ShapesEvalConfig)
    fid_eval: FIDEvalConfig = field(default_factory=FIDEvalConfig)


@dataclass
class RunConfig:
    """A whole training run of one stage. ``stage`` holds a ``vargpt.stages.config.StageConfig``."""

    root: str | None = None  # a free path variable: other fields may say ``${root}/...`` (the quickstart's run folder)
    model: str | dict[str, Any] = ""  # a model YAML path (relative to the working directory) or its fields inline;
    # with init_from.export it wins over the export's own config (empty: the export's, train.export_model_config)
    text_tokenizer: str | None = None  # tokenizer folder; None = the one in init_from.export / init_from.qwen2_vl
    data: DataConfig = field(default_factory=DataConfig)
    stage: Any = None
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    init_from: InitFromConfig = field(default_factory=InitFromConfig)
    reference_from: str | None = None  # DPO: the frozen reference's export; None = the policy's init weights
    resolution_phases: list[ResolutionPhaseConfig] = field(default_factory=list)
    callbacks: CallbacksConfig = field(default_factory=CallbacksConfig)
    output_dir: str = "runs/default"

    def __post_init__(self) -> None:
        self.resolution_phases = [
            phase
            if isinstance(phase, ResolutionPhaseConfig)
            else dataclass_from_dict(ResolutionPhaseConfig, phase, f"resolution_phases[{index}]")
            for index, phase in enumerate(self.resolution_phases)
        ]
        _require(bool(self.output_dir), "output_dir must not be empty")

    def model_config(self) -> VARGPTConfig:
        """The ``VARGPTConfig`` named by ``model`` (a YAML path or an inline mapping)."""
        if isinstance(self.model, Mapping):
            return dataclass_from_dict(VARGPTConfig, self.model, where="model")
        _require(
            bool(self.model),
            "model must be a model YAML path or an inline mapping of VARGPTConfig fields (it may be empty only when "
            "init_from.export gives the model config)",
        )
        return load_model_config(self.model)


def stage_config_class() -> type:
    """``vargpt.stages.config.StageConfig`` (imported when needed: the stages import Lightning and the model)."""
    from vargpt.stages.config import StageConfig

    return StageConfig


def _load_with_includes(path: Path, seen: tuple[Path, ...] = ()) -> DictConfig:
    """One YAML file merged over its ``_base_`` / ``defaults`` includes (recursively; cycles are an error)."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"config include cycle: {' -> '.join(str(p) for p in (*seen, path))}")
    if not path.is_file():
        where = f" (included from {seen[-1]})" if seen else ""
        raise ConfigError(f"config file not found: {path}{where}")
    try:
        loaded = OmegaConf.load(path)
    except yaml.YAMLError as error:
        raise ConfigError(f"config {path} is not valid YAML: {error}") from error
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"config {path} must be a mapping at the top level")
    merged = OmegaConf.create({})
    for key in INCLUDE_KEYS:
        if key not in loaded:
            continue
        includes = loaded[key]
        includes = [includes] if isinstance(includes, str) else list(includes)
        for include in includes:
            merged = OmegaConf.merge(merged, _load_with_includes(path.parent / str(include), (*seen, path)))
        loaded.pop(key)
    return OmegaConf.merge(merged, loaded)


def load_run_dict(path: str | os.PathLike[str], overrides: Iterable[str] = ()) -> dict[str, Any]:
    """The run YAML with its includes and ``key=value`` overrides merged and resolved, as plain containers."""
    try:
        merged = OmegaConf.merge(_load_with_includes(Path(path)), OmegaConf.from_dotlist(list(overrides)))
        data = OmegaConf.to_container(merged, resolve=True)
    except OmegaConfBaseException as error:
        raise ConfigError(f"cannot read config {path}: {error}") from error
    assert isinstance(data, dict)
    return data


def run_config_from_dict(data: Mapping[str, Any]) -> RunConfig:
    """Validate a run mapping into ``RunConfig`` (with its ``StageConfig``); errors name the key or field."""
    data = dict(data)
    stage = data.pop("stage", None)
    if stage is None:
        raise ConfigError("stage is missing: a run config needs a stage section (vargpt.stages.config.StageConfig)")
    try:
        run = dataclass_from_dict(RunConfig, data, where="config")
    except DataConfigError as error:
        raise ConfigError(f"data: {error}") from error
    run.stage = dataclass_from_dict(stage_config_class(), stage, where="stage")
    _require(
        not (run.trainer.compile.enabled and run.stage.stage == "tokenizer"),
        "trainer.compile applies to the VARGPT stages' transformer blocks; the tokenizer stage has none (set "
        "trainer.compile.enabled=false)",
    )
    if run.model or run.init_from.export is None:  # empty: the model config of init_from.export
        run.model_config()
    return run


def load_run_config(path: str | os.PathLike[str], overrides: Iterable[str] = ()) -> RunConfig:
    """Read, merge and validate a run config file; nothing else happens (no data, no model)."""
    return run_config_from_dict(load_run_dict(path, overrides))


def run_config_to_dict(run: RunConfig) -> dict[str, Any]:
    """The resolved run as plain containers (what ``save_resolved_config`` writes)."""
    stage = run.stage
    data = config_to_dict(dataclasses.replace(run, stage=None))
    data["stage"] = config_to_dict(stage) if dataclasses.is_dataclass(stage) else stage
    return data


def save_resolved_config(run: RunConfig, folder: str | os.PathLike[str]) -> Path:
    """Write the resolved run config as ``config.yaml`` into ``folder`` (it re-loads to the same ``RunConfig``).

    Atomic, and safe for several writers at once (every process of a ``torchrun`` launch writes it before Lightning
    knows its rank; ``vargpt.atomic``): each renames its own temporary file into place; the copies are the same."""
    target = Path(folder) / RESOLVED_CONFIG_FILE
    with atomic_open(target) as handle:
        handle.write(OmegaConf.to_yaml(OmegaConf.create(run_config_to_dict(run))))
    return target
