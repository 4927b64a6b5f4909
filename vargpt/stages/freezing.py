"""Freezing by explicit module groups (not name substrings, which froze the merger with "visual", VARGPT §4.1).

Every parameter of ``VARGPT`` belongs to exactly one group; a stage makes its groups trainable and freezes the rest.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from vargpt.model import VARGPT
from vargpt.stages.config import GROUP_NAMES


def group_parameters(model: VARGPT) -> dict[str, dict[str, nn.Parameter]]:
    """Parameters of each group by full name. Raises if a parameter is in no group or in two."""
    merger = model.backbone.visual.merger
    merger_ids = {id(parameter) for parameter in merger.parameters()}
    modules: dict[str, Iterable[tuple[str, nn.Parameter]]] = {
        "vision": [
            (name, parameter) for name, parameter in model.backbone.visual.named_parameters(prefix="backbone.visual")
            if id(parameter) not in merger_ids
        ],
        "merger": merger.named_parameters(prefix="backbone.visual.merger"),
        "llm": model.backbone.language_model.named_parameters(prefix="backbone.language_model"),
        "lm_head": model.lm_head.named_parameters(prefix="lm_head"),
        "in_projector": model.bridge.in_projector.named_parameters(prefix="bridge.in_projector"),
        "out_projector": model.bridge.out_projector.named_parameters(prefix="bridge.out_projector"),
        "start_condition": [("bridge.start_condition", model.bridge.start_condition)],
        "decoder": model.decoder.named_parameters(prefix="decoder"),
        "tokenizer": model.tokenizer.named_parameters(prefix="tokenizer"),
    }
    groups = {group: dict(modules[group]) for group in GROUP_NAMES}
    owner: dict[str, str] = {}
    for group, parameters in groups.items():
        for name in parameters:
            if name in owner:
                raise ValueError(f"parameter {name} is in groups {owner[name]!r} and {group!r}")
            owner[name] = group
    missing = [name for name, _ in model.named_parameters() if name not in owner]
    if missing:
        raise ValueError(f"parameters in no freezing group (extend vargpt.stages.freezing): {missing[:10]}")
    return groups


def apply_freezing(model: VARGPT, trainable: Iterable[str]) -> dict[str, dict[str, nn.Parameter]]:
    """Make exactly the parameters of the ``trainable`` groups require grad; returns ``group_parameters``."""
    trainable = list(trainable)
    unknown = [name for name in trainable if name not in GROUP_NAMES]
    if unknown:
        raise ValueError(f"unknown trainable group(s) {unknown}; valid groups: {list(GROUP_NAMES)}")
    groups = group_parameters(model)
    for group, parameters in groups.items():
        for parameter in parameters.values():
            parameter.requires_grad_(group in trainable)
    return groups


def parameter_counts(groups: dict[str, dict[str, nn.Parameter]]) -> dict[str, int]:
    """``trainable/<group>`` for each trainable group, and ``frozen`` (all frozen parameters together)."""
    counts: dict[str, int] = {}
    frozen = 0
    for group, parameters in groups.items():
        total = sum(parameter.numel() for parameter in parameters.values())
        if any(parameter.requires_grad for parameter in parameters.values()):
            counts[f"trainable/{group}"] = total
        else:
            frozen += total
    counts["frozen"] = frozen
    return counts
