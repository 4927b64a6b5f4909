"""GenEval's colour classifier: zero-shot CLIP over 10 colours on masked object crops (evaluation.md §1.4 step 5).

Each object is composited over a flat ``#999`` grey with its instance mask, cropped to its box, and classified
against one classifier row per colour: the normalised mean of the normalised embeddings of three templates
(LAION CLIP_benchmark's zero-shot recipe). The official evaluator uses OpenCLIP ViT-L-14 with OpenAI weights,
i.e. the Hugging Face ``openai/clip-vit-large-patch14`` folder here.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from vargpt.eval.clip_model import ClipEncoder
from vargpt.eval.geneval_rules import GENEVAL_COLORS, ColourClassifier, Detection

# The three prompt templates of GenEval's colour classifier ({c}: colour, {classname}: object class).
COLOUR_TEMPLATES: tuple[str, ...] = (
    "a photo of a {c} {classname}",
    "a photo of a {c}-colored {classname}",
    "a photo of a {c} object",
)
BACKGROUND_COLOUR = "#999"  # the official ``bgcolor`` option: flat grey (153, 153, 153) behind the mask
LOGIT_SCALE = 100.0  # CLIP_benchmark scales cosine similarities by 100 before the argmax


def masked_crop(image: Image.Image, detection: Detection, background: str = BACKGROUND_COLOUR) -> Image.Image:
    """The object alone: ``image`` where the mask is set, ``background`` elsewhere, cropped to the box.

    Without a mask the crop is taken from the image as it is. A mask whose size differs from the image's is an
    error (the detector must return masks at image resolution).
    """
    rgb = image.convert("RGB")
    if detection.mask is not None:
        mask = np.asarray(detection.mask)
        if mask.shape != (rgb.height, rgb.width):
            raise ValueError(f"instance mask has shape {mask.shape} but the image is {rgb.height}x{rgb.width} (H x W)")
        blank = Image.new("RGB", rgb.size, color=background)
        rgb = Image.composite(rgb, blank, Image.fromarray(mask.astype(np.uint8) * 255))
    return rgb.crop(tuple(detection.box[:4]))


class ClipColourClassifier:
    """Names the colour of a detected object among ``colours`` with CLIP; classifier rows cached per class."""

    def __init__(
        self,
        encoder: ClipEncoder,
        colours: Sequence[str] = GENEVAL_COLORS,
        templates: Sequence[str] = COLOUR_TEMPLATES,
        background: str = BACKGROUND_COLOUR,
    ) -> None:
        self.encoder = encoder
        self.colours = tuple(colours)
        self.templates = tuple(templates)
        self.background = background
        self._weights: dict[str, torch.Tensor] = {}

    def classifier_weights(self, classname: str) -> torch.Tensor:
        """(D, n_colours): per colour, the normalised mean of the normalised template embeddings."""
        if classname not in self._weights:
            rows = []
            for colour in self.colours:
                texts = [template.format(c=colour, classname=classname) for template in self.templates]
                mean = self.encoder.encode_texts(texts).mean(dim=0)
                rows.append(torch.nn.functional.normalize(mean, dim=0))
            self._weights[classname] = torch.stack(rows, dim=1)
        return self._weights[classname]

    def classify(self, image: Image.Image, classname: str, detections: Sequence[Detection]) -> list[str]:
        """The colour of each detection of ``classname`` in ``image``."""
        if not detections:
            return []
        crops = [masked_crop(image, detection, self.background) for detection in detections]
        logits = LOGIT_SCALE * self.encoder.encode_images(crops) @ self.classifier_weights(classname)
        return [self.colours[index] for index in logits.argmax(dim=1).tolist()]

    def for_image(self, image: Image.Image) -> ColourClassifier:
        """The ``(classname, detection) -> colour`` callable that ``score_detections`` expects, bound to ``image``."""
        return lambda classname, detection: self.classify(image, classname, [detection])[0]
