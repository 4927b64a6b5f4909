"""GenEval end to end around the rule engine: metadata, the official folder layout, generation through the
``ImageGenerator`` protocol, scoring a folder with a detector and colour classifier, and the results file.

Folder layout (djghosh13/geneval, evaluation.md §1.2)::

    <folder>/<index:05d>/metadata.jsonl      the index-th metadata object (one JSON object)
    <folder>/<index:05d>/samples/<k:05d>.png  sample k (any ``\\d+.png`` or ``\\d+.jpg`` is read)

Folders whose name is not all digits are not prompts; they are listed as skipped. ``results.jsonl`` has the
columns of the official ``evaluate_images.py`` output, so its ``summary_scores.py`` reads it unchanged.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image, ImageOps
from tqdm import tqdm

from vargpt.eval.geneval_rules import (
    ColourClassifier,
    Detection,
    GenEvalMetadataError,
    GenEvalOptions,
    score_detections,
    summarize,
    validate_metadata,
)
from vargpt.eval.jsonl import JsonlError, read_jsonl, write_jsonl
from vargpt.eval.protocols import ImageGenerator
from vargpt.eval.report import Report

METADATA_FILENAME = "metadata.jsonl"
SAMPLES_DIRNAME = "samples"
SAMPLES_PER_PROMPT = 4  # generation/diffusers_generate.py --n_samples 4 (2,212 images for 553 prompts)
BASE_SEED = 42  # the official generation script calls seed_everything(42)
SAMPLE_PATTERN = re.compile(r"^(\d+)\.(png|jpg)$")
RESULTS_FILENAME = "results.jsonl"


class GenEvalFolderError(ValueError):
    """A GenEval image folder does not follow the official layout; the message names the path."""


def read_metadata(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The prompts of ``evaluation_metadata.jsonl``; a malformed line raises an error with its line number."""
    records = read_jsonl(path)
    for number, record in enumerate(records, start=1):
        try:
            validate_metadata(record)
        except GenEvalMetadataError as error:
            raise JsonlError(f"{path}:{number}: {error}") from error
        if not isinstance(record.get("prompt"), str) or not record["prompt"].strip():
            raise JsonlError(f"{path}:{number}: metadata needs a non-empty string 'prompt'")
    if not records:
        raise JsonlError(f"{path}: no metadata lines")
    return records


