"""The Infinity key map: upstream-named checkpoints load strictly and give identical logits; the 2B map on meta."""

import math

import pytest
import torch

from vargpt.checkpoints.core import CheckpointError
from vargpt.checkpoints.infinity import (
    INFINITY_KEY_MAP,
    blocks_per_chunk_from_keys,
    infinity_key_map,
    infinity_upstream_state_dict,
    load_infinity,
    load_infinity_state_dict,
)
from vargpt.config import DecoderConfig
from vargpt.decoder import InfinityDecoder

TINY = DecoderConfig(depth=4, width=64, heads=4, bits=8, condition_dim=96, pool_heads=2, text_max_tokens=16)

# The upstream names of one block and of the rest of the model (INFINITY §7.1), written out independently of the map.
UPSTREAM_BLOCK_KEYS = [
    "ada_gss", "sa.mat_qkv.weight", "sa.q_bias", "sa.v_bias", "sa.zero_k_bias", "sa.scale_mul_1H11",
    "sa.proj.weight", "sa.proj.bias", "ca.mat_q.weight", "ca.mat_q.bias", "ca.mat_kv.weight", "ca.v_bias",
    "ca.zero_k_bias", "ca.proj.weight", "ca.proj.bias", "ca_norm.weight", "ca_norm.bias", "ffn.fc1.weight",
    "ffn.fc1.bias", "ffn.fc2.weight", "ffn.fc2.bias",
]  # fmt: skip
UPSTREAM_GLOBAL_KEYS = [
    "cfg_uncond", "pos_start", "text_norm.weight", "text_proj_for_sos.ca.mat_q",
    "text_proj_for_sos.ca.mat_kv.weight", "text_proj_for_sos.ca.v_bias", "text_proj_for_sos.ca.zero_k_bias",
    "text_proj_for_sos.ca.proj.weight", "text_proj_for_sos.ca.proj.bias", "text_proj_for_ca.0.weight",
    "text_proj_for_ca.0.bias", "text_proj_for_ca.2.weight", "text_proj_for_ca.2.bias", "lvl_embed.weight",
    "word_embed.weight", "word_embed.bias", "shared_ada_lin.1.weight", "shared_ada_lin.1.bias",
    "head_nm.ada_lin.1.weight", "head_nm.ada_lin.1.bias", "head.weight", "head.bias",
]  # fmt: skip


def upstream_keys(depth: int, block_chunks: int) -> set[str]:
    per_chunk = depth // block_chunks
    prefixes = [
        f"blocks.{n}." if block_chunks == 1 else f"block_chunks.{n // per_chunk}.module.{n % per_chunk}."
        for n in range(depth)
    ]
    return set(UPSTREAM_GLOBAL_KEYS) | {prefix + key for prefix in prefixes for key in UPSTREAM_BLOCK_KEYS}


def random_decoder(seed: int) -> InfinityDecoder:
    torch.manual_seed(seed)
    decoder = InfinityDecoder(TINY)
    with torch.no_grad():
        for parameter in decoder.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    return decoder.eval()


def logits_of(decoder: InfinityDecoder) -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    tokens = torch.randn(2, 4, TINY.condition_dim, generator=generator)
    mask = torch.tensor([[True] * 4, [True, True, False, False]])
    schedule = [(1, 1), (2, 2), (3, 3)]
    with torch.no_grad():
        condition = decoder.encode_text(tokens, mask)
        x = decoder.embed_inputs(condition.cond, torch.randn(2, 13, TINY.bits, generator=generator))
        return decoder(x, condition.cond, condition.context, condition.context_mask, schedule)


@pytest.mark.parametrize("block_chunks", [2, 1])
def test_upstream_checkpoint_loads_and_gives_identical_logits(tmp_path, block_chunks):
    source = random_decoder(seed=0)
    upstream = infinity_upstream_state_dict(source, block_chunks=block_chunks)
    assert set(upstream) == upstream_keys(TINY.depth, block_chunks)
    assert all(upstream[key].abs().max() == 0 for key in upstream if key.endswith("zero_k_bias"))
    path = tmp_path / "infinity_tiny.pth"
    torch.save(upstream, path)
    loaded = load_infinity(path, TINY)
    assert torch.equal(logits_of(loaded), logits_of(source))
    assert not torch.equal(logits_of(random_decoder(seed=1)), logits_of(source))  # the comparison can fail


def test_trainer_checkpoint_entry_and_dropped_buffers(tmp_path):
    source = random_decoder(seed=0)
    upstream = infinity_upstream_state_dict(source, block_chunks=2)
    upstream["attn_bias_for_masking"] = torch.zeros(1, 1, 5, 5)
    upstream["lvl_1L"] = torch.zeros(1, 5, dtype=torch.long)
    path = tmp_path / "ar-ckpt-last.pth"
    torch.save({"trainer": {"gpt_fsdp": upstream}, "epoch": torch.tensor(3)}, path)
    loaded = load_infinity(path, TINY, entry="trainer.gpt_fsdp")
    assert torch.equal(logits_of(loaded), logits_of(source))


