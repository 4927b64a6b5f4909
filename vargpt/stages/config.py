"""Configuration of one training stage: what trains, how it is optimised, and the stage-specific losses.

Defaults are the reference's: AdamW lr 5e-5, betas (0.9, 0.999), no weight decay, cosine schedule with 10% linear
warmup (VARGPT §4.3); the trainable groups of each stage follow VARGPT §4.1 (ARCHITECTURE §3); DPO beta 0.1, sigmoid
loss, no label smoothing, no SFT term (VARGPT §3.4).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from vargpt.config import ConfigError, distinct_scale_indices

STAGE_NAMES = ("tokenizer", "alignment", "understanding_sft", "generation_sft", "dpo", "editing_sft")

# Module groups of VARGPT that a stage may train (vargpt.stages.freezing maps each to its modules).
GROUP_NAMES = (
    "vision", "merger", "llm", "lm_head", "in_projector", "out_projector", "start_condition", "decoder", "tokenizer",
)

_GENERATION_GROUPS = ["decoder", "in_projector", "out_projector", "start_condition"]
# VARGPT §4.1: stage 1 trains the projectors + start condition, stage 2 the LLM + lm_head (the paper's figure adds
# the understanding merger: list "merger" to train it), stage 3 / DPO / editing the decoder + projectors + start.
DEFAULT_TRAINABLE: dict[str, list[str]] = {
    "tokenizer": ["tokenizer"],
    "alignment": ["in_projector", "out_projector", "start_condition"],
    "understanding_sft": ["llm", "lm_head"],
    "generation_sft": list(_GENERATION_GROUPS),
    "dpo": list(_GENERATION_GROUPS),
    "editing_sft": list(_GENERATION_GROUPS),
}

OPTIMIZERS = ("adamw", "muon")
# VARGPT's input and output layers, which Muon leaves to AdamW as its authors do embeddings and heads.
MUON_EXCLUDE = ("*lm_head", "*decoder.word_embed", "*decoder.head.proj", "*decoder.sequential.out")

DPO_LOSSES = ("sigmoid", "ipo", "hinge")
DPO_CORRUPTIONS = ("step", "sample", "none")  # see DPOConfig


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass
class OptimizerConfig:
    """AdamW (or Muon with AdamW, ``name``); weight decay applies to matrices only (never to biases, norms or other
    1-D parameters)."""

    lr: float = 5e-5  # learning_rate (VARGPT §4.3)
    betas: tuple[float, float] = (0.9, 0.999)  # HF AdamW defaults (VARGPT §4.3)
    weight_decay: float = 0.0  # HF default (VARGPT §4.3)
    eps: float = 1e-8
    fused: bool | None = None  # None: fused kernels where available (CUDA parameters)
    # group -> factor on lr for that group's parameters (e.g. {vision: 3}: the vision tower learns 3x faster); groups
    # not named keep lr. Each must be one of the stage's trainable groups.
    lr_multipliers: dict[str, float] = field(default_factory=dict)
    # "adamw", or "muon": Muon on the hidden matrices (the weights of nn.Linear layers whose module name matches no
    # muon_exclude pattern), AdamW with lr, betas, eps and weight_decay on every other parameter (vargpt/optim.py).
    # Muon's updates are scaled to AdamW's RMS, so the same lr serves both.
    name: str = "adamw"
    muon_momentum: float = 0.95  # Nesterov momentum of the Muon updates
    # fnmatch patterns of module names kept on AdamW: the input and output layers (text logits, bits in, bit logits)
    muon_exclude: list[str] = field(default_factory=lambda: list(MUON_EXCLUDE))
    # under DDP each process orthogonalises a share of the matrices and one all-gather shares the updates (the same
    # result, the Newton-Schulz work divided by the processes); false: every process orthogonalises every matrix
    muon_shard: bool = True

    def __post_init__(self) -> None:
        _require(self.name in OPTIMIZERS, f"optimizer.name must be one of {list(OPTIMIZERS)}, got {self.name!r}")
        _require(0.0 <= self.muon_momentum < 1.0,
                 f"optimizer.muon_momentum must be in [0, 1), got {self.muon_momentum}")
        _require(
            isinstance(self.muon_exclude, (list, tuple)) and all(isinstance(p, str) for p in self.muon_exclude),
            f"optimizer.muon_exclude must be a list of module-name patterns, got {self.muon_exclude!r}",
        )
        self.muon_exclude = list(self.muon_exclude)
        _require(isinstance(self.muon_shard, bool),
                 f"optimizer.muon_shard must be true or false, got {self.muon_shard!r}")
        self.betas = tuple(float(beta) for beta in self.betas)  # type: ignore[assignment]
        _require(self.lr > 0, f"optimizer.lr must be > 0, got {self.lr}")
        _require(
            len(self.betas) == 2 and all(0.0 <= beta < 1.0 for beta in self.betas),
            f"optimizer.betas must be two numbers in [0, 1), got {self.betas}",
        )
        _require(self.weight_decay >= 0, f"optimizer.weight_decay must be >= 0, got {self.weight_decay}")
        _require(self.eps > 0, f"optimizer.eps must be > 0, got {self.eps}")
        _require(self.fused in (None, True, False), f"optimizer.fused must be true, false or null, got {self.fused!r}")
        _require(
            isinstance(self.lr_multipliers, dict),
            f"optimizer.lr_multipliers must be a mapping of group -> factor, got {type(self.lr_multipliers).__name__}",
        )
        self.lr_multipliers = dict(self.lr_multipliers)
        for group, factor in self.lr_multipliers.items():
            _require(group in GROUP_NAMES, f"optimizer.lr_multipliers has unknown group {group!r}; valid groups: "
                                           f"{list(GROUP_NAMES)}")
            _require(
                isinstance(factor, (int, float)) and not isinstance(factor, bool) and math.isfinite(factor)
                and factor > 0,
                f"optimizer.lr_multipliers.{group} must be a number > 0, got {factor!r}",
            )
            self.lr_multipliers[group] = float(factor)


@dataclass
class ScheduleConfig:
    """Linear warmup then cosine decay to ``min_lr_ratio * lr``, stepped once per optimizer step.

    ``total_steps=None`` takes the trainer's estimated number of optimizer steps.
    """

    warmup_ratio: float = 0.1  # warmup_ratio (VARGPT §4.3)
    total_steps: int | None = None
    min_lr_ratio: float = 0.0  # HF cosine decays to 0 (VARGPT §4.3)

    def __post_init__(self) -> None:
        _require(0.0 <= self.warmup_ratio < 1.0, f"schedule.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        _require(
            self.total_steps is None or (isinstance(self.total_steps, int) and self.total_steps >= 1),
            f"schedule.total_steps must be a positive int or null, got {self.total_steps!r}",
        )
        _require(0.0 <= self.min_lr_ratio <= 1.0, f"schedule.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


@dataclass
class DPOConfig:
    """Direct preference optimisation over image log-probabilities (VARGPT §3.4).

    ``corruption`` chooses the bitwise self-correction / condition dropout of DPO inputs: "step" draws them per
    training step (policy and resident reference share the draw), "sample" derives them from the sample key and
    ``StageConfig.seed`` only (one forward per pair; the same inputs every epoch, so reference log-probs can be
    computed ahead), "none" uses the clean targets. ``precompute_reference`` needs "sample" or "none".
    """

    beta: float = 0.1  # pref_beta (VARGPT §3.4)
    loss: str = "sigmoid"  # pref_loss (VARGPT §3.4)
    label_smoothing: float = 0.0  # dpo_label_smoothing (VARGPT §3.4)
    precompute_reference: bool = False
    sft_weight: float = 0.0  # pref_ftx: weight of the chosen image's bitwise CE (VARGPT §3.4)
    corruption: str = "step"
    # Which scales' bits count in the image log-probs (0 = the 1 x 1 scale); None = every scale, the reference's. The
    # last scales hold most of the bits and the preference then mostly compares their texture; the coarse scales,
    # where layout, colours and counts are decided, can be given the whole preference.
    scales: list[int] | None = None

    def __post_init__(self) -> None:
        _require(self.beta > 0, f"dpo.beta must be > 0, got {self.beta}")
        _require(self.loss in DPO_LOSSES, f"dpo.loss must be one of {DPO_LOSSES}, got {self.loss!r}")
        _require(
            0.0 <= self.label_smoothing < 0.5,
            f"dpo.label_smoothing must be in [0, 0.5), got {self.label_smoothing}",
        )
        _require(self.sft_weight >= 0, f"dpo.sft_weight must be >= 0, got {self.sft_weight}")
        _require(
            self.corruption in DPO_CORRUPTIONS,
            f"dpo.corruption must be one of {DPO_CORRUPTIONS}, got {self.corruption!r}",
        )
        _require(
            self.scales is None or (distinct_scale_indices(self.scales) and len(self.scales) > 0),
            f"dpo.scales must be null or a non-empty list of distinct scale indices >= 0, got {self.scales!r}",
        )
        _require(
            not (self.precompute_reference and self.corruption == "step"),
            "dpo.precompute_reference needs inputs that depend on the sample only: set dpo.corruption to "
            "'sample' or 'none' (with 'step' the corruption changes every step)",
        )


@dataclass
class TokenizerLossConfig:
    """Weights of the BSQ-VAE training terms (INFINITY §1.4; BSQ-style entropy regulariser)."""

    l1: float = 1.0
    l2: float = 1.0
    gradient: float = 0.0  # L1 between the images' spatial finite differences (a perceptual-free sharpness term)
    commitment: float = 0.25  # || features - f_hat.detach() ||^2
    per_bit_entropy: float = 0.01  # mean binary entropy of each bit (pushes codes away from the cube's faces)
    codebook_entropy: float = 0.01  # minus the entropy of each bit's batch-mean probability (all bits in use)
    inv_temperature: float = 100.0  # p = sigmoid(4 u / sqrt(d) * inv_temperature) (INFINITY §1.4)

    def __post_init__(self) -> None:
        for name in ("l1", "l2", "gradient", "commitment", "per_bit_entropy", "codebook_entropy"):
            _require(getattr(self, name) >= 0, f"tokenizer_losses.{name} must be >= 0, got {getattr(self, name)}")
        _require(self.l1 + self.l2 > 0, "tokenizer_losses: l1 + l2 must be > 0 (a reconstruction term is needed)")
        _require(self.inv_temperature > 0, f"tokenizer_losses.inv_temperature must be > 0, got {self.inv_temperature}")


def _build(kind: type, value: Any, name: str) -> Any:
    if isinstance(value, kind):
        return value
    _require(isinstance(value, dict), f"{name} must be a mapping of {kind.__name__} fields, got {type(value).__name__}")
    try:
        return kind(**value)
    except TypeError as error:
        raise ConfigError(f"{name}: {error}") from error


@dataclass
class StageConfig:
    """One training stage. ``trainable=None`` takes the stage's default groups (``DEFAULT_TRAINABLE``)."""

    stage: str = "generation_sft"
    trainable: list[str] | None = None
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    seed: int = 0
    image_loss_weight: float | None = None  # None: the model's lambda (3.0, VARGPT §3.2)
    activation_checkpointing: bool = False
    dpo: DPOConfig = field(default_factory=DPOConfig)
    tokenizer_losses: TokenizerLossConfig = field(default_factory=TokenizerLossConfig)

    def __post_init__(self) -> None:
        _require(self.stage in STAGE_NAMES, f"stage must be one of {STAGE_NAMES}, got {self.stage!r}")
        self.optimizer = _build(OptimizerConfig, self.optimizer, "optimizer")
        self.schedule = _build(ScheduleConfig, self.schedule, "schedule")
        self.dpo = _build(DPOConfig, self.dpo, "dpo")
        self.tokenizer_losses = _build(TokenizerLossConfig, self.tokenizer_losses, "tokenizer_losses")
        if self.trainable is None:
            self.trainable = list(DEFAULT_TRAINABLE[self.stage])
        self.trainable = list(self.trainable)
        unknown = [name for name in self.trainable if name not in GROUP_NAMES]
        _require(not unknown, f"trainable has unknown group(s) {unknown}; valid groups: {list(GROUP_NAMES)}")
        _require(len(set(self.trainable)) == len(self.trainable), f"trainable lists a group twice: {self.trainable}")
        _require(self.trainable != [], "trainable is empty: a stage must train at least one group")
        if self.stage == "tokenizer":
            _require(self.trainable == ["tokenizer"], f"the tokenizer stage trains ['tokenizer'], got {self.trainable}")
        else:
            _require(
                "tokenizer" not in self.trainable,
                f"trainable of stage {self.stage!r} lists 'tokenizer': the image tokenizer stays frozen inside "
                "VARGPT (train it in the 'tokenizer' stage)",
            )
        idle = [group for group in self.optimizer.lr_multipliers if group not in self.trainable]
        _require(not idle, f"optimizer.lr_multipliers names group(s) {idle} that stage {self.stage!r} does not train "
                           f"(trainable: {self.trainable})")
        _require(isinstance(self.seed, int) and self.seed >= 0, f"seed must be an int >= 0, got {self.seed!r}")
        _require(
            self.image_loss_weight is None or self.image_loss_weight >= 0,
            f"image_loss_weight must be >= 0 or null, got {self.image_loss_weight}",
        )
