"""ShardDataModule: the batch contract, preference layout, transforms, batch counts, seeding, mixing, the generation
resolution in workers, shard-list errors, and a Lightning fit."""

from __future__ import annotations

import os
import random
from collections import Counter

import lightning
import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.collate import pad_rows
from datamodules.config import DataConfig, DataConfigError
from datamodules.datamodule import ShardDataModule
from datamodules.shards import read_shard
from datamodules.sources import ShardListError
from datamodules.synthetic import write_synthetic_shards
from datamodules.transforms import GenerationImageTransform, UnderstandingImageTransform
from vargpt.chat import IGNORE_INDEX, ChatTokenIds, EncodedChat, encode_generation_prompt
from vargpt.schedules import placeholder_count
from vargpt.text_tokenizer import train_text_tokenizer

SFT_KINDS = ("understanding", "generation", "editing", "text")
TINY_SCHEDULE = [[1, 1], [2, 2], [3, 3]]  # 14 tokens -> 16 placeholders with multiple 8


@pytest.fixture(scope="module")
def tokenizer():
    return train_text_tokenizer(["Draw a red circle.", "What is in <image>? It shows a blue square.", "Here it is:"] * 5,
                                vocab_size=300)


@pytest.fixture(scope="module")
def shard_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    write_synthetic_shards(root / "sft", 48, kinds=SFT_KINDS, size=40, samples_per_shard=6)
    write_synthetic_shards(root / "pref", 24, kinds=("preference",), size=40, samples_per_shard=6, prefix="pref")
    write_synthetic_shards(root / "text_a", 40, kinds=("text",), samples_per_shard=5, prefix="a")
    write_synthetic_shards(root / "text_b", 40, kinds=("text",), samples_per_shard=5, prefix="b")
    return root


def config(shards, **overrides):
    values = dict(
        train_sources=[{"shards": shards if isinstance(shards, list) else str(shards)}], batch_size=4, batches_per_epoch=3, num_workers=0,
        generation_size=32, generation_schedule=TINY_SCHEDULE, placeholder_multiple=8, shuffle_buffer=8,
        min_samples_before_skip_check=1000,
    )
    values.update(overrides)
    return DataConfig(**values)


def epoch_batches(datamodule):
    return list(datamodule.train_dataloader())


def test_sft_batch_contract(tokenizer, shard_dirs):
    datamodule = ShardDataModule(config(shard_dirs / "sft", batch_size=8, batches_per_epoch=2), tokenizer)
    ids = ChatTokenIds.from_tokenizer(tokenizer)
    for batch in epoch_batches(datamodule):
        rows, length = batch["input_ids"].shape
        assert rows == 8 and length % 8 == 0
        assert batch["input_ids"].dtype == batch["attention_mask"].dtype == batch["labels"].dtype == torch.int64
        lengths = batch["attention_mask"].sum(dim=1)
        for row in range(rows):  # right padding: ones then zeros, labels ignored on padding
            assert batch["attention_mask"][row, : lengths[row]].all() and not batch["attention_mask"][row, lengths[row]:].any()
            assert (batch["labels"][row, lengths[row]:] == IGNORE_INDEX).all()
            assert (batch["input_ids"][row, lengths[row]:] == ids.pad).all()
        assert batch["gen_placeholder_count"] == placeholder_count(TINY_SCHEDULE, 8) == 16
        assert batch["gen_schedule"] == TINY_SCHEDULE and batch["gen_size"] == 32
        gen = batch["gen_images"]
        assert gen.shape[1:] == (3, 32, 32) and gen.dtype == torch.float32 and -1 <= gen.min() <= gen.max() <= 1
        for target, row in enumerate(batch["gen_sample_index"].tolist()):
            assert batch["kinds"][row] in ("generation", "editing")
            assert (batch["input_ids"][row] == ids.image_gen_pad).sum() == 16
        assert len(batch["gen_sample_index"]) == sum(kind in ("generation", "editing") for kind in batch["kinds"])
        grids = batch["image_grid_thw"]
        assert batch["pixel_values"].shape == (int(grids.prod(dim=1).sum()), 3 * 2 * 14 * 14)
        for image, row in enumerate(batch["image_sample_index"].tolist()):
            assert batch["kinds"][row] in ("understanding", "editing")
            assert (batch["input_ids"][row] == ids.image_pad).sum() == int(grids[image].prod()) // 4
        assert (batch["labels"][batch["input_ids"] == ids.image_gen_pad] == IGNORE_INDEX).all()
        assert (batch["labels"][batch["input_ids"] == ids.image_pad] == IGNORE_INDEX).all()
        assert set(batch["kinds"]) <= set(SFT_KINDS) and len(batch["keys"]) == 8


