"""Understanding path: images scattered into <|image_pad|>, M-RoPE positions equal between one full forward and
cached steps, chat, and clear errors for bad input."""

from __future__ import annotations

import pytest
import torch
from helpers_tiny_model import make_batch, mixed_samples, tiny_config, tiny_model, tiny_pil_image, tiny_text_tokenizer
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from vargpt.chat import ChatTemplateError, encode_generation_prompt
from vargpt.config import ConfigError
from vargpt.generation import feed, prefill
from vargpt.model import VARGPT
from vargpt.positions import continue_positions, mrope_position_ids
from vargpt.text_tokenizer import train_text_tokenizer


def test_understanding_image_positions_are_a_grid_and_text_continues_after_it() -> None:
    model = tiny_model()
    batch = make_batch([mixed_samples()[0]])
    ids, mask, grid = batch["input_ids"], batch["attention_mask"], batch["image_grid_thw"]
    positions, next_position = mrope_position_ids(model.backbone, ids, mask, grid, model.config.image_token_id)
    image = batch["input_ids"][0] == model.config.image_token_id
    start = int(image.nonzero()[0])
    grid = positions[:, 0, image]  # 56 px -> 4x4 patches -> 2x2 merged tokens
    assert grid.tolist() == [[start] * 4, [start, start, start + 1, start + 1], [start, start + 1, start, start + 1]]
    after = int(image.nonzero()[-1]) + 1
    assert positions[:, 0, after].tolist() == [start + 2] * 3
    assert int(next_position[0]) == int(positions[0, 0].max()) + 1


def test_positions_of_one_full_forward_equal_the_cached_steps() -> None:
    model = tiny_model(condition_drop=0.0)
    batch = make_batch([mixed_samples()[2]])  # editing: input image, generation span, text after it
    ids, mask, grid = batch["input_ids"], batch["attention_mask"], batch["image_grid_thw"]
    full, _ = mrope_position_ids(model.backbone, ids, mask, grid, model.config.image_token_id)
    start = int((ids[0] == model.config.image_gen_start_token_id).nonzero()[0])
    prompt_positions, next_position = mrope_position_ids(
        model.backbone, ids[:, : start + 1], mask[:, : start + 1], grid, model.config.image_token_id
    )
    assert torch.equal(full[:, :, : start + 1], prompt_positions)
    stepped, cursor = [], next_position
    for block in (1, 4, 16, ids.shape[1] - start - 1 - 21):  # the scales, then the remaining tokens one block
        stepped.append(continue_positions(cursor, block))
        cursor = cursor + block
    assert torch.equal(full[:, :, start + 1 :], torch.cat(stepped, dim=2))


def test_cached_prefill_and_feed_equal_the_full_forward() -> None:
    model = tiny_model()
    batch = make_batch([mixed_samples()[0]])
    ids = batch["input_ids"][0].tolist()
    embeds = model.embed(batch["input_ids"], batch["pixel_values"], batch["image_grid_thw"])
    positions, _ = mrope_position_ids(model.backbone, batch["input_ids"], None, batch["image_grid_thw"],
                                      model.config.image_token_id)
    full = model.backbone.language_model(inputs_embeds=embeds, position_ids=positions).last_hidden_state
    split = len(ids) - 5
    state = prefill(model, [ids[:split]], batch["pixel_values"], batch["image_grid_thw"])
    tail = feed(model, state, model.backbone.get_input_embeddings()(torch.tensor([ids[split:]])))
    assert torch.allclose(state.hidden[:, :split], full[:, :split], atol=1e-5)
    assert torch.allclose(tail, full[:, split:], atol=1e-5)


def test_left_padded_prompts_equal_single_prompts() -> None:
    model = tiny_model()
    tokenizer = tiny_text_tokenizer()
    short, long = tokenizer("a red circle")["input_ids"], tokenizer("two green triangles next to a star")["input_ids"]
    both = prefill(model, [short, long])
    alone = prefill(model, [short])
    assert torch.allclose(both.hidden[0, -len(short) :], alone.hidden[0], atol=1e-5)
    assert both.next_position.tolist() == [len(short), len(long)]


