"""The chat template, placeholder expansion and label masking, shared by the data pipeline and the model.

Everything that turns a conversation into token ids goes through ``encode_chat``; nothing else may build prompts.
The template is Qwen2-VL's (VARGPT §2.2), one turn per message, each closed by ``<|im_end|>`` and a newline::

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n
    <|im_start|>user\\nWhat is this? <|vision_start|><|image_pad|> x N_i<|vision_end|><|im_end|>\\n
    <|im_start|>assistant\\nHere it is: <|image_gen_start|><|image_gen_pad|> x N<|image_gen_end|><|im_end|>\\n

``<image>`` expands to ``N_i = t * h * w / merge_size**2`` image pads (the image's patch grid from the Qwen2-VL image
processor, see ``image_placeholder_count``); ``<image_gen>`` expands to ``N = placeholder_count(schedule)`` generation
pads (``vargpt.schedules``; 2560 for the 512-px schedule, VARGPT §1.7).

Labels (``IGNORE_INDEX`` = -100 where no loss is taken):

* ``label_mode="assistant"`` (default): only assistant turns are trained: their text, ``<|image_gen_start|>``,
  ``<|image_gen_end|>`` and the ``<|im_end|>`` closing the turn. System and user turns, role headers, the newline
  after ``<|im_end|>``, image spans and generation pads are masked.
* ``label_mode="reference_compat"``: the reference's generation text loss (VARGPT §3.2): in a conversation that
  contains ``<image_gen>`` every token is trained except the generation pads; other conversations fall back to
  ``"assistant"`` (the reference used its prompt-masked labels when a batch had no generation target).

Text between special tokens is tokenized piece by piece (as LLaMA-Factory does), so a message can never merge with
the template around it, and message text may not contain the template's own special tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

IMAGE_PLACEHOLDER = "<image>"
IMAGE_GEN_PLACEHOLDER = "<image_gen>"

# Qwen2-VL's own special tokens used by the template.
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
# VARGPT's image-generation tokens (VARGPT §2.1); ids 151657 / 151658 / 151659 with the stock Qwen2-VL tokenizer.
IMAGE_GEN_START = "<|image_gen_start|>"
IMAGE_GEN_END = "<|image_gen_end|>"
IMAGE_GEN_PAD = "<|image_gen_pad|>"
GENERATION_TOKENS = (IMAGE_GEN_START, IMAGE_GEN_END, IMAGE_GEN_PAD)
TEMPLATE_TOKENS = (IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, *GENERATION_TOKENS)

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."  # LLaMA-Factory qwen2_vl default system (VARGPT §2.2)
IGNORE_INDEX = -100
LABEL_MODES = ("assistant", "reference_compat")
ROLES = ("system", "user", "assistant")


class ChatTemplateError(ValueError):
    """A conversation or tokenizer cannot be used with the template; the message names what is wrong."""


@dataclass(frozen=True)
class ChatTokenIds:
    """Ids of the template's special tokens in one tokenizer (and its padding id)."""

    im_start: int
    im_end: int
    vision_start: int
    vision_end: int
    image_pad: int
    image_gen_start: int
    image_gen_end: int
    image_gen_pad: int
    pad: int

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> ChatTokenIds:
        """Look the ids up; raise ``ChatTemplateError`` naming every missing token."""
        vocabulary = tokenizer.get_vocab()
        missing = [token for token in TEMPLATE_TOKENS if token not in vocabulary]
        if missing:
            raise ChatTemplateError(
                f"tokenizer lacks the special tokens {missing}; the template needs Qwen2-VL's "
                f"{list(TEMPLATE_TOKENS[:5])} and VARGPT's {list(GENERATION_TOKENS)} "
                "(use vargpt.text_tokenizer.load_text_tokenizer or train_text_tokenizer)"
            )
        if tokenizer.pad_token_id is None:
            raise ChatTemplateError("tokenizer has no pad token; set tokenizer.pad_token (Qwen2-VL: <|endoftext|>)")
        ids = {name: vocabulary[token] for name, token in zip(
            ("im_start", "im_end", "vision_start", "vision_end", "image_pad", "image_gen_start", "image_gen_end",
             "image_gen_pad"),
            TEMPLATE_TOKENS,
        )}
        return cls(**ids, pad=int(tokenizer.pad_token_id))


