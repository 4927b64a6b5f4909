"""ResolutionSchedule: the generation resolution switches at the configured step, and resumes after the switch."""

from __future__ import annotations

import time

import lightning
import pytest
import torch

from callbacks.resolution import ResolutionSchedule, resolution_phase
from datamodules.config import DataConfig
from datamodules.datamodule import ShardDataModule
from datamodules.synthetic import write_synthetic_shards
from vargpt.schedules import placeholder_count, scale_schedule
from vargpt.text_tokenizer import train_text_tokenizer

LOW = resolution_phase(0, 32, schedule=[[1, 1], [2, 2], [4, 4]])
HIGH = resolution_phase(3, 48, schedule=[[1, 1], [2, 2], [3, 3], [6, 6]])


@pytest.fixture(scope="module")
def tokenizer():
    return train_text_tokenizer(["Draw a red circle.", "Here it is:", "What is in <image>?"] * 5, vocab_size=300)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("resolution")
    write_synthetic_shards(root, 24, kinds=("generation",), size=48, samples_per_shard=6)
    return root


def datamodule(tokenizer, shards, num_workers: int = 0, start=LOW) -> ShardDataModule:
    config = DataConfig(
        train_sources=[{"shards": str(shards)}], batch_size=2, batches_per_epoch=3, num_workers=num_workers,
        generation_size=start.size, generation_schedule=[list(s) for s in start.schedule], placeholder_multiple=8,
        shuffle_buffer=4, min_samples_before_skip_check=1000,
    )
    return ShardDataModule(config, tokenizer)


class RecordBatches(lightning.LightningModule):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[tuple[int, int, int]] = []

    def training_step(self, batch, batch_index):
        self.seen.append((batch["gen_size"], len(batch["gen_schedule"]), batch["gen_placeholder_count"]))
        return (self.weight * batch["attention_mask"].float().mean() - 1) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def trainer(tmp_path, max_steps, **kwargs) -> lightning.Trainer:
    return lightning.Trainer(
        max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path, callbacks=[ResolutionSchedule([HIGH, LOW])], **kwargs,
    )


def test_switches_size_schedule_and_placeholders_together(tokenizer, shards, tmp_path):
    module = RecordBatches()
    trainer(tmp_path, 6, enable_checkpointing=False).fit(module, datamodule=datamodule(tokenizer, shards))
    assert module.seen[:3] == [(32, 3, placeholder_count(LOW.schedule, 8))] * 3
    # the switch applies to batches assembled after step 3 (no prefetching with num_workers=0)
    assert module.seen[4:] == [(48, 4, placeholder_count(HIGH.schedule, 8))] * 2


class WorkerAheadOfTrainStart(lightning.Callback):
    """Holds ``on_train_start`` until the DataLoader worker has begun its first batch, as a slow callback would."""

    def on_train_start(self, trainer, pl_module):
        counters = trainer.datamodule.counters["train"]
        deadline = time.monotonic() + 60
        while counters.totals()["read"] == 0 and time.monotonic() < deadline:
            pass
        assert counters.totals()["read"] > 0, "the worker read nothing in 60 s"


def test_first_batches_come_at_the_first_phase_even_when_workers_start_early(tokenizer, shards, tmp_path):
    # the DataModule's own resolution is HIGH; the schedule starts at LOW. Lightning creates the training iterator
    # (starting the worker) before on_train_start, so the first phase must be in place before that
    module = RecordBatches()
    schedule = ResolutionSchedule([resolution_phase(0, LOW.size, schedule=LOW.schedule)])
    lightning.Trainer(
        max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, default_root_dir=tmp_path, callbacks=[WorkerAheadOfTrainStart(), schedule],
    ).fit(module, datamodule=datamodule(tokenizer, shards, num_workers=1, start=HIGH))
    assert module.seen == [(32, 3, placeholder_count(LOW.schedule, 8))] * 2


