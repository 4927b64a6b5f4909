"""Tokenizer stage: the loss terms, and a tiny BSQ-VAE that learns to reconstruct synthetic shapes images."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from datamodules.synthetic import draw_picture
from helpers_tiny_model import tiny_config
from vargpt.stages import StageConfig
from vargpt.stages.base import build_optimizer
from vargpt.stages.tokenizer import TokenizerStage, binary_entropy, bit_probabilities, tokenizer_losses
from vargpt.tokenizer import BSQVAE

IMAGE_SIZE = 16


def shapes_images(count: int, seed: int) -> torch.Tensor:
    """Synthetic shapes pictures (count, 3, 16, 16) in [-1, 1]."""
    rng = random.Random(seed)
    pictures = [np.asarray(draw_picture(rng, IMAGE_SIZE)[0], dtype=np.float32) for _ in range(count)]
    return torch.from_numpy(np.stack(pictures)).permute(0, 3, 1, 2) / 127.5 - 1


def tiny_vae(seed: int = 0) -> BSQVAE:
    torch.manual_seed(seed)
    return BSQVAE(tiny_config().tokenizer)


def test_entropy_terms():
    assert binary_entropy(torch.tensor(0.5)).item() == pytest.approx(np.log(2))
    assert binary_entropy(torch.tensor(1.0)).item() < 1e-4
    features = torch.randn(2, 16, 4, 4)
    probabilities = bit_probabilities(features, 100.0)
    assert bool(((probabilities > 0.5) == (features > 0)).all())


def test_every_term_is_finite_and_reaches_the_encoder():
    vae = tiny_vae()
    losses = tokenizer_losses(vae, shapes_images(2, 0), StageConfig(stage="tokenizer").tokenizer_losses)
    assert set(losses) == {"loss", "l1", "l2", "gradient", "commitment", "per_bit_entropy", "codebook_entropy"}
    assert all(torch.isfinite(value) for value in losses.values())
    losses["loss"].backward()
    assert vae.encoder.conv_in.weight.grad.abs().sum() > 0
    assert vae.decoder.conv_out.weight.grad.abs().sum() > 0


@pytest.fixture
def single_thread():
    """One intra-op thread: tiny convolutions run several times faster than with two contended threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_training_reduces_the_reconstruction_error(single_thread):
    vae = tiny_vae()
    config = StageConfig(stage="tokenizer", optimizer={"lr": 2e-3}, schedule={"total_steps": 200, "warmup_ratio": 0.05})
    stage = TokenizerStage(vae, config)
    optimizer_config = stage.configure_optimizers()
    optimizer, scheduler = optimizer_config["optimizer"], optimizer_config["lr_scheduler"]["scheduler"]
    train = shapes_images(64, 1)
    held_out = shapes_images(16, 2)

    def held_out_error() -> float:
        with torch.no_grad():
            reconstruction, _ = vae(held_out)
        return (reconstruction.clamp(-1, 1) - held_out).pow(2).mean().item()

    initial = held_out_error()
    generator = torch.Generator().manual_seed(0)
    stage.train()
    for step in range(200):
        batch = train[torch.randint(0, len(train), (8,), generator=generator)]
        optimizer.zero_grad()
        stage.training_step(batch, step).backward()
        optimizer.step()
        scheduler.step()
    final = held_out_error()
    assert final < 0.25 * initial, (initial, final)


def test_tokenizer_stage_checks_its_config():
    with pytest.raises(ValueError, match="config.stage"):
        TokenizerStage(tiny_vae(), StageConfig(stage="generation_sft"))
    with pytest.raises(ValueError, match="images"):
        TokenizerStage(tiny_vae(), StageConfig(stage="tokenizer")).training_step({"input_ids": None}, 0)


def test_tokenizer_stage_lr_multiplier_covers_the_whole_vae():
    config = StageConfig(stage="tokenizer", optimizer={"lr": 1e-3, "lr_multipliers": {"tokenizer": 2.0}})
    stage = TokenizerStage(tiny_vae(), config)
    optimizer = build_optimizer(stage, config)
    assert {group["lr"] for group in optimizer.param_groups} == {2e-3}
    assert sum(len(group["params"]) for group in optimizer.param_groups) == len(list(stage.vae.parameters()))
