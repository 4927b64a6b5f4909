"""Format-independent checkpoint machinery.

* ``KeyMap``: an ordered table of regex rename rules (plus keys to drop) that turns upstream parameter names into
  ours. Tables live next to the format they describe (``infinity.py``, ``bsq_vae.py``, ...).
* ``compare_state_dict`` / ``load_state_dict_strict``: every missing key, unexpected key and shape mismatch is
  reported, and loading fails unless the caller names (by regex) what may be missing or extra.
* ``load_torch_file``: ``torch.load`` with ``weights_only=True`` only, with clear errors for a missing file or entry.
* ``write_safetensors_folder`` / ``iter_safetensors_folder``: sharded safetensors in the Hugging Face layout
  (``model.safetensors`` or ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``), written
  atomically and read back shard by shard so a large model never sits in memory twice.
* ``weights_digest``: sha256 over a folder's weight files, to tie a cache to the weights it was made with.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

SAFETENSORS_INDEX = "model.safetensors.index.json"
SINGLE_SAFETENSORS = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint is missing, malformed, or does not match the module it is loaded into."""


Replacement = str | Callable[[re.Match[str]], str]


@dataclass(frozen=True)
class Rename:
    """Rename keys that fully match ``pattern``; ``replacement`` is a ``re`` template or a function of the match.

    ``transform`` optionally changes the tensor on the way (e.g. taking one row of an embedding table).
    """

    pattern: str
    replacement: Replacement
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None

    def apply(self, key: str) -> str | None:
        match = re.fullmatch(self.pattern, key)
        if match is None:
            return None
        if callable(self.replacement):
            return self.replacement(match)
        return match.expand(self.replacement)


