"""The Infinity-style next-scale visual decoder: blocks, 2-D RoPE, block-causal masks, bit head, KV cache."""

from vargpt.decoder.cache import DecoderCache
from vargpt.decoder.conditioning import DecoderCondition, concat_conditions
from vargpt.decoder.head import bit_cross_entropy, bit_logits_to_probs, scale_loss_weights
from vargpt.decoder.masks import block_causal_mask, scale_index_per_token
from vargpt.decoder.model import InfinityDecoder
from vargpt.decoder.rope import scale_positions

__all__ = [
    "DecoderCache",
    "DecoderCondition",
    "InfinityDecoder",
    "bit_cross_entropy",
    "bit_logits_to_probs",
    "block_causal_mask",
    "concat_conditions",
    "scale_index_per_token",
    "scale_loss_weights",
    "scale_positions",
]
