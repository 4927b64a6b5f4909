"""RunConfig: includes, overrides, strict validation (unknown keys and bad values name the field), the resolved
config round trip, and every shipped stage config loads."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from vargpt.config import ConfigError
from vargpt.run_config import (
    load_run_config,
    load_run_dict,
    run_config_from_dict,
    run_config_to_dict,
    save_resolved_config,
)

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = str(ROOT / "configs/model/tiny.yaml")


def write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def base_run(tmp_path: Path) -> dict:
    return {"model": TINY_MODEL, "stage": {"stage": "generation_sft"}, "output_dir": str(tmp_path / "out")}


def test_base_include_is_merged_under_the_file_and_overrides_win(tmp_path: Path) -> None:
    write(tmp_path / "common.yaml", {**base_run(tmp_path), "trainer": {"max_steps": 10, "precision": "32-true"}})
    (tmp_path / "stages").mkdir()
    child = write(tmp_path / "stages" / "dpo.yaml", {"_base_": "../common.yaml", "stage": {"stage": "dpo"},
                                                     "trainer": {"max_steps": 20}})
    run = load_run_config(child, ["trainer.accumulate_grad_batches=4", "stage.dpo.beta=0.2"])
    assert run.stage.stage == "dpo" and run.stage.dpo.beta == 0.2
    assert (run.trainer.max_steps, run.trainer.precision, run.trainer.accumulate_grad_batches) == (20, "32-true", 4)
    assert run.trainer.gradient_clip_val == 1.0  # VARGPT §4.3 default
    assert run.model_config().decoder.width == 64


def test_root_moves_every_interpolated_path(tmp_path: Path) -> None:
    run_file = {**base_run(tmp_path), "root": "runs/a", "output_dir": "${root}/stage",
                "init_from": {"export": "${root}/previous/export"},
                "data": {"train_sources": [{"shards": "${root}/data/generation", "name": "generation"}]}}
    config = write(tmp_path / "run.yaml", run_file)
    run = load_run_config(config, ["root=elsewhere"])
    assert (run.output_dir, run.init_from.export) == ("elsewhere/stage", "elsewhere/previous/export")
    assert run.data.train_sources[0].shards == "elsewhere/data/generation"


def test_defaults_list_and_include_cycles(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", {**base_run(tmp_path), "trainer": {"max_steps": 3}})
    write(tmp_path / "b.yaml", {"trainer": {"log_every_n_steps": 7}})
    run = load_run_config(write(tmp_path / "c.yaml", {"defaults": ["a.yaml", "b.yaml"]}))
    assert (run.trainer.max_steps, run.trainer.log_every_n_steps) == (3, 7)
    write(tmp_path / "loop.yaml", {"_base_": "loop2.yaml"})
    write(tmp_path / "loop2.yaml", {"_base_": "loop.yaml"})
    with pytest.raises(ConfigError, match="cycle"):
        load_run_dict(tmp_path / "loop.yaml")
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_run_dict(write(tmp_path / "d.yaml", {"_base_": "missing.yaml"}))


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("trainer.max_stepz=3", "config.trainer.max_stepz"),
        ("trainer.strategy.sharding=full", "config.trainer.strategy.sharding"),
        ("stage.optimzer.lr=1", "optimzer"),
        ("callbacks.sample.every_n_steps=1", "config.callbacks.sample"),
        ("init_from.exports=x", "config.init_from.exports"),
        ("unknown_section=1", "config.unknown_section"),
    ],
)
def test_unknown_keys_are_errors_naming_them_and_the_valid_keys(tmp_path: Path, override: str, named: str) -> None:
    config = write(tmp_path / "run.yaml", base_run(tmp_path))
    with pytest.raises(ConfigError, match="unknown key|unexpected keyword") as error:
        load_run_config(config, [override])
    assert named in str(error.value)


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("trainer.max_steps=0", "trainer.max_steps"),
        ("trainer.max_steps=ten", "trainer.max_steps"),
        ("trainer.strategy.name=horovod", "trainer.strategy.name"),
        ("data.mode=pairs", "data.mode"),
        ("stage.stage=pretrain", "stage"),
        ("callbacks.samples.every_n_steps=5", "callbacks.samples.prompts"),
        ("model=missing.yaml", "missing.yaml"),
    ],
)
def test_bad_values_name_the_field(tmp_path: Path, override: str, field: str) -> None:
    config = write(tmp_path / "run.yaml", base_run(tmp_path))
    with pytest.raises((ConfigError, FileNotFoundError)) as error:
        load_run_config(config, [override])
    assert field in str(error.value)


def test_init_from_takes_an_export_or_parts_not_both(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="either export or parts"):
        run_config_from_dict({**base_run(tmp_path), "init_from": {"export": "a", "bsq_vae": "b"}})
    with pytest.raises(ConfigError, match="go together"):
        run_config_from_dict({**base_run(tmp_path), "init_from": {"qwen2_vl": "a"}})
    for other in ({"export": "a"}, {"qwen2_vl": "a", "infinity": "b", "bsq_vae": "c"}):  # they bring their own ViT
        with pytest.raises(ConfigError, match="init_from.vision loads a vision tower into a fresh model"):
            run_config_from_dict({**base_run(tmp_path), "init_from": {**other, "vision": "v"}})
    assert run_config_from_dict({**base_run(tmp_path), "init_from": {"bsq_vae": "b", "vision": "v"}}).init_from.vision


def test_resolved_config_reloads_to_the_same_run(tmp_path: Path) -> None:
    config = write(tmp_path / "run.yaml", {**base_run(tmp_path), "resolution_phases": [
        {"step": 0, "size": 16, "schedule": [[1, 1], [2, 2], [4, 4]]}, {"step": 5, "size": 32, "stride": 4}]})
    run = load_run_config(config, ["trainer.max_steps=9"])
    saved = save_resolved_config(run, tmp_path / "resolved")
    assert saved.name == "config.yaml"
    assert run_config_to_dict(load_run_config(saved)) == run_config_to_dict(run)
    assert load_run_config(saved).resolution_phases[1].stride == 4


def test_ranks_saving_the_resolved_config_at_once_do_not_collide(tmp_path: Path) -> None:
    # Every process of a torchrun launch writes config.yaml before Lightning knows its rank; with one shared temporary
    # name, one process's rename took the other's file away (FileNotFoundError) and the stage failed.
    run = load_run_config(write(tmp_path / "run.yaml", base_run(tmp_path)))
    folder = tmp_path / "resolved"
    with ThreadPoolExecutor(max_workers=8) as pool:
        saved = list(pool.map(lambda _: save_resolved_config(run, folder), range(64)))
    assert {path.name for path in saved} == {"config.yaml"}
    assert [path.name for path in folder.iterdir()] == ["config.yaml"]  # no temporary left behind
    assert run_config_to_dict(load_run_config(saved[0])) == run_config_to_dict(run)


# configs/quickstart's pipeline configs, not stage configs (tests/test_quickstart.py loads them)
PIPELINE_FILES = ("pipeline", "short", "long")
SHIPPED = sorted(
    path
    for folder in ("quickstart", "vargpt_v1_1")
    for path in (ROOT / "configs" / folder).glob("[!_]*.yaml")
    if path.stem not in PIPELINE_FILES
)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda path: f"{path.parent.name}/{path.stem}")
def test_every_shipped_stage_config_validates(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # model paths in the shipped configs are relative to the repository root
    run = load_run_config(path)
    assert path.stem.startswith(run.stage.stage)
    assert run.output_dir.endswith(path.stem)


def test_evaluation_callback_sections_are_validated_naming_the_field(tmp_path: Path) -> None:
    run = run_config_from_dict({**base_run(tmp_path), "callbacks": {"shapes_eval": {"every_n_steps": 5}}})
    assert run.callbacks.shapes_eval.per_task == 2 and run.callbacks.fid_eval.every_n_steps == 0
    bad = [
        ({"shapes_eval": {"per_task": 0}}, "callbacks.shapes_eval.per_task"),
        ({"shapes_eval": {"top_p": 1.5}}, "callbacks.shapes_eval.top_p"),
        ({"shapes_eval": {"every_n_step": 5}}, "every_n_step"),
        ({"fid_eval": {"every_n_steps": 5, "prompts": ["a", "b"]}}, "callbacks.fid_eval.reference"),
        ({"fid_eval": {"every_n_steps": 5, "reference": "r", "prompts": ["a", "b"]}}, "fid_eval.inception_weights"),
        ({"fid_eval": {"every_n_steps": 5, "reference": "r", "inception_weights": "w", "prompts": ["a"]}},
         "at least 2 prompts"),
        ({"fid_eval": {"prompts": ["a", "b"], "prompts_file": "p.txt"}}, "not both"),
    ]
    for callbacks, message in bad:
        with pytest.raises(ConfigError, match=message):
            run_config_from_dict({**base_run(tmp_path), "callbacks": callbacks})
    (tmp_path / "prompts.txt").write_text("a red circle\n\na blue square\n")
    fid = run_config_from_dict({**base_run(tmp_path), "callbacks": {"fid_eval": {
        "every_n_steps": 5, "reference": "r", "inception_weights": "w", "prompts_file": str(tmp_path / "prompts.txt")}}})
    assert fid.callbacks.fid_eval.prompt_list() == ["a red circle", "a blue square"]
