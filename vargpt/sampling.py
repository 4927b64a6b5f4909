"""Next-scale sampling of image bits (INFINITY §6; VARGPT §2.4).

The bit-level pieces are small pure functions: ``apply_cfg`` (classifier-free guidance on logits) and ``sample_bits``
(temperature, the "top-p" snap, per-sample generators). ``sample_scale`` draws one scale's bits from the decoder's
logits: all bits at once, or, for the decoder's ``sequential_scales``, one bit after another (for its
``token_sequential_scales``, one bit after another within every token at once). ``generate_bits`` is the
standalone Infinity loop: conditional and unconditional rows run as one 2B batch through the KV-cached decoder, the
bits are sampled from the guided logits, and the SAME bits feed both halves at the next scale.
``generate_bits_uncached`` recomputes the whole prefix at every scale with the teacher-forced forward: the baseline
for the speed benchmark and a correctness cross-check of the cache.

Reproducibility: sample row i draws its uniforms from its own generator seeded with ``seeds[i]``, so a batch of N
gives the same bits as N single runs with the same seeds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from vargpt.config import SamplingConfig
from vargpt.decoder import DecoderCondition, InfinityDecoder, concat_conditions
from vargpt.schedules import scale_starts, validate_schedule
from vargpt.tokenizer.multiscale import accumulate_codes, next_scale_input


def apply_cfg(cond_logits: torch.Tensor, uncond_logits: torch.Tensor, cfg: float) -> torch.Tensor:
    """Classifier-free guidance on logits: ``uncond + cfg * (cond - uncond)`` (cfg = 1 gives the conditional)."""
    return uncond_logits + cfg * (cond_logits - uncond_logits)


def sample_bits(
    logits: torch.Tensor, temperature: float, top_p: float, generators: Sequence[torch.Generator]
) -> torch.Tensor:
    """Sample (B, n, d) bool bits from (B, n, 2d) logits (pairs: [bit = 0, bit = 1]).

    Each bit is drawn from the softmax of its two logits divided by ``temperature``. "top-p" on two classes is a
    confidence snap (the reference's top-p filter): when the minority bit's probability is <= 1 - top_p, the
    majority bit is taken deterministically. Row i uses ``generators[i]``; the generators advance by n * d draws.
    """
    _check_bit_logits(logits, temperature, top_p)
    _check_generators(logits.shape[0], generators)
    uniforms = draw_uniforms(generators, (logits.shape[1], logits.shape[2] // 2), logits.device)
    return bits_from_uniforms(logits, temperature, top_p, uniforms)


def draw_uniforms(
    generators: Sequence[torch.Generator], shape: tuple[int, ...], device: torch.device | str
) -> torch.Tensor:
    """(B, *shape) uniforms in [0, 1), row i from ``generators[i]``."""
    return torch.stack([torch.rand(shape, generator=g, device=device) for g in generators])


def bits_from_uniforms(
    logits: torch.Tensor, temperature: float, top_p: float, uniforms: torch.Tensor
) -> torch.Tensor:
    """``sample_bits`` with its uniforms (B, n, d) given: bit = uniform < P(bit = 1), after the top-p snap."""
    _check_bit_logits(logits, temperature, top_p)
    pairs = logits.float().unflatten(-1, (-1, 2)) / temperature
    prob_one = torch.softmax(pairs, dim=-1)[..., 1]
    if uniforms.shape != prob_one.shape:
        raise ValueError(f"uniforms must be {tuple(prob_one.shape)} for logits {tuple(logits.shape)}")
    bits = uniforms < prob_one
    minority = torch.minimum(prob_one, 1 - prob_one)
    snap = (minority <= 1 - top_p) & (minority < 0.5)
    return torch.where(snap, prob_one > 0.5, bits)


def _check_bit_logits(logits: torch.Tensor, temperature: float, top_p: float) -> None:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if logits.ndim != 3 or logits.shape[-1] % 2 != 0:
        raise ValueError(f"logits must be (B, n, 2d), got {tuple(logits.shape)}")


def _check_generators(rows: int, generators: Sequence[torch.Generator]) -> None:
    if len(generators) != rows:
        raise ValueError(f"need one generator per sample row: {rows} rows, {len(generators)} generators")


def sample_scale(
    decoder: InfinityDecoder,
    logits: torch.Tensor,
    scale_index: int,
    batch_size: int,
    sampling: SamplingConfig,
    generators: Sequence[torch.Generator],
    forced: torch.Tensor | None = None,
    scales: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bits (B, n, d) of one scale and the conditional logits (B, n, 2d) they were drawn from.

    ``logits`` (B or 2B, n, 2d): the decoder's output for the scale, conditional rows first, then (when
    ``sampling.cfg`` != 1) the unconditional ones; guidance is applied to the logits. ``forced`` (B, n, d): bits to
    take instead of sampling them. ``scales``: how many scales the schedule has, which the guidance of scale
    ``scale_index`` depends on under ``sampling.cfg_schedule: linear`` (``SamplingConfig.cfg_at``). A sequential
    scale (``decoder.is_sequential``) goes bit by bit in raster order: each bit's logits (both halves) are
    conditioned on the bits already taken, so the conditional logits depend on them; a within-token scale
    (``decoder.is_token_sequential``) goes bit by bit inside every token at once. The uniforms are the same n * d
    draws per generator as for a scale sampled all at once.
    """
    guided = sampling.cfg != 1.0  # the unconditional rows are there even at a scale whose own guidance is 1
    cfg = sampling.cfg_at(scale_index, scales)
    tokens, bits_per_token = logits.shape[1], logits.shape[2] // 2

    def choose(step_logits: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
        if guided:
            step_logits = apply_cfg(step_logits[:batch_size], step_logits[batch_size:], cfg)
        return bits_from_uniforms(step_logits, sampling.temperature, sampling.top_p, uniforms)

    sequential = decoder.is_sequential(scale_index)
    within = decoder.is_token_sequential(scale_index)

    def conditioned(bits: torch.Tensor) -> torch.Tensor:  # the conditional logits given the scale's bits
        if sequential:
            return decoder.sequential(logits[:batch_size], bits)
        return decoder.within_tokens(logits[:batch_size], bits) if within else logits[:batch_size]

    if forced is not None:
        bits = forced.bool()
        return bits, conditioned(bits)
    _check_generators(batch_size, generators)
    uniforms = draw_uniforms(generators, (tokens, bits_per_token), logits.device)
    if not (sequential or within):
        return choose(logits, uniforms), logits[:batch_size]
    copies = logits.shape[0] // batch_size
    bits = torch.zeros(batch_size, tokens, bits_per_token, dtype=torch.bool, device=logits.device)
    if within:  # bit b of every token at once, given the token's bits before b
        for b in range(bits_per_token):
            pairs = decoder.within_tokens(logits, bits.repeat(copies, 1, 1), unit=b)  # (rows, n, 2)
            bits[:, :, b] = choose(pairs, uniforms[:, :, b : b + 1])[:, :, 0]
        return bits, conditioned(bits)
    for unit in range(tokens * bits_per_token):
        j, b = divmod(unit, bits_per_token)
        pair = decoder.sequential(logits, bits.repeat(copies, 1, 1), unit=unit)  # (rows, 2)
        bits[:, j, b] = choose(pair[:, None], uniforms[:, j : j + 1, b : b + 1])[:, 0, 0]
    return bits, conditioned(bits)


def _check_sampling(sampling: SamplingConfig) -> SamplingConfig:
    """Re-validate (a config may have been mutated after construction): a copy runs ``__post_init__`` again."""
    return dataclasses.replace(sampling)


def _check_schedule(schedule: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    schedule = validate_schedule(schedule)
    if schedule[0] != (1, 1):
        raise ValueError(f"the first scale must be (1, 1), the single start token; got {schedule[0]}")
    return schedule


def _generators(seeds: Sequence[int], batch_size: int, device: torch.device) -> list[torch.Generator]:
    if len(seeds) != batch_size:
        raise ValueError(f"need one seed per sample: batch {batch_size}, got {len(seeds)} seeds")
    return [torch.Generator(device=device).manual_seed(int(seed)) for seed in seeds]


def _guided_condition(
    decoder: InfinityDecoder, condition: DecoderCondition, unconditional: DecoderCondition | None, cfg: float
) -> DecoderCondition:
    """The batch the decoder runs: conditional rows, then (when cfg != 1) unconditional rows.

    Without an explicit ``unconditional``, each sample's unconditional text is the first rows of the learned
    ``cfg_uncond`` table, as many as the sample has text tokens (Infinity's default).
    """
    if cfg == 1.0:
        return condition
    if unconditional is None:
        tokens, mask = decoder.unconditional_tokens(condition.context_mask.sum(dim=1))
        unconditional = decoder.encode_text(tokens.to(condition.context.dtype), mask)
    if unconditional.batch_size != condition.batch_size:
        raise ValueError(
            f"unconditional batch {unconditional.batch_size} must equal the conditional batch {condition.batch_size}"
        )
    return concat_conditions(condition, unconditional)


@torch.no_grad()
def generate_bits(
    decoder: InfinityDecoder,
    condition: DecoderCondition,
    schedule: Sequence[Sequence[int]],
    sampling: SamplingConfig,
    seeds: Sequence[int],
    unconditional: DecoderCondition | None = None,
    aspect: float = 1.0,
) -> list[torch.Tensor]:
    """Sample per-scale bits [(B, h_k, w_k, d) bool] with the KV-cached decoder, one step per scale."""
    sampling = _check_sampling(sampling)
    schedule = _check_schedule(schedule)
    batch_size = condition.batch_size
    generators = _generators(seeds, batch_size, condition.cond.device)
    batch = _guided_condition(decoder, condition, unconditional, sampling.cfg)
    copies = batch.batch_size // batch_size
    cache = decoder.new_cache(batch.batch_size)
    x = decoder.embed_inputs(batch.cond, None)
    f_hat, all_bits = None, []
    for k, (h, w) in enumerate(schedule):
        logits = decoder.step(x, k, batch.cond, batch.context, batch.context_mask, schedule, cache, aspect)
        bits = sample_scale(decoder, logits, k, batch_size, sampling, generators, scales=len(schedule))[0]
        bits = bits.unflatten(1, (h, w))
        all_bits.append(bits)
        if k + 1 < len(schedule):
            f_hat = accumulate_codes(f_hat, bits, schedule[-1])
            x = decoder.word_embed(next_scale_input(f_hat, schedule[k + 1])).repeat(copies, 1, 1)
    return all_bits


@torch.no_grad()
def generate_bits_uncached(
    decoder: InfinityDecoder,
    condition: DecoderCondition,
    schedule: Sequence[Sequence[int]],
    sampling: SamplingConfig,
    seeds: Sequence[int],
    unconditional: DecoderCondition | None = None,
    aspect: float = 1.0,
) -> list[torch.Tensor]:
    """``generate_bits`` without a KV cache: scale k reruns the teacher-forced forward over scales 0..k."""
    sampling = _check_sampling(sampling)
    schedule = _check_schedule(schedule)
    batch_size = condition.batch_size
    generators = _generators(seeds, batch_size, condition.cond.device)
    batch = _guided_condition(decoder, condition, unconditional, sampling.cfg)
    copies = batch.batch_size // batch_size
    starts = scale_starts(schedule)
    f_hat, all_bits, next_inputs = None, [], []
    for k, (h, w) in enumerate(schedule):
        inputs = torch.cat(next_inputs, dim=1).repeat(copies, 1, 1) if next_inputs else None
        x = decoder.embed_inputs(batch.cond, inputs)
        logits = decoder(x, batch.cond, batch.context, batch.context_mask, schedule[: k + 1], aspect)
        scale_logits = logits[:, starts[k] :]
        bits = sample_scale(decoder, scale_logits, k, batch_size, sampling, generators, scales=len(schedule))[0]
        bits = bits.unflatten(1, (h, w))
        all_bits.append(bits)
        if k + 1 < len(schedule):
            f_hat = accumulate_codes(f_hat, bits, schedule[-1])
            next_inputs.append(next_scale_input(f_hat, schedule[k + 1]))
    return all_bits
