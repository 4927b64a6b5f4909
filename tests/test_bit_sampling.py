"""Bit sampling: CFG, temperature, the top-p snap, per-sample seeds; cached generation vs the uncached baseline."""

import math

import pytest
import torch

from vargpt.config import ConfigError, DecoderConfig, SamplingConfig
from vargpt.decoder import InfinityDecoder
from vargpt.sampling import apply_cfg, generate_bits, generate_bits_uncached, sample_bits, sample_scale
from vargpt.schedules import scale_starts
from vargpt.tokenizer.multiscale import accumulate_codes, next_scale_input, quantize_multiscale

TINY = dict(depth=2, width=64, heads=4, bits=8, condition_dim=96, pool_heads=2, text_max_tokens=16)
SCHEDULE = [(1, 1), (2, 2), (4, 4), (6, 6)]


def perturbed_decoder(seed: int = 0) -> InfinityDecoder:
    """A tiny decoder with sizeable AdaLN, gate and head weights, so the logits depend on everything upstream."""
    torch.manual_seed(seed)
    decoder = InfinityDecoder(DecoderConfig(**TINY))
    with torch.no_grad():
        for block in decoder.blocks:
            block.adaln_bias.normal_(0, 0.5)
            block.attn.logit_scale.uniform_(math.log(2), math.log(30))
        decoder.shared_adaln.weight.normal_(0, 0.1)
        decoder.head.adaln.weight.normal_(0, 0.1)
        decoder.head.proj.weight.normal_(0, 0.3)
    return decoder.eval()


def text(decoder, lengths, seed=1):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randn(len(lengths), max(lengths), decoder.config.condition_dim, generator=generator)
    mask = torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]
    return decoder.encode_text(tokens, mask), tokens, mask


def test_apply_cfg_matches_the_reference_mix():
    cond, uncond = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    assert torch.allclose(apply_cfg(cond, uncond, 3.0), 3.0 * cond + (1 - 3.0) * uncond, atol=1e-6)
    assert torch.allclose(apply_cfg(cond, uncond, 1.0), cond, atol=1e-6)
    assert torch.equal(apply_cfg(cond, uncond, 0.0), uncond)


def test_sample_bits_follows_the_tempered_bit_probabilities():
    margin = torch.tensor([-1.0, 0.0, 0.5, 2.0])
    logits = torch.stack((torch.zeros(4), margin), dim=-1).flatten().expand(1, 20000, 8)
    for temperature in (1.0, 0.5):
        bits = sample_bits(logits, temperature, 1.0, [torch.Generator().manual_seed(0)])
        assert bits.shape == (1, 20000, 4) and bits.dtype == torch.bool
        assert torch.allclose(bits.float().mean(dim=(0, 1)), torch.sigmoid(margin / temperature), atol=0.015)


def test_top_p_snaps_confident_bits_to_the_majority():
    minority = torch.tensor([0.02, 0.05, 0.98, 0.5])  # probability that the bit is 1
    logits = torch.stack((torch.zeros(4), torch.logit(minority)), dim=-1).flatten().expand(1, 5000, 8)
    bits = sample_bits(logits, 1.0, 0.97, [torch.Generator().manual_seed(0)]).float().mean(dim=(0, 1))
    assert bits[0] == 0.0 and bits[2] == 1.0  # 0.02 <= 1 - 0.97: snapped
    assert 0.03 < bits[1] < 0.07 and 0.45 < bits[3] < 0.55  # sampled


def test_each_row_draws_from_its_own_generator():
    logits = torch.randn(3, 10, 16)
    batched = sample_bits(logits, 0.7, 0.9, [torch.Generator().manual_seed(s) for s in (4, 5, 6)])
    for row, seed in enumerate((4, 5, 6)):
        single = sample_bits(logits[row : row + 1], 0.7, 0.9, [torch.Generator().manual_seed(seed)])
        assert torch.equal(batched[row : row + 1], single)
    with pytest.raises(ValueError, match="one generator per sample"):
        sample_bits(logits, 1.0, 1.0, [torch.Generator()])
    with pytest.raises(ValueError, match="temperature"):
        sample_bits(logits, 0.0, 1.0, [torch.Generator()] * 3)
    with pytest.raises(ValueError, match="top_p"):
        sample_bits(logits, 1.0, 0.0, [torch.Generator()] * 3)


