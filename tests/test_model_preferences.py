"""DPO pairs from a model's own mistakes (vargpt/quickstart/preferences.py) and the pipeline step that builds them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datamodules.shapes import TASKS, benchmark_examples, render_scene, score_image
from datamodules.shards import read_shard
from vargpt.config import ConfigError
from vargpt.quickstart import load_quickstart_config
from vargpt.quickstart.pipeline import model_preference_source
from vargpt.quickstart.preferences import (
    ModelPreferenceSettings,
    preference_pairs,
    preferences_done,
    export_digest,
    write_preference_shards,
)

PIPELINE = Path("configs/quickstart/pipeline.yaml")
SIZE = 32


class ScriptedGenerator:
    """Asked for the images of ``examples`` in order, ``per_prompt`` each: image k of a prompt is its true scene when
    ``right(k)``, a blank canvas otherwise. Records the prompts and seeds it is asked for."""

    def __init__(self, examples, per_prompt: int, right=lambda k: False) -> None:
        self.examples, self.per_prompt, self.right = examples, per_prompt, right
        self.prompts: list[str] = []
        self.seeds: list[int] = []

    def generate_images(self, prompts, seeds):
        images = []
        for prompt, seed in zip(prompts, seeds):
            index, k = divmod(len(self.prompts), self.per_prompt)
            assert prompt == self.examples[index].prompt
            self.prompts.append(prompt)
            self.seeds.append(seed)
            if self.right(k):
                images.append(render_scene(self.examples[index].scene, SIZE))
            else:
                images.append(Image.new("RGB", (SIZE, SIZE), (128, 128, 128)))
        return images


def test_a_prompt_the_model_gets_wrong_pairs_its_render_with_its_wrong_images() -> None:
    settings = ModelPreferenceSettings(per_task=2, samples_per_prompt=3, rejected_per_prompt=2, batch_size=5)
    examples = benchmark_examples(2, 7, split="train")
    generator = ScriptedGenerator(examples, 3, right=lambda k: k == 0)  # the first image of each prompt is the scene
    pairs, summary = preference_pairs(generator, settings, seed=7, size=SIZE)

    assert len(generator.seeds) == 12 * 3 and len(set(generator.seeds)) == 36  # one seed per image
    renders_right = [score_image(render_scene(e.scene, SIZE), e.spec).correct for e in examples]
    assert all(renders_right)  # the world's renders of these prompts pass the scorer
    assert len(pairs) == 12 * 2 and summary["pairs"] == 24 and summary["prompts_with_pairs"] == 12
    assert summary["images"] == 36 and set(summary["sample_accuracy"]) == set(TASKS)
    assert all(np.isclose(value, 1 / 3) for value in summary["sample_accuracy"].values())
    for n, pair in enumerate(pairs):
        example = examples[n // 2]
        assert pair.kind == "preference" and pair.messages == [{"role": "user", "content": example.prompt}]
        assert pair.key == f"shapes_model_preference_7_{n // 2:06d}_{n % 2}"
        chosen, rejected = pair.images["chosen.png"], pair.images["rejected.png"]
        assert np.array_equal(np.asarray(chosen), np.asarray(render_scene(example.scene, SIZE)))
        assert not score_image(rejected, example.spec).correct and pair.metadata["rejected_reason"]
        assert pair.chosen == pair.rejected == {"role": "assistant", "content": "<image_gen>"}
    # held-out training prompts: not the benchmark's (eval split) prompts of the same seed
    assert [e.prompt for e in examples] != [e.prompt for e in benchmark_examples(2, 7)]


def test_prompts_the_model_always_gets_right_give_no_pairs_and_too_few_pairs_fail_naming_the_setting(
    tmp_path: Path,
) -> None:
    settings = ModelPreferenceSettings(per_task=1, samples_per_prompt=2, rejected_per_prompt=1)
    examples = benchmark_examples(1, 0, split="train")
    pairs, summary = preference_pairs(ScriptedGenerator(examples, 2, right=lambda k: True), settings, 0, SIZE)
    assert pairs == [] and summary["prompts_with_pairs"] == 0
    assert all(value == 1.0 for value in summary["sample_accuracy"].values())
    with pytest.raises(ValueError, match="model_preferences.per_task"):
        write_preference_shards(pairs, summary, tmp_path / "pairs", shards=2)


def test_pairs_are_written_evenly_into_readable_shards_and_marked_done_for_those_weights(tmp_path: Path) -> None:
    settings = ModelPreferenceSettings(per_task=2, samples_per_prompt=2, rejected_per_prompt=2, shards=3)
    examples = benchmark_examples(2, 0, split="train")
    pairs, summary = preference_pairs(ScriptedGenerator(examples, 2), settings, 0, SIZE)
    export = tmp_path / "export"
    export.mkdir()
    (export / "model.safetensors").write_bytes(b"weights")
    out = tmp_path / "data" / "model_preference"
    out.mkdir(parents=True)
    (out / "stale.tar").write_bytes(b"")  # an older folder of pairs is replaced, not mixed in
    (out / "summary.json").write_text(json.dumps({"pairs": 1}))
    assert not preferences_done(out, settings, 0, SIZE, export)
    summary["export"] = {"path": str(export), "weights_sha256": export_digest(export)}
    write_preference_shards(pairs, summary, out, settings.shards)

    shards = sorted(out.glob("*.tar"))
    read = [sample for shard in shards for sample in read_shard(shard)]
    assert len(shards) == 3 and [len(list(read_shard(shard))) for shard in shards] == [8, 8, 8]
    assert [sample.key for sample in read] == [pair.key for pair in pairs]
    assert all(sample.kind == "preference" and set(sample.images) == {"chosen.png", "rejected.png"} for sample in read)
    saved = json.loads((out / "summary.json").read_text())
    assert saved["pairs"] == 24 and saved["shards"] == 3
    assert not (tmp_path / "data" / "model_preference.building").exists()

    write_preference_shards(pairs[:10], summary, tmp_path / "uneven", 4)  # exactly as many shards as asked
    assert [len(list(read_shard(shard))) for shard in sorted((tmp_path / "uneven").glob("*.tar"))] == [2, 3, 2, 3]

    assert preferences_done(out, settings, 0, SIZE, export)
    assert not preferences_done(out, settings, 1, SIZE, export)  # another seed
    assert not preferences_done(out, ModelPreferenceSettings(per_task=3, shards=3), 0, SIZE, export)
    (export / "config.json").write_text("{}")
    assert not preferences_done(out, settings, 0, SIZE, export)  # another config (its sampling defaults)
    summary["export"]["weights_sha256"] = export_digest(export)
    write_preference_shards(pairs, summary, out, settings.shards)  # a pairs folder is replaced
    assert preferences_done(out, settings, 0, SIZE, export)
    (export / "model.safetensors").write_bytes(b"retrained")
    assert not preferences_done(out, settings, 0, SIZE, export)  # drawn from other weights


def test_a_folder_that_holds_something_else_is_not_replaced(tmp_path: Path) -> None:
    settings = ModelPreferenceSettings(per_task=1, samples_per_prompt=1, rejected_per_prompt=1, shards=2)
    pairs, summary = preference_pairs(ScriptedGenerator(benchmark_examples(1, 0, split="train"), 1), settings, 0, SIZE)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds no summary.json"):
        write_preference_shards(pairs, summary, tmp_path, settings.shards)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_the_pipeline_builds_the_pairs_only_when_dpo_reads_them(tmp_path: Path) -> None:
    config = load_quickstart_config(PIPELINE, [f"root={tmp_path}"])
    assert model_preference_source(config) == tmp_path / "generation_sft" / "export"
    offline = load_quickstart_config(
        PIPELINE, [f"root={tmp_path}", 'overrides={dpo: ["data.train_sources=[{shards: ${root}/data/preference}]"]}']
    )
    assert model_preference_source(offline) is None
    pattern = load_quickstart_config(PIPELINE, [
        f"root={tmp_path}", 'overrides={dpo: ["data.train_sources=[{shards: ${root}/data/model_preference/*.tar}]"]}'
    ])
    assert model_preference_source(pattern) == tmp_path / "generation_sft" / "export"
    without_dpo = load_quickstart_config(
        PIPELINE, [f"root={tmp_path}", "stages=[tokenizer,alignment,understanding_sft,generation_sft,editing_sft]"]
    )
    assert model_preference_source(without_dpo) is None


@pytest.mark.parametrize(
    "override, named",
    [
        ("model_preferences.per_task=0", "model_preferences.per_task"),
        ("model_preferences.samples_per_prompt=true", "model_preferences.samples_per_prompt"),
        ("model_preferences.rejected_per_prompt=5", "cannot exceed samples_per_prompt"),
        ("model_preferences.shards=1", "model_preferences.shards is 1"),  # two DPO processes read shards of their own
    ],
)
def test_bad_model_preference_settings_name_the_field(tmp_path: Path, override: str, named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        load_quickstart_config(PIPELINE, [f"root={tmp_path}", override])
