"""The BSQ-VAE CNN and its released-checkpoint key map (INFINITY §1.1-1.3, §7.2)."""

import pytest
import torch

from vargpt.checkpoints import CheckpointError, compare_state_dict
from vargpt.checkpoints.bsq_vae import BSQ_VAE_KEY_MAP, bsq_vae_upstream_state_dict, load_bsq_vae
from vargpt.config import TokenizerConfig
from vargpt.tokenizer import bits_to_f_hat
from vargpt.tokenizer.vae import BSQVAE

TINY = TokenizerConfig(
    bits=16,
    base_channels=16,
    encoder_channel_multipliers=[1, 2, 2],
    decoder_channel_multipliers=[1, 2, 2],
    encoder_res_blocks=1,
    decoder_res_blocks=2,
    group_norm_groups=8,
)


@pytest.fixture(scope="module")
def tiny() -> BSQVAE:
    torch.manual_seed(0)
    return BSQVAE(TINY).eval()


def images(batch: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_shapes_and_value_range(tiny):
    assert tiny.stride == 4
    x = images()
    features = tiny.encode_features(x)
    assert features.shape == (2, 16, 8, 8)
    bits = tiny.encode(x)
    assert [tuple(b.shape) for b in bits] == [(2, h, w, 16) for h, w in tiny.default_schedule(32, 32)]
    assert tiny.default_schedule(32, 32)[-1] == (8, 8)
    out = tiny.decode(bits)
    assert out.shape == x.shape and out.min() >= -1 and out.max() <= 1


def test_decode_of_bits_equals_decode_of_quantized_f_hat(tiny):
    x = images()
    quantization = tiny.quantize(x)
    from_bits = tiny.decode(quantization.bits)
    from_f_hat = tiny.decode_f_hat(quantization.f_hat)
    torch.testing.assert_close(from_bits, from_f_hat, rtol=0, atol=1e-5)
    torch.testing.assert_close(bits_to_f_hat(quantization.bits, (8, 8)), quantization.f_hat, rtol=0, atol=1e-6)


def test_reconstruction_gradients_reach_the_encoder():
    model = BSQVAE(TINY)
    reconstruction, _ = model(images())
    reconstruction.square().mean().backward()
    grad = model.encoder.conv_in.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_bad_sizes_and_schedules_name_the_value(tiny):
    with pytest.raises(ValueError, match="30x32 is not divisible by the tokenizer stride 4"):
        tiny.encode_features(torch.zeros(1, 3, 30, 32))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        tiny.encode_features(torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError, match="the last scale must equal it"):
        tiny.encode(images(), schedule=[(1, 1), (4, 4)])


def test_released_d32_architecture_on_meta():
    with torch.device("meta"):
        model = BSQVAE(TokenizerConfig())
    encoder = sum(p.numel() for p in model.encoder.parameters())
    decoder = sum(p.numel() for p in model.decoder.parameters())
    assert round(encoder / 1e6, 2) == 45.03 and round(decoder / 1e6, 2) == 65.09
    state = model.state_dict()
    assert state["encoder.conv_out.weight"].shape == (32, 512, 3, 3)
    assert state["decoder.conv_in.weight"].shape == (512, 32, 3, 3)
    assert state["encoder.down.1.block.0.nin_shortcut.weight"].shape == (256, 128, 1, 1)
    assert state["decoder.up.0.block.0.nin_shortcut.weight"].shape == (128, 256, 1, 1)
    assert "encoder.down.4.downsample.conv.weight" not in state and "decoder.up.0.upsample.conv.weight" not in state


def test_full_key_map_round_trip_on_meta():
    with torch.device("meta"):
        model = BSQVAE(TokenizerConfig())
    upstream = bsq_vae_upstream_state_dict(model)
    assert "encoder.down.0.downsample.conv.conv.weight" in upstream
    assert "decoder.up.2.block.1.norm2.norm.bias" in upstream
    mapped, dropped, unmatched = BSQ_VAE_KEY_MAP.apply(upstream)
    assert sorted(dropped) == ["quantize.lfq.mask", "quantizer.lfq.mask"] and unmatched == []
    report = compare_state_dict(
        {k: tuple(v.shape) for k, v in model.state_dict().items()},
        {k: tuple(v.shape) for k, v in mapped.items()},
        source="meta",
    )
    assert report.ok and report.loaded == len(model.state_dict())


def test_synthetic_upstream_checkpoint_loads_with_identical_outputs(tiny, tmp_path):
    path = tmp_path / "vae.pth"
    torch.save({"vae": bsq_vae_upstream_state_dict(tiny), "step": 7}, path)
    loaded = load_bsq_vae(path, TINY).eval()
    x = images(seed=3)
    torch.testing.assert_close(loaded.decode(loaded.encode(x)), tiny.decode(tiny.encode(x)), rtol=0, atol=0)


def test_plain_names_load_too(tiny, tmp_path):
    path = tmp_path / "plain.pth"
    torch.save(dict(tiny.state_dict()), path)
    loaded = load_bsq_vae(path, TINY, entry=None)
    assert torch.equal(loaded.decoder.conv_out.weight, tiny.decoder.conv_out.weight)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda sd: sd.pop("decoder.conv_out.conv.bias"), "decoder.conv_out.bias"),
        (lambda sd: sd.__setitem__("encoder.extra.conv.weight", torch.zeros(1)), "encoder.extra.conv.weight"),
        (lambda sd: sd.__setitem__("encoder.conv_in.conv.weight", torch.zeros(16, 3, 1, 1)), "encoder.conv_in.weight"),
    ],
)
def test_mismatches_fail_naming_the_key(tiny, tmp_path, edit, message):
    state = bsq_vae_upstream_state_dict(tiny)
    edit(state)
    path = tmp_path / "broken.pth"
    torch.save({"vae": state}, path)
    with pytest.raises(CheckpointError, match=message):
        load_bsq_vae(path, TINY)


def test_missing_file_and_entry(tmp_path, tiny):
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        load_bsq_vae(tmp_path / "nowhere.pth", TINY)
    path = tmp_path / "ema_only.pth"
    torch.save({"ema": bsq_vae_upstream_state_dict(tiny)}, path)
    with pytest.raises(CheckpointError, match="no entry 'vae'"):
        load_bsq_vae(path, TINY)
    assert isinstance(load_bsq_vae(path, TINY, entry="ema"), BSQVAE)
