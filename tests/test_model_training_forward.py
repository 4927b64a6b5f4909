"""The training forward: mixed batches line up per sample, the losses match hand computations in both modes, CFG
dropout builds the empty-prompt branch, gradients reach the trainable parts and never the frozen tokenizer."""

from __future__ import annotations

import pytest
import torch
from helpers_tiny_model import make_batch, mixed_samples, tiny_image, tiny_model

from vargpt.chat import IGNORE_INDEX
from vargpt.losses import reference_text_labels


def _hand_bit_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    pairs = logits.double().unflatten(-1, (-1, 2))
    log_z = torch.logsumexp(pairs, -1)
    chosen = torch.where(labels.bool(), pairs[..., 1], pairs[..., 0])
    return (log_z - chosen).mean(-1)  # (N, L)


def test_mixed_batch_equals_each_sample_alone() -> None:
    model = tiny_model(condition_drop=0.0)
    samples = mixed_samples()
    out = model.training_forward(make_batch(samples))
    singles = [model.training_forward(make_batch([sample])) for sample in samples]
    assert out.span_rows.tolist() == [1, 2]
    span_logits = [single.bit_logits for single in singles if single.bit_logits is not None]
    assert torch.allclose(out.bit_logits, torch.cat(span_logits), atol=1e-5)
    assert torch.equal(out.bit_labels, torch.cat([s.bit_labels for s in singles if s.bit_labels is not None]))
    assert out.text_token_count == sum(single.text_token_count for single in singles)
    total = sum(single.text_loss_sum for single in singles)
    assert out.text_loss_sum.item() == pytest.approx(total.item(), rel=1e-5)
    assert out.loss.item() == pytest.approx(out.text_loss.item() + 3.0 * out.image_loss.item(), rel=1e-6)


def test_default_losses_match_hand_computation() -> None:
    model = tiny_model(condition_drop=0.0)
    batch = make_batch(mixed_samples()[1:3])
    out = model.training_forward(batch)
    schedule_sizes = [1, 4, 16]
    weights = torch.cat([torch.full((n,), n**-0.5, dtype=torch.float64) for n in schedule_sizes])
    weights = weights / weights.sum()
    expected_image = (_hand_bit_ce(out.bit_logits, out.bit_labels) * weights).sum(-1).mean()
    assert out.image_loss.item() == pytest.approx(expected_image.item(), rel=1e-5)
    assert out.text_token_count == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    unweighted = _hand_bit_ce(out.bit_logits, out.bit_labels).mean()
    assert abs(out.image_loss.item() - unweighted.item()) > 1e-6  # the per-scale weights are not a no-op


def test_magnitude_bit_weights_weight_each_bit_by_its_residual_magnitude() -> None:
    from vargpt.tokenizer import bitwise_self_correction

    uniform = tiny_model(condition_drop=0.0)
    weighted = tiny_model(condition_drop=0.0, bit_loss_weights="magnitude")
    batch = make_batch(mixed_samples()[1:3])
    out = weighted.training_forward(batch)
    plain = uniform.training_forward(batch)
    assert torch.equal(out.bit_logits, plain.bit_logits)  # the same model: only the loss differs
    features = weighted.tokenizer.encode_features(batch["gen_images"])
    magnitudes = bitwise_self_correction(features, [(1, 1), (2, 2), (4, 4)], None).magnitudes.double()
    pairs = out.bit_logits.double().unflatten(-1, (-1, 2))
    per_bit = torch.logsumexp(pairs, -1) - torch.where(out.bit_labels.bool(), pairs[..., 1], pairs[..., 0])
    sizes = [1, 4, 16]
    scale = torch.cat([torch.full((n,), n**-0.5, dtype=torch.float64) for n in sizes])
    expected = ((per_bit * magnitudes).mean(-1) * scale / scale.sum()).sum(-1).mean()
    assert out.image_loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert abs(out.image_loss.item() - plain.image_loss.item()) > 1e-4
    compat = tiny_model(condition_drop=0.0, bit_loss_weights="magnitude", reference_compat=True)
    reference = tiny_model(condition_drop=0.0, reference_compat=True)
    assert compat.training_forward(batch).image_loss.item() == reference.training_forward(batch).image_loss.item()
    with pytest.raises(ValueError, match="bit_loss_weights must be one of"):
        tiny_model(bit_loss_weights="large")
    # residual: each bit's magnitude times its token's relative residual norm
    corrected = bitwise_self_correction(features, [(1, 1), (2, 2), (4, 4)], None)
    residual = tiny_model(condition_drop=0.0, bit_loss_weights="residual").training_forward(batch)
    assert torch.equal(residual.bit_logits, out.bit_logits)
    assert torch.equal(residual.bit_weights, corrected.magnitudes * corrected.token_weights)
    weights = residual.bit_weights.double()
    expected = ((per_bit * weights).mean(-1) * scale / scale.sum()).sum(-1).mean()
    assert residual.image_loss.item() == pytest.approx(expected.item(), rel=1e-5)
    compat = tiny_model(condition_drop=0.0, bit_loss_weights="residual", reference_compat=True)
    assert compat.training_forward(batch).image_loss.item() == reference.training_forward(batch).image_loss.item()


