"""The embedded default: its config, the DPO interval, the targets, and (slow) a shortened run end to end."""

from __future__ import annotations

import json
import math
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest

from vargpt.config import ConfigError
from vargpt.quickstart import load_quickstart_config, run_pipeline
from vargpt.quickstart.evaluation import first_images_summary, paired_delta
from vargpt.quickstart.pipeline import data_done, write_data
from vargpt.quickstart.report import check_targets, given_scales_table, sample_grids, window_means

PIPELINE = Path("configs/quickstart/pipeline.yaml")
SHORT = Path("configs/quickstart/short.yaml")
# The term a stage's trainable groups move: alignment and the generation stages train no text parameters, so their
# text loss (included in train/loss) stays near where the frozen LLM puts it.
TRAINED_LOSS = dict.fromkeys(("alignment", "generation_sft", "editing_sft"), "train/image_loss")


def records(flags: list[int], tags: list[str]) -> list[dict]:
    pairs = enumerate(zip(flags, tags))
    return [{"index": i, "sample": 0, "tag": tag, "correct": bool(flag)} for i, (flag, tag) in pairs]


def test_pipeline_files_load_and_every_stage_file_validates(tmp_path: Path) -> None:
    config = load_quickstart_config(PIPELINE, [f"root={tmp_path}"])
    assert config.stages == ["tokenizer", "alignment", "understanding_sft", "generation_sft", "dpo", "editing_sft"]
    assert config.evaluation.per_task * 6 >= 200  # the DPO interval is over at least 200 prompts
    assert config.stage_arguments("dpo")[0] == f"root={tmp_path}"


def test_long_pipeline_is_the_default_with_longer_understanding_and_generation_sft(tmp_path: Path) -> None:
    from vargpt.run_config import load_run_config

    default = load_quickstart_config(PIPELINE, [f"root={tmp_path}"])
    long = load_quickstart_config(Path("configs/quickstart/long.yaml"), [f"root={tmp_path}"])
    for field in ("stages", "data", "model_preferences", "vision", "text_tokenizer", "evaluation"):
        assert getattr(long, field) == getattr(default, field), field
    steps = {}
    for stage in long.stages:
        run = load_run_config(long.stage_file(stage), long.stage_arguments(stage))
        default_run = load_run_config(default.stage_file(stage), default.stage_arguments(stage))
        steps[stage] = (default_run.trainer.max_steps, run.trainer.max_steps)
    assert steps["understanding_sft"] == (300, 900)
    assert steps["generation_sft"] == (2000, 6000)
    assert all(before == after for stage, (before, after) in steps.items() if stage not in
               ("understanding_sft", "generation_sft"))


