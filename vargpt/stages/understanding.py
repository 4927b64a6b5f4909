"""Stage 2, understanding SFT (VARGPT §4.1): the LLM and lm_head train (add the "merger" group to train the
understanding projector too, as the paper's figure shows; the reference's code froze it).

Generation samples mixed into this stage train the LLM through the frozen decoder and projectors (VARGPT §4.1).
"""

from __future__ import annotations

from vargpt.stages.base import VARGPTStage


class UnderstandingSFT(VARGPTStage):
    """Instruction tuning on conversations (plus some generation samples)."""

    stage_name = "understanding_sft"
