"""The bitwise output head and its loss (INFINITY §4).

Instead of a 2^d-way softmax, every token predicts its d bits independently: the head gives 2 logits per bit,
``logits[..., 2i]`` for "bit i is 0" (code -1/sqrt(d)) and ``logits[..., 2i + 1]`` for "bit i is 1". The loss is a
2-way cross-entropy per bit, averaged over the bits; scales are weighted so that each scale's share of the loss is
proportional to sqrt(h_k * w_k) (token weight w_k proportional to 1 / sqrt(h_k * w_k), summing to 1 over tokens).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vargpt.schedules import validate_schedule


class BitHead(nn.Module):
    """AdaLN (scale, then shift, from the raw pooled condition) -> Linear(C, 2d), in fp32."""

    def __init__(self, width: int, condition_width: int, bits: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.adaln = nn.Linear(condition_width, 2 * width)
        self.proj = nn.Linear(width, 2 * bits)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x (B, L, C), cond (B, D) -> fp32 logits (B, L, 2d)."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            modulation = F.linear(F.silu(cond.float()), self.adaln.weight.float(), self.adaln.bias.float())
            scale, shift = modulation.unflatten(-1, (2, -1)).unsqueeze(1).unbind(2)
            normed = F.layer_norm(x.float(), (x.shape[-1],), eps=self.eps) * (1 + scale) + shift
            return F.linear(normed, self.proj.weight.float(), self.proj.bias.float())


def bit_logits_to_probs(logits: torch.Tensor) -> torch.Tensor:
    """(..., 2d) logits -> (..., d) probability that each bit is 1."""
    pairs = logits.float().unflatten(-1, (-1, 2))
    return torch.sigmoid(pairs[..., 1] - pairs[..., 0])


def scale_loss_weights(schedule: Sequence[Sequence[int]], device: torch.device | str | None = None) -> torch.Tensor:
    """(L,) token weights: 1 / sqrt(h_k * w_k) for the tokens of scale k, normalised to sum to 1."""
    sizes = [h * w for h, w in validate_schedule(schedule)]
    weights = torch.cat([torch.full((n,), n**-0.5, dtype=torch.float64) for n in sizes])
    return (weights / weights.sum()).to(device=device, dtype=torch.float32)


def bit_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    scale_weights: torch.Tensor | None = None,
    bit_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean per-bit 2-way cross-entropy: logits (B, L, 2d), labels (B, L, d) in {0, 1} -> scalar.

    Without ``scale_weights`` every token counts 1/L; with (L,) weights summing to 1 (``scale_loss_weights``) the
    per-token losses are weighted and summed, then averaged over the batch, as the reference trainer.
    ``bit_weights`` (B, L, d) multiply each bit's loss before the mean over d (``bit_loss_weights``:
    ``SelfCorrection.magnitudes``, times its ``token_weights`` for 'residual').
    """
    if logits.shape[:-1] != labels.shape[:-1] or logits.shape[-1] != 2 * labels.shape[-1]:
        raise ValueError(f"logits {tuple(logits.shape)} must be labels {tuple(labels.shape)} with 2 logits per bit")
    pairs = logits.float().unflatten(-1, (-1, 2))
    per_bit = torch.logsumexp(pairs, dim=-1) - pairs.gather(-1, labels.long().unsqueeze(-1)).squeeze(-1)
    if bit_weights is not None:
        if bit_weights.shape != per_bit.shape:
            raise ValueError(f"bit_weights must have the labels' shape {tuple(labels.shape)}, got "
                             f"{tuple(bit_weights.shape)}")
        per_bit = per_bit * bit_weights.to(per_bit.device, per_bit.dtype)
    per_token = per_bit.mean(-1)  # (B, L)
    if scale_weights is None:
        return per_token.mean()
    if scale_weights.shape != per_token.shape[-1:]:
        raise ValueError(f"scale_weights must have shape ({per_token.shape[-1]},), got {tuple(scale_weights.shape)}")
    return (per_token * scale_weights.to(per_token.device)).sum(-1).mean()
