"""``python -m vargpt.infer``: chat / generate / edit end to end on a tiny exported model; safe output names."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers_tiny_model import TINY_IMAGE_SIZE, tiny_model, tiny_pil_image
from vargpt.checkpoints.vargpt import save_pretrained
from vargpt.infer import main, output_stem, slugify

SAFE_NAME = re.compile(r"^\d{4}-[a-z0-9-]+-seed\d+\.(png|json)$")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_pretrained(tiny_model(seed=5), tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="module")
def image_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("images") / "input.png"
    tiny_pil_image(2).save(path)
    return path


def test_slugs_never_leave_the_folder() -> None:
    assert slugify("../../etc/passwd") == "etc-passwd"
    assert slugify("/") == "image" and slugify("..") == "image" and slugify("") == "image"
    assert slugify("Ünïcode Cat!  ") == "n-code-cat"
    assert len(slugify("word " * 100)) <= 60 and not slugify("word " * 100).endswith("-")
    assert output_stem("C:\\Windows\\x", 3, 9) == "0003-c-windows-x-seed9"


def test_generate_writes_images_and_sidecars(model_dir: Path, tmp_path: Path) -> None:
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("a red circle\n\n/etc/shadow\n")
    out = tmp_path / "nested" / "out"
    argv = ["generate", "--model", str(model_dir), "--prompt", "../../etc/passwd", "--prompts-file", str(prompts_file),
            "--out", str(out), "--seed", "11", "--cfg", "2.0", "--temperature", "0.7", "--top-p", "0.9",
            "--batch-size", "2", "--device", "cpu"]
    assert main(argv) == 0
    names = sorted(os.listdir(out))
    assert len(names) == 6 and all(SAFE_NAME.match(name) for name in names)
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == sorted(names + ["prompts.txt"])
    sidecars = [json.loads((out / name).read_text()) for name in names if name.endswith(".json")]
    assert [s["prompt"] for s in sidecars] == ["../../etc/passwd", "a red circle", "/etc/shadow"]
    assert [s["seed"] for s in sidecars] == [11, 12, 13]
    first = sidecars[0]
    assert (first["cfg"], first["temperature"], first["top_p"]) == (2.0, 0.7, 0.9)
    assert first["schedule"] == [[1, 1], [2, 2], [4, 4]] and first["command"] == "generate"
    image = Image.open(out / first["image"])
    assert image.size == (TINY_IMAGE_SIZE, TINY_IMAGE_SIZE) == (first["width"], first["height"])

    again = tmp_path / "again"
    assert main(["generate", "--model", str(model_dir), "--prompt", "../../etc/passwd", "--out", str(again),
                 "--seed", "11", "--cfg", "2.0", "--temperature", "0.7", "--top-p", "0.9"]) == 0
    repeat = np.asarray(Image.open(again / first["image"]))
    assert np.array_equal(repeat, np.asarray(image))


def test_generate_size_and_edit(model_dir: Path, image_path: Path, tmp_path: Path) -> None:
    argv = ["generate", "--model", str(model_dir), "--prompt", "x", "--out", str(tmp_path / "g"), "--size", "8"]
    assert main(argv) == 0
    assert Image.open(tmp_path / "g" / "0000-x-seed0.png").size == (8, 8)
    out = tmp_path / "edit"
    assert main(["edit", "--model", str(model_dir), "--image", str(image_path), "--prompt", "make the circle blue",
                 "--out", str(out), "--seed", "3"]) == 0
    sidecar = json.loads((out / "0000-make-the-circle-blue-seed3.json").read_text())
    assert sidecar["input_image"] == str(image_path) and sidecar["command"] == "edit"
    assert Image.open(out / sidecar["image"]).size == (TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)


def test_chat_prints_the_answer(model_dir: Path, image_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["chat", "--model", str(model_dir), "--image", str(image_path), "--prompt", "describe the image",
            "--max-new-tokens", "4"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert main(argv) == 0
    assert capsys.readouterr().out == first  # greedy: the same answer twice


def test_bad_input_is_named(model_dir: Path, image_path: Path, tmp_path: Path,
                            capsys: pytest.CaptureFixture[str]) -> None:
    def error(argv: list[str]) -> str:
        assert main(argv) == 2
        return capsys.readouterr().err

    assert "model folder not found" in error(["chat", "--model", str(tmp_path / "gone"), "--prompt", "hi"])
    assert "image not found" in error(["chat", "--model", str(model_dir), "--image", str(tmp_path / "x.png"),
                                       "--prompt", "hi"])
    assert "prompts file not found" in error(["generate", "--model", str(model_dir), "--prompts-file",
                                              str(tmp_path / "p.txt"), "--out", str(tmp_path)])
    assert "no prompt given" in error(["generate", "--model", str(model_dir), "--out", str(tmp_path)])
    assert "--size 6 must be a positive multiple" in error(["generate", "--model", str(model_dir), "--prompt", "a",
                                                            "--out", str(tmp_path / "o"), "--size", "6"])
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("not a model")
    assert "no *.safetensors" in error(["chat", "--model", str(tmp_path / "junk"), "--prompt", "hi"])
    bare = tmp_path / "bare"
    shutil.copytree(model_dir, bare)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (bare / name).unlink()
    assert "has no tokenizer files" in error(["chat", "--model", str(bare), "--prompt", "hi"])


@pytest.mark.slow
def test_module_entry_point(model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    command = [sys.executable, "-m", "vargpt.infer", "generate", "--model", str(model_dir), "--prompt", "a red circle",
               "--out", str(out), "--device", "cpu"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("0000-a-red-circle-seed0.png")
    assert (out / "0000-a-red-circle-seed0.json").is_file()
