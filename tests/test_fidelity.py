"""FID / KID / IS through torch-fidelity, the feature cache, the MJHQ layout, and CLIP score.

Most tests use torch-fidelity's extension point, a custom ``FeatureExtractorBase`` (a fixed random projection of
pooled pixels, 24-d), so the metric code is torch-fidelity's own while the features stay cheap on a CPU. One test
runs the real ``inception-v3-compat`` network, with random weights saved to a local file, through the loader.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch_fidelity.feature_extractor_base import FeatureExtractorBase

from vargpt.checkpoints.core import CheckpointError
from vargpt.eval.clip_model import ClipEncoder, WeightsNotFoundError
from vargpt.eval.clipscore import clip_score_folder, read_prompt_table
from vargpt.eval.fidelity import (
    FidelityOptions,
    ImageSetError,
    InceptionFeatures,
    compare_category_folders,
    compare_folders,
    fidelity_from_features,
)
from vargpt.eval.testing import save_random_inception, save_tiny_clip


class PooledPixelFeatures(FeatureExtractorBase):
    """A cheap deterministic extractor in torch-fidelity's interface: 8x8 pooled pixels, projected."""

    def __init__(self):
        super().__init__("pooled-pixels", ["2048", "logits_unbiased"])
        generator = torch.Generator().manual_seed(0)
        self.register_buffer("projection", torch.randn(192, 24, generator=generator))
        self.register_buffer("classifier", torch.randn(24, 10, generator=generator))

    @staticmethod
    def get_provided_features_list():
        return ("2048", "logits_unbiased")

    def forward(self, images):
        pooled = F.adaptive_avg_pool2d(images.float() / 255, 8).flatten(1)
        features = torch.relu(pooled @ self.projection)
        return features, features @ self.classifier


def cheap_features(cache_dir=None):
    return InceptionFeatures(PooledPixelFeatures(), "pooled-pixels", cache_dir=cache_dir, progress=False)


