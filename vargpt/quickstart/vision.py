"""The embedded default's vision tower pretraining: ``python -m vargpt.quickstart.vision MODEL_YAML OUT``.

Real runs start from Qwen2-VL, whose ViT and 2x2 merger come pretrained on billions of images; the reference keeps
them frozen through its understanding SFT. The embedded default has no such weights, and a ViT trained only through
the chat model's answers learns shapes slowly: after understanding SFT a linear probe on its tokens told an object's
shape 57% of the time, and shape answers stayed near chance. This step stands in for the pretraining: on shapes-world
scenes of a stream of their own, the ViT and its merger learn to say, for each of the LLM's image tokens (one merged
2x2 window of patches), the colour and the shape of the object that covers most of it, or background, through a
linear head that is then dropped. Alignment starts from the result (``init_from.vision``) and understanding SFT
keeps the ViT frozen, as the reference does.

The output is a vision tower folder (``vargpt.checkpoints.vision``): the weights, ``config.json`` (the vision config
and the settings, which say whether a rerun can keep it) and ``metrics.json`` (the head's per-token accuracy on
held-out scenes, and the loss curve); it is written aside and renamed into place.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from datamodules.shapes.render import render_scene, shape_coverage
from datamodules.shapes.vocabulary import COLOURS, SHAPES
from datamodules.shapes.world import Scene, random_scene, sample_rng
from vargpt.checkpoints.vision import CONFIG_FILE, save_vision_tower
from vargpt.config import ConfigError

STREAM = "vision_pretraining"  # the scenes' own random stream: not the training samples' or the benchmark's
COLOUR_NAMES, BACKGROUND_COLOUR, BACKGROUND_SHAPE = tuple(COLOURS), len(COLOURS), len(SHAPES)


@dataclass
class VisionPretrainingSettings:
    """``scenes`` training scenes of 1 to 4 objects (and ``held_out`` more from the eval split), ``steps`` AdamW steps
    of ``batch_size`` scenes at ``lr`` (linear warm-up over ``warmup_steps``, then cosine to zero); a token's label is
    the object covering the largest share of it when that share is at least ``min_coverage``. With a
    ``position_weight`` above 0 the head also tells each token's row and column in the token grid (their
    cross-entropy times the weight joins the loss), so that the tokens carry their place in their content: the ViT's
    2-D RoPE and the LLM's M-RoPE give it only as rotations, which move attention but are not read into an answer."""

    scenes: int = 4000
    held_out: int = 500
    steps: int = 2000
    batch_size: int = 32
    lr: float = 2.0e-3
    warmup_steps: int = 50
    min_coverage: float = 0.05
    eval_every: int = 250
    position_weight: float = 0.0

    def __post_init__(self) -> None:
        for name in ("scenes", "held_out", "steps", "batch_size", "warmup_steps", "eval_every"):
            value, least = getattr(self, name), 0 if name == "warmup_steps" else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ConfigError(f"vision.{name} must be an integer >= {least}, got {value!r}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not self.lr > 0:
            raise ConfigError(f"vision.lr must be > 0, got {self.lr!r}")
        if isinstance(self.min_coverage, bool) or not isinstance(self.min_coverage, (int, float)) \
                or not 0 < self.min_coverage <= 1:
            raise ConfigError(f"vision.min_coverage must be in (0, 1], got {self.min_coverage!r}")
        if isinstance(self.position_weight, bool) or not isinstance(self.position_weight, (int, float)) \
                or not self.position_weight >= 0:
            raise ConfigError(f"vision.position_weight must be >= 0, got {self.position_weight!r}")


def token_labels(
    scene: Scene, size: int, rows: int, columns: int, min_coverage: float = VisionPretrainingSettings.min_coverage
) -> np.ndarray:
    """(rows * columns, 2) int64 labels of the LLM's image tokens, row-major as the merger emits them: the colour index
    (``BACKGROUND_COLOUR`` for none) and shape index (``BACKGROUND_SHAPE``) of the object covering the largest share
    of each token's cell of the ``size`` px render, if at least ``min_coverage``."""
    if size % rows or size % columns:
        raise ValueError(f"a {size} px image does not split into {rows} x {columns} token cells")
    best = np.zeros((rows, columns))
    labels = np.empty((rows, columns, 2), dtype=np.int64)
    labels[..., 0], labels[..., 1] = BACKGROUND_COLOUR, BACKGROUND_SHAPE
    for obj in scene.objects:
        coverage = shape_coverage(obj.shape, obj.x * size, obj.y * size, obj.size * size, size, size)
        cells = coverage.reshape(rows, size // rows, columns, size // columns).mean(axis=(1, 3))
        take = (cells > best) & (cells >= min_coverage)
        best = np.where(take, cells, best)
        labels[take] = (COLOUR_NAMES.index(obj.colour), SHAPES.index(obj.shape))
    return labels.reshape(rows * columns, 2)


@dataclass
class SceneSet:
    pixel_values: torch.Tensor  # (scenes, patches per image, patch dim)
    grid_thw: torch.Tensor  # (1, 3): every image has the same grid
    labels: torch.Tensor  # (scenes, tokens per image, 2)
    token_grid: tuple[int, int]  # (rows, columns) of the LLM's image tokens


def make_scenes(count: int, seed: int, split: str, size: int, min_pixels: int, max_pixels: int,
                min_coverage: float, chunk: int = 250) -> SceneSet:
    """``count`` scenes of the stream, rendered at ``size`` px and preprocessed as the data pipeline does (in chunks:
    the image processor is faster on many images at once)."""
    from datamodules.transforms import UnderstandingImageTransform

    transform = UnderstandingImageTransform(min_pixels, max_pixels)
    scenes = [random_scene(sample_rng(seed, split, STREAM, index)) for index in range(count)]  # 1 to 4 objects
    pixels, first = [], None
    for start in range(0, count, chunk):
        values, grid = transform([render_scene(scene, size) for scene in scenes[start : start + chunk]])
        first = grid[:1] if first is None else first
        if not (grid == first).all():
            raise ValueError(f"the {size} px scenes do not all give one patch grid: {grid.unique(dim=0).tolist()}")
        pixels.append(values.reshape(grid.shape[0], -1, values.shape[-1]))
    _, height, width = (int(v) for v in first[0])
    merge = transform.merge_size
    labels = [token_labels(scene, size, height // merge, width // merge, min_coverage) for scene in scenes]
    return SceneSet(torch.cat(pixels), first, torch.from_numpy(np.stack(labels)), (height // merge, width // merge))


def build_vision_tower(qwen2_vl: dict[str, Any]) -> nn.Module:
    """A fresh Qwen2-VL vision tower (ViT + merger) of the model config's ``qwen2_vl`` mapping."""
    from transformers import Qwen2VLConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

    from vargpt.patch_embed import use_linear_patch_embed

    visual = Qwen2VisionTransformerPretrainedModel._from_config(Qwen2VLConfig(**copy.deepcopy(qwen2_vl)).vision_config)
    use_linear_patch_embed(visual)  # as the model's tower (VARGPT): the patch Conv3d computed as a matrix product
    return visual


def token_features(visual: nn.Module, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
    """(images, tokens, hidden) merged features of a batch of same-grid images."""
    images = pixel_values.shape[0]
    merged = visual(pixel_values.reshape(-1, pixel_values.shape[-1]), grid_thw=grid_thw.repeat(images, 1)).pooler_output
    return merged.reshape(images, -1, merged.shape[-1])


class TokenHead(nn.Module):
    """Per-token colour (+ background) and shape (+ background) logits; with a ``token_grid`` (rows, columns) also
    the token's row and column logits."""

    def __init__(self, hidden: int, token_grid: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.token_grid = token_grid
        self.sizes = [BACKGROUND_COLOUR + 1, BACKGROUND_SHAPE + 1, *(token_grid or ())]
        self.linear = nn.Linear(hidden, sum(self.sizes))

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(colour, shape) logits, then (row, column) with a token grid."""
        return self.linear(features).split(self.sizes, dim=-1)


def place_labels(token_grid: tuple[int, int], images: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, tokens) row and column indices of the row-major token grid."""
    rows, columns = token_grid
    index = torch.arange(rows * columns).expand(images, -1)
    return index // columns, index % columns


def head_loss(head: TokenHead, features: torch.Tensor, labels: torch.Tensor, position_weight: float = 1.0
              ) -> torch.Tensor:
    """Colour plus shape cross-entropy; with a head that tells places, plus ``position_weight`` times row plus
    column cross-entropy."""
    logits = head(features)
    targets = [labels[..., 0], labels[..., 1]]
    weights = [1.0, 1.0]
    if head.token_grid is not None:
        targets += place_labels(head.token_grid, labels.shape[0])
        weights += [position_weight, position_weight]
    cross_entropy = nn.functional.cross_entropy
    return sum(weight * cross_entropy(out.flatten(0, 1), target.flatten())
               for out, target, weight in zip(logits, targets, weights))


@torch.no_grad()
def held_out_accuracy(visual: nn.Module, head: TokenHead, scenes: SceneSet, batch_size: int = 100) -> dict[str, float]:
    """Per-token accuracy on ``scenes``: colour and shape over every token, and over the tokens an object covers;
    with a head that tells places, ``place``: the share of tokens whose row and column are both right."""
    was_training = visual.training
    visual.eval()
    colour_right, shape_right, place_right = [], [], []
    for start in range(0, scenes.pixel_values.shape[0], batch_size):
        logits = head(token_features(visual, scenes.pixel_values[start : start + batch_size], scenes.grid_thw))
        labels = scenes.labels[start : start + batch_size]
        colour_right.append(logits[0].argmax(-1) == labels[..., 0])
        shape_right.append(logits[1].argmax(-1) == labels[..., 1])
        if head.token_grid is not None:
            rows, columns = place_labels(head.token_grid, labels.shape[0])
            place_right.append((logits[2].argmax(-1) == rows) & (logits[3].argmax(-1) == columns))
    visual.train(was_training)
    colours, shapes = torch.cat(colour_right), torch.cat(shape_right)
    on_object = scenes.labels[..., 1] != BACKGROUND_SHAPE
    accuracy = {
        "colour": colours.float().mean().item(),
        "shape": shapes.float().mean().item(),
        "colour_on_objects": colours[on_object].float().mean().item(),
        "shape_on_objects": shapes[on_object].float().mean().item(),
    }
    if place_right:
        accuracy["place"] = torch.cat(place_right).float().mean().item()
    return accuracy


def pretrain_vision(qwen2_vl: dict[str, Any], settings: VisionPretrainingSettings, seed: int, size: int,
                    min_pixels: int, max_pixels: int, log: Any = None) -> tuple[nn.Module, dict[str, Any]]:
    """Train a fresh vision tower on the per-token labels; returns it and its metrics (held-out accuracy, curve)."""
    start = time.perf_counter()
    train = make_scenes(settings.scenes, seed, "train", size, min_pixels, max_pixels, settings.min_coverage)
    held_out = make_scenes(settings.held_out, seed, "eval", size, min_pixels, max_pixels, settings.min_coverage)
    torch.manual_seed(seed)
    visual = build_vision_tower(qwen2_vl).train()
    places = train.token_grid if settings.position_weight else None
    head = TokenHead(visual.config.hidden_size, places)  # the merger's output width, the LLM's
    optimizer = torch.optim.AdamW([*visual.parameters(), *head.parameters()], lr=settings.lr, weight_decay=0.0)

    def factor(step: int) -> float:  # warm-up times a cosine over all the steps (the stages' warmup_cosine_factor
        # starts its cosine after the warm-up and has a floor: another curve, and another tower)
        warm = min(1.0, (step + 1) / settings.warmup_steps) if settings.warmup_steps else 1.0
        return warm * 0.5 * (1 + math.cos(math.pi * step / settings.steps))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    generator = torch.Generator().manual_seed(seed)
    curve: list[dict[str, float]] = []
    for step in range(1, settings.steps + 1):
        batch = torch.randint(0, settings.scenes, (settings.batch_size,), generator=generator)
        features = token_features(visual, train.pixel_values[batch], train.grid_thw)
        loss = head_loss(head, features, train.labels[batch], settings.position_weight)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"vision pretraining: the loss is {loss.item()} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step % settings.eval_every == 0 or step == settings.steps:
            point = {"step": step, "loss": loss.item(), **held_out_accuracy(visual, head, held_out)}
            curve.append(point)
            if log is not None:
                log("vision: step %d, loss %.3f, held-out shape %.3f (on objects %.3f), colour %.3f%s", step,
                    point["loss"], point["shape"], point["shape_on_objects"], point["colour"],
                    f", place {point['place']:.3f}" if "place" in point else "")
    metrics = {"held_out": {k: v for k, v in curve[-1].items() if k not in ("step", "loss")}, "curve": curve,
               "seconds": time.perf_counter() - start}
    return visual.eval(), metrics


def step_config(qwen2_vl: dict[str, Any], settings: VisionPretrainingSettings, seed: int, size: int, min_pixels: int,
                max_pixels: int) -> dict[str, Any]:
    """What the folder was trained with: a rerun keeps it only when this is unchanged. A zero ``position_weight`` is
    left out, so a tower trained before the setting existed (the same training) is kept."""
    trained = asdict(settings)
    if not settings.position_weight:
        del trained["position_weight"]
    return {"vision_config": copy.deepcopy(qwen2_vl.get("vision_config", {})), "settings": trained,
            "seed": seed, "size": size, "understanding_pixels": [min_pixels, max_pixels]}


def vision_done(folder: str | os.PathLike[str], config: dict[str, Any]) -> bool:
    """The folder exists, complete, for the same vision config and settings."""
    path = Path(folder) / CONFIG_FILE
    return path.is_file() and json.loads(path.read_text()) == json.loads(json.dumps(config))


def main(argv: Sequence[str] | None = None) -> None:
    from vargpt.config_io import load_model_config

    parser = argparse.ArgumentParser(prog="python -m vargpt.quickstart.vision", description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="model YAML whose qwen2_vl.vision_config the tower takes")
    parser.add_argument("out_dir", type=Path, help="folder to write the tower into (replaced)")
    parser.add_argument("--seed", type=int, default=0, help="scene stream and initialisation seed (default 0)")
    parser.add_argument("--size", type=int, default=32, help="px of the scenes (default 32)")
    for field in fields(VisionPretrainingSettings):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(field.default), default=field.default)
    arguments = vars(parser.parse_args(argv))
    model, out_dir, seed, size = (arguments.pop(name) for name in ("model", "out_dir", "seed", "size"))
    try:
        settings = VisionPretrainingSettings(**arguments)
        config = load_model_config(model)
    except (ConfigError, FileNotFoundError) as error:
        parser.error(str(error))
    pixels = (config.understanding_min_pixels, config.understanding_max_pixels)
    visual, metrics = pretrain_vision(config.qwen2_vl, settings, seed, size, *pixels, log=_print)
    save_vision_tower(visual, out_dir, step_config(config.qwen2_vl, settings, seed, size, *pixels), metrics)
    print(json.dumps(metrics["held_out"]))


def _print(message: str, *arguments: Any) -> None:
    print(message % arguments, flush=True)


if __name__ == "__main__":
    main()
