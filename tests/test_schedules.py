"""Scale schedules against the numbers of the reference (INFINITY §2, VARGPT §1.7)."""

import math

import pytest

from vargpt.schedules import (
    ASPECT_TEMPLATES,
    PN_NUM_SCALES,
    final_grid,
    nearest_aspect_template,
    pixel_size,
    placeholder_count,
    scale_schedule,
    scale_starts,
    schedule_for_latent,
    token_count,
    validate_schedule,
)

SQUARE_TOKENS = {"0.06M": 521, "0.25M": 2521, "0.60M": 6425, "1M": 10521}
SQUARE_PIXELS = {"0.06M": 256, "0.25M": 512, "0.60M": 768, "1M": 1024}


def test_fifteen_templates_in_reference_order():
    assert list(ASPECT_TEMPLATES) == [1.0, 1.25, 0.8, 1.333, 0.75, 1.5, 0.666, 1.75, 0.571, 2.0, 0.5, 2.5, 0.4, 3.0,
                                      0.333]
    for key, template in ASPECT_TEMPLATES.items():
        assert len(template) == 13
        assert template[0] == (1, 1)
        h, w = template[-1]
        assert abs(h / w - key) < 0.01, key
    assert ASPECT_TEMPLATES[0.5] == tuple((w, h) for h, w in ASPECT_TEMPLATES[2.0])


@pytest.mark.parametrize("pn", list(PN_NUM_SCALES))
def test_square_schedules(pn):
    schedule = scale_schedule(pn)
    assert len(schedule) == PN_NUM_SCALES[pn]
    assert token_count(schedule) == SQUARE_TOKENS[pn]
    assert pixel_size(schedule) == (SQUARE_PIXELS[pn], SQUARE_PIXELS[pn])
    assert all(h == w for h, w in schedule)
    starts = scale_starts(schedule)
    assert starts[0] == 0 and len(starts) == len(schedule)
    assert starts[-1] + schedule[-1][0] * schedule[-1][1] == SQUARE_TOKENS[pn]


def test_square_cumulative_counts_and_placeholders():
    assert scale_starts(scale_schedule("0.06M")) == [0, 1, 5, 21, 57, 121, 265]
    assert placeholder_count(scale_schedule("0.06M")) == 640
    assert placeholder_count(scale_schedule("0.25M")) == 2560
    assert placeholder_count(scale_schedule("0.06M"), multiple=1) == 521


@pytest.mark.parametrize("pn", list(PN_NUM_SCALES))
@pytest.mark.parametrize("aspect", [0.75, 2.0])
def test_other_aspects_follow_their_template(pn, aspect):
    schedule = scale_schedule(pn, aspect)
    assert schedule == list(ASPECT_TEMPLATES[aspect][: PN_NUM_SCALES[pn]])
    h, w = schedule[-1]
    assert abs(h / w - aspect) < 0.01
    assert token_count(schedule) == sum(h * w for h, w in schedule)
    assert pixel_size(schedule) == (16 * h, 16 * w)


def test_reference_examples_at_other_aspects():
    wide = scale_schedule("1M", 0.5)
    assert wide[-1] == (45, 90) and token_count(wide) == 11269 and pixel_size(wide) == (720, 1440)
    small = scale_schedule("0.06M", 0.75)
    assert pixel_size(small) == (240, 320) and token_count(small) == 665
    mid = scale_schedule("0.25M", 0.75)
    assert token_count(mid) == 2657 and placeholder_count(mid) == 2688 and pixel_size(mid) == (432, 576)


def test_nearest_template_and_final_grid():
    assert nearest_aspect_template(1.0) == 1.0
    assert nearest_aspect_template(1.4) == 1.333
    assert nearest_aspect_template(0.7) == 0.666
    assert nearest_aspect_template(100.0) == 3.0
    assert nearest_aspect_template(1e-3) == 0.333
    assert final_grid() == (64, 64)
    assert final_grid(0.5) == (45, 90)
    assert final_grid(1.0, "0.06M") == (16, 16)


def test_schedule_for_square_latents_uses_the_template_prefix():
    assert schedule_for_latent(8, 8) == [(1, 1), (2, 2), (4, 4), (6, 6), (8, 8)]
    assert schedule_for_latent(16, 16) == scale_schedule("0.06M")
    assert schedule_for_latent(32, 32) == scale_schedule("0.25M")
    assert schedule_for_latent(1, 1) == [(1, 1)]
    assert schedule_for_latent(15, 20) == scale_schedule("0.06M", 0.75)
    assert schedule_for_latent(16, 16, num_scales=7) == scale_schedule("0.06M")


@pytest.mark.parametrize(
    ("height", "width", "num_scales"),
    [(10, 10, None), (8, 4, None), (4, 8, 3), (64, 64, 5), (37, 5, 9), (16, 16, 16), (5, 1, None), (3, 7, 2)],
)
def test_schedule_for_latent_generic_rule(height, width, num_scales):
    schedule = schedule_for_latent(height, width, num_scales)
    assert schedule[0] == (1, 1) and schedule[-1] == (height, width)
    if num_scales is not None:
        assert len(schedule) == num_scales
    assert len(set(schedule)) == len(schedule)
    for (h0, w0), (h1, w1) in zip(schedule, schedule[1:]):
        assert h1 >= h0 and w1 >= w0 and (h1, w1) != (h0, w0)


def test_schedule_for_latent_examples():
    assert schedule_for_latent(8, 4) == [(1, 1), (2, 1), (4, 2), (6, 3), (8, 4)]
    assert schedule_for_latent(10, 10) == [(1, 1), (2, 2), (4, 4), (6, 6), (8, 8), (10, 10)]


@pytest.mark.parametrize(
    ("call", "fragment"),
    [
        (lambda: scale_schedule("2M"), "'2M'"),
        (lambda: scale_schedule("1M", 0.0), "0.0"),
        (lambda: scale_schedule("1M", -1.0), "-1.0"),
        (lambda: scale_schedule("1M", math.inf), "inf"),
        (lambda: scale_schedule("1M", math.nan), "nan"),
        (lambda: nearest_aspect_template(0), "aspect"),
        (lambda: schedule_for_latent(0, 4), "height"),
        (lambda: schedule_for_latent(4, 2.5), "width"),
        (lambda: schedule_for_latent(8, 8, 9), "[2, 8]"),
        (lambda: schedule_for_latent(8, 8, 1), "num_scales"),
        (lambda: schedule_for_latent(1, 1, 2), "[1, 1]"),
        (lambda: placeholder_count([(1, 1)], multiple=0), "multiple"),
        (lambda: pixel_size([(1, 1)], stride=0), "stride"),
        (lambda: token_count([]), "empty"),
        (lambda: validate_schedule([(1, 1), (2, 0)]), "scale 1"),
    ],
)
def test_bad_input_raises_value_error_naming_it(call, fragment):
    with pytest.raises(ValueError) as error:
        call()
    assert fragment in str(error.value)


def test_unknown_pn_lists_the_allowed_ones():
    with pytest.raises(ValueError, match="0.06M"):
        scale_schedule("512")
