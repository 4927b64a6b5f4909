"""``trainer.compile``: the transformer blocks run compiled only while they train, give the eager losses and gradients
(with activation checkpointing too), keep parameter names, fall back or stop with a clear message when compiling
fails, and are validated as config. Dynamo traces with recording backends here (no C++ compile); the quickstart's slow
test runs Inductor."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import pytest
import torch

from helpers_tiny_model import make_batch, mixed_samples, tiny_config, tiny_model
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

    with torch.enable_grad():  # eval mode with gradients on (e.g. a gradient probe): not training, eager
        model.training_forward(batch, None)
    assert backend.graphs == 0 and backend.calls == 0

    assert_same(loss_and_gradients(model, batch), eager)
    assert backend.calls >= sum(regions.blocks.values())  # every block ran its graph

    regions.enabled = False
    calls = backend.calls
    assert_same(loss_and_gradients(model, batch), eager)
    assert backend.calls == calls


def test_each_kind_of_block_is_traced_once_for_all_its_layers():
    model = tiny_model(decoder=dataclasses.replace(tiny_config().decoder, depth=4))
    backend = RecordingBackend()
    regions = compile_regions(model, ["llm", "decoder"], backend=backend)
    loss_and_gradients(model, generation_batch())
    assert regions.blocks == {"llm": len(model.backbone.language_model.layers), "decoder": 4}
    assert backend.graphs == 2 and backend.calls == sum(regions.blocks.values())


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
    with pytest.warns(RuntimeWarning, match=r"compiling the llm blocks failed \(no working C\+\+ compiler found\); "
                                            r"training on eagerly \(trainer.compile.if_unavailable=eager\)"):
        result = loss_and_gradients(model, batch)
    assert not regions.enabled
    assert_same(result, eager)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss_and_gradients(model, batch)
    assert not [w for w in caught if "trainer.compile" in str(w.message)]  # no second warning, no second attempt


def test_a_backward_that_fails_to_compile_falls_back_too():
    from torch._dynamo.backends.common import aot_autograd

    def failing_backward(graph, example_inputs):
        raise RuntimeError("backward compiler unavailable")

    backend = aot_autograd(fw_compiler=lambda graph, example_inputs: graph, bw_compiler=failing_backward)
    batch = generation_batch()
    eager = loss_and_gradients(tiny_model(), batch)
    model = tiny_model()
    regions = compile_regions(model, ["decoder"], backend=backend, if_unavailable="eager")
    with pytest.warns(RuntimeWarning, match=r"compiling the decoder blocks failed \(backward compiler unavailable\)"):
        result = loss_and_gradients(model, batch)
    assert not regions.enabled
    assert_same(result, eager)


def test_failed_compile_stops_with_the_setting_named():
    model = tiny_model()
    compile_regions(model, ["decoder"], backend=failing_backend)
    with pytest.raises(RuntimeError, match=r"trainer.compile: compiling the decoder blocks failed \(no working C\+\+ "
                                           r"compiler found\). Set trainer.compile.if_unavailable=eager"):
        loss_and_gradients(model, generation_batch())


@pytest.mark.parametrize(
    ("compile_section", "stage", "message"),
    [
        ({"enabled": True, "targets": ["llm", "tokenizer"]}, "generation_sft", r"trainer.compile.targets must be"),
        ({"enabled": True, "targets": []}, "generation_sft", r"trainer.compile.targets must be"),
        ({"enabled": True, "targets": ["llm", "llm"]}, "generation_sft", r"trainer.compile.targets must be"),
        ({"enabled": True, "if_unavailable": "skip"}, "generation_sft", r"trainer.compile.if_unavailable must be"),
        ({"enabled": True}, "tokenizer", r"the tokenizer stage has none"),
        ({"enabled": True, "targets": "llm"}, "generation_sft", r"trainer.compile.targets must be a list"),
        ({"enable": True}, "generation_sft", r"unknown key.*enable"),
    ],
)
def test_compile_config_is_validated_before_any_work(compile_section, stage, message):
    run = {"model": TINY_MODEL, "stage": {"stage": stage}, "output_dir": "unused",
           "trainer": {"compile": compile_section}}
    with pytest.raises(ConfigError, match=message):
        run_config_from_dict(run)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"targets": ["lm_head"]}, r"trainer.compile.targets must be a list of distinct names"),
        ({"targets": ["llm"], "backend": "inductr"}, r"trainer.compile.backend: unknown torch.compile backend"),
        ({"targets": ["llm"], "mode": "fastest"}, r"trainer.compile.mode must be null or one of"),
        ({"targets": ["llm"], "backend": "aot_eager", "mode": "max-autotune"}, r"is an Inductor option"),
    ],
)
def test_compile_regions_checks_its_options_before_wrapping_anything(arguments, message):
    model = tiny_model()
    targets = arguments.pop("targets")
    with pytest.raises(ConfigError, match=message):
        compile_regions(model, targets, **arguments)
    assert all(getattr(block.forward, "compiled_regions", None) is None for block in model.decoder.blocks)
    regions = compile_regions(model, ["decoder"], backend="eager")
    with pytest.raises(ValueError, match="compiled already"):
        compile_regions(model, ["llm", "decoder"], backend="eager")
    assert regions.blocks == {"decoder": len(model.decoder.blocks)}
