"""Image tokens that carry their place (``understanding_place_scale``, ``generation_place_scale``): the sinusoid table,
how it is added, where the model adds it (understanding tokens in ViT order, generation tokens per scale), and the
config's checks."""

from __future__ import annotations

import pytest
import torch
from helpers_tiny_model import TINY_SCHEDULE, make_batch, tiny_config, tiny_image, tiny_model

from vargpt.config import VARGPTConfig
from vargpt.positions import add_places, place_table


def test_place_table_rows_have_unit_rms_and_differ_from_each_other() -> None:
    table = place_table(4, 4, 128)
    assert table.shape == (16, 128) and table.dtype == torch.float32
    assert torch.allclose(table.pow(2).mean(-1), torch.ones(16), atol=1e-6)
    distances = torch.cdist(table, table) + torch.eye(16) * 1e3
    assert float(distances.min()) > 1.0


def test_the_lowest_frequency_cosines_are_monotonic_in_the_row_and_the_column() -> None:
    count = 128 // 4
    grid = place_table(5, 6, 128).reshape(5, 6, 128)
    row_cos, column_cos = grid[:, 0, count], grid[0, :, 3 * count]
    assert bool((row_cos[1:] < row_cos[:-1]).all()) and bool((column_cos[1:] < column_cos[:-1]).all())
    # the row channels do not change along a row, the column channels not down a column
    assert torch.allclose(grid[:, :, : 2 * count], grid[:, :1, : 2 * count].expand(5, 6, -1))
    assert torch.allclose(grid[:, :, 2 * count :], grid[:1, :, 2 * count :].expand(5, 6, -1))