def read_rewritten_prompts(path: str | os.PathLike, metadata: Sequence[Mapping[str, Any]]) -> list[str]:
    """The rewritten prompt of every metadata line, from a JSON object ``{original prompt: rewritten prompt}``
    (the shape of Infinity's rewrite cache). Every original prompt must have a non-empty rewrite."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"rewritten-prompt file not found: {path}")
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error.msg} at line {error.lineno})") from error
    if not isinstance(table, dict):
        raise ValueError(f"{path}: expected a JSON object mapping original prompts to rewritten prompts")
    missing = [record["prompt"] for record in metadata if not isinstance(table.get(record["prompt"]), str)]
    if missing:
        raise ValueError(f"{path}: no rewrite for {len(missing)} prompt(s), e.g. {missing[:3]}")
    return [table[record["prompt"]] for record in metadata]


def sample_seed(prompt_index: int, sample_index: int, base_seed: int = BASE_SEED) -> int:
    """A 31-bit seed that depends only on (base seed, prompt index, sample index), so any subset of the images
    can be regenerated identically, in any order, on any machine."""
    digest = hashlib.sha256(f"geneval/{base_seed}/{prompt_index}/{sample_index}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def write_geneval_samples(
    generator: ImageGenerator,
    metadata: Sequence[Mapping[str, Any]],
    out_dir: str | os.PathLike,
    samples_per_prompt: int = SAMPLES_PER_PROMPT,
    base_seed: int = BASE_SEED,
    prompts: Sequence[str] | None = None,
    progress: bool = True,
) -> dict[str, int]:
    """Generate the missing samples of every prompt into the official layout; existing samples are kept.

    ``prompts`` replaces the text sent to the generator (e.g. rewritten prompts); the metadata keeps the original
    prompt and records the replacement as ``generation_prompt``. Returns counts of generated and reused images.
    """
    if prompts is not None and len(prompts) != len(metadata):
        raise ValueError(f"got {len(prompts)} generation prompts for {len(metadata)} metadata lines")
    out_dir = Path(out_dir)
    counts = {"generated": 0, "reused": 0}
    for index, record in enumerate(tqdm(metadata, desc="geneval generate", disable=not progress)):
        folder = out_dir / f"{index:05d}"
        samples = folder / SAMPLES_DIRNAME
        samples.mkdir(parents=True, exist_ok=True)
        entry = dict(record)
        text = record["prompt"] if prompts is None else prompts[index]
        if text != record["prompt"]:
            entry["generation_prompt"] = text
        (folder / METADATA_FILENAME).write_text(json.dumps(entry), encoding="utf-8")
        missing = [k for k in range(samples_per_prompt) if not (samples / f"{k:05d}.png").is_file()]
        counts["reused"] += samples_per_prompt - len(missing)
        if not missing:
            continue
        images = generator.generate_images([text] * len(missing), [sample_seed(index, k, base_seed) for k in missing])
        if len(images) != len(missing):
            raise ValueError(f"the generator returned {len(images)} images for {len(missing)} requests")
        for k, image in zip(missing, images, strict=True):
            image.save(samples / f"{k:05d}.png")
        counts["generated"] += len(missing)
    return counts


@dataclass(frozen=True)
class GenEvalImage:
    """One image of a GenEval folder with the metadata of its prompt."""

    path: Path
    prompt_index: int
    metadata: dict[str, Any]


@dataclass
class GenEvalListing:
    """The images of a folder, and every entry that was not read as an image (so nothing goes uncounted)."""

    images: list[GenEvalImage]
    prompts: int
    skipped: list[str] = field(default_factory=list)


def list_geneval_images(folder: str | os.PathLike) -> GenEvalListing:
    """Read the official layout; a prompt folder without valid metadata or without samples is an error."""
    root = Path(folder)
    if not root.is_dir():
        raise GenEvalFolderError(f"GenEval image folder not found: {root}")
    images: list[GenEvalImage] = []
    skipped: list[str] = []
    prompts = 0
    for entry in sorted(root.iterdir()):
        if not (entry.is_dir() and entry.name.isdigit()):
            skipped.append(entry.name)
            continue
        metadata = _read_folder_metadata(entry / METADATA_FILENAME)
        samples = entry / SAMPLES_DIRNAME
        if not samples.is_dir():
            raise GenEvalFolderError(f"{entry} has no '{SAMPLES_DIRNAME}' folder")
        found = 0
        for sample in sorted(samples.iterdir()):
            if SAMPLE_PATTERN.match(sample.name):
                images.append(GenEvalImage(sample, int(entry.name), metadata))
                found += 1
            else:
                skipped.append(str(sample.relative_to(root)))
        if not found:
            raise GenEvalFolderError(f"{samples} holds no images named <digits>.png or <digits>.jpg")
        prompts += 1
    if not images:
        raise GenEvalFolderError(f"{root} holds no prompt folders named <index:05d> with samples")
    return GenEvalListing(images=images, prompts=prompts, skipped=skipped)


def _read_folder_metadata(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise GenEvalFolderError(f"missing {path}")
    try:
        metadata = json.loads(path.read_text(encoding="utf-8"))
        validate_metadata(metadata)
    except (json.JSONDecodeError, GenEvalMetadataError) as error:
        raise GenEvalFolderError(f"{path}: {error}") from error
    return metadata


def records_rewrites(listing: GenEvalListing) -> bool:
    """Whether the folder records generation prompts that differ from the metadata prompts (folders written by
    ``write_geneval_samples`` from rewritten prompts do; other tools' folders record nothing). A folder where only
    some prompts were rewritten is an error: original and rewritten prompts are never mixed in one score."""
    rewritten = {
        "generation_prompt" in image.metadata and image.metadata["generation_prompt"] != image.metadata["prompt"]
        for image in listing.images
    }
    if len(rewritten) > 1:
        raise GenEvalFolderError("the folder mixes images generated from original and from rewritten prompts")
    return rewritten.pop()


class Detector(Protocol):
    """What scoring needs from a detector: per-class candidates for one image, and what they depend on."""

    def detect(self, image: Image.Image) -> dict[str, list[Detection]]: ...

    def identity(self) -> dict[str, Any]: ...


class DetectionCache:
    """Per-image detections (boxes, scores, bit-packed masks) in ``.npz`` files, keyed by the image bytes and the
    detector identity, so an interrupted or sharded run resumes without detecting an image twice."""

    def __init__(self, folder: str | os.PathLike, detector_identity: Mapping[str, Any]) -> None:
        self.folder = Path(folder)
        self.detector_key = json.dumps(dict(detector_identity), sort_keys=True)

    def _entry(self, image: GenEvalImage) -> Path:
        return self.folder / f"{image.prompt_index:05d}" / f"{image.path.stem}.npz"

    def _key(self, image_bytes: bytes) -> str:
        return hashlib.sha256(self.detector_key.encode() + hashlib.sha256(image_bytes).digest()).hexdigest()

    def load(self, image: GenEvalImage, image_bytes: bytes) -> dict[str, list[Detection]] | None:
        """The cached detections of ``image``, or None if absent or made from other bytes / another detector."""
        entry = self._entry(image)
        if not entry.is_file():
            return None
        with np.load(entry, allow_pickle=False) as stored:
            if str(stored["key"]) != self._key(image_bytes):
                return None
            height, width = (int(v) for v in stored["mask_shape"])
            masks = np.unpackbits(stored["masks"], axis=1, count=height * width).reshape(-1, height, width)
            detections: dict[str, list[Detection]] = {}
            rows = zip(stored["boxes"], stored["scores"], stored["labels"], masks, stored["has_mask"], strict=True)
            for box, score, label, mask, has_mask in rows:
                name = str(label)
                detections.setdefault(name, []).append(
                    Detection(
                        box=tuple(float(v) for v in box),
                        score=float(score),
                        mask=mask.astype(bool) if has_mask else None,
                        label=name,
                    )
                )
        return detections

    def save(
        self,
        image: GenEvalImage,
        image_bytes: bytes,
        size: tuple[int, int],
        detections: Mapping[str, Sequence[Detection]],
    ) -> None:
        """Store ``detections`` of an image of ``size`` (W, H); masks are required (the detector returns them)."""
        flat = [detection for candidates in detections.values() for detection in candidates]
        width, height = size
        masks = np.zeros((len(flat), height * width), dtype=bool)
        for row, detection in enumerate(flat):
            if detection.mask is not None:
                masks[row] = np.asarray(detection.mask, dtype=bool).reshape(-1)
        entry = self._entry(image)
        entry.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        np.savez_compressed(
            buffer,
            key=np.array(self._key(image_bytes)),
            boxes=np.array([d.box for d in flat], dtype=np.float64).reshape(-1, 4),
            scores=np.array([d.score for d in flat], dtype=np.float64),
            labels=np.array([name for name, candidates in detections.items() for _ in candidates], dtype=str),
            masks=np.packbits(masks, axis=1),
            has_mask=np.array([d.mask is not None for d in flat], dtype=bool),
            mask_shape=np.array([height, width]),
        )
        temporary = entry.with_suffix(".tmp")
        temporary.write_bytes(buffer.getvalue())
        os.replace(temporary, entry)


ColourClassifierFactory = Callable[[Image.Image], ColourClassifier]


@dataclass
class GenEvalRun:
    """Per-image records (official columns), their summary, and what the folder listing skipped."""

    records: list[dict[str, Any]]
    summary: dict[str, Any]
    rewrites_recorded: bool
    skipped: list[str]
    detected: int
    cached: int


def score_geneval_folder(
    images_dir: str | os.PathLike,
    detector: Detector,
    colour_classifier: ColourClassifierFactory,
    out_dir: str | os.PathLike,
    options: GenEvalOptions = GenEvalOptions(),
    shard: tuple[int, int] = (0, 1),
    progress: bool = True,
) -> GenEvalRun:
    """Score every image of a GenEval folder (or shard ``i`` of ``n`` of them) and write ``results.jsonl``.

    ``colour_classifier(image)`` returns the ``(classname, detection) -> colour`` callable for that image.
    Detections are cached under ``out_dir/detections``; records keep the official columns.
    """
    index, count = shard
    if not 0 <= index < count:
        raise ValueError(f"shard must be (i, n) with 0 <= i < n, got {shard}")
    listing = list_geneval_images(images_dir)
    rewrites_recorded = records_rewrites(listing)
    cache = DetectionCache(Path(out_dir) / "detections", detector.identity())
    images = listing.images[index::count]
    records, detected, cached, expected_size = [], 0, 0, None
    for item in tqdm(images, desc="geneval score", disable=not progress):
        image_bytes = item.path.read_bytes()
        image = ImageOps.exif_transpose(Image.open(io.BytesIO(image_bytes))).convert("RGB")
        if expected_size is None:
            expected_size = image.size
        elif image.size != expected_size:
            raise GenEvalFolderError(
                f"{item.path} is {image.size[0]}x{image.size[1]} but the folder's images are "
                f"{expected_size[0]}x{expected_size[1]}; one run must hold images of one size"
            )
        detections = cache.load(item, image_bytes)
        if detections is None:
            detections = detector.detect(image)
            cache.save(item, image_bytes, image.size, detections)
            detected += 1
        else:
            cached += 1
        result = score_detections(item.metadata, detections, colour_classifier(image), options)
        records.append(
            {
                "filename": str(item.path),
                "tag": item.metadata["tag"],
                "prompt": item.metadata["prompt"],
                "correct": result.correct,
                "reason": result.reason,
                "metadata": json.dumps(item.metadata),
                "details": json.dumps(result.details),
            }
        )
    name = RESULTS_FILENAME if count == 1 else f"results_shard{index}of{count}.jsonl"
    write_jsonl(Path(out_dir) / name, records)
    return GenEvalRun(records, summarize(records), rewrites_recorded, listing.skipped, detected, cached)


def geneval_report(runs: Mapping[str, GenEvalRun], settings: Mapping[str, Any]) -> Report:
    """One report for one or two runs (``original`` / ``rewritten`` prompts), never mixed in one number."""
    metrics: dict[str, Any] = {}
    details: dict[str, Any] = {}
    for label, run in runs.items():
        summary = run.summary
        metrics[f"{label}/overall"] = summary["overall"]
        for tag, task in summary["tasks"].items():
            metrics[f"{label}/{tag}"] = task["accuracy"]
        metrics[f"{label}/correct_images"] = summary["correct_images"]
        metrics[f"{label}/correct_prompts"] = summary["correct_prompts"]
        metrics[f"{label}/images"] = summary["images"]
        metrics[f"{label}/prompts"] = summary["prompts"]
        details[label] = {
            "summary": summary,
            "rewrites_recorded": run.rewrites_recorded,
            "skipped_entries": run.skipped,
            "detected_images": run.detected,
            "cached_images": run.cached,
        }
    return Report(benchmark="geneval_hf", metrics=metrics, settings=dict(settings), details=details)
