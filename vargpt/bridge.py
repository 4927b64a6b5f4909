"""The generation bridge between the LLM and the visual decoder (VARGPT §1.4).

* ``in_projector``: decoder token space (C) -> LLM space (H): the image tokens enter the LLM through it.
* ``out_projector``: LLM space (H) -> decoder space (C): used twice, on the LLM outputs at the image positions and
  on the hidden states of the prompt, which become the decoder's cross-attention context.
* ``start_condition``: the learned start-of-image vector (the one row of the reference's ``sos_embedding`` that is
  ever read, index ``<|image_gen_start|>``). The decoder turns it into the AdaLN condition and the start token; it
  carries no prompt information (VARGPT §8.1.7).

Both projectors are the reference's ``GenPatchMerger`` MLP: Linear(in, in) -> GELU -> Linear(in, out); its unused
LayerNorm ``ln_q`` is not built.
"""

from __future__ import annotations

import torch
from torch import nn


class ProjectorMLP(nn.Module):
    """Linear(in, in) -> GELU (exact erf) -> Linear(in, out)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, in_features)
        self.fc2 = nn.Linear(in_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(nn.functional.gelu(self.fc1(x)))


class GenerationBridge(nn.Module):
    """In/out projectors and the start-of-image condition vector."""

    def __init__(self, decoder_width: int, llm_hidden: int, condition_dim: int) -> None:
        super().__init__()
        self.in_projector = ProjectorMLP(decoder_width, llm_hidden)
        self.out_projector = ProjectorMLP(llm_hidden, decoder_width)
        self.start_condition = nn.Parameter(torch.randn(condition_dim) * condition_dim**-0.5)