def test_reference_compat_losses_match_hand_computation() -> None:
    default = tiny_model(condition_drop=0.0)
    compat = tiny_model(condition_drop=0.0, reference_compat=True)
    batch = make_batch(mixed_samples())
    out = compat.training_forward(batch)
    # text labels: every token of input_ids (prompt, image pads, padding) except the generation pads
    relabelled = dict(batch, labels=reference_text_labels(batch["input_ids"], compat.config.image_gen_pad_token_id))
    expected_text = default.training_forward(relabelled)
    assert out.text_token_count == expected_text.text_token_count
    assert out.text_token_count == int((batch["input_ids"][:, 1:] != compat.config.image_gen_pad_token_id).sum())
    assert out.text_loss.item() == pytest.approx(expected_text.text_loss.item(), rel=1e-6)
    # image loss: the plain mean over all bits, no per-scale weights
    assert out.image_loss.item() == pytest.approx(_hand_bit_ce(out.bit_logits, out.bit_labels).mean().item(), rel=1e-5)
    assert out.loss.item() == pytest.approx(out.text_loss.item() + 3.0 * out.image_loss.item(), rel=1e-6)


def test_condition_drop_uses_the_empty_prompt_branch() -> None:
    model = tiny_model(condition_drop=0.5, max_flip=0.0)
    generation = mixed_samples()[1]
    out = model.training_forward(make_batch([generation, generation]), torch.Generator().manual_seed(3))
    assert out.condition_dropped.tolist() == [True, False]  # this seed drops one span of two
    empty = {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "<image_gen>"}],
             "targets": generation["targets"]}
    unconditional = model.training_forward(make_batch([empty])).bit_logits[0]
    conditional = model.training_forward(make_batch([generation])).bit_logits[0]
    for index, dropped in enumerate(out.condition_dropped.tolist()):
        expected = unconditional if dropped else conditional
        assert torch.allclose(out.bit_logits[index], expected, atol=1e-5)
    assert not torch.allclose(unconditional, conditional, atol=1e-3)


def test_adaln_from_prompt_pools_the_prompt_and_the_empty_prompt_when_dropped() -> None:
    model = tiny_model(condition_drop=0.5, max_flip=0.0, adaln_from_prompt=True)
    generation = mixed_samples()[1]
    out = model.training_forward(make_batch([generation, generation]), torch.Generator().manual_seed(3))
    assert out.condition_dropped.tolist() == [True, False]
    empty = {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "<image_gen>"}],
             "targets": generation["targets"]}
    assert torch.allclose(out.bit_logits[0], model.training_forward(make_batch([empty])).bit_logits[0], atol=1e-5)
    assert torch.allclose(out.bit_logits[1], model.training_forward(make_batch([generation])).bit_logits[0], atol=1e-5)
    # the condition is the pool of the valid context rows: padding never changes it, the prompt does
    start = model.start_condition(2)
    context = torch.randn(2, 5, model.config.decoder.context_dim)
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    pooled = model.adaln_condition(start, context, mask)
    garbage = context.clone()
    garbage[1, 3:] = 100.0
    assert torch.allclose(model.adaln_condition(start, garbage, mask), pooled, atol=1e-6)
    assert not torch.allclose(pooled[0], pooled[1], atol=1e-3)
    reference = tiny_model(adaln_from_prompt=False)
    assert torch.equal(reference.adaln_condition(start, context, mask), start)


