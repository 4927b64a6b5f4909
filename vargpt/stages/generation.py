"""Stage 3, generation SFT (VARGPT §4.1): the decoder, both projectors and the start condition train.

Gradients still flow through the frozen LLM to the input projector (VARGPT §4.1). The resolution schedule
256 -> 512 px is the data side's (``ResolutionSchedule`` callback); the stage follows each batch's schedule.
"""

from __future__ import annotations

from vargpt.stages.base import VARGPTStage


class GenerationSFT(VARGPTStage):
    """Text-to-image (and mixed editing) supervised fine-tuning."""

    stage_name = "generation_sft"