@pytest.mark.parametrize(
    "override, named",
    [
        ("stages=[alignment,tokenizer]", "pipeline order"),
        ("stages=[alignment,painting]", "painting"),
        ("stages=[tokenizer]", "must end with a VARGPT stage"),
        ("overrides={painting: [a=1]}", "painting"),
        ("evaluation.per_task=0", "evaluation.per_task"),
        ("evaluation.colour=1", "colour"),
        ("overrides={dpo: [trainer.max_step=3]}", "max_step"),
        ("data.samples_per_shard=0", "data.samples_per_shard"),
        ("data.samples_per_shard=4000", "lower data.samples_per_shard"),  # one shard per kind, two DDP processes
        ("data.counts={editing: 1000}", "1 shard\\(s\\) of editing samples"),  # the smallest kind decides
        ("data.counts={painting: 3}", "unknown kind 'painting'"),
        ("data.counts={understanding: 0}", "data.counts.understanding"),
    ],
)
def test_bad_pipeline_settings_name_the_field(tmp_path: Path, override: str, named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        load_quickstart_config(PIPELINE, [f"root={tmp_path}", override])


def test_data_step_writes_each_kinds_count_and_the_same_shards_in_parallel(tmp_path: Path) -> None:
    settings = ["data.count_per_kind=6", "data.counts={understanding: 9}", "data.samples_per_shard=4", "data.size=16"]
    folders = {}
    for processes in (1, 2):
        config = load_quickstart_config(PIPELINE, [f"root={tmp_path / str(processes)}", *settings])
        folders[processes] = write_data(config, processes=processes)
    assert data_done(config)
    for kind, samples in {"generation": 6, "understanding": 9, "editing": 6, "preference": 6}.items():
        shards = sorted((folders[2] / kind).glob("*.tar"))
        assert [path.name for path in shards] == [path.name for path in sorted((folders[1] / kind).glob("*.tar"))]
        assert all(path.read_bytes() == (folders[1] / kind / path.name).read_bytes() for path in shards)
        with tarfile.open(shards[-1]) as last:  # 4 samples per shard: the last one holds the remainder
            keys = {name.split(".", 1)[0] for name in last.getnames()}
        assert (len(shards), len(keys)) == (math.ceil(samples / 4), samples - 4 * (len(shards) - 1))


def test_paired_delta_is_the_difference_of_task_means_with_a_bootstrap_interval() -> None:
    tags = ["a"] * 100 + ["b"] * 100
    before = records([0] * 50 + [1] * 50 + [1] * 100, tags)  # a: 0.5, b: 1.0 -> overall 0.75
    after = records([1] * 90 + [0] * 10 + [1] * 100, tags)  # a: 0.9, b: 1.0 -> overall 0.95
    result = paired_delta(before, after, resamples=500, seed=1)
    assert result["before_overall"] == pytest.approx(0.75) and result["after_overall"] == pytest.approx(0.95)
    assert result["delta_overall"] == pytest.approx(0.2)
    low, high = result["ci95"]
    assert 0.0 < low < 0.2 < high < 0.4 and result["n_prompts"] == 200
    unchanged = paired_delta(before, before, resamples=100)
    assert unchanged["delta_overall"] == 0.0 and unchanged["ci95"] == [0.0, 0.0]  # paired: no noise at all


def test_paired_delta_resamples_prompts_not_images() -> None:
    tags = ["a"] * 30 + ["b"] * 30
    before = records([0] * 60, tags)
    after = records([1, 0, 0] * 20, tags)
    single = paired_delta(before, after, resamples=300, seed=2)
    # every prompt twice, its two images alike: the same prompts, so the same interval (resampling the images
    # would have made it narrower)
    twice = [dict(r, sample=s) for r in before for s in (0, 1)], [dict(r, sample=s) for r in after for s in (0, 1)]
    doubled = paired_delta(*twice, resamples=300, seed=2)
    assert doubled["ci95"] == pytest.approx(single["ci95"]) and doubled["delta_overall"] == pytest.approx(1 / 3)
    assert doubled["n_prompts"] == 60 and doubled["n_images"] == 120 and single["ci95"][0] > 0.1


def test_paired_delta_refuses_unpaired_records() -> None:
    with pytest.raises(ValueError, match="same non-empty set"):
        paired_delta(records([1, 0], ["a", "a"]), records([1], ["a"]))
    mixed = records([1, 0], ["a", "b"])
    mixed[1]["index"], mixed[1]["sample"] = 0, 1  # one prompt, two task types
    with pytest.raises(ValueError, match="different task types"):
        paired_delta(mixed, mixed)


def test_first_images_summary_scores_each_prompts_first_image_only() -> None:
    first = [{"index": i, "sample": 0, "tag": tag, "correct": ok, "prompt": f"p{i}"}
             for i, (tag, ok) in enumerate([("a", True), ("a", False), ("b", True)])]
    later = [dict(r, sample=1, correct=not r["correct"]) for r in first]
    assert first_images_summary(later + first) == pytest.approx({"overall": (0.5 + 1.0) / 2, "a": 0.5, "b": 1.0})
    with pytest.raises(ValueError, match="sample 0"):
        first_images_summary(later)


def test_targets_report_met_missed_and_unmeasured() -> None:
    metrics = {"shapes_geneval": {"overall": 0.7}, "shapes_qa": {"accuracy": 0.5},
               "dpo": {"delta_overall": 0.05, "ci95": [-0.01, 0.11]}, "wall_seconds": 900.0}
    checks = check_targets(metrics)
    assert checks["shapes_geneval.overall >= 0.6"] == {"value": 0.7, "met": True}
    assert checks["shapes_qa.accuracy >= 0.85"]["met"] is False
    assert checks["dpo.delta_overall > 0"]["met"] is False  # positive, but the interval includes zero
    assert checks["editing.success >= 0.5"] == {"value": None, "met": None}
    assert checks["wall_seconds <= 1200"]["met"] is True
    assert window_means([(step, float(step)) for step in range(20)]) == (0.5, 18.5)


def test_generation_grids_show_one_image_of_each_prompt_first(tmp_path: Path) -> None:
    from PIL import Image

    def write_records(folder: Path, correct_sample: int) -> None:
        (folder / "images").mkdir(parents=True)
        lines = []
        for index in range(3):
            for sample in range(3):
                name = f"images/{index}_{sample}.png"
                Image.new("RGB", (8, 8), (40 * index, 0, 0)).save(folder / name)
                lines.append(json.dumps({"index": index, "sample": sample, "tag": "counting", "image": name,
                                         "prompt": f"prompt {index}", "correct": sample == correct_sample}))
        (folder / "shapes_generation.jsonl").write_text("\n".join(lines) + "\n")

    write_records(tmp_path / "eval" / "final", 0)
    (tmp_path / "eval" / "final" / "shapes_editing.jsonl").write_text("")
    write_records(tmp_path / "eval" / "before_dpo", 1)
    write_records(tmp_path / "eval" / "after_dpo", 0)
    config = load_quickstart_config(PIPELINE, [f"root={tmp_path}", "evaluation.grid_per_task=3"])
    grids = sample_grids(config, tmp_path / "eval", tmp_path / "report")
    assert grids["generation_counting.png"] == ["prompt 0 (correct)", "prompt 1 (correct)", "prompt 2 (correct)"]
    # before / after rows: the same prompt and sample on both sides, two prompts per task type
    assert grids["dpo_before_after.png"] == ["prompt 0: before wrong | after correct",
                                             "prompt 1: before wrong | after correct"]
    grid = Image.open(tmp_path / "report" / "samples" / "generation_counting.png")
    assert grid.height >= 8 * 4 and grid.width >= 3 * 8 * 4  # three upscaled images side by side


def test_a_stage_resumes_an_interrupted_attempt_and_a_failure_names_the_stage(tmp_path: Path) -> None:
    from vargpt.quickstart.pipeline import QuickstartError, run_stage

    config = load_quickstart_config(PIPELINE, [f"root={tmp_path}"])
    commands = []

    def finishes(command: list[str], **options: object) -> subprocess.CompletedProcess:
        commands.append(command)
        (tmp_path / "dpo" / "export").mkdir(parents=True)
        (tmp_path / "dpo" / "export" / "config.json").write_text("{}")
        return subprocess.CompletedProcess(command, 0)

    (tmp_path / "dpo" / "checkpoints").mkdir(parents=True)
    (tmp_path / "dpo" / "checkpoints" / "last.ckpt").write_bytes(b"")
    assert run_stage(config, "dpo", runner=finishes) == tmp_path / "dpo" / "export"
    config_at = commands[0].index("configs/quickstart/dpo.yaml")
    assert commands[0][config_at - 1].endswith("train.py") and commands[0][config_at + 1] == f"root={tmp_path}"
    assert commands[0][-1] == "--resume=last"
    with pytest.raises(QuickstartError, match="stage editing_sft failed"):
        run_stage(config, "editing_sft", runner=lambda command, **options: subprocess.CompletedProcess(command, 1))


def test_a_stage_on_several_processes_starts_them_through_the_launcher(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    from vargpt.quickstart.pipeline import available_cores, stage_environment, train_command

    config = load_quickstart_config(PIPELINE, [f"root={tmp_path}"])
    command = train_command(config, "alignment")  # the quickstart trains on two CPU processes
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    assert command[:5] == launcher and command[5].endswith("train.py")
    assert command[6:] == ["configs/quickstart/alignment.yaml", *config.stage_arguments("alignment")]
    one = load_quickstart_config(PIPELINE, [f"root={tmp_path}", "overrides={alignment: [trainer.devices=1]}"])
    assert train_command(one, "alignment")[:2] == [sys.executable, command[5]]
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert stage_environment(2)["OMP_NUM_THREADS"] == str(max(1, available_cores() // 2))  # as Lightning sets it
    assert "OMP_NUM_THREADS" not in stage_environment(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert stage_environment(2)["OMP_NUM_THREADS"] == "3"  # the user's own setting wins


@pytest.mark.slow
def test_shortened_quickstart_runs_every_stage_and_writes_the_report(tmp_path: Path) -> None:
    root = tmp_path / "quickstart"
    config = load_quickstart_config(SHORT, [f"root={root}"])
    metrics = run_pipeline(config)
    for stage in config.stages:
        first, last = metrics["stages"][stage]["losses"][TRAINED_LOSS.get(stage, "train/loss")]
        assert last < first, f"{stage}: loss did not fall ({first:.4f} -> {last:.4f})"
        assert (root / stage / "export" / "config.json").is_file()
        assert (root / "report" / "stages" / f"{stage}.md").is_file()
        assert (root / "report" / "curves" / f"{stage}.png").is_file()
    saved = json.loads((root / "report" / "metrics.json").read_text())
    for key in ("overall", "single_object", "two_object", "counting", "colors", "position", "color_attr"):
        assert 0.0 <= saved["shapes_geneval"][key] <= 1.0
    assert 0.0 <= saved["shapes_qa"]["accuracy"] <= 1.0 and 0.0 <= saved["editing"]["success"] <= 1.0
    assert 0.0 <= saved["shapes_qa"]["blank_image_accuracy"] <= 1.0
    given = saved["generation_given_scales"]
    assert list(given["overall"]) == [str(k) for k in range(len(given["schedule"]) + 1)]
    assert given["overall"][str(len(given["schedule"]))] == saved["tokenizer_reconstruction"]["overall"]
    assert set(given["tasks"]) == {"single_object", "two_object", "counting", "colors", "position", "color_attr"}
    for task, scores in given["tasks"].items():  # k = 0 is the benchmark's first images, k = K the ceiling
        assert list(scores) == list(given["overall"]) and all(0.0 <= v <= 1.0 for v in scores.values())
        assert scores[str(len(given["schedule"]))] == saved["tokenizer_reconstruction"][task]
    low, high = saved["dpo"]["ci95"]
    assert low <= saved["dpo"]["delta_overall"] <= high and saved["wall_seconds"] > 0
    pairs = saved["dpo"]["pairs"]  # DPO trained on the generation SFT model's own wrong images
    assert 0 < pairs["pairs"] <= 2 * pairs["prompts_with_pairs"] and pairs["prompts"] == 6 * 17
    assert saved["step_seconds"]["model_preferences"] > 0
    vision = saved["vision_pretraining"]  # alignment started from the pipeline's pretrained vision tower
    assert vision["steps"] == config.vision.steps and 0.0 <= vision["shape_on_objects"] <= 1.0
    assert saved["step_seconds"]["vision"] > 0 and (root / "vision" / "model.safetensors").is_file()
    assert len(list((root / "data" / "model_preference").glob("*.tar"))) == config.model_preferences.shards
    samples = {path.name for path in (root / "report" / "samples").iterdir()}
    assert {"edits.png", "dpo_before_after.png", "generation_counting.png"} <= samples
    report = (root / "report" / "README.md").read_text()
    assert report.startswith("# Quickstart report") and "pairs of the generation SFT model's own wrong" in report
    page = (root / "report" / "stages" / "generation_sft.md").read_text()  # trained as the main job: two processes
    assert "| processes | 2 |" in page and "| samples per optimizer step | 32 |" in page
    assert "| DPO scales compared | [0, 1, 2] |" in (root / "report" / "stages" / "dpo.md").read_text()
    # a second launch finds every step done and only re-evaluates
    again = run_pipeline(config)
    assert again["step_seconds"]["tokenizer"] == metrics["step_seconds"]["tokenizer"]
    assert again["step_seconds"]["model_preferences"] == metrics["step_seconds"]["model_preferences"]
    assert again["step_seconds"]["vision"] == metrics["step_seconds"]["vision"]
    assert np.isclose(again["shapes_geneval"]["overall"], metrics["shapes_geneval"]["overall"])


def test_given_scales_table_has_a_row_per_k_and_a_column_per_task() -> None:
    given = {"overall": {"0": 0.1, "1": 0.5, "2": 0.9}, "schedule": [[1, 1], [2, 2]],
             "tasks": {"colors": {"0": 0.2, "1": 0.6, "2": 1.0}, "counting": {"0": 0.0, "1": 0.4, "2": 0.8}}}
    lines = given_scales_table(given).splitlines()
    assert [cell.strip() for cell in lines[0].strip("|").split("|")] == [
        "scales given", "of", "overall", "colors", "counting"]
    assert len(lines) == 2 + 3 and "0.6" in lines[3] and "0.4" in lines[3]
    assert "colors" not in given_scales_table({k: v for k, v in given.items() if k != "tasks"})
