"""KV cache for next-scale generation (INFINITY §6).

Scale k's queries attend to the keys of scales 0..k, so the self-attention keys and values of each scale are
appended once and reused by every later scale. The buffers are allocated for the whole schedule at scale 0 and
filled in place, so no step copies the growing prefix.

A cache also keeps what is constant over the scales of one generation: the shared AdaLN output and each block's
cross-attention keys/values of the context. The context is the same at every scale, so projecting it once (instead
of once per scale, as the reference does) saves 2 * T * Cc * C multiply-adds per block and scale. A cache therefore
belongs to one (condition, context) pair; make a new one per generation.
"""

from __future__ import annotations

import torch


class LayerKVCache:
    """The self-attention keys and values (B, H, L_total, head_dim) of one block; ``length`` tokens are filled."""

    def __init__(self) -> None:
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.length = 0

    def append(self, keys: torch.Tensor, values: torch.Tensor, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store (B, H, n, head_dim) keys/values after the filled part; return all filled keys and values."""
        if self.keys is None:
            batch, heads, _, head_dim = keys.shape
            self.keys = keys.new_empty(batch, heads, capacity, head_dim)
            self.values = values.new_empty(batch, heads, capacity, values.shape[-1])
        end = self.length + keys.shape[2]
        if end > self.keys.shape[2]:
            raise ValueError(f"KV cache overflow: {end} tokens exceed the schedule's {self.keys.shape[2]}")
        self.keys[:, :, self.length : end] = keys
        self.values[:, :, self.length : end] = values
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]


class DecoderCache:
    """Per-generation state of the cached decoder: one LayerKVCache per block, plus the per-generation constants."""

    def __init__(self, batch_size: int, depth: int) -> None:
        if batch_size < 1:
            raise ValueError(f"a decoder cache needs batch_size >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.layers = [LayerKVCache() for _ in range(depth)]
        self.next_scale = 0
        self.capacity = 0
        self.adaln: torch.Tensor | None = None
        self.context_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
