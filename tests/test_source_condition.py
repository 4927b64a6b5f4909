"""Editing with the input image's own bits in the decoder (``decoder.source_condition``): the data side gives each
target the input image it edits (same transform and crop), training and cached sampling agree, a zero-initialised
source embedding changes nothing, and only spans with a source see one."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from helpers_tiny_model import (
    TINY_IMAGE_SIZE,
    TINY_SCHEDULE,
    make_batch,
    tiny_config,
    tiny_image,
    tiny_model,
    tiny_pil_image,
    tiny_text_tokenizer,
)
from PIL import Image

from datamodules.collate import collate_samples
from datamodules.config import DataConfig
from datamodules.encoding import SampleEncoder
from datamodules.schema import Sample
from datamodules.shared_state import GenerationResolution
from datamodules.transforms import GenerationImageTransform
from vargpt.config import DecoderConfig
from vargpt.generation import _generate, encode_sources, sample_image
from vargpt.schedules import scale_starts
from vargpt.stages.dpo import preference_pair
from vargpt.tokenizer import bits_to_f_hat, copy_bits, quantize_multiscale, residual_bits

EDIT = "<image>\nmake the circle blue"


def _pixels(image: Image.Image, size: int = TINY_IMAGE_SIZE) -> torch.Tensor:
    """What ``encode_sources`` feeds the tokenizer: a square image resized to ``size`` px, in [-1, 1]."""
    resized = image.convert("RGB").resize((size, size), Image.Resampling.LANCZOS)
    return torch.from_numpy(np.asarray(resized, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 127.5 - 1


def _source_model(seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny model with a source embedding whose weights are random (as after training), not zero."""
    decoder = tiny_config().decoder
    decoder = DecoderConfig(**{**decoder.__dict__, "source_condition": True})
    model = tiny_model(seed, decoder=decoder, condition_drop=0.0, **overrides)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.decoder.source_embed.weight.normal_(0, 1.0, generator=generator)
        model.decoder.source_gain.normal_(0, 1.0, generator=generator)
    return model


def _edit_batch(source: Image.Image | None, target: torch.Tensor, mask: bool = True) -> dict:
    inputs = [source if source is not None else tiny_pil_image(5)]
    messages = [{"role": "user", "content": EDIT}, {"role": "assistant", "content": "<image_gen>"}]
    batch = make_batch([{"messages": messages, "inputs": inputs, "targets": [target]}])
    if source is not None:
        batch["gen_source_images"] = _pixels(source)[None]
        batch["gen_source_mask"] = torch.tensor([mask])
    return batch


# ---------------------------------------------------------------------------------------------------- model


def test_the_decoder_config_field_is_a_bool_and_the_embedding_starts_at_zero() -> None:
    with pytest.raises(ValueError, match="decoder.source_condition must be true or false"):
        DecoderConfig(depth=2, width=64, heads=2, bits=16, condition_dim=64, source_condition="yes")
    plain = tiny_model(3, condition_drop=0.0)
    decoder = DecoderConfig(**{**tiny_config().decoder.__dict__, "source_condition": True})
    with_source = tiny_model(3, decoder=decoder, condition_drop=0.0)
    assert not with_source.decoder.source_embed.weight.any() and not with_source.decoder.source_gain.any()
    extra = set(with_source.state_dict()) - set(plain.state_dict())
    assert extra == {"decoder.source_embed.weight", "decoder.source_gain"}
    for name, value in plain.state_dict().items():  # the same seed builds the same other weights
        assert torch.equal(value, with_source.state_dict()[name]), name
    target, source = tiny_image(4), tiny_pil_image(5)
    batch = _edit_batch(source, target)
    assert torch.equal(plain.training_forward(batch).bit_logits, with_source.training_forward(batch).bit_logits)
    with pytest.raises(ValueError, match="set decoder.source_condition=true"):
        plain.decoder.embed_source(torch.zeros(1, 1, 16, dtype=torch.bool))


def test_cached_editing_logits_equal_teacher_forcing_with_the_source_bits() -> None:
    model = _source_model()
    target, source = tiny_image(4), tiny_pil_image(5)
    bits = model.tokenizer.encode(target[None], TINY_SCHEDULE)
    forced = model.training_forward(_edit_batch(source, target)).bit_logits
    sample = _generate(model, ["make the circle blue"], 3.0, 0.5, 0.97, 0, None, 1.0, None, [source], bits)[1]
    starts = scale_starts(TINY_SCHEDULE)
    for k, (h, w) in enumerate(TINY_SCHEDULE):
        assert torch.allclose(sample.cond_logits[k], forced[:, starts[k] : starts[k] + h * w], atol=1e-4), k
    without = model.training_forward(_edit_batch(None, target)).bit_logits  # the same input image, no source bits
    assert not torch.allclose(without, forced, atol=1e-3)


