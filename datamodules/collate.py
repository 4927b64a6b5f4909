"""Collation of encoded samples into the batch the model's training forward consumes.

The batch contract (B = samples in the batch, R = rows = B, or 2B for preference batches, L = padded length):

=========================  ==================================  =====================================================
key                        shape, dtype                        meaning
=========================  ==================================  =====================================================
``input_ids``              (R, L) int64                        template tokens; right padding with the pad id
``attention_mask``         (R, L) int64                        1 on tokens, 0 on padding
``labels``                 (R, L) int64                        token id where a loss is taken, -100 elsewhere
                                                               (padding, masked turns, image and generation pads)
``pixel_values``           (P, 3*2*14*14) float32 or None      Qwen2-VL patches of every ``<image>`` input, rows in
                                                               order, images in order of appearance
``image_grid_thw``         (N_img, 3) int64 or None            (t, h, w) patch grid of each input image
``image_sample_index``     (N_img,) int64                      the row each input image belongs to
``gen_images``             (N_gen, 3, S, S) float32 or None    generation targets in [-1, 1], S = ``gen_size``
``gen_sample_index``       (N_gen,) int64                      the row each target belongs to, in order of the
                                                               ``<|image_gen_start|>`` spans within that row
``gen_source_images``      (N_gen, 3, S, S) float32 or None    per target, the input image it edits (the last
                                                               ``<image>`` before it), same transform and crop;
                                                               zeros where it has none; None when no target has one
``gen_source_mask``        (N_gen,) bool or None               which targets have a source image
``gen_size``               int                                 S, the side of the targets
``gen_schedule``           list[list[int]] (K x [h, w])        scale schedule the placeholder spans were sized for
``gen_placeholder_count``  int                                 ``<|image_gen_pad|>`` tokens per target
``kinds``                  list[str] (B)                       sample kinds
``keys``                   list[str] (B)                       sample keys
``num_pairs``              int                                 preference batches only: B
=========================  ==================================  =====================================================

Preference batches put chosen and rejected in one batch, as one concatenated forward (as TRL does): rows
``0 .. B-1`` are prompt + chosen turn, rows ``B .. 2B-1`` are prompt + rejected turn of the same samples, so row
``i`` and row ``B + i`` form pair ``i``. ``gen_images[i]`` is the chosen image of pair ``i`` and ``gen_images[B + i]``
its rejected image (``gen_sample_index`` = ``arange(2B)``). Input images of the prompt (if any) are repeated for
both halves. A batch is either all preference samples or none.

Every target in a batch has the same size and schedule: the resolution is read once per batch, so a change made by
``ShardDataModule.set_generation_resolution`` never splits a batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from datamodules.encoding import EncodedSample
from datamodules.shared_state import GenerationResolution
from vargpt.chat import IGNORE_INDEX, EncodedChat

PADDING_SIDES = ("right", "left")


def pad_rows(
    rows: Sequence[EncodedChat], pad_id: int, padding_side: str = "right", pad_to_multiple_of: int = 1
) -> dict[str, torch.Tensor]:
    """``input_ids``, ``attention_mask`` and ``labels`` (when the rows have labels) padded to a common length."""
    if padding_side not in PADDING_SIDES:
        raise ValueError(f"padding_side must be one of {PADDING_SIDES}, got {padding_side!r}")
    longest = max(len(row.input_ids) for row in rows)
    length = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.int64)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.int64)
    with_labels = all(row.labels is not None for row in rows)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.int64)
    for index, row in enumerate(rows):
        n = len(row.input_ids)
        span = slice(0, n) if padding_side == "right" else slice(length - n, length)
        input_ids[index, span] = torch.tensor(row.input_ids, dtype=torch.int64)
        attention_mask[index, span] = 1
        if with_labels:
            labels[index, span] = torch.tensor(row.labels, dtype=torch.int64)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if with_labels:
        batch["labels"] = labels
    return batch


def _cat_or_none(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    return torch.cat(tensors) if tensors else None


def _sources(
    sources: list[torch.Tensor | None], targets: list[torch.Tensor]
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``gen_source_images`` (zeros where a target has no source) and ``gen_source_mask``; both None without any."""
    if all(source is None for source in sources):
        return None, None
    images = torch.stack([torch.zeros_like(t) if s is None else s for s, t in zip(sources, targets, strict=True)])
    return images, torch.tensor([source is not None for source in sources])


def collate_samples(
    samples: Sequence[EncodedSample],
    resolution: GenerationResolution,
    pad_id: int,
    padding_side: str = "right",
    pad_to_multiple_of: int = 1,
) -> dict[str, Any]:
    """Build the batch described in the module docstring from encoded samples."""
    if not samples:
        raise ValueError("cannot collate an empty batch")
    preference = [sample.kind == "preference" for sample in samples]
    if any(preference) and not all(preference):
        raise ValueError("a batch mixes preference and non-preference samples; use one data.mode per loader")
    is_preference = all(preference)
    halves = 2 if is_preference else 1
    batch_size = len(samples)
    rows: list[EncodedChat] = []
    pixel_values, grids, image_rows, gen_images, gen_rows = [], [], [], [], []
    gen_sources: list[torch.Tensor | None] = []
    for half in range(halves):
        for index, sample in enumerate(samples):
            row = half * batch_size + index
            rows.append(sample.rows[half])
            if sample.pixel_values is not None and sample.image_grid_thw is not None:
                pixel_values.append(sample.pixel_values)
                grids.append(sample.image_grid_thw)
                image_rows += [row] * len(sample.image_grid_thw)
            targets = sample.gen_images[half : half + 1] if is_preference else sample.gen_images
            sources = sample.gen_sources or [None] * len(sample.gen_images)
            gen_images += targets
            gen_sources += sources[half : half + 1] if is_preference else sources
            gen_rows += [row] * len(targets)
    batch = pad_rows(rows, pad_id, padding_side, pad_to_multiple_of)
    batch.update(
        pixel_values=_cat_or_none(pixel_values),
        image_grid_thw=_cat_or_none(grids),
        image_sample_index=torch.tensor(image_rows, dtype=torch.int64),
        gen_images=torch.stack(gen_images) if gen_images else None,
        gen_sample_index=torch.tensor(gen_rows, dtype=torch.int64),
        gen_size=resolution.size,
        gen_schedule=[list(scale) for scale in resolution.schedule],
        gen_placeholder_count=resolution.placeholder_count,
        kinds=[sample.kind for sample in samples],
        keys=[sample.key for sample in samples],
    )
    batch["gen_source_images"], batch["gen_source_mask"] = _sources(gen_sources, gen_images)
    if is_preference:
        batch["num_pairs"] = batch_size
    return batch