def test_customized_flash_attention_scale_shape_is_accepted():
    source = random_decoder(seed=0)
    upstream = infinity_upstream_state_dict(source, block_chunks=2)
    key = "block_chunks.1.module.0.sa.scale_mul_1H11"
    upstream[key] = upstream[key].reshape(1, 1, TINY.heads, 1)
    target = InfinityDecoder(TINY)
    load_infinity_state_dict(target, upstream)
    assert torch.equal(target.blocks[2].attn.logit_scale, source.blocks[2].attn.logit_scale)


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        (lambda sd: sd.pop("block_chunks.1.module.0.ffn.fc2.bias"), "block_chunks.1.module.0.ffn.fc2.bias"),
        (lambda sd: sd.pop("head.weight"), "'head.weight'"),
        (lambda sd: sd.__setitem__("block_chunks.0.module.1.sa.extra_gate", torch.zeros(3)), "sa.extra_gate"),
        (lambda sd: sd.__setitem__("block_chunks.2.module.0.ada_gss", torch.zeros(1, 1, 6, 64)), "'block_chunks.2"),
        (lambda sd: sd.__setitem__("head.weight", torch.zeros(32, 64)), "head.proj.weight (upstream 'head.weight')"),
    ],
    ids=["missing-block-key", "missing-global-key", "unknown-key", "extra-block", "wrong-shape"],
)
def test_bad_checkpoints_raise_naming_the_key(edit, named):
    upstream = infinity_upstream_state_dict(random_decoder(seed=0), block_chunks=2)
    edit(upstream)
    with pytest.raises(CheckpointError) as error:
        load_infinity_state_dict(InfinityDecoder(TINY), upstream, source="tiny.pth")
    assert named in str(error.value)


def test_blocks_per_chunk_is_derived_from_the_keys():
    assert blocks_per_chunk_from_keys(["block_chunks.0.module.0.ada_gss", "block_chunks.3.module.3.ada_gss"]) == 4
    assert blocks_per_chunk_from_keys(["block_chunks.1.module.1.sa.q_bias"]) == 2
    assert blocks_per_chunk_from_keys(["blocks.7.ada_gss"], default=5) == 5
    assert infinity_key_map(2).target("block_chunks.3.module.1.ffn.fc1.bias")[0] == "blocks.7.mlp.fc1.bias"
    assert infinity_key_map(4, prefix="vargpt_gen.", target_prefix="decoder.").target(
        "vargpt_gen.block_chunks.3.module.1.ca.v_bias"
    )[0] == "decoder.blocks.13.cross_attn.v_bias"


def test_released_2b_map_on_the_meta_device():
    with torch.device("meta"):
        decoder = InfinityDecoder(DecoderConfig())
    assert sum(p.numel() for p in decoder.parameters()) / 1e9 == pytest.approx(2.2046, abs=5e-5)
    upstream = infinity_upstream_state_dict(decoder, block_chunks=8)
    assert len(upstream) == 694
    assert set(upstream) == upstream_keys(32, 8)
    shapes = {key: tuple(tensor.shape) for key, tensor in upstream.items()}
    assert shapes["cfg_uncond"] == (512, 2048) and shapes["text_proj_for_sos.ca.mat_q"] == (1, 16, 128)
    assert shapes["text_proj_for_sos.ca.mat_kv.weight"] == (4096, 2048) and shapes["lvl_embed.weight"] == (15, 2048)
    assert shapes["word_embed.weight"] == (2048, 32) and shapes["shared_ada_lin.1.weight"] == (12288, 2048)
    assert shapes["head_nm.ada_lin.1.weight"] == (4096, 2048) and shapes["head.weight"] == (64, 2048)
    assert shapes["block_chunks.7.module.3.ada_gss"] == (1, 1, 6, 2048)
    assert shapes["block_chunks.0.module.0.sa.scale_mul_1H11"] == (1, 16, 1, 1)
    assert shapes["block_chunks.0.module.0.sa.mat_qkv.weight"] == (6144, 2048)
    assert shapes["block_chunks.0.module.0.ffn.fc1.weight"] == (8192, 2048)
    mapped, dropped, unmatched = INFINITY_KEY_MAP.apply(upstream)
    assert not unmatched and len(dropped) == 65
    ours = {key: tuple(tensor.shape) for key, tensor in decoder.state_dict().items()}
    assert {key: tuple(tensor.shape) for key, tensor in mapped.items()} == ours
    report = load_infinity_state_dict(decoder, upstream, assign=True)
    assert report.loaded == 629 and math.isclose(len(report.dropped), 65)
