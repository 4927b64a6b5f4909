"""Writing samples into WebDataset shards, and reading a shard back into ``Sample`` objects.

A shard is a plain ``.tar``; one sample is the group of members sharing a key: ``<key>.json`` (``Sample.to_json``)
and one member per image, ``<key>.<member name>`` (``<key>.target.png``, ``<key>.input_0.png``, ...). WebDataset
splits a member name at the first dot of its basename, so keys may not contain dots or slashes.

``ShardWriter`` rolls over to a new shard (``<prefix>-000000.tar``, ``<prefix>-000001.tar``, ...) when either the
sample or the byte limit would be exceeded, and writes each shard under a temporary name that is renamed only when
the shard is closed cleanly, so a reader never sees a half-written shard. If the ``with`` block raises, the shard
in progress is discarded and the shards already closed remain.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

from PIL import Image

from datamodules.schema import Sample, SampleError

KEY_PATTERN = re.compile(r"^[A-Za-z0-9_\-]+$")  # no dots (WebDataset splits there) and no slashes
IMAGE_FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}


def encode_image(image: Image.Image, member_name: str) -> bytes:
    """Encode ``image`` in the format named by the extension of ``member_name`` (lossless PNG by convention)."""
    extension = member_name.rsplit(".", 1)[-1].lower()
    if extension not in IMAGE_FORMATS:
        raise SampleError(f"image member {member_name!r}: extension must be one of {sorted(IMAGE_FORMATS)}")
    image_format = IMAGE_FORMATS[extension]
    if image_format == "JPEG" and image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    buffer = io.BytesIO()
    options = {"quality": 95} if image_format in ("JPEG", "WEBP") else {}
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


def encode_sample(sample: Sample) -> dict[str, bytes]:
    """Validate ``sample`` and return its tar members as ``{member suffix: bytes}`` (``json`` first)."""
    if not isinstance(sample.key, str) or not KEY_PATTERN.match(sample.key):
        raise SampleError(f"sample key {sample.key!r} must be non-empty and use only letters, digits, '_' and '-'")
    sample.validate()
    members = {"json": json.dumps(sample.to_json(), ensure_ascii=False, sort_keys=True).encode("utf-8")}
    for name, image in sample.images.items():
        if not isinstance(image, Image.Image):
            raise SampleError(f"sample {sample.key!r}: image {name!r} is a {type(image).__name__}, not a PIL image")
        members[name] = encode_image(image, name)
    return members


class ShardWriter:
    """Write validated samples into numbered ``.tar`` shards in ``directory``.

    Use as a context manager; ``paths`` lists the shards closed so far, in order, and ``shard_sample_counts`` the
    number of samples in each. ``first_shard`` numbers the first shard (``<prefix>-<first_shard:06d>.tar``), so that
    several writers can fill one directory with consecutive shards.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        prefix: str = "shard",
        max_samples: int = 1000,
        max_bytes: int = 256 * 2**20,
        first_shard: int = 0,
    ) -> None:
        if max_samples < 1:
            raise ValueError(f"max_samples must be >= 1, got {max_samples}")
        if first_shard < 0:
            raise ValueError(f"first_shard must be >= 0, got {first_shard}")
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
        if not prefix or "/" in prefix or "." in prefix:
            raise ValueError(f"prefix {prefix!r} must be non-empty without '/' or '.'")
        self.directory = Path(directory)
        self.prefix = prefix
        self.max_samples = max_samples
        self.max_bytes = max_bytes
        self.first_shard = first_shard
        self.paths: list[Path] = []
        self.shard_sample_counts: list[int] = []
        self.samples_written = 0
        self._keys: set[str] = set()
        self._tar: tarfile.TarFile | None = None
        self._temporary_path: Path | None = None
        self._shard_samples = 0
        self._shard_bytes = 0

    def __enter__(self) -> ShardWriter:
        self.directory.mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self._discard()

    def write(self, sample: Sample) -> None:
        """Validate and append one sample, starting a new shard first if a limit would be exceeded."""
        members = encode_sample(sample)
        if sample.key in self._keys:
            raise SampleError(f"sample key {sample.key!r} was already written by this writer; keys must be unique")
        size = sum(_tar_member_size(len(data)) for data in members.values())
        if self._tar is not None and (
            self._shard_samples >= self.max_samples or self._shard_bytes + size > self.max_bytes
        ):
            self._finish_shard()
        if self._tar is None:
            self._start_shard()
        assert self._tar is not None
        for suffix, data in members.items():
            info = tarfile.TarInfo(f"{sample.key}.{suffix}")
            info.size = len(data)
            info.mtime = 0  # reproducible shards: the same samples give the same bytes
            info.mode = 0o444
            self._tar.addfile(info, io.BytesIO(data))
        self._keys.add(sample.key)
        self._shard_samples += 1
        self._shard_bytes += size
        self.samples_written += 1

    def close(self) -> None:
        """Finish the shard in progress (if any); safe to call twice."""
        if self._tar is not None:
            self._finish_shard()

    def _start_shard(self) -> None:
        final = self.directory / f"{self.prefix}-{self.first_shard + len(self.paths):06d}.tar"
        self._temporary_path = final.with_name(f".{final.name}.{os.getpid()}.partial")
        self._tar = tarfile.open(self._temporary_path, "w", format=tarfile.USTAR_FORMAT)
        self._shard_samples = 0
        self._shard_bytes = 0

    def _finish_shard(self) -> None:
        assert self._tar is not None and self._temporary_path is not None
        self._tar.close()
        final = self.directory / f"{self.prefix}-{self.first_shard + len(self.paths):06d}.tar"
        os.replace(self._temporary_path, final)
        self.paths.append(final)
        self.shard_sample_counts.append(self._shard_samples)
        self._tar = None
        self._temporary_path = None

    def _discard(self) -> None:
        if self._tar is not None:
            self._tar.close()
        if self._temporary_path is not None:
            self._temporary_path.unlink(missing_ok=True)
        self._tar = None
        self._temporary_path = None


