"""``SampleGrid``: every N training steps, generate one image per configured prompt and save them as one grid.

The grid goes to ``<folder>/step_<step>.png`` and to the logger (``log_image`` for loggers that have it, such as
Weights & Biases; ``add_image`` on the experiment for TensorBoard). Sampling uses fixed seeds, so grids of
successive steps show how the same prompts evolve. Rank 0 only; the model is put back in training mode afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only
from PIL import Image


def image_grid(images: Sequence[Image.Image], columns: int | None = None) -> Image.Image:
    """Paste equally sized images row by row into one image (``columns`` defaults to ceil(sqrt(n)))."""
    if not images:
        raise ValueError("image_grid needs at least one image")
    width, height = images[0].size
    if any(image.size != (width, height) for image in images):
        raise ValueError(f"image_grid needs images of one size, got {sorted({image.size for image in images})}")
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    grid = Image.new("RGB", (columns * width, rows * height))
    for index, image in enumerate(images):
        grid.paste(image.convert("RGB"), ((index % columns) * width, (index // columns) * height))
    return grid


class SampleGrid(lightning.Callback):
    """Generates ``prompts`` with ``pl_module.model.generate_images`` every ``every_n_steps`` optimizer steps."""

    def __init__(
        self,
        prompts: Sequence[str],
        every_n_steps: int,
        folder: str | Path,
        seed: int = 0,
        generation_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if every_n_steps < 1:
            raise ValueError(f"SampleGrid every_n_steps must be >= 1, got {every_n_steps}")
        if not prompts:
            raise ValueError("SampleGrid needs at least one prompt")
        self.prompts = list(prompts)
        self.every_n_steps = every_n_steps
        self.folder = Path(folder)
        self.seed = seed
        self.generation_kwargs = dict(generation_kwargs or {})
        self._last_step = -1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001 (hook)
        step = trainer.global_step
        if step == self._last_step or step % self.every_n_steps:
            return
        self._last_step = step
        self.write_grid(trainer, pl_module, step)

    @rank_zero_only
    def write_grid(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule, step: int) -> Path:
        """Generate, save ``step_<step>.png`` and hand it to the logger; returns the file written."""
        model = pl_module.model
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                images = model.generate_images(self.prompts, seed=self.seed, **self.generation_kwargs)
        finally:
            model.train(was_training)
        grid = image_grid(images)
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"step_{step:07d}.png"
        temporary = path.with_suffix(".png.tmp")
        grid.save(temporary, format="PNG")
        temporary.replace(path)
        self._log(trainer, grid, step)
        return path

    def _log(self, trainer: lightning.Trainer, grid: Image.Image, step: int) -> None:
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(key="samples", images=[grid], step=step, caption=[" | ".join(self.prompts)])
            elif hasattr(getattr(logger, "experiment", None), "add_image"):
                logger.experiment.add_image("samples", np.asarray(grid), step, dataformats="HWC")