def test_the_source_changes_only_the_spans_that_have_one() -> None:
    model = _source_model()
    target = tiny_image(4)
    first, second = tiny_pil_image(5), tiny_pil_image(6)
    with_first = model.training_forward(_edit_batch(first, target)).bit_logits
    masked = model.training_forward(_edit_batch(first, target, mask=False)).bit_logits
    no_source = model.training_forward(_edit_batch(None, target)).bit_logits
    assert torch.equal(masked, no_source)
    # the other source image's bits (the ViT still sees `first`): different logits
    other = _edit_batch(first, target)
    other["gen_source_images"] = _pixels(second)[None]
    assert not torch.allclose(model.training_forward(other).bit_logits, with_first, atol=1e-3)


def test_the_source_embedding_trains() -> None:
    model = _source_model().train()
    output = model.training_forward(_edit_batch(tiny_pil_image(5), tiny_image(4)))
    output.loss.backward()
    grad = model.decoder.source_embed.weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_generation_with_a_source_model_batches_and_checks_the_source_bits() -> None:
    model = _source_model()
    images = [tiny_pil_image(5), tiny_pil_image(6, size=84)]
    prompts = ["make the circle blue", "make the circle red"]
    together = model.generate_images(prompts, images=images, seed=[3, 4])
    alone = [model.generate_images([p], images=[i], seed=[s])[0] for p, i, s in zip(prompts, images, (3, 4))]
    for a, b in zip(together, alone):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    sources = encode_sources(model, images, TINY_SCHEDULE)
    assert tuple(sources.shape) == (2, 16, 4, 4)
    assert encode_sources(tiny_model(), images, TINY_SCHEDULE) is None  # no source embedding: nothing to encode
    with pytest.raises(ValueError, match=r"source_features must be \(1, 16, 4, 4\)"):
        sample_image(model, [], 1, TINY_SCHEDULE, model.config.sampling, [], source_features=sources)


def test_copy_bits_are_the_source_bits_on_its_own_history_and_correct_another() -> None:
    features = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(0))
    own = quantize_multiscale(features, TINY_SCHEDULE).bits
    assert all(torch.equal(a, b) for a, b in zip(copy_bits(features, own, TINY_SCHEDULE), own))
    other = quantize_multiscale(features.flip(0), TINY_SCHEDULE).bits
    corrected = copy_bits(features, other, TINY_SCHEDULE)
    assert torch.equal(corrected[0], own[0]) and not torch.equal(corrected[1], own[1])
    # on top of another history they are still that scale's residual towards the features
    f_hat = bits_to_f_hat(other[:1], TINY_SCHEDULE[-1])
    assert torch.equal(corrected[1], residual_bits(features, f_hat, TINY_SCHEDULE[1]))
    with pytest.raises(ValueError, match="needs the bits of the first 2 scales"):
        copy_bits(features, own[:1], TINY_SCHEDULE)


def test_a_strong_copy_prior_reproduces_the_input_image() -> None:
    model = _source_model()
    with torch.no_grad():
        model.decoder.source_gain.fill_(100.0)
    source = tiny_pil_image(5, size=16)
    sample = _generate(model, ["make the circle blue"], 3.0, 1.0, 1.0, 0, None, 1.0, None, [source])[1]
    own = model.tokenizer.encode(_pixels(source)[None], TINY_SCHEDULE)
    assert all(torch.equal(a, b) for a, b in zip(sample.bits, own))


def test_reply_takes_the_last_input_image_as_the_source(monkeypatch) -> None:
    import vargpt.generation as generation

    model = _source_model()
    messages = [{"role": "user", "content": "<image><image>\nmake the circle blue"}]
    first, second = tiny_pil_image(5), tiny_pil_image(6)
    forced_start = {"logits_processor": _force_image_start(model), "max_new_tokens": 1, "seed": 1}
    reply = model.reply(messages, images=[first, second], **forced_start)
    assert len(reply.images) == 1
    seen = []
    encode = generation.encode_sources
    monkeypatch.setattr(generation, "encode_sources", lambda m, images, s: seen.append(images) or encode(m, images, s))
    again = model.reply(messages, images=[first, second], **forced_start)
    assert seen == [[second]] and np.array_equal(np.asarray(again.images[0]), np.asarray(reply.images[0]))
    with torch.no_grad():
        model.decoder.source_embed.weight.zero_()
        model.decoder.source_gain.zero_()
    unsourced = model.reply(messages, images=[first, second], **forced_start)
    assert not np.array_equal(np.asarray(unsourced.images[0]), np.asarray(reply.images[0]))


