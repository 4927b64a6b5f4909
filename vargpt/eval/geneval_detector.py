"""GenEval's object detector, from transformers: Mask2Former COCO instance segmentation (evaluation.md §1.3, §1.5).

The official evaluator runs mmdet 2.x Mask2Former Swin-S; the closest transformers checkpoint is
``facebook/mask2former-swin-small-coco-instance`` (same architecture, backbone, task and label order). Its score is
the same formula (class probability x mean mask probability) and boxes are the tight boxes of the binary masks, as
mmdet's ``mask2bbox``. Differences that remain: a different training run, and transformers binarises masks at
384x384 before upsampling. Report this metric as ``geneval_hf``.

``Mask2FormerInstanceSegmenter`` is the inference half of ``Mask2FormerForUniversalSegmentation`` (backbone, pixel
decoder, transformer decoder, class head): the same weights and outputs, without the training loss, whose Hungarian
matcher would pull in scipy.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from transformers import Mask2FormerConfig, Mask2FormerImageProcessor, Mask2FormerModel
from transformers.models.mask2former.modeling_mask2former import (
    Mask2FormerForUniversalSegmentationOutput,
    Mask2FormerPreTrainedModel,
)

from vargpt.checkpoints.core import weights_digest
from vargpt.eval.clip_model import require_weights_folder
from vargpt.eval.geneval_rules import Detection

# GenEval's ``object_names.txt``: the 80 COCO thing classes in COCO order, with three renames
# (mouse -> computer mouse, remote -> tv remote, keyboard -> computer keyboard). Detector class i maps to name i.
# fmt: off
GENEVAL_CLASS_NAMES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "computer mouse", "tv remote",
    "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock",
    "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)
# fmt: on


@dataclass(frozen=True)
class DetectorSettings:
    """Pre- and post-processing of the detector (defaults: the official mmdet 2.x test pipeline)."""

    shortest_edge: int = 800  # mmdet test pipeline: keep-ratio resize to (1333, 800)
    longest_edge: int = 1333
    # Candidates scoring below this are dropped before GenEval's own rules (which need > 0.3, or > 0.9 when
    # counting); it must not exceed the lowest threshold those rules use.
    score_floor: float = 0.3

    def __post_init__(self) -> None:
        if self.shortest_edge < 1 or self.longest_edge < self.shortest_edge:
            raise ValueError(
                "DetectorSettings needs 1 <= shortest_edge <= longest_edge, "
                f"got {self.shortest_edge}, {self.longest_edge}"
            )
        if not 0.0 <= self.score_floor < 1.0:
            raise ValueError(f"DetectorSettings.score_floor must be in [0, 1), got {self.score_floor}")


class Mask2FormerInstanceSegmenter(Mask2FormerPreTrainedModel):
    """Mask2Former for instance segmentation, inference only (state-dict compatible with the universal model)."""

    _keys_to_ignore_on_load_unexpected = [r"criterion\..*"]

    def __init__(self, config: Mask2FormerConfig) -> None:
        super().__init__(config)
        self.model = Mask2FormerModel(config)
        self.class_predictor = nn.Linear(config.hidden_dim, config.num_labels + 1)
        self.post_init()

    def forward(
        self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None = None
    ) -> Mask2FormerForUniversalSegmentationOutput:
        """Class logits (B, Q, num_labels + 1) and mask logits (B, Q, H/4, W/4) of the last decoder layer."""
        outputs = self.model(
            pixel_values=pixel_values, pixel_mask=pixel_mask, output_hidden_states=True, return_dict=True
        )
        last_queries = outputs.transformer_decoder_intermediate_states[-1].transpose(0, 1)
        return Mask2FormerForUniversalSegmentationOutput(
            class_queries_logits=self.class_predictor(last_queries),
            masks_queries_logits=outputs.masks_queries_logits[-1],
        )


def mask_to_box(mask: np.ndarray) -> tuple[float, float, float, float]:
    """The tight ``xyxy`` box of a boolean mask, exclusive on the right/bottom as mmdet's ``mask2bbox``."""
    rows, columns = np.where(mask)
    if rows.size == 0:
        return (0.0, 0.0, 0.0, 0.0)
    return (float(columns.min()), float(rows.min()), float(columns.max() + 1), float(rows.max() + 1))


