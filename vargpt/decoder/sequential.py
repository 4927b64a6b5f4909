"""Bit-by-bit sampling inside chosen scales: each bit also sees the bits drawn before it in its scale.

Next-scale prediction draws all bits of a scale at once, each independently of the others. Where a coarse scale
decides what the prompt leaves open (which cell of the 2 x 2 grid holds "a circle", and in what colour), the
independent bits disagree: one token's bits mix two colours, two cells start an object or none does, and the finer
scales, trained on consistent histories only, turn that into clutter. For the scales listed in
``decoder.sequential_scales`` a small conditioner adds to each bit's two logits a term computed from its token's
logits and the scale's earlier bits in raster order (token by token, bit by bit within a token). Training is
teacher-forced on the label bits in one parallel pass; sampling goes one bit after another through the conditioner
only (the transformer still runs once per scale), so the scale's joint distribution is modelled for the price of a
few small matmuls per bit. The output layer starts at zero: an untrained conditioner leaves the logits unchanged.
Off by default (Infinity has no such module, so released weights load unchanged).

The same conditioner with one token slot serves ``decoder.token_sequential_scales`` (``InfinityDecoder.within_tokens``):
every token of a fine scale is its own sequence of d bits, so each bit sees its token's earlier bits and a token's
code comes from its joint distribution, all tokens drawn together in d steps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SequentialConditioner(nn.Module):
    """logits (B, n, 2d) + bits (B, n, d) -> logits whose bit u = (token j, bit b) is adjusted by the bits before u.

    Bit u's input is its token's logits, the +-1 values of the bits before u in their slots (zeros elsewhere) and
    one-hots of j and b; an MLP maps it to an additive correction of bit u's two logits. n <= ``max_tokens``.
    """

    def __init__(self, bits: int, max_tokens: int, hidden: int) -> None:
        super().__init__()
        if bits < 1 or max_tokens < 1 or hidden < 1:
            raise ValueError(f"bits, max_tokens and hidden must be >= 1, got {bits}, {max_tokens}, {hidden}")
        self.bits = bits
        self.max_tokens = max_tokens
        self.inp = nn.Linear(2 * bits + max_tokens * bits + max_tokens + bits, hidden)
        self.out = nn.Linear(hidden, 2)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.inp.reset_parameters()
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, logits: torch.Tensor, bits: torch.Tensor, unit: int | None = None) -> torch.Tensor:
        """Adjusted fp32 logits (B, n, 2d), bit u's pair depending on the bits before u only; with ``unit`` = u,
        just that bit's adjusted pair (B, 2) (the sampler's step)."""
        batch, tokens, width = logits.shape
        d = self.bits
        if width != 2 * d or bits.shape != (batch, tokens, d):
            raise ValueError(
                f"logits (B, n, {2 * d}) and bits (B, n, {d}) expected, got {tuple(logits.shape)} and "
                f"{tuple(bits.shape)}"
            )
        if tokens > self.max_tokens:
            raise ValueError(
                f"a sequential scale has {tokens} tokens but decoder.sequential_max_tokens is {self.max_tokens}"
            )
        dtype, device = self.inp.weight.dtype, logits.device
        units = torch.arange(tokens * d, device=device) if unit is None else torch.tensor([unit], device=device)
        signs = (bits.to(dtype) * 2 - 1).flatten(1)  # (B, n * d), raster order
        before = (torch.arange(tokens * d, device=device)[None, :] < units[:, None]).to(dtype)  # (U, n * d)
        seen = F.pad(before[None] * signs[:, None, :], (0, (self.max_tokens - tokens) * d))  # (B, U, max_tokens * d)
        token, bit = units // d, units % d
        own = logits.to(dtype)[:, token]  # (B, U, 2d)
        where = torch.cat(
            (F.one_hot(token, self.max_tokens), F.one_hot(bit, d)), dim=-1
        ).to(dtype).expand(batch, -1, -1)
        correction = self.out(F.gelu(self.inp(torch.cat((own, seen, where), dim=-1)))).float()  # (B, U, 2)
        if unit is not None:
            return logits[:, token[0], 2 * bit[0] : 2 * bit[0] + 2].float() + correction[:, 0]
        return logits.float() + correction.unflatten(1, (tokens, d)).flatten(2)