def test_reference_compat_condition_drop_replaces_the_start_condition() -> None:
    model = tiny_model(condition_drop=0.5, max_flip=0.0, reference_compat=True)
    generation = mixed_samples()[1]
    out = model.training_forward(make_batch([generation, generation]), torch.Generator().manual_seed(3))
    assert out.condition_dropped.tolist() == [True, False]
    kept = model.training_forward(make_batch([generation])).bit_logits[0]
    for index, dropped in enumerate(out.condition_dropped.tolist()):
        assert torch.allclose(out.bit_logits[index], kept, atol=1e-5) != dropped


def test_self_correction_flips_come_from_the_generator() -> None:
    model = tiny_model(condition_drop=0.0)
    batch = make_batch([mixed_samples()[1]])
    first = model.training_forward(batch, torch.Generator().manual_seed(7))
    again = model.training_forward(batch, torch.Generator().manual_seed(7))
    clean = model.training_forward(batch)
    assert torch.equal(first.bit_logits, again.bit_logits)
    assert not torch.allclose(first.bit_logits, clean.bit_logits)


def test_gradients_reach_trainable_parts_and_not_the_tokenizer() -> None:
    model = tiny_model(condition_drop=0.0).train()
    out = model.training_forward(make_batch(mixed_samples()), torch.Generator().manual_seed(0))
    out.loss.backward()
    for name in ("bridge.in_projector.fc1.weight", "bridge.out_projector.fc2.weight", "bridge.start_condition",
                 "decoder.word_embed.weight", "lm_head.weight", "backbone.visual.merger.mlp.0.weight"):
        parameter = dict(model.named_parameters())[name]
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    assert all(p.grad is None and not p.requires_grad for p in model.tokenizer.parameters())
    assert not model.tokenizer.training


def test_span_and_target_mismatch_is_an_error() -> None:
    model = tiny_model(condition_drop=0.0)
    batch = make_batch([mixed_samples()[1]])
    batch["gen_images"] = torch.stack([tiny_image(0), tiny_image(1)])
    batch["gen_sample_index"] = torch.tensor([0, 0])
    with pytest.raises(ValueError, match="1 generation spans but 2 gen_images"):
        model.training_forward(batch)
    short = make_batch([mixed_samples()[1]])
    short["gen_placeholder_count"] = 40
    with pytest.raises(ValueError, match="followed by 40 <\\|image_gen_pad\\|>"):
        model.training_forward(short)


def test_targets_of_the_wrong_size_are_an_error() -> None:
    model = tiny_model(condition_drop=0.0)
    batch = make_batch([mixed_samples()[1]])
    batch["gen_images"] = tiny_image(0, size=32)[None]
    with pytest.raises(ValueError, match="8x8 latent grid but the schedule ends at \\(4, 4\\)"):
        model.training_forward(batch)


def test_condition_drop_with_rows_shorter_than_the_empty_prompt() -> None:
    from vargpt.chat import encode_chat

    model = tiny_model(condition_drop=0.5, max_flip=0.0)
    sample = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "<image_gen>"}],
              "targets": [tiny_image(2)]}
    batch = make_batch([sample, sample])
    row = encode_chat(model.text_tokenizer, sample["messages"], gen_placeholder_count=24, system_prompt=None)
    for key, values in (("input_ids", row.input_ids), ("labels", row.labels)):
        batch[key] = torch.tensor([values, values])
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    assert batch["input_ids"].shape[1] < len(model.unconditional_prompt_ids) + 24
    out = model.training_forward(batch, torch.Generator().manual_seed(3))
    assert out.condition_dropped.tolist() == [True, False]
    assert out.text_token_count == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
