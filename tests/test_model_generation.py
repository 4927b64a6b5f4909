"""Generation: cached next-scale sampling equals teacher forcing, batches equal single runs, editing conditions on the
input image, the single text -> image -> text decode loop, both CFG branches, and argument errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers_tiny_model import TINY_SCHEDULE, make_batch, tiny_image, tiny_model, tiny_pil_image, tiny_text_tokenizer

from vargpt.chat import ChatTokenIds, encode_generation_prompt
from vargpt.generation import _generate
from vargpt.schedules import scale_starts


def _teacher_forced(model, user: str, target: torch.Tensor, inputs=None) -> torch.Tensor:
    sample = {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": "<image_gen>"}],
              "targets": [target], "inputs": inputs or []}
    return model.training_forward(make_batch([sample])).bit_logits


def _cached(model, prompt: str, bits, images=None, cfg: float = 3.0):
    return _generate(model, [prompt], cfg, 0.5, 0.97, 0, None, 1.0, None, images, forced_bits=bits)[1]


@pytest.mark.parametrize(
    "mode",
    [
        {},
        {"reference_compat": True},
        {"adaln_from_prompt": True},
        {"generation_place_scale": 0.5},
        {"generation_place_scale": 1.0, "place_channels": 16},
    ],
)
def test_cached_generation_logits_equal_teacher_forcing_at_every_scale(mode: dict) -> None:
    model = tiny_model(condition_drop=0.0, **mode)
    target = tiny_image(3)
    bits = model.tokenizer.encode(target[None], TINY_SCHEDULE)
    forced = _teacher_forced(model, "a red circle", target)
    sample = _cached(model, "a red circle", bits)
    starts = scale_starts(TINY_SCHEDULE)
    for k, (h, w) in enumerate(TINY_SCHEDULE):
        assert torch.allclose(sample.cond_logits[k], forced[:, starts[k] : starts[k] + h * w], atol=1e-4), k
    assert all(torch.equal(a, b) for a, b in zip(sample.bits, bits))


def test_given_coarse_scales_are_kept_and_the_rest_sampled_on_top_of_them() -> None:
    model = tiny_model(condition_drop=0.0)
    target = tiny_image(3)
    bits = model.tokenizer.encode(target[None], TINY_SCHEDULE)
    given = 2
    sample = _cached(model, "a red circle", bits[:given])
    assert all(torch.equal(a, b) for a, b in zip(sample.bits[:given], bits[:given]))
    forced = _teacher_forced(model, "a red circle", target)
    starts = scale_starts(TINY_SCHEDULE)
    # scale k's logits read scales < k only: up to scale `given` they are the teacher-forced ones
    for k in range(given + 1):
        h, w = TINY_SCHEDULE[k]
        assert torch.allclose(sample.cond_logits[k], forced[:, starts[k] : starts[k] + h * w], atol=1e-4), k
    free = _cached(model, "a red circle", None)
    assert not all(torch.equal(a, b) for a, b in zip(free.bits[:given], bits[:given]))
    images = model.generate_images(["a red circle"], forced_bits=bits[:given])
    assert len(images) == 1 and images[0].size == (16, 16)


def test_given_bits_of_the_wrong_shape_or_too_many_scales_are_refused() -> None:
    model = tiny_model()
    bits = model.tokenizer.encode(tiny_image(3)[None], TINY_SCHEDULE)
    with pytest.raises(ValueError, match=r"forced_bits\[1\] must be \(1, "):
        _cached(model, "a red circle", [bits[0], bits[2]])
    with pytest.raises(ValueError, match="scales but the schedule only"):
        _cached(model, "a red circle", list(bits) + [bits[-1]])


@pytest.mark.parametrize(
    "places",
    [
        {},
        {"understanding_place_scale": 0.5, "generation_place_scale": 0.5},
        {"understanding_place_scale": 1.0, "generation_place_scale": 1.0, "place_channels": 16},
    ],
)
def test_editing_conditions_on_the_input_image(places: dict) -> None:
    model = tiny_model(condition_drop=0.0, **places)
    target = tiny_image(4)
    bits = model.tokenizer.encode(target[None], TINY_SCHEDULE)
    first, second = tiny_pil_image(5), tiny_pil_image(6)
    sample = _cached(model, "make the circle blue", bits, images=[first])
    forced = _teacher_forced(model, "<image>\nmake the circle blue", target, inputs=[first])
    starts = scale_starts(TINY_SCHEDULE)
    for k, (h, w) in enumerate(TINY_SCHEDULE):
        assert torch.allclose(sample.cond_logits[k], forced[:, starts[k] : starts[k] + h * w], atol=1e-4), k
    other = _cached(model, "make the circle blue", bits, images=[second])
    assert not torch.allclose(sample.cond_logits[0], other.cond_logits[0], atol=1e-4)
    assert len(model.generate_images(["make the circle blue"], images=[first])) == 1


def test_a_batch_equals_single_calls_with_the_same_seeds() -> None:
    model = tiny_model()
    prompts = ["a red circle", "two green triangles next to a yellow star", "make the circle blue"]
    batch = model.generate_images(prompts, seed=[5, 7, 9])
    singles = [model.generate_images([prompt], seed=[seed])[0] for prompt, seed in zip(prompts, (5, 7, 9))]
    for together, alone in zip(batch, singles):
        assert together.size == (16, 16) and together.mode == "RGB"
        assert np.array_equal(np.asarray(together), np.asarray(alone))
    assert not np.array_equal(np.asarray(batch[0]), np.asarray(model.generate_images([prompts[0]], seed=6)[0]))


def test_schedule_arguments_set_the_image_size() -> None:
    model = tiny_model()
    (image,) = model.generate_images(["a red circle"], schedule=[[1, 1], [2, 2], [3, 4]], cfg=1.0)
    assert image.size == (16, 12)  # width 4 * stride 4, height 3 * stride 4


def test_reference_compat_branch_differs_from_the_empty_prompt_branch() -> None:
    target = tiny_image(3)
    default, compat = tiny_model(condition_drop=0.0), tiny_model(condition_drop=0.0, reference_compat=True)
    bits = default.tokenizer.encode(target[None], TINY_SCHEDULE)
    assert torch.allclose(_cached(default, "a red circle", bits, cfg=1.0).cond_logits[-1],
                          _cached(compat, "a red circle", bits, cfg=1.0).cond_logits[-1], atol=1e-5)
    images = [np.asarray(m.generate_images(["a red circle"], seed=1, cfg=5.0)[0]) for m in (default, compat)]
    assert not np.array_equal(*images)


def test_reply_hands_over_to_image_generation_and_continues_text() -> None:
    model = tiny_model()
    tokenizer = tiny_text_tokenizer()
    ids = ChatTokenIds.from_tokenizer(tokenizer)
    messages = [{"role": "user", "content": "draw a red circle"}]
    prompt_length = len(encode_generation_prompt(tokenizer, messages))
    before = tokenizer("here is the picture", add_special_tokens=False)["input_ids"]
    after = tokenizer(" the image shows a red circle", add_special_tokens=False)["input_ids"]
    plan = before + [ids.image_gen_start] + after + [ids.im_end]
    seen_lengths = []

    def force(input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        image_tokens = (ids.image_gen_pad, ids.image_gen_end)
        generated = [t for t in input_ids[0, prompt_length:].tolist() if t not in image_tokens]
        seen_lengths.append(input_ids.shape[1])
        forced = torch.full_like(scores, float("-inf"))
        forced[:, plan[len(generated)]] = 0.0
        return forced

    result = model.reply(messages, logits_processor=force, seed=3)
    assert result.text == "here is the picture<image_gen> the image shows a red circle"
    assert len(result.images) == 1 and result.images[0].size == (16, 16)
    # the text after the image sees the whole span: start + 24 placeholders + end
    jump = seen_lengths[len(before) + 1] - seen_lengths[len(before)]
    assert jump == 1 + 24 + 1
    standalone = model.generate_images(["draw a red circle"], seed=3)[0]
    assert standalone.size == result.images[0].size


def test_sampling_arguments_out_of_range_name_the_value() -> None:
    model = tiny_model()
    for kwargs, message in (({"cfg": -1.0}, "cfg must be >= 0"), ({"temperature": 0.0}, "temperature must be > 0"),
                            ({"top_p": 1.5}, "top_p must be in"), ({"seed": [1, 2]}, "one int per prompt")):
        with pytest.raises(ValueError, match=message):
            model.generate_images(["a red circle"], **kwargs)
    with pytest.raises(ValueError, match="one input image per prompt"):
        model.generate_images(["a", "b"], images=[tiny_pil_image(1)])
    with pytest.raises(ValueError, match="more than the context"):
        tiny_model(max_positions=40).generate_images(["a red circle"])
    with pytest.raises(ValueError, match="cfg_uncond has 256 rows"):
        tiny_model(reference_compat=True).generate_images(["a red circle on a blue square " * 40])


def test_sampling_defaults_come_from_the_config() -> None:
    from vargpt.config import SamplingConfig

    configured = tiny_model(sampling=SamplingConfig(cfg=1.0, temperature=0.7, top_p=0.9))
    implicit = configured.generate_images(["a red circle"], seed=2)[0]
    explicit = configured.generate_images(["a red circle"], seed=2, cfg=1.0, temperature=0.7, top_p=0.9)[0]
    other = configured.generate_images(["a red circle"], seed=2, cfg=30.0, temperature=0.05)[0]
    assert np.array_equal(np.asarray(implicit), np.asarray(explicit))
    assert not np.array_equal(np.asarray(implicit), np.asarray(other))


def test_the_cfg_schedule_comes_from_the_config_unless_given() -> None:
    from vargpt.config import SamplingConfig

    ramped = tiny_model(sampling=SamplingConfig(cfg=30.0, temperature=0.05, cfg_schedule="linear"))
    implicit = ramped.generate_images(["a red circle", "two blue squares"], seed=4)
    explicit = ramped.generate_images(["a red circle", "two blue squares"], seed=4, cfg_schedule="linear")
    constant = ramped.generate_images(["a red circle", "two blue squares"], seed=4, cfg_schedule="constant")
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(implicit, explicit))
    assert not all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(implicit, constant))
    with pytest.raises(ValueError, match="sampling.cfg_schedule"):
        ramped.generate_images(["a red circle"], cfg_schedule="steps")


def test_the_kv_cache_goes_by_the_name_the_installed_llm_forward_takes() -> None:
    from vargpt.generation import cache_keyword

    class Renamed(torch.nn.Module):  # transformers >= 5.24
        def forward(self, inputs_embeds=None, cache=None, use_cache=None):  # type: ignore[no-untyped-def]
            return inputs_embeds

    class Older(torch.nn.Module):  # transformers 5.23
        def forward(self, inputs_embeds=None, past_key_values=None, use_cache=None):  # type: ignore[no-untyped-def]
            return inputs_embeds

    assert cache_keyword(Renamed()) == "cache"
    assert cache_keyword(Older()) == "past_key_values"
