"""Bitwise self-correction (BSC): teacher forcing on a corrupted history (INFINITY §5; VARGPT §3.3).

At every scale the clean bits of the residual are the label, but a random fraction p of them is flipped before
they are accumulated. The next residual is taken against the corrupted sum, so the later scales' labels are the bits
that *correct* the earlier mistakes, and the decoder's inputs are built from the corrupted bits exactly as the
sampler builds them from its own (imperfect) samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from vargpt.tokenizer.multiscale import flatten_bits, residual_quantize

# The reference's defaults (INFINITY §5, VARGPT §3.3): noise_apply_strength=0.3, noise_apply_layers=13.
DEFAULT_MAX_FLIP = 0.3
DEFAULT_NOISE_SCALES = 13
FLIP_RATE_STEP = 0.01  # p is drawn from {0, 0.01, ..., max_flip}


@dataclass
class SelfCorrection:
    """Decoder targets and inputs under bitwise self-correction.

    ``labels`` (B, L, d) bool: the clean bits of each scale's residual given the corrupted history. ``inputs``
    (B, L - h_0 w_0, d) fp32: next-scale inputs built from the corrupted cumulative codes. ``flip_rates`` (B, K):
    the p drawn per sample and scale (0 where no noise was applied). ``corrupted_bits``: per scale (B, h, w, d), the
    bits the inputs were built from. ``magnitudes`` (B, L, d) fp32: each label's |z_i| sqrt(d)
    (``MultiScaleQuantization.magnitudes``), the weights of ``bit_loss_weights='magnitude'``. ``token_weights``
    (B, L, 1) fp32: each label's token's relative residual norm (``MultiScaleQuantization.token_weights``), which
    ``bit_loss_weights='residual'`` multiplies them by.
    """

    labels: Tensor
    inputs: Tensor
    flip_rates: Tensor
    corrupted_bits: list[Tensor]
    magnitudes: Tensor
    token_weights: Tensor


def _check_arguments(features: Tensor, generator: torch.Generator | None, max_flip: float, noise_scales: int) -> None:
    if not 0.0 <= max_flip <= 1.0:
        raise ValueError(f"max_flip must be a flip probability in [0, 1], got {max_flip}")
    if isinstance(noise_scales, bool) or not isinstance(noise_scales, int) or noise_scales < 0:
        raise ValueError(f"noise_scales must be an int >= 0 (how many leading scales get noise), got {noise_scales!r}")
    if generator is not None and generator.device.type != features.device.type:
        raise ValueError(
            f"the generator lives on {generator.device} but the features on {features.device}; pass a generator "
            "created on the features' device (torch.Generator(device=features.device))"
        )


def bitwise_self_correction(
    features: Tensor,
    schedule: Sequence[Sequence[int]],
    generator: torch.Generator | None,
    max_flip: float = DEFAULT_MAX_FLIP,
    noise_scales: int = DEFAULT_NOISE_SCALES,
    requantize: bool = True,
) -> SelfCorrection:
    """Labels and inputs for the decoder from raw encoder features (B, d, H, W) with a corrupted history.

    For each of the first ``noise_scales`` scales a flip rate p is drawn *per sample* from {0, 0.01, ..., max_flip}
    and each bit of that sample's scale is flipped with probability p. Both draws use ``generator`` on the features'
    device, so one seed gives identical corruption everywhere (e.g. DPO's policy and reference see the same inputs).
    This improves on the reference, which drew p once per scale for the whole batch from numpy's global RNG and made
    the mask on the CPU (INFINITY §9.11). ``generator=None`` or ``max_flip=0`` corrupts nothing: the labels and inputs
    then equal ``quantize_multiscale``'s bits and next inputs exactly.

    ``requantize=True`` (the reference's ``noise_apply_requant=1``) accumulates the flipped codes, so the next
    residuals follow the corrupted history. ``requantize=False`` keeps the clean residuals and labels and corrupts only
    the inputs (plain input noise; the reference's flag there discarded the flips altogether).
    """
    _check_arguments(features, generator, max_flip, noise_scales)
    features = features.detach()
    batch = features.shape[0]
    flip_rates = torch.zeros(batch, len(schedule), device=features.device)
    steps = round(max_flip / FLIP_RATE_STEP)

    def corrupt(k: int, bits: Tensor) -> Tensor:
        if generator is None or k >= noise_scales:
            return bits
        rate = torch.randint(0, steps + 1, (batch,), generator=generator, device=bits.device) * FLIP_RATE_STEP
        flip_rates[:, k] = rate
        flip = torch.rand(bits.shape, generator=generator, device=bits.device) < rate.view(batch, 1, 1, 1)
        return bits ^ flip

    quantization, corrupted = residual_quantize(features, schedule, corrupt=corrupt, requantize=requantize)
    return SelfCorrection(
        labels=flatten_bits(quantization.bits),
        inputs=quantization.next_inputs,
        flip_rates=flip_rates,
        corrupted_bits=corrupted,
        magnitudes=quantization.label_magnitudes,
        token_weights=quantization.label_token_weights,
    )
