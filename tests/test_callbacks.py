"""Callbacks: analytic FLOP count and batch counting (throughput), sample grids, stage exports."""

from __future__ import annotations

from pathlib import Path

import lightning
import pytest
import torch
from PIL import Image
from torch import nn

from callbacks.export import export_stage, load_tokenizer_export, save_tokenizer_export
from callbacks.samples import SampleGrid, image_grid
from callbacks.throughput import (
    VARGPTFlopModel,
    count_batch,
    matmul_parameter_count,
    transformer_training_flops_per_token,
)
from helpers_tiny_model import TINY_SCHEDULE, make_batch, mixed_samples, tiny_model
from vargpt.config import TokenizerConfig
from vargpt.tokenizer import BSQVAE


def test_flops_per_token_is_six_n_plus_attention() -> None:
    assert transformer_training_flops_per_token(1000, 2, 8, 16) == 6 * 1000 + 12 * 2 * 8 * 16
    module = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 3))
    assert matmul_parameter_count(module) == 4 * 3 + 3


def test_vargpt_flop_model_counts_llm_and_decoder() -> None:
    model = tiny_model()
    flops = VARGPTFlopModel.from_model(model)
    language = model.backbone.language_model
    embedding = language.embed_tokens.weight.numel()
    llm = sum(p.numel() for p in language.parameters()) - embedding + model.lm_head.weight.numel()
    assert (flops.llm.matmul_parameters, flops.llm.layers, flops.llm.width) == (llm, 2, 64)
    assert flops.decoder.layers == 2 and flops.decoder.width == 64
    expected = (6 * llm + 12 * 2 * 64 * 40) * 30 + (6 * flops.decoder.matmul_parameters + 12 * 2 * 64 * 21) * 2 * 21
    assert flops.batch_flops(llm_tokens=30, sequence_length=40, images=2, tokens_per_image=21) == expected


def test_count_batch_reads_the_batch_contract() -> None:
    batch = make_batch(mixed_samples())
    count = count_batch(batch)
    assert count.samples == 4 and count.images == 2 and count.tokens_per_image == 1 + 4 + 16
    assert count.llm_tokens == int(batch["attention_mask"].sum())
    assert count.sequence_length == batch["attention_mask"].shape[1]
    preference = {"chosen_attention_mask": torch.ones(2, 5), "rejected_attention_mask": torch.ones(2, 7)}
    assert (count_batch(preference).llm_tokens, count_batch(preference).sequence_length) == (24, 7)
    with pytest.raises(KeyError, match="attention_mask"):
        count_batch({"input_ids": torch.ones(1, 2)})


def test_image_grid_places_images_row_by_row() -> None:
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    grid = image_grid([Image.new("RGB", (4, 3), colour) for colour in colours])
    assert grid.size == (8, 6)
    assert [grid.getpixel(xy) for xy in ((0, 0), (4, 0), (0, 3), (4, 3))] == [*colours, (0, 0, 0)]
    with pytest.raises(ValueError, match="one size"):
        image_grid([Image.new("RGB", (4, 3)), Image.new("RGB", (3, 3))])


def test_sample_grid_writes_a_png_and_restores_training_mode(tmp_path: Path) -> None:
    module = lightning.LightningModule()
    module.model = tiny_model().train()
    callback = SampleGrid(["a red circle", "two blue squares"], every_n_steps=5, folder=tmp_path, seed=3,
                          generation_kwargs={"schedule": TINY_SCHEDULE})
    trainer = lightning.Trainer(logger=False, accelerator="cpu", enable_progress_bar=False,
                                enable_model_summary=False, enable_checkpointing=False)
    path = callback.write_grid(trainer, module, 10)
    assert path == tmp_path / "step_0000010.png"
    assert Image.open(path).size == (32, 16) and module.model.training
    again = SampleGrid(["a red circle", "two blue squares"], 5, tmp_path / "again", seed=3,
                       generation_kwargs={"schedule": TINY_SCHEDULE}).write_grid(trainer, module, 10)
    assert Image.open(again).tobytes() == Image.open(path).tobytes()


def test_tokenizer_export_round_trips_and_checks_the_config(tmp_path: Path) -> None:
    config = TokenizerConfig(bits=16, base_channels=16, encoder_channel_multipliers=[1, 1, 1],
                             decoder_channel_multipliers=[1, 1, 1], encoder_res_blocks=1, decoder_res_blocks=1,
                             group_norm_groups=8)
    torch.manual_seed(0)
    vae = BSQVAE(config)
    save_tokenizer_export(vae, tmp_path / "vae")
    loaded = load_tokenizer_export(tmp_path / "vae")
    assert all(torch.equal(a, b) for a, b in zip(vae.state_dict().values(), loaded.state_dict().values()))
    other = BSQVAE(TokenizerConfig(**{**config.__dict__, "bits": 8}))
    with pytest.raises(ValueError, match="was made for"):
        load_tokenizer_export(tmp_path / "vae", into=other)


def test_export_stage_writes_a_loadable_vargpt_folder(tmp_path: Path) -> None:
    from vargpt.checkpoints.vargpt import from_pretrained

    module = lightning.LightningModule()
    module.model = tiny_model(seed=5)
    export_stage(module, tmp_path / "export")
    loaded, tokenizer = from_pretrained(tmp_path / "export")
    expected = module.model.state_dict()
    assert tokenizer is not None and loaded.state_dict().keys() == expected.keys()
    assert all(torch.equal(loaded.state_dict()[name], tensor) for name, tensor in expected.items())
    with pytest.raises(TypeError, match="no .model .* or .vae"):
        export_stage(lightning.LightningModule(), tmp_path / "none")
