"""Training stages: one LightningModule per stage over the same VARGPT components (ARCHITECTURE §3)."""

from vargpt.stages.base import StageModuleBase, VARGPTStage
from vargpt.stages.config import (
    DEFAULT_TRAINABLE,
    GROUP_NAMES,
    STAGE_NAMES,
    DPOConfig,
    OptimizerConfig,
    ScheduleConfig,
    StageConfig,
    TokenizerLossConfig,
)
from vargpt.stages.generation import GenerationSFT

STAGES: dict[str, type] = {
    "generation_sft": GenerationSFT,
}

__all__ = [
    "DEFAULT_TRAINABLE", "GROUP_NAMES", "STAGES", "STAGE_NAMES", "DPOConfig", "GenerationSFT", "OptimizerConfig",
    "ScheduleConfig", "StageConfig", "StageModuleBase", "TokenizerLossConfig", "VARGPTStage",
]