@dataclass
class EncodedChat:
    """One tokenized conversation. ``labels`` is None for inference prompts."""

    input_ids: list[int]
    labels: list[int] | None


def image_placeholder_count(grid_thw: Sequence[int], merge_size: int = 2) -> int:
    """LLM tokens of one understanding image: its t * h * w patches merged ``merge_size``^2 to one (VARGPT §1.3)."""
    t, h, w = (int(v) for v in grid_thw)
    if h % merge_size or w % merge_size:
        raise ChatTemplateError(f"image grid {tuple(grid_thw)} is not divisible by merge_size={merge_size}")
    return t * h * w // (merge_size * merge_size)


@dataclass(frozen=True)
class _Piece:
    """A run of the template: ``text`` to tokenize, or ``token`` repeated ``count`` times; ``trained`` = in the loss."""

    text: str | None = None
    token: str | None = None
    count: int = 1
    trained: bool = False


def _content_pieces(
    content: str, trained: bool, image_counts: list[int], gen_count: int
) -> list[_Piece]:
    """Split one message's content at its placeholders; consumes ``image_counts`` in order of appearance."""
    pieces: list[_Piece] = []
    for gen_index, gen_chunk in enumerate(content.split(IMAGE_GEN_PLACEHOLDER)):
        if gen_index > 0:
            pieces += [
                _Piece(token=IMAGE_GEN_START, trained=trained),
                _Piece(token=IMAGE_GEN_PAD, count=gen_count),
                _Piece(token=IMAGE_GEN_END, trained=trained),
            ]
        for image_index, text in enumerate(gen_chunk.split(IMAGE_PLACEHOLDER)):
            if image_index > 0:
                pieces += [
                    _Piece(token=VISION_START),
                    _Piece(token=IMAGE_PAD, count=image_counts.pop(0)),
                    _Piece(token=VISION_END),
                ]
            if text:
                pieces.append(_Piece(text=text, trained=trained))
    return pieces


def _template_pieces(
    messages: Sequence[dict[str, str]],
    image_token_counts: Sequence[int],
    gen_placeholder_count: int,
    system_prompt: str | None,
    add_generation_prompt: bool,
    label_mode: str,
) -> list[_Piece]:
    """The whole conversation as pieces, after checking it against the template's rules."""
    if label_mode not in LABEL_MODES:
        raise ChatTemplateError(f"unknown label_mode {label_mode!r}; expected one of {LABEL_MODES}")
    if not messages:
        raise ChatTemplateError("a conversation needs at least one message")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES or not isinstance(
            message.get("content"), str
        ):
            raise ChatTemplateError(
                f"message {index} must be {{'role': one of {ROLES}, 'content': str}}, got {message!r}"
            )
        reserved = [token for token in TEMPLATE_TOKENS if token in message["content"]]
        if reserved:
            raise ChatTemplateError(f"message {index} contains the template's special tokens {reserved} as text")
    n_images = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages)
    n_gen = sum(m["content"].count(IMAGE_GEN_PLACEHOLDER) for m in messages)
    if n_images != len(image_token_counts):
        raise ChatTemplateError(
            f"the messages have {n_images} {IMAGE_PLACEHOLDER} placeholders but {len(image_token_counts)} image token "
            "counts were given"
        )
    if n_gen and gen_placeholder_count < 1:
        raise ChatTemplateError(
            f"the messages have {n_gen} {IMAGE_GEN_PLACEHOLDER} placeholders; gen_placeholder_count must be >= 1, "
            f"got {gen_placeholder_count}"
        )
    if add_generation_prompt and messages[-1]["role"] == "assistant":
        raise ChatTemplateError("add_generation_prompt needs a conversation that ends with a user or system turn")
    train_everything = label_mode == "reference_compat" and n_gen > 0
    turns = list(messages)
    if turns[0]["role"] != "system" and system_prompt is not None:
        turns.insert(0, {"role": "system", "content": system_prompt})
    image_counts = [int(count) for count in image_token_counts]
    pieces: list[_Piece] = []
    for turn in turns:
        is_assistant = turn["role"] == "assistant"
        in_loss = train_everything or is_assistant
        pieces += [
            _Piece(token=IM_START, trained=train_everything),
            _Piece(text=f"{turn['role']}\n", trained=train_everything),
        ]
        pieces += _content_pieces(turn["content"], in_loss, image_counts, gen_placeholder_count)
        pieces += [_Piece(token=IM_END, trained=in_loss), _Piece(text="\n", trained=train_everything)]
    if add_generation_prompt:
        pieces += [_Piece(token=IM_START), _Piece(text="assistant\n")]
    if train_everything:  # the reference trained image spans too; only generation pads stay out of the loss
        pieces = [_Piece(p.text, p.token, p.count, p.token != IMAGE_GEN_PAD) for p in pieces]
    return _merge_adjacent_text(pieces)


