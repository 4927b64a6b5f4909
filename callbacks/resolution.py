"""``ResolutionSchedule``: switch the generation resolution at configured steps (e.g. 256 -> 512 px, VARGPT §4.2).

The target size, the scale schedule and hence the placeholder count change together, and the model reads each
batch's own ``gen_schedule``. Before the fit, the callback hands the whole schedule to the DataModule as a plan by
batch index (``set_generation_plan``, at the first micro-batch of each phase's optimizer step), so
every batch gets the resolution of the optimizer step it is trained at, however far the DataLoader workers have read
ahead, and a run is reproducible. With a DataModule that has only ``set_generation_resolution``, the callback sets
the phase when it becomes due, and batches the workers assembled before that keep the old resolution.

The active phase is a pure function of ``trainer.global_step``, so a run resumed from a checkpoint taken after a
switch continues at the new resolution without any extra state.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import lightning
from lightning.pytorch.utilities import rank_zero_info

from vargpt.schedules import PN_NUM_SCALES, scale_schedule, schedule_for_latent, validate_schedule


@dataclass(frozen=True)
class ResolutionPhase:
    """From ``step`` on, generation targets are ``size`` px squares tokenized with ``schedule``."""

    step: int
    size: int
    schedule: tuple[tuple[int, int], ...]


def resolution_phase(
    step: int,
    size: int,
    pn: str | None = None,
    schedule: Sequence[Sequence[int]] | None = None,
    stride: int | None = None,
) -> ResolutionPhase:
    """A phase whose schedule is explicit, an Infinity preset ``pn``, or the latent grid ``size / stride``."""
    if step < 0:
        raise ValueError(f"resolution phase step must be >= 0, got {step}")
    if size < 1:
        raise ValueError(f"resolution phase size must be >= 1, got {size}")
    given = [name for name, value in (("pn", pn), ("schedule", schedule), ("stride", stride)) if value is not None]
    if len(given) != 1:
        raise ValueError(f"a resolution phase needs exactly one of pn, schedule or stride; got {given or 'none'}")
    if pn is not None:
        if pn not in PN_NUM_SCALES:
            raise ValueError(f"unknown pn {pn!r} for the {size} px phase; allowed: {sorted(PN_NUM_SCALES)}")
        resolved = scale_schedule(pn)
    elif schedule is not None:
        resolved = validate_schedule(schedule)
    else:
        if size % stride:
            raise ValueError(f"phase size {size} is not divisible by the tokenizer stride {stride}")
        resolved = schedule_for_latent(size // stride, size // stride)
    return ResolutionPhase(step=step, size=size, schedule=tuple(resolved))


class ResolutionSchedule(lightning.Callback):
    """Applies the phase whose ``step`` is the latest one <= ``trainer.global_step`` before every training batch."""

    def __init__(self, phases: Sequence[ResolutionPhase]) -> None:
        if not phases:
            raise ValueError("ResolutionSchedule needs at least one phase")
        ordered = sorted(phases, key=lambda phase: phase.step)
        if ordered[0].step != 0:
            raise ValueError(f"the first resolution phase must start at step 0, got step {ordered[0].step}")
        steps = [phase.step for phase in ordered]
        if len(set(steps)) != len(steps):
            raise ValueError(f"resolution phases must start at distinct steps, got {steps}")
        self.phases = ordered
        self.current: ResolutionPhase | None = None

    def phase_at(self, step: int) -> ResolutionPhase:
        """The phase in force at global step ``step``."""
        return [phase for phase in self.phases if phase.step <= step][-1]

    def _apply(self, trainer: lightning.Trainer) -> None:
        phase = self.phase_at(trainer.global_step)
        if phase == self.current:
            return
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "set_generation_resolution"):
            raise RuntimeError(
                "ResolutionSchedule needs a DataModule with set_generation_resolution(size, schedule) "
                "(datamodules.datamodule.ShardDataModule)"
            )
        datamodule.set_generation_resolution(phase.size, [list(scale) for scale in phase.schedule])
        previous, self.current = self.current, phase
        rank_zero_info(
            f"step {trainer.global_step}: generation resolution "
            f"{'set to' if previous is None else f'{previous.size} ->'} {phase.size} px, "
            f"{len(phase.schedule)} scales ending at {phase.schedule[-1]}"
        )

    def setup(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule, stage: str) -> None:
        """Give the DataModule the plan, and apply the first phase, before the fit loop creates the training iterator:
        Lightning starts the DataLoader workers (which assemble batches at once) before ``on_train_start``, so a phase
        applied only there raced the workers: the first batches could come at the DataModule's own size, and the
        first ones after a switch at the old size, more or fewer from run to run."""
        if stage != "fit":
            return
        datamodule = trainer.datamodule
        if datamodule is not None and hasattr(datamodule, "set_generation_plan"):
            accumulate = trainer.accumulate_grad_batches
            datamodule.set_generation_plan([
                (datamodule.first_batch_of_step(phase.step, accumulate), phase.size, [list(s) for s in phase.schedule])
                for phase in self.phases
            ])
        self.current = None
        self._apply(trainer)

    def on_train_start(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> None:
        self.current = None
        self._apply(trainer)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001 (Lightning hook)
        """Switch if due (batches assembled from now on), and log the size the model is trained at this step."""
        self._apply(trainer)
        size = batch.get("gen_size") or self.current.size
        pl_module.log("generation_resolution", float(size), on_step=True, on_epoch=False, rank_zero_only=True)
