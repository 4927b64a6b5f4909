"""BSQ, multi-scale residual quantization and the BSQ-VAE CNN (INFINITY §1)."""

import math

import pytest
import torch
import torch.nn.functional as F

from vargpt.schedules import schedule_for_latent, scale_schedule, token_count
from vargpt.tokenizer import (
    accumulate_codes,
    bits_to_codes,
    bits_to_f_hat,
    bsq_quantize,
    flatten_bits,
    next_scale_input,
    quantize_multiscale,
    split_tokens,
)


def smooth_features(batch: int, dim: int, size: int, seed: int = 0, magnitude: float = 3.0) -> torch.Tensor:
    """Low-frequency random features with a per-position norm of a few units, like a trained encoder's."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn(batch, dim, 3, 3, generator=generator)
    fine = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    fine = fine + 0.05 * torch.randn(batch, dim, size, size, generator=generator)
    return magnitude * fine / fine.norm(dim=1, keepdim=True).mean()


# ---------------------------------------------------------------------------------------------------------------- BSQ


def test_bsq_codes_are_unit_norm_signs():
    z = torch.randn(2, 32, 5, 7)
    codes, bits = bsq_quantize(z)
    assert codes.shape == (2, 32, 5, 7) and codes.dtype == torch.float32
    assert bits.shape == (2, 5, 7, 32) and bits.dtype == torch.bool
    assert torch.allclose(codes.norm(dim=1), torch.ones(2, 5, 7), atol=1e-6)
    assert torch.allclose(codes.abs(), torch.full_like(codes, 1 / math.sqrt(32)), atol=1e-7)
    assert torch.equal(bits, (z > 0).permute(0, 2, 3, 1))
    assert torch.equal(codes > 0, z > 0)


def test_bsq_zero_maps_to_bit_zero():
    z = torch.zeros(1, 4, 1, 1)
    z[0, 0] = 1.0
    codes, bits = bsq_quantize(z)
    assert bits[0, 0, 0].tolist() == [True, False, False, False]
    assert codes[0, :, 0, 0].tolist() == pytest.approx([0.5, -0.5, -0.5, -0.5])


def test_bits_codes_round_trip():
    bits = torch.rand(3, 4, 6, 16) > 0.5
    codes = bits_to_codes(bits)
    assert codes.shape == (3, 16, 4, 6) and codes.dtype == torch.float32
    assert torch.allclose(codes, (2 * bits.float() - 1).permute(0, 3, 1, 2) / 4.0)
    again_codes, again_bits = bsq_quantize(codes)
    assert torch.equal(again_bits, bits)
    assert torch.allclose(again_codes, codes, atol=1e-7)
    assert torch.equal(bits_to_codes(bits.long()), codes)


def test_bsq_is_fp32_under_autocast_and_passes_gradients():
    z = torch.randn(2, 8, 3, 3, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        codes, _ = bsq_quantize(z.bfloat16())
    assert codes.dtype == torch.float32
    codes.sum().backward()
    assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


def test_bsq_rejects_wrong_rank():
    with pytest.raises(ValueError, match=r"\(B, d, h, w\)"):
        bsq_quantize(torch.randn(2, 8, 3))
    with pytest.raises(ValueError, match=r"\(B, h, w, d\)"):
        bits_to_codes(torch.ones(2, 8, dtype=torch.bool))


# -------------------------------------------------------------------------------------------------------- multi-scale


def test_multiscale_shapes_and_unit_codes():
    schedule = scale_schedule("0.06M")
    features = smooth_features(2, 32, 16)
    quantized = quantize_multiscale(features, schedule)
    assert [tuple(b.shape) for b in quantized.bits] == [(2, h, w, 32) for h, w in schedule]
    assert all(b.dtype == torch.bool for b in quantized.bits)
    assert quantized.f_hat.shape == (2, 32, 16, 16)
    assert quantized.next_inputs.shape == (2, token_count(schedule) - 1, 32)
    assert quantized.labels.shape == (2, 521, 32)
    for bits in quantized.bits:
        assert torch.allclose(bits_to_codes(bits).norm(dim=1), torch.ones(bits.shape[:3]), atol=1e-6)


def test_bit_magnitudes_are_each_bits_share_of_its_unit_residual():
    schedule = [(1, 1), (2, 2), (4, 4)]
    features = smooth_features(2, 8, 4)
    quantized = quantize_multiscale(features, schedule)
    assert [tuple(m.shape) for m in quantized.magnitudes] == [(2, h, w, 8) for h, w in schedule]
    assert quantized.label_magnitudes.shape == quantized.labels.shape
    # the first scale's residual is the area-mean of the features: its magnitudes are |unit vector| * sqrt(d)
    mean = features.mean(dim=(2, 3))
    expected = (mean / mean.norm(dim=1, keepdim=True)).abs() * math.sqrt(8)
    assert torch.allclose(quantized.magnitudes[0][:, 0, 0], expected, atol=1e-5)
    for magnitudes in quantized.magnitudes:  # unit vectors: the squares average to 1 over d
        assert torch.allclose(magnitudes.pow(2).mean(-1), torch.ones(magnitudes.shape[:3]), atol=1e-5)
    assert not any(m.requires_grad for m in quantize_multiscale(features.requires_grad_(), schedule).magnitudes)


def test_token_weights_are_each_tokens_residual_norm_over_its_images_rms():
    schedule = [(1, 1), (2, 2), (4, 4)]
    features = smooth_features(2, 8, 4)
    quantized = quantize_multiscale(features, schedule)
    assert [tuple(w.shape) for w in quantized.token_weights] == [(2, h, w, 1) for h, w in schedule]
    assert quantized.label_token_weights.shape == (2, 21, 1)
    assert torch.allclose(quantized.token_weights[0], torch.ones(2, 1, 1, 1))  # one token: its own RMS
    # the last scale's residual by hand: the features minus the two coarser scales' upsampled codes
    residual = features.clone()
    for bits, (h, w) in zip(quantized.bits[:2], schedule[:2]):
        residual = residual - F.interpolate(bits_to_codes(bits), size=(4, 4), mode="bilinear")
    norms = residual.norm(dim=1)
    expected = norms / norms.square().mean(dim=(1, 2), keepdim=True).sqrt()
    assert torch.allclose(quantized.token_weights[2][..., 0], expected, atol=1e-5)
    for weights in quantized.token_weights:  # an image's weights have mean square 1 at every scale
        assert torch.allclose(weights.square().mean(dim=(1, 2, 3)), torch.ones(2), atol=1e-5)


@pytest.mark.parametrize("aspect", [1.0, 0.75])
def test_quantize_then_decode_bits_equals_f_hat(aspect):
    schedule = scale_schedule("0.06M", aspect)
    features = F.interpolate(smooth_features(2, 32, 20), size=schedule[-1], mode="bilinear", align_corners=False)
    quantized = quantize_multiscale(features, schedule)
    assert (bits_to_f_hat(quantized.bits, schedule[-1]) - quantized.f_hat).abs().max() <= 1e-6


def test_residual_shrinks_over_scales():
    schedule = scale_schedule("0.06M")
    features = smooth_features(2, 32, 16, magnitude=4.0)
    quantized = quantize_multiscale(features, schedule)
    norms = [features.norm().item()]
    for k in range(1, len(schedule) + 1):
        norms.append((features - bits_to_f_hat(quantized.bits[:k], schedule[-1])).norm().item())
    assert all(later < earlier for earlier, later in zip(norms, norms[1:])), norms
    assert norms[-1] < 0.5 * norms[0]


def test_next_inputs_equal_rebuilding_scale_by_scale():
    """Teacher forcing equals sampling: the inputs rebuilt from the bits with the sampler's steps are identical."""
    schedule = scale_schedule("0.06M", 1.333)
    features = F.interpolate(smooth_features(2, 32, 20, seed=3), size=schedule[-1], mode="bilinear")
    quantized = quantize_multiscale(features, schedule)
    f_hat, rebuilt = None, []
    for k, bits_k in enumerate(quantized.bits[:-1]):
        f_hat = accumulate_codes(f_hat, bits_k, schedule[-1])
        rebuilt.append(next_scale_input(f_hat, schedule[k + 1]))
    assert torch.equal(torch.cat(rebuilt, dim=1), quantized.next_inputs)


