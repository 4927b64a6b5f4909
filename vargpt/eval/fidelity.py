"""FID, KID and Inception Score with torch-fidelity 0.4.0's Inception network and metric code (evaluation.md §3).

* Weights: torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` from a local file, passed through its
  ``feature_extractor_weights_path``; a missing file is an error, never a download. The file is first read with
  ``weights_only=True`` so only a plain state dict is ever handed to torch-fidelity's own ``torch.load``.
* Images: read from folders by our dataset (so sizes are checked and every file is counted), brought to
  ``resolution`` by the chosen ``resize_mode``, then torch-fidelity's network resizes to 299 the TF1 way.
  Modes: ``none`` (every image must already be ``resolution`` square; anything else is an error), ``bicubic``
  (PIL bicubic to ``resolution`` square) and ``center_crop`` (bicubic on the short side, then a centre crop).
* Metrics: torch-fidelity's ``fid_features_to_statistics`` / ``fid_statistics_to_metric``,
  ``kid_features_to_metric`` (poly kernel, 100 subsets of 1000, capped at the set sizes) and
  ``isc_features_to_metric`` (10 splits) on the 2048-d pool features and the unbiased logits.
* Cache: features of a folder are stored as safetensors, keyed by the folder content (relative path, size and
  modification time of every file), resolution, resize mode and the weights' sha256.
* MJHQ-30K: category subfolders of the reference and generated folders are compared per category and overall.

Every number is recorded with ``n_real``, ``n_fake``, ``resolution`` and ``resize_mode``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from vargpt.checkpoints.core import load_torch_file
from vargpt.eval.clip_model import WeightsNotFoundError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")  # torch-fidelity's default ``samples_find_ext``
RESIZE_MODES = ("none", "bicubic", "center_crop")
POOL_FEATURES = "2048"  # FID and KID features (torch-fidelity's default layer for both)
LOGIT_FEATURES = "logits_unbiased"  # Inception Score features (torch-fidelity's default layer)
KID_SUBSETS = 100  # torch-fidelity default ``kid_subsets``
KID_SUBSET_SIZE = 1000  # torch-fidelity default ``kid_subset_size`` (capped at the smaller set's size)
ISC_SPLITS = 10  # torch-fidelity default ``isc_splits``
RNG_SEED = 2020  # torch-fidelity default ``rng_seed``


class ImageSetError(ValueError):
    """A folder of images is empty, unreadable or has images of the wrong size; the message names the file."""


def list_images(folder: str | os.PathLike, recursive: bool = False) -> list[Path]:
    """The image files of ``folder`` (sorted; with ``recursive`` also in subfolders); none found is an error."""
    root = Path(folder)
    if not root.is_dir():
        raise ImageSetError(f"image folder not found: {root}")
    candidates = root.rglob("*") if recursive else root.iterdir()
    paths = sorted(p for p in candidates if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not paths:
        raise ImageSetError(
            f"no {'/'.join(IMAGE_EXTENSIONS)} images in {root}{' or its subfolders' if recursive else ''}"
        )
    return paths


def folder_fingerprint(paths: Sequence[Path], root: Path) -> str:
    """sha256 of the relative path, byte size and modification time of every file: changes when any file does."""
    digest = hashlib.sha256()
    for path in paths:
        stat = path.stat()
        digest.update(f"{path.relative_to(root).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


class ImageFileDataset(Dataset):
    """uint8 (3, R, R) tensors of image files, brought to ``resolution`` by ``resize_mode``."""

    def __init__(self, paths: Sequence[Path], resolution: int, resize_mode: str) -> None:
        if resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {resize_mode!r}")
        if resolution < 1:
            raise ValueError(f"resolution must be a positive number of pixels, got {resolution}")
        self.paths = list(paths)
        self.resolution = resolution
        self.resize_mode = resize_mode

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        path = self.paths[index]
        try:
            image = Image.open(path).convert("RGB")
        except OSError as error:
            raise ImageSetError(f"cannot read image {path}: {error}") from error
        image = self._resized(image, path)
        return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)

    def _resized(self, image: Image.Image, path: Path) -> Image.Image:
        side = self.resolution
        if self.resize_mode == "none":
            if image.size != (side, side):
                raise ImageSetError(
                    f"{path} is {image.width}x{image.height}, expected {side}x{side} "
                    "(pass a resize mode 'bicubic' or 'center_crop' to resize)"
                )
            return image
        if self.resize_mode == "bicubic":
            return image.resize((side, side), Image.Resampling.BICUBIC)
        scale = side / min(image.size)
        width, height = max(side, round(image.width * scale)), max(side, round(image.height * scale))
        image = image.resize((width, height), Image.Resampling.BICUBIC)
        left, top = (width - side) // 2, (height - side) // 2
        return image.crop((left, top, left + side, top + side))


def inspect_resolution(paths: Sequence[Path]) -> int:
    """The common square size of ``paths`` (read from file headers); non-square or mixed sizes are an error."""
    sizes: dict[tuple[int, int], Path] = {}
    for path in paths:
        with Image.open(path) as image:
            sizes.setdefault(image.size, path)
    if len(sizes) != 1 or next(iter(sizes))[0] != next(iter(sizes))[1]:
        found = ", ".join(f"{w}x{h} ({p.name})" for (w, h), p in list(sizes.items())[:4])
        raise ImageSetError(f"images must all be one square size to be used without resizing; found {found}")
    return next(iter(sizes))[0]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class InceptionFeatures:
    """A torch-fidelity feature extractor (a ``FeatureExtractorBase`` providing ``"2048"`` and
    ``"logits_unbiased"``) with a per-folder feature cache. ``from_weights`` builds the real one
    (``inception-v3-compat``) on local weights; ``extractor_id`` names the weights in cache keys (their sha256)."""

    def __init__(
        self,
        extractor: torch.nn.Module,
        extractor_id: str,
        device: str = "cpu",
        batch_size: int = 32,
        num_workers: int = 0,
        cache_dir: str | os.PathLike | None = None,
        progress: bool = True,
    ) -> None:
        self.extractor = extractor.to(device).eval()
        self.extractor_id = extractor_id
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.progress = progress

    @classmethod
    def from_weights(cls, weights_path: str | os.PathLike, device: str = "cpu", **kwargs: Any) -> InceptionFeatures:
        """torch-fidelity's ``inception-v3-compat`` on the local weights file (never downloaded)."""
        from torch_fidelity.utils import create_feature_extractor

        path = Path(weights_path)
        if not path.is_file():
            raise WeightsNotFoundError(
                f"Inception weights file not found: {path} (torch-fidelity's "
                "weights-inception-2015-12-05-6726825d.pth; it is never downloaded)"
            )
        load_torch_file(path)  # refuses anything but a plain tensor state dict before torch-fidelity unpickles it
        extractor = create_feature_extractor(
            "inception-v3-compat",
            [POOL_FEATURES, LOGIT_FEATURES],
            cuda=device == "cuda",
            feature_extractor_weights_path=str(path),
            verbose=False,
        )
        return cls(extractor, file_sha256(path), device=device, **kwargs)

    @torch.no_grad()
    def extract(self, dataset: ImageFileDataset, description: str = "inception") -> dict[str, torch.Tensor]:
        """Pool features (N, 2048) and unbiased logits (N, 1008) of every image of ``dataset``."""
        loader = DataLoader(dataset, batch_size=self.batch_size, num_workers=self.num_workers)
        chunks: dict[str, list[torch.Tensor]] = {POOL_FEATURES: [], LOGIT_FEATURES: []}
        for batch in tqdm(loader, desc=description, disable=not self.progress):
            outputs = self.extractor.convert_features_tuple_to_dict(self.extractor(batch.to(self.device)))
            for name in chunks:
                chunks[name].append(outputs[name].cpu().to(torch.float64))
        return {name: torch.cat(parts) for name, parts in chunks.items()}

    def folder_features(
        self, folder: str | os.PathLike, resolution: int | None, resize_mode: str, recursive: bool = False
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Features of every image of ``folder`` (from the cache when its content is unchanged) and a description
        of the set: ``n``, ``resolution``, ``resize_mode``, ``fingerprint``. Without a resolution the images must
        share one square size, which becomes the resolution."""
        root = Path(folder)
        paths = list_images(root, recursive)
        if resolution is None:
            if resize_mode != "none":
                raise ValueError(f"resize mode {resize_mode!r} needs a target resolution")
            resolution = inspect_resolution(paths)
        description = {
            "folder": root.name,
            "n": len(paths),
            "resolution": resolution,
            "resize_mode": resize_mode,
            "fingerprint": folder_fingerprint(paths, root),
        }
        cache_file = self._cache_file(description)
        if cache_file is not None and cache_file.is_file():
            return load_file(cache_file), description
        features = self.extract(ImageFileDataset(paths, resolution, resize_mode), description=f"inception {root.name}")
        if cache_file is not None:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            temporary = cache_file.with_suffix(".tmp")
            save_file(
                {k: v.contiguous() for k, v in features.items()}, temporary, metadata={"set": json.dumps(description)}
            )
            os.replace(temporary, cache_file)
        return features, description

    def _cache_file(self, description: dict[str, Any]) -> Path | None:
        if self.cache_dir is None:
            return None
        key = {k: description[k] for k in ("n", "resolution", "resize_mode", "fingerprint")}
        key["extractor"] = self.extractor_id
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
        return self.cache_dir / f"inception-{digest}.safetensors"


@dataclass(frozen=True)
class FidelityOptions:
    """Which metrics to compute and torch-fidelity's parameters for them (its defaults)."""

    fid: bool = True
    kid: bool = True
    isc: bool = True
    kid_subsets: int = KID_SUBSETS
    kid_subset_size: int = KID_SUBSET_SIZE
    isc_splits: int = ISC_SPLITS
    rng_seed: int = RNG_SEED


def fidelity_from_features(
    real: dict[str, torch.Tensor], fake: dict[str, torch.Tensor], options: FidelityOptions = FidelityOptions()
) -> dict[str, float | int]:
    """FID / KID / IS from features with torch-fidelity's metric functions; records the KID subset size and IS
    splits actually used (they are capped by the number of images)."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_isc import isc_features_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric

    n_real, n_fake = len(real[POOL_FEATURES]), len(fake[POOL_FEATURES])
    if min(n_real, n_fake) < 2:
        raise ImageSetError(f"FID/KID need at least 2 images per set, got {n_real} real and {n_fake} generated")
    results: dict[str, float | int] = {"n_real": n_real, "n_fake": n_fake}
    if options.fid:
        statistics = [fid_features_to_statistics(features[POOL_FEATURES]) for features in (real, fake)]
        results["fid"] = fid_statistics_to_metric(*statistics, verbose=False)[KEY_METRIC_FID]
    if options.kid:
        subset_size = min(options.kid_subset_size, n_real, n_fake)
        kid = kid_features_to_metric(
            real[POOL_FEATURES],
            fake[POOL_FEATURES],
            kid_subsets=options.kid_subsets,
            kid_subset_size=subset_size,
            rng_seed=options.rng_seed,
            verbose=False,
        )
        results.update(kid_mean=kid["kernel_inception_distance_mean"], kid_std=kid["kernel_inception_distance_std"])
        results["kid_subset_size"] = subset_size
    if options.isc:
        splits = min(options.isc_splits, n_fake)
        isc = isc_features_to_metric(fake[LOGIT_FEATURES], splits=splits, shuffle=True, rng_seed=options.rng_seed)
        results.update(is_mean=isc["inception_score_mean"], is_std=isc["inception_score_std"], is_splits=splits)
    return results


def compare_folders(
    inception: InceptionFeatures,
    real_dir: str | os.PathLike,
    fake_dir: str | os.PathLike,
    resolution: int | None = None,
    resize_mode: str = "none",
    options: FidelityOptions = FidelityOptions(),
    recursive: bool = False,
) -> dict[str, Any]:
    """FID / KID / IS of the images in ``fake_dir`` against ``real_dir``, with the sets' descriptions."""
    real, real_set = inception.folder_features(real_dir, resolution, resize_mode, recursive)
    fake, fake_set = inception.folder_features(fake_dir, resolution or real_set["resolution"], resize_mode, recursive)
    return {
        **fidelity_from_features(real, fake, options),
        "resolution": real_set["resolution"],
        "resize_mode": resize_mode,
        "real_set": real_set,
        "fake_set": fake_set,
    }


def compare_category_folders(
    inception: InceptionFeatures,
    real_root: str | os.PathLike,
    fake_root: str | os.PathLike,
    resolution: int | None = None,
    resize_mode: str = "none",
    options: FidelityOptions = FidelityOptions(),
) -> dict[str, Any]:
    """The MJHQ-30K protocol: per category subfolder and over all categories together.

    Categories are the subfolders of ``real_root``; ``fake_root`` must have the same ones (a missing one is an
    error, since an overall number over fewer categories would not be comparable).
    """
    real_root, fake_root = Path(real_root), Path(fake_root)
    categories = sorted(p.name for p in real_root.iterdir() if p.is_dir()) if real_root.is_dir() else []
    if not categories:
        raise ImageSetError(f"no category subfolders in the reference folder {real_root}")
    missing = [c for c in categories if not (fake_root / c).is_dir()]
    if missing:
        raise ImageSetError(f"the generated folder {fake_root} lacks the categories {missing}")
    per_category: dict[str, Any] = {}
    real_all: dict[str, list[torch.Tensor]] = {POOL_FEATURES: [], LOGIT_FEATURES: []}
    fake_all: dict[str, list[torch.Tensor]] = {POOL_FEATURES: [], LOGIT_FEATURES: []}
    for category in categories:
        real, real_set = inception.folder_features(real_root / category, resolution, resize_mode)
        resolution = resolution or real_set["resolution"]
        fake, fake_set = inception.folder_features(fake_root / category, resolution, resize_mode)
        per_category[category] = {
            **fidelity_from_features(real, fake, options),
            "real_set": real_set,
            "fake_set": fake_set,
        }
        for name in real_all:
            real_all[name].append(real[name])
            fake_all[name].append(fake[name])
    overall = fidelity_from_features(
        {k: torch.cat(v) for k, v in real_all.items()}, {k: torch.cat(v) for k, v in fake_all.items()}, options
    )
    return {"overall": overall, "categories": per_category, "resolution": resolution, "resize_mode": resize_mode}
