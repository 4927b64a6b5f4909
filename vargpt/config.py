"""Dataclass configs for the model components.

Every number has the reference's value as its default (VARGPT-v1.1 with Infinity-2B and the d32 BSQ-VAE) and a
comment saying where it comes from. Small configs for tests and the embedded default override these from YAML.
Validation happens in ``__post_init__`` so a bad value fails when the config is built, before any work starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class ConfigError(ValueError):
    """A config value is invalid; the message names the field and what is allowed."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass
class TokenizerConfig:
    """The BSQ-VAE image tokenizer (INFINITY §1). Defaults: `infinity_vae_d32reg.pth`."""

    bits: int = 32  # d: latent channels = bits per token (INFINITY §1.1)
    base_channels: int = 128  # INFINITY §1.1, fixed for every released variant
    encoder_channel_multipliers: list[int] = field(default_factory=lambda: [1, 2, 4, 4, 4])
    decoder_channel_multipliers: list[int] = field(default_factory=lambda: [1, 2, 4, 4, 4])
    encoder_res_blocks: int = 2  # INFINITY §1.2
    decoder_res_blocks: int = 3  # INFINITY §1.3 (num_res_blocks + 1)
    group_norm_groups: int = 32  # GroupNorm(32, eps 1e-6)
    group_norm_eps: float = 1e-6
    in_channels: int = 3

    def __post_init__(self) -> None:
        _require(self.bits > 0, f"tokenizer.bits must be positive, got {self.bits}")
        for name in ("encoder_channel_multipliers", "decoder_channel_multipliers"):
            mults = getattr(self, name)
            _require(len(mults) >= 1 and all(m > 0 for m in mults), f"tokenizer.{name} must be positive ints, got {mults}")
            for m in mults:
                _require(
                    (self.base_channels * m) % self.group_norm_groups == 0,
                    f"tokenizer.base_channels * {name} ({self.base_channels}*{m}) must be divisible by "
                    f"group_norm_groups={self.group_norm_groups}",
                )
        _require(
            len(self.encoder_channel_multipliers) == len(self.decoder_channel_multipliers),
            "tokenizer.encoder_channel_multipliers and decoder_channel_multipliers must have the same length "
            "(they set the same stride)",
        )

    @property
    def stride(self) -> int:
        """Pixels per latent cell: one 2x downsample per level except the last (16 for [1,2,4,4,4])."""
        return 2 ** (len(self.encoder_channel_multipliers) - 1)


@dataclass
class DecoderConfig:
    """The Infinity-style next-scale visual decoder (INFINITY §3). Defaults: `infinity_2b`."""

    depth: int = 32  # INFINITY §3.1
    width: int = 2048  # C
    heads: int = 16  # head_dim 128
    mlp_ratio: float = 4.0  # FFN hidden = round(C*ratio/256)*256 = 8192
    bits: int = 32  # d, must equal the tokenizer's
    condition_dim: int = 2048  # Ct5: width of the text tokens fed to text_norm, the attentive pool and text_mlp
    pool_heads: int | None = None  # attentive pool heads; None = condition_dim // 128 as the reference (INFINITY §9.14)
    text_max_tokens: int = 512  # rows of the learned unconditional text tokens (cfg_uncond)
    num_levels: int = 15  # level (scale) embedding rows
    drop_path: float = 0.1  # linear 0 -> drop_path over depth
    norm_eps: float = 1e-6
    max_attention_scale: float = 100.0  # cosine attention logit scale is clamped at ln(100)
    rope_base: float = 10000.0
    rope_grid_pn: str = "1M"  # RoPE positions are normalised to the final grid of this schedule (INFINITY §3.5)
    condition_drop: float = 0.1  # classifier-free guidance dropout rate in training (INFINITY §3.2)

    def __post_init__(self) -> None:
        _require(self.depth > 0, f"decoder.depth must be positive, got {self.depth}")
        _require(self.width % self.heads == 0, f"decoder.width={self.width} must be divisible by decoder.heads={self.heads}")
        _require(self.head_dim % 4 == 0, f"decoder head_dim={self.head_dim} must be divisible by 4 (2-D RoPE)")
        _require(
            self.pool_heads is None or self.pool_heads > 0,
            f"decoder.pool_heads must be positive or None, got {self.pool_heads}",
        )
        _require(
            self.width % self.resolved_pool_heads == 0,
            f"decoder.width={self.width} must be divisible by pool_heads={self.resolved_pool_heads} (the attentive "
            "pool attends with width / pool_heads channels per head)",
        )
        _require(self.max_attention_scale > 0, f"decoder.max_attention_scale must be > 0, got {self.max_attention_scale}")
        _require(0.0 <= self.drop_path < 1.0, f"decoder.drop_path must be in [0, 1), got {self.drop_path}")
        _require(0.0 <= self.condition_drop < 1.0, f"decoder.condition_drop must be in [0, 1), got {self.condition_drop}")

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def resolved_pool_heads(self) -> int:
        """Heads of the attentive pool: condition_dim // 128 (// 64 when width > 4096), as `TextAttentivePool`."""
        if self.pool_heads is not None:
            return self.pool_heads
        return max(1, self.condition_dim // (64 if self.width > 4096 else 128))

    @property
    def context_dim(self) -> int:
        """Width of the cross-attention memory: Infinity's `mat_kv` takes D = width inputs (`kv_dim=self.D`)."""
        return self.width

    @property
    def mlp_hidden(self) -> int:
        return int(round(self.width * self.mlp_ratio / 256) * 256) or int(self.width * self.mlp_ratio)


@dataclass
class SamplingConfig:
    """Bit sampling for next-scale generation (VARGPT §2.4; INFINITY §6)."""

    cfg: float = 3.0  # classifier-free guidance on logits: u + cfg * (c - u)
    temperature: float = 0.5  # tau
    top_p: float = 0.97  # per bit: the minority bit is dropped when its probability <= 1 - top_p

    def __post_init__(self) -> None:
        _require(self.cfg >= 0.0, f"sampling.cfg must be >= 0, got {self.cfg}")
        _require(self.temperature > 0.0, f"sampling.temperature must be > 0, got {self.temperature}")
        _require(0.0 < self.top_p <= 1.0, f"sampling.top_p must be in (0, 1], got {self.top_p}")
