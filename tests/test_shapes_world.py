"""The shapes world: seeded scenes, rendering at any resolution, prompts/specs, questions, edits, preference pairs."""

from __future__ import annotations

import numpy as np
import pytest

from datamodules.shapes.captions import TASKS, benchmark_examples, make_task_example
from datamodules.shapes.components import connected_components
from datamodules.shapes.detect import detect_objects
from datamodules.shapes.edits import EDIT_OPERATIONS, make_edit
from datamodules.shapes.preferences import VIOLATIONS_BY_TASK, make_preference
from datamodules.shapes.questions import QUESTION_TYPES, answers_match, make_question, normalise_answer
from datamodules.shapes.render import render_scene
from datamodules.shapes.vocabulary import BACKGROUND, COLOURS, SHAPES
from datamodules.shapes.world import (
    Layout,
    PlacementError,
    Scene,
    ShapeObject,
    boxes_apart,
    place_objects,
    random_scene,
    region_of,
    relations,
    sample_rng,
)


def test_same_seed_same_scene_and_pixels_and_streams_are_independent():
    first = random_scene(sample_rng(4, "train", "generation", 17))
    again = random_scene(sample_rng(4, "train", "generation", 17))
    assert first == again
    assert render_scene(first, 48).tobytes() == render_scene(again, 48).tobytes()
    others = {
        random_scene(sample_rng(4, "eval", "generation", 17)),
        random_scene(sample_rng(4, "train", "generation", 18)),
        random_scene(sample_rng(4, "train", "editing", 17)),
        random_scene(sample_rng(5, "train", "generation", 17)),
    }
    assert first not in others and len(others) == 4
    with pytest.raises(ValueError, match="unknown split"):
        sample_rng(0, "test", "generation", 0)


def test_placement_keeps_margin_and_gap_for_every_object_count():
    layout = Layout()
    rng = np.random.default_rng(0)
    for count in range(1, layout.max_objects + 1):
        for _ in range(30):
            scene = place_objects(rng, [("circle", "red")] * count, layout)
            assert len(scene.objects) == count
            for i, obj in enumerate(scene.objects):
                x0, y0, x1, y1 = obj.box
                assert min(x0, y0) >= layout.margin - 1e-6 and max(x1, y1) <= 1 - layout.margin + 1e-6
                assert all(boxes_apart(obj, other, layout.gap - 1e-6) for other in scene.objects[i + 1 :])
    with pytest.raises(PlacementError):
        place_objects(rng, [("circle", "red")] * 5, layout)
    with pytest.raises(ValueError, match="must fit side by side"):
        Layout(max_size=0.5)


def test_scene_round_trips_through_json_dicts_and_rejects_unknown_names():
    scene = random_scene(np.random.default_rng(1), 3, 3)
    assert Scene.from_dict(scene.to_dict()) == scene
    with pytest.raises(ValueError, match="unknown shape"):
        ShapeObject("hexagon", "red", 0.5, 0.5, 0.3)
    with pytest.raises(ValueError, match="unknown colour"):
        ShapeObject("circle", "teal", 0.5, 0.5, 0.3)


def test_render_any_resolution_shows_the_same_scene():
    scene = Scene((ShapeObject("triangle", "green", 0.3, 0.35, 0.34), ShapeObject("cross", "pink", 0.7, 0.65, 0.3)))
    small = np.asarray(render_scene(scene, 32), dtype=np.float64)
    large = np.asarray(render_scene(scene, 512), dtype=np.float64)
    reduced = large.reshape(32, 16, 32, 16, 3).mean(axis=(1, 3))
    assert np.abs(reduced - small).mean() < 1.5  # same picture, only antialiasing differs
    assert tuple(small[0, 0]) == BACKGROUND
    assert tuple(large[int(0.65 * 512), int(0.7 * 512)]) == COLOURS["pink"]  # interiors carry the exact colour
    wide = render_scene(scene, (96, 64))
    assert wide.size == (96, 64)


def test_palette_is_well_separated():
    colours = np.asarray(list(COLOURS.values()), dtype=np.float64)
    pairwise = np.linalg.norm(colours[:, None] - colours[None], axis=-1) + np.eye(len(colours)) * 1e9
    assert len(COLOURS) >= 8 and len(SHAPES) >= 4
    assert pairwise.min() > 120
    assert np.linalg.norm(colours - np.asarray(BACKGROUND), axis=1).min() > 110


def test_task_examples_satisfy_their_specs_and_follow_geneval_forms():
    rng = np.random.default_rng(21)
    for index in range(60):
        example = make_task_example(TASKS[index % len(TASKS)], rng)
        spec = example.spec
        assert spec["tag"] == example.task and spec["prompt"] == example.prompt
        assert example.prompt.startswith("a photo of ")
        for clause in spec["include"]:
            matching = example.scene.count(clause["class"], clause.get("color"))
            assert matching >= clause["count"]
        for clause in spec.get("exclude", []):
            assert example.scene.count(clause["class"]) < clause["count"]
        if example.task == "position":
            relation, target = spec["include"][1]["position"]
            reference, subject = example.scene.objects
            assert target == 0 and relation in relations(subject, reference) and relation in example.prompt
    assert make_task_example("counting", np.random.default_rng(0)).spec["exclude"]
    with pytest.raises(ValueError, match="unknown task"):
        make_task_example("texture", rng)