def test_next_inputs_are_trilinear_not_area():
    schedule = scale_schedule("0.06M")
    quantized = quantize_multiscale(smooth_features(1, 32, 16), schedule)
    history = bits_to_f_hat(quantized.bits[:3], schedule[-1])  # what scale 3 (6x6, tokens 20..55 of the inputs) sees
    area = F.interpolate(history, size=schedule[3], mode="area").flatten(2).transpose(1, 2)
    bilinear = F.interpolate(history, size=schedule[3], mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)
    inputs_3 = quantized.next_inputs[:, 20:56]
    assert torch.allclose(inputs_3, bilinear, atol=1e-6)
    assert not torch.allclose(inputs_3, area, atol=1e-3)


def test_straight_through_gradients_reach_the_features():
    features = smooth_features(2, 32, 8).requires_grad_()
    quantized = quantize_multiscale(features, schedule_for_latent(8, 8))
    (quantized.f_hat * torch.linspace(-1, 1, 8)).sum().backward()
    assert torch.isfinite(features.grad).all() and features.grad.abs().sum() > 0
    assert not quantized.next_inputs.requires_grad


def test_multiscale_runs_in_fp32_under_autocast():
    features = smooth_features(1, 16, 8).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        quantized = quantize_multiscale(features, schedule_for_latent(8, 8))
    assert quantized.f_hat.dtype == torch.float32 and quantized.next_inputs.dtype == torch.float32


