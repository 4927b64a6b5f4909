"""The image tokenizer: BSQ quantization, multi-scale residual tokens, bitwise self-correction, the BSQ-VAE CNN."""

from vargpt.tokenizer.bsq import bits_to_codes, bsq_quantize
from vargpt.tokenizer.multiscale import (
    MultiScaleQuantization,
    accumulate_codes,
    bits_to_f_hat,
    copy_bits,
    flatten_bits,
    next_scale_input,
    quantize_multiscale,
    residual_bits,
    split_tokens,
)
from vargpt.tokenizer.self_correction import SelfCorrection, bitwise_self_correction
from vargpt.tokenizer.vae import BSQVAE

__all__ = [
    "BSQVAE",
    "MultiScaleQuantization",
    "SelfCorrection",
    "accumulate_codes",
    "bits_to_codes",
    "bits_to_f_hat",
    "bitwise_self_correction",
    "bsq_quantize",
    "copy_bits",
    "flatten_bits",
    "next_scale_input",
    "quantize_multiscale",
    "residual_bits",
    "split_tokens",
]