def test_benchmark_is_fixed_and_balanced():
    examples = benchmark_examples(per_task=3, seed=0)
    assert [e.task for e in examples] == [t for t in TASKS for _ in range(3)]
    assert [e.prompt for e in examples] == [e.prompt for e in benchmark_examples(per_task=3, seed=0)]


def test_questions_have_exact_answers_that_the_parser_confirms():
    rng = np.random.default_rng(9)
    for index in range(80):
        question = make_question(QUESTION_TYPES[index % len(QUESTION_TYPES)], rng)
        scene, answer = question.scene, question.answer
        objects = detect_objects(render_scene(scene, 64))
        assert sorted((o.shape, o.colour) for o in objects) == sorted((o.shape, o.colour) for o in scene.objects)
        assert question.question.endswith("?") and answer == normalise_answer(answer)
        if question.question_type == "count":
            assert answer.isdigit() and int(answer) <= len(scene.objects)
        elif question.question_type == "shape":
            assert answer in SHAPES
        elif question.question_type == "colour":
            assert answer in COLOURS and sum(o.shape in question.question for o in scene.objects) >= 1
        elif question.question.startswith("Where"):
            named = next(o for o in scene.objects if f"the {o.name}?" in question.question)
            assert region_of(named.x, named.y) == answer
        else:
            assert answer in ("left", "right", "above", "below")


def test_answer_normaliser():
    assert normalise_answer("Three.") == "3"
    assert answers_match("It is in the top-left corner.", "top left")
    assert answers_match("Circles", "circle") and answers_match("the centre", "center")
    assert not answers_match("left", "right") and not answers_match("2", "3")


def test_edits_change_exactly_what_the_instruction_says():
    rng = np.random.default_rng(12)
    for index in range(40):
        operation = EDIT_OPERATIONS[index % len(EDIT_OPERATIONS)]
        edit = make_edit(operation, rng)
        source, target = edit.source.objects, edit.target.objects
        assert len({(o.shape, o.colour) for o in source}) == len(source)  # every object is nameable
        if operation == "recolour":
            changed = [(a, b) for a, b in zip(source, target) if a != b]
            assert len(changed) == 1 and changed[0][0].colour != changed[0][1].colour
            assert changed[0][0].name in edit.instruction and changed[0][1].colour in edit.instruction
        elif operation == "move":
            changed = [(a, b) for a, b in zip(source, target) if a != b]
            (before, after), = changed
            assert (before.shape, before.colour, before.size) == (after.shape, after.colour, after.size)
            assert np.hypot(before.x - after.x, before.y - after.y) >= 0.2
        elif operation == "add":
            assert target[:-1] == source and target[-1].name in edit.instruction
        else:
            assert len(target) == len(source) - 1 and set(target) < set(source)
    with pytest.raises(ValueError, match="unknown edit"):
        make_edit("rotate", rng)


def test_preference_pairs_differ_in_exactly_the_named_attribute():
    rng = np.random.default_rng(14)
    for task in TASKS:
        for violation in VIOLATIONS_BY_TASK[task]:
            for _ in range(4):
                pair = make_preference(task, rng, violation)
                chosen, rejected = pair.chosen.objects, pair.rejected.objects
                if violation == "count":
                    assert abs(len(chosen) - len(rejected)) == 1
                    continue
                assert len(chosen) == len(rejected)
                differences = [(a, b) for a, b in zip(chosen, rejected) if a != b]
                if violation == "position":
                    assert all((a.shape, a.colour, a.size) == (b.shape, b.colour, b.size) for a, b in differences)
                    assert differences
                else:
                    (a, b), = differences
                    attribute = "colour" if violation == "colour" else "shape"
                    assert getattr(a, attribute) != getattr(b, attribute)
                    assert (a.x, a.y, a.size) == (b.x, b.y, b.size)
    with pytest.raises(ValueError, match="cannot show"):
        make_preference("single_object", rng, "colour")


def test_connected_components_match_a_flood_fill():
    def flood_fill(mask):
        labels = np.zeros(mask.shape, dtype=np.int32)
        count = 0
        for start in zip(*np.nonzero(mask)):
            if labels[start]:
                continue
            count += 1
            labels[start] = count
            stack = [start]
            while stack:
                r, c = stack.pop()
                for nr, nc in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
                    if 0 <= nr < mask.shape[0] and 0 <= nc < mask.shape[1] and mask[nr, nc] and not labels[nr, nc]:
                        labels[nr, nc] = count
                        stack.append((nr, nc))
        return labels, count

    for seed in range(10):
        mask = np.random.default_rng(seed).random((17, 23)) < 0.55
        labels, count = connected_components(mask)
        expected, expected_count = flood_fill(mask)
        assert count == expected_count and np.array_equal(labels, expected)
    diagonal = np.array([[1, 0], [0, 1]], dtype=bool)
    assert connected_components(diagonal)[1] == 2  # 4-connectivity
