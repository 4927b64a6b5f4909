"""Component configs: reference defaults and validation that names the bad field."""

import pytest
from helpers_tiny_model import tiny_config

from vargpt.config import ConfigError, DecoderConfig, SamplingConfig, TokenizerConfig


def test_reference_defaults():
    decoder = DecoderConfig()
    assert (decoder.depth, decoder.width, decoder.heads, decoder.head_dim, decoder.mlp_hidden) == (32, 2048, 16, 128, 8192)
    assert decoder.resolved_pool_heads == 16
    assert TokenizerConfig().stride == 16
    assert (SamplingConfig().cfg, SamplingConfig().temperature, SamplingConfig().top_p) == (3.0, 0.5, 0.97)


@pytest.mark.parametrize(
    ("factory", "field"),
    [
        (lambda: DecoderConfig(width=100, heads=3), "decoder.width"),
        (lambda: DecoderConfig(width=24, heads=4), "head_dim"),
        (lambda: DecoderConfig(drop_path=1.5), "decoder.drop_path"),
        (lambda: TokenizerConfig(base_channels=30), "group_norm_groups"),
        (lambda: TokenizerConfig(decoder_channel_multipliers=[1, 2]), "same length"),
        (lambda: SamplingConfig(temperature=0), "sampling.temperature"),
        (lambda: SamplingConfig(top_p=1.5), "sampling.top_p"),
        (lambda: SamplingConfig(cfg=-1), "sampling.cfg"),
        (lambda: tiny_config(adaln_from_prompt=True, reference_compat=True), "adaln_from_prompt"),
        (lambda: tiny_config(adaln_from_prompt=True, decoder=DecoderConfig(depth=1, width=64, heads=2, bits=16,
                                                                            condition_dim=32)), "condition_dim"),
    ],
)
def test_invalid_values_name_the_field(factory, field):
    with pytest.raises(ConfigError, match=field):
        factory()
