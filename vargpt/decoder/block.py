"""One Infinity block (INFINITY §3.4): pre-norm, shared AdaLN, self-attention, cross-attention, FFN.

```
g1, g2, s1, s2, b1, b2 = (adaln_bias + shared_adaln(cond)).unbind   # this order, each (B, 1, C)
x = x + DropPath( SA( LN(x) * (1 + s1) + b1 ) * g1 )                # cosine attention, 2-D RoPE, block-causal
x = x + CA( LN_affine(x), context )                                 # no AdaLN, no gate, no drop path
x = x + DropPath( FFN( LN(x) * (1 + s2) + b2 ) * g2 )               # fc1 -> GELU(tanh) -> fc2
```
LN has no affine parameters and runs in fp32 (eps 1e-6); the residual stream keeps the input's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vargpt.config import DecoderConfig
from vargpt.decoder.attention import CosineSelfAttention, CrossAttention
from vargpt.decoder.cache import LayerKVCache


def modulated_layer_norm(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm without affine parameters in fp32, then ``* (1 + scale) + shift``; returns x's dtype (AdaLN)."""
    normed = F.layer_norm(x.float(), (x.shape[-1],), eps=eps)
    return (normed * (1 + scale.float()) + shift.float()).to(x.dtype)


class FeedForward(nn.Module):
    """fc1 -> GELU(tanh) -> fc2, applied per token."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.fc2 = nn.Linear(hidden_features, out_features or in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a residual branch per sample with probability p and rescale by 1/(1-p)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop path probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p:g}"


class DecoderBlock(nn.Module):
    """A cross-attention block with a per-block AdaLN bias on top of the shared AdaLN projection."""

    def __init__(self, config: DecoderConfig, drop_path: float) -> None:
        super().__init__()
        width = config.width
        self.eps = config.norm_eps
        self.adaln_bias = nn.Parameter(torch.randn(1, 1, 6, width) / width**0.5)
        self.attn = CosineSelfAttention(width, config.heads, config.max_attention_scale)
        self.cross_attn_norm = nn.LayerNorm(width, eps=config.norm_eps)
        self.cross_attn = CrossAttention(width, config.context_dim, config.heads)
        self.mlp = FeedForward(width, config.mlp_hidden)
        self.drop_path = DropPath(drop_path)

    def forward(
        self,
        x: torch.Tensor,
        adaln: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn_mask: torch.Tensor | None,
        context_kv: tuple[torch.Tensor, torch.Tensor],
        padding_mask: torch.Tensor,
        cache: LayerKVCache | None = None,
        cache_capacity: int = 0,
    ) -> torch.Tensor:
        """x (B, L, C); adaln (B, 1, 6, C) from the shared projection; the rest as in the attentions."""
        gamma1, gamma2, scale1, scale2, shift1, shift2 = (self.adaln_bias + adaln).unbind(2)
        normed = modulated_layer_norm(x, scale1, shift1, self.eps)
        attended = self.attn(normed, cos, sin, attn_mask, cache, cache_capacity)
        x = x + self.drop_path(attended * gamma1)
        x = x + self.cross_attn(self.cross_attn_norm(x), context_kv, padding_mask)
        return x + self.drop_path(self.mlp(modulated_layer_norm(x, scale2, shift2, self.eps)) * gamma2)
