"""The embedded default's vision tower pretraining: per-token labels, their order, training, the saved folder."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from datamodules.shapes.render import render_scene
from datamodules.shapes.vocabulary import COLOURS, SHAPES
from datamodules.shapes.world import Scene, ShapeObject
from datamodules.transforms import UnderstandingImageTransform
from helpers_tiny_model import tiny_config, tiny_model
from vargpt.checkpoints.core import CheckpointError
from vargpt.checkpoints.vision import load_vision_tower, save_vision_tower
from vargpt.config import ConfigError
from vargpt.quickstart.config import vision_dir
from vargpt.quickstart.vision import (
    BACKGROUND_COLOUR,
    BACKGROUND_SHAPE,
    TokenHead,
    VisionPretrainingSettings,
    build_vision_tower,
    head_loss,
    make_scenes,
    place_labels,
    pretrain_vision,
    step_config,
    token_labels,
    vision_done,
)

PIXELS = 112 * 112  # the quickstart's understanding images: 8 x 8 patches of 14 px, 4 x 4 LLM tokens


def label(colour: str, shape: str) -> list[int]:
    return [list(COLOURS).index(colour), SHAPES.index(shape)]


def test_each_token_is_labelled_with_the_object_covering_most_of_it() -> None:
    # a red square filling the top-left 2 x 2 cells exactly; a blue circle whose box is the bottom-right cell
    square = ShapeObject("square", "red", 0.25, 0.25, 0.5)
    circle = ShapeObject("circle", "blue", 0.875, 0.875, 0.25)
    labels = token_labels(Scene((square, circle)), 32, 4, 4).reshape(4, 4, 2)
    background = [BACKGROUND_COLOUR, BACKGROUND_SHAPE]
    expected = np.array([[background] * 4 for _ in range(4)])
    expected[:2, :2] = label("red", "square")
    expected[3, 3] = label("blue", "circle")
    assert (labels == expected).all()
    # a sliver below the threshold is background
    sliver = ShapeObject("square", "green", 0.25 + 0.5 / 32, 0.25, 0.5)  # 1/16 of a px over the middle line
    assert (token_labels(Scene((sliver,)), 32, 4, 4, min_coverage=0.2).reshape(4, 4, 2)[0, 2] == background).all()


def test_labels_follow_the_order_in_which_the_processor_merges_patches() -> None:
    # a white square alone in the top-right cell: token 3 (row 0, column 3) is the only one whose patches are white
    scene = Scene((ShapeObject("square", "white", 0.875, 0.125, 0.25),))
    pixel_values, grid = UnderstandingImageTransform(PIXELS, PIXELS)([render_scene(scene, 32)])
    assert grid.tolist() == [[1, 8, 8]]
    per_token = pixel_values.reshape(16, 4, -1).mean(dim=(1, 2))  # 4 patches per token, in merge order
    labels = token_labels(scene, 32, 4, 4)
    assert per_token.argmax().item() == 3 and np.flatnonzero(labels[:, 1] != BACKGROUND_SHAPE).tolist() == [3]


def test_scene_sets_are_the_streams_own_and_repeatable() -> None:
    first = make_scenes(3, 0, "train", 32, PIXELS, PIXELS, 0.05)
    again = make_scenes(3, 0, "train", 32, PIXELS, PIXELS, 0.05, chunk=2)  # processed two images at a time
    held_out = make_scenes(3, 0, "eval", 32, PIXELS, PIXELS, 0.05)
    assert first.pixel_values.shape == (3, 64, 3 * 2 * 14 * 14) and first.labels.shape == (3, 16, 2)
    assert torch.equal(first.pixel_values, again.pixel_values) and torch.equal(first.labels, again.labels)
    assert not torch.equal(first.pixel_values, held_out.pixel_values)


@pytest.mark.parametrize(
    "field, value",
    [("steps", 0), ("batch_size", 1.5), ("scenes", True), ("warmup_steps", -1), ("lr", 0.0), ("min_coverage", 1.5),
     ("position_weight", -0.1), ("position_weight", True)],
)
def test_bad_settings_name_the_field(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=f"vision.{field}"):
        VisionPretrainingSettings(**{field: value})


@pytest.fixture
def one_intra_op_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_intra_op_thread")
def test_pretraining_learns_the_tokens_and_the_folder_loads_into_a_fresh_model(tmp_path: Path) -> None:
    config = tiny_config()
    settings = VisionPretrainingSettings(scenes=64, held_out=32, steps=100, batch_size=16, lr=3e-3, warmup_steps=5,
                                         eval_every=20)
    visual, metrics = pretrain_vision(config.qwen2_vl, settings, 0, 32, PIXELS, PIXELS)
    curve = metrics["curve"]
    assert [point["step"] for point in curve] == [20, 40, 60, 80, 100]
    # colours are learnt first: on the held-out scenes' object tokens (chance 1 in 9) 0.37 after 20 steps, 0.85 after
    # 100 (shapes take about 1000 steps of 32 at the quickstart's size)
    assert curve[-1]["colour_on_objects"] > max(0.75, curve[0]["colour_on_objects"] + 0.3)
    assert curve[-1]["loss"] < curve[0]["loss"] and metrics["held_out"] == {k: curve[-1][k] for k in metrics["held_out"]}
    step = step_config(config.qwen2_vl, settings, 0, 32, PIXELS, PIXELS)
    folder = save_vision_tower(visual, tmp_path / "vision", step, metrics)
    assert vision_done(folder, step)
    assert not vision_done(folder, step_config(config.qwen2_vl, settings, 1, 32, PIXELS, PIXELS))
    assert "position_weight" not in step["settings"]  # off: a folder written before the setting existed still matches
    placed = VisionPretrainingSettings(**{**asdict(settings), "position_weight": 0.1})
    assert not vision_done(folder, step_config(config.qwen2_vl, placed, 0, 32, PIXELS, PIXELS))
    model = tiny_model(seed=5)
    load_vision_tower(model, folder)
    for name, tensor in visual.state_dict().items():
        assert torch.equal(model.backbone.visual.state_dict()[name], tensor), name


def test_place_labels_are_each_tokens_row_and_column_in_merge_order() -> None:
    rows, columns = place_labels((2, 3), images=2)
    assert rows.tolist() == [[0, 0, 0, 1, 1, 1]] * 2 and columns.tolist() == [[0, 1, 2, 0, 1, 2]] * 2


def test_the_position_weight_scales_the_place_terms_only() -> None:
    torch.manual_seed(0)
    features = torch.randn(3, 16, 8)
    colours, shapes = torch.randint(0, BACKGROUND_COLOUR + 1, (3, 16)), torch.randint(0, BACKGROUND_SHAPE + 1, (3, 16))
    labels = torch.stack((colours, shapes), dim=-1)
    plain, placed = TokenHead(8), TokenHead(8, (4, 4))
    with torch.no_grad():
        placed.linear.weight[: plain.linear.out_features] = plain.linear.weight
        placed.linear.bias[: plain.linear.out_features] = plain.linear.bias
    without = head_loss(plain, features, labels)
    assert torch.allclose(head_loss(placed, features, labels, position_weight=0.0), without)
    one, half = head_loss(placed, features, labels, 1.0), head_loss(placed, features, labels, 0.5)
    assert torch.allclose(one - without, 2 * (half - without)) and one > without


@pytest.mark.usefixtures("one_intra_op_thread")
def test_with_a_position_weight_the_curve_reports_the_tokens_places() -> None:
    # the tower has no absolute position embedding (2-D RoPE only): a token's place must come from its content, which
    # it learns from where the image's borders are; the quickstart's tower tells 97% of the held-out tokens' places
    # after its 2000 steps, this one-layer tower only starts to in 60 (0.11 -> 0.14 of 16 places)
    settings = VisionPretrainingSettings(scenes=64, held_out=32, steps=60, batch_size=16, lr=3e-3, warmup_steps=5,
                                         eval_every=20, position_weight=1.0)
    _, metrics = pretrain_vision(tiny_config().qwen2_vl, settings, 0, 32, PIXELS, PIXELS)
    places = [point["place"] for point in metrics["curve"]]
    assert places[-1] > places[0] > 1 / 16 and metrics["held_out"]["place"] == places[-1]
    plain = VisionPretrainingSettings(scenes=16, held_out=8, steps=1, batch_size=4, eval_every=1)
    assert "place" not in pretrain_vision(tiny_config().qwen2_vl, plain, 0, 32, PIXELS, PIXELS)[1]["held_out"]


def test_a_tower_of_other_sizes_or_no_folder_fails_naming_it(tmp_path: Path) -> None:
    config = tiny_config()
    wider = {**config.qwen2_vl, "vision_config": {**config.qwen2_vl["vision_config"], "embed_dim": 48}}
    folder = save_vision_tower(build_vision_tower(wider), tmp_path / "wide", {}, {})
    with pytest.raises(CheckpointError, match=r"(?s)init_from.vision .*patch_embed.proj.weight: checkpoint \(48"):
        load_vision_tower(tiny_model(), folder)
    with pytest.raises(FileNotFoundError, match="init_from.vision: no vision tower folder"):
        load_vision_tower(tiny_model(), tmp_path / "missing")


def test_the_pipeline_pretrains_the_tower_alignment_starts_from(tmp_path: Path) -> None:
    from vargpt.quickstart import load_quickstart_config
    from vargpt.quickstart.pipeline import vision_stage

    config = load_quickstart_config(Path("configs/quickstart/pipeline.yaml"), [f"root={tmp_path}"])
    run = vision_stage(config)
    assert run is not None and run.stage.stage == "alignment"
    assert Path(run.init_from.vision).resolve() == vision_dir(config).resolve()
    elsewhere = load_quickstart_config(Path("configs/quickstart/pipeline.yaml"), [
        f"root={tmp_path}", f"overrides={{alignment: [init_from.vision={tmp_path / 'mine'}]}}"])
    assert vision_stage(elsewhere) is None  # a tower of the user's own: nothing to pretrain
    with pytest.raises(ConfigError, match="vision.steps"):
        load_quickstart_config(Path("configs/quickstart/pipeline.yaml"), [f"root={tmp_path}", "vision.steps=0"])
