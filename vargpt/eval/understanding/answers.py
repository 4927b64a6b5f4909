"""Answer parsing shared by the understanding benchmarks: option letters and yes/no."""

from __future__ import annotations

import string
from collections.abc import Mapping

# Characters that VLMEvalKit's ``can_infer_option`` turns into spaces before looking for a lone option letter.
OPTION_DECORATIONS = ".()[],:;!*#{}"


def match_option(prediction: str, options: Mapping[str, str]) -> str | None:
    """The option letter a free-form answer names, by VLMEvalKit's offline heuristic (``can_infer``):

    1. after turning ``.()[],:;!*#{}`` into spaces, exactly one option letter appears as a word -> that letter;
    2. otherwise exactly one option text occurs in the answer (case-insensitive) -> its letter;
    3. otherwise None (unmatched; MMBench counts it wrong, as the GPT fallback is not used offline).
    """
    cleaned = prediction
    for character in OPTION_DECORATIONS:
        cleaned = cleaned.replace(character, " ")
    words = cleaned.split()
    named = [letter for letter in options if letter in words]
    if len(named) == 1:
        return named[0]
    lowered = prediction.lower()
    containing = [letter for letter, text in options.items() if str(text).lower() in lowered]
    if len(containing) == 1:
        return containing[0]
    return None


def parse_yes_no_llava(prediction: str) -> str:
    """POPE's yes/no parsing (LLaVA ``eval_pope.py``): keep the first sentence, drop commas; "no" if the words
    include ``No``, ``not`` or ``no``, otherwise "yes"."""
    first_sentence = prediction.split(".")[0].replace(",", "")
    words = first_sentence.split(" ")
    return "no" if any(word in ("No", "not", "no") for word in words) else "yes"


def parse_yes_no_mme(prediction: str) -> str:
    """MME's yes/no parsing (lmms-eval ``parse_pred_ans``): lower-case, drop ".", exact "yes"/"no"; else look in
    the first four characters; else "other" (always wrong)."""
    answer = prediction.lower().strip().replace(".", "")
    if answer in ("yes", "no"):
        return answer
    prefix = answer[:4]
    if "yes" in prefix:
        return "yes"
    if "no" in prefix:
        return "no"
    return "other"


def option_letters(count: int) -> list[str]:
    """``A``, ``B``, ... for ``count`` options."""
    if not 0 < count <= len(string.ascii_uppercase):
        raise ValueError(f"cannot name {count} options with letters")
    return list(string.ascii_uppercase[:count])
