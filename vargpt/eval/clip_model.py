"""A CLIP model (``transformers.CLIPModel`` + tokenizer + image processor) from a local folder, and its embeddings.

Used by the GenEval colour classifier (OpenAI ViT-L/14, i.e. the HF ``openai/clip-vit-large-patch14`` folder) and
by CLIP score. Nothing is downloaded: a missing folder or file is an error that names it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image


class WeightsNotFoundError(FileNotFoundError):
    """A local weights folder or file is missing; the message names it and what it should contain."""


def require_weights_folder(folder: str | os.PathLike, what: str, required: Sequence[str] = ("config.json",)) -> Path:
    """Return ``folder`` as a Path if it exists and holds ``required`` files, else raise ``WeightsNotFoundError``."""
    path = Path(folder)
    if not path.is_dir():
        raise WeightsNotFoundError(f"{what} weights folder not found: {path} (expected a local Hugging Face folder)")
    missing = [name for name in required if not (path / name).is_file()]
    if missing:
        raise WeightsNotFoundError(f"{what} weights folder {path} lacks {missing}")
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise WeightsNotFoundError(f"{what} weights folder {path} holds no *.safetensors or *.bin weights")
    return path


@dataclass
class ClipEncoder:
    """Projected, L2-normalised CLIP embeddings of texts and images."""

    model: torch.nn.Module
    tokenizer: object
    image_processor: object
    device: torch.device
    folder: Path

    @classmethod
    def load(cls, folder: str | os.PathLike, device: str | torch.device = "cpu") -> ClipEncoder:
        """Load a CLIP folder (``config.json``, weights, tokenizer and ``preprocessor_config.json``) in eval mode."""
        from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

        path = require_weights_folder(folder, "CLIP", ("config.json", "preprocessor_config.json"))
        device = torch.device(device)
        model = CLIPModel.from_pretrained(path).float().to(device).eval()
        return cls(
            model=model,
            tokenizer=CLIPTokenizer.from_pretrained(path),
            image_processor=CLIPImageProcessor.from_pretrained(path),
            device=device,
            folder=path,
        )

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """(N, D) unit-norm text embeddings; texts longer than the model's context are truncated."""
        chunks = []
        for start in range(0, len(texts), batch_size):
            tokens = self.tokenizer(
                list(texts[start : start + batch_size]), padding=True, truncation=True, return_tensors="pt"
            ).to(self.device)
            chunks.append(_projected(self.model.get_text_features(**tokens)))
        return torch.nn.functional.normalize(torch.cat(chunks).float(), dim=-1).cpu()

    @torch.no_grad()
    def encode_images(self, images: Sequence[Image.Image], batch_size: int = 32) -> torch.Tensor:
        """(N, D) unit-norm image embeddings after the model's own resize, centre crop and normalisation."""
        chunks = []
        for start in range(0, len(images), batch_size):
            batch = [image.convert("RGB") for image in images[start : start + batch_size]]
            pixels = self.image_processor(images=batch, return_tensors="pt")["pixel_values"].to(self.device)
            chunks.append(_projected(self.model.get_image_features(pixel_values=pixels)))
        return torch.nn.functional.normalize(torch.cat(chunks).float(), dim=-1).cpu()


def _projected(output: torch.Tensor | object) -> torch.Tensor:
    """``get_*_features`` returns a tensor in transformers 4 and an output whose ``pooler_output`` is it in 5."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output