def _force_image_start(model):
    start = model.config.image_gen_start_token_id

    def processor(_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        forced = torch.full_like(scores, float("-inf"))
        forced[:, start] = 0.0
        return forced

    return processor


# ---------------------------------------------------------------------------------------------------- data


def _scene(seed: int, size: int = 40) -> Image.Image:
    generator = np.random.default_rng(seed)
    return Image.fromarray(generator.integers(0, 256, (size, size, 3), dtype=np.uint8))


def _encoder(train: bool, resize_ratio: float = 1.0) -> SampleEncoder:
    config = DataConfig(
        train_sources=[{"shards": "unused"}], generation_size=16, generation_schedule=TINY_SCHEDULE,
        placeholder_multiple=8, resize_ratio=resize_ratio,
    )
    return SampleEncoder(tiny_text_tokenizer(), config, train)


RESOLUTION = GenerationResolution(16, tuple(tuple(s) for s in TINY_SCHEDULE), 24)


def test_an_edit_target_gets_its_input_image_with_the_same_crop() -> None:
    source, target = _scene(1), _scene(2)
    edit = Sample("e", "editing", [{"role": "user", "content": "<image>\nmake it blue"},
                                   {"role": "assistant", "content": "<image_gen>"}],
                  {"input_0.png": source, "target.png": target})
    encoded = _encoder(train=True, resize_ratio=1.5).encode(edit, RESOLUTION, random.Random(7))
    transform = GenerationImageTransform(16, train=True, resize_ratio=1.5)
    assert torch.equal(encoded.gen_images[0], transform(target, random.Random(7)))
    assert torch.equal(encoded.gen_sources[0], transform(source, random.Random(7)))  # the target's crop
    generation = Sample("g", "generation", [{"role": "user", "content": "a red circle"},
                                            {"role": "assistant", "content": "<image_gen>"}], {"target.png": target})
    plain = _encoder(train=False).encode(generation, RESOLUTION, random.Random(0))
    assert plain.gen_sources == [None]
    batch = collate_samples([plain, encoded], RESOLUTION, pad_id=0)
    assert batch["gen_source_mask"].tolist() == [False, True]
    assert not batch["gen_source_images"][0].any()
    assert torch.equal(batch["gen_source_images"][1], encoded.gen_sources[0])
    alone = collate_samples([plain], RESOLUTION, pad_id=0)
    assert alone["gen_source_images"] is None and alone["gen_source_mask"] is None


def test_each_target_takes_the_last_input_image_before_it() -> None:
    first, second, out_a, out_b = _scene(1), _scene(2), _scene(3), _scene(4)
    sample = Sample("m", "editing", [
        {"role": "user", "content": "<image>\nmake it blue"}, {"role": "assistant", "content": "<image_gen>"},
        {"role": "user", "content": "<image>\nnow make this one red"}, {"role": "assistant", "content": "<image_gen>"},
    ], {"input_0.png": first, "target_0.png": out_a, "input_1.png": second, "target_1.png": out_b})
    encoded = _encoder(train=False).encode(sample, RESOLUTION, random.Random(0))
    transform = GenerationImageTransform(16, train=False, resize_ratio=1.0)
    assert [torch.equal(s, transform(i, random.Random(0))) for s, i in zip(encoded.gen_sources, (first, second))] == [
        True, True]


def test_a_preference_pair_with_an_input_image_gives_it_to_both_halves_and_to_each_pair() -> None:
    source = _scene(1)
    pair = Sample("p", "preference", [{"role": "user", "content": "<image>\nmake it blue"}],
                  {"input_0.png": source, "chosen.png": _scene(2), "rejected.png": _scene(3)},
                  chosen={"role": "assistant", "content": "<image_gen>"},
                  rejected={"role": "assistant", "content": "<image_gen>"})
    plain = Sample("q", "preference", [{"role": "user", "content": "a red circle"}],
                   {"chosen.png": _scene(4), "rejected.png": _scene(5)},
                   chosen={"role": "assistant", "content": "<image_gen>"},
                   rejected={"role": "assistant", "content": "<image_gen>"})
    encoder = _encoder(train=False)
    batch = collate_samples([encoder.encode(s, RESOLUTION, random.Random(0)) for s in (pair, plain)], RESOLUTION, 0)
    assert batch["gen_source_mask"].tolist() == [True, False, True, False]  # chosen 0, 1, then rejected 0, 1
    assert torch.equal(batch["gen_source_images"][0], batch["gen_source_images"][2])
    first = preference_pair(batch, 0)
    assert first["gen_source_mask"].tolist() == [True, True]
    assert torch.equal(first["gen_source_images"][0], batch["gen_source_images"][0])
