"""The sample schema: every kind validates, every rule fails with a message naming the key and the field."""

from __future__ import annotations

import random

import pytest
from PIL import Image

from datamodules.schema import KINDS, Sample, SampleError, placeholder_order
from datamodules.synthetic import synthetic_sample


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_validates_and_serialises(kind):
    sample = synthetic_sample(kind, f"k_{kind}", random.Random(0), size=16)
    sample.validate()
    doc = sample.to_json()
    assert doc["kind"] == kind and doc["images"] == list(sample.images)
    assert ("chosen" in doc) == (kind == "preference")


def image():
    return Image.new("RGB", (8, 8))


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


@pytest.mark.parametrize(
    "sample, message",
    [
        (Sample("a", "video", [user("hi"), assistant("yo")]), "unknown kind 'video'"),
        (Sample("a", "text", []), "'messages' must be a non-empty list"),
        (Sample("a", "text", [{"role": "robot", "content": "x"}]), "role 'robot'"),
        (Sample("a", "text", [{"role": "user", "content": 3}]), "content must be a string"),
        (Sample("a", "text", [{"role": "user", "text": "x"}]), "must be {'role', 'content'}"),
        (Sample("a", "understanding", [user("no image"), assistant("ok")]), "needs at least one <image>"),
        (Sample("a", "generation", [user("draw"), assistant("<image_gen>")]), "'images' names 0 images but"),
        (Sample("a", "generation", [user("draw"), assistant("<image_gen>")], {"target.gif": image()}), "must end in"),
        (Sample("a", "editing", [user("draw"), assistant("<image_gen>")], {"target.png": image()}), "kind 'editing' needs"),
        (Sample("a", "preference", [user("draw")], {"chosen.png": image(), "rejected.png": image()},
                chosen=assistant("<image_gen>"), rejected=user("<image_gen>")), "'rejected' must be an assistant turn"),
        (Sample("a", "preference", [user("draw")], {"chosen.png": image(), "rejected.png": image()},
                chosen=assistant("no image"), rejected=assistant("<image_gen>")), "exactly one <image_gen>"),
    ],
)
def test_violations_name_the_key_and_field(sample, message):
    with pytest.raises(SampleError, match="sample 'a'") as error:
        sample.validate()
    assert message in str(error.value)


def test_placeholder_order_follows_appearance():
    messages = [user("Compare <image> with <image>, then"), assistant("<image_gen> and <image> <image_gen>")]
    assert placeholder_order(messages) == ["<image>", "<image>", "<image_gen>", "<image>", "<image_gen>"]
