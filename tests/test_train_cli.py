"""train.py end to end on the tiny model: every stage a few steps writes checkpoints, the resolved config, metrics and
the safetensors export; config errors stop the run before any work."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from helpers_tiny_model import tiny_text_tokenizer
from vargpt.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
STAGE_SOURCES = {  # shapes-world kinds each stage reads
    "tokenizer": ["generation"],
    "alignment": ["generation"],
    "understanding_sft": ["understanding", "generation"],
    "generation_sft": ["generation", "editing"],
    "dpo": ["preference"],
    "editing_sft": ["editing"],
}


def load_train_module() -> Any:
    """train.py imported by path (it is a script at the repository root, not a package module)."""
    if "vargpt_train_script" not in sys.modules:
        spec = importlib.util.spec_from_file_location("vargpt_train_script", ROOT / "train.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["vargpt_train_script"] = module
        spec.loader.exec_module(module)
    return sys.modules["vargpt_train_script"]


def write_tiny_assets(folder: Path) -> Path:
    """Shapes-world shards of every kind (32 px) and the tiny text tokenizer under ``folder``."""
    from datamodules.shapes.write import write_shards

    if not (folder / "tokenizer").is_dir():
        write_shards(folder / "data", count_per_kind=8, seed=0, size=32, max_samples_per_shard=4)
        tiny_text_tokenizer().save_pretrained(str(folder / "tokenizer"))
    return folder


def tiny_run(assets: Path, output_dir: Path, stage: str = "generation_sft", **sections: Any) -> dict[str, Any]:
    """A run config of the tiny model on CPU: 2 batches of 2 per epoch, a checkpoint every 2 steps, 4 steps."""
    run: dict[str, Any] = {
        "model": str(ROOT / "configs/model/tiny.yaml"),
        "text_tokenizer": str(assets / "tokenizer"),
        "data": {
            "train_sources": [{"shards": str(assets / "data" / kind), "name": kind} for kind in STAGE_SOURCES[stage]],
            "mode": "preference" if stage == "dpo" else "sft",
            "batch_size": 2,
            "batches_per_epoch": 2,
            "num_workers": 0,
            "persistent_workers": False,
            "shuffle_buffer": 4,
            "generation_size": 16,
            "generation_schedule": [[1, 1], [2, 2], [4, 4]],
            "placeholder_multiple": 8,
            "max_length": 512,
            "understanding_max_pixels": 56 * 56,
        },
        "stage": {"stage": stage, "optimizer": {"lr": 1e-3}, "schedule": {"total_steps": 4}},
        "trainer": {
            "accelerator": "cpu", "devices": 1, "precision": "32-true", "max_steps": 4, "accumulate_grad_batches": 1,
            "log_every_n_steps": 1, "checkpoint_every_n_steps": 2, "keep_checkpoints": -1, "progress_bar": False,
        },
        "callbacks": {"throughput": {"peak_flops": 1e11}},
        "output_dir": str(output_dir),
    }
    for name, values in sections.items():
        run[name] = {**run.get(name, {}), **values} if isinstance(values, dict) else values
    return run


def write_config(path: Path, run: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(run))
    return path


def logged(output_dir: Path, column: str) -> dict[int, float]:
    """``column`` of every launch's ``logs/version_<n>/metrics.csv`` by step (later launches win)."""
    values: dict[int, float] = {}
    versions = sorted((output_dir / "logs").glob("version_*"), key=lambda path: int(path.name.split("_")[1]))
    for version in versions:
        with open(version / "metrics.csv") as stream:
            values.update({int(row["step"]): float(row[column]) for row in csv.DictReader(stream) if row.get(column)})
    return values


@pytest.fixture(scope="session")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_assets(tmp_path_factory.mktemp("tiny_assets"))


