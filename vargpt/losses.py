"""Training losses of the unified model (VARGPT §3): text CE on the LM head, bitwise CE on the decoder head.

Pure functions over hidden states / logits and labels. The default text loss covers the tokens that carry a label
(assistant turns, from the data pipeline); ``reference_text_labels`` rebuilds the reference's labels for generation
batches (every token but the generation pads, VARGPT §3.2). The image loss is the per-bit 2-way CE averaged over the
bits of a token, with Infinity's per-scale token weights w_k ∝ 1 / sqrt(h_k w_k) normalised over the tokens
(INFINITY §4), or the plain mean over all bits as the released reference effectively computed.
DPO losses over image log-probabilities belong in this module too (``bit_log_likelihood`` is their input).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vargpt.chat import IGNORE_INDEX
from vargpt.decoder.head import bit_cross_entropy, scale_loss_weights
from vargpt.schedules import scale_starts, token_count


@dataclass
class TextLoss:
    """Mean shifted next-token CE (``loss``), and its parts: the summed CE and the number of trained tokens."""

    loss: torch.Tensor
    total: torch.Tensor
    count: int


def text_cross_entropy(hidden: torch.Tensor, labels: torch.Tensor, lm_head: nn.Module) -> TextLoss:
    """Shifted CE of ``lm_head(hidden)`` against ``labels`` (B, T); -100 is ignored.

    The head runs only at the positions whose next token has a label (a 150k-word head over thousands of image
    positions is the largest waste of the reference, VARGPT §8.2), in fp32. No labelled token gives loss 0.
    """
    targets = labels[:, 1:]
    trained = targets != IGNORE_INDEX
    count = int(trained.sum())
    if count == 0:
        zero = hidden.sum() * 0.0
        return TextLoss(loss=zero, total=zero, count=0)
    logits = lm_head(hidden[:, :-1][trained]).float()
    total = F.cross_entropy(logits, targets[trained], reduction="sum")
    return TextLoss(loss=total / count, total=total, count=count)


def reference_text_labels(input_ids: torch.Tensor, image_gen_pad_token_id: int) -> torch.Tensor:
    """The reference's text labels in generation batches: ``input_ids`` with only the generation pads masked.

    Padding tokens, the prompt and understanding image pads are all trained, as in `get_gen_loss_1_1` (VARGPT §3.2).
    """
    return input_ids.masked_fill(input_ids == image_gen_pad_token_id, IGNORE_INDEX)


def image_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    schedule: Sequence[Sequence[int]],
    per_scale_weights: bool,
    bit_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Bitwise CE of (N, L, 2d) logits against (N, L, d) bits: per-scale weighted (INFINITY §4) or the plain mean;
    ``bit_weights`` (N, L, d) weight each bit (``bit_loss_weights`` 'magnitude' or 'residual')."""
    weights = scale_loss_weights(schedule, logits.device) if per_scale_weights else None
    return bit_cross_entropy(logits, labels, weights, bit_weights)


def bit_accuracy(
    logits: torch.Tensor, labels: torch.Tensor, schedule: Sequence[Sequence[int]]
) -> dict[str, torch.Tensor]:
    """Teacher-forced bit accuracy of (N, L, 2d) logits against (N, L, d) bits (no gradient): ``bit_accuracy`` over
    every bit, ``bit_accuracy_last`` over the last scale's alone, where the image's fine detail is decided.

    A bit counts as right when its label has the larger of its two logits (a tie counts as bit 0). ``schedule`` must
    account for the L tokens.
    """
    shapes_match = logits.ndim == labels.ndim == 3 and logits.shape[:2] == labels.shape[:2]
    if not shapes_match or logits.shape[-1] != 2 * labels.shape[-1]:
        raise ValueError(f"bit_accuracy needs (N, L, 2d) logits and (N, L, d) labels, got {tuple(logits.shape)} and "
                         f"{tuple(labels.shape)}")
    tokens = token_count(schedule)
    if tokens != labels.shape[1]:
        raise ValueError(f"the schedule {list(schedule)} has {tokens} tokens, the labels {labels.shape[1]}")
    with torch.no_grad():
        pairs = logits.detach().unflatten(-1, (-1, 2))
        right = ((pairs[..., 1] > pairs[..., 0]) == labels.bool()).float()
        last = scale_starts(schedule)[-1]
        return {"bit_accuracy": right.mean(), "bit_accuracy_last": right[:, last:].mean()}


