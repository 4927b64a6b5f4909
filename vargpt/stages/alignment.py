"""Stage 1, alignment (VARGPT §4.1): only the in/out projectors and the start condition train.

LLM, ViT and decoder stay frozen; the image loss reaches the input projector through the frozen LLM.
"""

from __future__ import annotations

from vargpt.stages.base import VARGPTStage


class Alignment(VARGPTStage):
    """Aligns the LLM's hidden space with the decoder's on generation pairs."""

    stage_name = "alignment"