@pytest.fixture(autouse=True)
def one_intra_op_thread() -> Iterator[None]:
    """One torch intra-op thread: the tiny runs are ~10x faster on a shared, loaded machine (no thread contention)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def available_stages() -> set[str]:
    from vargpt.stages import STAGES

    return set(STAGES)


def run_stage(assets: Path, tmp_path: Path, stage: str, **sections: Any) -> Path:
    if stage not in available_stages():
        pytest.skip(f"vargpt.stages.STAGES has no {stage!r} LightningModule yet")
    output_dir = tmp_path / stage
    config = write_config(tmp_path / f"{stage}.yaml", tiny_run(assets, output_dir, stage, **sections))
    assert load_train_module().main([str(config)]) == 0
    return output_dir


def check_run_outputs(output_dir: Path, stage: str) -> None:
    assert sorted(path.name for path in (output_dir / "checkpoints").iterdir()) == [
        "last.ckpt", "step0000002.ckpt", "step0000004.ckpt"
    ]
    resolved = yaml.safe_load((output_dir / "config.yaml").read_text())
    assert resolved["stage"]["stage"] == stage and resolved["trainer"]["max_steps"] == 4
    assert sorted(logged(output_dir, "train/loss")) == [0, 1, 2, 3]
    export = json.loads((output_dir / "export" / "config.json").read_text())
    assert export["format"] == ("vargpt-lightning-bsq-vae" if stage == "tokenizer" else "vargpt-lightning")


def test_generation_sft_runs_end_to_end_with_samples_and_export(assets: Path, tmp_path: Path) -> None:
    from vargpt.checkpoints.vargpt import from_pretrained

    output_dir = run_stage(
        assets, tmp_path, "generation_sft", callbacks={"samples": {"every_n_steps": 2, "prompts": ["a red circle"]}}
    )
    check_run_outputs(output_dir, "generation_sft")
    assert sorted(path.name for path in (output_dir / "samples").iterdir()) == ["step_0000002.png", "step_0000004.png"]
    assert logged(output_dir, "throughput/mfu")[3] > 0
    model, tokenizer = from_pretrained(output_dir / "export")
    assert tokenizer is not None and model.config.generation_schedule == [[1, 1], [2, 2], [4, 4]]


COMPILED_GRAPHS: list[int] = []


def counting_aot_eager(graph: Any, example_inputs: list) -> Any:
    """dynamo's aot_eager backend (traced and split into forward and backward graphs like Inductor's, without a C++
    compile), counting the graphs it is given."""
    import torch._dynamo

    COMPILED_GRAPHS.append(len(example_inputs))
    return torch._dynamo.lookup_backend("aot_eager")(graph, example_inputs)


def test_generation_sft_trains_with_compiled_blocks(assets: Path, tmp_path: Path) -> None:
    """``trainer.compile`` through train.py: the blocks are traced and run compiled, the run finishes with finite
    losses and its export loads with the usual parameter names."""
    import torch._dynamo

    from vargpt.checkpoints.vargpt import from_pretrained

    if "vargpt_counting_aot_eager" not in torch._dynamo.list_backends(exclude_tags=()):
        torch._dynamo.register_backend(counting_aot_eager, name="vargpt_counting_aot_eager")
    torch._dynamo.reset()
    COMPILED_GRAPHS.clear()
    compile_section = {"enabled": True, "targets": ["llm", "decoder"], "backend": "vargpt_counting_aot_eager"}
    output_dir = run_stage(assets, tmp_path, "generation_sft", trainer={"compile": compile_section})
    torch._dynamo.reset()
    assert COMPILED_GRAPHS  # the training steps went through the compiled blocks
    check_run_outputs(output_dir, "generation_sft")
    resolved = yaml.safe_load((output_dir / "config.yaml").read_text())
    assert resolved["trainer"]["compile"]["enabled"] and resolved["trainer"]["compile"]["targets"] == ["llm", "decoder"]
    assert all(torch.isfinite(torch.tensor(value)) for value in logged(output_dir, "train/loss").values())
    model, _ = from_pretrained(output_dir / "export")  # a strict load: every parameter under its usual name
    assert model.config.generation_schedule == [[1, 1], [2, 2], [4, 4]]


def test_generation_sft_switches_to_twice_the_resolution(assets: Path, tmp_path: Path) -> None:
    phases = [{"step": 0, "size": 16, "schedule": [[1, 1], [2, 2], [4, 4]]}, {"step": 2, "size": 32, "stride": 4}]
    output_dir = run_stage(assets, tmp_path, "generation_sft", resolution_phases=phases)
    resolution = logged(output_dir, "generation_resolution")
    assert resolution[0] == 16 and resolution[3] == 32  # the batch of step 2 was assembled before the switch
    assert sorted(logged(output_dir, "train/loss")) == [0, 1, 2, 3]


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["tokenizer", "alignment", "understanding_sft", "dpo", "editing_sft"])
def test_every_stage_runs_end_to_end(assets: Path, tmp_path: Path, stage: str) -> None:
    sections: dict[str, Any] = {}
    if stage == "dpo":
        reference = run_stage(assets, tmp_path, "generation_sft")
        sections["init_from"] = {"export": str(reference / "export")}
    if stage == "alignment":  # the quickstart chain: a fresh model with the tokenizer stage's BSQ-VAE
        tokenizer = run_stage(assets, tmp_path, "tokenizer")
        sections["init_from"] = {"bsq_vae": str(tokenizer / "export")}
    output_dir = run_stage(assets, tmp_path, stage, **sections)
    check_run_outputs(output_dir, stage)


def test_a_fresh_stage_starts_from_the_pretrained_vision_tower(assets: Path, tmp_path: Path) -> None:
    """``init_from.vision`` loads a tower written by the quickstart's vision step into the otherwise fresh model."""
    from vargpt.config_io import load_model_config
    from vargpt.checkpoints.vision import save_vision_tower
    from vargpt.quickstart.vision import build_vision_tower
    from vargpt.run_config import run_config_from_dict

    train = load_train_module()
    torch.manual_seed(7)
    tower = build_vision_tower(load_model_config(ROOT / "configs/model/tiny.yaml").qwen2_vl)
    folder = save_vision_tower(tower, tmp_path / "vision", {}, {})
    run = run_config_from_dict(tiny_run(assets, tmp_path / "out", stage="alignment", init_from={"vision": str(folder)}))
    model, _ = train.build_model(run, tiny_text_tokenizer())
    loaded = model.backbone.visual.state_dict()
    assert all(torch.equal(loaded[name], tensor) for name, tensor in tower.state_dict().items())
    fresh_run = run_config_from_dict(tiny_run(assets, tmp_path / "out", stage="alignment"))
    fresh = train.build_model(fresh_run, tiny_text_tokenizer())[0]
    assert not torch.equal(fresh.backbone.visual.patch_embed.proj.weight, loaded["patch_embed.proj.weight"])