def test_single_scale_schedule():
    quantized = quantize_multiscale(torch.randn(2, 8, 1, 1), [(1, 1)])
    assert quantized.next_inputs.shape == (2, 0, 8)
    assert len(quantized.bits) == 1


def test_flatten_and_split_tokens_round_trip():
    schedule = [(1, 1), (2, 3), (4, 6)]
    bits = [torch.rand(2, h, w, 8) > 0.5 for h, w in schedule]
    tokens = flatten_bits(bits)
    assert tokens.shape == (2, 31, 8)
    assert torch.equal(tokens[:, 1:7], bits[1].reshape(2, 6, 8))
    assert all(torch.equal(a, b) for a, b in zip(split_tokens(tokens, schedule), bits))
    with pytest.raises(ValueError, match="L=31"):
        split_tokens(tokens[:, :30], schedule)


def test_schedule_must_end_at_the_latent_size():
    with pytest.raises(ValueError, match="8x8.*16x16"):
        quantize_multiscale(torch.randn(1, 8, 8, 8), scale_schedule("0.06M"))
    with pytest.raises(ValueError, match=r"\(B, d, H, W\)"):
        quantize_multiscale(torch.randn(8, 8, 8), [(8, 8)])


# ------------------------------------------------------------------------------------------------------------ the CNN


def test_residual_block_is_the_reference_formula_bit_for_bit():
    """swish is x * sigmoid(x) as in the reference (F.silu rounds differently), GroupNorm eps from the config."""
    from vargpt.tokenizer.vae import ResidualBlock

    torch.manual_seed(0)
    block = ResidualBlock(16, 32, groups=8, eps=1e-6)
    x = torch.randn(2, 16, 8, 8)

    def swish(t):
        return t * torch.sigmoid(t)

    h = block.conv1(swish(F.group_norm(x, 8, block.norm1.weight, block.norm1.bias, 1e-6)))
    h = block.conv2(swish(F.group_norm(h, 8, block.norm2.weight, block.norm2.bias, 1e-6)))
    assert torch.equal(block(x), block.nin_shortcut(x) + h)


def test_vae_features_are_fp32_under_autocast():
    from vargpt.config import TokenizerConfig
    from vargpt.tokenizer.vae import BSQVAE

    config = TokenizerConfig(bits=16, base_channels=16, encoder_channel_multipliers=[1, 2, 2],
                             decoder_channel_multipliers=[1, 2, 2], encoder_res_blocks=1, decoder_res_blocks=1,
                             group_norm_groups=8)
    model = BSQVAE(config)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features = model.encode_features(torch.zeros(1, 3, 16, 16))
        quantization = model.quantize(torch.zeros(1, 3, 16, 16))
    assert features.dtype == torch.float32 and quantization.f_hat.dtype == torch.float32
    assert [tuple(b.shape) for b in quantization.bits] == [(1, h, w, 16) for h, w in schedule_for_latent(4, 4)]
