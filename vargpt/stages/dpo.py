"""Stage 4, DPO on image generation (VARGPT §3.4, ARCHITECTURE §3): preference pairs, the previous SFT model as a
frozen reference, the sigmoid / IPO / hinge losses of ``vargpt.losses`` over summed image log-probs.

Chosen and rejected rows come in one collated batch (rows ``[chosen..., rejected...]``, ``num_pairs`` = B) and go
through one forward. log p(image) sums the log-probability of every bit of every token (``bitloss_type='sum'``), or
of the tokens of the scales in ``dpo.scales`` only.

Unlike the reference, which re-drew the bit flips and the condition dropout for its reference pass, policy and
reference here see the SAME corrupted inputs (``dpo.corruption``):

* "step": the corruption is drawn from the step-seeded generator of the stage; the reference pass replays the
  generator state the policy pass started from, so both draw identical flips and drops.
* "sample": each pair's corruption is seeded by ``StageConfig.seed`` and the sample key only (``sample_seed``) and each
  pair runs its own forward (chosen + rejected together); the inputs are then a pure function of the sample, which
  is what makes precomputed reference log-probs exact.
* "none": clean targets, no dropout.

``precompute_reference=True`` takes the reference log-probs from a ``ReferenceLogProbs`` cache made before training
by ``precompute_reference_logps`` (one pass of the reference over the preference batches training will see; train.py
makes it on the training device and then frees the reference), or from a batch key ``reference_logps`` (B, 2)
(chosen, rejected) that a data pass added per sample. The cache records the seed and corruption mode it was made
with; a stage with different ones refuses it. Its entries are keyed by ``pair_ids``: the sample key plus a digest of
the pair's encoded inputs, because the same sample comes back with another random crop (or resolution) in another
epoch; a pair whose inputs the pass did not see is an error naming its key, never a silently wrong value.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from vargpt.decoder.masks import scale_index_per_token
from vargpt.losses import dpo_loss, image_log_probability
from vargpt.model import VARGPT
from vargpt.stages.base import VARGPTStage
from vargpt.stages.config import StageConfig


def sample_seed(seed: int, key: str) -> int:
    """The corruption seed of one preference sample: a stable hash of the run seed and the sample key."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def preference_pair(batch: dict[str, Any], index: int) -> dict[str, Any]:
    """The one-pair preference batch of pair ``index`` (rows ``index`` and ``B + index``), padding columns that
    both rows leave empty removed, so a pair's forward does not depend on the batch it was collated in."""
    pairs = int(batch["num_pairs"])
    rows = torch.tensor([index, pairs + index])
    columns = batch["attention_mask"][rows].bool().any(0).nonzero().flatten()
    window = slice(int(columns[0]), int(columns[-1]) + 1)
    pair: dict[str, Any] = {
        name: batch[name][rows][:, window] for name in ("input_ids", "attention_mask", "labels") if name in batch
    }
    if batch.get("pixel_values") is not None:
        grid = batch["image_grid_thw"]
        image_rows = batch["image_sample_index"]
        ends = grid.prod(-1).cumsum(0)
        starts = ends - grid.prod(-1)
        chosen = [(image_rows == row).nonzero().flatten() for row in rows.tolist()]
        images = torch.cat(chosen)
        pair["pixel_values"] = torch.cat([batch["pixel_values"][int(starts[i]):int(ends[i])] for i in images])
        pair["image_grid_thw"] = grid[images]
        pair["image_sample_index"] = torch.cat([torch.full((len(c),), n) for n, c in enumerate(chosen)])
    else:
        pair["pixel_values"], pair["image_grid_thw"] = None, None
        pair["image_sample_index"] = torch.zeros(0, dtype=torch.int64)
    targets = torch.cat([(batch["gen_sample_index"] == row).nonzero().flatten() for row in rows.tolist()])
    pair["gen_images"] = batch["gen_images"][targets]
    pair["gen_sample_index"] = batch["gen_sample_index"][targets] // pairs
    if batch.get("gen_source_images") is not None:
        pair["gen_source_images"] = batch["gen_source_images"][targets]
        pair["gen_source_mask"] = batch["gen_source_mask"][targets]
    for name in ("gen_size", "gen_schedule", "gen_placeholder_count"):
        if name in batch:
            pair[name] = batch[name]
    if batch.get("keys"):
        pair["keys"] = [batch["keys"][index]]
    pair["num_pairs"] = 1
    return pair


