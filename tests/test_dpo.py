"""DPO: the pure losses, memory-efficient image log-probs, same corrupted inputs for policy and reference, gradient
direction, and precomputed reference log-probs equal to a resident reference."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from helpers_tiny_model import make_batch, tiny_image, tiny_model
from vargpt.config import ConfigError
from vargpt.losses import bit_log_likelihood, dpo_loss, image_log_probability
from vargpt.stages import StageConfig
from vargpt.stages.dpo import DPO, precompute_reference_logps, preference_log_probs, preference_pair


def preference_batch(pairs: list[int]) -> dict:
    """Rows [chosen..., rejected...] of pairs with seeds ``pairs``; prompts of different lengths."""
    prompts = ["a red circle on a blue square", "two green triangles next to a yellow star", "make the circle blue"]

    def row(index: int, image_seed: int) -> dict:
        return {"messages": [{"role": "user", "content": prompts[index % len(prompts)]},
                             {"role": "assistant", "content": "here is the picture<image_gen>"}],
                "targets": [tiny_image(image_seed)]}

    batch = make_batch([row(p, 100 + p) for p in pairs] + [row(p, 200 + p) for p in pairs])
    batch.update(num_pairs=len(pairs), keys=[f"pair_{p}" for p in pairs], kinds=["preference"] * len(pairs))
    return batch


def test_image_log_probability_equals_the_log_softmax_gather():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 32, generator=generator) * 4
    labels = torch.rand(3, 7, 16, generator=generator) > 0.5
    torch.testing.assert_close(image_log_probability(logits, labels), bit_log_likelihood(logits, labels))


def test_a_magnitude_weighted_model_weights_its_preference_log_probs():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 8, generator=generator)
    labels = torch.rand(2, 5, 4, generator=generator) > 0.5
    weights = torch.rand(2, 5, 4, generator=generator)
    pairs = logits.double().unflatten(-1, (-1, 2)).log_softmax(-1)
    terms = torch.where(labels, pairs[..., 1], pairs[..., 0])
    expected = (terms * weights.double()).flatten(1).sum(-1)
    torch.testing.assert_close(image_log_probability(logits, labels, weights).double(), expected, rtol=1e-5, atol=1e-5)
    batch = preference_batch([0, 1])
    weighted = tiny_model(condition_drop=0.0, bit_loss_weights="magnitude")
    plain = tiny_model(condition_drop=0.0)
    output = weighted.training_forward(batch, None)
    assert output.bit_weights is not None and plain.training_forward(batch, None).bit_weights is None
    logps = preference_log_probs(weighted, batch, "none", 0, None)
    by_hand = image_log_probability(output.bit_logits, output.bit_labels, output.bit_weights)
    torch.testing.assert_close(torch.cat([logps.chosen, logps.rejected]), by_hand)
    unweighted = preference_log_probs(plain, batch, "none", 0, None)
    assert not torch.allclose(logps.chosen, unweighted.chosen)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_favouring_chosen_gives_a_lower_loss_and_the_gradient_points_to_chosen(loss_type):
    reference = torch.tensor([-50.0, -60.0]), torch.tensor([-55.0, -58.0])
    favours_chosen = dpo_loss(reference[0] + 3, reference[1] - 3, *reference, beta=0.1, loss_type=loss_type)[0]
    favours_rejected = dpo_loss(reference[0] - 3, reference[1] + 3, *reference, beta=0.1, loss_type=loss_type)[0]
    assert bool((favours_chosen < favours_rejected).all())
    chosen = reference[0].clone().requires_grad_(True)
    rejected = reference[1].clone().requires_grad_(True)
    loss = dpo_loss(chosen, rejected, *reference, beta=0.1, loss_type=loss_type)[0].sum()
    loss.backward()
    assert bool((chosen.grad < 0).all()) and bool((rejected.grad > 0).all())


def test_loss_formulas_and_rewards():
    chosen, rejected = torch.tensor([-10.0]), torch.tensor([-12.0])
    reference_chosen, reference_rejected = torch.tensor([-11.0]), torch.tensor([-11.5])
    h = (-10.0 + 11.0) - (-12.0 + 11.5)
    losses, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, reference_chosen, reference_rejected, 0.5)
    assert losses.item() == pytest.approx(-math.log(1 / (1 + math.exp(-0.5 * h))))
    assert chosen_rewards.item() == pytest.approx(0.5) and rejected_rewards.item() == pytest.approx(-0.25)
    smoothed = dpo_loss(chosen, rejected, reference_chosen, reference_rejected, 0.5, label_smoothing=0.1)[0]
    expected = 0.9 * math.log(1 + math.exp(-0.5 * h)) + 0.1 * math.log(1 + math.exp(0.5 * h))
    assert smoothed.item() == pytest.approx(expected)
    ipo = dpo_loss(chosen, rejected, reference_chosen, reference_rejected, 0.5, "ipo")[0]
    assert ipo.item() == pytest.approx((h - 1.0) ** 2)
    hinge = dpo_loss(chosen, rejected, reference_chosen, reference_rejected, 0.5, "hinge")[0]
    assert hinge.item() == pytest.approx(max(0.0, 1 - 0.5 * h))
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(chosen, rejected, reference_chosen, reference_rejected, 0.5, "kto")


def test_policy_equal_to_reference_gives_log_2_with_corrupted_inputs():
    model = tiny_model(condition_drop=0.5)
    stage = DPO(model, StageConfig(stage="dpo", seed=1), reference=copy.deepcopy(model))
    stage.train()
    batch = preference_batch([0, 1, 2])
    generator = stage.corruption_generator(0)
    losses = stage.dpo_losses(batch, generator)
    assert losses["dpo_loss"].item() == pytest.approx(math.log(2), abs=1e-6)
    assert losses["reward_margin"].item() == pytest.approx(0.0, abs=1e-6)
    # the corruption really is random: another generator state gives other log-probs
    clean = preference_log_probs(model, batch, "none", 0, None)
    assert (losses["logps_chosen"] - clean.chosen.mean()).abs().item() > 1e-5


def test_a_gradient_step_raises_chosen_and_lowers_rejected():
    model = tiny_model()
    stage = DPO(model, StageConfig(stage="dpo", dpo={"corruption": "none", "beta": 0.01}),
                reference=copy.deepcopy(model))
    batch = preference_batch([0, 1])
    before = preference_log_probs(model, batch, "none", 0, None)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    stage.dpo_losses(batch, None)["loss"].backward()
    optimizer.step()
    with torch.no_grad():
        after = preference_log_probs(model, batch, "none", 0, None)
    assert bool((after.chosen > before.chosen).all())
    assert bool((after.rejected < before.rejected).all())


@pytest.mark.parametrize("corruption", ["sample", "none"])
def test_precomputed_reference_gives_the_resident_reference_loss(corruption):
    reference = tiny_model(seed=0)
    policy = tiny_model(seed=1)
    policy.load_state_dict(reference.state_dict())
    with torch.no_grad():
        for parameter in policy.decoder.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.01)
    dpo_options = {"corruption": corruption}
    resident = DPO(policy, StageConfig(stage="dpo", seed=5, dpo=dpo_options), reference=reference)
    batch = preference_batch([0, 1, 2])
    expected = resident.dpo_losses(batch, None)
    config = StageConfig(stage="dpo", seed=5, dpo={**dpo_options, "precompute_reference": True})
    # the precompute pass collates the pairs differently (one pair per batch, other order)
    cache = precompute_reference_logps(reference, [preference_batch([2]), preference_batch([0, 1])], config)
    assert {pair.split("#")[0] for pair in cache.values} == {"pair_0", "pair_1", "pair_2"}
    precomputed = DPO(policy, config, reference_logps=cache)
    actual = precomputed.dpo_losses(batch, None)
    for name in ("loss", "rewards_chosen", "rewards_rejected"):
        assert actual[name].item() == pytest.approx(expected[name].item(), rel=1e-5, abs=1e-6), name
    assert expected["loss"].item() != pytest.approx(math.log(2), abs=1e-4)


def test_sample_corruption_is_per_sample_and_preference_pair_slices_one_pair():
    model = tiny_model()
    batch = preference_batch([0, 1])
    pair = preference_pair(batch, 1)
    assert pair["input_ids"].shape[0] == 2 and pair["num_pairs"] == 1 and pair["keys"] == ["pair_1"]
    torch.testing.assert_close(pair["gen_images"], batch["gen_images"][[1, 3]])
    together = preference_log_probs(model, batch, "sample", 3, None)
    alone = preference_log_probs(model, preference_batch([1]), "sample", 3, None)
    torch.testing.assert_close(together.chosen[1:], alone.chosen, rtol=1e-5, atol=1e-4)
    other_seed = preference_log_probs(model, preference_batch([1]), "sample", 4, None)
    assert (other_seed.chosen - alone.chosen).abs().item() > 1e-5


def test_dpo_configuration_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match="reference"):
        DPO(model, StageConfig(stage="dpo"))
    config = StageConfig(stage="dpo", dpo={"corruption": "none", "precompute_reference": True})
    with pytest.raises(ValueError, match="reference_logps"):
        DPO(model, config, reference=copy.deepcopy(model))
    other = StageConfig(stage="dpo", seed=9, dpo={"corruption": "none", "precompute_reference": True})
    cache = precompute_reference_logps(copy.deepcopy(model), [preference_batch([0])], other)
    with pytest.raises(ValueError, match="seed=9"):
        DPO(model, config, reference_logps=cache)
    stage = DPO(model, other, reference_logps=cache)
    with pytest.raises(KeyError, match="pair_1"):
        stage.dpo_losses(preference_batch([1]), None)


def test_dpo_scales_count_only_the_chosen_scales_bits():
    model = tiny_model(condition_drop=0.0, bit_loss_weights="magnitude")
    batch = preference_batch([0, 1])
    output = model.training_forward(batch, None)
    schedule = output.schedule
    every = preference_log_probs(model, batch, "none", 0, None)
    listed = preference_log_probs(model, batch, "none", 0, None, scales=list(range(len(schedule))))
    torch.testing.assert_close(listed.chosen, every.chosen)
    assert listed.tokens == every.tokens == sum(h * w for h, w in schedule)
    first = schedule[0][0] * schedule[0][1]
    second = first + schedule[1][0] * schedule[1][1]
    coarse = preference_log_probs(model, batch, "none", 0, None, scales=[1, 0])
    by_hand = image_log_probability(
        output.bit_logits[:, :second], output.bit_labels[:, :second], output.bit_weights[:, :second]
    )
    torch.testing.assert_close(torch.cat([coarse.chosen, coarse.rejected]), by_hand)
    assert coarse.tokens == second
    rest = preference_log_probs(model, batch, "none", 0, None, scales=list(range(2, len(schedule))))
    torch.testing.assert_close(coarse.chosen + rest.chosen, every.chosen, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match=rf"dpo.scales has scale\(s\) \[{len(schedule)}\]"):
        preference_log_probs(model, batch, "none", 0, None, scales=[0, len(schedule)])
    stage = DPO(model, StageConfig(stage="dpo", dpo={"corruption": "none", "scales": [0, 1]}),
                reference=copy.deepcopy(model))
    losses = stage.dpo_losses(batch, None)  # the stage's log-probs are the two coarse scales'
    assert losses["logps_chosen"].item() == pytest.approx(coarse.chosen.mean().item(), rel=1e-5)
    assert losses["loss"].item() == pytest.approx(math.log(2), abs=1e-5)  # policy = reference at the start


@pytest.mark.parametrize("scales", [[], [-1], [0, 0], [0.5], "0"])
def test_dpo_scales_are_validated(scales):
    with pytest.raises(ConfigError, match="dpo.scales"):
        StageConfig(stage="dpo", dpo={"scales": scales})


def test_precomputed_reference_log_probs_remember_their_scales():
    model = tiny_model()
    made = StageConfig(stage="dpo", dpo={"corruption": "none", "precompute_reference": True, "scales": [0, 1]})
    cache = precompute_reference_logps(copy.deepcopy(model), [preference_batch([0])], made)
    assert cache.scales == [0, 1]
    (chosen, _), = cache.values.values()
    coarse = preference_log_probs(model, preference_batch([0]), "none", 0, None, scales=[0, 1])
    assert chosen == pytest.approx(coarse.chosen.item(), rel=1e-5)
    assert DPO(model, made, reference_logps=cache).reference_logps is cache
    every = StageConfig(stage="dpo", dpo={"corruption": "none", "precompute_reference": True})
    with pytest.raises(ValueError, match=r"scales=\[0, 1\]; this stage uses .*scales=None"):
        DPO(model, every, reference_logps=cache)


def editing_preference_batch(pairs: list[int]) -> dict:
    """Preference rows whose prompts carry an input image (of a size depending on the pair)."""
    from helpers_tiny_model import tiny_pil_image

    def row(index: int, image_seed: int) -> dict:
        return {"messages": [{"role": "user", "content": "<image>make the circle blue"},
                             {"role": "assistant", "content": "here is the picture<image_gen>"}],
                "inputs": [tiny_pil_image(index, size=56 + 28 * (index % 2))], "targets": [tiny_image(image_seed)]}

    batch = make_batch([row(p, 100 + p) for p in pairs] + [row(p, 200 + p) for p in pairs])
    batch.update(num_pairs=len(pairs), keys=[f"edit_{p}" for p in pairs], kinds=["preference"] * len(pairs))
    return batch


def test_preference_pair_keeps_each_rows_input_images():
    model = tiny_model()
    batch = editing_preference_batch([0, 1, 2])
    pair = preference_pair(batch, 1)
    alone = editing_preference_batch([1])
    torch.testing.assert_close(pair["pixel_values"], alone["pixel_values"])
    assert torch.equal(pair["image_grid_thw"], alone["image_grid_thw"])
    assert pair["image_sample_index"].tolist() == [0, 1]
    together = preference_log_probs(model, batch, "sample", 3, None)
    single = preference_log_probs(model, alone, "sample", 3, None)
    torch.testing.assert_close(together.rejected[1:2], single.rejected, rtol=1e-5, atol=1e-4)
