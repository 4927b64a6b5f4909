"""``ExportAtEnd``: the stage's weights as a safetensors folder (``<out>/export/``) when training ends, atomically.

A VARGPT stage exports through ``vargpt.checkpoints.vargpt.save_pretrained`` (config.json, sharded safetensors,
text tokenizer files), the folder the next stage names in ``init_from.export``. The tokenizer stage exports its
``BSQVAE`` (config.json with the ``TokenizerConfig`` + safetensors), the folder later stages name in
``init_from.bsq_vae``. Both writers build the folder beside the target and rename it into place, so an interrupted
export never leaves a half-written folder. Under FSDP the full parameters are gathered to rank 0 first.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import lightning
import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn

from vargpt.checkpoints.core import load_state_dict_strict, read_safetensors_folder, write_safetensors_folder
from vargpt.checkpoints.vargpt import CONFIG_FILE, save_pretrained
from vargpt.config import TokenizerConfig
from vargpt.config_io import config_to_dict, dataclass_from_dict
from vargpt.tokenizer import BSQVAE

TOKENIZER_EXPORT_FORMAT = "vargpt-lightning-bsq-vae"


def save_tokenizer_export(vae: BSQVAE, folder: str | os.PathLike[str]) -> Path:
    """Write a ``BSQVAE`` as ``config.json`` (format + ``TokenizerConfig``) and safetensors, atomically."""
    document = {"format": TOKENIZER_EXPORT_FORMAT, "tokenizer": config_to_dict(vae.config)}
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in vae.state_dict().items()}
    return write_safetensors_folder(
        state,
        folder,
        extra_files={CONFIG_FILE: json.dumps(document, indent=2)},
        metadata={"source": document["format"]},
    )


def is_tokenizer_export(folder: str | os.PathLike[str]) -> bool:
    """Whether ``folder`` is a BSQ-VAE export written by ``save_tokenizer_export``."""
    config = Path(folder) / CONFIG_FILE
    return config.is_file() and json.loads(config.read_text()).get("format") == TOKENIZER_EXPORT_FORMAT


def load_tokenizer_export(folder: str | os.PathLike[str], into: BSQVAE | None = None) -> BSQVAE:
    """Load a tokenizer export strictly, into ``into`` (its config must match) or into a new ``BSQVAE``."""
    folder = Path(folder)
    if not is_tokenizer_export(folder):
        raise ValueError(f"{folder} is not a BSQ-VAE export (config.json with format {TOKENIZER_EXPORT_FORMAT!r})")
    config = dataclass_from_dict(
        TokenizerConfig, json.loads((folder / CONFIG_FILE).read_text())["tokenizer"], where=f"{folder}/config.json"
    )
    vae = into if into is not None else BSQVAE(config)
    if config_to_dict(vae.config) != config_to_dict(config):
        raise ValueError(f"the BSQ-VAE export {folder} was made for {config}, the model's tokenizer is {vae.config}")
    load_state_dict_strict(vae, read_safetensors_folder(folder), source=str(folder))
    return vae


@contextlib.contextmanager
def full_parameters(trainer: lightning.Trainer) -> Iterator[None]:
    """Gather FSDP-sharded parameters to rank 0 (on CPU) for the duration; a no-op for other strategies."""
    if not isinstance(trainer.strategy, FSDPStrategy):
        yield
        return
    from torch.distributed.fsdp import FullyShardedDataParallel

    with FullyShardedDataParallel.summon_full_params(
        trainer.strategy.model, writeback=False, rank0_only=True, offload_to_cpu=True
    ):
        yield


def export_stage(module: nn.Module, folder: str | os.PathLike[str]) -> Path:
    """Export the weights a stage trains: its ``model`` (a ``VARGPT``) or, for the tokenizer stage, its ``vae``."""
    vae = getattr(module, "vae", None)
    if isinstance(vae, BSQVAE):
        return save_tokenizer_export(vae, folder)
    trained = getattr(module, "model", None)
    if trained is None or not hasattr(trained, "backbone"):
        raise TypeError(f"{type(module).__name__} has no .model (a VARGPT) or .vae (a BSQVAE) to export")
    return save_pretrained(trained, folder)


class ExportAtEnd(lightning.Callback):
    """Exports the stage into ``folder`` once ``fit`` ends (also after ``max_steps``)."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self.written: Path | None = None

    def on_train_end(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> None:
        with full_parameters(trainer), torch.no_grad():
            if trainer.is_global_zero:
                self.written = export_stage(pl_module, self.folder)
        trainer.strategy.barrier("vargpt-export")
