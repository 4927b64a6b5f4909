"""Infinity transformer checkpoints (`infinity_2b_reg.pth`) -> ``InfinityDecoder`` (INFINITY §7.1).

Upstream block keys depend on the training-time FSDP chunking: ``block_chunks.{c}.module.{j}.*`` is block
``n = blocks_per_chunk * c + j`` (8 chunks of 4 blocks in the released 2B), or ``blocks.{n}.*`` without chunking.
Both load into our flat ``blocks.{n}``. The all-zero ``zero_k_bias`` buffers and the mask buffers some versions
saved are dropped; everything else must match exactly (names and shapes), unlike the reference's silent
``strict=False`` load (INFINITY §9.9).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping

import torch

from vargpt.checkpoints.core import CheckpointError, KeyMap, LoadReport, Rename, compare_state_dict, load_torch_file
from vargpt.config import DecoderConfig
from vargpt.decoder.model import InfinityDecoder

# (upstream name, our name) of the parameters outside the blocks
GLOBAL_NAMES: tuple[tuple[str, str], ...] = (
    ("cfg_uncond", "cfg_uncond"),
    ("pos_start", "pos_start"),
    ("text_norm.weight", "text_norm.weight"),
    ("text_proj_for_sos.ca.mat_q", "pool.query"),
    ("text_proj_for_sos.ca.mat_kv.weight", "pool.kv.weight"),
    ("text_proj_for_sos.ca.v_bias", "pool.v_bias"),
    ("text_proj_for_sos.ca.proj.weight", "pool.proj.weight"),
    ("text_proj_for_sos.ca.proj.bias", "pool.proj.bias"),
    ("text_proj_for_ca.0.weight", "text_mlp.fc1.weight"),
    ("text_proj_for_ca.0.bias", "text_mlp.fc1.bias"),
    ("text_proj_for_ca.2.weight", "text_mlp.fc2.weight"),
    ("text_proj_for_ca.2.bias", "text_mlp.fc2.bias"),
    ("lvl_embed.weight", "level_embed.weight"),
    ("word_embed.weight", "word_embed.weight"),
    ("word_embed.bias", "word_embed.bias"),
    ("shared_ada_lin.1.weight", "shared_adaln.weight"),
    ("shared_ada_lin.1.bias", "shared_adaln.bias"),
    ("head_nm.ada_lin.1.weight", "head.adaln.weight"),
    ("head_nm.ada_lin.1.bias", "head.adaln.bias"),
    ("head.weight", "head.proj.weight"),
    ("head.bias", "head.proj.bias"),
)

# (upstream name, our name) inside block n
BLOCK_NAMES: tuple[tuple[str, str], ...] = (
    ("ada_gss", "adaln_bias"),
    ("sa.mat_qkv.weight", "attn.qkv.weight"),
    ("sa.q_bias", "attn.q_bias"),
    ("sa.v_bias", "attn.v_bias"),
    ("sa.scale_mul_1H11", "attn.logit_scale"),
    ("sa.proj.weight", "attn.proj.weight"),
    ("sa.proj.bias", "attn.proj.bias"),
    ("ca.mat_q.weight", "cross_attn.q.weight"),
    ("ca.mat_q.bias", "cross_attn.q.bias"),
    ("ca.mat_kv.weight", "cross_attn.kv.weight"),
    ("ca.v_bias", "cross_attn.v_bias"),
    ("ca.proj.weight", "cross_attn.proj.weight"),
    ("ca.proj.bias", "cross_attn.proj.bias"),
    ("ca_norm.weight", "cross_attn_norm.weight"),
    ("ca_norm.bias", "cross_attn_norm.bias"),
    ("ffn.fc1.weight", "mlp.fc1.weight"),
    ("ffn.fc1.bias", "mlp.fc1.bias"),
    ("ffn.fc2.weight", "mlp.fc2.weight"),
    ("ffn.fc2.bias", "mlp.fc2.bias"),
)

# Upstream-only tensors: all-zero k biases (persistent buffers) and buffers `Infinity.load_state_dict` pops.
ZERO_K_BIASES_GLOBAL = ("text_proj_for_sos.ca.zero_k_bias",)
ZERO_K_BIASES_BLOCK = ("sa.zero_k_bias", "ca.zero_k_bias")
DROPPED = (r".*zero_k_bias", "lvl_1L", "attn_bias_for_masking", "Infinity_visible_kvlen", "Infinity_invisible_qlen")

RELEASED_BLOCKS_PER_CHUNK = 4  # infinity_2b: depth 32 with block_chunks=8 (`--model=2bc8`)

_CHUNKED_BLOCK = re.compile(r"block_chunks\.(\d+)\.module\.(\d+)\.")


def _head_scale_to_1h11(tensor: torch.Tensor) -> torch.Tensor:
    """`scale_mul_1H11` is (1, H, 1, 1), or (1, 1, H, 1) in a customized-flash-attn checkpoint: both -> (1, H, 1, 1)."""
    return tensor.reshape(1, -1, 1, 1)


def infinity_key_map(
    blocks_per_chunk: int = RELEASED_BLOCKS_PER_CHUNK, prefix: str = "", target_prefix: str = ""
) -> KeyMap:
    """Rename table upstream -> ours; ``prefix``/``target_prefix`` wrap both sides (e.g. inside a larger model)."""
    if blocks_per_chunk < 1:
        raise ValueError(f"blocks_per_chunk must be >= 1, got {blocks_per_chunk}")
    source, target = re.escape(prefix), target_prefix
    rules = [Rename(source + re.escape(up), target + ours) for up, ours in GLOBAL_NAMES]
    for up, ours in BLOCK_NAMES:

        def rename(match: re.Match[str], ours: str = ours) -> str:
            if match["block"] is not None:
                index = int(match["block"])
            else:
                index = blocks_per_chunk * int(match["chunk"]) + int(match["inner"])
            return f"{target}blocks.{index}.{ours}"

        block = r"(?:block_chunks\.(?P<chunk>\d+)\.module\.(?P<inner>\d+)|blocks\.(?P<block>\d+))"
        pattern = rf"{source}{block}\.{re.escape(up)}"
        transform = _head_scale_to_1h11 if up == "sa.scale_mul_1H11" else None
        rules.append(Rename(pattern, rename, transform))
    return KeyMap(rules=tuple(rules), drop=tuple(source + pattern for pattern in DROPPED), name="Infinity")


INFINITY_KEY_MAP: KeyMap = infinity_key_map()


def blocks_per_chunk_from_keys(keys: Iterable[str], default: int = RELEASED_BLOCKS_PER_CHUNK) -> int:
    """The chunk size of ``block_chunks.{c}.module.{j}`` keys (1 + the largest j); ``default`` if none are chunked."""
    inner = [int(match.group(2)) for key in keys if (match := _CHUNKED_BLOCK.search(key))]
    return max(inner) + 1 if inner else default


def upstream_name(ours: str, blocks_per_chunk: int | None) -> str:
    """Our parameter name -> the upstream name (``blocks.{n}`` when ``blocks_per_chunk`` is None, else chunked)."""
    for up, mine in GLOBAL_NAMES:
        if ours == mine:
            return up
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)", ours)
    names = {mine: up for up, mine in BLOCK_NAMES}
    if match is None or match.group(2) not in names:
        raise KeyError(f"{ours!r} has no upstream Infinity name")
    index, up = int(match.group(1)), names[match.group(2)]
    if blocks_per_chunk is None:
        return f"blocks.{index}.{up}"
    return f"block_chunks.{index // blocks_per_chunk}.module.{index % blocks_per_chunk}.{up}"


def infinity_upstream_state_dict(decoder: InfinityDecoder, block_chunks: int = 8) -> dict[str, torch.Tensor]:
    """The decoder's weights under upstream names, with the zero k-bias buffers (the inverse of the key map)."""
    depth = len(decoder.blocks)
    if block_chunks < 1 or depth % block_chunks != 0:
        raise ValueError(f"block_chunks must divide depth={depth}, got {block_chunks}")
    per_chunk = None if block_chunks == 1 else depth // block_chunks
    state = {upstream_name(name, per_chunk): tensor for name, tensor in decoder.state_dict().items()}
    zeros = torch.zeros_like(decoder.pool.v_bias)
    state.update({name: zeros.clone() for name in ZERO_K_BIASES_GLOBAL})
    for index in range(depth):
        block_prefix = upstream_name(f"blocks.{index}.adaln_bias", per_chunk).removesuffix("ada_gss")
        state.update({block_prefix + name: zeros.clone() for name in ZERO_K_BIASES_BLOCK})
    return state


