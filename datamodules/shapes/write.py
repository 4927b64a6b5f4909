"""Write shapes-world shards: ``python -m datamodules.shapes.write OUT_DIR --size 64 --count-per-kind N --seed S``.

Each kind goes to its own directory, ``OUT_DIR/<kind>/shapes-<split>-000000.tar``, ..., so a data source can name
the directory. Samples are pure functions of (kind, index, seed, split, size): rerunning writes identical shards,
and ``--split eval`` draws from streams disjoint from ``train`` for the same seed.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path

from datamodules.shards import ShardWriter
from datamodules.shapes.questions import check_questions_per_image
from datamodules.shapes.samples import SAMPLE_KINDS, make_sample
from datamodules.shapes.world import SPLITS

DEFAULT_SAMPLES_PER_SHARD = 1000


def write_shards(
    out_dir: str | Path,
    count_per_kind: int,
    seed: int,
    split: str = "train",
    size: int = 64,
    kinds: Sequence[str] = SAMPLE_KINDS,
    max_samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD,
    questions_per_image: int = 1,
) -> dict[str, list[Path]]:
    """Write ``count_per_kind`` samples of each kind; return the shard paths written per kind.

    ``questions_per_image``: questions per understanding image (``make_sample``)."""
    if count_per_kind < 1:
        raise ValueError(f"count_per_kind must be >= 1, got {count_per_kind}")
    check_questions_per_image(questions_per_image)
    for kind in kinds:
        if kind not in SAMPLE_KINDS:
            raise ValueError(f"unknown sample kind {kind!r}; expected some of {SAMPLE_KINDS}")
    return {
        kind: write_shard_range(
            out_dir, kind, 0, count_per_kind, seed, split, size, max_samples_per_shard, questions_per_image
        )
        for kind in kinds
    }


def write_shard_range(
    out_dir: str | Path,
    kind: str,
    start: int,
    stop: int,
    seed: int,
    split: str = "train",
    size: int = 64,
    max_samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD,
    questions_per_image: int = 1,
) -> list[Path]:
    """Write samples ``start`` .. ``stop - 1`` of ``kind`` into the shards they fall in when all samples from 0 are
    written ``max_samples_per_shard`` to a shard, and return those shards' paths. ``start`` must begin a shard, so
    that writers of disjoint ranges (in parallel processes) produce the same files as one writer of them all."""
    if kind not in SAMPLE_KINDS:
        raise ValueError(f"unknown sample kind {kind!r}; expected some of {SAMPLE_KINDS}")
    if not 0 <= start < stop or start % max_samples_per_shard:
        raise ValueError(
            f"sample range [{start}, {stop}) must be non-empty and start at a multiple of max_samples_per_shard="
            f"{max_samples_per_shard}"
        )
    with ShardWriter(
        Path(out_dir) / kind,
        prefix=f"shapes-{split}",
        max_samples=max_samples_per_shard,
        first_shard=start // max_samples_per_shard,
    ) as writer:
        for index in range(start, stop):
            writer.write(make_sample(kind, index, seed, split, size, questions_per_image))
    if len(writer.paths) != math.ceil((stop - start) / max_samples_per_shard):  # a shard split by its byte limit
        raise RuntimeError(
            f"{kind} samples [{start}, {stop}) took {len(writer.paths)} shards, more than their count allows: lower "
            "max_samples_per_shard"
        )
    return list(writer.paths)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m datamodules.shapes.write", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="directory to write <kind>/shapes-<split>-NNNNNN.tar into")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    parser.add_argument("--count-per-kind", type=int, required=True, help="samples of each kind")
    parser.add_argument("--seed", type=int, default=0, help="base seed (default 0)")
    parser.add_argument("--split", choices=tuple(SPLITS), default="train")
    parser.add_argument("--kinds", nargs="+", choices=SAMPLE_KINDS, default=list(SAMPLE_KINDS))
    parser.add_argument("--max-samples-per-shard", type=int, default=DEFAULT_SAMPLES_PER_SHARD)
    parser.add_argument("--questions-per-image", type=int, default=1,
                        help="questions per understanding image, a multi-turn chat (1-4, default 1)")
    args = parser.parse_args(argv)
    if args.size < 8:
        parser.error(f"--size must be at least 8 pixels, got {args.size}")
    try:
        check_questions_per_image(args.questions_per_image, "--questions-per-image")
    except ValueError as error:
        parser.error(str(error))
    written = write_shards(
        args.out_dir, args.count_per_kind, args.seed, args.split, args.size, args.kinds, args.max_samples_per_shard,
        args.questions_per_image,
    )
    for kind, paths in written.items():
        print(f"{kind}: {args.count_per_kind} samples in {len(paths)} shard(s) under {args.out_dir / kind}")
        for path in paths:
            print(f"  {path}")


if __name__ == "__main__":
    main()
