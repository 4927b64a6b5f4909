"""GenEval around the rules: metadata IO, folder layout, generation protocol, caching, detector and colour adapters."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from vargpt.eval.clip_model import ClipEncoder, WeightsNotFoundError
from vargpt.eval.geneval import (
    GenEvalFolderError,
    list_geneval_images,
    read_metadata,
    read_rewritten_prompts,
    records_rewrites,
    sample_seed,
    score_geneval_folder,
    write_geneval_samples,
)
from vargpt.eval.geneval_colour import ClipColourClassifier, masked_crop
from vargpt.eval.geneval_detector import GENEVAL_CLASS_NAMES, DetectorSettings, Mask2FormerDetector
from vargpt.eval.geneval_rules import GENEVAL_COLORS, Detection, summarize
from vargpt.eval.jsonl import JsonlError
from vargpt.eval.testing import save_tiny_clip, save_tiny_mask2former

METADATA = [
    {"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"},
    {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "blue"}], "prompt": "a photo of a blue car"},
    {
        "tag": "position",
        "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1, "position": ["right of", 0]}],
        "prompt": "a photo of a dog right of a cat",
    },
]
RGB = {"red": (220, 20, 20), "blue": (20, 20, 220), "green": (20, 200, 20)}


def write_metadata(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


class SeededPainter:
    """A test generator: a grey canvas with a rectangle whose colour and place follow the seed."""

    def __init__(self):
        self.calls = []

    def generate_images(self, prompts, seeds):
        self.calls.append((list(prompts), list(seeds)))
        images = []
        for seed in seeds:
            rng = np.random.default_rng(seed)
            image = Image.new("RGB", (64, 64), (153, 153, 153))
            x = int(rng.integers(0, 32))
            image.paste(tuple(int(v) for v in rng.integers(0, 255, 3)), (x, 10, x + 20, 30))
            images.append(image)
        return images


def test_read_metadata_reports_the_bad_line(tmp_path):
    good = write_metadata(tmp_path / "meta.jsonl", METADATA)
    assert read_metadata(good) == METADATA
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(METADATA[0]) + "\n{not json\n", encoding="utf-8")
    with pytest.raises(JsonlError, match=r"broken.jsonl:2: not valid JSON"):
        read_metadata(broken)
    bad_clause = write_metadata(
        tmp_path / "clause.jsonl",
        [METADATA[0], {"tag": "x", "include": [{"class": "cup", "count": "2"}], "prompt": "p"}],
    )
    with pytest.raises(JsonlError, match=r"clause.jsonl:2: .*count"):
        read_metadata(bad_clause)
    no_prompt = write_metadata(tmp_path / "prompt.jsonl", [{"tag": "single_object", "include": []}])
    with pytest.raises(JsonlError, match=r"prompt.jsonl:1: .*prompt"):
        read_metadata(no_prompt)


def test_sample_seeds_are_deterministic_and_distinct():
    seeds = {sample_seed(i, k) for i in range(553) for k in range(4)}
    assert len(seeds) == 553 * 4
    assert sample_seed(7, 2) == sample_seed(7, 2) and sample_seed(7, 2) != sample_seed(7, 2, base_seed=0)
    assert all(0 <= s < 2**31 for s in seeds)


def test_generation_writes_the_official_layout_and_resumes(tmp_path):
    painter = SeededPainter()
    counts = write_geneval_samples(painter, METADATA, tmp_path / "gen", samples_per_prompt=2, progress=False)
    assert counts == {"generated": 6, "reused": 0}
    folder = tmp_path / "gen" / "00001"
    assert json.loads((folder / "metadata.jsonl").read_text()) == METADATA[1]
    assert sorted(p.name for p in (folder / "samples").iterdir()) == ["00000.png", "00001.png"]
    assert painter.calls[1] == (["a photo of a blue car"] * 2, [sample_seed(1, 0), sample_seed(1, 1)])
    (folder / "samples" / "00001.png").unlink()
    again = write_geneval_samples(painter, METADATA, tmp_path / "gen", samples_per_prompt=2, progress=False)
    assert again == {"generated": 1, "reused": 5}
    assert painter.calls[-1] == (["a photo of a blue car"], [sample_seed(1, 1)])


def test_rewritten_prompts_are_recorded_and_never_mixed(tmp_path):
    rewrites = {r["prompt"]: r["prompt"] + ", highly detailed" for r in METADATA}
    rewrite_file = tmp_path / "rewrites.json"
    rewrite_file.write_text(json.dumps(rewrites))
    prompts = read_rewritten_prompts(rewrite_file, METADATA)
    write_geneval_samples(
        SeededPainter(), METADATA, tmp_path / "rw", samples_per_prompt=1, prompts=prompts, progress=False
    )
    listing = list_geneval_images(tmp_path / "rw")
    assert records_rewrites(listing)
    assert listing.images[0].metadata["generation_prompt"] == "a photo of a bench, highly detailed"
    write_geneval_samples(SeededPainter(), METADATA[:1], tmp_path / "rw", samples_per_prompt=1, progress=False)
    with pytest.raises(GenEvalFolderError, match="mixes"):
        records_rewrites(list_geneval_images(tmp_path / "rw"))
    rewrite_file.write_text(json.dumps({METADATA[0]["prompt"]: "x"}))
    with pytest.raises(ValueError, match="no rewrite for 2"):
        read_rewritten_prompts(rewrite_file, METADATA)


def test_listing_reads_png_and_jpg_and_counts_what_it_skips(tmp_path):
    write_geneval_samples(SeededPainter(), METADATA[:2], tmp_path, samples_per_prompt=1, progress=False)
    Image.new("RGB", (64, 64)).save(tmp_path / "00000" / "samples" / "00003.jpg")
    Image.new("RGB", (64, 64)).save(tmp_path / "00000" / "samples" / "grid.png")
    (tmp_path / "notes").mkdir()
    listing = list_geneval_images(tmp_path)
    assert [p.path.name for p in listing.images] == ["00000.png", "00003.jpg", "00000.png"]
    assert listing.prompts == 2
    assert sorted(listing.skipped) == ["00000/samples/grid.png", "notes"]
    (tmp_path / "00001" / "metadata.jsonl").unlink()
    with pytest.raises(GenEvalFolderError, match="missing .*00001.*metadata.jsonl"):
        list_geneval_images(tmp_path)


def test_masked_crop_composites_over_grey_and_checks_mask_size():
    image = Image.new("RGB", (10, 8), (255, 0, 0))
    mask = np.zeros((8, 10), dtype=bool)
    mask[2:4, 2:4] = True
    crop = np.asarray(masked_crop(image, Detection(box=(1, 1, 5, 5), score=1.0, mask=mask)))
    assert crop.shape == (4, 4, 3)
    assert tuple(crop[1, 1]) == (255, 0, 0) and tuple(crop[0, 0]) == (153, 153, 153)
    with pytest.raises(ValueError, match=r"mask has shape \(4, 4\)"):
        masked_crop(image, Detection(box=(0, 0, 2, 2), score=1.0, mask=np.ones((4, 4), dtype=bool)))


def rectangle_scene(objects, size=(64, 64)):
    """A grey image with coloured rectangles and the detections a perfect detector would return for it."""
    image = Image.new("RGB", size, (153, 153, 153))
    detections = {}
    for classname, colour, box, score in objects:
        image.paste(RGB[colour], box)
        mask = np.zeros((size[1], size[0]), dtype=bool)
        mask[box[1] : box[3], box[0] : box[2]] = True
        detections.setdefault(classname, []).append(Detection(box=tuple(map(float, box)), score=score, mask=mask))
    return image, detections


class TableDetector:
    """A stub detector: looks up hand-made detections by the image's pixels."""

    def __init__(self, table):
        self.table = table
        self.calls = 0

    def detect(self, image):
        self.calls += 1
        return self.table[np.asarray(image).tobytes()]

    def identity(self):
        return {"detector": "table"}


