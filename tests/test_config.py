"""Component configs: reference defaults and validation that names the bad field."""

import copy

import pytest
from helpers_tiny_model import tiny_config

from vargpt.config import ConfigError, DecoderConfig, SamplingConfig, TokenizerConfig


def _with_text(**fields):
    """The tiny config with ``qwen2_vl.text_config`` fields replaced (``rope_parameters`` merged)."""
    qwen2_vl = copy.deepcopy(tiny_config().qwen2_vl)
    rope = fields.pop("rope_parameters", {})
    qwen2_vl["text_config"].update(fields)
    qwen2_vl["text_config"]["rope_parameters"].update(rope)
    return tiny_config(qwen2_vl=qwen2_vl)


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
        (lambda: _with_text(num_attention_heads=0), "num_attention_heads must be > 0"),
        (lambda: _with_text(hidden_size=66), "text_config.hidden_size"),
        (lambda: _with_text(num_key_value_heads=3), "num_key_value_heads"),
        (lambda: _with_text(rope_parameters={"mrope_section": [2, 3, 4]}), "mrope_section"),
        (lambda: _with_text(rope_parameters={"mrope_section": [4, 0, 4]}), "mrope_section"),
    ],
)
def test_invalid_values_name_the_field(factory, field):
    with pytest.raises(ConfigError, match=field):
        factory()


@pytest.mark.parametrize("field, value", [("num_attention_heads", 4.5), ("num_key_value_heads", "2"),
                                          ("hidden_size", True)])
def test_attention_geometry_refuses_non_integer_sizes_by_name(field, value):
    # not truncated by int() (4.5 -> 4) nor a bare ValueError from int("x"): a ConfigError naming the field
    with pytest.raises(ConfigError, match=f"text_config.{field} must be > 0 and an int"):
        _with_text(**{field: value})


def test_attention_geometry_accepts_any_split_of_the_rotary_frequencies():
    # head dim 16: 8 frequencies, split over (temporal, height, width) in any valid way, repeated sections included
    _with_text(rope_parameters={"mrope_section": [1, 1, 2, 1, 1, 2]})
    _with_text(num_key_value_heads=4)
