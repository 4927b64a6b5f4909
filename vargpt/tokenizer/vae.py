"""The BSQ-VAE image tokenizer: a Flux/LDM-style CNN around multi-scale BSQ (INFINITY §1.1-1.3, §1.5).

The encoder maps images in [-1, 1] to raw features (B, d, H/s, W/s) with one 2x downsample per level except the last
(stride s = 16 for the released [1, 2, 4, 4, 4]); multi-scale BSQ turns them into bits per scale; the decoder maps the
sum of the upsampled codes back to pixels. There is no attention, no KL term, no pre-quantization conv or norm.

Sub-module names follow the released checkpoint minus its ``.conv`` / ``.norm`` wrapper level (``encoder.conv_in``,
``encoder.down.{i}.block.{j}.norm1``, ``decoder.up.{i}.upsample.conv``, ...), so ``vargpt.checkpoints.bsq_vae`` maps
it with a two-rule table.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vargpt.config import TokenizerConfig
from vargpt.schedules import Schedule, schedule_for_latent, validate_schedule
from vargpt.tokenizer.multiscale import MultiScaleQuantization, bits_to_f_hat, quantize_multiscale


def swish(x: Tensor) -> Tensor:
    """x * sigmoid(x), computed as the reference computes it: ``F.silu`` rounds differently in about a quarter of
    the elements, which would move the released model's outputs off the reference's."""
    return x * torch.sigmoid(x)


class ResidualBlock(nn.Module):
    """GroupNorm -> swish -> conv3x3, twice, plus a 1x1 shortcut when the channel count changes."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, eps: float) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class Downsample(nn.Module):
    """Zero-pad right and bottom by one, then a 3x3 stride-2 conv without padding (halves H and W)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: residual blocks, then an optional resampling step (named as in the checkpoint)."""

    def __init__(self, blocks: list[ResidualBlock], downsample: nn.Module | None = None,
                 upsample: nn.Module | None = None) -> None:
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.downsample = downsample
        self.upsample = upsample

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        if self.downsample is not None:
            x = self.downsample(x)
        if self.upsample is not None:
            x = self.upsample(x)
        return x


class Middle(nn.Module):
    """Two residual blocks at the lowest resolution (no attention: ``cnn_attention='no'``)."""

    def __init__(self, channels: int, groups: int, eps: float) -> None:
        super().__init__()
        self.block_1 = ResidualBlock(channels, channels, groups, eps)
        self.block_2 = ResidualBlock(channels, channels, groups, eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.block_1(x))


class Encoder(nn.Module):
    """Images (B, 3, H, W) -> raw features (B, d, H/s, W/s)."""

    def __init__(self, config: TokenizerConfig) -> None:
        super().__init__()
        base, mults = config.base_channels, config.encoder_channel_multipliers
        groups, eps = config.group_norm_groups, config.group_norm_eps
        self.conv_in = nn.Conv2d(config.in_channels, base, 3, padding=1)
        levels = []
        channels = base
        for index, mult in enumerate(mults):
            out_channels = base * mult
            blocks = []
            for _ in range(config.encoder_res_blocks):
                blocks.append(ResidualBlock(channels, out_channels, groups, eps))
                channels = out_channels
            downsample = Downsample(channels) if index < len(mults) - 1 else None
            levels.append(Level(blocks, downsample=downsample))
        self.down = nn.ModuleList(levels)
        self.mid = Middle(channels, groups, eps)
        self.norm_out = nn.GroupNorm(groups, channels, eps=eps)
        self.conv_out = nn.Conv2d(channels, config.bits, 3, padding=1)

    def forward(self, images: Tensor) -> Tensor:
        x = self.conv_in(images)
        for level in self.down:
            x = level(x)
        x = self.mid(x)
        return self.conv_out(swish(self.norm_out(x)))


