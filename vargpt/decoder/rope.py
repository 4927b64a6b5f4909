"""2-D rotary position embedding of the Infinity decoder (INFINITY §3.5).

Every token of scale (h, w) sits at an integer position on a reference grid (H, W): the final grid of the "1M"
schedule of the image's aspect ratio (64 x 64 at 1:1). Row i and column j of the scale map to
``y = round(i * H / h)`` and ``x = round(j * W / w)``, computed in float32 and rounded half to even exactly as
the reference (`precompute_rope2d_freqs_grid`, mode 2). So a 16x16 scale has the same phases at 256 px and 1024 px.

Per head, the channels form interleaved pairs (2i, 2i+1). The first half of the pairs rotate with the row, the
second half with the column, with ``inv_freq[j] = base^(-2j / (head_dim / 2))`` for j < head_dim / 4.
Tables are computed from explicit positions, so any schedule works (the reference only knew its templates and
dropped the per-scale offset in one inference path, INFINITY §9.1 and §9.3).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vargpt.schedules import validate_schedule


def scale_positions(schedule: Sequence[Sequence[int]], grid: tuple[int, int]) -> torch.Tensor:
    """(L, 2) int64 (y, x) positions of every token of ``schedule`` (row-major per scale) on ``grid`` = (H, W)."""
    grid_h, grid_w = grid
    if grid_h < 1 or grid_w < 1:
        raise ValueError(f"RoPE grid must be positive (H, W), got {grid}")
    positions = []
    for h, w in validate_schedule(schedule):
        # int64 arange times a Python float gives float32; torch.round is round-half-to-even, as the reference
        rows = (torch.arange(h) * (grid_h / h)).round().long()
        cols = (torch.arange(w) * (grid_w / w)).round().long()
        positions.append(torch.stack((rows[:, None].expand(h, w), cols[None, :].expand(h, w)), dim=-1).reshape(-1, 2))
    return torch.cat(positions)


def inverse_frequencies(head_dim: int, base: float) -> torch.Tensor:
    """(head_dim / 4,) float32 ``base^(-2j / (head_dim / 2))``: the frequencies shared by the row and column halves."""
    if head_dim % 4 != 0:
        raise ValueError(f"2-D RoPE needs head_dim divisible by 4, got {head_dim}")
    half = head_dim // 2
    return 1.0 / (base ** (torch.arange(0, half, 2) / half))


def rope_tables(positions: torch.Tensor, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each (L, head_dim / 2) float32, for (L, 2) integer (y, x) positions."""
    inv_freq = inverse_frequencies(head_dim, base).to(positions.device)
    angles = torch.cat(
        (torch.outer(positions[:, 0].float(), inv_freq), torch.outer(positions[:, 1].float(), inv_freq)), dim=-1
    )
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the interleaved channel pairs of ``x`` (..., L, head_dim) by the angles of (L, head_dim / 2) tables."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    pairs = x.unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    return torch.stack((cos * even - sin * odd, sin * even + cos * odd), dim=-1).flatten(-2)


class RotaryEmbedding2D:
    """Caches the cos/sin tables of whole schedules by (schedule, grid, device); no parameters, no state dict."""

    def __init__(self, head_dim: int, base: float) -> None:
        inverse_frequencies(head_dim, base)  # validates head_dim
        self.head_dim = head_dim
        self.base = base
        self._tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def tables(
        self, schedule: Sequence[Sequence[int]], grid: tuple[int, int], device: torch.device | str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 (cos, sin), each (L, head_dim / 2), for every token of ``schedule``."""
        key = (tuple(validate_schedule(schedule)), tuple(grid), str(torch.device(device)))
        if key not in self._tables:
            positions = scale_positions(schedule, grid).to(device)
            self._tables[key] = rope_tables(positions, self.head_dim, self.base)
        return self._tables[key]