@dataclass
class PreferenceLogProbs:
    """Summed image log-probs of a preference batch: chosen (B,), rejected (B,), and the tokens per image they
    count."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    tokens: int


def scale_token_mask(schedule: Sequence[tuple[int, int]], scales: Sequence[int]) -> torch.Tensor:
    """(L,) bool over the tokens of ``schedule`` (scale after scale, row-major), True on those of ``scales``."""
    missing = sorted(k for k in scales if k >= len(schedule))
    if missing:
        raise ValueError(f"dpo.scales has scale(s) {missing}, but the batch's schedule has {len(schedule)} scales "
                         f"({[list(scale) for scale in schedule]}), numbered from 0")
    return torch.isin(scale_index_per_token(schedule), torch.tensor(list(scales), dtype=torch.int64))


def _split_pairs(
    model: VARGPT, batch: dict[str, Any], generator: torch.Generator | None, scales: Sequence[int] | None = None
) -> PreferenceLogProbs:
    pairs = int(batch["num_pairs"])
    output = model.training_forward(batch, generator)
    if output.bit_logits is None or not torch.equal(output.span_rows.cpu(), torch.arange(2 * pairs)):
        raise ValueError(f"a preference batch needs exactly one generation span per row ({2 * pairs} rows), got "
                         f"spans in rows {output.span_rows.tolist()}")
    logits, labels, weights = output.bit_logits, output.bit_labels, output.bit_weights
    if scales is not None:  # only the chosen scales' tokens count
        keep = scale_token_mask(output.schedule, scales).to(labels.device)
        logits, labels = logits[:, keep], labels[:, keep]
        weights = None if weights is None else weights[:, keep]
    logps = image_log_probability(logits, labels, weights)
    return PreferenceLogProbs(logps[:pairs], logps[pairs:], labels.shape[1])


def preference_log_probs(
    model: VARGPT,
    batch: dict[str, Any],
    corruption: str,
    seed: int,
    generator: torch.Generator | None,
    scales: Sequence[int] | None = None,
) -> PreferenceLogProbs:
    """Image log-probs of chosen and rejected rows under ``corruption`` ("step": ``generator``; "sample": per-pair
    seeds from ``seed`` and the sample keys; "none": clean), over the bits of ``scales`` (None: every scale)."""
    if "num_pairs" not in batch:
        raise ValueError("DPO needs preference batches (rows [chosen..., rejected...] with 'num_pairs')")
    if corruption == "none":
        return _split_pairs(model, batch, None, scales)
    if corruption == "step":
        return _split_pairs(model, batch, generator, scales)
    if corruption != "sample":
        raise ValueError(f"corruption must be 'step', 'sample' or 'none', got {corruption!r}")
    keys = batch.get("keys")
    if not keys or len(keys) != int(batch["num_pairs"]):
        raise ValueError("dpo.corruption='sample' seeds each pair by its sample key: the batch needs 'keys' (B)")
    device = batch["input_ids"].device
    results = []
    for index, key in enumerate(keys):
        pair_generator = torch.Generator(device=device).manual_seed(sample_seed(seed, key))
        results.append(_split_pairs(model, preference_pair(batch, index), pair_generator, scales))
    return PreferenceLogProbs(
        torch.cat([r.chosen for r in results]), torch.cat([r.rejected for r in results]), results[0].tokens
    )


def pair_ids(batch: dict[str, Any]) -> list[str]:
    """``<sample key>#<digest>`` of each pair of a preference batch: the digest (SHA-256, 16 hex digits) covers the
    pair's token ids, generation targets and input images, so it changes with the crop and the resolution."""
    keys = batch.get("keys")
    if not keys or len(keys) != int(batch["num_pairs"]):
        raise ValueError("reference log-probs computed ahead are keyed by sample: the batch needs 'keys' (B)")
    identifiers = []
    for index, key in enumerate(keys):
        pair = preference_pair(batch, index)
        digest = hashlib.sha256()
        for name in ("input_ids", "gen_images", "pixel_values", "image_grid_thw"):
            if pair.get(name) is not None:
                value = pair[name].detach().cpu().contiguous()
                digest.update(f"{name}{tuple(value.shape)}{value.dtype}".encode())
                digest.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
        identifiers.append(f"{key}#{digest.hexdigest()[:16]}")
    return identifiers


