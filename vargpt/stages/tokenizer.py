"""Stage 0, the BSQ-VAE tokenizer (ARCHITECTURE §3): trains the encoder and decoder around multi-scale BSQ.

Losses (weights in ``TokenizerLossConfig``):

* reconstruction: L1 + L2 between the images and the decoder's (unclamped) output, optionally an L1 between their
  spatial finite differences (sharp edges without a perceptual network);
* commitment: || features - f_hat ||^2 with f_hat detached, which keeps the encoder's features near the sum of
  the multi-scale codes that the decoder actually sees (the decoder's input passes gradients straight through);
* entropy (BSQ-style): with per-bit soft probabilities p = sigmoid(4 u / sqrt(d) * inv_temperature) of the
  normalised features u (INFINITY §1.4), the mean per-bit binary entropy is minimised (confident bits) and the
  entropy of each bit's batch-mean probability is maximised (every bit used both ways).

The stage takes a ``BSQVAE`` (not a VARGPT). Batches are images (B, 3, H, W) in [-1, 1], or a dict holding them under
``images`` or ``gen_images`` (the data pipeline's generation targets).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vargpt.stages.base import StageModuleBase
from vargpt.stages.config import StageConfig, TokenizerLossConfig
from vargpt.tokenizer import BSQVAE
from vargpt.tokenizer.multiscale import quantize_multiscale


def binary_entropy(probability: torch.Tensor) -> torch.Tensor:
    """Elementwise entropy (nats) of a Bernoulli(p)."""
    p = probability.clamp(1e-6, 1 - 1e-6)
    return -(p * p.log() + (1 - p) * (1 - p).log())


def bit_probabilities(features: torch.Tensor, inv_temperature: float) -> torch.Tensor:
    """(B, d, H, W) soft probabilities that each bit is 1: sigmoid(4 u / sqrt(d) * inv_temperature), u = the
    features normalised over d (the difference of the squared distances of u to the two codes of that bit)."""
    unit = F.normalize(features.float(), dim=1)
    return torch.sigmoid(4 * unit / math.sqrt(features.shape[1]) * inv_temperature)


def spatial_gradient_l1(reconstruction: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Mean L1 between the horizontal and vertical finite differences of two image batches."""
    dx = (reconstruction.diff(dim=-1) - images.diff(dim=-1)).abs().mean()
    dy = (reconstruction.diff(dim=-2) - images.diff(dim=-2)).abs().mean()
    return dx + dy


def tokenizer_losses(
    vae: BSQVAE, images: torch.Tensor, weights: TokenizerLossConfig, schedule: Any = None
) -> dict[str, torch.Tensor]:
    """Every term of the tokenizer objective and their weighted sum ``loss``."""
    features = vae.encode_features(images)
    if schedule is None:
        schedule = vae.default_schedule(images.shape[-2], images.shape[-1])
    quantization = quantize_multiscale(features, schedule)
    reconstruction = vae.decoder(quantization.f_hat).float()
    images = images.float()
    terms = {
        "l1": (reconstruction - images).abs().mean(),
        "l2": (reconstruction - images).pow(2).mean(),
        "gradient": spatial_gradient_l1(reconstruction, images),
        "commitment": (features - quantization.f_hat.detach()).pow(2).mean(),
    }
    probabilities = bit_probabilities(features, weights.inv_temperature)
    terms["per_bit_entropy"] = binary_entropy(probabilities).mean()
    terms["codebook_entropy"] = binary_entropy(probabilities.mean(dim=(0, 2, 3))).mean()
    loss = (
        weights.l1 * terms["l1"] + weights.l2 * terms["l2"] + weights.gradient * terms["gradient"]
        + weights.commitment * terms["commitment"] + weights.per_bit_entropy * terms["per_bit_entropy"]
        - weights.codebook_entropy * terms["codebook_entropy"]
    )
    return {"loss": loss, **terms}


def batch_images(batch: Any) -> torch.Tensor:
    """The images of a tokenizer batch (see the module docstring)."""
    if isinstance(batch, torch.Tensor):
        return batch
    for name in ("images", "gen_images"):
        if isinstance(batch, dict) and batch.get(name) is not None:
            return batch[name]
    raise ValueError("a tokenizer batch is an image tensor (B, 3, H, W) or a dict with 'images' or 'gen_images'")


class TokenizerStage(StageModuleBase):
    """Trains a ``BSQVAE`` for reconstruction through its multi-scale binary codes."""

    stage_name = "tokenizer"

    def __init__(self, vae: BSQVAE, config: StageConfig) -> None:
        if config.stage != self.stage_name:
            raise ValueError(f"TokenizerStage runs stage 'tokenizer', but config.stage is {config.stage!r}")
        super().__init__(config)
        self.vae = vae
        vae.requires_grad_(True)

    def parameter_groups(self) -> dict[str, dict[str, nn.Parameter]]:
        """One group: the VAE."""
        return {"tokenizer": dict(self.vae.named_parameters(prefix="vae"))}

    def parameter_counts(self) -> dict[str, int]:
        """All of the VAE trains."""
        return {"trainable/tokenizer": sum(p.numel() for p in self.vae.parameters()), "frozen": 0}

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """The weighted tokenizer objective on one image batch."""
        images = batch_images(batch)
        losses = tokenizer_losses(self.vae, images, self.config.tokenizer_losses)
        self.log_losses("train", losses, images.shape[0])
        return losses["loss"]

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """The same terms on validation images."""
        images = batch_images(batch)
        losses = tokenizer_losses(self.vae, images, self.config.tokenizer_losses)
        self.log_losses("val", losses, images.shape[0])
        return losses["loss"]