class WorkerReadsAheadOfStep(lightning.Callback):
    """Before training batch 1, waits until the worker has read the samples of batch 2 as well (batches of 2)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_index):
        if trainer.global_step == 1:
            counters = trainer.datamodule.counters["train"]
            deadline = time.monotonic() + 60
            while counters.totals()["read"] < 6 and time.monotonic() < deadline:
                pass
            assert counters.totals()["read"] >= 6, "the worker did not read ahead in 60 s"


def test_a_switch_reaches_exactly_the_batches_of_its_steps_however_far_workers_read_ahead(tokenizer, shards, tmp_path):
    # batch 2 is assembled while step 1 trains, before the switch at step 2 is due: by its index it is a HIGH batch
    switch = resolution_phase(2, HIGH.size, schedule=HIGH.schedule)
    module = RecordBatches()
    lightning.Trainer(
        max_steps=5, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, default_root_dir=tmp_path,
        callbacks=[WorkerReadsAheadOfStep(), ResolutionSchedule([LOW, switch])],
    ).fit(module, datamodule=datamodule(tokenizer, shards, num_workers=1))
    low, high = (32, 3, placeholder_count(LOW.schedule, 8)), (48, 4, placeholder_count(HIGH.schedule, 8))
    assert module.seen == [low, low, high, high, high]


def test_plan_by_batch_index_and_its_errors(tokenizer, shards):
    module = datamodule(tokenizer, shards)
    # 3 batches per epoch: with accumulation 2, Lightning steps after batches 2 and 3 of each epoch (2 steps an epoch)
    assert [module.first_batch_of_step(step, 2) for step in range(5)] == [0, 2, 3, 5, 6]
    assert [module.first_batch_of_step(step) for step in range(4)] == [0, 1, 2, 3]
    module.set_generation_plan([(4, HIGH.size, HIGH.schedule), (0, LOW.size, LOW.schedule)])
    sizes = [module.resolution.at_batch(index).size for index in range(6)]
    assert sizes == [32, 32, 32, 32, 48, 48]
    assert module.resolution.at_batch(None) == module.generation_resolution  # no index: the current resolution
    with pytest.raises(ValueError, match="starts at batch 0"):
        module.set_generation_plan([(2, LOW.size, LOW.schedule)])
    with pytest.raises(ValueError, match="distinct batches"):
        module.set_generation_plan([(0, LOW.size, LOW.schedule), (0, HIGH.size, HIGH.schedule)])
    running = datamodule(tokenizer, shards, num_workers=1)
    running.set_generation_plan([(0, LOW.size, LOW.schedule)])
    iter(running.train_dataloader())
    running.set_generation_plan([(0, LOW.size, LOW.schedule)])  # the same plan again (a second fit): nothing to tell
    with pytest.raises(RuntimeError, match="new plan after the training loader's workers started"):
        running.set_generation_plan([(0, HIGH.size, HIGH.schedule)])
    assert running.resolution.at_batch(5).size == LOW.size  # the refused plan left the old one in place


def test_resumed_run_continues_at_the_new_resolution(tokenizer, shards, tmp_path):
    first = trainer(tmp_path, 5)
    first.fit(RecordBatches(), datamodule=datamodule(tokenizer, shards))
    checkpoint = tmp_path / "after_switch.ckpt"
    first.save_checkpoint(checkpoint)
    resumed = RecordBatches()
    trainer(tmp_path, 7).fit(resumed, datamodule=datamodule(tokenizer, shards), ckpt_path=checkpoint)
    assert [size for size, _, _ in resumed.seen] == [48, 48]


def test_phase_from_pn_or_stride():
    assert resolution_phase(0, 256, pn="0.06M").schedule == tuple(scale_schedule("0.06M"))
    assert resolution_phase(0, 64, stride=8).schedule[-1] == (8, 8)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: resolution_phase(0, 256), "exactly one of pn, schedule or stride"),
        (lambda: resolution_phase(0, 256, pn="2M"), "unknown pn '2M'"),
        (lambda: resolution_phase(0, 60, stride=16), "60 is not divisible by the tokenizer stride 16"),
        (lambda: ResolutionSchedule([resolution_phase(5, 32, pn="0.06M")]), "must start at step 0"),
        (lambda: ResolutionSchedule([LOW, resolution_phase(0, 48, pn="0.06M")]), "distinct steps"),
    ],
)
def test_bad_phases_name_the_value(make, message):
    with pytest.raises(ValueError, match=message):
        make()
