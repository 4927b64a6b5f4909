"""evaluate.py end to end on tiny self-made data and tiny random models saved as local folders."""

from __future__ import annotations

import base64
import csv
import importlib.util
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vargpt.eval.clip_model import WeightsNotFoundError
from vargpt.eval.jsonl import JsonlError
from vargpt.eval.testing import save_random_inception, save_tiny_clip, save_tiny_mask2former

REPOSITORY = Path(__file__).resolve().parents[1]
_SPEC = importlib.util.spec_from_file_location("evaluate_entry_point", REPOSITORY / "evaluate.py")
evaluate = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(evaluate)
METADATA = [
    {"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"},
    {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "blue"}], "prompt": "a photo of a blue car"},
    {
        "tag": "counting",
        "include": [{"class": "clock", "count": 2}],
        "exclude": [{"class": "clock", "count": 3}],
        "prompt": "a photo of two clocks",
    },
]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"detector": save_tiny_mask2former(root / "m2f", image_edge=48), "clip": save_tiny_clip(root / "clip")}


def write_geneval_folder(root, metadata, samples=2, extra=None):
    rng = np.random.default_rng(0)
    for index, record in enumerate(metadata):
        folder = root / f"{index:05d}"
        (folder / "samples").mkdir(parents=True)
        (folder / "metadata.jsonl").write_text(json.dumps({**record, **(extra or {}).get(index, {})}))
        for k in range(samples):
            Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(folder / "samples" / f"{k:05d}.png")
    return root


def geneval_args(tmp_path, models, images, metadata_file):
    return [
        "geneval",
        "--images",
        str(images),
        "--metadata",
        str(metadata_file),
        "--detector",
        str(models["detector"]),
        "--clip",
        str(models["clip"]),
        "--out",
        str(tmp_path / "out"),
        "--no-progress",
        "--detector-shortest-edge",
        "64",
        "--detector-longest-edge",
        "64",
    ]


def test_geneval_cli_scores_a_folder_and_resumes_from_the_cache(tmp_path, models, capsys):
    metadata_file = tmp_path / "evaluation_metadata.jsonl"
    metadata_file.write_text("".join(json.dumps(r) + "\n" for r in METADATA))
    images = write_geneval_folder(tmp_path / "images", METADATA[:2])  # the third prompt has no images
    report = evaluate.main(geneval_args(tmp_path, models, images, metadata_file))
    assert report.benchmark == "geneval_hf"
    assert report.metrics["original/images"] == 4 and report.metrics["original/prompts"] == 2
    assert report.metrics["original/prompts_without_images"] == 1
    assert 0.0 <= report.metrics["original/overall"] <= 1.0
    assert report.settings["detector"]["score_floor"] == 0.3 and report.settings["options"]["counting_threshold"] == 0.9
    assert report.settings["detector"]["shortest_edge"] == 64
    assert report.details["original"]["detected_images"] == 4
    saved = json.loads((tmp_path / "out" / "geneval_hf.json").read_text())
    assert saved["metrics"] == report.metrics
    assert "| original/overall |" in (tmp_path / "out" / "geneval_hf.md").read_text()
    assert "original/overall" in capsys.readouterr().out
    results = (tmp_path / "out" / "geneval_original" / "results.jsonl").read_text().splitlines()
    assert len(results) == 4 and set(json.loads(results[0])) >= {
        "filename",
        "tag",
        "prompt",
        "correct",
        "reason",
        "metadata",
        "details",
    }

    again = evaluate.main(geneval_args(tmp_path, models, images, metadata_file))
    assert again.details["original"]["detected_images"] == 0 and again.details["original"]["cached_images"] == 4
    assert again.metrics == report.metrics


def test_geneval_cli_reports_rewritten_prompts_separately(tmp_path, models):
    metadata_file = tmp_path / "evaluation_metadata.jsonl"
    metadata_file.write_text("".join(json.dumps(r) + "\n" for r in METADATA[:1]))
    rewrites = tmp_path / "rewrites.json"
    rewrites.write_text(json.dumps({METADATA[0]["prompt"]: "a wooden park bench in the sun"}))
    original = write_geneval_folder(tmp_path / "original", METADATA[:1], samples=1)
    recorded = {0: {"generation_prompt": "a wooden park bench in the sun"}}
    rewritten = write_geneval_folder(tmp_path / "rewritten", METADATA[:1], samples=1, extra=recorded)
    external = write_geneval_folder(tmp_path / "external", METADATA[:1], samples=1)  # another tool records nothing
    args = geneval_args(tmp_path, models, original, metadata_file)
    report = evaluate.main(args + ["--rewritten-images", str(rewritten), "--rewrites", str(rewrites)])
    assert {"original/overall", "rewritten/overall"} <= set(report.metrics)
    assert report.details["rewritten"]["rewrites_recorded"] and not report.details["original"]["rewrites_recorded"]
    from_elsewhere = evaluate.main(args + ["--rewritten-images", str(external), "--rewrites", str(rewrites)])
    assert not from_elsewhere.details["rewritten"]["rewrites_recorded"]
    swapped = geneval_args(tmp_path, models, rewritten, metadata_file)
    with pytest.raises(evaluate.EvaluationInputError, match="given as original-prompt images"):
        evaluate.main(swapped)
    rewrites.write_text(json.dumps({METADATA[0]["prompt"]: "another rewrite"}))
    with pytest.raises(evaluate.EvaluationInputError, match="not the one in the rewrites file"):
        evaluate.main(args + ["--rewritten-images", str(rewritten), "--rewrites", str(rewrites)])
    with pytest.raises(evaluate.EvaluationInputError, match="go together"):
        evaluate.main(args + ["--rewrites", str(rewrites)])


