"""The LightningModule shared by the VARGPT training stages: freezing, loss logging, corruption draws, AdamW.

A stage holds the ``VARGPT`` components (injected, so every stage trains the same modules) and a ``StageConfig``.
Bitwise self-correction and condition dropout come from a ``torch.Generator`` re-seeded at every step from
``config.seed``, the global step, the rank and the micro-batch index, so a resumed run redraws exactly the corruption
it would have drawn (no generator state needs saving) and every rank corrupts differently.
"""

from __future__ import annotations

import fnmatch
import hashlib
import math
from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import Any

import lightning
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from vargpt.losses import bit_accuracy
from vargpt.model import VARGPT, TrainingOutput
from vargpt.optim import MuonAdamW
from vargpt.stages.config import StageConfig
from vargpt.stages.freezing import apply_freezing, group_parameters, parameter_counts

def corruption_seed(seed: int, step: int, rank: int = 0, micro_batch: int = 0) -> int:
    """The generator seed of one micro-batch: a stable hash of the run seed and the batch's place in training
    (optimizer step, rank, micro-batch within gradient accumulation), so no two places share a draw."""
    digest = hashlib.sha256(f"{seed}:{step}:{rank}:{micro_batch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def warmup_cosine_factor(step: int, total_steps: int, warmup_ratio: float, min_lr_ratio: float) -> float:
    """Learning-rate multiplier at optimizer step ``step``: linear warmup from 0 over ``ceil(warmup_ratio *
    total_steps)`` steps, then a half cosine from 1 to ``min_lr_ratio`` at ``total_steps`` (HF's cosine schedule,
    VARGPT §4.3, plus a floor)."""
    warmup = math.ceil(warmup_ratio * total_steps)
    if step < warmup:
        return step / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def decay_parameter_groups(
    named_parameters: Iterable[tuple[str, nn.Parameter]], weight_decay: float
) -> list[dict[str, Any]]:
    """AdamW groups over the trainable parameters: matrices decay, biases / norms / 1-D parameters do not."""
    decay, no_decay = [], []
    for name, parameter in named_parameters:
        if not parameter.requires_grad:
            continue
        (decay if parameter.ndim >= 2 and not name.endswith(".bias") else no_decay).append(parameter)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def build_optimizer(module: StageModuleBase, config: StageConfig) -> torch.optim.Optimizer:
    """AdamW over ``module``'s trainable parameters, fused on CUDA unless ``optimizer.fused`` says otherwise; with
    ``optimizer.name: muon`` a ``MuonAdamW`` whose Muon groups hold the hidden matrices (``muon_parameters``), its
    AdamW groups fused alike.

    ``optimizer.lr_multipliers`` scales the learning rate of the named groups' parameters (``parameter_groups``); the
    schedule's factor applies to every group alike.
    """
    options = config.optimizer
    factor_of: dict[int, float] = {}
    for group, parameters in module.parameter_groups().items():
        for parameter in parameters.values():
            factor_of[id(parameter)] = options.lr_multipliers.get(group, 1.0)
    by_factor: dict[float, list[tuple[str, nn.Parameter]]] = {}
    outside = []
    for name, parameter in module.named_parameters():
        if parameter.requires_grad and id(parameter) not in factor_of:
            outside.append(name)
        by_factor.setdefault(factor_of.get(id(parameter), 1.0), []).append((name, parameter))
    if options.lr_multipliers and outside:
        raise ValueError(f"optimizer.lr_multipliers: trainable parameters in no group of the stage: {outside[:5]}")
    muon = muon_parameters(module, options.muon_exclude) if options.name == "muon" else set()
    groups = []
    for factor, named in by_factor.items():
        on_muon = [parameter for _, parameter in named if id(parameter) in muon]  # trainable by construction
        groups.append({"params": on_muon, "weight_decay": options.weight_decay, "lr": options.lr * factor,
                       "use_muon": True})
        rest = [(name, parameter) for name, parameter in named if id(parameter) not in muon]
        for group in decay_parameter_groups(rest, options.weight_decay):
            groups.append({**group, "lr": options.lr * factor})
    groups = [group for group in groups if group["params"]]
    if not groups:
        raise ValueError("no trainable parameters: check StageConfig.trainable")
    on_cuda = all(parameter.is_cuda for group in groups for parameter in group["params"])
    fused = on_cuda if options.fused is None else options.fused
    if options.name == "muon":
        return MuonAdamW(groups, lr=options.lr, betas=options.betas, eps=options.eps, momentum=options.muon_momentum,
                         fused=fused, shard_orthogonalization=options.muon_shard)
    optimizer = torch.optim.AdamW(groups, lr=options.lr, betas=options.betas, eps=options.eps, fused=fused)
    return optimizer


def muon_parameters(module: nn.Module, exclude: Iterable[str]) -> set[int]:
    """Ids of the trainable weights Muon updates: those of ``nn.Linear`` layers whose module name matches no pattern
    in ``exclude`` (``fnmatch``; the input and output layers stay on AdamW)."""
    patterns = list(exclude)
    return {
        id(layer.weight)
        for name, layer in module.named_modules()
        if isinstance(layer, nn.Linear) and layer.weight.requires_grad
        and not any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)
    }