@dataclass(frozen=True)
class KeyMap:
    """An ordered rename table: the first matching rule wins; keys matching ``drop`` are discarded on purpose."""

    rules: tuple[Rename, ...]
    drop: tuple[str, ...] = ()
    name: str = "checkpoint"

    def target(self, key: str) -> tuple[str, Rename] | None:
        """The new name of ``key`` and the rule that produced it, or None when no rule matches."""
        for rule in self.rules:
            new = rule.apply(key)
            if new is not None:
                return new, rule
        return None

    def is_dropped(self, key: str) -> bool:
        return any(re.fullmatch(pattern, key) for pattern in self.drop)

    def map_names(self, keys: Iterable[str]) -> tuple[dict[str, str], list[str], list[str]]:
        """Map names only: (source -> target, dropped source keys, unmatched source keys)."""
        mapping: dict[str, str] = {}
        seen_targets: dict[str, str] = {}
        dropped: list[str] = []
        unmatched: list[str] = []
        for key in keys:
            if self.is_dropped(key):
                dropped.append(key)
                continue
            found = self.target(key)
            if found is None:
                unmatched.append(key)
                continue
            new = found[0]
            if new in seen_targets:
                raise CheckpointError(
                    f"{self.name} key map sends both {seen_targets[new]!r} and {key!r} to {new!r}"
                )
            seen_targets[new] = key
            mapping[key] = new
        return mapping, dropped, unmatched

    def apply(self, state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
        """Rename (and transform) a state dict: (mapped state dict, dropped keys, unmatched keys)."""
        mapping, dropped, unmatched = self.map_names(state_dict.keys())
        out: dict[str, torch.Tensor] = {}
        for key, new in mapping.items():
            _, rule = self.target(key)  # type: ignore[misc]
            tensor = state_dict[key]
            out[new] = rule.transform(tensor) if rule.transform is not None else tensor
        return out, dropped, unmatched


@dataclass
class LoadReport:
    """What a load found: keys the module expected but did not get, keys given but not expected, shape mismatches."""

    source: str
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    loaded: int = 0

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def describe(self, limit: int = 20) -> str:
        def listing(title: str, items: list) -> str:
            shown = "\n".join(f"    {item}" for item in items[:limit])
            more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
            return f"  {title} ({len(items)}):\n{shown}{more}"

        parts = [f"loading {self.source}: {self.loaded} tensors matched"]
        if self.missing:
            parts.append(listing("missing from the checkpoint", self.missing))
        if self.unexpected:
            parts.append(listing("unexpected in the checkpoint", self.unexpected))
        if self.mismatched:
            rows = [f"{name}: checkpoint {tuple(got)} vs module {tuple(want)}" for name, got, want in self.mismatched]
            parts.append(listing("shape mismatches", rows))
        return "\n".join(parts)


def _matches_any(key: str, patterns: Iterable[str]) -> bool:
    return any(re.fullmatch(pattern, key) for pattern in patterns)


def compare_state_dict(
    expected: Mapping[str, tuple[int, ...]],
    provided: Mapping[str, tuple[int, ...]],
    source: str,
    allow_missing: Iterable[str] = (),
    allow_unexpected: Iterable[str] = (),
) -> LoadReport:
    """Compare names and shapes; keys matching the ``allow_*`` regexes are not reported."""
    allow_missing, allow_unexpected = tuple(allow_missing), tuple(allow_unexpected)
    report = LoadReport(source=source)
    for name, shape in provided.items():
        if name not in expected:
            if not _matches_any(name, allow_unexpected):
                report.unexpected.append(name)
        elif tuple(shape) != tuple(expected[name]):
            report.mismatched.append((name, tuple(shape), tuple(expected[name])))
        else:
            report.loaded += 1
    report.missing = [n for n in expected if n not in provided and not _matches_any(n, allow_missing)]
    return report


def load_state_dict_strict(
    module: torch.nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    source: str,
    allow_missing: Iterable[str] = (),
    allow_unexpected: Iterable[str] = (),
    assign: bool = False,
) -> LoadReport:
    """Load ``state_dict`` into ``module`` and fail with a full report on any mismatch not explicitly allowed.

    ``allow_missing`` / ``allow_unexpected`` are regexes over our (already mapped) names. ``assign=True`` replaces
    the module's tensors instead of copying into them (needed when the module lives on the meta device).
    """
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    provided = {k: tuple(v.shape) for k, v in state_dict.items()}
    report = compare_state_dict(expected, provided, source, allow_missing, allow_unexpected)
    if not report.ok:
        raise CheckpointError(report.describe())
    loadable = {k: v for k, v in state_dict.items() if k in expected}
    module.load_state_dict(loadable, strict=False, assign=assign)
    return report


def load_torch_file(path: str | os.PathLike, entry: str | None = None) -> dict[str, torch.Tensor]:
    """Read a ``.pth``/``.pt`` state dict with ``weights_only=True``; ``entry`` selects a nested dict ("a.b")."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # torch raises several types for unreadable or unsafe pickles
        raise CheckpointError(f"cannot read {path} as a weights-only torch checkpoint: {error}") from error
    if entry:
        for part in entry.split("."):
            if not isinstance(obj, Mapping) or part not in obj:
                keys = sorted(obj.keys())[:20] if isinstance(obj, Mapping) else type(obj).__name__
                raise CheckpointError(f"{path} has no entry {part!r} (of {entry!r}); top-level keys: {keys}")
            obj = obj[part]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}{'[' + entry + ']' if entry else ''} is not a flat name -> tensor state dict")
    return dict(obj)


def _shard_state_dict(state_dict: Mapping[str, torch.Tensor], max_shard_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state_dict.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        # safetensors refuses tensors that share storage (tied weights) or are non-contiguous views
        shards[-1][name] = tensor.detach().to("cpu").contiguous().clone()
        size += nbytes
    return shards


def write_safetensors_folder(
    state_dict: Mapping[str, torch.Tensor],
    folder: str | os.PathLike,
    max_shard_bytes: int = 5 * 1024**3,
    extra_files: Mapping[str, str] | None = None,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write ``state_dict`` (and small text files such as ``config.json``) into ``folder`` atomically.

    Everything is written into a temporary sibling folder first and renamed into place, so a crash never leaves a
    half-written export behind and an existing export is replaced only once the new one is complete.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        shards = _shard_state_dict(state_dict, max_shard_bytes)
        meta = {"format": "pt", **(metadata or {})}
        if len(shards) == 1:
            save_file(shards[0], staging / SINGLE_SAFETENSORS, metadata=meta)
        else:
            weight_map: dict[str, str] = {}
            total = 0
            for index, shard in enumerate(shards, start=1):
                filename = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, staging / filename, metadata=meta)
                for name, tensor in shard.items():
                    weight_map[name] = filename
                    total += tensor.numel() * tensor.element_size()
            index_doc = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (staging / SAFETENSORS_INDEX).write_text(json.dumps(index_doc, indent=2))
        for filename, text in (extra_files or {}).items():
            (staging / filename).write_text(text)
        backup = None
        if folder.exists():
            backup = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            folder.rename(backup)
        staging.rename(folder)
        if backup is not None:
            shutil.rmtree(backup)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def safetensors_files(folder: str | os.PathLike) -> list[Path]:
    """The shard files of an export folder, in index order; a clear error when there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"weights folder not found: {folder}")
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as error:
            raise CheckpointError(f"{index} is not a safetensors index (needs a 'weight_map'): {error}") from error
        files = [folder / name for name in dict.fromkeys(weight_map.values())]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} names shard files that do not exist: {missing}")
        return files
    if (folder / SINGLE_SAFETENSORS).is_file():
        return [folder / SINGLE_SAFETENSORS]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors files in {folder}")
    return files


def iter_safetensors_folder(folder: str | os.PathLike) -> Iterator[dict[str, torch.Tensor]]:
    """Yield one shard's tensors at a time (memory-mapped), so callers can map and load shard by shard."""
    from safetensors.torch import load_file

    for path in safetensors_files(folder):
        yield load_file(path)


def read_safetensors_folder(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of an export folder in one dict (for small models and tests)."""
    out: dict[str, torch.Tensor] = {}
    for shard in iter_safetensors_folder(folder):
        out.update(shard)
    return out


def weights_digest(folder: str | os.PathLike[str], extra: Iterable[str] = ()) -> str:
    """sha256 over the weight files of ``folder`` (``*.safetensors`` and ``*.bin``, in name order), then the files
    named in ``extra`` that it has (e.g. ``config.json``): what a cache made from these weights is valid for."""
    folder = Path(folder)
    files = sorted([*folder.glob("*.safetensors"), *folder.glob("*.bin")])
    files += [folder / name for name in extra if (folder / name).is_file()]
    digest = hashlib.sha256()
    for path in files:
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()
