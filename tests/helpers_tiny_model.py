"""Tiny VARGPT factory shared by the model tests (and later stages): every component real, just small.

Qwen2-VL: 2 layers, hidden 64, 4 heads (head dim 16, M-RoPE sections 2+3+3), vision depth 1 (patch 14, merge 2 as
the stock processor); decoder: depth 2, width 64, 2 heads; BSQ-VAE: stride 4, 16 bits; a byte-level BPE trained on a
few captions. The default schedule (1,1),(2,2),(4,4) makes 16-px images with L = 21 tokens and 24 placeholders
(multiple 8), so the P - L padding placeholders are exercised too.
"""

from __future__ import annotations

from typing import Any

import torch

from vargpt.chat import ChatTokenIds
from vargpt.config import DecoderConfig, SamplingConfig, TokenizerConfig, VARGPTConfig
from vargpt.model import VARGPT
from vargpt.text_tokenizer import train_text_tokenizer

CAPTIONS = (
    "a red circle on a blue square",
    "two green triangles next to a yellow star",
    "describe the image",
    "make the circle blue",
    "here is the picture you asked for",
    "the image shows a red circle",
)
TINY_SCHEDULE = [[1, 1], [2, 2], [4, 4]]
TINY_IMAGE_SIZE = 16
TINY_PLACEHOLDERS = 24

_CACHE: dict[str, Any] = {}


def tiny_text_tokenizer() -> Any:
    """A small local BPE with every special token (trained once per test session)."""
    if "tokenizer" not in _CACHE:
        _CACHE["tokenizer"] = train_text_tokenizer(CAPTIONS, vocab_size=300)
    return _CACHE["tokenizer"]


def tiny_qwen2_vl(ids: ChatTokenIds, vocab_size: int, max_positions: int = 4096) -> dict:
    """A ``Qwen2VLConfig`` dict: 2 layers, hidden 64, vision depth 1, token ids of the tiny tokenizer."""
    return {
        "text_config": {
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "intermediate_size": 128,
            "vocab_size": vocab_size,
            "max_position_embeddings": max_positions,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            "pad_token_id": ids.pad,
            "bos_token_id": ids.pad,
            "eos_token_id": ids.im_end,
        },
        "vision_config": {"depth": 1, "embed_dim": 32, "num_heads": 2, "hidden_size": 64, "mlp_ratio": 2},
        "image_token_id": ids.image_pad,
        "video_token_id": ids.image_pad + 1,
        "vision_start_token_id": ids.vision_start,
        "vision_end_token_id": ids.vision_end,
    }


def tiny_config(max_positions: int = 4096, **overrides: Any) -> VARGPTConfig:
    """A tiny ``VARGPTConfig`` matching ``tiny_text_tokenizer``; keyword arguments override fields."""
    tokenizer = tiny_text_tokenizer()
    ids = ChatTokenIds.from_tokenizer(tokenizer)
    fields: dict[str, Any] = {
        "qwen2_vl": tiny_qwen2_vl(ids, len(tokenizer), max_positions),
        "decoder": DecoderConfig(
            depth=2, width=64, heads=2, bits=16, condition_dim=64, pool_heads=2, text_max_tokens=256, drop_path=0.0
        ),
        "tokenizer": TokenizerConfig(
            bits=16,
            base_channels=16,
            encoder_channel_multipliers=[1, 1, 1],
            decoder_channel_multipliers=[1, 1, 1],
            encoder_res_blocks=1,
            decoder_res_blocks=1,
            group_norm_groups=8,
        ),
        "generation_schedule": TINY_SCHEDULE,
        "placeholder_multiple": 8,
        "image_gen_start_token_id": ids.image_gen_start,
        "image_gen_end_token_id": ids.image_gen_end,
        "image_gen_pad_token_id": ids.image_gen_pad,
        "im_start_token_id": ids.im_start,
        "im_end_token_id": ids.im_end,
        "pad_token_id": ids.pad,
        "sampling": SamplingConfig(),
    }
    fields.update(overrides)
    return VARGPTConfig(**fields)


