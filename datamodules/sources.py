"""Shard lists: brace patterns, directories and lists resolved to URLs, and their split over ranks and workers."""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from pathlib import Path

from webdataset.shardlists import expand_urls

REMOTE_PREFIXES = ("pipe:", "http://", "https://", "s3://", "gs://", "ais://")


class ShardListError(ValueError):
    """A shard pattern names nothing usable; the message quotes the pattern and what went wrong."""


def resolve_shards(spec: str | Sequence[str], source: str = "source") -> list[str]:
    """All shard URLs named by ``spec``, in order; local shards must exist.

    ``spec`` is a brace pattern (``gen-{000000..000009}.tar``, expanded by webdataset), a glob (``gen-*.tar``), a
    directory (its ``*.tar`` files, sorted), a single shard, a remote URL (``pipe:``, ``http(s)://``, ``s3://``;
    not checked), or a list of any of these.
    """
    if isinstance(spec, (str, os.PathLike)):
        specs = [os.fspath(spec)]
    else:
        specs = [os.fspath(item) for item in spec]
    if not specs or all(not item.strip() for item in specs):
        raise ShardListError(f"{source}: the shard list is empty; give a brace pattern, a directory or shard paths")
    urls: list[str] = []
    for item in specs:
        urls += _resolve_one(item.strip(), source)
    return urls


def _resolve_one(pattern: str, source: str) -> list[str]:
    if pattern.startswith(REMOTE_PREFIXES):
        return expand_urls(pattern)
    path = Path(pattern)
    if path.is_dir():
        found = sorted(str(p) for p in path.glob("*.tar"))
        if not found:
            raise ShardListError(f"{source}: directory {pattern!r} holds no .tar shards")
        return found
    if any(char in pattern for char in "*?["):
        found = sorted(glob.glob(pattern))
        if not found:
            raise ShardListError(f"{source}: glob {pattern!r} matches no files")
        return found
    expanded = expand_urls(pattern) if "{" in pattern else [pattern]
    missing = [url for url in expanded if not Path(url).is_file()]
    if missing:
        shown = ", ".join(repr(url) for url in missing[:3])
        if len(missing) > 3:
            shown += f" and {len(missing) - 3} more"
        raise ShardListError(f"{source}: pattern {pattern!r} names {len(missing)} missing shard(s): {shown}")
    return expanded


def split_shards(
    urls: Sequence[str], rank: int, world_size: int, worker: int, num_workers: int, source: str
) -> list[str]:
    """The shards one (rank, worker) reads in ``split`` mode: every ``world_size * num_workers``-th, disjoint.

    Fails when there are fewer shards than readers, since some reader would get none (and ranks could not yield the
    same number of batches); the message says how to fix it.
    """
    readers = world_size * num_workers
    if len(urls) < readers:
        raise ShardListError(
            f"{source}: {len(urls)} shard(s) cannot be split over {world_size} rank(s) x {num_workers} worker(s) = "
            f"{readers} readers; write more (smaller) shards, use fewer workers, or set "
            "data.shard_sampling='resampled'"
        )
    return list(urls[rank * num_workers + worker :: readers])
