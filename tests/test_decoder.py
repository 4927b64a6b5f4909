"""The Infinity decoder: cached steps equal teacher forcing, block causality, conditioning, init, loss helpers."""

import math

import pytest
import torch

from vargpt.config import DecoderConfig
from vargpt.decoder import (
    InfinityDecoder,
    bit_cross_entropy,
    bit_logits_to_probs,
    scale_loss_weights,
)
from vargpt.schedules import scale_schedule, scale_starts, token_count

TINY = dict(depth=2, width=64, heads=4, bits=8, condition_dim=96, pool_heads=2, text_max_tokens=16, num_levels=15)


def perturbed_decoder(seed: int = 0, **overrides) -> InfinityDecoder:
    """A tiny decoder whose near-zero special init is replaced by sizeable random AdaLN, gate and head weights."""
    torch.manual_seed(seed)
    decoder = InfinityDecoder(DecoderConfig(**{**TINY, **overrides}))
    with torch.no_grad():
        for block in decoder.blocks:
            block.adaln_bias.normal_(0, 0.5)
            block.attn.logit_scale.uniform_(math.log(2), math.log(30))
            block.attn.q_bias.normal_(0, 0.1)
            block.attn.v_bias.normal_(0, 0.1)
            block.cross_attn.v_bias.normal_(0, 0.1)
        decoder.shared_adaln.weight.normal_(0, 0.1)
        decoder.head.adaln.weight.normal_(0, 0.1)
        decoder.head.proj.weight.normal_(0, 0.3)
        decoder.head.proj.bias.normal_(0, 0.3)
    return decoder.eval()


def teacher_forced(decoder, condition, next_inputs, schedule):
    x = decoder.embed_inputs(condition.cond, next_inputs)
    return decoder(x, condition.cond, condition.context, condition.context_mask, schedule)


def padded_text(decoder: InfinityDecoder, lengths=(5, 2), seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randn(len(lengths), max(lengths), decoder.config.condition_dim, generator=generator)
    mask = torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]
    return tokens, mask


