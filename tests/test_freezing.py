"""Freezing by explicit groups: exactly the configured groups change in training, nothing else does."""

from __future__ import annotations

import pytest
import torch

from helpers_tiny_model import make_batch, mixed_samples, tiny_model
from vargpt.config import ConfigError
from vargpt.stages import GROUP_NAMES, STAGES, StageConfig
from vargpt.stages.freezing import apply_freezing, group_parameters, parameter_counts


def test_every_parameter_is_in_exactly_one_group():
    model = tiny_model()
    groups = group_parameters(model)
    names = [name for parameters in groups.values() for name in parameters]
    assert sorted(names) == sorted(name for name, _ in model.named_parameters())
    assert set(groups) == set(GROUP_NAMES)
    assert all(groups[group] for group in GROUP_NAMES)
    assert all(name.startswith("backbone.visual.merger.") for name in groups["merger"])
    assert not any(".merger." in name for name in groups["vision"])


def test_apply_freezing_sets_requires_grad_by_group_and_counts():
    model = tiny_model()
    groups = apply_freezing(model, ["llm", "merger"])
    for group, parameters in groups.items():
        assert all(parameter.requires_grad == (group in ("llm", "merger")) for parameter in parameters.values())
    counts = parameter_counts(groups)
    total = sum(parameter.numel() for parameter in model.parameters())
    assert set(counts) == {"trainable/llm", "trainable/merger", "frozen"}
    assert counts["trainable/llm"] + counts["trainable/merger"] + counts["frozen"] == total


def test_unknown_group_is_an_error_listing_the_valid_ones():
    with pytest.raises(ConfigError, match="valid groups.*'vision'"):
        StageConfig(stage="generation_sft", trainable=["decoder", "visual"])
    with pytest.raises(ValueError, match="valid groups"):
        apply_freezing(tiny_model(), ["projectors"])
    with pytest.raises(ConfigError, match="tokenizer"):
        StageConfig(stage="dpo", trainable=["decoder", "tokenizer"])


def _snapshot(model):
    return {name: parameter.detach().clone() for name, parameter in model.named_parameters()}


@pytest.mark.parametrize(
    ("stage", "trainable"),
    [
        ("alignment", None),
        ("understanding_sft", ["llm", "lm_head", "merger"]),
        ("generation_sft", None),
        ("editing_sft", ["decoder", "llm"]),
    ],
)
def test_only_the_configured_groups_change(stage, trainable):
    if stage not in STAGES:
        pytest.skip(f"stage {stage} not built")
    model = tiny_model()
    config = StageConfig(stage=stage, trainable=trainable, schedule={"total_steps": 3, "warmup_ratio": 0.0},
                         optimizer={"lr": 1e-3, "weight_decay": 0.01})
    module = STAGES[stage](model, config)
    optimizer = module.configure_optimizers()["optimizer"]
    before = _snapshot(model)
    batch = make_batch(mixed_samples())
    module.train()
    for step in range(3):
        optimizer.zero_grad()
        module.training_step(batch, step).backward()
        optimizer.step()
    after = _snapshot(model)
    groups = group_parameters(model)
    for group, parameters in groups.items():
        changed = [name for name in parameters if not torch.equal(before[name], after[name])]
        if group in config.trainable:
            assert changed, f"trainable group {group} did not change"
        else:
            assert changed == [], f"frozen group {group} changed: {changed}"