def test_geneval_cli_bad_inputs_are_clear_errors(tmp_path, models):
    metadata_file = tmp_path / "evaluation_metadata.jsonl"
    metadata_file.write_text(json.dumps(METADATA[0]) + "\n" + '{"tag": "counting", "include": [}\n')
    images = write_geneval_folder(tmp_path / "images", METADATA[:1], samples=1)
    with pytest.raises(JsonlError, match=r"evaluation_metadata.jsonl:2"):
        evaluate.main(geneval_args(tmp_path, models, images, metadata_file))
    metadata_file.write_text(json.dumps(METADATA[1]) + "\n")
    with pytest.raises(evaluate.EvaluationInputError, match="other metadata than line 1"):
        evaluate.main(geneval_args(tmp_path, models, images, metadata_file))
    metadata_file.write_text(json.dumps(METADATA[0]) + "\n")
    missing = dict(models, detector=tmp_path / "no-detector")
    with pytest.raises(WeightsNotFoundError, match="no-detector"):
        evaluate.main(geneval_args(tmp_path, missing, images, metadata_file))


def test_command_line_prints_a_one_line_error(tmp_path):
    completed = subprocess.run(
        [
            sys.executable,
            str(REPOSITORY / "evaluate.py"),
            "fid",
            "--real",
            str(tmp_path),
            "--fake",
            str(tmp_path),
            "--inception",
            str(tmp_path / "missing.pth"),
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        cwd=REPOSITORY,
    )
    assert completed.returncode == 1
    assert completed.stderr.strip().startswith("evaluate.py: error: Inception weights file not found")
    assert "Traceback" not in completed.stderr


def write_images(folder, count, seed, size=32):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"{index:03d}.png")
    return folder


def test_fid_cli_with_a_random_inception_file(tmp_path):
    """KID and IS only: FID on 2048-d features costs a 2048x2048 eigendecomposition (seconds); FID itself is
    tested in test_fidelity.py."""
    inception = save_random_inception(tmp_path / "inception.pth")
    real, fake = write_images(tmp_path / "real", 3, 0), write_images(tmp_path / "fake", 3, 1)
    report = evaluate.main(
        [
            "fid",
            "--real",
            str(real),
            "--fake",
            str(fake),
            "--inception",
            str(inception),
            "--no-fid",
            "--out",
            str(tmp_path / "out"),
            "--no-progress",
        ]
    )
    assert report.metrics["n_real"] == report.metrics["n_fake"] == 3
    assert report.metrics["resolution"] == 32 and report.metrics["resize_mode"] == "none"
    assert "fid" not in report.metrics and np.isfinite(report.metrics["kid_mean"])
    assert report.metrics["kid_subset_size"] == 3 and report.metrics["is_splits"] == 3
    assert len(list((tmp_path / "out" / "inception_cache").glob("*.safetensors"))) == 2


def test_clipscore_cli(tmp_path, models):
    images = write_images(tmp_path / "images", 3, 0)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"image": f"{i:03d}.png", "prompt": f"picture {i}"}) + "\n" for i in range(3))
    )
    report = evaluate.main(
        [
            "clipscore",
            "--images",
            str(images),
            "--prompts",
            str(prompts),
            "--clip",
            str(models["clip"]),
            "--out",
            str(tmp_path / "out"),
            "--no-progress",
        ]
    )
    assert report.metrics["n"] == 3 and 0.0 <= report.metrics["clip_score"] <= 100.0
    assert (tmp_path / "out" / "clipscore.md").is_file()


def test_understanding_cli_from_a_predictions_file(tmp_path):
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, format="PNG")
    image = base64.b64encode(buffer.getvalue()).decode()
    data = tmp_path / "POPE.tsv"
    with data.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, ["index", "question", "answer", "category", "image"], delimiter="\t")
        writer.writeheader()
        for index, answer in enumerate(["Yes", "No", "Yes", "No"]):
            writer.writerow(
                {"index": index, "question": "Is there a cat?", "answer": answer, "category": "random", "image": image}
            )
    predictions = tmp_path / "predictions.jsonl"
    predictions.write_text(
        "".join(json.dumps({"id": i, "answer": a}) + "\n" for i, a in enumerate(["Yes", "No", "No"]))
    )
    report = evaluate.main(
        [
            "pope",
            "--data",
            str(data),
            "--predictions",
            str(predictions),
            "--out",
            str(tmp_path / "out"),
            "--no-progress",
        ]
    )
    assert report.metrics["missing_predictions"] == 1 and report.metrics["n"] == 4
    samples = [json.loads(line) for line in (tmp_path / "out" / "pope_samples.jsonl").read_text().splitlines()]
    assert [s["parsed"] for s in samples] == ["yes", "no", "no", None]  # the missing answer is wrong, not parsed
    # tp = 1, fp = 0, fn = 1: precision 1, recall 0.5
    assert report.metrics["random/f1"] == pytest.approx(2 * 1.0 * 0.5 / 1.5)
    assert report.metrics["accuracy"] == 0.5
    assert json.loads((tmp_path / "out" / "pope.json").read_text())["settings"]["predictions"] == "predictions.jsonl"