def test_preference_batch_layout(tokenizer, shard_dirs):
    cfg = config(shard_dirs / "pref", mode="preference", batch_size=3, batches_per_epoch=1)
    datamodule = ShardDataModule(cfg, tokenizer)
    datamodule.setup("fit")
    datamodule.train_stream.encoder.train = False  # centre crops, to compare with the stored images
    (batch,) = epoch_batches(datamodule)
    ids = ChatTokenIds.from_tokenizer(tokenizer)
    assert batch["num_pairs"] == 3 and batch["input_ids"].shape[0] == 6
    assert batch["gen_sample_index"].tolist() == list(range(6))
    stored = {s.key: s for path in sorted((shard_dirs / "pref").glob("*.tar")) for s in read_shard(path)}
    transform = GenerationImageTransform(32, train=False)
    for pair, key in enumerate(batch["keys"]):
        chosen_row, rejected_row = batch["input_ids"][pair], batch["input_ids"][3 + pair]
        start = (chosen_row == ids.image_gen_start).nonzero()[0, 0]
        assert torch.equal(chosen_row[:start], rejected_row[:start])  # same prompt
        expected_chosen = transform(stored[key].images["chosen.png"], random.Random(0))
        expected_rejected = transform(stored[key].images["rejected.png"], random.Random(0))
        assert torch.equal(batch["gen_images"][pair], expected_chosen)
        assert torch.equal(batch["gen_images"][3 + pair], expected_rejected)


def test_sft_mode_skips_preference_samples(tokenizer, shard_dirs):
    cfg = config(shard_dirs / "pref", batches_per_epoch=1, max_skip_fraction=1.0)
    datamodule = ShardDataModule(cfg, tokenizer)
    with pytest.raises(Exception, match="gave no usable sample.*not used in data.mode='sft'"):
        epoch_batches(datamodule)


def test_generation_transform_train_and_eval():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 80, 3), dtype=np.uint8))
    evaluation = GenerationImageTransform(32, train=False)(image, random.Random(0))
    resized = image.resize((58, 36), Image.Resampling.LANCZOS)  # shorter side round(1.125 * 32) = 36
    expected = np.asarray(resized.crop((13, 2, 45, 34)), dtype=np.float32) / 127.5 - 1
    assert torch.allclose(evaluation, torch.from_numpy(expected).permute(2, 0, 1))
    crops = {tuple(GenerationImageTransform(32, train=True)(image, random.Random(seed))[0, 0, :4].tolist()) for seed in range(8)}
    assert len(crops) > 1  # random crops differ


def test_understanding_transform_respects_pixel_budget():
    transform = UnderstandingImageTransform(min_pixels=56 * 56, max_pixels=28 * 28 * 16)
    pixel_values, grids = transform([Image.new("RGB", (400, 200)), Image.new("RGBA", (20, 20))])
    assert grids.tolist()[0][0] == 1 and all(h * w * 14 * 14 <= 28 * 28 * 16 for _, h, w in grids.tolist())
    assert grids.tolist()[1] == [1, 4, 4]  # upscaled to the minimum of 56 x 56 pixels
    assert pixel_values.shape[0] == int(grids.prod(dim=1).sum())


@pytest.mark.parametrize("num_workers", [0, 2])
def test_fixed_batches_per_epoch_and_epoch_reseeding(tokenizer, shard_dirs, num_workers):
    cfg = config(shard_dirs / "sft", batches_per_epoch=5, num_workers=num_workers)
    first = ShardDataModule(cfg, tokenizer)
    loader = first.train_dataloader()
    assert len(loader) == 5
    epoch_one, epoch_two = [b["keys"] for b in loader], [b["keys"] for b in loader]
    assert len(epoch_one) == len(epoch_two) == 5
    assert epoch_one != epoch_two  # a new epoch reseeds shard order, shuffle and crops, also in persistent workers
    again = ShardDataModule(cfg, tokenizer)
    assert [b["keys"] for b in again.train_dataloader()] == epoch_one  # same seed, same epoch, same stream
    state = first.state_dict()
    resumed = ShardDataModule(cfg, tokenizer)
    resumed.load_state_dict(state)
    assert state["epoch"] == 2
    assert [b["keys"] for b in resumed.train_dataloader()] == [b["keys"] for b in loader]  # epoch 3 in both


def test_spawned_workers_give_the_forked_workers_batches(tokenizer, shard_dirs):
    def two_epochs(start):
        loader = ShardDataModule(config(shard_dirs / "sft", batches_per_epoch=4, num_workers=2,
                                        worker_start_method=start), tokenizer).train_dataloader()
        return [[batch["keys"] for batch in loader] for _ in range(2)]

    forked = two_epochs("fork")
    assert two_epochs("spawn") == forked and forked[0] != forked[1]
    with pytest.raises(ValueError, match="data.worker_start_method"):
        config(shard_dirs / "sft", worker_start_method="thread")