class StageModuleBase(lightning.LightningModule, ABC):
    """Optimizer, schedule, step-seeded generator and logging shared by every stage (VARGPT and tokenizer)."""

    def __init__(self, config: StageConfig) -> None:
        super().__init__()
        self.config = config

    def corruption_generator(self, batch_idx: int) -> torch.Generator:
        """A fresh generator on this module's device, seeded by ``corruption_seed`` for this micro-batch."""
        trainer = self._trainer
        accumulate = trainer.accumulate_grad_batches if trainer is not None else 1
        seed = corruption_seed(self.config.seed, self.global_step, self.global_rank, batch_idx % accumulate)
        return torch.Generator(device=self.device).manual_seed(seed)

    def total_steps(self) -> int:
        """``schedule.total_steps``, or the trainer's estimate of the optimizer steps of the fit."""
        if self.config.schedule.total_steps is not None:
            return self.config.schedule.total_steps
        estimate = self.trainer.estimated_stepping_batches
        if not math.isfinite(estimate):
            raise ValueError("schedule.total_steps is null and the trainer has no finite step count: set one")
        return int(estimate)

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW over the trainable parameters with a warmup-cosine schedule stepped per optimizer step."""
        optimizer = build_optimizer(self, self.config)
        total = self.total_steps()
        schedule = self.config.schedule
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: warmup_cosine_factor(step, total, schedule.warmup_ratio, schedule.min_lr_ratio),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    @abstractmethod
    def parameter_groups(self) -> dict[str, dict[str, nn.Parameter]]:
        """The parameters of each group (``GROUP_NAMES``) by full name: what ``optimizer.lr_multipliers`` names."""

    @abstractmethod
    def parameter_counts(self) -> dict[str, int]:
        """``trainable/<group>`` parameter counts and the ``frozen`` total (each stage defines its groups)."""

    def on_fit_start(self) -> None:
        """Put the stage in training mode (models often arrive in eval mode; the frozen tokenizer and a resident
        reference stay in eval) and report the trainable parameter count per group and the frozen total once."""
        self.train()
        counts = self.parameter_counts()
        rank_zero_info(f"{type(self).__name__} parameters: {counts}")
        if self.logger is not None:
            self.logger.log_metrics({f"parameters/{name}": float(value) for name, value in counts.items()}, step=0)

    def log_losses(self, prefix: str, losses: dict[str, torch.Tensor], batch_size: int) -> None:
        """Log ``<prefix>/<name>`` for every loss (per step in training, per epoch in validation); a module driven
        without a trainer (tests, benchmarks) logs nothing."""
        if self._trainer is None:
            return
        training = prefix == "train"
        for name, value in losses.items():
            self.log(f"{prefix}/{name}", value.detach().float(), batch_size=batch_size, on_step=training,
                     on_epoch=not training, prog_bar=name == "loss", sync_dist=not training)


class VARGPTStage(StageModuleBase):
    """A VARGPT training stage: teacher-forced text + lambda x bitwise loss over the configured trainable groups.

    Subclasses fix the stage name (its default groups); DPO overrides the step.
    """

    stage_name = "generation_sft"

    def __init__(self, model: VARGPT, config: StageConfig, reference: VARGPT | None = None) -> None:
        if config.stage != self.stage_name:
            raise ValueError(f"{type(self).__name__} runs stage {self.stage_name!r}, but config.stage is "
                             f"{config.stage!r}")
        super().__init__(config)
        self.model = model
        self.reference = reference
        self.groups = apply_freezing(model, config.trainable)
        if reference is not None:
            reference.requires_grad_(False)
            reference.eval()
        if config.activation_checkpointing:
            # LLM and ViT layers, as LLaMA-Factory's default (VARGPT §4.3); the decoder blocks are not checkpointed
            model.backbone.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})

    def train(self, mode: bool = True) -> VARGPTStage:
        """Switch modes; a resident reference model always stays in eval mode."""
        super().train(mode)
        if self.reference is not None:
            self.reference.eval()
        return self

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Leave the frozen reference model out of checkpoints (it is the previous stage's export)."""
        state = checkpoint.get("state_dict", {})
        for name in [name for name in state if name.startswith("reference.")]:
            del state[name]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Put the resident reference's weights back, so the strict state-dict load of a resume succeeds."""
        if self.reference is not None:
            state = checkpoint.setdefault("state_dict", {})
            state.update({f"reference.{name}": value for name, value in self.reference.state_dict().items()})

    @property
    def image_loss_weight(self) -> float:
        """lambda: the stage's override, else the model's (3.0, VARGPT §3.2)."""
        weight = self.config.image_loss_weight
        return self.model.config.image_loss_weight if weight is None else weight

    def parameter_groups(self) -> dict[str, dict[str, nn.Parameter]]:
        """The model's freezing groups, looked up now (a strategy may have wrapped the model since ``__init__``)."""
        return group_parameters(self.model)

    def parameter_counts(self) -> dict[str, int]:
        """Trainable parameters per group and the frozen total."""
        return parameter_counts(self.groups)

    def sft_losses(self, output: TrainingOutput) -> dict[str, torch.Tensor]:
        """``loss`` = text + lambda x image, with the stage's lambda."""
        return {
            "loss": output.text_loss + self.image_loss_weight * output.image_loss,
            "text_loss": output.text_loss,
            "image_loss": output.image_loss,
        }

    @staticmethod
    def bit_accuracy_metrics(output: TrainingOutput) -> dict[str, torch.Tensor]:
        """The decoder's teacher-forced bit accuracy (all scales, and the last) when the batch has generation spans,
        else nothing. It moves long before the samples do. Logged per training step only: a validation epoch of one
        rank without generation spans would leave the others waiting in the epoch-end sync."""
        if output.bit_logits is None:  # no generation span in the batch
            return {}
        return bit_accuracy(output.bit_logits, output.bit_labels, output.schedule)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """Teacher-forced losses with step-seeded self-correction and condition dropout."""
        output = self.model.training_forward(batch, self.corruption_generator(batch_idx))
        losses = self.sft_losses(output)
        self.log_losses("train", {**losses, **self.bit_accuracy_metrics(output)}, batch["input_ids"].shape[0])
        return losses["loss"]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """The same losses on clean inputs (no bit flips, no condition dropout)."""
        output = self.model.training_forward(batch, None)
        losses = self.sft_losses(output)
        self.log_losses("val", losses, batch["input_ids"].shape[0])
        return losses["loss"]
