"""``trainer.compile``: the transformer blocks run compiled only while they train, give the eager losses and gradients
(with activation checkpointing too), keep parameter names, fall back or stop with a clear message when compiling
fails, and are validated as config. Dynamo traces with recording backends here (no C++ compile); the quickstart's slow
test runs Inductor."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from helpers_tiny_model import make_batch, mixed_samples, tiny_model
from vargpt.compile import compile_regions
from vargpt.config import ConfigError
from vargpt.run_config import run_config_from_dict
from vargpt.stages import STAGES, StageConfig


TINY_MODEL = str(Path(__file__).resolve().parents[1] / "configs/model/tiny.yaml")


class RecordingBackend:
    """A dynamo backend that runs each captured graph as traced (no compiler) and counts the graphs and calls."""

    def __init__(self) -> None:
        self.graphs = 0
        self.calls = 0

    def __call__(self, graph: torch.fx.GraphModule, example_inputs: list) -> object:
        self.graphs += 1

        def run(*args: object) -> object:
            self.calls += 1
            return graph.forward(*args)

        return run


def failing_backend(graph: torch.fx.GraphModule, example_inputs: list) -> object:
    raise RuntimeError("no working C++ compiler found")


def generation_batch() -> dict:
    """Understanding, generation, editing and text-only rows: every compiled block kind runs."""
    return make_batch(mixed_samples())


def loss_and_gradients(model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A training forward and backward (training mode, gradients on: where compiled blocks run compiled)."""
    model.train()
    model.zero_grad(set_to_none=True)
    loss = model.training_forward(batch, torch.Generator().manual_seed(0)).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_same(result, reference) -> None:
    loss, grads = result
    torch.testing.assert_close(loss, reference[0], rtol=1e-5, atol=1e-6)
    assert grads.keys() == reference[1].keys()
    for name in grads:
        torch.testing.assert_close(grads[name], reference[1][name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compiled_blocks_give_the_eager_loss_and_gradients_and_run_only_while_training():
    batch = generation_batch()
    eager = loss_and_gradients(tiny_model(), batch)

    model = tiny_model()
    names = [name for name, _ in model.named_parameters()]
    backend = RecordingBackend()
    regions = compile_regions(model, ["llm", "vision", "decoder"], backend=backend)
    assert regions.blocks == {"llm": len(model.backbone.language_model.layers),
                              "vision": len(model.backbone.visual.blocks), "decoder": len(model.decoder.blocks)}
    assert [name for name, _ in model.named_parameters()] == names  # exports and checkpoints keep their keys

    model.train()
    with torch.no_grad():  # validation: no gradients, eager
        model.training_forward(batch, None)
    model.eval()
    model.generate_images(["a red circle"], seed=0)  # sampling with KV caches: eval mode, no gradients, eager
    assert backend.graphs == 0 and backend.calls == 0

    assert_same(loss_and_gradients(model, batch), eager)
    assert backend.graphs >= 3 and backend.calls >= sum(regions.blocks.values())  # every block ran its graph

    regions.enabled = False
    calls = backend.calls
    assert_same(loss_and_gradients(model, batch), eager)
    assert backend.calls == calls
    with pytest.raises(ValueError, match="compiled already"):
        compile_regions(model, ["decoder"], backend=backend)


def test_compiled_blocks_under_activation_checkpointing_give_the_eager_loss_and_gradients():
    def checkpointed_model():
        model = tiny_model()
        STAGES["understanding_sft"](model, StageConfig(stage="understanding_sft", trainable=["vision", "llm"],
                                                       activation_checkpointing=True))
        return model

    batch = generation_batch()
    eager = loss_and_gradients(checkpointed_model(), batch)
    model = checkpointed_model()
    backend = RecordingBackend()
    compile_regions(model, ["llm", "vision"], backend=backend)
    assert_same(loss_and_gradients(model, batch), eager)
    assert backend.calls >= len(model.backbone.language_model.layers)


def test_a_stage_training_step_runs_the_compiled_blocks_and_validation_does_not():
    backend = RecordingBackend()
    model = tiny_model()
    compile_regions(model, ["decoder"], backend=backend)
    module = STAGES["generation_sft"](model, StageConfig(stage="generation_sft"))
    module.train()
    loss = module.training_step(generation_batch(), 0)
    assert torch.isfinite(loss) and backend.calls == len(model.decoder.blocks)
    with torch.no_grad():
        module.validation_step(generation_batch(), 0)
    assert backend.calls == len(model.decoder.blocks)


def test_failed_compile_falls_back_to_eager_once_with_a_warning():
    batch = generation_batch()
    eager = loss_and_gradients(tiny_model(), batch)
    model = tiny_model()
    regions = compile_regions(model, ["llm", "decoder"], backend=failing_backend, if_unavailable="eager")
    with pytest.warns(RuntimeWarning, match=r"compiling the llm blocks failed .*if_unavailable=eager"):
        result = loss_and_gradients(model, batch)
    assert not regions.enabled
    assert_same(result, eager)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning, no second attempt
        loss_and_gradients(model, batch)


def test_failed_compile_stops_with_the_setting_named():
    model = tiny_model()
    compile_regions(model, ["decoder"], backend=failing_backend)
    with pytest.raises(RuntimeError, match=r"trainer.compile: compiling the decoder blocks failed .*"
                                           r"trainer.compile.if_unavailable=eager"):
        loss_and_gradients(model, generation_batch())


@pytest.mark.parametrize(
    ("compile_section", "stage", "message"),
    [
        ({"enabled": True, "targets": ["llm", "tokenizer"]}, "generation_sft", r"trainer.compile.targets must be"),
        ({"enabled": True, "targets": []}, "generation_sft", r"trainer.compile.targets must be"),
        ({"enabled": True, "targets": ["llm", "llm"]}, "generation_sft", r"trainer.compile.targets must be"),
        ({"enabled": True, "if_unavailable": "skip"}, "generation_sft", r"trainer.compile.if_unavailable must be"),
        ({"enabled": True}, "tokenizer", r"the tokenizer stage has none"),
        ({"enable": True}, "generation_sft", r"enable"),
    ],
)
def test_compile_config_is_validated_before_any_work(compile_section, stage, message):
    run = {"model": TINY_MODEL, "stage": {"stage": stage}, "output_dir": "unused",
           "trainer": {"compile": compile_section}}
    with pytest.raises(ConfigError, match=message):
        run_config_from_dict(run)


def test_unknown_targets_are_refused_by_compile_regions_too():
    with pytest.raises(ConfigError, match="trainer.compile.targets"):
        compile_regions(tiny_model(), ["lm_head"])
