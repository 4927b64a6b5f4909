"""GenEval's official scoring rules on hand-written detections."""

from __future__ import annotations

import pytest

from vargpt.eval.geneval_rules import (
    Detection,
    GenEvalMetadataError,
    GenEvalOptions,
    box_iou,
    relative_position,
    score_detections,
    select_detections,
    summarize,
)


def box(x0: float, y0: float, x1: float, y1: float, score: float = 0.95, label: str | None = None) -> Detection:
    return Detection(box=(x0, y0, x1, y1), score=score, label=label)


def test_relative_position_axes_and_image_coordinates():
    left, right = (0, 40, 20, 60), (80, 40, 100, 60)
    top, bottom = (40, 0, 60, 20), (40, 80, 60, 100)
    assert relative_position(left, right) == {"left of"}
    assert relative_position(right, left) == {"right of"}
    assert relative_position(top, bottom) == {"above"}  # y grows downward
    assert relative_position(bottom, top) == {"below"}


def test_relative_position_diagonal_gives_two_relations_and_overlap_gives_none():
    assert relative_position((0, 0, 10, 10), (90, 90, 100, 100)) == {"left of", "above"}
    # centres 4 px apart, boxes 100 px wide: the 0.1 * (100 + 100) margin swallows the offset
    assert relative_position((0, 0, 100, 100), (4, 0, 104, 100)) == set()


def test_relative_position_threshold_is_scaled_by_box_sizes():
    a, b = (0, 0, 10, 10), (15, 0, 25, 10)  # centre offset 15, sizes 10 + 10
    assert relative_position(a, b, threshold=0.1) == {"left of"}  # 15 - 2 = 13 > 0
    assert relative_position(a, b, threshold=0.75) == set()  # 15 - 15 = 0
    # a mostly vertical offset: dy dominates, so only "below"
    assert relative_position((0, 100, 10, 110), (3, 0, 13, 10)) == {"below"}


def test_box_iou_uses_plus_one_pixels():
    assert box_iou((0, 0, 9, 9), (0, 0, 9, 9)) == pytest.approx(1.0)
    assert box_iou((0, 0, 9, 9), (10, 10, 19, 19)) == 0.0
    assert box_iou((0, 0, 9, 9), (5, 0, 14, 9)) == pytest.approx(50 / 150)


def test_select_detections_threshold_order_limit_and_counting_threshold():
    candidates = {"dog": [box(0, 0, 1, 1, s) for s in (0.2, 0.5, 0.95, 0.31, 0.3)]}
    kept = select_detections(candidates, "single_object")
    assert [d.score for d in kept["dog"]] == [0.95, 0.5, 0.31]  # strictly above 0.3, by score
    assert [d.score for d in select_detections(candidates, "counting")["dog"]] == [0.95]
    many = {"cup": [box(i, 0, i + 1, 1, 0.5 + i / 100) for i in range(20)]}
    assert len(select_detections(many, "single_object")["cup"]) == 16
    assert "cat" not in select_detections({"cat": [box(0, 0, 1, 1, 0.1)]}, "single_object")


def test_select_detections_suppression_only_when_enabled():
    overlapping = {"cup": [box(0, 0, 10, 10, 0.9), box(1, 0, 11, 10, 0.8), box(50, 50, 60, 60, 0.7)]}
    assert len(select_detections(overlapping, "single_object")["cup"]) == 3
    suppressed = select_detections(overlapping, "single_object", GenEvalOptions(max_overlap=0.5))["cup"]
    assert [d.score for d in suppressed] == [0.9, 0.7]


def test_single_and_two_object_include_rules():
    meta = {"tag": "two_object", "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1}]}
    ok = score_detections(meta, {"cat": [box(0, 0, 5, 5)], "dog": [box(9, 9, 19, 19)]})
    assert ok.correct and ok.reason == ""
    assert ok.details["cat"] == [[0.0, 0.0, 5.0, 5.0, 0.95]]
    missing = score_detections(meta, {"cat": [box(0, 0, 5, 5)], "dog": [box(9, 9, 19, 19, 0.2)]})
    assert not missing.correct and missing.reason == "expected dog>=1, found 0"


def test_counting_needs_exactly_n_above_the_counting_threshold():
    meta = {
        "tag": "counting",
        "include": [{"class": "clock", "count": 2}],
        "exclude": [{"class": "clock", "count": 3}],
    }
    two = [box(0, 0, 1, 1, 0.95), box(5, 5, 6, 6, 0.92)]
    assert score_detections(meta, {"clock": two}).correct
    assert score_detections(meta, {"clock": two + [box(9, 9, 10, 10, 0.85)]}).correct  # 0.85 < 0.9 is ignored
    three = score_detections(meta, {"clock": two + [box(9, 9, 10, 10, 0.91)]})
    assert not three.correct and three.reason == "expected clock<3, found 3"
    one = score_detections(meta, {"clock": two[:1]})
    assert not one.correct and one.reason == "expected clock>=2, found 1"


def test_colour_rule_counts_matching_colours_among_the_first_n():
    meta = {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "blue"}]}
    blue, red = box(0, 0, 5, 5, 0.9, label="blue"), box(0, 0, 5, 5, 0.99, label="red")
    by_label = lambda classname, detection: detection.label  # noqa: E731 - the colour is written on the box
    assert score_detections(meta, {"car": [blue]}, by_label).correct
    # only the most confident car is checked: it is red
    result = score_detections(meta, {"car": [blue, red]}, by_label)
    assert not result.correct
    assert result.reason == "expected blue car>=1, found 0 blue; and 1 red"
    with pytest.raises(ValueError, match="no colour classifier"):
        score_detections(meta, {"car": [blue]})


