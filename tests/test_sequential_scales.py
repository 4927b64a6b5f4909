"""Bit-by-bit sampling inside chosen scales (decoder.sequential_scales): causality, teacher forcing = sampling, and
a scale whose bits must agree is learnt and sampled jointly."""

from __future__ import annotations

import pytest
import torch
from helpers_tiny_model import TINY_SCHEDULE, make_batch, tiny_image, tiny_model

from vargpt.config import ConfigError, DecoderConfig, SamplingConfig
from vargpt.decoder import InfinityDecoder
from vargpt.decoder.sequential import SequentialConditioner
from vargpt.generation import _generate
from vargpt.sampling import bits_from_uniforms, draw_uniforms, sample_bits, sample_scale
from vargpt.schedules import scale_starts

TINY = dict(depth=2, width=64, heads=4, bits=8, condition_dim=96, pool_heads=2, text_max_tokens=16)


def _randomised(module: SequentialConditioner, seed: int = 0) -> SequentialConditioner:
    torch.manual_seed(seed)
    with torch.no_grad():
        module.out.weight.normal_(0, 0.5)
        module.out.bias.normal_(0, 0.5)
    return module


def test_untrained_conditioner_leaves_the_logits_unchanged() -> None:
    module = SequentialConditioner(bits=8, max_tokens=4, hidden=32)
    logits, bits = torch.randn(3, 4, 16), torch.rand(3, 4, 8) < 0.5
    assert torch.equal(module(logits, bits), logits)


def test_each_bit_sees_only_the_bits_before_it() -> None:
    module = _randomised(SequentialConditioner(bits=8, max_tokens=4, hidden=32))
    logits, bits = torch.randn(2, 4, 16), torch.rand(2, 4, 8) < 0.5
    reference = module(logits, bits)
    for unit in range(32):
        changed = bits.clone().flatten(1)
        changed[:, unit:] = ~changed[:, unit:]
        out = module(logits, changed.unflatten(1, (4, 8))).unflatten(-1, (-1, 2)).flatten(1, 2)  # (B, 32, 2)
        flat = reference.unflatten(-1, (-1, 2)).flatten(1, 2)
        assert torch.equal(out[:, : unit + 1], flat[:, : unit + 1]), unit  # bits <= u cannot see bits >= u
        if unit < 31:
            assert not torch.allclose(out[:, unit + 1 :], flat[:, unit + 1 :])
        # the sampler's one-bit step gives the same pair
        assert torch.allclose(module(logits, bits, unit=unit), flat[:, unit], atol=1e-6), unit