def tiny_model(seed: int = 0, **overrides: Any) -> VARGPT:
    """A randomly initialised tiny VARGPT in fp32 eval mode with the tiny text tokenizer attached."""
    torch.manual_seed(seed)
    model = VARGPT(tiny_config(**overrides))
    model.attach_tokenizer(tiny_text_tokenizer())
    return model.eval()


def tiny_image(seed: int, size: int = TINY_IMAGE_SIZE) -> torch.Tensor:
    """A random image (3, size, size) in [-1, 1]."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(3, size, size, generator=generator) * 2 - 1


def tiny_pil_image(seed: int, size: int = 56) -> Any:
    """A random RGB PIL image (for the understanding path: 56 px -> a 4x4 patch grid -> 4 LLM tokens)."""
    from PIL import Image

    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size, size, 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def make_batch(samples: list[dict[str, Any]], label_mode: str = "assistant", padding_side: str = "right") -> dict:
    """Collate samples ``{"messages": [...], "inputs": [PIL, ...], "targets": [(3,S,S) tensor, ...]}`` by the
    data pipeline's contract (``datamodules.collate``), with the tiny schedule's placeholder count."""
    from datamodules.collate import pad_rows
    from datamodules.transforms import UnderstandingImageTransform
    from vargpt.chat import encode_chat, image_placeholder_count

    tokenizer = tiny_text_tokenizer()
    transform = UnderstandingImageTransform()
    rows, pixel_values, grids, image_rows, targets, target_rows = [], [], [], [], [], []
    for index, sample in enumerate(samples):
        counts: list[int] = []
        if sample.get("inputs"):
            pixels, grid = transform(sample["inputs"])
            pixel_values.append(pixels)
            grids.append(grid)
            image_rows += [index] * grid.shape[0]
            counts = [image_placeholder_count(g.tolist()) for g in grid]
        rows.append(encode_chat(tokenizer, sample["messages"], image_token_counts=counts,
                                gen_placeholder_count=TINY_PLACEHOLDERS, label_mode=label_mode))
        targets += list(sample.get("targets", []))
        target_rows += [index] * len(sample.get("targets", []))
    batch = pad_rows(rows, tokenizer.pad_token_id, padding_side)
    batch.update(
        pixel_values=torch.cat(pixel_values) if pixel_values else None,
        image_grid_thw=torch.cat(grids) if grids else None,
        image_sample_index=torch.tensor(image_rows, dtype=torch.int64),
        gen_images=torch.stack(targets) if targets else None,
        gen_sample_index=torch.tensor(target_rows, dtype=torch.int64),
        gen_size=TINY_IMAGE_SIZE,
        gen_schedule=TINY_SCHEDULE,
        gen_placeholder_count=TINY_PLACEHOLDERS,
    )
    return batch


def mixed_samples() -> list[dict[str, Any]]:
    """One understanding, one generation, one editing and one text-only sample."""
    return [
        {"messages": [{"role": "user", "content": "<image>describe the image"},
                      {"role": "assistant", "content": "the image shows a red circle"}],
         "inputs": [tiny_pil_image(1)]},
        {"messages": [{"role": "user", "content": "a red circle on a blue square"},
                      {"role": "assistant", "content": "here is the picture you asked for<image_gen>"}],
         "targets": [tiny_image(2)]},
        {"messages": [{"role": "user", "content": "<image>make the circle blue"},
                      {"role": "assistant", "content": "here is the picture<image_gen>"}],
         "inputs": [tiny_pil_image(3, size=84)], "targets": [tiny_image(4)]},
        {"messages": [{"role": "user", "content": "two green triangles"},
                      {"role": "assistant", "content": "next to a yellow star"}]},
    ]