def test_image_features_fill_the_image_pads() -> None:
    model = tiny_model()
    batch = make_batch([mixed_samples()[0]])
    embeds = model.embed(batch["input_ids"], batch["pixel_values"], batch["image_grid_thw"])
    features = torch.cat(model.backbone.get_image_features(
        batch["pixel_values"], batch["image_grid_thw"], return_dict=True).pooler_output)
    image = batch["input_ids"] == model.config.image_token_id
    assert torch.equal(embeds[image], features)
    with pytest.raises(ValueError, match="<\\|image_pad\\|> tokens but no pixel_values"):
        model.embed(batch["input_ids"], None, None)


def test_chat_is_deterministic_text_and_looks_at_the_image() -> None:
    model = tiny_model()
    messages = [{"role": "user", "content": "<image>describe the image"}]
    first = model.chat(messages, images=[tiny_pil_image(1)], max_new_tokens=6)
    assert isinstance(first, str) and first == model.chat(messages, images=[tiny_pil_image(1)], max_new_tokens=6)
    assert model.chat([{"role": "user", "content": "hi"}], max_new_tokens=3, do_sample=True, seed=1) == model.chat(
        [{"role": "user", "content": "hi"}], max_new_tokens=3, do_sample=True, seed=1)


def test_tokenizer_without_special_tokens_is_rejected() -> None:
    model = VARGPT(tiny_config())
    with pytest.raises(ValueError, match="the model has no text tokenizer"):
        model.chat([{"role": "user", "content": "hi"}])
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=260, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator(["hello world"], trainer=trainer)
    with pytest.raises(ChatTemplateError, match="lacks the special tokens"):
        model.attach_tokenizer(PreTrainedTokenizerFast(tokenizer_object=bpe))
    other = train_text_tokenizer(["a much larger corpus of other words"] * 3, vocab_size=280)
    with pytest.raises(ValueError, match="differ from the model config"):
        model.attach_tokenizer(other)


def test_prompt_longer_than_the_context_is_rejected() -> None:
    model = tiny_model(max_positions=40)
    with pytest.raises(ValueError, match="more than the context of 40"):
        model.chat([{"role": "user", "content": "a red circle on a blue square " * 8}])


@pytest.mark.parametrize("image, message", [
    (Image.new("I;16", (56, 56)), "unsupported mode 'I;16'"),
    (Image.new("RGB", (600, 2)), "unsupported size 600x2"),
    ("not an image", "must be a PIL.Image"),
])
def test_bad_images_are_rejected(image: object, message: str) -> None:
    model = tiny_model()
    with pytest.raises(ValueError, match=message):
        model.chat([{"role": "user", "content": "<image>describe the image"}], images=[image])


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ConfigError, match="image_gen_pad_token_id"):
        tiny_config(image_gen_pad_token_id=10**7)
    with pytest.raises(ConfigError, match="must be distinct"):
        tiny_config(image_gen_end_token_id=tiny_config().image_gen_start_token_id)
    with pytest.raises(ConfigError, match="decoder.bits"):
        tiny_config(tokenizer={"bits": 8, "base_channels": 16, "group_norm_groups": 8})


def test_decoding_stops_at_the_end_of_the_context() -> None:
    model = tiny_model(max_positions=40)
    tokenizer = tiny_text_tokenizer()
    messages = [{"role": "user", "content": "hi"}]
    prompt = encode_generation_prompt(tokenizer, messages)
    im_end = model.config.im_end_token_id

    steps = []

    def never_end(input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        steps.append(input_ids.shape[1])
        return scores.index_fill(1, torch.tensor([im_end]), float("-inf"))

    answer = model.reply(messages, max_new_tokens=100, allow_images=False, logits_processor=never_end).text
    assert answer and steps == list(range(len(prompt), 40))  # one token per free position, then it stops