class Mask2FormerDetector:
    """Detects GenEval's 80 classes in one image: per class, candidates with boxes, scores and masks."""

    def __init__(
        self,
        model: Mask2FormerInstanceSegmenter,
        processor: Mask2FormerImageProcessor,
        settings: DetectorSettings = DetectorSettings(),
        folder: Path | None = None,
        weights_sha256: str | None = None,
    ) -> None:
        if model.config.num_labels != len(GENEVAL_CLASS_NAMES):
            raise ValueError(
                f"the detector predicts {model.config.num_labels} classes; GenEval needs the 80 COCO thing classes "
                "(a COCO *instance* segmentation checkpoint)"
            )
        self.model = model.eval()
        self.processor = processor
        self.settings = settings
        self.folder = folder
        self.weights_sha256 = weights_sha256

    @classmethod
    def load(
        cls,
        folder: str | os.PathLike,
        device: str | torch.device = "cpu",
        settings: DetectorSettings = DetectorSettings(),
    ) -> Mask2FormerDetector:
        """Load a local Mask2Former COCO-instance folder; a missing folder or weight is an error naming it."""
        path = require_weights_folder(folder, "Mask2Former detector")
        model, info = Mask2FormerInstanceSegmenter.from_pretrained(path, output_loading_info=True)
        problems = {
            key: sorted(info[key]) for key in ("missing_keys", "unexpected_keys", "mismatched_keys") if info[key]
        }
        if problems:
            raise ValueError(f"the Mask2Former weights in {path} do not match the model: {problems}")
        if (path / "preprocessor_config.json").is_file():
            processor = Mask2FormerImageProcessor.from_pretrained(path)
        else:
            processor = Mask2FormerImageProcessor()
        # cached detections never outlive a change of weights
        return cls(model.float().to(torch.device(device)), processor, settings, path, weights_digest(path))

    def identity(self) -> dict[str, Any]:
        """What the detections depend on (for cache keys and reports)."""
        return {
            "detector": "mask2former_hf",
            "folder": self.folder.name if self.folder else None,
            "weights_sha256": self.weights_sha256,
            "num_queries": self.model.config.num_queries,
            **asdict(self.settings),
        }

    @torch.no_grad()
    def detect(self, image: Image.Image) -> dict[str, list[Detection]]:
        """Candidates with score >= ``score_floor``, grouped by GenEval class name, masks at image resolution."""
        rgb = image.convert("RGB")
        size = {"shortest_edge": self.settings.shortest_edge, "longest_edge": self.settings.longest_edge}
        inputs = self.processor(images=[rgb], size=size, return_tensors="pt")
        device = next(self.model.parameters()).device
        pixel_values, pixel_mask = inputs["pixel_values"].to(device), inputs["pixel_mask"].to(device)
        outputs = self.model(pixel_values=pixel_values, pixel_mask=pixel_mask)
        outputs.masks_queries_logits = _without_padding(outputs.masks_queries_logits, pixel_mask)
        result = self.processor.post_process_instance_segmentation(
            outputs,
            threshold=self.settings.score_floor,
            target_sizes=[(rgb.height, rgb.width)],
            return_binary_maps=True,
        )[0]
        detections: dict[str, list[Detection]] = {}
        if not result["segments_info"]:
            return detections
        masks = result["segmentation"].to("cpu").numpy() > 0.5
        for segment, mask in zip(result["segments_info"], masks, strict=True):
            name = GENEVAL_CLASS_NAMES[segment["label_id"]]
            detections.setdefault(name, []).append(
                Detection(box=mask_to_box(mask), score=float(segment["score"]), mask=mask, label=name)
            )
        return detections


def _without_padding(mask_logits: torch.Tensor, pixel_mask: torch.Tensor) -> torch.Tensor:
    """Drop the mask-logit rows/columns that cover the processor's padding (bottom/right, to a multiple of 32),
    so that resizing the masks to the image size does not stretch padding into the image."""
    padded_height, padded_width = pixel_mask.shape[-2:]
    valid_height = int(pixel_mask[0].any(dim=1).sum())
    valid_width = int(pixel_mask[0].any(dim=0).sum())
    logit_height, logit_width = mask_logits.shape[-2:]
    keep_height = math.ceil(valid_height * logit_height / padded_height)
    keep_width = math.ceil(valid_width * logit_width / padded_width)
    return mask_logits[..., :keep_height, :keep_width]
