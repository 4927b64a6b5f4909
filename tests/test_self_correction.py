"""Bitwise self-correction (INFINITY §5): corrupted history, clean residual labels, seeded per-sample flip rates."""

import pytest
import torch
import torch.nn.functional as F

from vargpt.schedules import scale_schedule
from vargpt.tokenizer import accumulate_codes, bsq_quantize, next_scale_input, quantize_multiscale
from vargpt.tokenizer.multiscale import split_tokens
from vargpt.tokenizer.self_correction import bitwise_self_correction

SCHEDULE = scale_schedule("0.06M")


def features(batch: int = 4, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn(batch, 32, 4, 4, generator=generator)
    fine = F.interpolate(coarse, size=(16, 16), mode="bicubic", align_corners=False)
    return 3.0 * fine / fine.norm(dim=1, keepdim=True).mean()


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("generator", [None, "seeded"])
def test_no_corruption_equals_clean_quantization_exactly(generator):
    raw = features()
    clean = quantize_multiscale(raw, SCHEDULE)
    max_flip = 0.3 if generator is None else 0.0
    result = bitwise_self_correction(raw, SCHEDULE, None if generator is None else seeded(1), max_flip=max_flip)
    assert torch.equal(result.labels, clean.labels)
    assert torch.equal(result.inputs, clean.next_inputs)
    assert torch.equal(result.flip_rates, torch.zeros(4, len(SCHEDULE)))


def test_shapes_and_dtypes():
    result = bitwise_self_correction(features(2), SCHEDULE, seeded(0))
    assert result.labels.shape == (2, 521, 32) and result.labels.dtype == torch.bool
    assert result.inputs.shape == (2, 520, 32) and result.inputs.dtype == torch.float32
    assert result.flip_rates.shape == (2, 7)
    assert [tuple(b.shape) for b in result.corrupted_bits] == [(2, h, w, 32) for h, w in SCHEDULE]


def test_corruption_keeps_scale_zero_labels_and_changes_later_ones():
    raw = features(8)
    clean = quantize_multiscale(raw, SCHEDULE).labels
    result = bitwise_self_correction(raw, SCHEDULE, seeded(3))
    assert torch.equal(result.labels[:, :1], clean[:, :1])
    changed = (result.labels[:, 1:] != clean[:, 1:]).float().mean().item()
    assert 0.01 < changed < 0.5
    flipped = (result.corrupted_bits[0] != split_tokens(clean, SCHEDULE)[0]).any()
    assert flipped


def test_flip_rates_are_per_sample_on_the_grid():
    result = bitwise_self_correction(features(16), SCHEDULE, seeded(5), max_flip=0.3)
    rates = result.flip_rates
    assert rates.min() >= 0 and rates.max() <= 0.3 + 1e-6
    assert torch.allclose(rates * 100, (rates * 100).round(), atol=1e-4)
    assert any(rates[:, k].unique().numel() > 1 for k in range(rates.shape[1])), "p must vary across samples"
    last = split_tokens(result.labels, SCHEDULE)[-1]
    observed = (result.corrupted_bits[-1] != last).float().mean(dim=(1, 2, 3))
    assert torch.allclose(observed, rates[:, -1], atol=0.03)


def test_same_seed_same_result_and_other_seed_differs():
    raw = features()
    first = bitwise_self_correction(raw, SCHEDULE, seeded(7))
    second = bitwise_self_correction(raw, SCHEDULE, seeded(7))
    other = bitwise_self_correction(raw, SCHEDULE, seeded(8))
    assert torch.equal(first.labels, second.labels) and torch.equal(first.inputs, second.inputs)
    assert not torch.equal(first.inputs, other.inputs)


def test_inputs_follow_the_corrupted_bits_as_the_sampler_would():
    result = bitwise_self_correction(features(), SCHEDULE, seeded(11))
    f_hat, rebuilt = None, []
    for k, bits in enumerate(result.corrupted_bits[:-1]):
        f_hat = accumulate_codes(f_hat, bits, SCHEDULE[-1])
        rebuilt.append(next_scale_input(f_hat, SCHEDULE[k + 1]))
    assert torch.equal(torch.cat(rebuilt, dim=1), result.inputs)


def test_labels_are_the_residual_bits_given_the_corrupted_history():
    raw = features()
    result = bitwise_self_correction(raw, SCHEDULE, seeded(13))
    labels = split_tokens(result.labels, SCHEDULE)
    f_hat = None
    for k, size in enumerate(SCHEDULE):
        residual = raw if f_hat is None else raw - f_hat
        if size != SCHEDULE[-1]:
            residual = F.interpolate(residual, size=size, mode="area")
        _, expected = bsq_quantize(residual)
        agreement = (expected == labels[k]).float().mean().item()
        assert agreement > 0.999, (k, agreement)  # equal up to float ties of the two summation orders
        f_hat = accumulate_codes(f_hat, result.corrupted_bits[k], SCHEDULE[-1])


def test_noise_scales_limits_the_corrupted_scales():
    raw = features()
    clean = quantize_multiscale(raw, SCHEDULE)
    result = bitwise_self_correction(raw, SCHEDULE, seeded(2), noise_scales=2)
    assert torch.equal(result.flip_rates[:, 2:], torch.zeros(4, len(SCHEDULE) - 2))
    for k in range(2, len(SCHEDULE)):
        assert torch.equal(result.corrupted_bits[k], split_tokens(result.labels, SCHEDULE)[k])
    assert not torch.equal(result.labels, clean.labels)


def test_without_requantization_labels_stay_clean_and_inputs_are_noisy():
    raw = features()
    clean = quantize_multiscale(raw, SCHEDULE)
    result = bitwise_self_correction(raw, SCHEDULE, seeded(4), requantize=False)
    assert torch.equal(result.labels, clean.labels)
    assert not torch.equal(result.inputs, clean.next_inputs)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [({"max_flip": 1.5}, "max_flip"), ({"max_flip": -0.1}, "max_flip"), ({"noise_scales": -1}, "noise_scales")],
)
def test_bad_arguments(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        bitwise_self_correction(features(1), SCHEDULE, seeded(0), **kwargs)