def _merge_adjacent_text(pieces: list[_Piece]) -> list[_Piece]:
    """Join neighbouring text pieces with the same loss flag, so e.g. the ``user`` header and the user's text are
    tokenized together as LLaMA-Factory does; a prompt/response boundary stays a tokenization boundary."""
    merged: list[_Piece] = []
    for piece in pieces:
        previous = merged[-1] if merged else None
        joins_previous = previous is not None and previous.text is not None and previous.trained == piece.trained
        if piece.text is not None and joins_previous:
            merged[-1] = _Piece(text=previous.text + piece.text, trained=piece.trained)
        else:
            merged.append(piece)
    return merged


def encode_chat(
    tokenizer: Any,
    messages: Sequence[dict[str, str]],
    *,
    image_token_counts: Sequence[int] = (),
    gen_placeholder_count: int = 0,
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
    add_generation_prompt: bool = False,
    label_mode: str = "assistant",
    token_ids: ChatTokenIds | None = None,
) -> EncodedChat:
    """Tokenize a conversation with the template, expanding placeholders, and build its labels.

    ``image_token_counts`` gives ``N_i`` for each ``<image>`` in order of appearance (``image_placeholder_count``);
    ``gen_placeholder_count`` is ``N`` for every ``<image_gen>``. A system turn with ``system_prompt`` is added when
    the conversation has none (pass ``None`` for no system turn). ``add_generation_prompt`` appends the assistant
    header for inference and returns ``labels=None``. Pass ``token_ids`` to skip the vocabulary lookup.
    """
    ids = token_ids or ChatTokenIds.from_tokenizer(tokenizer)
    pieces = _template_pieces(
        messages, image_token_counts, gen_placeholder_count, system_prompt, add_generation_prompt, label_mode
    )
    texts = [piece.text for piece in pieces if piece.text is not None]
    encoded_texts = iter(tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
    special_ids = {
        IM_START: ids.im_start, IM_END: ids.im_end, VISION_START: ids.vision_start, VISION_END: ids.vision_end,
        IMAGE_PAD: ids.image_pad, IMAGE_GEN_START: ids.image_gen_start, IMAGE_GEN_END: ids.image_gen_end,
        IMAGE_GEN_PAD: ids.image_gen_pad,
    }
    input_ids: list[int] = []
    labels: list[int] = []
    for piece in pieces:
        piece_ids = next(encoded_texts) if piece.text is not None else [special_ids[piece.token]] * piece.count
        input_ids += piece_ids
        labels += piece_ids if piece.trained else [IGNORE_INDEX] * len(piece_ids)
    return EncodedChat(input_ids=input_ids, labels=None if add_generation_prompt else labels)


def encode_generation_prompt(
    tokenizer: Any,
    messages: Sequence[dict[str, str]],
    *,
    image_token_counts: Sequence[int] = (),
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
    token_ids: ChatTokenIds | None = None,
) -> list[int]:
    """Token ids of an inference prompt: the conversation so far plus ``<|im_start|>assistant\\n``."""
    return encode_chat(
        tokenizer,
        messages,
        image_token_counts=image_token_counts,
        system_prompt=system_prompt,
        add_generation_prompt=True,
        token_ids=token_ids,
    ).input_ids


def render_chat(
    messages: Sequence[dict[str, str]],
    *,
    image_token_counts: Sequence[int] = (),
    gen_placeholder_count: int = 0,
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
    add_generation_prompt: bool = False,
) -> str:
    """The same sequence as ``encode_chat`` as one string (for reading, and for tools that tokenize text)."""
    pieces = _template_pieces(
        messages, image_token_counts, gen_placeholder_count, system_prompt, add_generation_prompt, "assistant"
    )
    return "".join(piece.text if piece.text is not None else piece.token * piece.count for piece in pieces)