def bit_log_likelihood(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(N,) summed log-probability of every bit of each image (the reference's DPO ``bitloss_type='sum'``)."""
    pairs = logits.float().unflatten(-1, (-1, 2)).log_softmax(-1)
    return pairs.gather(-1, labels.long().unsqueeze(-1)).squeeze(-1).flatten(1).sum(-1)


# ---------------------------------------------------------------------------------------------- DPO (VARGPT §3.4)


def image_log_probability(
    logits: torch.Tensor, labels: torch.Tensor, bit_weights: torch.Tensor | None = None
) -> torch.Tensor:
    """(N,) summed log-probability of the label bits, like ``bit_log_likelihood`` without its (N, L, d, 2) tensor.

    For a 2-way softmax over logits (a_0, a_1), log p(b) = logsigmoid(a_b - a_{1-b}): one logit difference per bit,
    signed by the label, folds the pair (the 1-logit form), so only (N, L, d) values are ever materialised.
    ``bit_weights`` (N, L, d) weight each bit's term (the model's ``bit_loss_weights``, as its SFT loss does).
    """
    pairs = logits.unflatten(-1, (-1, 2))
    difference = (pairs[..., 1] - pairs[..., 0]).float()
    signed = torch.where(labels.bool(), difference, -difference)
    terms = F.logsigmoid(signed)
    if bit_weights is not None:
        terms = terms * bit_weights.to(terms.device, terms.dtype)
    return terms.flatten(1).sum(-1)


def _preference_log_ratio(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """h = (pi_c - ref_c) - (pi_r - ref_r), and the detached implicit rewards beta (pi - ref) of each side."""
    chosen_ratio = policy_chosen - reference_chosen.detach()
    rejected_ratio = policy_rejected - reference_rejected.detach()
    return chosen_ratio - rejected_ratio, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def sigmoid_dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO's sigmoid loss per pair, -log sigmoid(beta h), with conservative label smoothing eps (a share eps of the
    pairs is assumed flipped): -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h).

    Inputs are (B,) summed log-probs; returns (losses (B,), chosen rewards (B,), rejected rewards (B,)).
    """
    ratio, chosen_rewards, rejected_rewards = _preference_log_ratio(
        policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta
    )
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * ratio) - label_smoothing * F.logsigmoid(-beta * ratio)
    return losses, chosen_rewards, rejected_rewards


def ipo_dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """IPO per pair, (h - 1 / (2 beta))^2; meant for length-normalised log-probs (the caller divides them)."""
    ratio, chosen_rewards, rejected_rewards = _preference_log_ratio(
        policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta
    )
    return (ratio - 1 / (2 * beta)) ** 2, chosen_rewards, rejected_rewards


def hinge_dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SLiC's hinge per pair, max(0, 1 - beta h)."""
    ratio, chosen_rewards, rejected_rewards = _preference_log_ratio(
        policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta
    )
    return torch.relu(1 - beta * ratio), chosen_rewards, rejected_rewards


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The preference loss named ``loss_type`` ("sigmoid", "ipo", "hinge"); label smoothing is sigmoid-only."""
    arguments = (policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta)
    if loss_type == "sigmoid":
        return sigmoid_dpo_loss(*arguments, label_smoothing=label_smoothing)
    if label_smoothing:
        raise ValueError(f"label_smoothing applies to the sigmoid loss only, got loss_type={loss_type!r}")
    if loss_type == "ipo":
        return ipo_dpo_loss(*arguments)
    if loss_type == "hinge":
        return hinge_dpo_loss(*arguments)
    raise ValueError(f"loss_type must be one of ('sigmoid', 'ipo', 'hinge'), got {loss_type!r}")