def _report(
    decoder: InfinityDecoder,
    mapped: Mapping[str, torch.Tensor],
    source_names: Mapping[str, str],
    unmatched: list[str],
    source: str,
    blocks_per_chunk: int | None,
) -> LoadReport:
    """Compare in our names, but say which upstream key each problem comes from (or would come from)."""
    expected = {name: tuple(t.shape) for name, t in decoder.state_dict().items()}
    report = compare_state_dict(expected, {name: tuple(t.shape) for name, t in mapped.items()}, source)

    def upstream(name: str) -> str:
        return f"{name} (upstream {upstream_name(name, blocks_per_chunk)!r})"

    report.missing = [upstream(name) for name in report.missing]
    report.mismatched = [(upstream(name), got, want) for name, got, want in report.mismatched]
    report.unexpected = [f"{name} (from {source_names[name]!r})" for name in report.unexpected]
    report.unexpected += [f"{name} (no rule in the Infinity key map)" for name in unmatched]
    return report


def load_infinity_state_dict(
    decoder: InfinityDecoder, state_dict: Mapping[str, torch.Tensor], source: str = "state dict", assign: bool = False
) -> LoadReport:
    """Load upstream-named weights into ``decoder`` strictly; CheckpointError names every bad key."""
    per_chunk = blocks_per_chunk_from_keys(state_dict.keys())
    key_map = infinity_key_map(per_chunk)
    names, _, _ = key_map.map_names(state_dict.keys())
    mapped, dropped, unmatched = key_map.apply(state_dict)
    chunked = any(_CHUNKED_BLOCK.search(key) for key in state_dict)
    source_names = {ours: up for up, ours in names.items()}
    report = _report(decoder, mapped, source_names, unmatched, source, per_chunk if chunked else None)
    report.dropped = dropped
    if not report.ok:
        raise CheckpointError(report.describe())
    decoder.load_state_dict(mapped, strict=True, assign=assign)
    return report


def load_infinity(
    path: str | os.PathLike,
    config: DecoderConfig | None = None,
    entry: str | None = None,
    device: torch.device | str = "cpu",
) -> InfinityDecoder:
    """Build an ``InfinityDecoder`` from an upstream ``.pth`` (``weights_only=True``); strict, in eval mode.

    ``entry`` selects a nested state dict, e.g. ``"trainer.gpt_fsdp"`` for a trainer checkpoint (`ar-ckpt*.pth`).
    The module is built on the meta device and takes the checkpoint's tensors (and dtype) directly.
    """
    state_dict = load_torch_file(path, entry)
    with torch.device("meta"):
        decoder = InfinityDecoder(config or DecoderConfig())
    load_infinity_state_dict(decoder, state_dict, source=str(path), assign=True)
    return decoder.to(device).eval()
