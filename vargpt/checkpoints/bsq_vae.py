"""The released BSQ-VAE checkpoint (``infinity_vae_d32reg.pth``) into ``BSQVAE`` (INFINITY §7.2).

Upstream wraps every conv and GroupNorm in a module of its own, so its names carry one more level:
``encoder.conv_in.conv.weight``, ``encoder.down.0.block.0.norm1.norm.weight``, ``decoder.up.1.upsample.conv.conv.bias``.
Our modules are plain ``nn.Conv2d`` / ``nn.GroupNorm``: the table drops that level. Older files use the plain names,
which pass through unchanged. The quantizer holds no parameters, only a ``mask`` buffer registered twice
(``quantizer.lfq.mask`` and ``quantize.lfq.mask``): both are dropped. Loading is strict, unlike upstream's ``load_cnn``
which ignores whatever does not match.
"""

from __future__ import annotations

import os

import torch

from vargpt.checkpoints.core import CheckpointError, KeyMap, Rename, load_state_dict_strict, load_torch_file
from vargpt.config import TokenizerConfig
from vargpt.tokenizer.vae import BSQVAE

_CONV_LAYERS = r"conv_in|conv_out|conv1|conv2|nin_shortcut|conv"
_NORM_LAYERS = r"norm1|norm2|norm_out"

BSQ_VAE_KEY_MAP = KeyMap(
    rules=(
        Rename(rf"(.*\.(?:{_CONV_LAYERS}))\.conv\.(weight|bias)", r"\1.\2"),
        Rename(rf"(.*\.(?:{_NORM_LAYERS}))\.norm\.(weight|bias)", r"\1.\2"),
        Rename(r"((?:encoder|decoder)\..*)", r"\1"),
    ),
    drop=(r"quantizer\..*", r"quantize\..*"),
    name="BSQ-VAE",
)

CHECKPOINT_ENTRIES = ("vae", "ema")  # `torch.load(...)['vae']` (or the EMA weights) in the released file


def load_bsq_vae(
    path: str | os.PathLike,
    config: TokenizerConfig | None = None,
    entry: str | None = "vae",
    device: str | torch.device = "cpu",
) -> BSQVAE:
    """Build a ``BSQVAE`` and load a released (or plain-named) BSQ-VAE ``.pth`` into it, strictly.

    ``entry`` picks the nested state dict ("vae" or "ema"; None for a flat file). A missing, extra or mis-shaped key
    raises ``CheckpointError`` naming it; ``torch.load`` runs with ``weights_only=True``.
    """
    config = config or TokenizerConfig()
    if entry is not None and entry not in CHECKPOINT_ENTRIES:
        raise ValueError(f"entry must be one of {CHECKPOINT_ENTRIES} or None, got {entry!r}")
    upstream = load_torch_file(path, entry=entry)
    mapped, dropped, _ = BSQ_VAE_KEY_MAP.apply(upstream)
    with torch.device("meta"):
        model = BSQVAE(config)
    report = load_state_dict_strict(model, mapped, source=f"{path} [{entry or 'flat'}]", assign=True)
    report.dropped = dropped
    return model.to(device)


def bsq_vae_upstream_state_dict(model: BSQVAE) -> dict[str, torch.Tensor]:
    """Our state dict in the released file's wrapped names, with the quantizer's mask buffers (for tests/exports)."""
    out: dict[str, torch.Tensor] = {}
    for path, module in model.named_modules():
        wrapper = "conv" if isinstance(module, torch.nn.Conv2d) else "norm" if isinstance(module, torch.nn.GroupNorm) else None
        if wrapper is None:
            continue
        for name, tensor in module.named_parameters(recurse=False):
            out[f"{path}.{wrapper}.{name}"] = tensor.detach()
    mask = 2 ** torch.arange(model.config.bits - 1, -1, -1)
    out["quantizer.lfq.mask"] = mask
    out["quantize.lfq.mask"] = mask.clone()
    if len(out) - 2 != len(model.state_dict()):
        raise CheckpointError("BSQ-VAE export missed tensors: every parameter must belong to a Conv2d or GroupNorm")
    return out
