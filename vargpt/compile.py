"""Regional compilation of the transformer blocks for training (``trainer.compile``).

``torch.compile`` is applied to the repeated blocks (the LLM's decoder layers, the ViT's blocks, the image decoder's
blocks), not to the whole model: every layer of a kind reuses one traced graph (PyTorch's regional compilation, the
shortest compile), the model's own Python stays eager (span finding, M-RoPE positions, bitwise self-correction, a
batch's data-dependent shapes), and parameter names do not change, so checkpoints and exports are the same as
without it.

A block runs compiled only while it trains: in training mode with gradients enabled, which is every training step
(with activation checkpointing the loss and gradients are the eager ones too; its speed is not measured here).
Everything else runs the same blocks eagerly: sampling (the callbacks' grids and evaluations, DPO's preference pairs),
validation and exports run without gradients, with KV caches that grow scale by scale, and those few calls would each
need graphs of their own (40 s of compiling for three prompts on a 2-core CPU, against 0.1 s of sampling).

When compiling fails (Inductor on CPU needs a C++ compiler, on GPU Triton), ``if_unavailable`` decides: ``"error"``
stops with a message that names the setting, ``"eager"`` warns once and trains on without compiling.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from vargpt.config import ConfigError
from vargpt.run_config import COMPILE_TARGETS, check_compile_targets


TARGET_BLOCKS: dict[str, Callable[[Any], nn.ModuleList]] = {  # a VARGPT's repeated blocks by COMPILE_TARGETS name
    "llm": lambda model: model.backbone.language_model.layers,
    "vision": lambda model: model.backbone.visual.blocks,
    "decoder": lambda model: model.decoder.blocks,
}


class CompiledRegions:
    """The compiled blocks of one model; ``enabled`` turns to False for good when compiling failed in ``eager``
    fallback."""

    def __init__(self, if_unavailable: str) -> None:
        self.if_unavailable = if_unavailable
        self.enabled = True
        self.blocks: dict[str, int] = {}

    def wrap(self, block: nn.Module, target: str, options: dict[str, Any]) -> None:
        """Replace ``block.forward`` by a dispatcher: compiled while the block trains (training mode, gradients on)
        and compiling is enabled, else eager.

        The dispatcher is an instance attribute, so module hooks, ``state_dict`` and ``named_parameters`` are
        untouched; ``torch.compile`` traces the bound eager forward lazily, at the first compiled call. Copy a model
        before compiling it, not after: a deep copy would keep calling the original block's forward."""
        eager: Callable[..., Any] = block.forward
        compiled = torch.compile(eager, **options)

        def forward(*args: Any, **kwargs: Any) -> Any:
            if not (self.enabled and block.training and torch.is_grad_enabled()):
                return eager(*args, **kwargs)
            try:
                # the backward is compiled with the forward, so that its failure is caught here too, not in backward()
                with torch._functorch.config.patch(force_non_lazy_backward_lowering=True):
                    return compiled(*args, **kwargs)
            except torch._dynamo.exc.TorchDynamoException as error:
                self._failed(target, error)
                return eager(*args, **kwargs)

        forward.compiled_regions = self  # type: ignore[attr-defined]
        block.forward = forward
        self.blocks[target] = self.blocks.get(target, 0) + 1

    def _failed(self, target: str, error: Exception) -> None:
        cause = getattr(error, "inner_exception", None) or error.__cause__ or error  # a backend's own error
        text = str(cause).strip()
        first_line = text.splitlines()[0] if text else type(cause).__name__
        if self.if_unavailable == "error":
            raise RuntimeError(
                f"trainer.compile: compiling the {target} blocks failed ({first_line}). Set "
                "trainer.compile.if_unavailable=eager to train on without compiling, or trainer.compile.enabled=false"
            ) from error
        if self.enabled:
            warnings.warn(
                f"trainer.compile: compiling the {target} blocks failed ({first_line}); training on eagerly "
                "(trainer.compile.if_unavailable=eager)",
                RuntimeWarning,
                stacklevel=2,
            )
        self.enabled = False


def compile_regions(
    model: Any,
    targets: list[str] | tuple[str, ...] = COMPILE_TARGETS,
    *,
    backend: str | Callable[..., Any] = "inductor",
    mode: str | None = None,
    dynamic: bool | None = True,
    if_unavailable: str = "error",
) -> CompiledRegions:
    """Compile the blocks of ``targets`` of a ``VARGPT`` in place for training; returns their state.

    ``dynamic=True`` (the default) traces sequence lengths symbolically: batches differ in length, and a resolution
    switch changes the image's token count, so one graph serves them instead of one recompile per length. ``backend``
    and ``mode`` are ``torch.compile``'s."""
    check_compile_options(targets, backend, mode, if_unavailable)
    blocks = [(target, block) for target in targets for block in TARGET_BLOCKS[target](model)]
    if any(getattr(block.forward, "compiled_regions", None) is not None for _, block in blocks):
        raise ValueError("the model's blocks are compiled already (compile_regions was called twice on the model)")
    regions = CompiledRegions(if_unavailable)
    options: dict[str, Any] = {"backend": backend, "dynamic": dynamic}
    if mode is not None:
        options["mode"] = mode
    for target, block in blocks:
        regions.wrap(block, target, options)
    return regions


def check_compile_options(
    targets: list[str] | tuple[str, ...], backend: str | Callable[..., Any], mode: str | None,
    if_unavailable: str = "error",
) -> None:
    """``trainer.compile``'s targets, fallback, backend and mode, checked before any work (ConfigError naming the
    field); the backend and mode against what this torch has."""
    check_compile_targets(targets, if_unavailable)
    if isinstance(backend, str):
        backends = torch._dynamo.list_backends(exclude_tags=())
        if backend not in backends:
            raise ConfigError(f"trainer.compile.backend: unknown torch.compile backend {backend!r}; known: {backends}")
    if mode is not None:
        if backend != "inductor":
            raise ConfigError(f"trainer.compile.mode {mode!r} is an Inductor option, but trainer.compile.backend is "
                              f"{backend!r}")
        modes = list(torch._inductor.list_mode_options())
        if mode not in modes:
            raise ConfigError(f"trainer.compile.mode must be null or one of {modes}, got {mode!r}")
