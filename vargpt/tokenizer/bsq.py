"""Binary spherical quantization (BSQ): one bit per latent channel (INFINITY §1.4).

A latent vector z in R^d is projected onto the unit sphere and snapped to the nearest corner of the scaled
hypercube {-1/sqrt(d), +1/sqrt(d)}^d, which also has unit norm. The implicit codebook has 2^d entries and no
parameters; bit i is 1 exactly when code channel i is positive. Everything here runs in fp32, also under autocast,
as the reference forces (a bf16 sign would flip near-zero bits).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def _fp32(device: torch.device) -> torch.autocast:
    return torch.autocast(device_type=device.type, enabled=False)


def bsq_quantize(z: Tensor) -> tuple[Tensor, Tensor]:
    """Quantize channel-first latents ``z`` (B, d, h, w) to unit-norm binary codes.

    Returns ``(codes, bits)``: ``codes`` (B, d, h, w) fp32 with the straight-through estimator applied to the
    normalized vector u (forward value sign(u)/sqrt(d), gradient of u), and ``bits`` (B, h, w, d) bool, channel-last
    so that ``bits.flatten(1, 2)`` is the token sequence in row-major order. sign(0) counts as -1 (bit 0).
    """
    if z.ndim != 4:
        raise ValueError(f"bsq_quantize expects channel-first latents (B, d, h, w), got shape {tuple(z.shape)}")
    with _fp32(z.device):
        # normalize over a contiguous channel-last copy, as the reference does, so the norm's summation order and
        # hence every float bit match it
        unit = F.normalize(z.float().permute(0, 2, 3, 1).contiguous(), dim=-1)
        corner = torch.where(unit > 0, 1.0, -1.0) * (1.0 / math.sqrt(z.shape[1]))
        codes = unit + (corner - unit).detach()
    return codes.permute(0, 3, 1, 2), unit > 0


def bits_to_codes(bits: Tensor) -> Tensor:
    """Codes (B, d, h, w) fp32 of channel-last bits (B, h, w, d) (bool or {0, 1} ints): (2b - 1)/sqrt(d).

    The result is re-normalized over d like the reference's ``indices_to_codes`` (a mathematical no-op that keeps
    the last float bit identical to it).
    """
    if bits.ndim != 4:
        raise ValueError(f"bits_to_codes expects channel-last bits (B, h, w, d), got shape {tuple(bits.shape)}")
    scale = 1.0 / math.sqrt(bits.shape[-1])
    with _fp32(bits.device):
        codes = torch.where(bits.bool(), scale, -scale).to(torch.float32)
        codes = F.normalize(codes, dim=-1)
    return codes.permute(0, 3, 1, 2)
