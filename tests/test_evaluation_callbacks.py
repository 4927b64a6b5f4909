"""In-training evaluation callbacks inside a short ``lightning.Trainer.fit`` on the tiny model."""

from __future__ import annotations

import csv

import lightning
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from PIL import Image

from callbacks.evaluation import FIDEvaluation, ShapesEvaluation, evaluating
from datamodules.shapes import TASKS
from helpers_tiny_model import TINY_IMAGE_SIZE, make_batch, mixed_samples, tiny_model
from vargpt.eval.testing import save_random_inception


class TinyTraining(lightning.LightningModule):
    """The tiny VARGPT trained with its own training forward on one fixed mixed batch."""

    def __init__(self) -> None:
        super().__init__()
        self.model = tiny_model(seed=6).train()
        self.modes_seen: list[bool] = []

    def training_step(self, batch, batch_idx):  # noqa: ANN001 - Lightning's hook
        self.modes_seen.append(self.model.training)
        return self.model.training_forward(batch).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.model.parameters(), lr=1e-3)

    def train_dataloader(self):
        batch = make_batch(mixed_samples())
        return torch.utils.data.DataLoader([batch], batch_size=None, collate_fn=lambda item: item)


def logged_rows(log_dir):
    with (log_dir / "metrics.csv").open() as handle:
        return list(csv.DictReader(handle))


def fit(tmp_path, callback, steps):
    module = TinyTraining()
    logger = CSVLogger(tmp_path, name="logs", version=0)
    trainer = lightning.Trainer(
        max_steps=steps, accelerator="cpu", logger=logger, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, callbacks=[callback],
    )
    trainer.fit(module)
    return module, logged_rows(tmp_path / "logs" / "version_0")


def test_shapes_evaluation_logs_the_geneval_style_score_and_saves_grids(tmp_path):
    callback = ShapesEvaluation(every_n_steps=2, folder=tmp_path / "shapes", per_task=1, seed=1)
    module, rows = fit(tmp_path, callback, steps=4)
    logged = [row for row in rows if row.get("shapes/overall")]
    assert [int(row["step"]) for row in logged] == [2, 4]
    assert all(0.0 <= float(row["shapes/overall"]) <= 1.0 for row in logged)
    assert set(callback.last_metrics) == {"shapes/overall", *(f"shapes/{task}" for task in TASKS)}
    grid = Image.open(tmp_path / "shapes" / "step_0000004.png")
    assert grid.size == (3 * TINY_IMAGE_SIZE, 2 * TINY_IMAGE_SIZE)  # 6 tasks x 1 prompt
    assert (tmp_path / "shapes" / "step_0000002" / "shapes_generation.jsonl").is_file()
    assert module.model.training and all(module.modes_seen)


@pytest.mark.slow  # FID's 2048 x 2048 matrix square root takes about 20 s on a shared CPU
def test_fid_evaluation_logs_fid_against_a_reference_folder(tmp_path):
    reference = tmp_path / "reference"
    reference.mkdir()
    generator = torch.Generator().manual_seed(0)
    for index in range(4):
        pixels = torch.randint(0, 256, (TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, 3), generator=generator, dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(reference / f"{index}.png")
    inception = save_random_inception(tmp_path / "inception.pth")
    prompts = ["a red circle", "two blue squares", "a green triangle"]
    callback = FIDEvaluation(3, tmp_path / "fid", prompts, reference, inception, kid=False)
    module, rows = fit(tmp_path, callback, steps=3)
    logged = [row for row in rows if row.get("fid")]
    assert len(logged) == 1 and int(logged[0]["step"]) == 3 and float(logged[0]["fid"]) >= 0.0
    assert Image.open(tmp_path / "fid" / "step_0000003.png").size == (2 * TINY_IMAGE_SIZE, 2 * TINY_IMAGE_SIZE)
    assert len(list((tmp_path / "fid" / "step_0000003").glob("*.png"))) == 3
    assert module.model.training


def test_evaluating_restores_the_mode_even_on_errors():
    model = tiny_model().train()
    with pytest.raises(RuntimeError), evaluating(model):
        assert not model.training and not torch.is_grad_enabled()
        raise RuntimeError("boom")
    assert model.training and torch.is_grad_enabled()


def test_bad_settings_are_named(tmp_path):
    with pytest.raises(ValueError, match="every_n_steps"):
        ShapesEvaluation(every_n_steps=0, folder=tmp_path)
    with pytest.raises(FileNotFoundError, match="reference"):
        FIDEvaluation(1, tmp_path, ["a", "b"], tmp_path / "missing", tmp_path / "inception.pth")
