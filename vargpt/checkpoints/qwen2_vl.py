"""Qwen2-VL checkpoints (a Qwen2-VL-7B-Instruct folder, or the Qwen2-VL part of VARGPT-v1.1) -> ``VARGPT.backbone``.

Two naming generations exist on disk and both are accepted (VARGPT §6.2):

* ``visual.*`` (4.x and the released VARGPT-v1.1) or ``model.visual.*`` (5.x) -> ``backbone.visual.*``
* ``model.{embed_tokens,layers,norm}.*`` (4.x) or ``model.language_model.*`` (5.x) -> ``backbone.language_model.*``
* ``lm_head.weight`` (both) -> ``lm_head.weight``

Their ``config.json`` differs the same way: 4.x stores the text fields flat at the top level with ``rope_scaling``,
5.x nests them under ``text_config`` with ``rope_parameters``. ``qwen2_vl_dict_from_config_json`` turns either into
the ``VARGPTConfig.qwen2_vl`` dict.
"""

from __future__ import annotations

import re

from vargpt.checkpoints.core import KeyMap, Rename

QWEN2_VL_KEY_MAP = KeyMap(
    rules=(
        Rename(r"model\.language_model\.(.+)", r"backbone.language_model.\1"),
        Rename(r"model\.visual\.(.+)", r"backbone.visual.\1"),
        Rename(r"visual\.(.+)", r"backbone.visual.\1"),
        Rename(r"model\.((?:embed_tokens|layers|norm)\..+)", r"backbone.language_model.\1"),
        Rename(r"lm_head\.weight", "lm_head.weight"),
    ),
    name="Qwen2-VL",
)

# Text-model fields of Qwen2VLTextConfig that a flat (4.x) config.json holds at its top level.
TEXT_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "rms_norm_eps",
    "use_sliding_window",
    "sliding_window",
    "max_window_layers",
    "attention_dropout",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)
# Qwen2VLVisionConfig fields (4.x called ``in_channels`` ``in_chans``).
VISION_FIELDS = (
    "depth",
    "embed_dim",
    "hidden_size",
    "hidden_act",
    "mlp_ratio",
    "num_heads",
    "in_channels",
    "patch_size",
    "spatial_merge_size",
    "temporal_patch_size",
)
TOKEN_FIELDS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
DEFAULT_ROPE_THETA = 1000000.0  # Qwen2-VL-7B (VARGPT §1.2)


def qwen2_vl_name(ours: str) -> str:
    """Our backbone / lm_head parameter name -> the transformers 4.x (released VARGPT-v1.1) name."""
    for pattern, template in (
        (r"backbone\.visual\.(.+)", r"visual.\1"),
        (r"backbone\.language_model\.(.+)", r"model.\1"),
        (r"lm_head\.weight", "lm_head.weight"),
    ):
        match = re.fullmatch(pattern, ours)
        if match:
            return match.expand(template)
    raise KeyError(f"{ours!r} is not a Qwen2-VL parameter (backbone.* or lm_head.weight)")


def _rope_parameters(text: dict) -> dict:
    """``rope_parameters`` (5.x) from a 5.x or 4.x text config (``rope_scaling`` with ``mrope_section``)."""
    if isinstance(text.get("rope_parameters"), dict):
        return dict(text["rope_parameters"])
    scaling = text.get("rope_scaling") or {}
    rope = {"rope_type": "default", "rope_theta": float(text.get("rope_theta", DEFAULT_ROPE_THETA))}
    if "mrope_section" in scaling:
        rope["mrope_section"] = list(scaling["mrope_section"])
    return rope


def qwen2_vl_dict_from_config_json(data: dict) -> dict:
    """The ``VARGPTConfig.qwen2_vl`` dict of a Qwen2-VL (or VARGPT-v1.1) ``config.json``, 4.x flat or 5.x nested."""
    nested = data.get("text_config")
    source = nested if isinstance(nested, dict) else data
    text = {name: source[name] for name in TEXT_FIELDS if source.get(name) is not None}
    text["rope_parameters"] = _rope_parameters(source)
    vision_source = dict(data.get("vision_config") or {})
    if "in_chans" in vision_source and "in_channels" not in vision_source:
        vision_source["in_channels"] = vision_source.pop("in_chans")
    vision = {name: vision_source[name] for name in VISION_FIELDS if name in vision_source}
    out = {"text_config": text, "vision_config": vision}
    out.update({name: data[name] for name in TOKEN_FIELDS if name in data})
    out["tie_word_embeddings"] = bool(data.get("tie_word_embeddings", source.get("tie_word_embeddings", False)))
    return out
