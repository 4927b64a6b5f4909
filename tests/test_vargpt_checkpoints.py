"""Whole-model checkpoints: our export, the released VARGPT-v1.1 layout, init from Qwen2-VL + Infinity + BSQ-VAE.

Released-layout folders are written from a tiny model through the inverse map (``released_state_dict``), with
everything the real files carry that we do not keep: the full ``sos_embedding`` table, the unused ``ln_q``
LayerNorms, Infinity's ``zero_k_bias`` buffers in ``block_chunks`` naming and the VAE's ``lfq.mask``. The full-size
map is checked on the meta device only (the real model has ~11 B parameters).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from helpers_tiny_model import make_batch, mixed_samples, tiny_model
from vargpt.checkpoints.bsq_vae import bsq_vae_upstream_state_dict
from vargpt.checkpoints.core import CheckpointError, read_safetensors_folder, write_safetensors_folder
from vargpt.checkpoints.infinity import infinity_upstream_state_dict
from vargpt.checkpoints.qwen2_vl import qwen2_vl_name
from vargpt.checkpoints.vargpt import (
    EXPORT_KEY_MAP,
    build_empty,
    export_config,
    from_pretrained,
    init_from_parts,
    load_folder_streaming,
    released_config_json,
    released_key_map,
    released_state_dict,
    save_pretrained,
)
from vargpt.config import DecoderConfig
from vargpt.config_io import load_model_config
from vargpt.model import VARGPT
from vargpt.text_tokenizer import TokenizerError

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "model"
FOUR_BLOCKS = DecoderConfig(
    depth=4, width=64, heads=2, bits=16, condition_dim=64, pool_heads=2, text_max_tokens=256, drop_path=0.0
)


@pytest.fixture(scope="module")
def model() -> VARGPT:
    """Tiny model with 4 decoder blocks, saved below as 2 chunks of 2 (so chunk * 2 + j is exercised)."""
    return tiny_model(seed=3, decoder=FOUR_BLOCKS)


def outputs(model: VARGPT) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and bit logits of one teacher-forced forward over a mixed batch, with fixed corruption."""
    with torch.no_grad():
        out = model.training_forward(make_batch(mixed_samples()), torch.Generator().manual_seed(7))
    return out.loss, out.bit_logits


def assert_same_model(loaded: VARGPT, source: VARGPT) -> None:
    ours, theirs = loaded.state_dict(), source.state_dict()
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)
    loss, logits = outputs(loaded)
    reference_loss, reference_logits = outputs(source)
    assert torch.equal(loss, reference_loss) and torch.equal(logits, reference_logits)


def write_released(model: VARGPT, folder: Path, state: dict | None = None) -> Path:
    state = released_state_dict(model, block_chunks=2) if state is None else state
    config = json.dumps(released_config_json(model.config))
    return write_safetensors_folder(state, folder, max_shard_bytes=300_000, extra_files={"config.json": config})


# ------------------------------------------------------------------------------------------- full size, meta


def test_full_size_released_key_map_on_meta() -> None:
    config = load_model_config(CONFIGS / "vargpt_v1_1.yaml")
    with torch.device("meta"):
        model = VARGPT(config)
    released = released_state_dict(model)
    assert len(released) == 1706  # VARGPT §6.2
    groups = {"visual.": 391, "model.": 338, "lm_head.": 1, "image_gen_projector": 12, "sos_embedding.": 1,
              "vargpt_gen.": 694, "vae_local.": 269}
    assert {prefix: sum(k.startswith(prefix) for k in released) for prefix in groups} == groups
    assert sum(t.numel() for t in released.values()) == pytest.approx(10.95e9, rel=1e-3)  # VARGPT §1.1
    shapes = {
        "visual.patch_embed.proj.weight": (1280, 3, 2, 14, 14),
        "visual.merger.mlp.2.weight": (3584, 5120),
        "model.embed_tokens.weight": (152064, 3584),
        "model.layers.27.self_attn.k_proj.weight": (512, 3584),
        "lm_head.weight": (152064, 3584),
        "image_gen_projector.mlp.2.weight": (3584, 2048),
        "image_gen_projector_out.ln_q.weight": (3584,),
        "sos_embedding.weight": (151658, 2048),
        "vargpt_gen.cfg_uncond": (512, 2048),
        "vargpt_gen.block_chunks.7.module.3.sa.mat_qkv.weight": (6144, 2048),
        "vargpt_gen.block_chunks.7.module.3.ffn.fc1.weight": (8192, 2048),
        "vargpt_gen.head.weight": (64, 2048),
        "vae_local.encoder.conv_out.conv.weight": (32, 512, 3, 3),
        "vae_local.decoder.conv_out.conv.weight": (3, 128, 3, 3),
        "vae_local.quantizer.lfq.mask": (32,),
    }
    assert {name: tuple(released[name].shape) for name in shapes} == shapes
    mapped, dropped, unmatched = released_key_map(config).apply(released)
    assert unmatched == [] and len(dropped) == 4 + 1 + 2 * 32 + 1  # ln_q, zero_k_bias, lfq.mask
    ours = model.state_dict()
    assert {k: tuple(v.shape) for k, v in mapped.items()} == {k: tuple(v.shape) for k, v in ours.items()}


