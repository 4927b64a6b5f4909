"""Golden loss traces: three optimizer steps of every stage on the tiny model, fixed seeds and fixed synthetic
batches, must reproduce the stored losses (relative 1e-5). Regenerate after an intended change with
``VARGPT_UPDATE_GOLDEN=1 pytest tests/test_golden_traces.py`` and review the diff of ``tests/golden``."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch

from helpers_tiny_model import make_batch, mixed_samples, tiny_config, tiny_image, tiny_model
from test_dpo import preference_batch
from test_tokenizer_stage import shapes_images
from vargpt.stages import STAGES, StageConfig
from vargpt.stages.tokenizer import TokenizerStage
from vargpt.tokenizer import BSQVAE

GOLDEN = Path(__file__).parent / "golden" / "stage_losses.json"
STEPS = 3
UPDATE = os.environ.get("VARGPT_UPDATE_GOLDEN") == "1"


def generation_sample(index: int) -> dict:
    prompts = ["a red circle on a blue square", "two green triangles next to a yellow star"]
    return {"messages": [{"role": "user", "content": prompts[index % 2]},
                         {"role": "assistant", "content": "here is the picture you asked for<image_gen>"}],
            "targets": [tiny_image(10 + index)]}


def stage_batches(stage: str) -> list:
    """``STEPS`` fixed batches of the stage's kind of data."""
    understanding, _, editing, text = mixed_samples()
    if stage == "tokenizer":
        return [shapes_images(4, step) for step in range(STEPS)]
    if stage == "dpo":
        return [preference_batch([step, step + 1]) for step in range(STEPS)]
    if stage == "understanding_sft":
        return [make_batch([understanding, text, generation_sample(step)]) for step in range(STEPS)]
    if stage == "editing_sft":
        return [make_batch([editing, generation_sample(step)]) for step in range(STEPS)]
    return [make_batch([generation_sample(step), generation_sample(step + 1)]) for step in range(STEPS)]


def build_stage(stage: str):
    config = StageConfig(stage=stage, seed=7, optimizer={"lr": 1e-3, "weight_decay": 0.01},
                         schedule={"total_steps": STEPS, "warmup_ratio": 0.0})
    if stage == "tokenizer":
        torch.manual_seed(0)
        return TokenizerStage(BSQVAE(tiny_config().tokenizer), config)
    model = tiny_model(condition_drop=0.5)
    reference = copy.deepcopy(model) if stage == "dpo" else None
    return STAGES[stage](model, config, reference=reference)


def loss_trace(stage: str) -> list[float]:
    module = build_stage(stage)
    optimizers = module.configure_optimizers()
    optimizer, scheduler = optimizers["optimizer"], optimizers["lr_scheduler"]["scheduler"]
    module.train()
    trace = []
    for step, batch in enumerate(stage_batches(stage)):
        optimizer.zero_grad()
        loss = module.training_step(batch, step)
        loss.backward()
        optimizer.step()
        scheduler.step()
        trace.append(loss.item())
    return trace


STAGE_NAMES = ["tokenizer", "alignment", "understanding_sft", "generation_sft", "dpo", "editing_sft"]


@pytest.mark.parametrize("stage", STAGE_NAMES)
def test_loss_trace_matches_golden(stage):
    trace = loss_trace(stage)
    stored = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
    if UPDATE:
        stored[stage] = trace
        GOLDEN.write_text(json.dumps(stored, indent=2, sort_keys=True) + "\n")
    assert stage in stored, f"no golden trace for {stage}: run with VARGPT_UPDATE_GOLDEN=1"
    assert trace == pytest.approx(stored[stage], rel=1e-5)
    assert len(set(trace)) == STEPS, "the steps should differ (parameters or data change)"