def nearest_colour(image):
    """A test colour classifier: the named colour nearest to the mean of the masked pixels."""

    def classify(classname, detection):
        pixels = np.asarray(image)[detection.mask]
        mean = pixels.mean(axis=0)
        return min(RGB, key=lambda name: np.linalg.norm(mean - np.array(RGB[name])))

    return classify


def build_scored_folder(tmp_path):
    scenes = [
        [("bench", "green", (5, 5, 40, 30), 0.9)],  # correct
        [("car", "red", (5, 5, 40, 30), 0.9)],  # wrong colour
        [("cat", "green", (2, 20, 18, 40), 0.8), ("dog", "red", (40, 20, 60, 40), 0.7)],  # dog right of cat
    ]
    table = {}
    for index, (record, scene) in enumerate(zip(METADATA, scenes, strict=True)):
        image, detections = rectangle_scene(scene)
        sample_dir = tmp_path / "images" / f"{index:05d}" / "samples"
        sample_dir.mkdir(parents=True)
        (sample_dir.parent / "metadata.jsonl").write_text(json.dumps(record))
        image.save(sample_dir / "00000.png")
        table[np.asarray(image).tobytes()] = detections
    return TableDetector(table)


def test_scoring_a_folder_writes_official_records_and_reuses_cached_detections(tmp_path):
    detector = build_scored_folder(tmp_path)
    run = score_geneval_folder(tmp_path / "images", detector, nearest_colour, tmp_path / "out", progress=False)
    assert [r["correct"] for r in run.records] == [True, False, True]
    assert run.records[1]["reason"] == "expected blue car>=1, found 0 blue; and 1 red"
    assert not run.rewrites_recorded and (run.detected, run.cached) == (3, 0)
    written = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert set(written[0]) == {"filename", "tag", "prompt", "correct", "reason", "metadata", "details"}
    assert json.loads(written[2]["details"])["dog"] == [[40.0, 20.0, 60.0, 40.0, 0.7]]
    assert summarize(written)["overall"] == pytest.approx(run.summary["overall"]) == pytest.approx(2 / 3)

    again = score_geneval_folder(tmp_path / "images", detector, nearest_colour, tmp_path / "out", progress=False)
    assert detector.calls == 3 and (again.detected, again.cached) == (0, 3)
    assert [r["correct"] for r in again.records] == [True, False, True]  # masks came back from the cache intact