@pytest.mark.parametrize("schedule", [[(1, 1), (2, 2), (4, 4), (6, 6)], [(2, 1), (4, 2), (6, 3)]])
def test_cached_steps_equal_teacher_forcing_at_every_scale(schedule):
    decoder = perturbed_decoder()
    aspect = schedule[-1][0] / schedule[-1][1]
    condition = decoder.encode_text(*padded_text(decoder))
    batch, length = 2, token_count(schedule)
    next_inputs = torch.randn(batch, length - 1, decoder.config.bits, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        x = decoder.embed_inputs(condition.cond, next_inputs)
        full = decoder(x, condition.cond, condition.context, condition.context_mask, schedule, aspect)
        assert full.shape == (batch, length, 2 * decoder.config.bits)
        assert full.std() > 0.5  # the perturbed model produces non-trivial logits
        cache = decoder.new_cache(batch)
        for k, ((h, w), start) in enumerate(zip(schedule, scale_starts(schedule))):
            x_k = x[:, start : start + h * w]
            logits = decoder.step(
                x_k, k, condition.cond, condition.context, condition.context_mask, schedule, cache, aspect
            )
            assert (logits - full[:, start : start + h * w]).abs().max() <= 1e-4, f"scale {k}"


def test_teacher_forcing_is_block_causal():
    decoder = perturbed_decoder()
    schedule = [(1, 1), (2, 2), (3, 3)]
    condition = decoder.encode_text(*padded_text(decoder))
    inputs = torch.randn(2, token_count(schedule) - 1, decoder.config.bits)
    changed = inputs.clone()
    changed[:, 4:] += 1.0  # the tokens of scale 2 (positions 5.. of the sequence)
    with torch.no_grad():
        before = teacher_forced(decoder, condition, inputs, schedule)
        after = teacher_forced(decoder, condition, changed, schedule)
    assert torch.equal(before[:, :5], after[:, :5])
    assert (before[:, 5:] - after[:, 5:]).abs().max() > 1e-3


def test_context_padding_and_batch_composition_do_not_leak():
    decoder = perturbed_decoder()
    tokens, mask = padded_text(decoder, lengths=(5, 2))
    schedule = [(1, 1), (2, 2)]
    inputs = torch.randn(2, 4, decoder.config.bits)
    with torch.no_grad():
        batched = decoder.encode_text(tokens, mask)
        alone = decoder.encode_text(tokens[1:, :2], mask[1:, :2])  # sample 1 without its padding
        assert torch.allclose(batched.cond[1], alone.cond[0], atol=1e-5)
        noisy = tokens.clone()
        noisy[1, 2:] = 100.0  # garbage in the padded positions must not matter
        garbage = decoder.encode_text(noisy, mask)
        assert torch.allclose(garbage.cond, batched.cond, atol=1e-5)
        logits = teacher_forced(decoder, batched, inputs, schedule)
        assert torch.allclose(logits, teacher_forced(decoder, garbage, inputs, schedule), atol=1e-5)
        single = teacher_forced(decoder, alone, inputs[1:], schedule)
        assert torch.allclose(logits[1:], single, atol=1e-4)


def test_condition_from_vector_is_the_one_token_text_path():
    decoder = perturbed_decoder()
    vector = torch.randn(3, decoder.config.condition_dim)
    with torch.no_grad():
        pooled = decoder.condition_from_vector(vector)
        via_text = decoder.encode_text(vector[:, None], torch.ones(3, 1, dtype=torch.bool)).cond
    assert pooled.shape == (3, decoder.config.width)
    assert torch.allclose(pooled, via_text)


def test_unconditional_tokens_take_the_first_rows_per_sample():
    decoder = perturbed_decoder()
    tokens, mask = decoder.unconditional_tokens([3, 1])
    assert tokens.shape == (2, 3, decoder.config.condition_dim)
    assert mask.tolist() == [[True, True, True], [True, False, False]]
    assert torch.equal(tokens[0], decoder.cfg_uncond[:3]) and torch.equal(tokens[1, 0], decoder.cfg_uncond[0])
    with pytest.raises(ValueError, match="text_max_tokens"):
        decoder.unconditional_tokens([17])


def test_drop_path_is_off_in_eval_and_on_in_training():
    decoder = perturbed_decoder(drop_path=0.5)
    assert decoder.blocks[0].drop_path.p == 0.0 and decoder.blocks[-1].drop_path.p == 0.5
    condition = decoder.encode_text(*padded_text(decoder, lengths=(3,) * 8))
    schedule = [(1, 1), (2, 2)]
    inputs = torch.randn(8, 4, decoder.config.bits)
    with torch.no_grad():
        reference = teacher_forced(decoder, condition, inputs, schedule)
        assert torch.equal(teacher_forced(decoder, condition, inputs, schedule), reference)
        decoder.train()
        torch.manual_seed(5)
        trained = teacher_forced(decoder, condition, inputs, schedule)
    assert not torch.allclose(trained, reference)


def test_reference_initialisation():
    torch.manual_seed(0)
    config = DecoderConfig(depth=4, width=256, heads=2, bits=32, condition_dim=128, text_max_tokens=16)
    decoder = InfinityDecoder(config)
    std = math.sqrt(1 / (3 * config.width))
    assert abs(decoder.word_embed.weight.std().item() - std) < 0.1 * std
    assert abs(decoder.blocks[0].attn.proj.weight.std().item() - std / math.sqrt(8)) < 0.1 * std
    assert abs(decoder.head.proj.weight.std().item() - 0.02 * std) < 0.002 * std
    assert decoder.head.proj.bias.abs().max() == 0 and decoder.head.adaln.bias.abs().max() == 0
    gammas, rest = decoder.blocks[1].adaln_bias[:, :, :2], decoder.blocks[1].adaln_bias[:, :, 2:]
    assert gammas.abs().max() < 5e-6 * 6 / math.sqrt(256) and rest.abs().max() < 1e-3 * 6 / math.sqrt(256)
    assert rest.abs().max() > 1e-3 * 1 / math.sqrt(256)
    assert torch.allclose(decoder.blocks[0].attn.logit_scale, torch.full((1, 2, 1, 1), math.log(4)))
    assert abs(decoder.cfg_uncond.std().item() * math.sqrt(128) - 0.93) < 0.1  # trunc_normal(1.2) cut at +-2
    again = InfinityDecoder(config)
    assert torch.equal(again.cfg_uncond, decoder.cfg_uncond)  # seeded like the reference


def test_inputs_and_steps_are_validated():
    decoder = perturbed_decoder()
    condition = decoder.encode_text(*padded_text(decoder))
    schedule = [(1, 1), (2, 2)]
    with pytest.raises(ValueError, match=r"forward needs inputs \(B, 5, 64\)"):
        decoder(torch.zeros(2, 4, 64), condition.cond, condition.context, condition.context_mask, schedule)
    cache = decoder.new_cache(2)
    x0 = decoder.embed_inputs(condition.cond, None)
    with pytest.raises(ValueError, match="expected scale 0"):
        decoder.step(
            torch.zeros(2, 4, 64), 1, condition.cond, condition.context, condition.context_mask, schedule, cache
        )
    with pytest.raises(ValueError, match="at least one context token"):
        decoder.step(x0, 0, condition.cond, condition.context, torch.zeros(2, 5, dtype=torch.bool), schedule, cache)
    with pytest.raises(ValueError, match="encode_text needs tokens"):
        decoder.encode_text(torch.zeros(2, 3, 7), torch.ones(2, 3, dtype=torch.bool))


def test_bit_cross_entropy_is_mean_binary_cross_entropy():
    torch.manual_seed(0)
    logits, labels = torch.randn(2, 5, 8), torch.randint(0, 2, (2, 5, 4))
    margin = logits[..., 1::2] - logits[..., 0::2]
    expected = torch.nn.functional.binary_cross_entropy_with_logits(margin, labels.float())
    assert torch.allclose(bit_cross_entropy(logits, labels), expected)
    assert torch.allclose(bit_logits_to_probs(logits), torch.sigmoid(margin))


def test_scale_weights_give_each_scale_a_share_proportional_to_its_side():
    schedule = scale_schedule("0.06M")
    weights = scale_loss_weights(schedule)
    assert weights.shape == (521,) and torch.isclose(weights.sum(), torch.tensor(1.0))
    shares = [weights[s : s + h * w].sum().item() for (h, w), s in zip(schedule, scale_starts(schedule))]
    assert shares == pytest.approx([side / 49 for side in (1, 2, 4, 6, 8, 12, 16)])
    logits, labels = torch.randn(3, 521, 4), torch.randint(0, 2, (3, 521, 2))
    per_token = torch.nn.functional.binary_cross_entropy_with_logits(
        logits[..., 1::2] - logits[..., 0::2], labels.float(), reduction="none"
    ).mean(-1)
    assert torch.allclose(bit_cross_entropy(logits, labels, weights), (per_token * weights).sum(-1).mean())


def test_attention_runs_reduced_precision_in_fp32_on_cpu():
    from vargpt.decoder.attention import attention

    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 6, 8, generator=generator) for _ in range(3))
    mask = torch.tril(torch.ones(6, 6, dtype=torch.bool))
    reference = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.5)
    assert torch.equal(attention(q, k, v, mask, 0.5), reference)  # fp32: SDPA itself
    low = [t.to(torch.bfloat16).requires_grad_() for t in (q, k, v)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention(*low, mask, 0.5)
    assert out.dtype == torch.bfloat16
    expected = torch.nn.functional.scaled_dot_product_attention(*(t.float() for t in low), attn_mask=mask, scale=0.5)
    assert torch.equal(out, expected.to(torch.bfloat16))  # attended in fp32, rounded once at the end
    out.float().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.bfloat16 for t in low)
