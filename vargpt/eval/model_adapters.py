"""Adapters from a loaded ``VARGPT`` to the evaluation protocols (``vargpt.eval.protocols``).

``VARGPTImageGenerator`` generates in batches of ``batch_size`` with one seed per image (the seed, not the batch a
request lands in, picks the image's random stream), so GenEval folders are deterministic per (prompt, sample);
``images=`` turns it into the editing path. ``VARGPTChatModel`` answers greedily with the images placed at the start
of the first user turn, as the understanding benchmarks expect. ``as_image_generator`` / ``as_chat_model`` leave
any other object that already has the protocol's methods (a stub in tests, another model) untouched.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from vargpt.chat import IMAGE_PLACEHOLDER
from vargpt.model import VARGPT


@dataclass(frozen=True)
class GenerationSettings:
    """Sampling and resolution passed to ``VARGPT.generate_images``; ``None`` keeps the model config's value
    (cfg 3.0 / temperature 0.5 / top-p 0.97 / a constant cfg schedule and the config's schedule, VARGPT §2.4).
    ``size`` (square pixels) takes precedence over ``pn`` (a resolution preset at ``aspect``)."""

    cfg: float | None = None
    temperature: float | None = None
    top_p: float | None = None
    cfg_schedule: str | None = None
    pn: str | None = None
    size: int | None = None
    aspect: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "cfg": self.cfg,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "cfg_schedule": self.cfg_schedule,
            "pn": self.pn,
            "size": self.size,
            "aspect": self.aspect,
        }


def resolve_schedule(model: VARGPT, settings: GenerationSettings) -> list[tuple[int, int]]:
    """The scale schedule of ``settings``: ``size`` (a multiple of the VAE stride), else ``pn``, else the config's.

    A ``size`` whose latent grid is the one the config's schedule ends at takes the config's schedule (the scales the
    model was trained on), not ``schedule_for_latent``'s default for that grid, which may have other scales.
    """
    from vargpt.schedules import scale_schedule, schedule_for_latent

    configured = [tuple(scale) for scale in model.config.schedule]
    if settings.size is not None:
        stride = model.config.tokenizer.stride
        if settings.size < stride or settings.size % stride:
            raise ValueError(f"image size {settings.size} must be a positive multiple of the VAE stride {stride}")
        side = settings.size // stride
        if configured[-1] == (side, side):
            return configured
        return [tuple(scale) for scale in schedule_for_latent(side, side)]
    if settings.pn is not None:
        return [tuple(scale) for scale in scale_schedule(settings.pn, settings.aspect)]
    return configured


def native_image_size(model: VARGPT, settings: GenerationSettings = GenerationSettings()) -> int:
    """The side in pixels of the images the model generates with ``settings`` (the longer side if not square)."""
    from vargpt.schedules import pixel_size

    return max(pixel_size(resolve_schedule(model, settings), model.config.tokenizer.stride))


class VARGPTImageGenerator:
    """``ImageGenerator`` over a ``VARGPT``: batched, one seed per image, settings fixed for the whole run."""

    def __init__(self, model: VARGPT, batch_size: int = 1, settings: GenerationSettings = GenerationSettings()):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.batch_size = batch_size
        self.settings = settings
        self.schedule = resolve_schedule(model, settings)

    def generate_images(
        self, prompts: Sequence[str], seeds: Sequence[int], images: Sequence[Image.Image] | None = None
    ) -> list[Image.Image]:
        """One image per (prompt, seed) pair; ``images`` gives one input image per prompt (editing)."""
        if len(prompts) != len(seeds):
            raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds; one seed per image")
        if images is not None and len(images) != len(prompts):
            raise ValueError(f"got {len(images)} input images for {len(prompts)} prompts; one per prompt")
        outputs: list[Image.Image] = []
        for start in range(0, len(prompts), self.batch_size):
            stop = start + self.batch_size
            outputs += self.model.generate_images(
                list(prompts[start:stop]),
                cfg=self.settings.cfg,
                temperature=self.settings.temperature,
                top_p=self.settings.top_p,
                cfg_schedule=self.settings.cfg_schedule,
                seed=[int(seed) for seed in seeds[start:stop]],
                schedule=self.schedule,
                images=None if images is None else list(images[start:stop]),
            )
        return outputs


class VARGPTChatModel:
    """``ChatModel`` over a ``VARGPT``: greedy text, one ``<image>`` per image prepended to the first user turn
    when the messages carry no placeholders of their own."""

    def __init__(self, model: VARGPT) -> None:
        self.model = model

    def chat(self, messages: Sequence[dict[str, str]], images: Sequence[Image.Image], max_new_tokens: int) -> str:
        """The model's greedy answer to ``messages`` about ``images``."""
        messages = [dict(message) for message in messages]
        images = list(images or [])
        placed = sum(message["content"].count(IMAGE_PLACEHOLDER) for message in messages)
        if images and placed == 0:
            first_user = next((m for m in messages if m["role"] == "user"), None)
            if first_user is None:
                raise ValueError("chat got images but no user turn to place them in")
            first_user["content"] = IMAGE_PLACEHOLDER * len(images) + "\n" + first_user["content"]
        elif placed != len(images):
            raise ValueError(f"the messages have {placed} {IMAGE_PLACEHOLDER} placeholders for {len(images)} images")
        return self.model.chat(messages, images=images or None, max_new_tokens=max_new_tokens, do_sample=False)


def as_image_generator(model: Any, batch_size: int = 1, settings: GenerationSettings = GenerationSettings()) -> Any:
    """``model`` wrapped as a ``VARGPTImageGenerator`` when it is a ``VARGPT``, else ``model`` itself."""
    return VARGPTImageGenerator(model, batch_size, settings) if isinstance(model, VARGPT) else model


def as_chat_model(model: Any) -> Any:
    """``model`` wrapped as a ``VARGPTChatModel`` when it is a ``VARGPT``, else ``model`` itself."""
    return VARGPTChatModel(model) if isinstance(model, VARGPT) else model


def load_model(folder: str | os.PathLike, device: str = "cpu", dtype: torch.dtype | None = None) -> VARGPT:
    """A checkpoint folder (our export or the released VARGPT-v1.1) as a ``VARGPT`` in eval mode with its text
    tokenizer attached; a folder without tokenizer files cannot be evaluated and is named in the error."""
    from vargpt.checkpoints.vargpt import from_pretrained

    model, tokenizer = from_pretrained(folder, device=device, dtype=dtype)
    if tokenizer is None:
        raise FileNotFoundError(f"checkpoint folder {folder} has no tokenizer files (tokenizer.json)")
    return model.eval()
