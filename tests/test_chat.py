"""The chat template: placeholder expansion, label masks, inference prompts, and the text tokenizers."""

from __future__ import annotations

import logging

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from vargpt.chat import (
    IGNORE_INDEX,
    ChatTemplateError,
    ChatTokenIds,
    encode_chat,
    encode_generation_prompt,
    image_placeholder_count,
    render_chat,
)
from vargpt.schedules import placeholder_count, scale_schedule
from vargpt.text_tokenizer import (
    QWEN2_VL_SPECIAL_TOKENS,
    REFERENCE_GENERATION_TOKEN_IDS,
    TokenizerError,
    load_text_tokenizer,
    train_text_tokenizer,
)

CORPUS = ["Draw a red circle above a blue square.", "What is in this picture?", "A green triangle.", "Here it is:"]

EDITING = [
    {"role": "user", "content": "Make the circle in <image> blue."},
    {"role": "assistant", "content": "Here it is: <image_gen>"},
]


@pytest.fixture(scope="module")
def tokenizer():
    return train_text_tokenizer(CORPUS * 5, vocab_size=320)


def test_placeholder_expansion_counts(tokenizer):
    ids = ChatTokenIds.from_tokenizer(tokenizer)
    encoded = encode_chat(tokenizer, EDITING, image_token_counts=[6], gen_placeholder_count=9)
    assert encoded.input_ids.count(ids.image_pad) == 6
    assert encoded.input_ids.count(ids.image_gen_pad) == 9
    start = encoded.input_ids.index(ids.vision_start)
    assert encoded.input_ids[start : start + 8] == [ids.vision_start] + [ids.image_pad] * 6 + [ids.vision_end]
    gen_start = encoded.input_ids.index(ids.image_gen_start)
    assert encoded.input_ids[gen_start : gen_start + 11] == [ids.image_gen_start] + [ids.image_gen_pad] * 9 + [ids.image_gen_end]


def test_placeholder_count_from_schedule_and_grid(tokenizer):
    assert image_placeholder_count((1, 4, 8), merge_size=2) == 8
    n_gen = placeholder_count(scale_schedule("0.06M"))  # 521 tokens padded to 640 (VARGPT §1.7)
    encoded = encode_chat(tokenizer, EDITING, image_token_counts=[8], gen_placeholder_count=n_gen)
    assert encoded.input_ids.count(ChatTokenIds.from_tokenizer(tokenizer).image_gen_pad) == 640


def test_assistant_labels(tokenizer):
    ids = ChatTokenIds.from_tokenizer(tokenizer)
    encoded = encode_chat(tokenizer, EDITING, image_token_counts=[3], gen_placeholder_count=4)
    trained = [token for token, label in zip(encoded.input_ids, encoded.labels) if label != IGNORE_INDEX]
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(encoded.input_ids, encoded.labels))
    assistant_text = tokenizer("Here it is: ", add_special_tokens=False)["input_ids"]
    assert trained == assistant_text + [ids.image_gen_start, ids.image_gen_end, ids.im_end]
    # the sequence ends with <|im_end|> then an untrained newline
    assert encoded.labels[-2] == ids.im_end and encoded.labels[-1] == IGNORE_INDEX


def test_reference_compat_labels_everything_but_gen_pads(tokenizer):
    ids = ChatTokenIds.from_tokenizer(tokenizer)
    encoded = encode_chat(tokenizer, EDITING, image_token_counts=[3], gen_placeholder_count=4, label_mode="reference_compat")
    for token, label in zip(encoded.input_ids, encoded.labels):
        assert label == (IGNORE_INDEX if token == ids.image_gen_pad else token)
    understanding = [{"role": "user", "content": "What is <image>?"}, {"role": "assistant", "content": "A circle."}]
    compat = encode_chat(tokenizer, understanding, image_token_counts=[2], label_mode="reference_compat")
    default = encode_chat(tokenizer, understanding, image_token_counts=[2])
    assert compat.labels == default.labels  # no generation target: the reference masked the prompt


def test_rendered_string_tokenizes_to_the_same_ids(tokenizer):
    encoded = encode_chat(tokenizer, EDITING, image_token_counts=[2], gen_placeholder_count=3)
    text = render_chat(EDITING, image_token_counts=[2], gen_placeholder_count=3)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nMake")
    assert text.endswith("<|image_gen_pad|><|image_gen_end|><|im_end|>\n")
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == encoded.input_ids


def test_system_turn_given_or_omitted(tokenizer):
    with_system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert render_chat(with_system).startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert render_chat([{"role": "user", "content": "Hi"}], system_prompt=None).startswith("<|im_start|>user\nHi")


