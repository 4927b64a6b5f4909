"""From a decoded ``Sample`` to model inputs: image transforms plus the chat template (``vargpt.chat.encode_chat``).

Images are matched to placeholders by order of appearance (the schema's rule): each ``<image>`` takes the next image
and goes through the understanding transform, each ``<image_gen>`` takes the next one as a generation target. A
preference sample becomes two rows, prompt + chosen turn and prompt + rejected turn, sharing the prompt's input
images; its last two images are the chosen and the rejected generation targets.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch
from PIL import Image

from datamodules.config import DataConfig
from datamodules.schema import IMAGE_PLACEHOLDER, Sample, SampleError, placeholder_order
from datamodules.shared_state import GenerationResolution
from datamodules.transforms import GenerationImageTransform, UnderstandingImageTransform
from vargpt.chat import ChatTemplateError, ChatTokenIds, EncodedChat, encode_chat, image_placeholder_count


@dataclass
class EncodedSample:
    """One sample ready for collation. For preference samples ``rows`` holds [chosen, rejected]."""

    key: str
    kind: str
    rows: list[EncodedChat]
    pixel_values: torch.Tensor | None  # (patches, 3 * 2 * 14 * 14) for the <image> inputs, or None
    image_grid_thw: torch.Tensor | None  # (n_inputs, 3)
    gen_images: list[torch.Tensor]  # n_targets tensors (3, size, size) in [-1, 1]; stacked once, at collation
    # per target, the input image it edits (the last <image> before its <image_gen>; a preference pair's last prompt
    # image) through the same generation transform and crop, or None
    gen_sources: list[torch.Tensor | None] = field(default_factory=list)


class SampleEncoder:
    """Turns samples into ``EncodedSample`` for one split (training: random crops; evaluation: centre crops)."""

    def __init__(self, tokenizer: object, config: DataConfig, train: bool) -> None:
        self.tokenizer = tokenizer
        self.token_ids = ChatTokenIds.from_tokenizer(tokenizer)
        self.config = config
        self.train = train
        self.understanding = UnderstandingImageTransform(
            config.understanding_min_pixels, config.understanding_max_pixels
        )

    def encode(self, sample: Sample, resolution: GenerationResolution, rng: random.Random) -> EncodedSample:
        """Encode ``sample`` at ``resolution``; raise ``SampleError`` naming the key when it cannot be used."""
        images = list(sample.images.values())
        if sample.kind == "preference":
            targets = images[-2:]
            inputs = images[:-2]
            sources = [inputs[-1] if inputs else None] * 2
        else:
            order = placeholder_order(sample.messages)
            inputs = [image for image, p in zip(images, order) if p == IMAGE_PLACEHOLDER]
            targets = [image for image, p in zip(images, order) if p != IMAGE_PLACEHOLDER]
            sources, last_input = [], None
            for image, placeholder in zip(images, order):
                if placeholder == IMAGE_PLACEHOLDER:
                    last_input = image
                else:
                    sources.append(last_input)
        pixel_values = image_grid_thw = None
        image_token_counts: list[int] = []
        if inputs:
            pixel_values, image_grid_thw = self.understanding(inputs)
            merge = self.understanding.merge_size
            image_token_counts = [image_placeholder_count(grid.tolist(), merge) for grid in image_grid_thw]
        gen_images, gen_sources = self._generation_targets(targets, sources, resolution, rng)
        conversations = (
            [sample.messages + [sample.chosen], sample.messages + [sample.rejected]]
            if sample.kind == "preference"
            else [sample.messages]
        )
        rows = []
        for messages in conversations:
            try:
                row = encode_chat(
                    self.tokenizer,
                    messages,
                    image_token_counts=image_token_counts,
                    gen_placeholder_count=resolution.placeholder_count,
                    system_prompt=self.config.system_prompt,
                    label_mode=self.config.label_mode,
                    token_ids=self.token_ids,
                )
            except ChatTemplateError as error:
                raise SampleError(f"sample {sample.key!r}: {error}") from error
            if len(row.input_ids) > self.config.max_length:
                raise SampleError(
                    f"sample {sample.key!r}: {len(row.input_ids)} tokens exceed max_length={self.config.max_length}"
                )
            rows.append(row)
        return EncodedSample(sample.key, sample.kind, rows, pixel_values, image_grid_thw, gen_images, gen_sources)

    def _generation_targets(
        self,
        targets: list[Image.Image],
        sources: list[Image.Image | None],
        resolution: GenerationResolution,
        rng: random.Random,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        """The targets as tensors, and each one's source image with the same crop (a copy of ``rng``'s state)."""
        transform = GenerationImageTransform(resolution.size, self.train, self.config.resize_ratio)
        images: list[torch.Tensor] = []
        inputs: list[torch.Tensor | None] = []
        for target, source in zip(targets, sources, strict=True):
            state = rng.getstate()
            images.append(transform(target, rng))
            if source is None:
                inputs.append(None)
                continue
            same_crop = random.Random()
            same_crop.setstate(state)
            inputs.append(transform(source, same_crop))
        return images, inputs
