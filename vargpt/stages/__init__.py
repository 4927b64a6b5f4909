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
from vargpt.stages.alignment import Alignment
from vargpt.stages.dpo import DPO, ReferenceLogProbs, precompute_reference_logps
from vargpt.stages.editing import EditingSFT
from vargpt.stages.generation import GenerationSFT
from vargpt.stages.tokenizer import TokenizerStage
from vargpt.stages.understanding import UnderstandingSFT

STAGES: dict[str, type] = {
    "tokenizer": TokenizerStage,
    "alignment": Alignment,
    "understanding_sft": UnderstandingSFT,
    "generation_sft": GenerationSFT,
    "dpo": DPO,
    "editing_sft": EditingSFT,
}

__all__ = [
    "DEFAULT_TRAINABLE", "DPO", "GROUP_NAMES", "STAGES", "STAGE_NAMES", "Alignment", "DPOConfig", "EditingSFT",
    "GenerationSFT", "OptimizerConfig", "ReferenceLogProbs", "ScheduleConfig", "StageConfig", "StageModuleBase",
    "TokenizerLossConfig", "TokenizerStage", "UnderstandingSFT", "VARGPTStage", "precompute_reference_logps",
]
