"""Reading shards robustly: tar members grouped into samples, decoded and validated; every bad sample is skipped,
counted and logged with its shard and key, and too many skips stop the run.

What counts as a skip (one per sample, plus one per shard that cannot be read to its end):
* a shard that cannot be opened, or whose tar data ends early (truncated file);
* a corrupt tar member header: tar cannot find the next member, so the rest of that shard is lost (counted once),
  and the sample that lost the member is incomplete;
* a missing or malformed ``json`` member, a missing field, an unknown kind, a schema violation;
* an image member that does not decode;
* a sample the pipeline cannot encode (too long, a kind the current mode does not use, ...), reported by the caller.

``SkipTracker`` raises ``DataQualityError`` once ``skipped > max_skip_fraction * read`` after at least
``min_samples`` reads in this worker (or at the end of a finite stream), naming the last skip.
"""

from __future__ import annotations

import logging
import tarfile
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from webdataset import gopen
from webdataset.tariterators import group_by_keys

from datamodules.schema import Sample, SampleError
from datamodules.shards import decode_sample
from datamodules.shared_state import SharedCounters

logger = logging.getLogger(__name__)

STAT_COLUMNS = ("read", "skipped")


class DataQualityError(RuntimeError):
    """Too large a share of the samples was skipped; the message gives the counts and the last reason."""


class SkipTracker:
    """Counts reads and skips of one reader (a worker of one rank) and enforces the maximum skip fraction."""

    def __init__(
        self,
        where: str,
        max_skip_fraction: float,
        min_samples: int,
        counters: SharedCounters | None = None,
        row: int = 0,
    ) -> None:
        self.where = where
        self.max_skip_fraction = max_skip_fraction
        self.min_samples = min_samples
        self.counters = counters
        self.row = row
        self.read = 0
        self.skipped = 0
        self.last_reason = ""

    def count_read(self) -> None:
        self.read += 1
        if self.counters is not None:
            self.counters.add(self.row, "read")

    def skip(self, shard: str, key: str | None, reason: str, already_read: bool = False) -> None:
        """Record one skipped sample (counted as read unless ``already_read``) and fail if the fraction is now over
        the limit."""
        if not already_read:
            self.count_read()
        self.skipped += 1
        if self.counters is not None:
            self.counters.add(self.row, "skipped")
        self.last_reason = f"shard {shard!r} key {key!r}: {reason}"
        logger.warning("%s: skipped sample (%s)", self.where, self.last_reason)
        if self.read >= self.min_samples:
            self.check()

    def check(self) -> None:
        """Raise ``DataQualityError`` when more than ``max_skip_fraction`` of the samples read were skipped."""
        if self.read and self.skipped > self.max_skip_fraction * self.read:
            raise DataQualityError(
                f"{self.where}: skipped {self.skipped} of {self.read} samples "
                f"({self.skipped / self.read:.1%} > max_skip_fraction={self.max_skip_fraction}); "
                f"last: {self.last_reason}"
            )


def _sample_key(member_name: str | None) -> str | None:
    return None if member_name is None else member_name.rsplit("/", 1)[-1].split(".", 1)[0]


def _has_trailing_data(tar_stream: Any) -> bool:
    """Whether anything but zero padding follows the point where tarfile stopped: a corrupt member header makes
    tarfile end the archive early without an error."""
    while True:
        chunk = tar_stream.read(1 << 16)
        if not chunk:
            return False
        if chunk.count(0) != len(chunk):
            return True


def iter_tar_members(url: str, tracker: SkipTracker) -> Iterator[dict[str, Any]]:
    """The regular files of one shard as webdataset file samples, then an end-of-shard marker ``{}``."""
    last_member = None
    try:
        stream = gopen(url, "rb")
    except Exception as error:  # gopen raises whatever the URL scheme's opener raises
        tracker.skip(url, None, f"cannot open shard ({error})")
        return
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for info in tar:
                if not info.isreg():
                    continue
                member = tar.extractfile(info)
                assert member is not None
                data = member.read()
                last_member = info.name
                yield {"fname": info.name, "data": data, "__url__": url}
            if _has_trailing_data(tar.fileobj):
                reason = f"corrupt tar header after member {last_member!r}; rest of shard lost"
                tracker.skip(url, _sample_key(last_member), reason)
    except (tarfile.TarError, OSError, EOFError) as error:
        reason = f"tar data unreadable after member {last_member!r} ({error}); rest of shard lost"
        tracker.skip(url, _sample_key(last_member), reason)
    finally:
        stream.close()
    yield {}


def iter_raw_samples(urls: Iterable[str], tracker: SkipTracker) -> Iterator[dict[str, Any]]:
    """Raw samples (``__key__``, ``__url__`` and one entry per member suffix) from a stream of shard URLs."""

    def on_error(error: Exception) -> bool:
        tracker.skip(str(error.args[-1]) if error.args else "?", None, f"cannot group members ({error.args[0]})")
        return True

    for url in urls:
        yield from group_by_keys(iter_tar_members(url, tracker), handler=on_error)


def decode_samples(
    raw_samples: Iterable[dict[str, Any]],
    tracker: SkipTracker,
    accept: Callable[[Sample], str | None] = lambda sample: None,
) -> Iterator[tuple[str, Sample]]:
    """Decode and validate raw samples into ``(shard url, sample)``; ``accept`` returns a reason to skip a valid
    sample, or None to keep it."""
    for raw in raw_samples:
        key, url = raw.get("__key__", "?"), raw.get("__url__", "?")
        members = {name: value for name, value in raw.items() if not name.startswith("__")}
        try:
            sample = decode_sample(key.rsplit("/", 1)[-1], members, source=url)
        except SampleError as error:
            tracker.skip(url, key, str(error))
            continue
        reason = accept(sample)
        if reason is not None:
            tracker.skip(url, key, reason)
            continue
        tracker.count_read()
        yield url, sample
