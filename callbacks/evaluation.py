"""Evaluation during training: ``ShapesEvaluation`` (GenEval-style shapes score) and ``FIDEvaluation`` (FID
against a reference folder), every N optimizer steps.

Both evaluate ``pl_module.model`` (a ``VARGPT``) on the device it trains on (CUDA when available), under
``torch.no_grad()`` in eval mode, and put it back in training mode afterwards. Scores go to every logger
(``log_metrics`` at the global step) and to ``last_metrics``; the generated images are saved as a grid
``<folder>/step_<step>.png`` and handed to loggers that take images. Prompts and seeds are fixed, so successive
evaluations are comparable. Rank 0 only, like ``SampleGrid``.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only
from PIL import Image

from callbacks.samples import image_grid
from vargpt.eval.model_adapters import GenerationSettings, VARGPTImageGenerator


@contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``model`` in eval mode without gradients for the block; its previous mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def save_grid(images: Sequence[Image.Image], folder: Path, step: int) -> tuple[Path, Image.Image]:
    """The images as one grid at ``folder/step_<step>.png`` (written atomically)."""
    grid = image_grid(images)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step_{step:07d}.png"
    temporary = path.with_name(path.name + ".part")
    grid.save(temporary, format="PNG")
    temporary.replace(path)
    return path, grid


def log_to_loggers(trainer: lightning.Trainer, metrics: dict[str, float], grid: Image.Image, key: str, step: int):
    """Scalars to every logger; the grid to those that take images (W&B ``log_image``, TensorBoard)."""
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)
        if hasattr(logger, "log_image"):
            logger.log_image(key=key, images=[grid], step=step)
        elif hasattr(getattr(logger, "experiment", None), "add_image"):
            logger.experiment.add_image(key, np.asarray(grid), step, dataformats="HWC")


class _PeriodicEvaluation(lightning.Callback, ABC):
    """Calls ``evaluate(model, step)`` at every optimizer step that is a multiple of N (a subclass says what)."""

    grid_key = "evaluation"

    def __init__(self, every_n_steps: int, folder: str | os.PathLike) -> None:
        if every_n_steps < 1:
            raise ValueError(f"{type(self).__name__} every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.folder = Path(folder)
        self.last_metrics: dict[str, float] = {}
        self._last_step = -1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001 (hook)
        step = trainer.global_step
        if step == self._last_step or step == 0 or step % self.every_n_steps:
            return
        self._last_step = step
        self.run(trainer, pl_module, step)

    @rank_zero_only
    def run(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule, step: int) -> dict[str, float]:
        """Evaluate now, log and return the metrics."""
        with evaluating(pl_module.model) as model:
            metrics, images = self.evaluate(model, step)
        _, grid = save_grid(images, self.folder, step)
        log_to_loggers(trainer, metrics, grid, self.grid_key, step)
        self.last_metrics = metrics
        return metrics

    @abstractmethod
    def evaluate(self, model: Any, step: int) -> tuple[dict[str, float], list[Image.Image]]:
        """The metrics and the generated images of one evaluation of ``model`` (already in eval mode)."""


class ShapesEvaluation(_PeriodicEvaluation):
    """The shapes benchmark's generation part (``per_task`` fixed held-out prompts of each GenEval task type,
    scored exactly) every ``every_n_steps``; logs ``shapes/overall`` and ``shapes/<task>``. Per-image records of
    each evaluation go to ``<folder>/step_<step>/shapes_generation.jsonl``."""

    grid_key = "shapes_samples"

    def __init__(
        self,
        every_n_steps: int,
        folder: str | os.PathLike,
        per_task: int = 2,
        seed: int = 0,
        size: int | None = None,
        batch_size: int = 12,
        settings: GenerationSettings = GenerationSettings(),
    ) -> None:
        super().__init__(every_n_steps, folder)
        self.per_task = per_task
        self.seed = seed
        self.size = size
        self.batch_size = batch_size
        self.settings = settings

    def evaluate(self, model: Any, step: int) -> tuple[dict[str, float], list[Image.Image]]:
        from vargpt.eval.shapes import run_shapes_benchmark

        out_dir = self.folder / f"step_{step:07d}"
        result = run_shapes_benchmark(
            model,
            out_dir,
            per_task=self.per_task,
            seed=self.seed,
            size=self.size,
            parts=("generation",),
            batch_size=self.batch_size,
            settings=self.settings,
        )
        metrics = {name.replace("generation/", "shapes/"): float(value) for name, value in result["metrics"].items()}
        images = sorted((out_dir / "shapes_images" / "generation").glob("*.png"))
        return metrics, [Image.open(path).convert("RGB") for path in images]


class FIDEvaluation(_PeriodicEvaluation):
    """FID of images generated from fixed ``prompts`` (prompt i with seed ``seed + i``) against the images of
    ``reference`` every ``every_n_steps``; logs ``fid`` (and ``kid_mean`` unless switched off).

    ``inception``: torch-fidelity's local Inception weights file (never downloaded). Both sets are brought to
    ``resolution`` (default: the generated size) with bicubic resizing; the reference features are cached.
    """

    grid_key = "fid_samples"

    def __init__(
        self,
        every_n_steps: int,
        folder: str | os.PathLike,
        prompts: Sequence[str],
        reference: str | os.PathLike,
        inception: str | os.PathLike,
        seed: int = 0,
        resolution: int | None = None,
        batch_size: int = 8,
        settings: GenerationSettings = GenerationSettings(),
        kid: bool = True,
    ) -> None:
        super().__init__(every_n_steps, folder)
        if len(prompts) < 2:
            raise ValueError(f"FIDEvaluation needs at least 2 prompts (FID of one image is undefined), got {prompts}")
        if not Path(reference).is_dir():
            raise FileNotFoundError(f"FIDEvaluation reference folder not found: {reference}")
        if not Path(inception).is_file():
            raise FileNotFoundError(f"FIDEvaluation Inception weights file not found: {inception}")
        self.prompts = list(prompts)
        self.reference = Path(reference)
        self.inception_path = Path(inception)
        self.seed = seed
        self.resolution = resolution
        self.batch_size = batch_size
        self.settings = settings
        self.kid = kid
        self._inception = None

    def evaluate(self, model: Any, step: int) -> tuple[dict[str, float], list[Image.Image]]:
        from vargpt.eval.fidelity import FidelityOptions, InceptionFeatures, compare_folders

        generator = VARGPTImageGenerator(model, self.batch_size, self.settings)
        seeds = [self.seed + index for index in range(len(self.prompts))]
        images = generator.generate_images(self.prompts, seeds)
        fake_dir = self.folder / f"step_{step:07d}"
        fake_dir.mkdir(parents=True, exist_ok=True)
        for index, image in enumerate(images):
            image.save(fake_dir / f"{index:05d}.png")
        device = str(next(model.parameters()).device)
        if self._inception is None or str(self._inception.device) != device:
            self._inception = InceptionFeatures.from_weights(
                self.inception_path, device=device, batch_size=self.batch_size,
                cache_dir=self.folder / "inception_cache", progress=False,
            )
        result = compare_folders(
            self._inception,
            self.reference,
            fake_dir,
            resolution=self.resolution or images[0].width,
            resize_mode="bicubic",
            options=FidelityOptions(fid=True, kid=self.kid, isc=False),
        )
        metrics = {"fid": float(result["fid"])}
        if self.kid:
            metrics["kid_mean"] = float(result["kid_mean"])
        return metrics, images
