"""The two attentions of an Infinity block (INFINITY §3.4), both on PyTorch SDPA.

* ``CosineSelfAttention``: q and k are L2-normalised per head and q is multiplied by a learned per-head scale
  exp(min(logit_scale, ln max_attention_scale)), so the attention logits are s_h * cos(q, k) with s_h <= 100; then
  2-D RoPE rotates q and k, and SDPA runs with scale 1. The qkv projection has no bias of its own: q and v get
  separate bias vectors and k none (the reference's `zero_k_bias`).
* ``CrossAttention``: plain scaled dot-product attention from the image tokens to a context (text tokens or the
  LLM's hidden states) with a key-padding mask; k has no bias, v has ``v_bias``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vargpt.decoder.cache import LayerKVCache
from vargpt.decoder.rope import apply_rope


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, L, H * c) -> (B, H, L, c)."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, L, c) -> (B, L, H * c)."""
    return x.transpose(1, 2).flatten(2)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None, scale: float | None
) -> torch.Tensor:
    """``F.scaled_dot_product_attention``; on CPU, reduced-precision inputs (bf16-mixed training) are attended in fp32
    and the result is cast back: there the fused kernel's bf16 backward is several times slower than its fp32 one
    (4x on an AVX512-BF16 CPU, where the matmuls around it run 2x faster in bf16)."""
    if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
        with torch.autocast("cpu", enabled=False):
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=attn_mask, scale=scale)
        return out.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)


def key_padding_mask(context_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) bool valid-token mask -> (B, 1, 1, T) SDPA mask; every sample needs at least one valid token."""
    if context_mask.dtype != torch.bool:
        raise TypeError(f"context_mask must be bool (True = a real token), got {context_mask.dtype}")
    if not bool(context_mask.any(dim=1).all()):
        empty = (~context_mask.any(dim=1)).nonzero().flatten().tolist()
        raise ValueError(f"every sample needs at least one context token; samples {empty} have none")
    return context_mask[:, None, None, :]


class CosineSelfAttention(nn.Module):
    """Multi-head cosine self-attention with 2-D RoPE and an optional KV cache."""

    def __init__(self, width: int, heads: int, max_attention_scale: float) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.logit_scale = nn.Parameter(torch.full((1, heads, 1, 1), math.log(4.0)))
        self.max_log_scale = math.log(max_attention_scale)
        self.proj = nn.Linear(width, width)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None = None,
        cache: LayerKVCache | None = None,
        cache_capacity: int = 0,
    ) -> torch.Tensor:
        """x (B, L, C); cos/sin (L, head_dim / 2) for these L tokens; mask (L, L_keys) bool or None (all visible).

        With ``cache``, the keys/values of x are appended to it and the queries attend to everything cached so far.
        """
        bias = torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias))
        q, k, v = F.linear(x, self.qkv.weight, bias).chunk(3, dim=-1)
        q, k, v = split_heads(q, self.heads), split_heads(k, self.heads), split_heads(v, self.heads)
        scale = self.logit_scale.clamp_max(self.max_log_scale).exp().to(q.dtype)
        q = apply_rope(F.normalize(q, dim=-1) * scale, cos, sin)
        k = apply_rope(F.normalize(k, dim=-1), cos, sin)
        if cache is not None:
            k, v = cache.append(k, v, cache_capacity)
        out = attention(q, k, v, mask, 1.0)
        return self.proj(merge_heads(out))


class CrossAttention(nn.Module):
    """Multi-head attention from the image tokens to a padded context, k without bias and v with ``v_bias``."""

    def __init__(self, width: int, context_dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(context_dim, 2 * width, bias=False)
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.proj = nn.Linear(width, width)

    def project_context(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, Cc) context -> keys and values, each (B, H, T, head_dim); reusable across scales."""
        bias = torch.cat((torch.zeros_like(self.v_bias), self.v_bias))
        k, v = F.linear(context, self.kv.weight, bias).chunk(2, dim=-1)
        return split_heads(k, self.heads), split_heads(v, self.heads)

    def forward(
        self, x: torch.Tensor, context_kv: tuple[torch.Tensor, torch.Tensor], padding_mask: torch.Tensor
    ) -> torch.Tensor:
        """x (B, L, C) attends to the projected context; ``padding_mask`` is ``key_padding_mask(context_mask)``."""
        k, v = context_kv
        q = split_heads(self.q(x), self.heads)
        out = attention(q, k, v, padding_mask, k.shape[-1] ** -0.5)
        return self.proj(merge_heads(out))
