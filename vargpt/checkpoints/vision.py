"""A vision tower folder: the weights of a Qwen2-VL ViT and its merger alone, for ``init_from.vision``.

The folder holds ``model.safetensors`` (the tower's parameters, named as under ``VARGPT.backbone.visual``),
``config.json`` (what it was trained with) and ``metrics.json`` (how well); the embedded default's vision step
(``vargpt.quickstart.vision``) writes one, and a fresh model's tower loads it strictly.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from vargpt.checkpoints.core import load_state_dict_strict, read_safetensors_folder, write_safetensors_folder

CONFIG_FILE, METRICS_FILE = "config.json", "metrics.json"


def save_vision_tower(visual: nn.Module, folder: str | os.PathLike[str], config: dict[str, Any],
                      metrics: dict[str, Any]) -> Path:
    """Write the tower's weights, ``config.json`` and ``metrics.json`` into ``folder`` atomically."""
    state = {name: tensor.detach().contiguous() for name, tensor in visual.state_dict().items()}
    extra = {CONFIG_FILE: json.dumps(config, indent=2), METRICS_FILE: json.dumps(metrics, indent=2)}
    return write_safetensors_folder(state, folder, extra_files=extra)


def load_vision_tower(model: nn.Module, folder: str | os.PathLike[str]) -> None:
    """Load a folder written by ``save_vision_tower`` into ``model.backbone.visual`` (a ``VARGPT``), strictly: a
    missing, unexpected or mis-shaped tensor fails naming it."""
    if not Path(folder).is_dir():
        raise FileNotFoundError(f"init_from.vision: no vision tower folder at {folder} (the quickstart's vision step "
                                "writes one: python -m vargpt.quickstart.vision)")
    load_state_dict_strict(model.backbone.visual, read_safetensors_folder(folder), source=f"init_from.vision {folder}")