def test_scoring_shards_and_rejects_mixed_image_sizes(tmp_path):
    detector = build_scored_folder(tmp_path)
    shard = score_geneval_folder(
        tmp_path / "images", detector, nearest_colour, tmp_path / "out", shard=(1, 2), progress=False
    )
    assert [r["prompt"] for r in shard.records] == [METADATA[1]["prompt"]]
    assert (tmp_path / "out" / "results_shard1of2.jsonl").is_file()
    Image.new("RGB", (32, 32)).save(tmp_path / "images" / "00002" / "samples" / "00001.png")
    with pytest.raises(GenEvalFolderError, match="32x32 but the folder's images are 64x64"):
        score_geneval_folder(tmp_path / "images", detector, nearest_colour, tmp_path / "out", progress=False)


def test_missing_weights_folders_are_named(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="Mask2Former detector weights folder not found: .*nowhere"):
        Mask2FormerDetector.load(tmp_path / "nowhere")
    with pytest.raises(WeightsNotFoundError, match="CLIP weights folder not found"):
        ClipEncoder.load(tmp_path / "nowhere")


def test_tiny_mask2former_detects_through_the_real_loader(tmp_path):
    folder = save_tiny_mask2former(tmp_path / "m2f")
    detector = Mask2FormerDetector.load(
        folder, settings=DetectorSettings(shortest_edge=96, longest_edge=160, score_floor=0.0)
    )
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 80, 3), dtype=np.uint8))
    detections = detector.detect(image)
    flat = [d for candidates in detections.values() for d in candidates]
    assert flat, "a zero score floor keeps every non-empty mask"
    assert set(detections) <= set(GENEVAL_CLASS_NAMES)
    for detection in flat:
        assert detection.mask.shape == (48, 80) and detection.mask.any()
        rows, columns = np.where(detection.mask)
        assert detection.box == (columns.min(), rows.min(), columns.max() + 1, rows.max() + 1)
        assert 0.0 <= detection.score <= 1.0
    assert detector.identity()["shortest_edge"] == 96 and len(detector.identity()["weights_sha256"]) == 64


def test_tiny_clip_colour_classifier_through_the_real_loader(tmp_path):
    encoder = ClipEncoder.load(save_tiny_clip(tmp_path / "clip"))
    classifier = ClipColourClassifier(encoder)
    weights = classifier.classifier_weights("car")
    assert weights.shape == (16, len(GENEVAL_COLORS))
    assert np.allclose(weights.norm(dim=0).numpy(), 1.0, atol=1e-5)
    image, detections = rectangle_scene([("car", "blue", (5, 5, 40, 30), 0.9), ("car", "red", (41, 5, 60, 30), 0.8)])
    colours = classifier.classify(image, "car", detections["car"])
    assert len(colours) == 2 and set(colours) <= set(GENEVAL_COLORS)
    assert classifier.for_image(image)("car", detections["car"][0]) == colours[0]


def test_end_to_end_with_tiny_detector_and_clip(tmp_path):
    write_geneval_samples(SeededPainter(), METADATA, tmp_path / "images", samples_per_prompt=2, progress=False)
    detector = Mask2FormerDetector.load(
        save_tiny_mask2former(tmp_path / "m2f"),
        settings=DetectorSettings(shortest_edge=64, longest_edge=64, score_floor=0.0),
    )
    colours = ClipColourClassifier(ClipEncoder.load(save_tiny_clip(tmp_path / "clip")))
    run = score_geneval_folder(tmp_path / "images", detector, colours.for_image, tmp_path / "out", progress=False)
    assert len(run.records) == 6 and run.summary["images"] == 6
    assert set(run.summary["tasks"]) == {"single_object", "colors", "position"}