@dataclass
class ReferenceLogProbs:
    """Reference log-probs computed ahead: ``values[pair id]`` = (chosen, rejected) (see ``pair_ids``), valid for
    ``seed`` + ``corruption`` + ``scales`` (``dpo.scales``, None: every scale)."""

    seed: int
    corruption: str
    values: dict[str, tuple[float, float]] = field(default_factory=dict)
    scales: list[int] | None = None

    def lookup(self, keys: Iterable[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen (B,), rejected (B,)) float64 tensors of the pairs ``keys`` (``pair_ids``); a missing one is an
        error."""
        keys = list(keys)
        missing = [key for key in keys if key not in self.values]
        if missing:
            raise KeyError(f"no precomputed reference log-probs for pair(s) {missing[:5]} (sample key#input digest): "
                           "the training batches differ from those of the precompute pass; rerun "
                           "precompute_reference_logps over the batches training reads")
        values = torch.tensor([self.values[key] for key in keys], dtype=torch.float64)
        return values[:, 0], values[:, 1]


@torch.no_grad()
def precompute_reference_logps(
    reference: VARGPT, batches: Iterable[dict[str, Any]], config: StageConfig
) -> ReferenceLogProbs:
    """One pass of the frozen reference over collated preference batches, with the corruption the DPO stage will use
    ("sample" or "none"), giving the cache ``DPO`` reads when ``dpo.precompute_reference`` is set. Run it under the
    training step's autocast (``trainer.precision_plugin.forward_context()``) for values equal to a resident
    reference's."""
    corruption = config.dpo.corruption
    if corruption == "step":
        raise ValueError("dpo.corruption='step' redraws the inputs every step; precompute needs 'sample' or 'none'")
    was_training = reference.training
    reference.eval()
    scales = config.dpo.scales
    cache = ReferenceLogProbs(config.seed, corruption, scales=None if scales is None else list(scales))
    for batch in batches:
        logps = preference_log_probs(reference, batch, corruption, config.seed, None, scales)
        for key, chosen, rejected in zip(pair_ids(batch), logps.chosen.tolist(), logps.rejected.tolist()):
            cache.values[key] = (chosen, rejected)
    reference.train(was_training)
    return cache


def _scale_set(scales: Sequence[int] | None) -> frozenset[int] | None:
    return None if scales is None else frozenset(scales)


class DPO(VARGPTStage):
    """Preference optimisation of the generation path against a frozen reference (resident or precomputed)."""

    stage_name = "dpo"

    def __init__(
        self,
        model: VARGPT,
        config: StageConfig,
        reference: VARGPT | None = None,
        reference_logps: ReferenceLogProbs | Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(model, config, reference)
        options = config.dpo
        if options.precompute_reference:
            if reference is not None:
                raise ValueError("dpo.precompute_reference is set: pass reference_logps, not a resident reference")
        elif reference is None:
            raise ValueError("DPO needs a frozen reference model (the previous stage), or dpo.precompute_reference")
        self.reference_logps: ReferenceLogProbs | Mapping[str, Any] | None = None
        if reference_logps is not None:
            self.use_reference_logps(reference_logps)

    def use_reference_logps(self, reference_logps: ReferenceLogProbs | Mapping[str, Any]) -> None:
        """Read the reference log-probs from ``reference_logps`` from now on (a cache made for this seed and
        corruption; ``dpo.precompute_reference`` must be set)."""
        options = self.config.dpo
        if not options.precompute_reference:
            raise ValueError("reference log-probs computed ahead need dpo.precompute_reference: true")
        if isinstance(reference_logps, ReferenceLogProbs) and (
            reference_logps.seed != self.config.seed
            or reference_logps.corruption != options.corruption
            or _scale_set(reference_logps.scales) != _scale_set(options.scales)
        ):
            raise ValueError(
                f"the reference log-probs were computed with seed={reference_logps.seed}, corruption="
                f"{reference_logps.corruption!r}, scales={reference_logps.scales}; this stage uses seed="
                f"{self.config.seed}, corruption={options.corruption!r}, scales={options.scales}"
            )
        self.reference_logps = reference_logps

    def _reference(
        self, batch: dict[str, Any], generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference log-probs (chosen, rejected): the resident model on the policy's inputs, or precomputed."""
        if not self.config.dpo.precompute_reference:
            with torch.no_grad():
                logps = preference_log_probs(
                    self.reference, batch, self.config.dpo.corruption, self.config.seed, generator,
                    self.config.dpo.scales,
                )
            return logps.chosen, logps.rejected
        if "reference_logps" in batch:
            values = batch["reference_logps"]
            return values[:, 0], values[:, 1]
        if self.reference_logps is None:
            raise ValueError("dpo.precompute_reference is set but the batch has no 'reference_logps' and the stage "
                             "no reference_logps cache")
        return self.reference_logps.lookup(pair_ids(batch))

    def dpo_losses(self, batch: dict[str, Any], generator: torch.Generator | None) -> dict[str, torch.Tensor]:
        """Policy and reference log-probs on the same inputs, the configured preference loss and its metrics."""
        options = self.config.dpo
        replay = None
        if generator is not None:
            replay = torch.Generator(device=generator.device)
            replay.set_state(generator.get_state())
        policy = preference_log_probs(
            self.model, batch, options.corruption, self.config.seed, generator, options.scales
        )
        reference_chosen, reference_rejected = self._reference(batch, replay)
        device = policy.chosen.device
        reference_chosen = reference_chosen.to(device, torch.float32)
        reference_rejected = reference_rejected.to(device, torch.float32)
        scale = 1.0 / policy.tokens if options.loss == "ipo" else 1.0  # IPO on length-normalised log-probs
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            policy.chosen * scale, policy.rejected * scale, reference_chosen * scale, reference_rejected * scale,
            beta=options.beta, loss_type=options.loss, label_smoothing=options.label_smoothing,
        )
        preference = losses.mean()
        sft = -policy.chosen.mean() / policy.tokens  # pref_ftx's term: chosen NLL per token (VARGPT §3.4)
        return {
            "loss": preference + options.sft_weight * sft if options.sft_weight else preference,
            "dpo_loss": preference,
            "sft_loss": sft.detach(),
            "rewards_chosen": chosen_rewards.mean(),
            "rewards_rejected": rejected_rewards.mean(),
            "reward_margin": (chosen_rewards - rejected_rewards).mean(),
            "reward_accuracy": (chosen_rewards > rejected_rewards).float().mean(),
            "logps_chosen": policy.chosen.detach().mean(),
            "logps_rejected": policy.rejected.detach().mean(),
        }

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """One DPO step; the corruption generator is the step-seeded one (used by ``dpo.corruption='step'``)."""
        generator = self.corruption_generator(batch_idx) if self.config.dpo.corruption == "step" else None
        losses = self.dpo_losses(batch, generator)
        self.log_losses("train", losses, int(batch["num_pairs"]))
        return losses["loss"]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """DPO metrics without step-drawn corruption ("sample" keeps its per-sample inputs)."""
        losses = self.dpo_losses(batch, None)
        self.log_losses("val", losses, int(batch["num_pairs"]))
        return losses["loss"]
