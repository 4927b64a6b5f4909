"""Two CPU processes (gloo, FileStore): ranks read disjoint shards and yield the same number of batches, even when
the shards divide unevenly between them."""

from __future__ import annotations

import datetime
import json

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from datamodules.config import DataConfig
from datamodules.datamodule import ShardDataModule
from datamodules.synthetic import write_synthetic_shards
from vargpt.text_tokenizer import load_text_tokenizer, train_text_tokenizer

WORLD_SIZE = 2


def shard_of(key: str) -> int:
    """Shard index of a synthetic key ``shard_<sample index>`` with 4 samples per shard."""
    return int(key.rsplit("_", 1)[1]) // 4


def run_rank(rank: int, root: str) -> None:
    store = dist.FileStore(f"{root}/store", WORLD_SIZE)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD_SIZE,
                            timeout=datetime.timedelta(seconds=60))
    try:
        config = DataConfig(
            train_sources=[{"shards": f"{root}/shards"}], batch_size=3, batches_per_epoch=7, num_workers=1,
            generation_size=16, generation_schedule=[[1, 1], [2, 2]], placeholder_multiple=4, shuffle_buffer=4,
        )
        datamodule = ShardDataModule(config, load_text_tokenizer(f"{root}/tokenizer"))  # rank from torch.distributed
        keys, batches = [], 0
        for batch in datamodule.train_dataloader():
            step = torch.ones(1)
            dist.all_reduce(step)  # a collective per batch, as a DDP step: unequal counts would hang here
            keys += batch["keys"]
            batches += 1
        counts = [None] * WORLD_SIZE
        dist.all_gather_object(counts, batches)
        with open(f"{root}/rank{rank}.json", "w") as file:
            json.dump({"keys": keys, "batches": batches, "all_batches": counts}, file)
    finally:
        dist.destroy_process_group()


def test_two_ranks_disjoint_data_equal_batches(tmp_path):
    # 5 shards of 4 samples: rank 0 owns shards 0, 2, 4 (12 samples), rank 1 owns shards 1, 3 (8 samples)
    write_synthetic_shards(tmp_path / "shards", 20, kinds=("generation", "text"), size=24, samples_per_shard=4)
    train_text_tokenizer(["Draw a red circle.", "Here it is:"], vocab_size=280).save_pretrained(tmp_path / "tokenizer")
    mp.start_processes(run_rank, args=(str(tmp_path),), nprocs=WORLD_SIZE, join=True, start_method="fork")
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(WORLD_SIZE)]
    assert [r["batches"] for r in results] == [7, 7] and results[0]["all_batches"] == [7, 7]
    assert {shard_of(key) for key in results[0]["keys"]} == {0, 2, 4}
    assert {shard_of(key) for key in results[1]["keys"]} == {1, 3}  # 21 samples from 8: rank 1 cycles its shards
    assert not set(results[0]["keys"]) & set(results[1]["keys"])