def test_batched_cfg_generation_equals_per_sample_generation():
    decoder = perturbed_decoder()
    sampling = SamplingConfig(cfg=3.0, temperature=0.5, top_p=0.97)
    condition, tokens, mask = text(decoder, lengths=(5, 2))
    batched = generate_bits(decoder, condition, SCHEDULE, sampling, seeds=[11, 12])
    assert [tuple(b.shape) for b in batched] == [(2, h, w, 8) for h, w in SCHEDULE]
    for row, (seed, length) in enumerate(((11, 5), (12, 2))):
        alone = decoder.encode_text(tokens[row : row + 1, :length], mask[row : row + 1, :length])
        single = generate_bits(decoder, alone, SCHEDULE, sampling, seeds=[seed])
        for k, (b, s) in enumerate(zip(batched, single)):
            assert torch.equal(b[row : row + 1], s), f"sample {row}, scale {k}"


def test_seeds_and_guidance_change_the_bits():
    decoder = perturbed_decoder()
    condition, _, _ = text(decoder, lengths=(4,))
    sampling = SamplingConfig(cfg=3.0, temperature=1.0, top_p=1.0)
    first = torch.cat([b.flatten() for b in generate_bits(decoder, condition, SCHEDULE, sampling, seeds=[1])])
    again = torch.cat([b.flatten() for b in generate_bits(decoder, condition, SCHEDULE, sampling, seeds=[1])])
    other = torch.cat([b.flatten() for b in generate_bits(decoder, condition, SCHEDULE, sampling, seeds=[2])])
    unguided = SamplingConfig(cfg=1.0, temperature=1.0, top_p=1.0)
    plain = torch.cat([b.flatten() for b in generate_bits(decoder, condition, SCHEDULE, unguided, seeds=[1])])
    assert torch.equal(first, again)
    assert (first != other).float().mean() > 0.1
    assert not torch.equal(first, plain)


def test_linear_cfg_schedule_ramps_the_guidance_from_one_to_cfg():
    sampling = SamplingConfig(cfg=3.0, cfg_schedule="linear")
    assert [sampling.cfg_at(k, 4) for k in range(4)] == pytest.approx([1.0, 5 / 3, 7 / 3, 3.0])
    assert sampling.cfg_at(0, 1) == 3.0
    assert SamplingConfig(cfg=3.0).cfg_at(0, 4) == SamplingConfig(cfg=3.0).cfg_at(0, None) == 3.0
    with pytest.raises(ValueError, match="needs the number of scales"):
        sampling.cfg_at(1, None)
    with pytest.raises(ValueError, match="outside a schedule of 4 scales"):
        sampling.cfg_at(4, 4)
    with pytest.raises(ConfigError, match="sampling.cfg_schedule must be one of constant, linear, got 'cosine'"):
        SamplingConfig(cfg_schedule="cosine")


def test_a_scale_on_the_linear_schedule_samples_with_its_own_guidance():
    decoder = perturbed_decoder()
    logits = torch.randn(4, 9, 16)  # 2 conditional rows, then 2 unconditional ones
    ramp = SamplingConfig(cfg=3.0, temperature=0.8, top_p=0.95, cfg_schedule="linear")
    for k, cfg in ((1, 5 / 3), (3, 3.0)):
        generators = [torch.Generator().manual_seed(s) for s in (1, 2)]
        bits, _ = sample_scale(decoder, logits, k, 2, ramp, generators, scales=4)
        fixed = SamplingConfig(cfg=cfg, temperature=0.8, top_p=0.95)
        expected, _ = sample_scale(decoder, logits, k, 2, fixed, [torch.Generator().manual_seed(s) for s in (1, 2)])
        assert torch.equal(bits, expected), f"scale {k}"