def test_data_workers_tokenize_serially_unless_the_user_says_otherwise(monkeypatch):
    from datamodules.datamodule import serial_tokenizer_worker

    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    serial_tokenizer_worker(0)
    assert os.environ["TOKENIZERS_PARALLELISM"] == "false"
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")
    serial_tokenizer_worker(0)
    assert os.environ["TOKENIZERS_PARALLELISM"] == "true"


def test_ranks_and_workers_read_disjoint_shards(tokenizer, shard_dirs):
    seen = []
    for rank in range(2):
        cfg = config(shard_dirs / "sft", batch_size=4, batches_per_epoch=3, num_workers=2, shuffle_buffer=1)
        datamodule = ShardDataModule(cfg, tokenizer, rank=rank, world_size=2)
        keys = [key for batch in datamodule.train_dataloader() for key in batch["keys"]]
        assert len(keys) == 12 and len(set(keys)) == 12  # 8 shards / 4 readers: 12 samples, one pass each
        seen.append(set(keys))
    assert not seen[0] & seen[1]


def test_sources_mix_by_weight(tokenizer, shard_dirs):
    cfg = config(shard_dirs / "text_a", batch_size=20, batches_per_epoch=20, shuffle_buffer=4)
    cfg.train_sources = [type(cfg.train_sources[0])(shards=str(shard_dirs / "text_a"), weight=3.0),
                         type(cfg.train_sources[0])(shards=str(shard_dirs / "text_b"), weight=1.0)]
    datamodule = ShardDataModule(cfg, tokenizer)
    counts = Counter(key[0] for batch in epoch_batches(datamodule) for key in batch["keys"])
    assert sum(counts.values()) == 400
    assert 0.70 < counts["a"] / 400 < 0.80  # 3 : 1, binomial sd ~0.022


@pytest.mark.parametrize("num_workers, start", [(0, None), (2, None), (2, "spawn")])
def test_generation_resolution_reaches_workers(tokenizer, shard_dirs, num_workers, start):
    cfg = config(shard_dirs / "sft", batch_size=6, batches_per_epoch=4, num_workers=num_workers, prefetch_factor=1,
                 worker_start_method=start)
    datamodule = ShardDataModule(cfg, tokenizer)
    loader = datamodule.train_dataloader()
    assert {b["gen_size"] for b in loader} == {32}
    datamodule.set_generation_resolution(48, [[1, 1], [2, 2], [4, 4], [6, 6]])  # between epochs
    batches = list(loader)
    assert {b["gen_size"] for b in batches} == {48}
    assert {b["gen_placeholder_count"] for b in batches} == {64}  # 57 tokens -> 64
    assert all(b["gen_images"].shape[-1] == 48 for b in batches if b["gen_images"] is not None)
    iterator = iter(loader)  # within an epoch: batches assembled after the call follow it
    sizes = [next(iterator)["gen_size"]]
    datamodule.set_generation_resolution(24, TINY_SCHEDULE)
    sizes += [batch["gen_size"] for batch in iterator]
    assert sizes[0] == 48 and sizes[-1] == 24
    assert sizes.count(48) <= 1 + num_workers * 1  # at most the batches already prefetched
    assert datamodule.state_dict()["generation_size"] == 24


def test_shard_list_errors_name_the_pattern(tokenizer, shard_dirs, tmp_path):
    cases = [
        (str(shard_dirs / "sft" / "shard-{000000..000009}.tar"), "names 2 missing shard"),
        (str(tmp_path / "nothing-*.tar"), "matches no files"),
        ([], "the shard list is empty"),
        (str(tmp_path), "holds no .tar shards"),
    ]
    for shards, message in cases:
        with pytest.raises(ShardListError, match=message) as error:
            ShardDataModule(config(shards), tokenizer).setup("fit")
        if isinstance(shards, str):
            assert shards in str(error.value)
    with pytest.raises(ShardListError, match="8 shard.*2 rank.*x 8 worker.*shard_sampling='resampled'"):
        ShardDataModule(config(shard_dirs / "sft", num_workers=8), tokenizer, rank=0, world_size=2).setup("fit")
    resampled = config(shard_dirs / "sft", num_workers=0, shard_sampling="resampled", batches_per_epoch=2)
    assert len(epoch_batches(ShardDataModule(resampled, tokenizer, rank=0, world_size=16))) == 2
    with pytest.raises(DataConfigError, match="val_batches must be set"):
        ShardDataModule(config(shard_dirs / "sft", val_sources=[{"shards": str(shard_dirs / "sft")}]), tokenizer,
                        rank=0, world_size=2).setup("fit")
    with pytest.raises(DataConfigError, match="data.mode must be one of"):
        config(shard_dirs / "sft", mode="dpo")


