"""What a model must offer to be evaluated: two small protocols, so scorers never depend on our model class.

The unified model (or any other) satisfies them by having methods of these shapes; nothing needs to inherit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from PIL import Image


@runtime_checkable
class ImageGenerator(Protocol):
    """Text-to-image generation with one explicit seed per image (GenEval, FID, CLIP score)."""

    def generate_images(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[Image.Image]:
        """Return one image per (prompt, seed) pair, in order; the same pair must give the same image."""
        ...


@runtime_checkable
class ChatModel(Protocol):
    """Greedy answering of one user turn about images (the understanding benchmarks)."""

    def chat(self, messages: Sequence[dict[str, str]], images: Sequence[Image.Image], max_new_tokens: int) -> str:
        """Answer the conversation ``messages`` (``{"role", "content"}``) with ``images`` placed before the text
        of the first user turn; decoding is greedy and stops after ``max_new_tokens``."""
        ...