def test_linear_cfg_generation_draws_the_first_scale_unguided():
    decoder = perturbed_decoder()
    condition, _, _ = text(decoder, lengths=(4, 2))
    ramp = generate_bits(decoder, condition, SCHEDULE, SamplingConfig(cfg_schedule="linear"), seeds=[3, 4])
    unguided = generate_bits(decoder, condition, SCHEDULE, SamplingConfig(cfg=1.0), seeds=[3, 4])
    constant = generate_bits(decoder, condition, SCHEDULE, SamplingConfig(), seeds=[3, 4])
    assert torch.equal(ramp[0], unguided[0])
    assert not all(torch.equal(a, b) for a, b in zip(ramp, constant))
    uncached = generate_bits_uncached(decoder, condition, SCHEDULE, SamplingConfig(cfg_schedule="linear"), [3, 4])
    assert all(torch.equal(a, b) for a, b in zip(ramp, uncached))


@pytest.mark.parametrize(
    ("schedule", "aspect"), [(SCHEDULE, 1.0), ([(1, 1), (2, 2), (4, 2), (6, 3)], 2.0)], ids=["square", "tall"]
)
def test_uncached_generation_equals_cached_generation(schedule, aspect):
    decoder = perturbed_decoder()
    condition, _, _ = text(decoder, lengths=(5, 3, 1))
    sampling = SamplingConfig(cfg=2.5, temperature=0.8, top_p=0.95)
    cached = generate_bits(decoder, condition, schedule, sampling, seeds=[1, 2, 3], aspect=aspect)
    uncached = generate_bits_uncached(decoder, condition, schedule, sampling, seeds=[1, 2, 3], aspect=aspect)
    for k, (a, b) in enumerate(zip(cached, uncached)):
        assert torch.equal(a, b), f"scale {k}"


def test_default_unconditional_branch_is_the_learned_table_of_the_prompt_length():
    decoder = perturbed_decoder()
    condition, _, mask = text(decoder, lengths=(5, 2))
    tokens, uncond_mask = decoder.unconditional_tokens(mask.sum(1))
    explicit = decoder.encode_text(tokens, uncond_mask)
    sampling = SamplingConfig()
    implicit_bits = generate_bits(decoder, condition, SCHEDULE, sampling, seeds=[7, 8])
    explicit_bits = generate_bits(decoder, condition, SCHEDULE, sampling, seeds=[7, 8], unconditional=explicit)
    assert all(torch.equal(a, b) for a, b in zip(implicit_bits, explicit_bits))


def test_generation_arguments_are_validated():
    decoder = perturbed_decoder()
    condition, _, _ = text(decoder, lengths=(3, 3))
    with pytest.raises(ValueError, match="one seed per sample"):
        generate_bits(decoder, condition, SCHEDULE, SamplingConfig(), seeds=[1])
    with pytest.raises(ValueError, match=r"first scale must be \(1, 1\)"):
        generate_bits(decoder, condition, [(2, 2), (4, 4)], SamplingConfig(), seeds=[1, 2])
    sampling = SamplingConfig()
    sampling.temperature = -1.0
    with pytest.raises(ConfigError, match="sampling.temperature"):
        generate_bits_uncached(decoder, condition, SCHEDULE, sampling, seeds=[1, 2])


def test_sampler_inputs_match_the_tokenizers_teacher_forcing_inputs():
    """The cached loop's per-scale inputs, rebuilt from the bits, give the teacher-forced logits of the same bits."""
    decoder = perturbed_decoder()
    condition, _, _ = text(decoder, lengths=(4, 2))
    features = torch.randn(2, decoder.config.bits, 6, 6, generator=torch.Generator().manual_seed(9))
    tokens = quantize_multiscale(features, SCHEDULE)
    with torch.no_grad():
        x = decoder.embed_inputs(condition.cond, tokens.next_inputs)
        full = decoder(x, condition.cond, condition.context, condition.context_mask, SCHEDULE)
        cache, f_hat = decoder.new_cache(2), None
        x_k = decoder.embed_inputs(condition.cond, None)
        for k, ((h, w), start) in enumerate(zip(SCHEDULE, scale_starts(SCHEDULE))):
            logits = decoder.step(x_k, k, condition.cond, condition.context, condition.context_mask, SCHEDULE, cache)
            assert (logits - full[:, start : start + h * w]).abs().max() <= 1e-4, f"scale {k}"
            if k + 1 < len(SCHEDULE):
                f_hat = accumulate_codes(f_hat, tokens.bits[k], SCHEDULE[-1])
                x_k = decoder.word_embed(next_scale_input(f_hat, SCHEDULE[k + 1]))