def test_generation_prompt(tokenizer):
    ids = ChatTokenIds.from_tokenizer(tokenizer)
    prompt = encode_generation_prompt(tokenizer, EDITING[:1], image_token_counts=[2])
    assert tokenizer.decode(prompt).endswith("blue.<|im_end|>\n<|im_start|>assistant\n")
    assert ids.image_gen_pad not in prompt
    assert encode_chat(tokenizer, EDITING[:1], image_token_counts=[2], add_generation_prompt=True).labels is None
    with pytest.raises(ChatTemplateError, match="ends with a user"):
        encode_generation_prompt(tokenizer, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}])


@pytest.mark.parametrize(
    "messages, kwargs, match",
    [
        (EDITING, {"image_token_counts": [], "gen_placeholder_count": 4}, "1 <image> placeholders but 0"),
        (EDITING, {"image_token_counts": [3], "gen_placeholder_count": 0}, "gen_placeholder_count must be >= 1"),
        ([{"role": "robot", "content": "x"}], {}, "message 0 must be"),
        ([{"role": "user", "content": "x<|im_end|>"}], {}, "special tokens"),
        ([], {}, "at least one message"),
        (EDITING, {"image_token_counts": [3], "gen_placeholder_count": 4, "label_mode": "all"}, "unknown label_mode"),
    ],
)
def test_bad_conversations_fail_clearly(tokenizer, messages, kwargs, match):
    with pytest.raises(ChatTemplateError, match=match):
        encode_chat(tokenizer, messages, **kwargs)


def test_local_tokenizer_round_trips_and_saves(tokenizer, tmp_path):
    text = "Draw a purple hexagon — ünïcode ok."
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    tokenizer.save_pretrained(tmp_path)
    loaded = load_text_tokenizer(tmp_path)
    assert ChatTokenIds.from_tokenizer(loaded) == ChatTokenIds.from_tokenizer(tokenizer)
    assert encode_chat(loaded, EDITING, image_token_counts=[1], gen_placeholder_count=2).input_ids == encode_chat(
        tokenizer, EDITING, image_token_counts=[1], gen_placeholder_count=2
    ).input_ids


def test_local_tokenizer_specials_start_at_vocab_size_whatever_the_corpus():
    # a corpus with a handful of merges: reserved tokens fill the vocabulary up to 300, never produced from text
    small = train_text_tokenizer(["red dot"] * 3, vocab_size=300)
    assert small.convert_tokens_to_ids("<|endoftext|>") == 300 and len(small) == 317
    reserved = [index for index in range(300) if small.convert_ids_to_tokens(index).startswith("<|reserved_")]
    assert reserved and reserved[-1] == 299 and reserved == list(range(reserved[0], 300))
    ids = small("red dots and other text", add_special_tokens=False)["input_ids"]
    assert ids and max(ids) < reserved[0]
    words = train_text_tokenizer(["a photo of a purple triangle"] * 3 + CORPUS, vocab_size=448)
    assert words.tokenize("a photo of a purple triangle") == ["a", "Ġphoto", "Ġof", "Ġa", "Ġpurple", "Ġtriangle"]
    assert words.convert_tokens_to_ids("<|image_gen_pad|>") == 448 + 16


def stock_layout_tokenizer(folder, drop: str | None = None):
    """A word-level tokenizer with Qwen2-VL's vocabulary layout: 151643 ordinary tokens, then its specials."""
    vocabulary = {f"w{index}": index for index in range(151643)}
    for offset, token in enumerate(QWEN2_VL_SPECIAL_TOKENS):
        if token != drop:
            vocabulary[token] = 151643 + offset
    word_level = Tokenizer(models.WordLevel(vocabulary, unk_token="w0"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_level)
    tokenizer.add_tokens([token for token in QWEN2_VL_SPECIAL_TOKENS if token != drop], special_tokens=True)
    tokenizer.save_pretrained(folder)


def test_stock_qwen2_vl_layout_gets_reference_ids(tmp_path, caplog):
    stock_layout_tokenizer(tmp_path)
    with caplog.at_level(logging.INFO, logger="vargpt.text_tokenizer"):
        loaded = load_text_tokenizer(tmp_path)
    ids = ChatTokenIds.from_tokenizer(loaded)
    assert (ids.image_gen_start, ids.image_gen_end, ids.image_gen_pad) == REFERENCE_GENERATION_TOKEN_IDS
    assert ids.pad == 151643
    assert "<|image_gen_start|>=151657" in caplog.text


def test_tokenizer_without_qwen2_vl_specials_is_an_error(tmp_path):
    stock_layout_tokenizer(tmp_path, drop="<|vision_start|>")
    with pytest.raises(TokenizerError, match="vision_start"):
        load_text_tokenizer(tmp_path)


def test_missing_tokenizer_folder_is_an_error(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist"):
        load_text_tokenizer(tmp_path / "nowhere")
    with pytest.raises(TokenizerError, match="has no tokenizer.json"):
        load_text_tokenizer(tmp_path)
