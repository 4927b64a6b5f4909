"""Losses: text CE only where labels exist, the reference's labels, bitwise CE with real per-scale weights."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from vargpt.chat import IGNORE_INDEX
from vargpt.losses import (
    bit_accuracy,
    bit_log_likelihood,
    image_cross_entropy,
    reference_text_labels,
    text_cross_entropy,
)


class RecordingHead(nn.Module):
    """A linear head that remembers how many rows it was evaluated on."""

    def __init__(self, hidden: int, vocab: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden, vocab, bias=False)
        self.rows: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.rows.append(x.reshape(-1, x.shape[-1]).shape[0])
        return self.linear(x)


def test_text_cross_entropy_matches_hand_computation_and_skips_unlabelled_positions() -> None:
    torch.manual_seed(0)
    hidden = torch.randn(2, 5, 8)
    head = RecordingHead(8, 11)
    labels = torch.tensor([[IGNORE_INDEX, 3, 4, IGNORE_INDEX, 7], [IGNORE_INDEX] * 4 + [2]])
    result = text_cross_entropy(hidden, labels, head)
    expected, count = 0.0, 0
    for b in range(2):
        for t in range(1, 5):
            if labels[b, t] != IGNORE_INDEX:
                logits = head.linear(hidden[b, t - 1])
                expected += -torch.log_softmax(logits, -1)[labels[b, t]].item()
                count += 1
    assert result.count == count == 4
    assert head.rows == [4]  # the head ran only on the 4 positions that predict a label
    assert result.total.item() == pytest.approx(expected, rel=1e-5)
    assert result.loss.item() == pytest.approx(expected / count, rel=1e-5)


def test_text_cross_entropy_without_labels_is_zero_with_gradient_path() -> None:
    hidden = torch.randn(1, 4, 8, requires_grad=True)
    result = text_cross_entropy(hidden, torch.full((1, 4), IGNORE_INDEX), RecordingHead(8, 5))
    assert result.count == 0 and result.loss.item() == 0.0
    result.loss.backward()


def test_reference_text_labels_mask_only_generation_pads() -> None:
    input_ids = torch.tensor([[1, 2, 9, 9, 3, 0, 0]])
    assert reference_text_labels(input_ids, 9).tolist() == [[1, 2, IGNORE_INDEX, IGNORE_INDEX, 3, 0, 0]]


def _hand_bit_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(N, L) mean over bits of the 2-way CE, written out."""
    pairs = logits.unflatten(-1, (-1, 2))
    log_z = torch.log(torch.exp(pairs[..., 0]) + torch.exp(pairs[..., 1]))
    chosen = torch.where(labels.bool(), pairs[..., 1], pairs[..., 0])
    return (log_z - chosen).mean(-1)


def test_image_loss_plain_mean_and_per_scale_weights() -> None:
    torch.manual_seed(1)
    schedule = [(1, 1), (2, 2), (3, 3)]
    logits = torch.randn(2, 14, 8)
    labels = torch.rand(2, 14, 4) > 0.5
    per_token = _hand_bit_ce(logits, labels)
    plain = image_cross_entropy(logits, labels, schedule, per_scale_weights=False)
    assert plain.item() == pytest.approx(per_token.mean().item(), rel=1e-6)
    sizes = [1] + [4] * 4 + [9] * 9
    weights = torch.tensor([1 / math.sqrt(n) for n in sizes])
    weights = weights / weights.sum()
    expected = (per_token * weights).sum(-1).mean()
    weighted = image_cross_entropy(logits, labels, schedule, per_scale_weights=True)
    assert weighted.item() == pytest.approx(expected.item(), rel=1e-6)
    # the weights really apply: scale shares are proportional to sqrt(h w) (1 : 2 : 3 here)
    shares = [weights[:1].sum(), weights[1:5].sum(), weights[5:].sum()]
    assert [s / shares[0] for s in shares] == pytest.approx([1.0, 2.0, 3.0], rel=1e-5)
    assert abs(weighted.item() - plain.item()) > 1e-4


def test_bit_weights_scale_each_bits_loss() -> None:
    torch.manual_seed(2)
    schedule = [(1, 1), (2, 2)]
    logits = torch.randn(2, 5, 8)
    labels = torch.rand(2, 5, 4) > 0.5
    ones = torch.ones(2, 5, 4)
    plain = image_cross_entropy(logits, labels, schedule, per_scale_weights=True)
    assert image_cross_entropy(logits, labels, schedule, True, ones).item() == pytest.approx(plain.item(), rel=1e-6)
    weights = torch.rand(2, 5, 4)
    pairs = logits.double().unflatten(-1, (-1, 2))
    per_bit = torch.logsumexp(pairs, -1) - torch.where(labels, pairs[..., 1], pairs[..., 0])
    expected = (per_bit * weights.double()).mean(-1).mean()
    assert image_cross_entropy(logits, labels, schedule, False, weights).item() == pytest.approx(expected.item())
    with pytest.raises(ValueError, match="bit_weights must have the labels' shape"):
        image_cross_entropy(logits, labels, schedule, False, weights[:, :4])


def test_bit_log_likelihood_sums_every_bit() -> None:
    torch.manual_seed(2)
    logits = torch.randn(3, 5, 6)
    labels = torch.rand(3, 5, 3) > 0.5
    expected = -(_hand_bit_ce(logits, labels) * 3).sum(-1)
    assert torch.allclose(bit_log_likelihood(logits, labels), expected, atol=1e-5)


def test_bit_accuracy_counts_bits_whose_label_has_the_larger_logit() -> None:
    schedule = [(1, 1), (2, 2)]  # 5 tokens; the last scale is tokens 1..4
    labels = torch.zeros(2, 5, 3, dtype=torch.bool)
    labels[0, 0] = True
    pairs = torch.zeros(2, 5, 3, 2)
    pairs[..., 0] = 1.0  # every bit predicted 0
    pairs[1, 4, 2] = torch.tensor([0.0, 1.0])  # one last-scale bit predicted 1 against label 0
    result = bit_accuracy(pairs.flatten(-2), labels, schedule)
    total = 2 * 5 * 3
    assert result["bit_accuracy"].item() == pytest.approx((total - 3 - 1) / total)  # row 0's first token: 3 wrong
    assert result["bit_accuracy_last"].item() == pytest.approx((2 * 4 * 3 - 1) / (2 * 4 * 3))
    assert not result["bit_accuracy"].requires_grad


def test_bit_accuracy_checks_shapes_against_the_schedule() -> None:
    with pytest.raises(ValueError, match="schedule"):
        bit_accuracy(torch.zeros(1, 5, 6), torch.zeros(1, 5, 3, dtype=torch.bool), [(1, 1), (1, 2)])
    with pytest.raises(ValueError, match="2d"):
        bit_accuracy(torch.zeros(1, 5, 4), torch.zeros(1, 5, 3, dtype=torch.bool), [(1, 1), (2, 2)])