class Decoder(nn.Module):
    """Accumulated codes f_hat (B, d, h, w) -> images (B, 3, h*s, w*s), unclamped."""

    def __init__(self, config: TokenizerConfig) -> None:
        super().__init__()
        base, mults = config.base_channels, config.decoder_channel_multipliers
        groups, eps = config.group_norm_groups, config.group_norm_eps
        channels = base * mults[-1]
        self.conv_in = nn.Conv2d(config.bits, channels, 3, padding=1)
        self.mid = Middle(channels, groups, eps)
        levels: list[Level] = []
        for index in reversed(range(len(mults))):  # built top-down, stored so that up[i] is level i
            out_channels = base * mults[index]
            blocks = []
            for _ in range(config.decoder_res_blocks):
                blocks.append(ResidualBlock(channels, out_channels, groups, eps))
                channels = out_channels
            levels.insert(0, Level(blocks, upsample=Upsample(channels) if index > 0 else None))
        self.up = nn.ModuleList(levels)
        self.norm_out = nn.GroupNorm(groups, channels, eps=eps)
        self.conv_out = nn.Conv2d(channels, config.in_channels, 3, padding=1)

    def forward(self, f_hat: Tensor) -> Tensor:
        x = self.mid(self.conv_in(f_hat))
        for level in reversed(self.up):
            x = level(x)
        return self.conv_out(swish(self.norm_out(x)))


class BSQVAE(nn.Module):
    """Encoder + multi-scale BSQ + decoder. ``encode`` gives bits per scale, ``decode`` turns bits back into images."""

    def __init__(self, config: TokenizerConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    @property
    def stride(self) -> int:
        return self.config.stride

    def latent_size(self, height: int, width: int) -> tuple[int, int]:
        """The latent grid of an image; a size the stride does not divide is an error naming both."""
        if height % self.stride or width % self.stride:
            raise ValueError(
                f"image size {height}x{width} is not divisible by the tokenizer stride {self.stride}; "
                f"use a multiple of {self.stride} on each side"
            )
        return height // self.stride, width // self.stride

    def default_schedule(self, height: int, width: int) -> Schedule:
        """``schedule_for_latent`` of the image's latent grid."""
        return schedule_for_latent(*self.latent_size(height, width))

    def encode_features(self, images: Tensor) -> Tensor:
        """Raw encoder features (B, d, H/s, W/s), fp32, of images (B, 3, H, W) in [-1, 1]."""
        if images.ndim != 4 or images.shape[1] != self.config.in_channels:
            raise ValueError(
                f"images must be (B, {self.config.in_channels}, H, W) in [-1, 1], got shape {tuple(images.shape)}"
            )
        self.latent_size(images.shape[-2], images.shape[-1])
        return self.encoder(images).float()  # the reference quantizes fp32 features whatever the encoder's dtype

    def _schedule_for(self, features: Tensor, schedule: Sequence[Sequence[int]] | None) -> Schedule:
        latent = (features.shape[-2], features.shape[-1])
        if schedule is None:
            return schedule_for_latent(*latent)
        schedule = validate_schedule(schedule)
        if schedule[-1] != latent:
            raise ValueError(
                f"the schedule ends at {schedule[-1][0]}x{schedule[-1][1]} but the images have a "
                f"{latent[0]}x{latent[1]} latent grid (stride {self.stride}); the last scale must equal it"
            )
        return schedule

    def quantize(self, images: Tensor, schedule: Sequence[Sequence[int]] | None = None) -> MultiScaleQuantization:
        """Multi-scale BSQ of the images' features (schedule defaults to ``default_schedule``)."""
        features = self.encode_features(images)
        return quantize_multiscale(features, self._schedule_for(features, schedule))

    @torch.no_grad()
    def encode(self, images: Tensor, schedule: Sequence[Sequence[int]] | None = None) -> list[Tensor]:
        """Bits per scale, each (B, h_k, w_k, d) bool."""
        return self.quantize(images, schedule).bits

    def decode_f_hat(self, f_hat: Tensor) -> Tensor:
        """Images in [-1, 1] from accumulated codes (B, d, h, w)."""
        return self.decoder(f_hat).clamp(-1.0, 1.0)

    def decode(self, bits: Sequence[Tensor]) -> Tensor:
        """Images in [-1, 1] from per-scale bits (the last scale sets the latent grid)."""
        return self.decode_f_hat(bits_to_f_hat(bits, tuple(bits[-1].shape[1:3])))

    def forward(
        self, images: Tensor, schedule: Sequence[Sequence[int]] | None = None
    ) -> tuple[Tensor, MultiScaleQuantization]:
        """Unclamped reconstruction (for a training loss, whose gradients clamping would cut) and the quantization."""
        quantization = self.quantize(images, schedule)
        return self.decoder(quantization.f_hat), quantization
