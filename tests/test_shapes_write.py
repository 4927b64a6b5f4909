"""Shapes-world samples of every kind validate, and the CLI writes shards that read back."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
import webdataset as wds
from PIL import Image

from datamodules.schema import IMAGE_GEN_PLACEHOLDER, IMAGE_PLACEHOLDER
from datamodules.shapes.samples import SAMPLE_KINDS, make_sample
from datamodules.shapes.scorer import score_edit, score_image
from datamodules.shapes.write import main, write_shard_range, write_shards
from datamodules.shards import read_shard


@pytest.mark.parametrize("kind", SAMPLE_KINDS)
def test_every_kind_validates_and_carries_json_metadata(kind):
    for index in range(8):
        sample = make_sample(kind, index, seed=1, split="train", size=32)
        sample.validate()
        assert sample.kind == kind
        assert not any(turn["role"] == "system" for turn in sample.messages)
        metadata = json.loads(json.dumps(sample.metadata))
        assert metadata["source"] == "shapes" and metadata["index"] == index and "task" in metadata
        assert all(image.size == (32, 32) for image in sample.images.values())
    assert make_sample(kind, 3, seed=1).to_json() == make_sample(kind, 3, seed=1).to_json()


def test_sample_contents_match_their_metadata():
    generation = make_sample("generation", 4, seed=2)
    assert generation.messages[-1]["content"].endswith(IMAGE_GEN_PLACEHOLDER)
    assert score_image(generation.images["target.png"], generation.metadata["spec"]).correct
    understanding = make_sample("understanding", 1, seed=2)
    assert understanding.messages[0]["content"].startswith(IMAGE_PLACEHOLDER)
    assert understanding.messages[1]["content"] == understanding.metadata["answer"]
    editing = make_sample("editing", 2, seed=2)
    assert list(editing.images) == ["input_0.png", "target.png"]
    assert score_edit(editing.images["target.png"], editing.metadata["target_scene"]).correct
    assert score_edit(editing.images["input_0.png"], editing.metadata["source_scene"]).correct
    preference = make_sample("preference", 5, seed=2)
    assert list(preference.images) == ["chosen.png", "rejected.png"]
    spec = preference.metadata["spec"]
    assert score_image(preference.images["chosen.png"], spec).correct
    assert not score_image(preference.images["rejected.png"], spec).correct
    assert preference.metadata["violation"] in ("colour", "count", "shape", "position")
    with pytest.raises(ValueError, match="unknown sample kind"):
        make_sample("video", 0, seed=0)


def test_understanding_samples_can_ask_several_questions_about_one_scene(tmp_path):
    from datamodules.shapes.questions import answers_match
    from datamodules.shapes.world import Scene

    for index in range(8):
        single = make_sample("understanding", index, seed=4, size=32)
        multi = make_sample("understanding", index, seed=4, size=32, questions_per_image=4)
        multi.validate()
        # the first turn is the single-question sample's; the follow-ups are other types about the same scene
        assert multi.messages[:2] == single.messages and multi.metadata["scene"] == single.metadata["scene"]
        asked = multi.metadata["questions"]
        assert [turn["role"] for turn in multi.messages] == ["user", "assistant"] * len(asked)
        assert 2 <= len(asked) <= 4 and len({q["task"] for q in asked}) == len(asked)
        assert [q["answer"] for q in asked] == [turn["content"] for turn in multi.messages[1::2]]
        assert sum(turn["content"].count(IMAGE_PLACEHOLDER) for turn in multi.messages) == 1
        scene = Scene.from_dict(multi.metadata["scene"])
        for question in asked:  # every answer is exact for the scene: recount what can be recounted
            if question["question"] == "How many objects are there?":
                assert answers_match(question["answer"], str(len(scene.objects)))
    assert "questions" not in make_sample("understanding", 0, seed=4).metadata
    with pytest.raises(ValueError, match="questions_per_image"):
        make_sample("understanding", 0, seed=4, questions_per_image=5)
    with pytest.raises(ValueError, match="questions_per_image"):
        write_shards(tmp_path, 2, seed=0, kinds=["understanding"], questions_per_image=0)
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--count-per-kind", "2", "--questions-per-image", "9"])


def test_cli_writes_readable_shards_per_kind(tmp_path, capsys):
    main([str(tmp_path), "--size", "32", "--count-per-kind", "7", "--seed", "3", "--max-samples-per-shard", "4"])
    printed = capsys.readouterr().out
    for kind in SAMPLE_KINDS:
        paths = sorted((tmp_path / kind).glob("*.tar"))
        assert [p.name for p in paths] == ["shapes-train-000000.tar", "shapes-train-000001.tar"]
        assert f"{kind}: 7 samples in 2 shard(s)" in printed
        samples = [sample for path in paths for sample in read_shard(path)]
        assert len(samples) == 7 and len({s.key for s in samples}) == 7
        with tarfile.open(paths[0]) as tar:
            names = tar.getnames()
            assert any(name.endswith(".json") for name in names)
            first_json = json.loads(tar.extractfile(next(n for n in names if n.endswith(".json"))).read())
            assert first_json["kind"] == kind
        records = list(wds.WebDataset([str(p) for p in paths], shardshuffle=False))
        assert len(records) == 7
        for record in records:
            doc = json.loads(record["json"])
            for member in doc["images"]:
                image = Image.open(io.BytesIO(record[member]))
                assert image.size == (32, 32)


def test_writing_is_deterministic_and_the_eval_split_differs(tmp_path):
    first = write_shards(tmp_path / "a", 3, seed=0, size=32, kinds=["generation"])
    again = write_shards(tmp_path / "b", 3, seed=0, size=32, kinds=["generation"])
    held_out = write_shards(tmp_path / "c", 3, seed=0, split="eval", size=32, kinds=["generation"])
    assert first["generation"][0].read_bytes() == again["generation"][0].read_bytes()
    assert held_out["generation"][0].name == "shapes-eval-000000.tar"
    train_scenes = [s.metadata["scene"] for s in read_shard(first["generation"][0])]
    eval_scenes = [s.metadata["scene"] for s in read_shard(held_out["generation"][0])]
    assert not any(scene in train_scenes for scene in eval_scenes)
    with pytest.raises(ValueError, match="count_per_kind"):
        write_shards(tmp_path / "d", 0, seed=0)


def test_shard_ranges_written_separately_equal_one_write(tmp_path):
    whole = write_shards(tmp_path / "whole", 7, seed=0, size=16, kinds=["editing"], max_samples_per_shard=3)["editing"]
    parts = [write_shard_range(tmp_path / "parts", "editing", start, min(start + 3, 7), 0, size=16,
                               max_samples_per_shard=3) for start in (6, 0, 3)]  # any order, e.g. in parallel
    assert sorted(path.name for part in parts for path in part) == [path.name for path in whole]
    assert all((tmp_path / "parts" / "editing" / path.name).read_bytes() == path.read_bytes() for path in whole)
    with pytest.raises(ValueError, match="multiple of max_samples_per_shard=3"):
        write_shard_range(tmp_path / "bad", "editing", 2, 5, 0, max_samples_per_shard=3)
    with pytest.raises(ValueError, match="unknown sample kind 'painting'"):
        write_shard_range(tmp_path / "bad", "painting", 0, 3, 0)
