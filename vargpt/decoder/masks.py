"""Block-causal attention over scales (INFINITY §3.6).

A token of scale a may attend to a key of scale b iff b <= a: its whole own scale and every coarser scale. The
tokens of one scale are predicted together, so they see each other; a finer scale is never visible.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vargpt.schedules import validate_schedule


def scale_index_per_token(schedule: Sequence[Sequence[int]], device: torch.device | str | None = None) -> torch.Tensor:
    """(L,) int64: the scale index k of every token of the flattened sequence."""
    sizes = torch.tensor([h * w for h, w in validate_schedule(schedule)], device=device)
    return torch.repeat_interleave(torch.arange(len(sizes), device=device), sizes)


def block_causal_mask(schedule: Sequence[Sequence[int]], device: torch.device | str | None = None) -> torch.Tensor:
    """(L, L) bool, True where query i may attend key j (scale of j <= scale of i); SDPA's boolean mask convention."""
    scale = scale_index_per_token(schedule, device)
    return scale[:, None] >= scale[None, :]
