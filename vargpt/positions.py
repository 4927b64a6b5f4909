"""Qwen2-VL M-RoPE position ids, computed the same way in training and in cached inference (VARGPT §8.1.3).

Every token gets three position components (temporal, height, width). Text tokens advance all three together by
one; the ``<|image_pad|>`` tokens of an understanding image get a (t, h, w) grid starting at the current position,
and the text after the image continues from the largest position used + 1. This is transformers'
``Qwen2VLModel.get_rope_index``; we call it with ``mm_token_type_ids`` built from the ``<|image_pad|>`` positions.

Image-GENERATION tokens (``<|image_gen_start|>``, the ``<|image_gen_pad|>`` placeholders, ``<|image_gen_end|>``) are
positioned as text: the three components continue 1-D from the previous token. In training they are simply text
tokens for ``get_rope_index``; in cached inference every fed block of ``n`` tokens (text or a whole scale) takes the
positions ``next_position + arange(n)`` (``continue_positions``), which is the same numbering. Padding tokens get
position 0 and are masked out of attention.

``place_table`` / ``add_places`` give image tokens their place in their content instead (the model config's
``understanding_place_scale`` and ``generation_place_scale``, off by default): a fixed 2-D sinusoid of each token's
cell, added to its LLM input on top of the rotations, across its whole width or (``place_channels``) in channels of
its own.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from transformers import Qwen2VLModel

IMAGE_TOKEN_TYPE = 1  # get_rope_index's modality ids: text 0, image 1, video 2


def mm_token_type_ids(input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """(B, T) int: 1 at ``<|image_pad|>`` tokens, 0 elsewhere."""
    return (input_ids == image_token_id).int() * IMAGE_TOKEN_TYPE


def mrope_position_ids(
    backbone: Qwen2VLModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    image_grid_thw: torch.Tensor | None,
    image_token_id: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Position ids (3, B, T) of a batch and, per row, the next free position (B,) for tokens appended later.

    ``image_grid_thw`` lists the understanding images in order of appearance over the rows (row 0 first).
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    token_types = mm_token_type_ids(input_ids, image_token_id)
    n_images = 0 if image_grid_thw is None else image_grid_thw.shape[0]
    merge = backbone.config.vision_config.spatial_merge_size
    expected = 0 if image_grid_thw is None else int((image_grid_thw.prod(-1) // merge**2).sum())
    found = int((token_types * attention_mask.to(token_types.dtype)).sum())
    if found != expected:
        raise ValueError(
            f"the batch has {found} <|image_pad|> tokens but its {n_images} image grids need {expected}"
        )
    positions, _ = backbone.get_rope_index(
        input_ids, token_types, image_grid_thw=image_grid_thw, attention_mask=attention_mask.bool()
    )
    valid = attention_mask.bool()
    masked = torch.where(valid.unsqueeze(0), positions, torch.full_like(positions, -1))
    next_position = masked.amax(dim=(0, 2)) + 1
    return positions, next_position


def continue_positions(next_position: torch.Tensor, length: int) -> torch.Tensor:
    """Position ids (3, B, length) of ``length`` tokens appended to each row, all components 1-D."""
    steps = torch.arange(length, device=next_position.device)
    return (next_position[:, None] + steps[None, :]).unsqueeze(0).expand(3, -1, -1)


PLACE_FREQUENCY_RANGE = 64.0  # place_table's frequencies run from pi to 64 pi per unit of the image side


@functools.lru_cache(maxsize=256)
def place_table(rows: int, columns: int, width: int) -> torch.Tensor:
    """(rows * columns, width) float32 on the CPU: a fixed 2-D sinusoid of each cell centre's place, cells row-major.

    A cell's place is its centre as fractions of the image, y = (row + 0.5) / rows and x = (column + 0.5) / columns,
    so a cell of a 4 x 4 grid and the cell of an 8 x 8 grid under the same point get nearly the same vector. The
    first half of the channels are sin and cos of y, the second half of x, at ``width / 4`` frequencies from pi
    (one half turn across the image: cos is monotonic in the place) to ``PLACE_FREQUENCY_RANGE`` x pi; every row
    has unit RMS. Tables are cached per grid and width (every training step asks for the same few): read them, do
    not change them in place.
    """
    if width % 4 or width < 4:
        raise ValueError(f"place_table needs a width divisible by 4, got {width}")
    count = width // 4
    steps = torch.arange(count, dtype=torch.float64) / max(count - 1, 1)
    frequencies = torch.pi * PLACE_FREQUENCY_RANGE ** steps
    y = (torch.arange(rows, dtype=torch.float64) + 0.5) / rows
    x = (torch.arange(columns, dtype=torch.float64) + 0.5) / columns
    y_angles = (y[:, None] * frequencies)[:, None, :].expand(rows, columns, count)
    x_angles = (x[:, None] * frequencies)[None, :, :].expand(rows, columns, count)
    table = torch.cat((y_angles.sin(), y_angles.cos(), x_angles.sin(), x_angles.cos()), dim=-1) * 2**0.5
    return table.reshape(rows * columns, width).to(torch.float32)


def scale_places(scales: Sequence[Sequence[int]], width: int) -> torch.Tensor:
    """(L, width) ``place_table`` rows of the tokens of ``scales`` ((h, w) each, in order), cached like it."""
    return _scale_places(tuple((int(h), int(w)) for h, w in scales), width)


@functools.lru_cache(maxsize=64)
def _scale_places(scales: tuple[tuple[int, int], ...], width: int) -> torch.Tensor:
    return torch.cat([place_table(h, w, width) for h, w in scales])


def add_places(tokens: torch.Tensor, table: torch.Tensor, scale: float, channels: int = 0) -> torch.Tensor:
    """``tokens`` (..., L, H) with each token's place from ``table`` (L, W), at ``scale`` x the token's own RMS (not
    differentiated), so the place keeps the same share of every token whatever the scale of the embeddings.

    ``channels`` = 0: the place is added across all H channels (W = H). ``channels`` = W > 0: the place gets channels
    of its own, the last W: they carry ``scale`` x the RMS of the first H - W channels x the table row, replacing the
    content there (which then gets no gradient), so content and place do not overlap in the LLM's input.
    """
    if channels and (table.shape[-1] != channels or not 0 < channels < tokens.shape[-1]):
        raise ValueError(
            f"add_places: a {table.shape[-1]}-wide table for {channels} place channels of {tokens.shape[-1]}-wide "
            "tokens; the table needs exactly the place channels' width, less than the tokens'"
        )
    content = tokens[..., : tokens.shape[-1] - channels]
    rms = content.detach().float().pow(2).mean(-1, keepdim=True).sqrt()
    places = (scale * rms * table.to(rms.device)).to(tokens.dtype)
    return torch.cat((content, places), dim=-1) if channels else tokens + places
