"""evaluate.py --ckpt end to end: a tiny random VARGPT exported with save_pretrained generates, then is scored."""

from __future__ import annotations

import base64
import csv
import importlib.util
import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from helpers_tiny_model import TINY_IMAGE_SIZE, tiny_model
from vargpt.checkpoints.vargpt import save_pretrained
from vargpt.eval.testing import save_tiny_clip, save_tiny_mask2former

REPOSITORY = Path(__file__).resolve().parents[1]
_SPEC = importlib.util.spec_from_file_location("evaluate_entry_point_ckpt", REPOSITORY / "evaluate.py")
evaluate = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(evaluate)

METADATA = [
    {"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"},
    {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "blue"}], "prompt": "a photo of a blue car"},
]


@pytest.fixture(autouse=True)
def one_intra_op_thread():
    """One torch intra-op thread: tiny models generate several times faster on a shared, loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_pretrained(tiny_model(seed=4), tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="module")
def scorers(tmp_path_factory):
    root = tmp_path_factory.mktemp("scorers")
    return {"detector": save_tiny_mask2former(root / "m2f", image_edge=64), "clip": save_tiny_clip(root / "clip")}


def image_bytes(folder):
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in sorted(folder.rglob("*.png"))}


def test_geneval_ckpt_generates_the_official_layout_scores_and_resumes(tmp_path, checkpoint, scorers):
    metadata = tmp_path / "evaluation_metadata.jsonl"
    metadata.write_text("".join(json.dumps(record) + "\n" for record in METADATA))
    out = tmp_path / "out"
    args = [
        "geneval", "--ckpt", str(checkpoint), "--metadata", str(metadata), "--detector", str(scorers["detector"]),
        "--clip", str(scorers["clip"]), "--out", str(out), "--samples-per-prompt", "2", "--batch-size", "2",
        "--detector-shortest-edge", "64", "--detector-longest-edge", "64", "--no-progress",
        "--rewrites", str(tmp_path / "rewrites.json"),
    ]
    (tmp_path / "rewrites.json").write_text(json.dumps({r["prompt"]: r["prompt"] + " on grass" for r in METADATA}))
    report = evaluate.main(args)
    images = out / "geneval_images"
    assert sorted(image_bytes(images)) == [f"{i:05d}/samples/{k:05d}.png" for i in range(2) for k in range(2)]
    assert Image.open(images / "00001" / "samples" / "00001.png").size == (TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
    assert json.loads((images / "00001" / "metadata.jsonl").read_text()) == METADATA[1]
    rewritten = json.loads((out / "geneval_images_rewritten" / "00000" / "metadata.jsonl").read_text())
    assert rewritten["generation_prompt"] == "a photo of a bench on grass"
    assert report.details["generation"]["original"] == {"generated": 4, "reused": 0}
    assert report.metrics["original/prompts_without_images"] == 0
    assert 0.0 <= report.metrics["original/overall"] <= 1.0 and report.settings["samples_per_prompt"] == 2
    assert json.loads((out / "geneval_hf.json").read_text())["settings"]["ckpt"] == "tiny"

    before = image_bytes(images)
    (images / "00000" / "samples" / "00001.png").unlink()
    again = evaluate.main(args)
    assert again.details["generation"]["original"] == {"generated": 1, "reused": 3}
    assert image_bytes(images) == before  # per-image seeds: the regenerated sample is the same image


def test_shapes_ckpt_writes_reports_and_per_sample_records(tmp_path, checkpoint):
    out = tmp_path / "out"
    report = evaluate.main(
        ["shapes", "--ckpt", str(checkpoint), "--per-task", "1", "--out", str(out), "--batch-size", "6"]
    )
    for name in ("generation/overall", "understanding/accuracy", "editing/accuracy"):
        assert 0.0 <= report.metrics[name] <= 1.0
    assert report.settings["size"] == TINY_IMAGE_SIZE and report.settings["ckpt"] == "tiny"
    assert (out / "shapes.json").is_file() and "generation/overall" in (out / "shapes.md").read_text()
    for part, count in (("generation", 6), ("understanding", 4), ("editing", 4)):
        assert len((out / f"shapes_{part}.jsonl").read_text().splitlines()) == count


def test_clipscore_ckpt_generates_one_image_per_prompt_and_resumes(tmp_path, checkpoint, scorers):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"image": f"{i:03d}.png", "prompt": f"a red circle {i}"}) + "\n"
                               for i in range(3)))
    args = ["clipscore", "--ckpt", str(checkpoint), "--prompts", str(prompts), "--clip", str(scorers["clip"]),
            "--out", str(tmp_path / "out"), "--batch-size", "2", "--no-progress"]
    report = evaluate.main(args)
    assert report.metrics["n"] == 3 and report.details["generation"] == {"generated": 3, "reused": 0}
    assert sorted(image_bytes(tmp_path / "out" / "clipscore_images")) == ["000.png", "001.png", "002.png"]
    assert evaluate.main(args).details["generation"] == {"generated": 0, "reused": 3}


def test_pope_ckpt_answers_greedily_then_scores(tmp_path, checkpoint):
    buffer = io.BytesIO()
    Image.new("RGB", (56, 56), (200, 30, 30)).save(buffer, format="PNG")
    data = tmp_path / "POPE.tsv"
    with data.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, ["index", "question", "answer", "category", "image"], delimiter="\t")
        writer.writeheader()
        for index, answer in enumerate(["Yes", "No"]):
            writer.writerow({"index": index, "question": "Is there a cat?", "answer": answer, "category": "random",
                             "image": base64.b64encode(buffer.getvalue()).decode()})
    out = tmp_path / "out"
    report = evaluate.main(["pope", "--ckpt", str(checkpoint), "--data", str(data), "--out", str(out), "--no-progress"])
    predictions = [json.loads(line) for line in (out / "pope_predictions.jsonl").read_text().splitlines()]
    assert [p["id"] for p in predictions] == ["0", "1"] and all(isinstance(p["answer"], str) for p in predictions)
    assert report.metrics["missing_predictions"] == 0 and report.settings["decoding"] == "greedy"


def test_shapes_parts_match_the_benchmark():
    from vargpt.eval.shapes import PARTS

    assert evaluate.SHAPES_PARTS == PARTS


def test_without_ckpt_the_outputs_are_required(tmp_path):
    with pytest.raises(evaluate.EvaluationInputError, match="--predictions"):
        evaluate.main(["pope", "--data", str(tmp_path / "POPE.tsv"), "--out", str(tmp_path)])


def test_fid_ckpt_generates_the_fake_set_into_category_folders(tmp_path, checkpoint):
    from vargpt.eval.testing import save_random_inception

    meta = {f"{category}{i}": {"prompt": f"a {category} circle {i}", "category": category}
            for category in ("red", "blue") for i in range(2)}
    (tmp_path / "meta_data.json").write_text(json.dumps(meta))
    for stem, entry in meta.items():
        (tmp_path / "real" / entry["category"]).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (TINY_IMAGE_SIZE, TINY_IMAGE_SIZE), (len(stem) * 20, 40, 90)).save(
            tmp_path / "real" / entry["category"] / f"{stem}.png")
    report = evaluate.main([
        "fid", "--ckpt", str(checkpoint), "--prompts", str(tmp_path / "meta_data.json"), "--mjhq",
        "--real", str(tmp_path / "real"), "--inception", str(save_random_inception(tmp_path / "inception.pth")),
        "--no-fid", "--no-is", "--out", str(tmp_path / "out"), "--no-progress",
    ])
    fake = tmp_path / "out" / "fid_fake"
    assert sorted(image_bytes(fake)) == ["blue/blue0.png", "blue/blue1.png", "red/red0.png", "red/red1.png"]
    assert report.details["generation"] == {"generated": 4, "reused": 0} and "overall/kid_mean" in report.metrics


def test_fid_ckpt_needs_a_category_for_every_prompt_with_mjhq(tmp_path, checkpoint):
    (tmp_path / "prompts.json").write_text(json.dumps({"a": "a red circle"}))
    with pytest.raises(evaluate.EvaluationInputError, match="category"):
        evaluate.main(["fid", "--ckpt", str(checkpoint), "--prompts", str(tmp_path / "prompts.json"), "--mjhq",
                       "--real", str(tmp_path), "--inception", str(tmp_path / "i.pth"), "--out", str(tmp_path / "o")])


def test_geneval_ckpt_shards_split_the_generation_and_together_write_the_unsharded_folder(
    tmp_path, checkpoint, scorers
):
    records = [*METADATA, {"tag": "two_object", "include": [{"class": "cat", "count": 1}, {"class": "dog",
                                                                                         "count": 1}],
                           "prompt": "a photo of a cat and a dog"}]
    metadata = tmp_path / "evaluation_metadata.jsonl"
    metadata.write_text("".join(json.dumps(record) + "\n" for record in records))
    (tmp_path / "rewrites.json").write_text(json.dumps({r["prompt"]: r["prompt"] + " at noon" for r in records}))

    def run(out, *extra):
        return evaluate.main([
            "geneval", "--ckpt", str(checkpoint), "--metadata", str(metadata), "--detector", str(scorers["detector"]),
            "--clip", str(scorers["clip"]), "--out", str(out), "--samples-per-prompt", "2", "--batch-size", "2",
            "--detector-shortest-edge", "64", "--detector-longest-edge", "64", "--no-progress",
            "--rewrites", str(tmp_path / "rewrites.json"), *extra,
        ])

    whole = run(tmp_path / "whole")
    first = run(tmp_path / "split", "--shard", "0/2")  # prompts 0 and 2; prompt 1 is still missing: no scoring
    assert first.details["generation"]["original"] == {"generated": 4, "reused": 0}
    assert first.metrics == {"original/images_missing": 2, "rewritten/images_missing": 2}
    assert sorted(path.name for path in (tmp_path / "split" / "geneval_images").iterdir()) == ["00000", "00002"]
    second = run(tmp_path / "split", "--shard", "1/2")  # the folder is complete now: shard 1 is scored
    assert second.details["generation"]["original"] == {"generated": 2, "reused": 0}
    again = run(tmp_path / "split", "--shard", "0/2")  # rerun: nothing generated, shard 0 scored
    assert again.details["generation"]["original"] == {"generated": 0, "reused": 4}
    for folder in ("geneval_images", "geneval_images_rewritten"):
        assert image_bytes(tmp_path / "split" / folder) == image_bytes(tmp_path / "whole" / folder)
        for prompt in ("00000", "00001", "00002"):
            assert ((tmp_path / "split" / folder / prompt / "metadata.jsonl").read_text()
                    == (tmp_path / "whole" / folder / prompt / "metadata.jsonl").read_text())
    scored = [json.loads(line) for name in ("results_shard0of2.jsonl", "results_shard1of2.jsonl")
              for line in (tmp_path / "split" / "geneval_original" / name).read_text().splitlines()]
    whole_records = [json.loads(line) for line in
                     (tmp_path / "whole" / "geneval_original" / "results.jsonl").read_text().splitlines()]
    def relative(records):
        return sorted(Path(record["filename"]).relative_to(record["filename"].split("geneval_images")[0])
                      for record in records)

    assert len(scored) == 6 and relative(scored) == relative(whole_records)  # every image scored once
    assert whole.metrics["original/prompts_without_images"] == 0
