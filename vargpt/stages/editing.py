"""Stage 5, editing SFT (ARCHITECTURE §3): (instruction, input image, target image) samples, trained like stage 3
(decoder + projectors + start condition). The input image reaches the LLM through the ViT; the decoder's
cross-attention context therefore carries it.
"""

from __future__ import annotations

from vargpt.stages.base import VARGPTStage


class EditingSFT(VARGPTStage):
    """Instruction-based image editing fine-tuning."""

    stage_name = "editing_sft"
