"""``Throughput``: samples/s, tokens/s and model FLOP utilisation (MFU) of training, from an analytic FLOP count.

FLOP count (PaLM, Chowdhery et al. 2022, appendix B; the convention of nanoGPT's ``estimate_mfu``): one training
step of a decoder-only transformer costs, per token,

    6 * N  +  12 * L * d * T

where N is the number of matmul parameters the token passes through (embedding tables excluded: a lookup is no
matmul), L the layers, d the width and T the attention context (the sequence length). The 6 is forward (2) +
backward (4); the second term is the attention scores and their weighted sum. We apply it to the two transformers
separately: the LLM over every non-padding token of the batch (T = the padded sequence length), and the visual
decoder over every image token (T = the image's token count, L = sum of h * w over the scale schedule). Frozen
parameters are counted like trainable ones (their activation gradients are still computed, and the convention keeps
numbers comparable across stages); the ViT, the BSQ-VAE and the lm_head's softmax are left out, so MFU is a slight
under-estimate. MFU = achieved FLOP/s per device / ``peak_flops``.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import lightning
import torch
from torch import nn

from vargpt.schedules import token_count


def transformer_training_flops_per_token(matmul_parameters: int, layers: int, width: int, context: int) -> float:
    """FLOPs of one training step per token: ``6 N + 12 L d T`` (PaLM appendix B)."""
    return 6.0 * matmul_parameters + 12.0 * layers * width * context


def matmul_parameter_count(module: nn.Module) -> int:
    """Parameters of ``module`` that multiply activations: everything except embedding tables."""
    embeddings = {id(p) for m in module.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    return sum(p.numel() for p in module.parameters() if id(p) not in embeddings)


@dataclass(frozen=True)
class TransformerShape:
    """What the FLOP formula needs from one transformer."""

    matmul_parameters: int
    layers: int
    width: int


@dataclass(frozen=True)
class VARGPTFlopModel:
    """The analytic training FLOPs of a VARGPT batch: the LLM over its text + image tokens, the decoder over the
    image tokens (see the module docstring)."""

    llm: TransformerShape
    decoder: TransformerShape

    @classmethod
    def from_model(cls, model: Any) -> VARGPTFlopModel:
        """Shapes from a ``vargpt.model.VARGPT`` (its language model, bridge and visual decoder)."""
        language = model.backbone.language_model
        text = model.config.qwen2_vl["text_config"]
        decoder_config = model.config.decoder
        return cls(
            llm=TransformerShape(
                matmul_parameter_count(language) + model.lm_head.weight.numel(),
                int(text["num_hidden_layers"]),
                int(text["hidden_size"]),
            ),
            decoder=TransformerShape(
                matmul_parameter_count(model.decoder) + matmul_parameter_count(model.bridge),
                decoder_config.depth,
                decoder_config.width,
            ),
        )

    def batch_flops(self, llm_tokens: int, sequence_length: int, images: int, tokens_per_image: int) -> float:
        """Training FLOPs of one batch with ``llm_tokens`` non-padding tokens and ``images`` generation targets."""
        llm = transformer_training_flops_per_token(
            self.llm.matmul_parameters, self.llm.layers, self.llm.width, sequence_length
        )
        decoder = transformer_training_flops_per_token(
            self.decoder.matmul_parameters, self.decoder.layers, self.decoder.width, tokens_per_image
        )
        return llm * llm_tokens + decoder * images * tokens_per_image


@dataclass(frozen=True)
class BatchCount:
    """Samples, tokens and image targets in one batch (SFT or preference layout)."""

    samples: int
    llm_tokens: int
    sequence_length: int
    images: int
    tokens_per_image: int


def count_batch(batch: Mapping[str, Any]) -> BatchCount:
    """Count a batch of the data pipeline's contract: every ``*attention_mask`` (a preference batch has one per
    side) adds its non-padding tokens; ``*gen_images`` add image targets of ``gen_schedule``'s token count."""
    masks = [value for key, value in batch.items() if key.endswith("attention_mask") and torch.is_tensor(value)]
    if not masks:
        raise KeyError(f"Throughput needs an attention_mask in the batch; got keys {sorted(batch)}")
    images = sum(
        int(value.shape[0]) for key, value in batch.items() if key.endswith("gen_images") and torch.is_tensor(value)
    )
    schedule = batch.get("gen_schedule")
    return BatchCount(
        samples=int(masks[0].shape[0]),
        llm_tokens=int(sum(int(mask.sum()) for mask in masks)),
        sequence_length=max(int(mask.shape[1]) for mask in masks),
        images=images,
        tokens_per_image=token_count(schedule) if schedule and images else 0,
    )


class Throughput(lightning.Callback):
    """Logs ``throughput/samples_per_s``, ``tokens_per_s``, ``flops_per_s`` (per device) and ``mfu`` every step,
    averaged over the last ``window`` steps (wall clock from batch start to batch end)."""

    def __init__(self, peak_flops: float, window: int = 10) -> None:
        if peak_flops <= 0:
            raise ValueError(f"Throughput peak_flops must be > 0, got {peak_flops}")
        if window < 1:
            raise ValueError(f"Throughput window must be >= 1, got {window}")
        self.peak_flops = peak_flops
        self.window: deque[tuple[float, BatchCount, float]] = deque(maxlen=window)
        self.flop_model: VARGPTFlopModel | None = None
        self._started = 0.0

    def on_train_start(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> None:
        model = getattr(pl_module, "model", None)
        self.flop_model = VARGPTFlopModel.from_model(model) if hasattr(model, "backbone") else None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001 (Lightning hook)
        self._started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        if not isinstance(batch, Mapping) or not any(key.endswith("attention_mask") for key in batch):
            return
        count = count_batch(batch)
        flops = 0.0
        if self.flop_model is not None:
            flops = self.flop_model.batch_flops(
                count.llm_tokens, count.sequence_length, count.images, count.tokens_per_image
            )
        self.window.append((time.perf_counter() - self._started, count, flops))
        seconds = sum(entry[0] for entry in self.window)
        metrics = {
            "throughput/samples_per_s": sum(entry[1].samples for entry in self.window) / seconds,
            "throughput/tokens_per_s": sum(entry[1].llm_tokens for entry in self.window) / seconds,
        }
        if self.flop_model is not None:
            achieved = sum(entry[2] for entry in self.window) / seconds
            metrics["throughput/flops_per_s"] = achieved
            metrics["throughput/mfu"] = achieved / self.peak_flops
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, rank_zero_only=True, batch_size=count.samples)