def scenes(folder, count, size=32, seed=0, noise=False):
    """Grey-ish images with one coloured square each (or uniform noise)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        if noise:
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        else:
            pixels = np.full((size, size, 3), 120, dtype=np.uint8)
            x, y = rng.integers(0, size // 2, 2)
            pixels[y : y + size // 3, x : x + size // 3] = rng.integers(0, 256, 3)
        Image.fromarray(pixels).save(folder / f"{index:03d}.png")
    return folder


def test_fid_is_zero_for_identical_sets_and_large_against_noise(tmp_path):
    features = cheap_features()
    real = scenes(tmp_path / "real", 40)
    same = scenes(tmp_path / "same", 40)  # same seed: the same pictures
    noise = scenes(tmp_path / "noise", 40, seed=1, noise=True)
    identical = compare_folders(features, real, same)
    against_noise = compare_folders(features, real, noise)
    assert abs(identical["fid"]) < 1e-6
    assert against_noise["fid"] > 1.0 > 1e5 * abs(identical["fid"])
    assert abs(identical["kid_mean"]) < against_noise["kid_mean"]
    assert identical["n_real"] == identical["n_fake"] == 40
    assert identical["resolution"] == 32 and identical["resize_mode"] == "none"
    assert identical["kid_subset_size"] == 40 and identical["is_splits"] == 10
    assert identical["is_mean"] >= 1.0


def test_options_select_metrics():
    real = {"2048": torch.randn(20, 4, dtype=torch.float64), "logits_unbiased": torch.randn(20, 3, dtype=torch.float64)}
    only_fid = fidelity_from_features(real, real, FidelityOptions(kid=False, isc=False))
    assert set(only_fid) == {"n_real", "n_fake", "fid"}
    with pytest.raises(ImageSetError, match="at least 2 images"):
        fidelity_from_features({k: v[:1] for k, v in real.items()}, real)


def test_wrong_sizes_are_errors_unless_a_resize_mode_is_chosen(tmp_path):
    real = scenes(tmp_path / "real", 6, size=32)
    odd = scenes(tmp_path / "odd", 6, size=32)
    Image.new("RGB", (40, 32)).save(odd / "zz.png")
    features = cheap_features()
    with pytest.raises(ImageSetError, match=r"one square size.*; found 32x32 \(000.png\), 40x32 \(zz.png\)"):
        compare_folders(features, odd, real)
    with pytest.raises(ImageSetError, match=r"zz.png is 40x32, expected 32x32"):
        compare_folders(features, real, odd)
    cropped = compare_folders(features, real, odd, resolution=32, resize_mode="center_crop")
    assert cropped["n_fake"] == 7 and cropped["resize_mode"] == "center_crop"
    assert compare_folders(features, real, odd, resolution=16, resize_mode="bicubic")["resolution"] == 16
    with pytest.raises(ImageSetError, match="no .png/.jpg/.jpeg images"):
        compare_folders(features, real, (tmp_path / "empty").mkdir() or tmp_path / "empty")


def test_features_are_cached_by_folder_content(tmp_path):
    real = scenes(tmp_path / "real", 8)
    fake = scenes(tmp_path / "fake", 8, seed=3)
    features = cheap_features(cache_dir=tmp_path / "cache")
    first = compare_folders(features, real, fake)
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2

    def refuse(*args, **kwargs):
        raise AssertionError("features should have come from the cache")

    features.extract = refuse
    assert compare_folders(features, real, fake)["fid"] == pytest.approx(first["fid"])
    Image.new("RGB", (32, 32), (1, 2, 3)).save(fake / "new.png")  # the content changed: recomputed
    with pytest.raises(AssertionError, match="from the cache"):
        compare_folders(features, real, fake)


def test_mjhq_layout_per_category_and_overall(tmp_path):
    for category, seed in (("animals", 0), ("food", 1)):
        scenes(tmp_path / "real" / category, 6, seed=seed)
        scenes(tmp_path / "fake" / category, 5, seed=seed + 10)
    result = compare_category_folders(cheap_features(), tmp_path / "real", tmp_path / "fake")
    assert set(result["categories"]) == {"animals", "food"}
    assert result["categories"]["food"]["n_real"] == 6 and result["categories"]["food"]["n_fake"] == 5
    assert result["overall"]["n_real"] == 12 and result["overall"]["n_fake"] == 10
    (tmp_path / "real" / "logo").mkdir()
    with pytest.raises(ImageSetError, match=r"lacks the categories \['logo'\]"):
        compare_category_folders(cheap_features(), tmp_path / "real", tmp_path / "fake")


def test_inception_weights_must_be_a_local_plain_state_dict(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="Inception weights file not found: .*missing.pth"):
        InceptionFeatures.from_weights(tmp_path / "missing.pth")
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"conv": torch.zeros(1), "note": object()}, unsafe)
    with pytest.raises(CheckpointError, match="weights-only"):
        InceptionFeatures.from_weights(unsafe)


def test_real_inception_network_from_a_local_random_weights_file(tmp_path):
    features = InceptionFeatures.from_weights(save_random_inception(tmp_path / "inception.pth"), progress=False)
    extracted, description = features.folder_features(scenes(tmp_path / "real", 2), None, "none")
    assert extracted["2048"].shape == (2, 2048) and extracted["logits_unbiased"].shape == (2, 1008)
    assert torch.isfinite(extracted["2048"]).all() and description["n"] == 2
    assert len(features.extractor_id) == 64  # the weights' sha256


def test_prompt_tables(tmp_path):
    meta = tmp_path / "meta_data.json"
    meta.write_text(json.dumps({"abc": {"category": "food", "prompt": "a cake"}, "d.png": "a dog"}))
    assert read_prompt_table(meta) == {"abc": "a cake", "d": "a dog"}
    lines = tmp_path / "prompts.jsonl"
    lines.write_text(json.dumps({"image": "x.png", "prompt": "a cat"}) + "\n" + json.dumps({"image": "y"}) + "\n")
    with pytest.raises(ValueError, match=r"prompts.jsonl:2"):
        read_prompt_table(lines)


def test_clip_score_with_a_tiny_clip(tmp_path):
    encoder = ClipEncoder.load(save_tiny_clip(tmp_path / "clip"))
    scenes(tmp_path / "images" / "food", 3)
    scenes(tmp_path / "images" / "animals", 2, seed=5)
    (tmp_path / "images" / "animals" / "000.png").rename(tmp_path / "images" / "animals" / "100.png")
    (tmp_path / "images" / "animals" / "001.png").rename(tmp_path / "images" / "animals" / "101.png")
    prompts = {"000": "a red square", "001": "a cake", "002": "pie", "100": "a dog", "101": "a cat", "999": "unused"}
    result = clip_score_folder(encoder, tmp_path / "images", prompts, progress=False)
    assert result["n"] == 5 and result["prompts_without_image"] == 1
    assert 0.0 <= result["clip_score"] <= 100.0
    assert result["categories"]["food"]["n"] == 3 and result["categories"]["animals"]["n"] == 2
    # the score is the clamped scaled cosine of the encoder's own embeddings
    image = Image.open(tmp_path / "images" / "food" / "000.png")
    cosine = float(encoder.encode_images([image])[0] @ encoder.encode_texts(["a red square"])[0])
    single = tmp_path / "single"
    single.mkdir()
    image.save(single / "000.png")
    assert clip_score_folder(encoder, single, prompts, progress=False)["clip_score"] == pytest.approx(
        max(100 * cosine, 0), abs=1e-4
    )
    del prompts["101"]
    with pytest.raises(ImageSetError, match="1 image\\(s\\) have no prompt"):
        clip_score_folder(encoder, tmp_path / "images", prompts, progress=False)
