"""Fault injection: every kind of broken sample is skipped, counted and logged with shard and key; too many skips
stop the run with a clear error, in the main process and from a worker."""

from __future__ import annotations

import io
import json
import logging
import random
import tarfile

import pytest

from datamodules.config import DataConfig
from datamodules.datamodule import ShardDataModule
from datamodules.reading import DataQualityError
from datamodules.shards import encode_sample
from datamodules.synthetic import synthetic_sample
from vargpt.text_tokenizer import train_text_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return train_text_tokenizer(["Draw a red circle.", "Here it is:"] * 5, vocab_size=280)


def good_members(key: str, seed: int) -> list[tuple[str, bytes]]:
    members = encode_sample(synthetic_sample("generation", key, random.Random(seed), size=24))
    return [(f"{key}.{suffix}", data) for suffix, data in members.items()]


def write_tar(path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def json_member(key: str, doc: dict) -> tuple[str, bytes]:
    return f"{key}.json", json.dumps(doc).encode()


def broken_members(fault: str) -> list[tuple[str, bytes]]:
    """Members of one sample ``bad`` carrying ``fault``; ``header`` and ``truncated`` are applied to the bytes later."""
    members = good_members("bad", seed=99)
    doc = json.loads(members[0][1])
    if fault == "undecodable image":
        return [members[0], ("bad.target.png", b"\x89PNG but not really an image")]
    if fault == "missing field":
        del doc["messages"]
        return [json_member("bad", doc), members[1]]
    if fault == "unknown kind":
        doc["kind"] = "video"
        return [json_member("bad", doc), members[1]]
    if fault == "invalid json":
        return [("bad.json", b"{not json"), members[1]]
    if fault == "missing image member":
        return [members[0]]
    return members


FAULTS = {
    "undecodable image": "does not decode as an image",
    "missing field": "missing field 'messages'",
    "unknown kind": "unknown kind 'video'",
    "invalid json": "not valid JSON",
    "missing image member": "missing from the shard",
    "corrupt member header": "corrupt tar header after member 'bad.json'; rest of shard lost",
    "truncated shard": "tar data unreadable",
}


def make_faulty_shards(directory, fault: str) -> None:
    """shard-000000.tar: 3 good samples, the faulty one, 3 good ones; shard-000001.tar: 6 good samples."""
    directory.mkdir()
    first = [m for i in range(3) for m in good_members(f"a{i}", i)] + broken_members(fault)
    first += [m for i in range(3, 6) for m in good_members(f"a{i}", i)]
    if fault == "truncated shard":
        first = first[: len(first) - 6]  # the last 3 samples are cut away below
    write_tar(directory / "shard-000000.tar", first)
    path = directory / "shard-000000.tar"
    data = bytearray(path.read_bytes())
    if fault == "corrupt member header":
        offset = data.index(b"bad.target.png")
        data[offset + 100 : offset + 108] = b"garbage!"  # breaks the header checksum of that member
    if fault == "truncated shard":
        data = data[: data.index(b"bad.target.png") + 512 + 20]  # ends in the middle of the bad sample's image
    path.write_bytes(bytes(data))
    write_tar(directory / "shard-000001.tar", [m for i in range(6) for m in good_members(f"b{i}", 10 + i)])


def data_config(directory, **overrides) -> DataConfig:
    values = dict(
        train_sources=[{"shards": str(directory)}], val_sources=[{"shards": str(directory)}], batch_size=1,
        num_workers=0, generation_size=16, generation_schedule=[[1, 1], [2, 2]], placeholder_multiple=4,
        max_skip_fraction=0.5, min_samples_before_skip_check=1000,
    )
    values.update(overrides)
    return DataConfig(**values)


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_fault_is_skipped_counted_and_logged(tokenizer, tmp_path, caplog, fault):
    make_faulty_shards(tmp_path / "shards", fault)
    datamodule = ShardDataModule(data_config(tmp_path / "shards"), tokenizer)
    datamodule.setup("validate")
    with caplog.at_level(logging.WARNING, logger="datamodules.reading"):
        keys = [key for batch in datamodule.val_dataloader() for key in batch["keys"]]
    expected_good = 9 if fault in ("truncated shard", "corrupt member header") else 12
    assert len(keys) == expected_good and "bad" not in keys
    assert keys[-6:] == [f"b{i}" for i in range(6)]  # the next shard is read normally
    stats = datamodule.skip_stats()["val"]
    assert stats["skipped"] >= 1 and stats["read"] == expected_good + stats["skipped"]
    assert FAULTS[fault] in caplog.text
    assert "shard-000000.tar" in caplog.text
    assert "key 'bad'" in caplog.text


def test_unreadable_shard_is_skipped(tokenizer, tmp_path, caplog):
    make_faulty_shards(tmp_path / "shards", "unknown kind")
    (tmp_path / "shards" / "shard-000000.tar").write_bytes(b"not a tar file at all" * 100)
    datamodule = ShardDataModule(data_config(tmp_path / "shards", max_skip_fraction=1.0), tokenizer)
    datamodule.setup("validate")
    with caplog.at_level(logging.WARNING, logger="datamodules.reading"):
        keys = [key for batch in datamodule.val_dataloader() for key in batch["keys"]]
    assert keys == [f"b{i}" for i in range(6)]
    assert "shard-000000.tar" in caplog.text and datamodule.skip_stats()["val"]["skipped"] == 1


def test_too_many_skips_stop_the_run(tokenizer, tmp_path):
    make_faulty_shards(tmp_path / "shards", "undecodable image")
    datamodule = ShardDataModule(data_config(tmp_path / "shards", max_skip_fraction=0.05), tokenizer)
    datamodule.setup("validate")
    with pytest.raises(DataQualityError, match=r"skipped 1 of 13 samples .*max_skip_fraction=0.05.*key 'bad'"):
        list(datamodule.val_dataloader())


def test_skip_limit_checked_early_in_a_worker_during_training(tokenizer, tmp_path):
    make_faulty_shards(tmp_path / "shards", "unknown kind")
    cfg = data_config(tmp_path / "shards", val_sources=[], num_workers=1, batches_per_epoch=50,
                      max_skip_fraction=0.0, min_samples_before_skip_check=1)
    datamodule = ShardDataModule(cfg, tokenizer)
    with pytest.raises(DataQualityError, match="train rank 0 worker 0: skipped 1 of"):
        list(datamodule.train_dataloader())


def test_training_stream_of_only_bad_samples_fails_instead_of_spinning(tokenizer, tmp_path):
    directory = tmp_path / "shards"
    directory.mkdir()
    write_tar(directory / "shard-000000.tar", broken_members("unknown kind"))
    cfg = data_config(directory, val_sources=[], batches_per_epoch=2, max_skip_fraction=1.0)
    with pytest.raises(DataQualityError, match="gave no usable sample.*unknown kind 'video'"):
        list(ShardDataModule(cfg, tokenizer).train_dataloader())


def test_too_long_sample_is_skipped_not_truncated(tokenizer, tmp_path, caplog):
    make_faulty_shards(tmp_path / "shards", "unknown kind")
    datamodule = ShardDataModule(data_config(tmp_path / "shards", max_length=20, max_skip_fraction=1.0), tokenizer)
    datamodule.setup("validate")
    with caplog.at_level(logging.WARNING, logger="datamodules.reading"):
        assert list(datamodule.val_dataloader()) == []
    assert "exceed max_length=20" in caplog.text
    assert datamodule.skip_stats()["val"] == {"read": 13, "skipped": 13}
