"""The ViT's patch embedding computed as a matrix product: the same outputs, gradients and state-dict keys."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers.models.qwen2_vl.modeling_qwen2_vl import PatchEmbed

from helpers_tiny_model import tiny_config, tiny_model
from vargpt.patch_embed import LinearPatchEmbed, is_patchwise, use_linear_patch_embed
from vargpt.quickstart.vision import build_vision_tower


class Tower(nn.Module):
    def __init__(self, embed: nn.Module) -> None:
        super().__init__()
        self.patch_embed = embed


@pytest.mark.parametrize("patch, temporal, channels, dim", [(14, 2, 3, 64), (4, 1, 2, 8)])
def test_linear_patch_embed_matches_the_convolution(patch: int, temporal: int, channels: int, dim: int) -> None:
    torch.manual_seed(0)
    stock = PatchEmbed(patch, temporal, channels, dim)
    tower = Tower(copy.deepcopy(stock))
    assert use_linear_patch_embed(tower)
    assert isinstance(tower.patch_embed, LinearPatchEmbed)
    patches = torch.randn(37, channels * temporal * patch * patch)
    expected, got = stock(patches), tower.patch_embed(patches)
    assert got.shape == expected.shape == (37, dim)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    expected.square().sum().backward()
    got.square().sum().backward()
    torch.testing.assert_close(tower.patch_embed.proj.weight.grad, stock.proj.weight.grad, rtol=1e-4, atol=1e-4)
    assert list(tower.state_dict()) == ["patch_embed.proj.weight"]


def test_the_tower_keeps_its_own_parameters_draws_nothing_and_a_second_call_is_a_no_op() -> None:
    embed = PatchEmbed(4, 1, 2, 8)
    tower = Tower(embed)
    weight, random_state = embed.proj.weight, torch.get_rng_state()
    assert use_linear_patch_embed(tower) and use_linear_patch_embed(tower)
    assert tower.patch_embed.proj.weight is weight  # an optimizer built before still steps the right tensor
    assert torch.equal(torch.get_rng_state(), random_state)  # draws nothing: a seeded model's init is unchanged


def test_a_projection_that_is_not_patchwise_is_left_as_it_is() -> None:
    embed = PatchEmbed(4, 1, 2, 8)
    embed.proj = nn.Conv3d(2, 8, kernel_size=(1, 4, 4), stride=(1, 2, 2), bias=False)  # overlapping windows
    tower = Tower(embed)
    assert not is_patchwise(embed.proj)
    assert not use_linear_patch_embed(tower)
    assert type(tower.patch_embed) is PatchEmbed
    assert not use_linear_patch_embed(Tower(nn.Linear(3, 3)))  # not Qwen2-VL's embedding at all


def test_the_model_and_the_quickstart_tower_use_it() -> None:
    model = tiny_model()
    assert isinstance(model.backbone.visual.patch_embed, LinearPatchEmbed)
    assert "backbone.visual.patch_embed.proj.weight" in model.state_dict()
    tower = build_vision_tower(tiny_config().qwen2_vl)
    assert isinstance(tower.patch_embed, LinearPatchEmbed)
