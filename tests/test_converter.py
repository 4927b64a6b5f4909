"""The converter from the reference's LLaMA-Factory ShareGPT JSON: every layout, kind inference, and rejects."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from datamodules.converter import main
from datamodules.shards import read_shard


@pytest.fixture
def images_root(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    for index, colour in enumerate(["red", "green", "blue", "white"]):
        Image.new("RGB", (40, 30), colour).save(root / f"{index}.png")
    (root / "broken.png").write_bytes(b"this is not an image")
    return root


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


GOOD_RECORDS = [
    {"messages": [user("What is <image>?"), assistant("A red rectangle.")], "images": ["0.png"]},
    {"messages": [user("Draw a green field."), assistant("I have designed it.<image_gen>")], "images": ["1.png"]},
    {"messages": [user("Transform this image <image> to blue"), assistant("The output image is: <image_gen>")],
     "images": ["0.png", "2.png"], "id": 4765},
    {"conversations": [{"from": "human", "value": "Please create a painting of a weasel"}],
     "chosen": {"from": "gpt", "value": "Here's a rendered painting.<image_gen>"},
     "rejected": {"from": "gpt", "value": "Here's a rendered painting.<image_gen>"},
     "images": ["1.png", "3.png"]},
    {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                       {"from": "gpt", "value": "Hello."}]},
]

BAD_RECORDS = [
    ({"messages": [user("What is <image>?"), assistant("A dog.")], "images": ["missing.jpg"]}, "does not exist"),
    ({"messages": [user("What is <image>?"), assistant("A dog.")], "images": ["broken.png"]}, "does not decode"),
    ({"messages": [user("What is <image> and <image>?"), assistant("Two.")], "images": ["0.png"]}, "need 2 images"),
    ({"messages": [{"role": "robot", "content": "beep"}, assistant("ok")]}, "role 'robot'"),
    ({"messages": [assistant("I start."), user("Then me.")]}, "roles must alternate"),
    ({"images": []}, "missing field 'messages'"),
    ({"messages": [user("Draw <image_gen>"), assistant("ok")], "images": ["0.png"]}, "only assistant turns"),
    ({"conversations": [{"from": "human", "value": "Draw"}], "chosen": {"from": "gpt", "value": "<image_gen>"},
      "images": ["0.png"]}, "lacks 'rejected'"),
]


def write_input(tmp_path, records):
    path = tmp_path / "input.json"
    path.write_text(json.dumps(records))
    return path


def test_converts_every_layout_and_infers_kinds(tmp_path, images_root, capsys):
    path = write_input(tmp_path, GOOD_RECORDS)
    assert main([str(path), "--images-root", str(images_root), "--out", str(tmp_path / "out")]) == 0
    samples = list(read_shard(tmp_path / "out" / "shard-000000.tar"))
    assert [s.kind for s in samples] == ["understanding", "generation", "editing", "preference", "text"]
    understanding, generation, editing, preference, text = samples
    assert list(understanding.images) == ["input_0.png"] and understanding.images["input_0.png"].size == (40, 30)
    assert list(generation.images) == ["target.png"]
    assert list(editing.images) == ["input_0.png", "target.png"] and editing.metadata["id"] == 4765
    assert np.asarray(editing.images["target.png"])[0, 0].tolist() == [0, 0, 255]  # images[1] = blue target
    assert list(preference.images) == ["chosen.png", "rejected.png"]
    assert np.asarray(preference.images["rejected.png"])[0, 0].tolist() == [255, 255, 255]
    assert preference.chosen == {"role": "assistant", "content": "Here's a rendered painting.<image_gen>"}
    assert preference.messages == [user("Please create a painting of a weasel")]
    assert text.messages[0] == {"role": "system", "content": "Be brief."}
    assert "converted 5 of 5 records into 1 shards" in capsys.readouterr().out
    summary = json.loads((tmp_path / "out" / "shard-summary.json").read_text())
    assert summary["shards"] == [{"name": "shard-000000.tar", "samples": 5}]
    assert (tmp_path / "out" / "shard-rejects.jsonl").read_text() == ""


def test_rejects_are_reported_with_index_and_reason(tmp_path, images_root, capsys):
    records = [GOOD_RECORDS[0]] + [record for record, _ in BAD_RECORDS] + [GOOD_RECORDS[1]]
    path = write_input(tmp_path, records)
    out = tmp_path / "out"
    assert main([str(path), "--images-root", str(images_root), "--out", str(out), "--prefix", "ref"]) == 0
    rejects = [json.loads(line) for line in (out / "ref-rejects.jsonl").read_text().splitlines()]
    assert [reject["index"] for reject in rejects] == list(range(1, 1 + len(BAD_RECORDS)))
    for reject, (_, reason) in zip(rejects, BAD_RECORDS):
        assert reason in reject["reason"]
    captured = capsys.readouterr()
    assert f"converted 2 of {len(records)} records" in captured.out and f"rejected {len(BAD_RECORDS)}" in captured.out
    assert "rejected record 1:" in captured.err
    assert sum(1 for _ in read_shard(out / "ref-000000.tar")) == 2


def test_explicit_kind_mismatch_is_rejected_and_strict_fails(tmp_path, images_root):
    path = write_input(tmp_path, GOOD_RECORDS[:2])
    out = tmp_path / "out"
    code = main([str(path), "--images-root", str(images_root), "--out", str(out), "--kind", "generation", "--strict"])
    assert code == 1
    (reject,) = [json.loads(line) for line in (out / "shard-rejects.jsonl").read_text().splitlines()]
    assert reject["index"] == 0 and "kind 'understanding'" in reject["reason"]


def test_jsonl_input_and_jpg_members(tmp_path, images_root):
    path = tmp_path / "input.jsonl"
    path.write_text("\n".join(json.dumps(record) for record in GOOD_RECORDS[:2]) + "\n")
    main([str(path), "--images-root", str(images_root), "--out", str(tmp_path / "out"), "--image-format", "jpg"])
    samples = list(read_shard(tmp_path / "out" / "shard-000000.tar"))
    assert [list(s.images) for s in samples] == [["input_0.jpg"], ["target.jpg"]]


@pytest.mark.parametrize(
    "content, message",
    [(None, "does not exist"), ("{not json", "is not valid JSON"), ('{"messages": []}', "must hold a JSON list")],
)
def test_bad_input_files_fail_clearly(tmp_path, images_root, capsys, content, message):
    path = tmp_path / "input.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit) as exit_info:
        main([str(path), "--images-root", str(images_root), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_unknown_kind_is_refused(tmp_path, images_root, capsys):
    path = write_input(tmp_path, GOOD_RECORDS)
    with pytest.raises(SystemExit):
        main([str(path), "--images-root", str(images_root), "--out", str(tmp_path / "out"), "--kind", "video"])
    assert "invalid choice: 'video'" in capsys.readouterr().err
