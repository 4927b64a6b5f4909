"""The Infinity next-scale visual decoder (INFINITY §3-4) with a flat list of blocks.

The pieces are separate methods so a unified model can put an LLM between the input embedding and the blocks
(VARGPT §1.8): ``embed_inputs`` builds the token inputs, ``forward`` adds the level embeddings and runs the blocks
and the head. ``step`` is the KV-cached per-scale version of ``forward`` used for generation.

Sequence layout: scale k has h_k * w_k tokens, row-major. Slot 0 holds the start token ``cond + pos_start``; the
tokens of slot k >= 1 are ``word_embed`` of the accumulated codes of scales < k resized to (h_k, w_k). The logits
of slot k predict the bits of scale k.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vargpt.config import DecoderConfig
from vargpt.decoder.attention import key_padding_mask
from vargpt.decoder.block import DecoderBlock, FeedForward
from vargpt.decoder.cache import DecoderCache
from vargpt.decoder.conditioning import AttentivePool, DecoderCondition, RMSNorm
from vargpt.decoder.head import BitHead
from vargpt.decoder.masks import block_causal_mask, scale_index_per_token
from vargpt.decoder.rope import RotaryEmbedding2D
from vargpt.decoder.sequential import SequentialConditioner
from vargpt.schedules import final_grid, scale_starts, token_count, validate_schedule

# Infinity.special_init(aln=1e-3, alng=5e-6, hd0=0.02, diva=1) after init_weights(std=sqrt(1/(3C))) (INFINITY §3.4)
ADALN_INIT = 1e-3
ADALN_GAMMA_INIT = 5e-6
HEAD_INIT = 0.02
UNCOND_INIT_STD = 1.2  # cfg_uncond: trunc_normal(std=1.2, seed 0) / sqrt(condition_dim) (INFINITY §3.2)


class InfinityDecoder(nn.Module):
    """Bitwise next-scale prediction transformer: text conditioning, blocks, AdaLN bit head."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.config = config
        width, cond_dim = config.width, config.condition_dim
        self.cfg_uncond = nn.Parameter(torch.zeros(config.text_max_tokens, cond_dim))
        self.text_norm = RMSNorm(cond_dim, config.norm_eps)
        self.pool = AttentivePool(cond_dim, width, config.resolved_pool_heads)
        self.text_mlp = FeedForward(cond_dim, width, config.context_dim)
        self.pos_start = nn.Parameter(torch.zeros(1, 1, width))
        self.level_embed = nn.Embedding(config.num_levels, width)
        self.word_embed = nn.Linear(config.bits, width)
        self.shared_adaln = nn.Linear(width, 6 * width)
        drop_rates = torch.linspace(0, config.drop_path, config.depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(DecoderBlock(config, rate) for rate in drop_rates)
        self.head = BitHead(width, width, config.bits, config.norm_eps)
        self.rope = RotaryEmbedding2D(config.head_dim, config.rope_base)
        self.sequential: SequentialConditioner | None = None
        self.token_sequential: SequentialConditioner | None = None
        self.source_embed: nn.Linear | None = None
        self.source_gain: nn.Parameter | None = None
        self.reset_parameters()
        # made after the others' init, which therefore does not depend on them
        if config.sequential_scales:
            self.sequential = SequentialConditioner(config.bits, config.sequential_max_tokens, config.sequential_hidden)
        if config.token_sequential_scales:  # one token at a time: the same conditioner with a single token slot
            self.token_sequential = SequentialConditioner(config.bits, 1, config.sequential_hidden)
        if config.source_condition:
            # no random init drawn (the same seed builds the same other weights); zero: the source adds nothing yet
            self.source_embed = torch.nn.utils.skip_init(nn.Linear, config.bits, width, bias=False)
            self.source_gain = nn.Parameter(torch.zeros(config.bits))
            nn.init.zeros_(self.source_embed.weight)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The reference init: `init_weights(std=sqrt(1/(3C)))` followed by `special_init` (INFINITY §3.4)."""
        std = math.sqrt(1 / (3 * self.config.width))
        own = {m for c in (self.sequential, self.token_sequential) if c is not None for m in c.modules()}
        if self.source_embed is not None:
            own.add(self.source_embed)
        for module in self.modules():
            if module in own:
                continue
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=std)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                nn.init.trunc_normal_(module.weight, std=std)
            elif isinstance(module, nn.LayerNorm):
                module.reset_parameters()
        for parameter in (self.pos_start, self.pool.query):
            nn.init.trunc_normal_(parameter, std=std)
        self._init_uncond_tokens()
        proj_scale = 1 / math.sqrt(2 * self.config.depth)
        for block in self.blocks:
            for linear in (block.attn.proj, block.cross_attn.proj, block.mlp.fc2):
                linear.weight.mul_(proj_scale)
            block.adaln_bias.copy_(torch.randn_like(block.adaln_bias) / math.sqrt(self.config.width))
            block.adaln_bias[:, :, :2].mul_(ADALN_GAMMA_INIT)
            block.adaln_bias[:, :, 2:].mul_(ADALN_INIT)
            block.attn.logit_scale.fill_(math.log(4.0))
            for bias in (block.attn.q_bias, block.attn.v_bias, block.cross_attn.v_bias):
                bias.zero_()
        self.pool.v_bias.zero_()
        self.text_norm.weight.fill_(1.0)
        self.head.adaln.weight.mul_(ADALN_INIT)
        self.head.proj.weight.mul_(HEAD_INIT)
        for conditioner in (self.sequential, self.token_sequential):
            if conditioner is not None:
                conditioner.reset_parameters()  # zero output: starts as Infinity's independent bits
        if self.source_embed is not None:
            self.source_embed.weight.zero_()
            self.source_gain.zero_()

    def _init_uncond_tokens(self) -> None:
        if self.cfg_uncond.is_meta:
            return
        generator = torch.Generator().manual_seed(0)
        table = torch.empty(self.cfg_uncond.shape)
        nn.init.trunc_normal_(table, std=UNCOND_INIT_STD, generator=generator)
        self.cfg_uncond.copy_(table / math.sqrt(self.config.condition_dim))

    def encode_text(self, tokens: torch.Tensor, mask: torch.Tensor) -> DecoderCondition:
        """Standalone text path: tokens (B, T, condition_dim) with a (B, T) bool mask -> pooled cond and context."""
        if tokens.ndim != 3 or tokens.shape[-1] != self.config.condition_dim or mask.shape != tokens.shape[:2]:
            raise ValueError(
                f"encode_text needs tokens (B, T, {self.config.condition_dim}) and a (B, T) mask, got "
                f"{tuple(tokens.shape)} and {tuple(mask.shape)}"
            )
        normed = self.text_norm(tokens)
        context = self.text_mlp(normed) * mask[..., None].to(normed.dtype)  # padded rows are masked anyway; zero them
        return DecoderCondition(cond=self.pool(normed, mask), context=context, context_mask=mask)

    def condition_from_vector(self, vector: torch.Tensor) -> torch.Tensor:
        """(B, condition_dim) -> (B, D): norm + pool over a one-token sequence (VARGPT's start-of-image condition)."""
        tokens = vector[:, None, :]
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=vector.device)
        return self.pool(self.text_norm(tokens), mask)

    def unconditional_tokens(self, lengths: Sequence[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows [:length_i] of the learned unconditional table: tokens (B, T_max, condition_dim), mask (B, T_max)."""
        lengths = torch.as_tensor(lengths, device=self.cfg_uncond.device).long().flatten()
        if lengths.numel() == 0 or int(lengths.min()) < 1 or int(lengths.max()) > self.cfg_uncond.shape[0]:
            raise ValueError(
                f"unconditional lengths must be in [1, {self.cfg_uncond.shape[0]}] (text_max_tokens), got "
                f"{lengths.tolist()}"
            )
        longest = int(lengths.max())
        tokens = self.cfg_uncond[:longest].unsqueeze(0).expand(len(lengths), -1, -1)
        mask = torch.arange(longest, device=lengths.device)[None, :] < lengths[:, None]
        return tokens, mask


    def embed_inputs(self, cond: torch.Tensor, next_inputs: torch.Tensor | None) -> torch.Tensor:
        """(B, 1 + L - 1, C): the start token ``cond + pos_start`` followed by ``word_embed(next_inputs)``.

        ``next_inputs`` (B, L - 1, d) are the accumulated codes of the earlier scales, resized to each scale k >= 1.
        """
        start = cond[:, None, :] + self.pos_start
        if next_inputs is None:
            return start
        return torch.cat((start, self.word_embed(next_inputs).to(start.dtype)), dim=1)

    def embed_source(self, bits: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
        """(B, n, C) addition to the decoder tokens of an edit's input image (``config.source_condition``).

        ``bits`` (B, n, d) bool are the source's copy bits at the same token positions (``tokenizer.copy_bits``: the
        bits each scale would take to reproduce the input image on top of the history so far); rows where
        ``present`` (B,) is false add zero (samples without an input image).
        """
        codes = self._source_signs(bits, present) / math.sqrt(self.config.bits)  # the scale of the tokens' own inputs
        return self.source_embed(codes.to(self.source_embed.weight.dtype))

    def add_source_logits(
        self, logits: torch.Tensor, bits: torch.Tensor, present: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``logits`` (B, n, 2d) with each bit's pair moved by the learned ``source_gain`` towards the source's copy
        bit (``embed_source``'s ``bits``): a copy prior the model overrides where the edit changes the image."""
        shift = (self.source_gain.float() * self._source_signs(bits, present) / 2).to(logits.dtype)
        pairs = logits.unflatten(-1, (-1, 2))
        return (pairs + torch.stack((-shift, shift), dim=-1)).flatten(-2)

    def _source_signs(self, bits: torch.Tensor, present: torch.Tensor | None) -> torch.Tensor:
        """(B, n, d) fp32 +-1 of the source bits, zero on rows not ``present``."""
        if self.source_embed is None:
            raise ValueError("the decoder has no source embedding: set decoder.source_condition=true")
        if bits.ndim != 3 or bits.shape[-1] != self.config.bits:
            raise ValueError(f"source bits must be (B, n, {self.config.bits}), got {tuple(bits.shape)}")
        signs = bits.float() * 2 - 1
        if present is not None:
            signs = signs * present.to(signs.device, signs.dtype).view(-1, 1, 1)
        return signs

    def forward(
        self,
        x: torch.Tensor,
        cond: torch.Tensor,
        context: torch.Tensor,
        context_mask: torch.Tensor,
        schedule: Sequence[Sequence[int]],
        aspect: float = 1.0,
    ) -> torch.Tensor:
        """Teacher-forced logits (B, L, 2d) for the embedded inputs x (B, L, C) of all scales of ``schedule``.

        ``aspect`` (h / w of the image) selects the RoPE reference grid; pass the image's, also for a prefix schedule.
        """
        schedule = validate_schedule(schedule)
        self._check_tokens(x, token_count(schedule), "forward")
        x = x + self.level_embed(scale_index_per_token(schedule, x.device))
        adaln = self._shared_adaln(cond)
        cos, sin = self.rope.tables(schedule, self._rope_grid(aspect), x.device)
        attn_mask = block_causal_mask(schedule, x.device)
        padding_mask = key_padding_mask(context_mask)
        for block in self.blocks:
            context_kv = block.cross_attn.project_context(context)
            x = block(x, adaln, cos, sin, attn_mask, context_kv, padding_mask)
        return self.head(x, cond)

    def is_sequential(self, scale_index: int) -> bool:
        """Whether scale ``scale_index``'s bits are sampled one after another (``config.sequential_scales``)."""
        return self.sequential is not None and scale_index in self.config.sequential_scales

    def is_token_sequential(self, scale_index: int) -> bool:
        """Whether scale ``scale_index``'s tokens are drawn bit by bit within each token
        (``config.token_sequential_scales``)."""
        return self.token_sequential is not None and scale_index in self.config.token_sequential_scales

    def within_tokens(self, logits: torch.Tensor, bits: torch.Tensor, unit: int | None = None) -> torch.Tensor:
        """Logits (B, n, 2d) with each bit conditioned on its own token's earlier ``bits`` (B, n, d) (fp32); with
        ``unit`` = b, just bit b's pair of every token (B, n, 2) (the sampler's step, all tokens at once)."""
        if self.token_sequential is None:
            raise ValueError("the decoder has no within-token conditioner: set decoder.token_sequential_scales")
        batch, tokens = logits.shape[:2]
        out = self.token_sequential(logits.flatten(0, 1)[:, None], bits.flatten(0, 1)[:, None], unit=unit)
        return out.view(batch, tokens, -1)

    def sequential_logits(
        self, logits: torch.Tensor, bits: torch.Tensor, schedule: Sequence[Sequence[int]]
    ) -> torch.Tensor:
        """Teacher forcing for the sequential scales: logits (B, L, 2d) of a whole schedule with each sequential
        scale's bits conditioned on the scale's earlier ``bits`` (B, L, d), each within-token scale's bits on their
        token's earlier bits; other scales unchanged."""
        if self.sequential is None and self.token_sequential is None:
            return logits
        schedule = validate_schedule(schedule)
        starts = scale_starts(schedule)
        for k in range(len(schedule)):
            start, end = starts[k], starts[k] + schedule[k][0] * schedule[k][1]
            if self.is_sequential(k):
                adjusted = self.sequential(logits[:, start:end], bits[:, start:end])
            elif self.is_token_sequential(k):
                adjusted = self.within_tokens(logits[:, start:end], bits[:, start:end])
            else:
                continue
            logits = torch.cat((logits[:, :start], adjusted.to(logits.dtype), logits[:, end:]), dim=1)
        return logits

    def new_cache(self, batch_size: int) -> DecoderCache:
        """An empty KV cache for one generation of ``batch_size`` rows (CFG counts both halves)."""
        return DecoderCache(batch_size, len(self.blocks))

    def step(
        self,
        x_k: torch.Tensor,
        scale_index: int,
        cond: torch.Tensor,
        context: torch.Tensor,
        context_mask: torch.Tensor,
        schedule: Sequence[Sequence[int]],
        cache: DecoderCache,
        aspect: float = 1.0,
    ) -> torch.Tensor:
        """Logits (B, n_k, 2d) of scale ``scale_index`` from its embedded inputs x_k (B, n_k, C), appending its K/V.

        Scales must be stepped in order 0, 1, ... with the same cache, condition and context.
        """
        schedule = validate_schedule(schedule)
        if scale_index != cache.next_scale or scale_index >= len(schedule):
            raise ValueError(
                f"step expected scale {cache.next_scale} of a {len(schedule)}-scale schedule, got scale {scale_index}"
            )
        if x_k.shape[0] != cache.batch_size:
            raise ValueError(f"x_k has batch {x_k.shape[0]} but the cache was made for {cache.batch_size}")
        h, w = schedule[scale_index]
        self._check_tokens(x_k, h * w, f"step (scale {scale_index} is {h}x{w})")
        start = scale_starts(schedule)[scale_index]
        if scale_index == 0:
            cache.capacity = token_count(schedule)
            cache.adaln = self._shared_adaln(cond)
            cache.context_kv = [block.cross_attn.project_context(context) for block in self.blocks]
        x = x_k + self.level_embed.weight[scale_index]
        cos, sin = self.rope.tables(schedule, self._rope_grid(aspect), x.device)
        cos, sin = cos[start : start + h * w], sin[start : start + h * w]
        padding_mask = key_padding_mask(context_mask)
        for block, layer_cache, context_kv in zip(self.blocks, cache.layers, cache.context_kv):
            x = block(x, cache.adaln, cos, sin, None, context_kv, padding_mask, layer_cache, cache.capacity)
        cache.next_scale += 1
        return self.head(x, cond)


    def _shared_adaln(self, cond: torch.Tensor) -> torch.Tensor:
        """(B, D) -> (B, 1, 6, C): SiLU -> Linear shared by all blocks (g1, g2, scale1, scale2, shift1, shift2)."""
        return self.shared_adaln(F.silu(cond)).unflatten(-1, (6, -1)).unsqueeze(1)

    def _rope_grid(self, aspect: float) -> tuple[int, int]:
        return final_grid(aspect, pn=self.config.rope_grid_pn)

    def _check_tokens(self, x: torch.Tensor, length: int, where: str) -> None:
        if x.ndim != 3 or x.shape[1] != length or x.shape[2] != self.config.width:
            raise ValueError(f"{where} needs inputs (B, {length}, {self.config.width}), got {tuple(x.shape)}")
