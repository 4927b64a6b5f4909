"""Multi-scale residual BSQ: the definition of an image's tokens (INFINITY §1.5, §3.3, §5).

Scale by scale, the residual between the encoder features and what earlier scales already explain is
area-downsampled to the scale's grid, quantized with BSQ, upsampled back (trilinear with t = 1, i.e. bilinear,
``align_corners=False``, no antialias) and subtracted. The decoder sees ``f_hat``, the sum of the upsampled codes.

The next-scale transformer inputs are built the way Infinity's trainer and sampler build them: the cumulative
``f_hat`` of the scales before k, made from the bits alone, resized to scale k's grid with the same trilinear
interpolation (not the VAE's area ``var_inputs``, INFINITY §9.8). ``accumulate_codes`` and ``next_scale_input`` are
the sampler's steps; ``quantize_multiscale`` uses exactly these functions, so teacher forcing and sampling see
identical inputs for identical bits.

Resizing runs on 5-D (B, d, 1, h, w) tensors like the reference: 2-D bilinear differs from 3-D trilinear in the last
float bits, and the released weights were trained with the latter. Everything is fp32, also under autocast.

Bits are bool tensors (B, h_k, w_k, d) per scale; ``bits.flatten(1, 2)`` gives the row-major token order.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from vargpt.schedules import Schedule, validate_schedule
from vargpt.tokenizer.bsq import bits_to_codes, bsq_quantize


@dataclass
class MultiScaleQuantization:
    """The result of quantizing encoder features over a schedule.

    ``bits``: per scale (B, h_k, w_k, d) bool. ``f_hat``: (B, d, H, W) fp32 sum of the upsampled codes, with
    straight-through gradients to the features (the VAE decoder's input). ``next_inputs``: (B, L - h_0 w_0, d) fp32,
    the decoder's teacher-forcing inputs for scales 1..K-1 (no gradient). ``magnitudes``: per scale (B, h_k, w_k, d)
    fp32, each bit's |z_i| sqrt(d) for the token's residual z normalised to unit length (what BSQ takes the sign
    of): near 0 the bit hardly matters to the code's error, near sqrt(d) it decides it (no gradient).
    ``token_weights``: per scale (B, h_k, w_k, 1) fp32, each token's residual norm over the root mean square of the
    norms of its image's tokens at that scale: BSQ gives every token a code of the same length, but a token whose
    residual is small is one the image hardly needs (no gradient).
    """

    bits: list[Tensor]
    f_hat: Tensor
    next_inputs: Tensor
    schedule: Schedule
    magnitudes: list[Tensor]
    token_weights: list[Tensor]

    @property
    def labels(self) -> Tensor:
        """All scales' bits as one token sequence (B, L, d) bool: the bitwise targets of the decoder."""
        return flatten_bits(self.bits)

    @property
    def label_magnitudes(self) -> Tensor:
        """``magnitudes`` as one token sequence (B, L, d), aligned with ``labels``."""
        return flatten_bits(self.magnitudes)

    @property
    def label_token_weights(self) -> Tensor:
        """``token_weights`` as one token sequence (B, L, 1), aligned with ``labels``."""
        return flatten_bits(self.token_weights)


def _resize(x: Tensor, size: tuple[int, int], mode: str) -> Tensor:
    """Resize (B, d, h, w) to ``size`` through the reference's 5-D interpolation."""
    if mode == "area":
        out = F.interpolate(x.unsqueeze(2), size=(1, *size), mode="area")
    else:
        out = F.interpolate(x.unsqueeze(2), size=(1, *size), mode="trilinear", align_corners=False)
    return out.squeeze(2)


def _fp32(device: torch.device) -> torch.autocast:
    return torch.autocast(device_type=device.type, enabled=False)


def flatten_bits(bits: Sequence[Tensor]) -> Tensor:
    """Concatenate per-scale bits (B, h_k, w_k, d) into the token sequence (B, L, d)."""
    return torch.cat([b.flatten(1, 2) for b in bits], dim=1)


def split_tokens(tokens: Tensor, schedule: Sequence[Sequence[int]]) -> list[Tensor]:
    """Inverse of ``flatten_bits``: (B, L, d) token rows -> per scale (B, h_k, w_k, d)."""
    schedule = validate_schedule(schedule)
    counts = [h * w for h, w in schedule]
    if tokens.ndim != 3 or tokens.shape[1] != sum(counts):
        raise ValueError(
            f"tokens must have shape (B, L={sum(counts)}, d) for schedule {schedule}, got {tuple(tokens.shape)}"
        )
    return [chunk.unflatten(1, hw) for chunk, hw in zip(tokens.split(counts, dim=1), schedule)]


def next_scale_input(f_hat_partial: Tensor, size: Sequence[int]) -> Tensor:
    """Decoder input rows (B, h*w, d) for the scale of grid ``size``, from the cumulative codes (B, d, H, W)."""
    if f_hat_partial.ndim != 4:
        raise ValueError(f"f_hat_partial must be (B, d, H, W), got shape {tuple(f_hat_partial.shape)}")
    with _fp32(f_hat_partial.device):
        resized = _resize(f_hat_partial.float(), (int(size[0]), int(size[1])), "trilinear")
    return resized.flatten(2).transpose(1, 2)


def accumulate_codes(f_hat_partial: Tensor | None, bits_k: Tensor, final: Sequence[int]) -> Tensor:
    """Add scale k's codes, upsampled to the final grid, to the running sum (None before the first scale)."""
    final = (int(final[0]), int(final[1]))
    with _fp32(bits_k.device):
        codes = bits_to_codes(bits_k)
        if tuple(codes.shape[-2:]) != final:
            # one memory layout whatever the strides of bits_k: a 1x1 scale's codes count as both contiguous and
            # channels-last, interpolation keeps whichever it guesses, and the next resize then rounds differently
            codes = _resize(codes, final, "trilinear").contiguous()
        return codes if f_hat_partial is None else f_hat_partial + codes


def _scale_residual(residual: Tensor, size: tuple[int, int], final: tuple[int, int]) -> Tensor:
    """The residual (B, d, H, W) as scale ``size`` sees it: area-downsampled unless it is the final grid."""
    return residual if size == final else _resize(residual, size, "area")


def _bit_weights(scaled: Tensor) -> tuple[Tensor, Tensor]:
    """For a scale's residual (B, d, h, w): each bit's |z_i| sqrt(d) of its token's residual normalised over d, as
    BSQ normalises it (B, h, w, d), and each token's residual norm over the RMS of its image's token norms
    (B, h, w, 1); the norms are computed once for both."""
    scaled = scaled.float()
    norms = scaled.norm(dim=1, keepdim=True).clamp_min(1e-12)  # (B, 1, h, w); F.normalize's epsilon
    magnitudes = scaled.abs() / norms * math.sqrt(scaled.shape[1])
    rms = norms.square().mean(dim=(2, 3), keepdim=True).sqrt()
    return magnitudes.permute(0, 2, 3, 1), (norms / rms).permute(0, 2, 3, 1)


def residual_bits(features: Tensor, f_hat_partial: Tensor | None, size: Sequence[int]) -> Tensor:
    """(B, h, w, d) bool: the bits the scale of grid ``size`` quantizes for raw ``features`` (B, d, H, W) when the
    scales before it accumulated ``f_hat_partial`` (B, d, H, W; None before the first), as the residual loop does."""
    final = tuple(features.shape[-2:])
    size = (int(size[0]), int(size[1]))
    with _fp32(features.device):
        residual = features.float() if f_hat_partial is None else features.float() - f_hat_partial.float()
        return bsq_quantize(_scale_residual(residual, size, final))[1]


def copy_bits(features: Tensor, history: Sequence[Tensor], schedule: Sequence[Sequence[int]]) -> list[Tensor]:
    """Per scale k, the bits (B, h_k, w_k, d) that would reproduce ``features`` (B, d, H, W) on top of the bits
    ``history[:k]`` actually taken before it: where the history agrees with these features they are the features'
    own bits, elsewhere the correction towards them."""
    schedule = validate_schedule(schedule)
    if len(history) < len(schedule) - 1:
        raise ValueError(f"copy_bits needs the bits of the first {len(schedule) - 1} scales, got {len(history)}")
    f_hat = None
    out = []
    for k, size in enumerate(schedule):
        out.append(residual_bits(features, f_hat, size))
        if k + 1 < len(schedule):
            f_hat = accumulate_codes(f_hat, history[k], schedule[-1])
    return out


def bits_to_f_hat(bits: Sequence[Tensor], final: Sequence[int]) -> Tensor:
    """The decoder input (B, d, H, W) of per-scale bits: the sum of their codes upsampled to ``final``."""
    if len(bits) == 0:
        raise ValueError("bits_to_f_hat needs the bits of at least one scale, got none")
    f_hat = None
    for bits_k in bits:
        f_hat = accumulate_codes(f_hat, bits_k, final)
    return f_hat


BitCorruption = Callable[[int, Tensor], Tensor]


def residual_quantize(
    features: Tensor,
    schedule: Sequence[Sequence[int]],
    corrupt: BitCorruption | None = None,
    requantize: bool = True,
) -> tuple[MultiScaleQuantization, list[Tensor]]:
    """The residual loop shared by ``quantize_multiscale`` and bitwise self-correction.

    ``corrupt(k, bits_k)`` may return altered bits for scale k (the history the decoder will see); the next inputs
    are always built from them. With ``requantize`` the altered bits also replace the code at the flipped channels,
    so the next residuals, and hence the next scales' bits, follow the corrupted history; without it the residuals
    follow the clean codes. With no bit altered the arithmetic is that of the clean loop exactly. Returns the
    quantization (``bits`` = the bits of each residual) and the bits actually accumulated into the inputs.
    """
    schedule = validate_schedule(schedule)
    if features.ndim != 4:
        raise ValueError(f"features must be channel-first (B, d, H, W), got shape {tuple(features.shape)}")
    final = schedule[-1]
    if tuple(features.shape[-2:]) != final:
        raise ValueError(
            f"features have a {features.shape[-2]}x{features.shape[-1]} grid but the schedule ends at "
            f"{final[0]}x{final[1]}; the last scale must equal the latent size"
        )
    clean_bits: list[Tensor] = []
    used_bits: list[Tensor] = []
    magnitudes: list[Tensor] = []
    token_weights: list[Tensor] = []
    inputs: list[Tensor] = []
    with _fp32(features.device):
        residual = features.float()
        f_hat = None
        token_f_hat = None
        for k, size in enumerate(schedule):
            scaled = _scale_residual(residual, size, final)
            codes, bits = bsq_quantize(scaled)
            bit_magnitudes, weights = _bit_weights(scaled.detach())
            magnitudes.append(bit_magnitudes)
            token_weights.append(weights)
            used = bits if corrupt is None else corrupt(k, bits)
            if requantize and used is not bits:
                flipped = (used != bits).permute(0, 3, 1, 2)
                codes = torch.where(flipped, bits_to_codes(used), codes)
            # contiguous like the reference's upsampled codes, so f_hat (the decoder input) has its memory layout
            upsampled = codes if size == final else _resize(codes, final, "trilinear").contiguous()
            residual = residual - upsampled.detach()
            f_hat = upsampled if f_hat is None else f_hat + upsampled
            token_f_hat = accumulate_codes(token_f_hat, used, final)
            if k + 1 < len(schedule):
                inputs.append(next_scale_input(token_f_hat, schedule[k + 1]))
            clean_bits.append(bits)
            used_bits.append(used)
    batch, dim = features.shape[:2]
    next_inputs = torch.cat(inputs, dim=1) if inputs else features.new_zeros((batch, 0, dim), dtype=torch.float32)
    quantization = MultiScaleQuantization(
        bits=clean_bits, f_hat=f_hat, next_inputs=next_inputs, schedule=schedule, magnitudes=magnitudes,
        token_weights=token_weights,
    )
    return quantization, used_bits


def quantize_multiscale(features: Tensor, schedule: Sequence[Sequence[int]]) -> MultiScaleQuantization:
    """Quantize raw encoder features (B, d, H, W) over ``schedule`` (whose last scale must be (H, W)).

    Reproduces Infinity's ``MultiScaleBSQ`` bits and ``f_hat``; ``next_inputs`` are the transformer-side inputs.
    """
    return residual_quantize(features, schedule)[0]