def test_a_stage_from_an_export_builds_the_runs_model_config(
    assets: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``model`` wins over the export's own config (each difference reported); empty, the export's is used."""
    import logging

    from vargpt.checkpoints.core import write_safetensors_folder
    from vargpt.checkpoints.vargpt import released_config_json, released_state_dict, save_pretrained
    from vargpt.config_io import load_model_config
    from vargpt.model import VARGPT
    from vargpt.run_config import run_config_from_dict

    train = load_train_module()
    saved = load_model_config(ROOT / "configs/model/tiny.yaml")
    exported = VARGPT(saved)
    exported.attach_tokenizer(tiny_text_tokenizer())
    export = str(save_pretrained(exported, tmp_path / "export"))
    changed = yaml.safe_load((ROOT / "configs/model/tiny.yaml").read_text())
    changed["bit_loss_weights"] = "magnitude"
    model_file = write_config(tmp_path / "model.yaml", changed)
    run = run_config_from_dict(tiny_run(assets, tmp_path / "out", model=str(model_file), init_from={"export": export}))
    with caplog.at_level(logging.INFO):
        model, _ = train.build_model(run, None)
    assert model.config.bit_loss_weights == "magnitude" and model.config.decoder == saved.decoder
    assert "bit_loss_weights: 'uniform' -> 'magnitude'" in caplog.text and str(model_file) in caplog.text
    assert torch.equal(model.bridge.start_condition, exported.bridge.start_condition)
    own = run_config_from_dict(tiny_run(assets, tmp_path / "out", model="", init_from={"export": export}))
    assert train.build_model(own, None)[0].config == saved
    with pytest.raises(ConfigError, match="model must be"):
        run_config_from_dict(tiny_run(assets, tmp_path / "out", model=""))
    released_state = released_state_dict(exported, block_chunks=1)
    released = write_safetensors_folder(released_state, tmp_path / "released",
                                        extra_files={"config.json": json.dumps(released_config_json(saved))})
    run = run_config_from_dict(
        tiny_run(assets, tmp_path / "out", model=str(model_file), init_from={"export": str(released)})
    )
    # a module added for DPO: policy and reference both get it, fresh and at zero (they start equal)
    changed["decoder"] = {**changed.get("decoder", {}), "token_sequential_scales": [2]}
    write_config(model_file, changed)
    dpo = run_config_from_dict(tiny_run(
        assets, tmp_path / "out", "dpo", model=str(model_file),
        init_from={"export": export, "allow_missing": [r"decoder\.token_sequential\..+"]},
    ))  # the reference resident (stage.dpo.precompute_reference is off by default)
    module, _ = train.build_stage_module(dpo, None)
    for built in (module.model, module.reference):
        assert built.decoder.is_token_sequential(2) and not built.decoder.token_sequential.out.weight.any()
    # a released folder of other sizes than the reference's: the run's config, else what the folder implies
    assert train.export_model_config(run, str(released)).bit_loss_weights == "magnitude"
    assert train.export_model_config(own, str(released)) is None


def test_unknown_key_fails_naming_it_before_any_work(assets: Path, tmp_path: Path, capsys: Any) -> None:
    output_dir = tmp_path / "never"
    run = tiny_run(assets, output_dir, trainer={"max_stepz": 3})
    assert load_train_module().main([str(write_config(tmp_path / "bad.yaml", run))]) == 2
    message = capsys.readouterr().err
    assert "config.trainer.max_stepz" in message and "max_steps" in message
    assert not output_dir.exists()


def test_bad_override_value_names_the_field(assets: Path, tmp_path: Path, capsys: Any) -> None:
    config = write_config(tmp_path / "run.yaml", tiny_run(assets, tmp_path / "never"))
    assert load_train_module().main([str(config), "trainer.strategy.name=horovod"]) == 2
    assert "trainer.strategy.name" in capsys.readouterr().err
    assert load_train_module().main([str(config), "stage.optimizer.lr=-1"]) == 2
    assert "optimizer.lr" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_compile_options_this_torch_lacks_fail_before_any_work(assets: Path, tmp_path: Path, capsys: Any) -> None:
    config = write_config(tmp_path / "run.yaml", tiny_run(assets, tmp_path / "never"))
    main = load_train_module().main
    assert main([str(config), "trainer.compile.enabled=true", "trainer.compile.backend=inductr"]) == 2
    assert "trainer.compile.backend: unknown torch.compile backend 'inductr'" in capsys.readouterr().err
    assert main([str(config), "trainer.compile.enabled=true", "trainer.compile.mode=fastest"]) == 2
    assert "trainer.compile.mode must be null or one of" in capsys.readouterr().err
    assert main([str(config), "trainer.compile.enabled=true", "trainer.strategy.name=fsdp"]) == 2
    assert "trainer.compile with trainer.strategy.name 'fsdp'" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_muon_with_a_sharding_strategy_fails_before_any_work(assets: Path, tmp_path: Path, capsys: Any) -> None:
    config = write_config(tmp_path / "run.yaml", tiny_run(assets, tmp_path / "never"))
    for strategy in ("fsdp", "deepspeed"):
        assert load_train_module().main([str(config), "stage.optimizer.name=muon",
                                         f"trainer.strategy.name={strategy}"]) == 2
        assert f"stage.optimizer.name 'muon' with trainer.strategy.name '{strategy}'" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_resume_last_without_a_checkpoint_fails_before_any_work(assets: Path, tmp_path: Path, capsys: Any) -> None:
    config = write_config(tmp_path / "run.yaml", tiny_run(assets, tmp_path / "never"))
    assert load_train_module().main([str(config), "--resume", "last"]) == 2
    assert "last.ckpt" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_runs_this_machine_cannot_do_fail_before_any_work(assets: Path, tmp_path: Path, capsys: Any) -> None:
    phases = [{"step": 0, "size": 16, "schedule": [[1, 1], [2, 2], [4, 4]]}, {"step": 2, "size": 32, "stride": 4}]
    run = tiny_run(assets, tmp_path / "never", "dpo", init_from={"export": str(tmp_path / "sft")},
                   resolution_phases=phases)
    config = write_config(tmp_path / "dpo.yaml", run)
    assert load_train_module().main([str(config), "stage.dpo.precompute_reference=true",
                                     "stage.dpo.corruption=sample"]) == 2
    message = capsys.readouterr().err
    assert "precompute_reference" in message and "step(s) [2]" in message
    assert not (tmp_path / "never").exists()


def test_dpo_with_reference_log_probs_computed_ahead_logs_the_resident_losses(assets: Path, tmp_path: Path) -> None:
    """Same DPO steps with the resident reference and with its log-probs computed ahead by train.py, also when the
    precomputing run is interrupted mid-epoch (step 3 of 2-batch epochs) and resumed, and with two data workers."""
    train = load_train_module()
    reference = run_stage(assets, tmp_path, "generation_sft")
    options = ["stage.dpo.corruption=sample", "stage.schedule.total_steps=5", "trainer.max_steps=5",
               "trainer.checkpoint_every_n_steps=3"]
    ahead = ["stage.dpo.precompute_reference=true"]
    losses = {}
    for name, workers, extra in [("resident", 0, []), ("ahead", 0, ahead), ("ahead_resumed", 0, ahead),
                                 ("resident_workers", 2, []), ("ahead_resumed_workers", 2, ahead)]:
        run = tiny_run(assets, tmp_path / name, "dpo", init_from={"export": str(reference / "export")},
                       data={"num_workers": workers})
        config = str(write_config(tmp_path / f"{name}.yaml", run))
        if "resumed" in name:
            assert train.main([config, *options, *extra, "trainer.max_steps=3"]) == 0
            extra = [*extra, "--resume", "last"]
        assert train.main([config, *options, *extra]) == 0
        losses[name] = logged(tmp_path / name, "train/loss")
        assert sorted(losses[name]) == [0, 1, 2, 3, 4]
    for name in ("ahead", "ahead_resumed"):
        assert losses[name] == pytest.approx(losses["resident"], rel=1e-5, abs=1e-6), name
    assert losses["ahead_resumed_workers"] == pytest.approx(losses["resident_workers"], rel=1e-5, abs=1e-6)
    assert losses["resident_workers"] != pytest.approx(losses["resident"], rel=1e-5, abs=1e-6)  # other batches


def test_shapes_and_fid_evaluation_from_the_run_config(assets: Path, tmp_path: Path, capsys: Any) -> None:
    from callbacks.evaluation import FIDEvaluation, ShapesEvaluation
    from vargpt.eval.testing import save_random_inception

    train = load_train_module()
    shapes = {"every_n_steps": 2, "per_task": 1, "batch_size": 6}
    output_dir = run_stage(assets, tmp_path, "generation_sft", callbacks={"shapes_eval": shapes})
    assert 0.0 <= logged(output_dir, "shapes/overall")[2] <= 1.0 and 4 in logged(output_dir, "shapes/overall")
    assert {"shapes/counting", "shapes/position"} <= set(csv.DictReader(open(next(
        (output_dir / "logs").glob("version_*/metrics.csv")))).fieldnames)
    grids = sorted(path.name for path in (output_dir / "evaluation" / "shapes").glob("*.png"))
    assert grids == ["step_0000002.png", "step_0000004.png"]

    reference = tmp_path / "reference"
    reference.mkdir()
    fid = {"every_n_steps": 2, "prompts": ["a red circle", "a blue square"], "reference": str(reference),
           "inception_weights": str(tmp_path / "inception.pth")}
    run = tiny_run(assets, tmp_path / "never", callbacks={"fid_eval": fid})
    config = write_config(tmp_path / "fid.yaml", run)
    assert train.main([str(config)]) == 2
    assert "callbacks.fid_eval.inception_weights" in capsys.readouterr().err and not (tmp_path / "never").exists()
    save_random_inception(tmp_path / "inception.pth")
    built = train.build_callbacks(train.load_run_config(config), tmp_path / "run")
    assert [type(c) for c in built if isinstance(c, (ShapesEvaluation, FIDEvaluation))] == [FIDEvaluation]
    tokenizer_run = train.load_run_config(config, ["stage.stage=tokenizer"])
    assert not [c for c in train.build_callbacks(tokenizer_run, tmp_path / "run") if isinstance(c, FIDEvaluation)]