def test_shapes_and_sizes_are_checked() -> None:
    module = SequentialConditioner(bits=8, max_tokens=4, hidden=32)
    with pytest.raises(ValueError, match="sequential_max_tokens is 4"):
        module(torch.randn(1, 9, 16), torch.zeros(1, 9, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="bits"):
        module(torch.randn(1, 4, 16), torch.zeros(1, 4, 7, dtype=torch.bool))
    for bad in ([1, 1], [-1], [True]):
        with pytest.raises(ConfigError, match="sequential_scales"):
            DecoderConfig(**TINY, sequential_scales=bad)


def test_default_decoder_has_no_conditioner_and_the_same_parameters() -> None:
    torch.manual_seed(0)
    plain = InfinityDecoder(DecoderConfig(**TINY))
    torch.manual_seed(0)
    sequential = InfinityDecoder(DecoderConfig(**TINY, sequential_scales=[1]))
    assert plain.sequential is None and not plain.is_sequential(1)
    assert sequential.is_sequential(1) and not sequential.is_sequential(0)
    extra = set(sequential.state_dict()) - set(plain.state_dict())
    assert extra and all(key.startswith("sequential.") for key in extra)
    for key, value in plain.state_dict().items():  # adding the module does not change anyone else's init
        assert torch.equal(value, sequential.state_dict()[key]), key


def test_sequential_sampling_draws_each_token_from_its_teacher_forced_logits() -> None:
    decoder = InfinityDecoder(DecoderConfig(**TINY, sequential_scales=[1]))
    _randomised(decoder.sequential)
    logits = torch.randn(4, 4, 16)  # 2 conditional + 2 unconditional rows
    sampling = SamplingConfig(cfg=2.0, temperature=0.7, top_p=0.99)
    bits, cond_logits = sample_scale(decoder, logits, 1, 2, sampling, [torch.Generator().manual_seed(s) for s in (1, 2)])
    # the logits each token was drawn from are the teacher-forced ones given the bits drawn for earlier tokens
    forced = decoder.sequential(logits, bits.repeat(2, 1, 1))
    assert torch.allclose(cond_logits, forced[:2])
    guided = forced[2:] + 2.0 * (forced[:2] - forced[2:])
    uniforms = draw_uniforms([torch.Generator().manual_seed(s) for s in (1, 2)], (4, 8), "cpu")
    assert torch.equal(bits, bits_from_uniforms(guided, 0.7, 0.99, uniforms))
    # given bits are kept, and the logits are conditioned on them
    given, given_logits = sample_scale(decoder, logits, 1, 2, sampling, [], forced=~bits)
    assert torch.equal(given, ~bits) and torch.allclose(given_logits, decoder.sequential(logits[:2], ~bits))


def test_a_scale_sampled_all_at_once_is_unchanged() -> None:
    decoder = InfinityDecoder(DecoderConfig(**TINY, sequential_scales=[1]))
    logits = torch.randn(2, 16, 16)
    sampling = SamplingConfig(cfg=1.0, temperature=0.7, top_p=0.99)
    bits, cond_logits = sample_scale(decoder, logits, 2, 2, sampling, [torch.Generator().manual_seed(s) for s in (1, 2)])
    expected = sample_bits(logits, 0.7, 0.99, [torch.Generator().manual_seed(s) for s in (1, 2)])
    assert torch.equal(bits, expected) and torch.equal(cond_logits, logits)


def test_a_scale_whose_bits_must_agree_is_sampled_jointly_once_learnt() -> None:
    """One of 4 tokens, at a random place, is an object (bit 0 set) of one of 3 colours (exactly one of bits 1-3
    set); the other tokens are all 0; the base logits carry no information. Independent bits at the true marginals
    (1/4 for bit 0, 1/12 for each colour bit) give such a scene 4 (1/4) (3/4)^3 * 3 (1/12) (11/12)^2 * (11/12)^9 = 4%
    of the time; bits that see the bits before them learn the joint."""
    torch.manual_seed(0)
    module = SequentialConditioner(bits=4, max_tokens=4, hidden=64)
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-2)
    base = torch.zeros(256, 4, 8)

    def scenes() -> torch.Tensor:
        place, colour = torch.randint(0, 4, (256,)), torch.randint(1, 4, (256,))
        on = torch.arange(4)[None, :] == place[:, None]
        code = torch.arange(4)[None, :] == colour[:, None]
        code[:, 0] = True
        return on[..., None] & code[:, None, :]

    for _ in range(200):
        labels = scenes()
        logits = module(base, labels).unflatten(-1, (-1, 2))
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 2), labels.flatten().long())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    decoder = InfinityDecoder(DecoderConfig(**{**TINY, "bits": 4}, sequential_scales=[1], sequential_hidden=64))
    decoder.sequential.load_state_dict(module.state_dict())
    sampling = SamplingConfig(cfg=1.0, temperature=1.0, top_p=1.0)
    generators = [torch.Generator().manual_seed(s) for s in range(256)]
    with torch.no_grad():
        joint, _ = sample_scale(decoder, base, 1, 256, sampling, generators)
        independent = torch.tensor([1 / 4, 1 / 12, 1 / 12, 1 / 12]).repeat(256, 4, 1)  # P(bit = 1), the marginals
        pairs = torch.stack((1 - independent, independent), dim=-1).log().flatten(2)
        alone = sample_bits(pairs, 1.0, 1.0, generators)

    def valid(bits: torch.Tensor) -> float:
        objects = bits[..., 0]
        one_object = objects.sum(-1) == 1
        one_colour = (bits[..., 1:].sum(-1) == objects.long()).all(-1)
        return float((one_object & one_colour).float().mean())

    assert valid(joint) > 0.9, valid(joint)
    assert valid(alone) < 0.1, valid(alone)


@pytest.mark.parametrize(
    "scales", [{"sequential_scales": [1]}, {"sequential_scales": [0], "token_sequential_scales": [2]}]
)
def test_cached_sampling_equals_teacher_forcing_in_the_unified_model(scales: dict) -> None:
    decoder = DecoderConfig(depth=2, width=64, heads=2, bits=16, condition_dim=64, pool_heads=2, text_max_tokens=256,
                            drop_path=0.0, **scales)
    model = tiny_model(condition_drop=0.0, decoder=decoder)
    for conditioner in (model.decoder.sequential, model.decoder.token_sequential):
        if conditioner is not None:
            _randomised(conditioner)
    target = tiny_image(3)
    bits = model.tokenizer.encode(target[None], TINY_SCHEDULE)
    sample = {"messages": [{"role": "user", "content": "a red circle"}, {"role": "assistant", "content": "<image_gen>"}],
              "targets": [target], "inputs": []}
    forced = model.training_forward(make_batch([sample])).bit_logits
    cached = _generate(model, ["a red circle"], 3.0, 0.5, 0.97, 0, None, 1.0, None, None, forced_bits=bits)[1]
    starts = scale_starts(TINY_SCHEDULE)
    for k, (h, w) in enumerate(TINY_SCHEDULE):
        assert torch.allclose(cached.cond_logits[k], forced[:, starts[k] : starts[k] + h * w], atol=1e-4), k
    free = _generate(model, ["a red circle"], 3.0, 0.5, 0.97, 0, None, 1.0, None, None)[1]
    assert [tuple(b.shape) for b in free.bits] == [tuple(b.shape) for b in bits]


