"""Text tokenizers: a small byte-level BPE trained locally, or a real Qwen2-VL tokenizer folder.

Both come out as a ``transformers`` fast tokenizer with Qwen2-VL's special tokens and VARGPT's three generation
tokens (VARGPT §2.1), with ``<|endoftext|>`` as the pad token, so ``vargpt.chat.encode_chat`` treats them alike.
The local one (``train_text_tokenizer``) needs no download: the embedded default and the tests train it on their own
captions in well under a second. Its special tokens follow the same order as Qwen2-VL's, after the learned vocabulary.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Iterable
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from vargpt.chat import DEFAULT_SYSTEM_PROMPT, GENERATION_TOKENS, ChatTokenIds

logger = logging.getLogger(__name__)

# Qwen2-VL's special tokens in id order (151643 ... 151656 in the stock tokenizer).
QWEN2_VL_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# The ones the template needs; a tokenizer folder without them is not a Qwen2-VL tokenizer.
REQUIRED_QWEN2_VL_TOKENS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>")
PAD_TOKEN = "<|endoftext|>"
STOCK_QWEN2_VL_ENDOFTEXT_ID = 151643  # marks the stock Qwen2-VL vocabulary layout
REFERENCE_GENERATION_TOKEN_IDS = (151657, 151658, 151659)  # VARGPT §2.1, with the stock Qwen2-VL tokenizer


class TokenizerError(ValueError):
    """A tokenizer folder is missing or unusable; the message names the folder and what is wrong."""


def _special(token: str) -> AddedToken:
    return AddedToken(token, special=True, normalized=False, single_word=False, lstrip=False, rstrip=False)


def train_text_tokenizer(
    corpus: Iterable[str], vocab_size: int = 1024, min_frequency: int = 1
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``corpus`` and add Qwen2-VL's and VARGPT's special tokens after its vocabulary.

    Byte-level means any text round-trips, including characters never seen in the corpus. ``vocab_size`` counts
    the 256 byte symbols and the merges, not the special tokens, and is exact: when the corpus runs out of merges
    first, ``<|reserved_N|>`` tokens (never produced from text) fill the rest, so the special tokens always start at
    id ``vocab_size`` and a model config can name their ids. The template's own words (role names, the default
    system prompt) are added to the corpus.
    """
    if vocab_size < 256:
        raise TokenizerError(f"vocab_size must be >= 256 (the byte alphabet), got {vocab_size}")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    template_words = [DEFAULT_SYSTEM_PROMPT, "system\n", "user\n", "assistant\n"]  # so the template's text merges too
    bpe.train_from_iterator(itertools.chain(template_words, corpus), trainer=trainer)
    reserved = [_special(f"<|reserved_{index}|>") for index in range(vocab_size - bpe.get_vocab_size())]
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe)
    if reserved:
        tokenizer.add_tokens(reserved, special_tokens=True)
    special_tokens = [_special(token) for token in QWEN2_VL_SPECIAL_TOKENS + GENERATION_TOKENS]
    tokenizer.add_tokens(special_tokens, special_tokens=True)
    tokenizer.pad_token = PAD_TOKEN
    tokenizer.eos_token = "<|im_end|>"
    ChatTokenIds.from_tokenizer(tokenizer)
    return tokenizer


def add_generation_tokens(tokenizer: PreTrainedTokenizerFast, source: str = "tokenizer") -> ChatTokenIds:
    """Check Qwen2-VL's special tokens, add VARGPT's three if absent, and return the template's token ids.

    With the stock Qwen2-VL vocabulary the new tokens must land on 151657 / 151658 / 151659 (the ids the released
    VARGPT-v1.1 weights use); the function logs the ids it found and warns when a stock vocabulary gives others.
    """
    vocabulary = tokenizer.get_vocab()
    missing = [token for token in REQUIRED_QWEN2_VL_TOKENS if token not in vocabulary]
    if missing:
        raise TokenizerError(
            f"{source} lacks Qwen2-VL's special tokens {missing}; expected a Qwen2-VL tokenizer with "
            f"{list(REQUIRED_QWEN2_VL_TOKENS)}"
        )
    absent = [token for token in GENERATION_TOKENS if token not in vocabulary]
    if absent:
        tokenizer.add_tokens([_special(token) for token in absent], special_tokens=True)
    if tokenizer.pad_token is None:
        if PAD_TOKEN not in vocabulary:
            raise TokenizerError(f"{source} has no pad token and no {PAD_TOKEN} to use as one")
        tokenizer.pad_token = PAD_TOKEN
    token_ids = ChatTokenIds.from_tokenizer(tokenizer)
    found = (token_ids.image_gen_start, token_ids.image_gen_end, token_ids.image_gen_pad)
    message = ", ".join(f"{token}={token_id}" for token, token_id in zip(GENERATION_TOKENS, found))
    if vocabulary.get(PAD_TOKEN) == STOCK_QWEN2_VL_ENDOFTEXT_ID and found != REFERENCE_GENERATION_TOKEN_IDS:
        logger.warning(
            "%s: generation tokens got %s, not the reference's %s; released VARGPT-v1.1 weights will not line up",
            source, message, REFERENCE_GENERATION_TOKEN_IDS,
        )
    else:
        logger.info("%s: generation tokens %s", source, message)
    return token_ids


def load_text_tokenizer(folder: str | os.PathLike[str]) -> PreTrainedTokenizerFast:
    """Load a tokenizer folder (a real Qwen2-VL one, or one saved from ``train_text_tokenizer``) without downloading,
    and make sure it has VARGPT's generation tokens."""
    path = Path(folder)
    if not path.is_dir():
        raise TokenizerError(f"tokenizer folder {str(path)!r} does not exist or is not a directory")
    if not any((path / name).is_file() for name in ("tokenizer.json", "vocab.json", "tokenizer_config.json")):
        raise TokenizerError(
            f"tokenizer folder {str(path)!r} has no tokenizer.json, vocab.json or tokenizer_config.json"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as error:
        raise TokenizerError(f"cannot load a tokenizer from {str(path)!r}: {error}") from error
    add_generation_tokens(tokenizer, source=str(path))
    return tokenizer