@pytest.mark.parametrize("width", [16, 128, 3584])
def test_a_coarse_cell_is_most_like_the_fine_cells_under_it(width: int) -> None:
    coarse, fine = place_table(4, 4, width), place_table(8, 8, width)
    nearest = (coarse @ fine.T).argmax(-1)
    for index, best in enumerate(nearest.tolist()):
        assert (best // 8 // 2, best % 8 // 2) == divmod(index, 4)


def test_place_table_needs_a_width_divisible_by_four() -> None:
    with pytest.raises(ValueError, match="divisible by 4, got 130"):
        place_table(2, 2, 130)


def test_add_places_adds_a_share_of_each_tokens_rms_and_passes_gradients_through_unchanged() -> None:
    tokens = torch.randn(2, 4, 8) * torch.tensor([1.0, 10.0])[:, None, None]
    tokens.requires_grad_(True)
    table = place_table(2, 2, 8)
    out = add_places(tokens, table, 0.5)
    added = (out - tokens).detach()
    rms = tokens.detach().pow(2).mean(-1, keepdim=True).sqrt()
    assert torch.allclose(added, 0.5 * rms * table, atol=1e-6)
    out.sum().backward()
    assert torch.equal(tokens.grad, torch.ones_like(tokens))


def test_place_channels_replace_the_last_channels_at_a_share_of_the_others_rms() -> None:
    tokens = torch.randn(2, 4, 12) * torch.tensor([1.0, 10.0])[:, None, None]
    tokens.requires_grad_(True)
    table = place_table(2, 2, 4)
    out = add_places(tokens, table, 1.5, channels=4)
    content = tokens.detach()[..., :8]
    assert out.shape == tokens.shape and torch.equal(out[..., :8].detach(), content)
    rms = content.pow(2).mean(-1, keepdim=True).sqrt()
    assert torch.allclose(out[..., 8:].detach(), 1.5 * rms * table, atol=1e-6)
    out.sum().backward()
    assert torch.equal(tokens.grad[..., :8], torch.ones_like(content))
    assert torch.equal(tokens.grad[..., 8:], torch.zeros_like(tokens.grad[..., 8:]))


@pytest.mark.parametrize(("width", "channels"), [(8, 4), (4, 8), (12, 12)])
def test_place_channels_need_a_table_of_their_width_narrower_than_the_tokens(width: int, channels: int) -> None:
    with pytest.raises(ValueError, match=f"a {width}-wide table for {channels} place channels of 12-wide"):
        add_places(torch.randn(4, 12), place_table(2, 2, width), 1.0, channels=channels)


def test_understanding_tokens_of_a_flat_image_are_told_apart_only_with_places() -> None:
    plain, placed = _flat_image_tokens({}), _flat_image_tokens({"understanding_place_scale": 0.5})
    assert plain.shape[0] == 4 and torch.allclose(plain, plain[:1].expand_as(plain), atol=1e-5)
    assert float(torch.cdist(placed, placed).fill_diagonal_(1e3).min()) > 1e-3
    rms = plain.pow(2).mean(-1, keepdim=True).sqrt()
    assert torch.allclose(placed - plain, 0.5 * rms * place_table(2, 2, plain.shape[-1]), atol=1e-5)


def test_understanding_place_channels_keep_the_content_channels_as_they_were() -> None:
    plain = _flat_image_tokens({})
    placed = _flat_image_tokens({"understanding_place_scale": 1.0, "place_channels": 16})
    content = plain[:, :-16]
    assert torch.equal(placed[:, :-16], content)
    rms = content.pow(2).mean(-1, keepdim=True).sqrt()
    assert torch.allclose(placed[:, -16:], rms * place_table(2, 2, 16), atol=1e-5)
    assert float(torch.cdist(placed, placed).fill_diagonal_(1e3).min()) > 1e-3


def test_understanding_places_follow_the_images_and_frames_in_order() -> None:
    model = tiny_model(understanding_place_scale=0.5)
    width = model.config.llm_hidden_size
    grids = torch.tensor([[1, 4, 4], [2, 2, 6]])  # patches: 2 x 2 merged tokens, then two frames of 1 x 3
    places = model.understanding_places(grids)
    expected = torch.cat((place_table(2, 2, width), place_table(1, 3, width), place_table(1, 3, width)))
    assert torch.equal(places, expected)


def test_generation_tokens_get_their_scales_places_and_the_padding_none() -> None:
    model = tiny_model(generation_place_scale=0.5)
    length = sum(h * w for h, w in TINY_SCHEDULE)
    tokens = torch.randn(2, length, model.config.decoder.width)
    with torch.no_grad():
        placed = model._placeholder_embeds(tokens, length + 3, TINY_SCHEDULE)
        projected = model.bridge.in_projector(tokens)
        padding = model.bridge.in_projector(tokens.new_zeros(1, 1, tokens.shape[-1]))
    table = torch.cat([place_table(h, w, model.config.llm_hidden_size) for h, w in TINY_SCHEDULE])
    rms = projected.pow(2).mean(-1, keepdim=True).sqrt()
    assert torch.allclose(placed[:, :length], projected + 0.5 * rms * table, atol=1e-5)
    assert torch.allclose(placed[:, length:], padding.expand(2, 3, -1), atol=1e-6)
    with pytest.raises(ValueError, match="generation tokens but the scales"):
        model.generation_inputs(tokens, TINY_SCHEDULE[:-1])


def test_generation_place_channels_fill_the_last_channels_of_the_scales_tokens() -> None:
    model = tiny_model(generation_place_scale=0.5, place_channels=8)
    length = sum(h * w for h, w in TINY_SCHEDULE)
    tokens = torch.randn(2, length, model.config.decoder.width)
    with torch.no_grad():
        placed = model.generation_inputs(tokens, TINY_SCHEDULE)
        projected = model.bridge.in_projector(tokens)
    content = projected[..., :-8]
    assert torch.equal(placed[..., :-8], content)
    rms = content.pow(2).mean(-1, keepdim=True).sqrt()
    table = torch.cat([place_table(h, w, 8) for h, w in TINY_SCHEDULE])
    assert torch.allclose(placed[..., -8:], 0.5 * rms * table, atol=1e-5)


def test_places_change_what_the_decoder_sees() -> None:
    messages = [{"role": "user", "content": "a red circle"}, {"role": "assistant", "content": "<image_gen>"}]
    sample = {"messages": messages, "targets": [tiny_image(3)]}
    logits = {}
    for scale in (0.0, 0.5):
        model = tiny_model(condition_drop=0.0, generation_place_scale=scale)
        with torch.no_grad():
            logits[scale] = model.training_forward(make_batch([sample])).bit_logits
    assert not torch.allclose(logits[0.0], logits[0.5], atol=1e-4)


@pytest.mark.parametrize("name", ["understanding_place_scale", "generation_place_scale"])
@pytest.mark.parametrize(("overrides", "message"), [
    ({"scale": -0.1}, "{name} must be a number >= 0, got -0.1"),
    ({"scale": True}, "{name} must be a number >= 0, got True"),
    ({"scale": 0.5, "reference_compat": True}, "{name} changes the LLM's image inputs"),
])
def test_config_refuses_bad_place_scales(name: str, overrides: dict, message: str) -> None:
    overrides = {name if key == "scale" else key: value for key, value in overrides.items()}
    with pytest.raises(ValueError, match=message.format(name=name)):
        tiny_config(**overrides)


@pytest.mark.parametrize(("overrides", "message"), [
    ({"place_channels": 6}, "place_channels must be an integer >= 0 divisible by 4 .*, got 6"),
    ({"place_channels": -4}, "place_channels must be an integer >= 0 divisible by 4 .*, got -4"),
    ({"place_channels": True}, "place_channels must be an integer >= 0 divisible by 4 .*, got True"),
    ({"place_channels": 64}, r"place_channels \(64\) must leave content channels: .*hidden_size \(64\)"),
])
def test_config_refuses_bad_place_channels(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tiny_config(understanding_place_scale=0.5, **overrides)


def test_config_refuses_place_channels_without_places() -> None:
    with pytest.raises(ValueError, match="place_channels=16 does nothing without understanding_place_scale"):
        tiny_config(place_channels=16)


def test_places_are_off_by_default() -> None:
    assert VARGPTConfig.understanding_place_scale == 0.0 and VARGPTConfig.generation_place_scale == 0.0
    assert VARGPTConfig.place_channels == 0


def _flat_image_tokens(overrides: dict) -> torch.Tensor:
    """The LLM inputs of a flat 56-px image's 4 understanding tokens, in a tiny model with ``overrides``."""
    flat = make_batch([{"messages": [{"role": "user", "content": "<image>\nwhat is it?"},
                                     {"role": "assistant", "content": "a square"}],
                        "inputs": [_flat_pil(56)]}])
    mask = flat["input_ids"] == tiny_config().image_token_id
    model = tiny_model(**overrides)
    with torch.no_grad():
        return model.embed(flat["input_ids"], flat["pixel_values"], flat["image_grid_thw"])[mask]


def _flat_pil(size: int):
    from PIL import Image

    return Image.new("RGB", (size, size), (40, 90, 200))
