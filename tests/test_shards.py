"""ShardWriter: numbering, rollover at the sample and byte limits, atomic writes, round trip through read_shard."""

from __future__ import annotations

import tarfile

import numpy as np
import pytest
from PIL import Image

from datamodules.schema import Sample, SampleError
from datamodules.shards import ShardWriter, encode_sample, read_shard


def generation_sample(key: str, size: int = 16, seed: int = 0) -> Sample:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Sample(
        key=key,
        kind="generation",
        messages=[
            {"role": "user", "content": f"Draw picture {key}."},
            {"role": "assistant", "content": "<image_gen>"},
        ],
        images={"target.png": Image.fromarray(pixels)},
        metadata={"seed": seed},
    )


def test_rolls_over_at_sample_limit_and_names_shards(tmp_path):
    with ShardWriter(tmp_path, prefix="gen", max_samples=3) as writer:
        for index in range(7):
            writer.write(generation_sample(f"s{index:03d}", seed=index))
    assert [path.name for path in writer.paths] == ["gen-000000.tar", "gen-000001.tar", "gen-000002.tar"]
    assert [len(list(read_shard(path))) for path in writer.paths] == [3, 3, 1] == writer.shard_sample_counts
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gen-000000.tar", "gen-000001.tar", "gen-000002.tar"]


def test_first_shard_numbers_a_writer_that_continues_another(tmp_path):
    with ShardWriter(tmp_path, prefix="gen", max_samples=2, first_shard=5) as writer:
        for index in range(3):
            writer.write(generation_sample(f"s{index}", seed=index))
    assert [path.name for path in writer.paths] == ["gen-000005.tar", "gen-000006.tar"]
    with pytest.raises(ValueError, match="first_shard"):
        ShardWriter(tmp_path, first_shard=-1)


def test_rolls_over_at_byte_limit(tmp_path):
    members = encode_sample(generation_sample("k0", size=32))
    sample_bytes = sum(512 + (len(data) + 511) // 512 * 512 for data in members.values())  # tar header + blocks
    with ShardWriter(tmp_path, max_bytes=int(2.5 * sample_bytes)) as writer:
        for index in range(5):
            writer.write(generation_sample(f"k{index}", size=32))  # identical sizes: two fit per shard
    assert [len(list(read_shard(path))) for path in writer.paths] == [2, 2, 1]


def test_round_trip_preserves_sample(tmp_path):
    sample = generation_sample("roundtrip", seed=3)
    with ShardWriter(tmp_path) as writer:
        writer.write(sample)
    (restored,) = list(read_shard(writer.paths[0]))
    assert restored.key == "roundtrip" and restored.kind == "generation"
    assert restored.messages == sample.messages and restored.metadata == {"seed": 3}
    assert np.array_equal(np.asarray(restored.images["target.png"]), np.asarray(sample.images["target.png"]))
    with tarfile.open(writer.paths[0]) as tar:
        assert tar.getnames() == ["roundtrip.json", "roundtrip.target.png"]


def test_shard_appears_only_when_closed(tmp_path):
    writer = ShardWriter(tmp_path, max_samples=10)
    with writer:
        writer.write(generation_sample("a"))
        assert not list(tmp_path.glob("*.tar"))  # still under its temporary name
    assert [p.name for p in tmp_path.glob("*.tar")] == ["shard-000000.tar"]


def test_failure_discards_partial_shard_keeps_closed_ones(tmp_path):
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path, max_samples=1) as writer:
            writer.write(generation_sample("a"))
            writer.write(generation_sample("b"))
            raise RuntimeError("producer failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-000000.tar"]


def test_rejects_invalid_samples(tmp_path):
    with ShardWriter(tmp_path) as writer:
        with pytest.raises(SampleError, match="unknown kind"):
            bad = generation_sample("x")
            bad.kind = "video"
            writer.write(bad)
        with pytest.raises(SampleError, match="key 'has.dot'"):
            writer.write(generation_sample("has.dot"))
        writer.write(generation_sample("dup"))
        with pytest.raises(SampleError, match="already written"):
            writer.write(generation_sample("dup"))