def test_full_size_model_is_built_without_weights() -> None:
    """Loading starts from parameters on meta (nothing allocated) and real rotary buffers (no checkpoint has them)."""
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model = build_empty(load_model_config(CONFIGS / "vargpt_v1_1.yaml"))
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(10.64e9, rel=1e-3)
    assert {b.device.type for b in model.buffers()} == {"cpu"}
    assert grown_kib < 1024**2  # far below the 42 GB the fp32 weights would take


def test_loading_streams_one_shard_at_a_time(model: VARGPT, tmp_path: Path) -> None:
    folder = save_pretrained(model, tmp_path / "export", max_shard_bytes=100_000)
    shards = [set(shard_keys(path)) for path in sorted(folder.glob("model-*.safetensors"))]
    empty = build_empty(model.config)
    calls: list[set[str]] = []
    original = empty.load_state_dict

    def recording(state_dict: dict, *args: Any, **kwargs: Any) -> Any:
        calls.append(set(state_dict))
        return original(state_dict, *args, **kwargs)

    empty.load_state_dict = recording  # type: ignore[method-assign]
    load_folder_streaming(empty, folder, EXPORT_KEY_MAP)
    assert len(shards) > 3 and sorted(map(sorted, calls)) == sorted(map(sorted, shards))


def shard_keys(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return list(handle.keys())


# ------------------------------------------------------------------------------------------- released layout


def test_released_layout_loads_and_gives_identical_outputs(model: VARGPT, tmp_path: Path) -> None:
    folder = write_released(model, tmp_path / "released")
    on_disk = read_safetensors_folder(folder)
    assert len(list(folder.glob("model-*.safetensors"))) > 1
    assert on_disk["sos_embedding.weight"].shape == (model.config.image_gen_start_token_id + 1, 64)
    assert "image_gen_projector.ln_q.weight" in on_disk and "vae_local.quantizer.lfq.mask" in on_disk
    assert "vargpt_gen.block_chunks.1.module.1.sa.zero_k_bias" in on_disk
    assert not any(name.startswith("vargpt_gen.blocks.") for name in on_disk)
    loaded, tokenizer = from_pretrained(folder, config=model.config)
    assert tokenizer is None
    assert_same_model(loaded, model)


def test_released_layout_is_strict(model: VARGPT, tmp_path: Path) -> None:
    state = released_state_dict(model, block_chunks=2)
    missing = dict(state)
    del missing["vargpt_gen.block_chunks.1.module.0.ca.mat_q.weight"]
    with pytest.raises(CheckpointError, match=r"decoder\.blocks\.2\.cross_attn\.q\.weight.*block_chunks\.1\.module\.0"):
        from_pretrained(write_released(model, tmp_path / "missing", missing), config=model.config)
    extra = dict(state, **{"vargpt_gen.extra_head.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError, match=r"vargpt_gen\.extra_head\.weight \(no rule"):
        from_pretrained(write_released(model, tmp_path / "extra", extra), config=model.config)
    wrong = dict(state, **{"model.norm.weight": torch.ones(65)})
    with pytest.raises(CheckpointError, match=r"backbone\.language_model\.norm\.weight.*\(65,\) vs module \(64,\)"):
        from_pretrained(write_released(model, tmp_path / "wrong", wrong), config=model.config)
    short = dict(state, **{"sos_embedding.weight": torch.zeros(5, 64)})
    with pytest.raises(CheckpointError, match=r"sos_embedding\.weight has shape \(5, 64\)"):
        from_pretrained(write_released(model, tmp_path / "short", short), config=model.config)


def test_named_missing_parts_are_initialised_fresh(model: VARGPT, tmp_path: Path) -> None:
    state = {k: v for k, v in released_state_dict(model, block_chunks=2).items() if not k.startswith("image_gen")}
    folder = write_released(model, tmp_path / "no_projectors", state)
    loaded, _ = from_pretrained(folder, config=model.config, allow_missing=[r"bridge\.(in|out)_projector\..+"])
    assert torch.count_nonzero(loaded.bridge.in_projector.fc1.bias) == 0
    assert 0.01 < float(loaded.bridge.out_projector.fc2.weight.detach().std()) < 0.03
    assert torch.equal(loaded.bridge.start_condition, model.bridge.start_condition)


# ------------------------------------------------------------------------------------------- our export


def test_export_round_trip_sharded(model: VARGPT, tmp_path: Path) -> None:
    folder = save_pretrained(model, tmp_path / "export", max_shard_bytes=200_000)
    assert (folder / "model.safetensors.index.json").is_file() and (folder / "tokenizer.json").is_file()
    assert json.loads((folder / "config.json").read_text())["format"] == "vargpt-lightning"
    loaded, tokenizer = from_pretrained(folder)
    assert loaded.config == model.config and loaded.text_tokenizer is tokenizer
    assert tokenizer.get_vocab() == model.text_tokenizer.get_vocab()
    assert_same_model(loaded, model)


def test_export_in_bfloat16_keeps_rotary_buffers_fp32(model: VARGPT, tmp_path: Path) -> None:
    loaded, _ = from_pretrained(save_pretrained(model, tmp_path / "export"), dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert loaded.backbone.language_model.rotary_emb.inv_freq.dtype == torch.float32
    assert not [n for n, t in loaded.state_dict().items() if t.device.type == "meta"]


def test_export_is_strict(model: VARGPT, tmp_path: Path) -> None:
    folder = save_pretrained(model, tmp_path / "export")
    state = read_safetensors_folder(folder)
    del state["bridge.start_condition"]
    state["decoder.extra"] = torch.zeros(1)
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError) as error:
        from_pretrained(folder)
    assert "bridge.start_condition" in str(error.value) and "decoder.extra" in str(error.value)


def test_export_loads_into_a_given_config(model: VARGPT, tmp_path: Path) -> None:
    """A fine-tuning run's own config wins over the export's where the weights fit it; sizes that do not fit fail."""
    folder = save_pretrained(model, tmp_path / "export")
    changed = dataclasses.replace(model.config, bit_loss_weights="magnitude", max_flip=0.05)
    loaded, _ = from_pretrained(folder, config=changed)
    assert loaded.config == changed and export_config(folder) == model.config
    ours, theirs = loaded.state_dict(), model.state_dict()
    assert set(ours) == set(theirs) and all(torch.equal(ours[name], theirs[name]) for name in ours)
    assert not torch.equal(outputs(loaded)[0], outputs(model)[0])  # the loss follows the given config
    wider = dataclasses.replace(model.config, decoder=dataclasses.replace(FOUR_BLOCKS, width=96))
    with pytest.raises(CheckpointError, match="decoder"):
        from_pretrained(folder, config=wider)


def test_bad_folders_fail_naming_the_problem(model: VARGPT, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="absent"):
        from_pretrained(tmp_path / "absent")
    unknown = write_safetensors_folder({"encoder.weight": torch.zeros(2)}, tmp_path / "unknown")
    with pytest.raises(CheckpointError, match="unknown layout"):
        from_pretrained(unknown)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        from_pretrained(tmp_path / "empty")
    folder = save_pretrained(model, tmp_path / "export")
    document = json.loads((folder / "config.json").read_text())
    document["vargpt"]["decoder"]["dept"] = 3
    (folder / "config.json").write_text(json.dumps(document))
    with pytest.raises(Exception, match=r"unknown key vargpt\.decoder\.dept"):
        from_pretrained(folder)


def test_tokenizer_without_the_special_tokens_fails(model: VARGPT, tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel()
    bpe.train_from_iterator(["plain text"], trainer=trainers.BpeTrainer(vocab_size=260, show_progress=False))
    folder = save_pretrained(model, tmp_path / "export", tokenizer=PreTrainedTokenizerFast(tokenizer_object=bpe))
    with pytest.raises(TokenizerError, match=r"lacks Qwen2-VL's special tokens .*<\|im_start\|>"):
        from_pretrained(folder)


# ------------------------------------------------------------------------------------------- init from parts


@pytest.mark.parametrize("names", ["transformers4", "transformers5"])
def test_init_from_parts(model: VARGPT, tmp_path: Path, names: str) -> None:
    qwen = {}
    for name, tensor in model.state_dict().items():
        if name.startswith(("backbone.", "lm_head.")):
            key = qwen2_vl_name(name) if names == "transformers4" else name.replace("backbone.", "model.", 1)
            qwen[key] = tensor
    folder = write_safetensors_folder(qwen, tmp_path / "qwen2_vl", max_shard_bytes=100_000)
    model.text_tokenizer.save_pretrained(folder)
    infinity = tmp_path / "infinity_2b_reg.pth"
    torch.save(infinity_upstream_state_dict(model.decoder, block_chunks=2), infinity)
    vae = tmp_path / "infinity_vae_d32reg.pth"
    torch.save({"vae": bsq_vae_upstream_state_dict(model.tokenizer)}, vae)

    built = init_from_parts(folder, infinity, vae, model.config, seed=1)
    ours, theirs = built.state_dict(), model.state_dict()
    for name in theirs:
        if not name.startswith("bridge."):
            assert torch.equal(ours[name], theirs[name]), name
    assert torch.count_nonzero(built.bridge.in_projector.fc2.bias) == 0
    assert 0.015 < float(built.bridge.in_projector.fc1.weight.detach().std()) < 0.025
    assert 0.01 < float(built.bridge.start_condition.detach().std()) < 0.03
    assert not any(p.requires_grad for p in built.tokenizer.parameters())
    assert built.text_tokenizer.get_vocab() == model.text_tokenizer.get_vocab()

    with pytest.raises(FileNotFoundError, match="Infinity checkpoint not found: .*nope.pth"):
        init_from_parts(folder, tmp_path / "nope.pth", vae, model.config)
    with pytest.raises(FileNotFoundError, match="Qwen2-VL folder not found"):
        init_from_parts(tmp_path / "no_qwen", infinity, vae, model.config)
