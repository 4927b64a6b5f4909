"""The ViT's patch embedding as the matrix product it is.

Qwen2-VL's ``PatchEmbed`` projects each flattened (channels x temporal x height x width) patch with an ``nn.Conv3d``
whose kernel equals its stride: every output sees one patch and nothing else, so the convolution is a linear map of
the flattened patch. The convolution kernels are slow at that shape (on this project's CPU about half the forward and
backward time of the embedding is saved by a matrix product, and on some GPU / dtype pairs the convolution is reported
orders of magnitude slower). ``LinearPatchEmbed`` keeps the ``Conv3d`` and its parameters (``patch_embed.proj.weight``:
checkpoints, key maps and the optimizer see the same tensors) and computes its forward with ``F.linear`` on the
weight reshaped to (embed_dim, channels x temporal x height x width), which is how the convolution lays out a patch.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from transformers.models.qwen2_vl.modeling_qwen2_vl import PatchEmbed


class LinearPatchEmbed(PatchEmbed):
    """``PatchEmbed`` with the same parameters, computed as one matrix product."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        weight = self.proj.weight
        patches = hidden_states.reshape(-1, weight[0].numel()).to(dtype=weight.dtype)
        return F.linear(patches, weight.reshape(weight.shape[0], -1), self.proj.bias)


def is_patchwise(conv: nn.Module) -> bool:
    """Whether ``conv`` is a ``Conv3d`` that reads each patch alone: kernel = stride, no padding, dilation or
    groups (then it is a linear map of the flattened patch)."""
    return (isinstance(conv, nn.Conv3d) and tuple(conv.kernel_size) == tuple(conv.stride)
            and all(p == 0 for p in conv.padding) and all(d == 1 for d in conv.dilation) and conv.groups == 1
            and conv.padding_mode == "zeros")


def use_linear_patch_embed(visual: nn.Module) -> bool:
    """Compute ``visual.patch_embed`` (a Qwen2-VL vision tower's) as ``LinearPatchEmbed``, in place, when its
    projection reads each patch alone; the module's parameters and state-dict keys are unchanged. Returns whether
    it did (a tower whose embedding is something else is left as it is)."""
    embed = getattr(visual, "patch_embed", None)
    if isinstance(embed, LinearPatchEmbed):
        return True
    if type(embed) is not PatchEmbed or not is_patchwise(embed.proj):
        return False
    with torch.device("meta"):  # allocates and draws nothing: a model's random init stays the same
        linear = LinearPatchEmbed(embed.patch_size, embed.temporal_patch_size, embed.in_channels, embed.embed_dim)
    linear.proj = embed.proj  # the tower's own Conv3d and parameters, not the placeholder's
    visual.patch_embed = linear
    return True