def test_validation_is_deterministic_one_pass(tokenizer, shard_dirs):
    cfg = config(shard_dirs / "sft", val_sources=[{"shards": str(shard_dirs / "sft")}], batch_size=5, num_workers=2)
    datamodule = ShardDataModule(cfg, tokenizer)
    datamodule.setup("validate")
    first = [batch["keys"] for batch in datamodule.val_dataloader()]
    assert sum(len(keys) for keys in first) == 48 and len({k for keys in first for k in keys}) == 48
    assert [batch["keys"] for batch in datamodule.val_dataloader()] == first


class ConsumeBatches(lightning.LightningModule):
    """Records what it is fed; the loss is a function of the batch so Lightning runs a real step."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.sizes: list[int] = []

    def training_step(self, batch, batch_index):
        self.sizes.append(batch["gen_size"])
        return (self.weight * batch["attention_mask"].float().mean() - 1) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class SwitchResolution(lightning.Callback):
    def on_train_epoch_end(self, trainer, module):
        trainer.datamodule.set_generation_resolution(48, [[1, 1], [3, 3]])


def test_lightning_fit_with_resolution_callback(tokenizer, shard_dirs):
    cfg = config(shard_dirs / "sft", batches_per_epoch=3, num_workers=1)
    datamodule = ShardDataModule(cfg, tokenizer)
    module = ConsumeBatches()
    trainer = lightning.Trainer(
        max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[SwitchResolution()],
    )
    trainer.fit(module, datamodule=datamodule)
    assert module.sizes == [32, 32, 32, 48, 48, 48]
    assert datamodule.skip_stats()["train"] == {"read": 24, "skipped": 0}


def test_left_padding_for_inference_prompts(tokenizer):
    prompts = [encode_generation_prompt(tokenizer, [{"role": "user", "content": text}]) for text in ("Hi", "Draw a red circle.")]
    batch = pad_rows([EncodedChat(ids, None) for ids in prompts], pad_id=0, padding_side="left")
    assert "labels" not in batch
    for row, ids in enumerate(prompts):
        assert batch["input_ids"][row, -len(ids):].tolist() == ids  # every prompt ends at the last column
        assert batch["attention_mask"][row].tolist() == [0] * (batch["input_ids"].shape[1] - len(ids)) + [1] * len(ids)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_training_loader_resumes_mid_epoch_at_the_next_batch(tokenizer, shard_dirs, num_workers):
    """A fresh loader given the state after 3 batches of epoch 2 yields exactly the epoch's other batches, then the
    next epoch. In the main process a resolution switch after the first batch of the epoch is replayed too."""
    cfg = config(shard_dirs / "sft", batch_size=6, batches_per_epoch=5, num_workers=num_workers, prefetch_factor=1)
    datamodule = ShardDataModule(cfg, tokenizer)
    loader = datamodule.train_dataloader()
    list(loader)
    iterator = iter(loader)
    consumed = [next(iterator)]
    if num_workers == 0:
        datamodule.set_generation_resolution(48, [[1, 1], [2, 2], [4, 4], [6, 6]])
    consumed += [next(iterator), next(iterator)]
    state, data_state = loader.state_dict(), datamodule.state_dict()
    expected = list(iterator) + list(loader)
    assert state["epoch"] == 2 and state["consumed"] == 3
    assert [run[:2] for run in state["resolutions"]] == ([[1, 32], [2, 48]] if num_workers == 0 else [[3, 32]])

    resumed = ShardDataModule(cfg, tokenizer)
    resumed.load_state_dict(data_state)
    resumed_loader = resumed.train_dataloader()
    resumed_loader.load_state_dict(state)
    batches = list(resumed_loader) + list(resumed_loader)
    assert [b["keys"] for b in batches] == [b["keys"] for b in expected] and len(batches) == 2 + 5
    for got, want in zip(batches, expected):
        assert got["gen_size"] == want["gen_size"]
        assert torch.equal(got["input_ids"], want["input_ids"])
        assert (got["gen_images"] is None) == (want["gen_images"] is None)
        assert got["gen_images"] is None or torch.equal(got["gen_images"], want["gen_images"])
    assert resumed_loader.state_dict()["epoch"] == 3


def test_training_loader_resumed_at_an_epoch_end_starts_the_next_epoch(tokenizer, shard_dirs):
    cfg = config(shard_dirs / "sft", batch_size=3, batches_per_epoch=2)
    loader = ShardDataModule(cfg, tokenizer).train_dataloader()
    list(loader)
    state = loader.state_dict()
    expected = [b["keys"] for b in loader]
    resumed = ShardDataModule(cfg, tokenizer).train_dataloader()
    resumed.load_state_dict(state)
    assert state["consumed"] == 2 and [b["keys"] for b in resumed] == expected
    with pytest.raises(ValueError, match="batches_per_epoch"):
        resumed.load_state_dict({**state, "consumed": 3})
