"""The sample schema shared by every stage, the shard writer and reader, the converter and the shapes world.

One sample is one WebDataset key with a ``json`` member and the image members it names::

    {
      "kind": "generation",                  # understanding | generation | editing | preference | text
      "messages": [                          # role/content turns; <image> = an input image, <image_gen> = an
        {"role": "user", "content": "Draw a red circle."},            #   image the assistant produces
        {"role": "assistant", "content": "Here it is: <image_gen>"}
      ],
      "images": ["target.png"],              # member names, in order of appearance of the placeholders
      "metadata": {...}                      # free-form (source, prompt parse, task type, ...)
    }

A ``preference`` sample keeps the shared prompt in ``messages`` and the two competing assistant turns in ``chosen``
and ``rejected`` (each containing exactly one ``<image_gen>``); its ``images`` are ``["chosen.png", "rejected.png"]``
(or the input images first when the prompt has ``<image>`` placeholders).

Conventional member names: ``input_0.png``, ``input_1.png``, ... for ``<image>``; ``target.png`` for ``<image_gen>``
(``target_0.png``, ``target_1.png``, ... when there are several); ``chosen.png`` / ``rejected.png`` for preference
pairs. Whatever the names, images are matched to placeholders by position (``placeholder_order``).

Kinds and what their messages must hold (``Sample.validate``):

* ``understanding``: at least one ``<image>`` (user turns), no ``<image_gen>``; the answer is text;
* ``generation``: no ``<image>``, at least one ``<image_gen>`` (in the assistant turn);
* ``editing``: at least one ``<image>`` (the input) and one ``<image_gen>`` (the target);
* ``preference``: a prompt without ``<image_gen>``, plus ``chosen`` and ``rejected`` assistant turns with one each;
* ``text``: no image placeholders.

Shards are written with ``datamodules.shards.ShardWriter`` and read with ``read_shard`` (or streamed by
``datamodules.datamodule.ShardDataModule``); ``docs/data.md`` walks through the whole pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from PIL import Image

KINDS = ("understanding", "generation", "editing", "preference", "text")
ROLES = ("system", "user", "assistant")
IMAGE_PLACEHOLDER = "<image>"
IMAGE_GEN_PLACEHOLDER = "<image_gen>"
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")


class SampleError(ValueError):
    """A sample breaks the schema; the message names the sample key and the field."""


def count_placeholders(messages: list[dict[str, str]], placeholder: str) -> int:
    """How often ``placeholder`` occurs in the contents of ``messages``."""
    return sum(turn["content"].count(placeholder) for turn in messages)


def placeholder_order(messages: list[dict[str, str]]) -> list[str]:
    """The image placeholders of ``messages`` in order of appearance (``<image>`` or ``<image_gen>`` each): the order
    of a sample's ``images``."""
    order = []
    for turn in messages:
        content, position = turn["content"], 0
        while True:
            hits = [(content.find(p, position), p) for p in (IMAGE_GEN_PLACEHOLDER, IMAGE_PLACEHOLDER)]
            hits = [(index, p) for index, p in hits if index >= 0]
            if not hits:
                break
            index, placeholder = min(hits)
            order.append(placeholder)
            position = index + len(placeholder)
    return order


@dataclass
class Sample:
    """One training or evaluation example, independent of how it is stored."""

    key: str
    kind: str
    messages: list[dict[str, str]]
    images: dict[str, Image.Image] = field(default_factory=dict)  # member name -> image, in placeholder order
    metadata: dict[str, Any] = field(default_factory=dict)
    chosen: dict[str, str] | None = None  # preference only: the preferred assistant turn
    rejected: dict[str, str] | None = None  # preference only: the dispreferred assistant turn

    def to_json(self) -> dict[str, Any]:
        """The ``json`` member of the sample (image members are stored separately)."""
        doc: dict[str, Any] = {
            "kind": self.kind,
            "messages": self.messages,
            "images": list(self.images),
            "metadata": self.metadata,
        }
        if self.kind == "preference":
            doc["chosen"] = self.chosen
            doc["rejected"] = self.rejected
        return doc

    def validate(self) -> None:
        """Raise ``SampleError`` naming the key and the field when the sample breaks the schema."""
        where = f"sample {self.key!r}"
        if self.kind not in KINDS:
            raise SampleError(f"{where}: unknown kind {self.kind!r}; expected one of {KINDS}")
        if not isinstance(self.messages, list) or not self.messages:
            raise SampleError(f"{where}: 'messages' must be a non-empty list of role/content turns")
        turns = list(self.messages)
        if self.kind == "preference":
            for name in ("chosen", "rejected"):
                turn = getattr(self, name)
                if not isinstance(turn, dict) or turn.get("role") != "assistant":
                    raise SampleError(f"{where}: preference field {name!r} must be an assistant turn")
                if turn.get("content", "").count(IMAGE_GEN_PLACEHOLDER) != 1:
                    raise SampleError(
                        f"{where}: preference field {name!r} must contain exactly one {IMAGE_GEN_PLACEHOLDER}"
                    )
            turns += [self.chosen, self.rejected]  # type: ignore[list-item]
        for index, turn in enumerate(turns):
            if not isinstance(turn, dict) or set(turn) - {"role", "content"} or "content" not in turn:
                raise SampleError(f"{where}: message {index} must be {{'role', 'content'}}, got {turn!r}")
            if turn.get("role") not in ROLES:
                raise SampleError(f"{where}: message {index} has role {turn.get('role')!r}; expected one of {ROLES}")
            if not isinstance(turn["content"], str):
                raise SampleError(f"{where}: message {index} content must be a string")
        n_inputs = count_placeholders(self.messages, IMAGE_PLACEHOLDER)
        n_gen = count_placeholders(self.messages, IMAGE_GEN_PLACEHOLDER)
        expected = {
            "understanding": (n_inputs >= 1 and n_gen == 0, "at least one <image> and no <image_gen>"),
            "generation": (n_inputs == 0 and n_gen >= 1, "no <image> and at least one <image_gen>"),
            "editing": (n_inputs >= 1 and n_gen >= 1, "at least one <image> and one <image_gen>"),
            "preference": (n_gen == 0, "no <image_gen> in the shared prompt"),
            "text": (n_inputs == 0 and n_gen == 0, "no image placeholders"),
        }[self.kind]
        if not expected[0]:
            raise SampleError(f"{where}: kind {self.kind!r} needs {expected[1]} in 'messages'")
        n_images = n_inputs + n_gen + (2 if self.kind == "preference" else 0)
        if len(self.images) != n_images:
            raise SampleError(
                f"{where}: 'images' names {len(self.images)} images but the messages have {n_images} placeholders"
            )
        for name in self.images:
            if name.rsplit(".", 1)[-1].lower() not in IMAGE_EXTENSIONS:
                raise SampleError(f"{where}: image member {name!r} must end in one of {IMAGE_EXTENSIONS}")