def _tar_member_size(data_size: int) -> int:
    """Bytes one member takes in a tar: a 512-byte header plus the data rounded up to 512."""
    return 512 + (data_size + 511) // 512 * 512


def read_shard(path: str | os.PathLike[str]) -> Iterator[Sample]:
    """Yield the samples of one shard as ``Sample`` objects (images decoded and loaded), in stored order."""
    groups: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path, "r") as tar:
        for info in tar:
            if not info.isfile():
                continue
            key, _, suffix = Path(info.name).name.partition(".")
            file = tar.extractfile(info)
            assert file is not None
            groups.setdefault(key, {})[suffix] = file.read()
    for key, members in groups.items():
        yield decode_sample(key, members, source=str(path))


def decode_sample(key: str, members: dict[str, bytes], source: str = "<memory>") -> Sample:
    """Rebuild a ``Sample`` from its raw members; raise ``SampleError`` naming ``source`` and ``key`` when broken."""
    where = f"{source}: sample {key!r}"
    if "json" not in members:
        raise SampleError(f"{where}: no 'json' member (members: {sorted(members)})")
    try:
        doc = json.loads(members["json"].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SampleError(f"{where}: 'json' member is not valid JSON ({error})") from error
    if not isinstance(doc, dict):
        raise SampleError(f"{where}: 'json' member must be an object, got {type(doc).__name__}")
    for field_name in ("kind", "messages", "images"):
        if field_name not in doc:
            raise SampleError(f"{where}: missing field {field_name!r} in the json member")
    images: dict[str, Image.Image] = {}
    for name in doc["images"]:
        if name not in members:
            raise SampleError(f"{where}: image member {name!r} named in 'images' is missing from the shard")
        try:
            image = Image.open(io.BytesIO(members[name]))
            image.load()
        except Exception as error:  # PIL raises many types for broken data
            raise SampleError(f"{where}: image member {name!r} does not decode as an image ({error})") from error
        images[name] = image
    sample = Sample(
        key=key,
        kind=doc["kind"],
        messages=doc["messages"],
        images=images,
        metadata=doc.get("metadata", {}),
        chosen=doc.get("chosen"),
        rejected=doc.get("rejected"),
    )
    try:
        sample.validate()
    except SampleError as error:
        raise SampleError(f"{source}: {error}") from error
    return sample