def test_colour_attribute_checks_each_clause():
    meta = {
        "tag": "color_attr",
        "include": [
            {"class": "wine glass", "count": 1, "color": "purple"},
            {"class": "apple", "count": 1, "color": "black"},
        ],
    }
    colours = {"wine glass": "purple", "apple": "green"}
    result = score_detections(
        meta, {"wine glass": [box(0, 0, 1, 1)], "apple": [box(2, 2, 3, 3)]}, lambda c, d: colours[c]
    )
    assert not result.correct and result.reason.startswith("expected black apple>=1, found 0 black")


def test_position_rule_against_every_target_and_missing_target():
    meta = {
        "tag": "position",
        "include": [{"class": "teddy bear", "count": 1}, {"class": "dog", "count": 1, "position": ["right of", 0]}],
    }
    bear, dog_right, dog_left = box(0, 40, 20, 60), box(80, 40, 100, 60), box(-80, 40, -60, 60)
    assert score_detections(meta, {"teddy bear": [bear], "dog": [dog_right]}).correct
    wrong = score_detections(meta, {"teddy bear": [bear], "dog": [dog_left]})
    assert not wrong.correct and wrong.reason == "expected dog right of target, found left of target"
    no_target = score_detections(meta, {"dog": [dog_right]})
    assert not no_target.correct
    assert no_target.reason == "expected teddy bear>=1, found 0\nno target for dog to be right of"


def test_position_uses_only_the_first_count_objects_of_the_target_group():
    meta = {
        "tag": "position",
        "include": [{"class": "cup", "count": 1}, {"class": "fork", "count": 1, "position": ["left of", 0]}],
    }
    cups = [box(80, 0, 100, 20, 0.9), box(-100, 0, -80, 20, 0.8)]  # the weaker cup is left of the fork
    assert score_detections(meta, {"cup": cups, "fork": [box(0, 0, 20, 20)]}).correct


def test_metadata_validation_names_the_bad_field():
    with pytest.raises(GenEvalMetadataError, match="tag"):
        score_detections({"include": []}, {})
    with pytest.raises(GenEvalMetadataError, match=r"include\[0\].count"):
        score_detections({"tag": "counting", "include": [{"class": "cup", "count": 0}]}, {})
    with pytest.raises(GenEvalMetadataError, match="color"):
        score_detections({"tag": "colors", "include": [{"class": "cup", "count": 1, "color": "teal"}]}, {})
    with pytest.raises(GenEvalMetadataError, match="position"):
        score_detections({"tag": "position", "include": [{"class": "cup", "count": 1, "position": ["near", 0]}]}, {})


def test_summarize_overall_is_the_unweighted_mean_of_tasks():
    records = [
        {"tag": "single_object", "prompt": "a", "correct": True},
        {"tag": "single_object", "prompt": "a", "correct": False},
        {"tag": "single_object", "prompt": "b", "correct": False},
        {"tag": "single_object", "prompt": "b", "correct": False},
        {"tag": "position", "prompt": "c", "correct": True},
        {"tag": "position", "prompt": "c", "correct": True},
    ]
    summary = summarize(records)
    assert summary["tasks"]["single_object"] == {"accuracy": 0.25, "correct": 1, "images": 4}
    assert summary["tasks"]["position"]["accuracy"] == 1.0
    assert summary["overall"] == pytest.approx((0.25 + 1.0) / 2)  # not 3/6
    assert summary["images"] == 6 and summary["prompts"] == 3
    assert summary["correct_images"] == pytest.approx(0.5)
    assert summary["correct_prompts"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="no records"):
        summarize([])