def test_an_export_keeps_the_conditioner_and_an_older_export_can_gain_one(tmp_path) -> None:
    import json

    from vargpt.checkpoints.core import CheckpointError
    from vargpt.checkpoints.vargpt import from_pretrained, save_pretrained

    decoder = DecoderConfig(depth=2, width=64, heads=2, bits=16, condition_dim=64, pool_heads=2, text_max_tokens=256,
                            drop_path=0.0, sequential_scales=[1])
    model = tiny_model(decoder=decoder)
    _randomised(model.decoder.sequential)
    loaded, _ = from_pretrained(save_pretrained(model, tmp_path / "sequential"))
    assert loaded.config.decoder.sequential_scales == [1]
    for key, value in model.decoder.sequential.state_dict().items():
        assert torch.equal(value, loaded.decoder.sequential.state_dict()[key]), key
    # an export made without it, whose config is then switched on, loads only when the new module may start fresh
    folder = save_pretrained(tiny_model(), tmp_path / "plain")
    config = json.loads((folder / "config.json").read_text())
    config["vargpt"]["decoder"]["sequential_scales"] = [1]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="decoder.sequential"):
        from_pretrained(folder)
    fresh, _ = from_pretrained(folder, allow_missing=[r"decoder\.sequential\..+"])
    assert fresh.decoder.is_sequential(1)
    assert not fresh.decoder.sequential.out.weight.any() and not fresh.decoder.sequential.out.bias.any()  # unchanged


@pytest.mark.parametrize(
    "scales", [{"sequential_scales": [0, 1]}, {"sequential_scales": [0], "token_sequential_scales": [1, 2]}]
)
def test_standalone_cached_and_uncached_sampling_agree_with_sequential_scales(scales: dict) -> None:
    from vargpt.sampling import generate_bits, generate_bits_uncached

    torch.manual_seed(0)
    decoder = InfinityDecoder(DecoderConfig(**TINY, **scales)).eval()
    for conditioner in (decoder.sequential, decoder.token_sequential):
        if conditioner is not None:
            _randomised(conditioner)
    with torch.no_grad():
        decoder.head.proj.weight.normal_(0, 0.3)
    tokens = torch.randn(2, 3, TINY["condition_dim"])
    condition = decoder.encode_text(tokens, torch.ones(2, 3, dtype=torch.bool))
    schedule = [(1, 1), (2, 2), (4, 4)]
    sampling = SamplingConfig(cfg=2.5, temperature=0.8, top_p=0.95)
    cached = generate_bits(decoder, condition, schedule, sampling, seeds=[1, 2])
    uncached = generate_bits_uncached(decoder, condition, schedule, sampling, seeds=[1, 2])
    assert all(torch.equal(a, b) for a, b in zip(cached, uncached))


# ------------------------------------------------------------------------------ within each token (token_sequential)


def test_within_token_bits_see_only_their_own_token_s_earlier_bits() -> None:
    decoder = InfinityDecoder(DecoderConfig(**TINY, token_sequential_scales=[2]))
    _randomised(decoder.token_sequential)
    logits, bits = torch.randn(2, 16, 16), torch.rand(2, 16, 8) < 0.5
    reference = decoder.within_tokens(logits, bits).unflatten(-1, (-1, 2))  # (B, n, d, 2)
    for token in (0, 5, 15):
        for bit in range(8):
            changed = bits.clone()
            changed[:, token, bit:] = ~changed[:, token, bit:]
            out = decoder.within_tokens(logits, changed).unflatten(-1, (-1, 2))
            others = torch.arange(16) != token
            assert torch.equal(out[:, others], reference[:, others])  # other tokens never see this token's bits
            assert torch.equal(out[:, token, : bit + 1], reference[:, token, : bit + 1]), (token, bit)
            if bit < 7:
                assert not torch.allclose(out[:, token, bit + 1 :], reference[:, token, bit + 1 :])
    for bit in range(8):  # the sampler's step: bit b of every token at once
        assert torch.allclose(decoder.within_tokens(logits, bits, unit=bit), reference[:, :, bit], atol=1e-6)


