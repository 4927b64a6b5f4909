"""Conditioning of the decoder (INFINITY §3.2): text tokens -> pooled condition + cross-attention memory.

Standalone Infinity takes T5 token features (B, T, condition_dim) with a padding mask and computes
* ``cond`` (B, D): RMSNorm, then an attentive pool (one learned query per head). It drives every AdaLN and is
  the start token of the image sequence;
* ``context`` (B, T, D): the same normalised tokens through a per-token MLP; the blocks cross-attend to it.
VARGPT keeps the pool for its start-of-image vector and replaces the context by projected LLM hidden states.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vargpt.decoder.attention import attention, key_padding_mask, merge_heads, split_heads


@dataclass
class DecoderCondition:
    """What the blocks are conditioned on, for a batch of B samples."""

    cond: torch.Tensor  # (B, D) pooled condition: AdaLN input and start token
    context: torch.Tensor  # (B, T, Cc) cross-attention memory (padded)
    context_mask: torch.Tensor  # (B, T) bool, True for real tokens

    def __post_init__(self) -> None:
        batch = self.cond.shape[0]
        if self.cond.ndim != 2 or self.context.ndim != 3 or self.context_mask.shape != self.context.shape[:2]:
            raise ValueError(
                f"DecoderCondition needs cond (B, D), context (B, T, Cc) and context_mask (B, T); got "
                f"{tuple(self.cond.shape)}, {tuple(self.context.shape)}, {tuple(self.context_mask.shape)}"
            )
        if self.context.shape[0] != batch:
            raise ValueError(f"cond has batch {batch} but context has batch {self.context.shape[0]}")

    @property
    def batch_size(self) -> int:
        return self.cond.shape[0]


def concat_conditions(first: DecoderCondition, second: DecoderCondition) -> DecoderCondition:
    """Stack two conditions along the batch (e.g. conditional then unconditional rows for CFG), padding T."""
    length = max(first.context.shape[1], second.context.shape[1])

    def pad(condition: DecoderCondition) -> tuple[torch.Tensor, torch.Tensor]:
        extra = length - condition.context.shape[1]
        return F.pad(condition.context, (0, 0, 0, extra)), F.pad(condition.context_mask, (0, extra), value=False)

    (context_a, mask_a), (context_b, mask_b) = pad(first), pad(second)
    return DecoderCondition(
        cond=torch.cat((first.cond, second.cond)),
        context=torch.cat((context_a, context_b)),
        context_mask=torch.cat((mask_a, mask_b)),
    )


class RMSNorm(nn.Module):
    """RMSNorm with a learnable weight, computed in fp32 (the reference's `FastRMSNorm`)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()
        return normed.to(x.dtype)


class AttentivePool(nn.Module):
    """One learned query per head attends over the valid tokens; the heads are concatenated and projected.

    Keys come from ``kv`` without bias, values with ``v_bias``; the softmax scale is 1/sqrt(width / heads).
    """

    def __init__(self, condition_dim: int, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.query = nn.Parameter(torch.zeros(1, heads, width // heads))
        self.kv = nn.Linear(condition_dim, 2 * width, bias=False)
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.proj = nn.Linear(width, width)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """tokens (B, T, condition_dim), mask (B, T) bool -> (B, width)."""
        bias = torch.cat((torch.zeros_like(self.v_bias), self.v_bias))
        k, v = F.linear(tokens, self.kv.weight, bias).chunk(2, dim=-1)
        k, v = split_heads(k, self.heads), split_heads(v, self.heads)
        query = self.query.to(k.dtype).unsqueeze(2).expand(tokens.shape[0], -1, -1, -1)  # (B, H, 1, c)
        padding = key_padding_mask(mask)
        pooled = attention(query, k, v, padding, k.shape[-1] ** -0.5)
        return self.proj(merge_heads(pooled)).squeeze(1)
