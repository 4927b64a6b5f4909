"""Model YAMLs load into validated ``VARGPTConfig``s; unknown keys and wrong types fail naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers_tiny_model import tiny_config
from vargpt.checkpoints.vargpt import config_from_released, released_config_json
from vargpt.config import ConfigError, DecoderConfig
from vargpt.config_io import config_to_dict, dataclass_from_dict, load_model_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "model"


def test_tiny_yaml_is_the_test_helpers_config() -> None:
    assert load_model_config(CONFIGS / "tiny.yaml") == tiny_config()


def test_reference_yaml_has_the_reference_sizes_and_ids() -> None:
    config = load_model_config(CONFIGS / "vargpt_v1_1.yaml")
    text = config.qwen2_vl["text_config"]
    assert (text["hidden_size"], text["num_hidden_layers"], text["vocab_size"]) == (3584, 28, 152064)
    assert config.qwen2_vl["vision_config"]["depth"] == 32 and config.image_token_id == 151655
    assert (config.decoder.depth, config.decoder.width, config.decoder.heads) == (32, 2048, 16)
    assert config.tokenizer.bits == 32 and config.tokenizer.stride == 16
    assert len(config.schedule) == 10 and config.schedule[-1] == (32, 32) and config.placeholder_count == 2560
    ids = (config.image_gen_start_token_id, config.image_gen_end_token_id, config.image_gen_pad_token_id)
    assert ids == (151657, 151658, 151659)
    assert (config.pad_token_id, config.im_start_token_id, config.im_end_token_id) == (151643, 151644, 151645)


def test_released_config_json_round_trip() -> None:
    config = load_model_config(CONFIGS / "vargpt_v1_1.yaml")
    released = released_config_json(config)
    assert released["rope_scaling"] == {"type": "mrope", "mrope_section": [16, 24, 24]}
    assert released["special_tokens"]["image_gen_start_token_id"] == 151657
    assert config_from_released(released) == config


def test_dict_round_trip_and_overrides(tmp_path: Path) -> None:
    config = tiny_config()
    assert dataclass_from_dict(type(config), config_to_dict(config)) == config
    loaded = load_model_config(CONFIGS / "tiny.yaml", overrides=["decoder.depth=4", "sampling.cfg=1.5"])
    assert loaded.decoder.depth == 4 and loaded.sampling.cfg == 1.5


def test_unknown_keys_are_errors_naming_them(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown key model\.decoder\.dept\b.*'depth'"):
        load_model_config(CONFIGS / "tiny.yaml", overrides=["decoder.dept=4"])
    with pytest.raises(ConfigError, match=r"unknown key model\.placeholder_multiplier.*'placeholder_multiple'"):
        load_model_config(CONFIGS / "tiny.yaml", overrides=["placeholder_multiplier=4"])


def test_wrong_types_and_values_are_errors() -> None:
    with pytest.raises(ConfigError, match=r"model\.decoder\.depth must be int"):
        load_model_config(CONFIGS / "tiny.yaml", overrides=["decoder.depth=deep"])
    with pytest.raises(ConfigError, match=r"model\.decoder must not be null"):
        load_model_config(CONFIGS / "tiny.yaml", overrides=["decoder=null"])
    with pytest.raises(ConfigError, match="decoder.width=65 must be divisible"):
        dataclass_from_dict(DecoderConfig, {"width": 65, "heads": 2}, where="decoder")


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere.yaml"):
        load_model_config(tmp_path / "nowhere.yaml")