def test_within_token_scales_are_validated_and_add_only_their_own_parameters() -> None:
    for bad in ([1, 1], [-1], [True]):
        with pytest.raises(ConfigError, match="token_sequential_scales"):
            DecoderConfig(**TINY, token_sequential_scales=bad)
    with pytest.raises(ConfigError, match="both"):
        DecoderConfig(**TINY, sequential_scales=[0, 1], token_sequential_scales=[1, 2])
    torch.manual_seed(0)
    plain = InfinityDecoder(DecoderConfig(**TINY, sequential_scales=[0]))
    torch.manual_seed(0)
    within = InfinityDecoder(DecoderConfig(**TINY, sequential_scales=[0], token_sequential_scales=[2]))
    assert within.is_token_sequential(2) and not within.is_token_sequential(1) and not plain.is_token_sequential(2)
    extra = set(within.state_dict()) - set(plain.state_dict())
    assert extra and all(key.startswith("token_sequential.") for key in extra)
    for key, value in plain.state_dict().items():
        assert torch.equal(value, within.state_dict()[key]), key
    logits, bits = torch.randn(2, 16, 16), torch.rand(2, 16, 8) < 0.5
    assert torch.equal(within.within_tokens(logits, bits), logits)  # untrained: Infinity's independent bits
    with pytest.raises(ValueError, match="token_sequential_scales"):
        plain.within_tokens(logits, bits)


def test_within_token_sampling_draws_each_bit_from_its_teacher_forced_logits() -> None:
    decoder = InfinityDecoder(DecoderConfig(**TINY, token_sequential_scales=[2]))
    _randomised(decoder.token_sequential)
    logits = torch.randn(4, 16, 16)  # 2 conditional + 2 unconditional rows, the 4 x 4 scale
    sampling = SamplingConfig(cfg=2.0, temperature=0.7, top_p=0.99)
    generators = [torch.Generator().manual_seed(s) for s in (1, 2)]
    bits, cond_logits = sample_scale(decoder, logits, 2, 2, sampling, generators)
    forced = decoder.within_tokens(logits, bits.repeat(2, 1, 1))
    assert torch.allclose(cond_logits, forced[:2])
    guided = forced[2:] + 2.0 * (forced[:2] - forced[2:])
    uniforms = draw_uniforms([torch.Generator().manual_seed(s) for s in (1, 2)], (16, 8), "cpu")
    assert torch.equal(bits, bits_from_uniforms(guided, 0.7, 0.99, uniforms))
    given, given_logits = sample_scale(decoder, logits, 2, 2, sampling, [], forced=~bits)
    assert torch.equal(given, ~bits) and torch.allclose(given_logits, decoder.within_tokens(logits[:2], ~bits))


def test_a_token_whose_bits_must_agree_is_drawn_jointly_once_learnt() -> None:
    """Every token is one of two codes, all bits 0 or all bits 1, with the base logits carrying no information:
    independent bits at the true marginals (1/2) give a valid token 2 / 2^4 of the time, and a 16-token scale
    almost never; bits that see their token's earlier bits learn the joint."""
    torch.manual_seed(0)
    decoder = InfinityDecoder(DecoderConfig(**{**TINY, "bits": 4}, token_sequential_scales=[2], sequential_hidden=64))
    optimizer = torch.optim.Adam(decoder.token_sequential.parameters(), lr=1e-2)
    base = torch.zeros(64, 16, 8)
    for _ in range(150):
        labels = (torch.rand(64, 16, 1) < 0.5).expand(-1, -1, 4)
        logits = decoder.within_tokens(base, labels).unflatten(-1, (-1, 2))
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 2), labels.flatten().long())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    sampling = SamplingConfig(cfg=1.0, temperature=1.0, top_p=1.0)
    generators = [torch.Generator().manual_seed(s) for s in range(64)]
    with torch.no_grad():
        joint, _ = sample_scale(decoder, base, 2, 64, sampling, generators)
        alone = sample_bits(base, 1.0, 1.0, generators)

    def valid(bits: torch.Tensor) -> float:  # the share of tokens whose bits agree
        return float(((bits.sum(-1) == 0) | (bits.sum(-1) == 4)).float().mean())

    assert valid(joint) > 0.95, valid(joint)
    assert valid(alone) < 0.2, valid(alone)
    assert 0.35 < float(joint[..., 0].float().mean()) < 0.65  # both codes drawn
