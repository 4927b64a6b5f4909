"""Understanding scorers on hand-made tables: parsing, circular MMBench, MMMU, POPE F1, MME acc+, the runner."""

from __future__ import annotations

import base64
import csv
import io
import json
import random

import pytest
from PIL import Image

from vargpt.eval.jsonl import JsonlError
from vargpt.eval.understanding import mmbench, mme, mmmu, pope, seed
from vargpt.eval.understanding.answers import match_option, parse_yes_no_llava, parse_yes_no_mme
from vargpt.eval.understanding.data import BenchmarkDataError
from vargpt.eval.understanding.runner import (
    evaluate_understanding,
    generate_predictions,
    get_benchmark,
    read_predictions,
)


def png_base64(colour=(200, 30, 30)):
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def write_tsv(path, rows):
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_option_matching_follows_the_offline_heuristic():
    options = {"A": "dog", "B": "cat", "C": "bird"}
    assert match_option("B", options) == "B"
    assert match_option("The answer is (C).", options) == "C"
    assert match_option("It is a cat", options) == "B"  # no letter word, one option text
    assert match_option("A or B", options) is None  # two letters, no text
    assert match_option("a dog and a cat", options) is None  # two texts
    assert match_option("", options) is None


def test_yes_no_parsers():
    assert parse_yes_no_llava("Yes, there is a dog.") == "yes"
    assert parse_yes_no_llava("No.") == "no"
    assert parse_yes_no_llava("There is not a dog in the image") == "no"
    assert parse_yes_no_llava("Yes. No dog is missing.") == "yes"  # only the first sentence counts
    assert parse_yes_no_mme("Yes.") == "yes"
    assert parse_yes_no_mme("no, it is not") == "no"
    assert parse_yes_no_mme("The answer is yes") == "other"


def mmbench_rows():
    image = png_base64()
    return [
        {
            "index": 1,
            "question": "What animal?",
            "hint": "",
            "A": "cat",
            "B": "dog",
            "C": "bird",
            "answer": "B",
            "category": "animals",
            "l2-category": "perception",
            "image": image,
        },
        {
            "index": 2,
            "question": "What colour?",
            "hint": "Look closely.",
            "A": "red",
            "B": "green",
            "C": "blue",
            "answer": "A",
            "category": "colours",
            "l2-category": "perception",
            "image": "1",
        },
    ]


def test_mmbench_rotations_and_circular_scoring(tmp_path):
    loaded = mmbench.load_questions(write_tsv(tmp_path / "MMBench_DEV_EN.tsv", mmbench_rows()))
    assert loaded.counts == {"added_rotations": 4}
    by_id = {q.id: q for q in loaded.questions}
    assert set(by_id) == {"1", "1000001", "2000001", "2", "1000002", "2000002"}
    assert by_id["1000001"].fields["options"] == {"A": "dog", "B": "bird", "C": "cat"}
    assert [by_id[i].answer for i in ("1", "1000001", "2000001")] == ["B", "A", "C"]  # the answer follows "dog"
    assert by_id["2"].prompt == (
        "Look closely. What colour? There are several options:\nA. red\nB. green\nC. blue\n\n"
        "Answer with the option's letter from the given choices directly."
    )
    assert by_id["2"].images == by_id["1"].images  # the short image cell referred to row 1
    assert by_id["2"].load_images()[0].size == (8, 8)
    predictions = {
        "1": "B",
        "1000001": "The answer is A.",
        "2000001": "dog",  # all variants right -> correct
        "2": "A",
        "1000002": "A",  # "red" moved to C in variant 1, so A is wrong; variant 2 is missing
    }
    result = mmbench.score(loaded.questions, predictions)
    assert result.summary["questions"] == 2 and result.summary["variants"] == 6
    assert result.summary["circular_accuracy"] == 0.5
    assert result.summary["category"] == {"animals": 1.0, "colours": 0.0}
    assert result.summary["missing_predictions"] == 1
    assert result.summary["variant_accuracy"] == pytest.approx(4 / 6)
    assert result.notes and "GPT" in result.notes[0]


def test_mmbench_uses_circular_copies_already_in_the_file(tmp_path):
    rows = mmbench_rows()[:1]
    rows.append({**rows[0], "index": 1_000_001, "A": "dog", "B": "bird", "C": "cat", "answer": "A"})
    loaded = mmbench.load_questions(write_tsv(tmp_path / "mmb.tsv", rows))
    assert [q.id for q in loaded.questions] == ["1", "1000001"] and loaded.counts == {"added_rotations": 0}
    bad = [{**mmbench_rows()[0], "answer": "D"}]
    with pytest.raises(BenchmarkDataError, match="answer 'D' is not one of"):
        mmbench.load_questions(write_tsv(tmp_path / "bad.tsv", bad))


def test_seed_scores_the_first_character_and_keeps_image_rows(tmp_path):
    image = png_base64()
    rows = [
        {
            "index": 10,
            "question": "Q1",
            "A": "a",
            "B": "b",
            "C": "c",
            "D": "d",
            "answer": "C",
            "category": "scene",
            "data_type": "image",
            "image": image,
        },
        {
            "index": 11,
            "question": "Q2",
            "A": "a",
            "B": "b",
            "C": "c",
            "D": "d",
            "answer": "A",
            "category": "count",
            "data_type": "image",
            "image": image,
        },
        {
            "index": 12,
            "question": "Q3",
            "A": "a",
            "B": "b",
            "C": "c",
            "D": "d",
            "answer": "A",
            "category": "action",
            "data_type": "video",
            "image": "",
        },
    ]
    loaded = seed.load_questions(write_tsv(tmp_path / "SEEDBench_IMG.tsv", rows))
    assert [q.id for q in loaded.questions] == ["10", "11"] and loaded.counts == {"dropped_non_image": 1}
    assert (
        loaded.questions[0].prompt
        == "Q1\nA. a\nB. b\nC. c\nD. d\nAnswer with the option's letter from the given choices directly."
    )
    result = seed.score(loaded.questions, {"10": " C. c", "11": "B"})
    assert result.summary["accuracy"] == 0.5 and result.summary["category"] == {"count": 0.0, "scene": 1.0}


def test_mmmu_multiple_choice_parser():
    options = {"A": "the first law of motion", "B": "entropy", "C": "the gas constant", "D": "none"}
    rng = random.Random(0)
    assert mmmu.parse_multiple_choice("(B)", options, rng) == ("B", False)
    assert mmmu.parse_multiple_choice("B.", options, rng) == ("B", False)
    assert mmmu.parse_multiple_choice("I think A, no wait, C is right", options, rng) == ("C", False)  # last wins
    assert mmmu.parse_multiple_choice("It is clearly described by the gas constant here", options, rng) == ("C", False)
    guess, guessed = mmmu.parse_multiple_choice("no idea", options, random.Random(5))
    assert guessed and guess == random.Random(5).choice(list(options))


def test_mmmu_open_parser():
    assert 42.0 in mmmu.parse_open("So the result is 42.")
    assert mmmu.open_is_correct("1,000", mmmu.parse_open("The total is 1000"))
    assert mmmu.open_is_correct(["Paris", "paris, france"], mmmu.parse_open("The answer is paris"))
    assert not mmmu.open_is_correct("3.5", mmmu.parse_open("x = 3.7"))
    assert mmmu.open_is_correct("3.5", mmmu.parse_open("thus x = 3.50"))


def test_mmmu_loading_and_seeded_scoring(tmp_path):
    image = png_base64()
    rows = [
        {
            "index": "validation_Art_1",
            "question": "<image 1> Which style?",
            "A": "baroque",
            "B": "cubism",
            "answer": "B",
            "split": "validation",
            "image": image,
        },
        {
            "index": "validation_Math_2",
            "question": "How many?",
            "options": "",
            "answer": "['7', 'seven']",
            "split": "validation",
            "image": image,
        },
        {
            "index": "dev_Art_3",
            "question": "dev row",
            "A": "x",
            "B": "y",
            "answer": "A",
            "split": "dev",
            "image": image,
        },
    ]
    loaded = mmmu.load_questions(write_tsv(tmp_path / "MMMU_DEV_VAL.tsv", rows))
    assert [q.id for q in loaded.questions] == ["validation_Art_1", "validation_Math_2"]
    assert loaded.counts == {"dropped_other_splits": 1}
    art, math = loaded.questions
    assert art.fields["question_type"] == "multiple-choice" and art.fields["subject"] == "Art"
    assert art.prompt.endswith(
        "A. baroque\nB. cubism\n\nAnswer with the option's letter from the given choices directly."
    )
    assert math.fields["question_type"] == "open" and math.answer == ["7", "seven"]
    first = mmmu.score(loaded.questions, {"validation_Art_1": "???", "validation_Math_2": "there are seven"}, seed=3)
    again = mmmu.score(loaded.questions, {"validation_Art_1": "???", "validation_Math_2": "there are seven"}, seed=3)
    assert first.records == again.records and first.summary["random_guesses"] == 1
    assert first.records[1]["correct"] and first.summary["subject"]["Math"] == 1.0


def test_pope_metrics_per_split_by_hand(tmp_path):
    image = png_base64()
    truth = ["Yes", "Yes", "No", "No", "Yes", "No"]
    splits = ["random", "random", "random", "random", "popular", "popular,adversarial"]
    rows = [
        {"index": i, "question": f"Is there a thing {i}?", "answer": a, "category": s, "image": image}
        for i, (a, s) in enumerate(zip(truth, splits, strict=True))
    ]
    loaded = pope.load_questions(write_tsv(tmp_path / "POPE.tsv", rows))
    assert loaded.questions[5].fields["splits"] == ["popular", "adversarial"]
    answers = {"0": "Yes, there is.", "1": "No.", "2": "Yes", "3": "There is not.", "4": "yes", "5": "no"}
    result = pope.score(loaded.questions, answers)
    random_split = result.summary["splits"]["random"]
    # random: tp=1 (0), fn=1 (1), fp=1 (2), tn=1 (3)
    assert random_split == {"accuracy": 0.5, "precision": 0.5, "recall": 0.5, "f1": 0.5, "yes_ratio": 0.5, "n": 4}
    assert result.summary["splits"]["popular"]["f1"] == 1.0
    assert result.summary["splits"]["adversarial"] == {
        "accuracy": 1.0,
        "precision": 0.0,
        "recall": 0.0,
        "f1": 0.0,
        "yes_ratio": 0.0,
        "n": 1,
    }
    assert result.summary["mean_f1"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    assert result.summary["pooled"]["n"] == 6
    bad = [{**rows[0], "answer": "Maybe"}]
    with pytest.raises(BenchmarkDataError, match="expected Yes/No"):
        pope.load_questions(write_tsv(tmp_path / "bad.tsv", bad))


def test_mme_acc_plus_and_sums(tmp_path):
    image = png_base64()
    rows = []
    for index, (subtask, group, answer) in enumerate(
        [
            ("color", "a.jpg", "Yes"),
            ("color", "a.jpg", "No"),
            ("color", "b.jpg", "Yes"),
            ("color", "b.jpg", "No"),
            ("code_reasoning", "c.png", "Yes"),
            ("code_reasoning", "c.png", "No"),
        ]
    ):
        rows.append(
            {
                "index": index,
                "question": "Is it red? Please answer yes or no.",
                "answer": answer,
                "category": subtask,
                "image_path": group,
                "image": image,
            }
        )
    loaded = mme.load_questions(write_tsv(tmp_path / "MME.tsv", rows))
    assert loaded.questions[0].prompt == "Is it red?\nAnswer the question using a single word or phrase."
    answers = {"0": "Yes", "1": "No.", "2": "Yes", "3": "yes", "4": "yes", "5": "no"}
    result = mme.score(loaded.questions, answers)
    colour = result.summary["subtasks"]["color"]
    assert colour["acc"] == 75.0 and colour["acc_plus"] == 50.0 and colour["score"] == 125.0
    assert result.summary["subtasks"]["code_reasoning"]["score"] == 200.0
    assert result.summary["perception"] == 125.0 and result.summary["cognition"] == 200.0
    assert len(result.summary["missing_subtasks"]) == 12


def test_predictions_file_errors_name_the_line(tmp_path):
    path = tmp_path / "predictions.jsonl"
    path.write_text(json.dumps({"id": 1, "answer": "A"}) + "\n" + json.dumps({"id": "1", "answer": "B"}) + "\n")
    with pytest.raises(JsonlError, match=r"predictions.jsonl:2: id '1' appears twice"):
        read_predictions(path)
    path.write_text(json.dumps({"id": 1, "text": "A"}) + "\n")
    with pytest.raises(JsonlError, match=r"predictions.jsonl:1: expected fields 'id' and 'answer'"):
        read_predictions(path)


class ScriptedChat:
    """A test chat model: answers from a table keyed by the prompt's first line."""

    def __init__(self, answers):
        self.answers = answers
        self.calls = []

    def chat(self, messages, images, max_new_tokens):
        self.calls.append((messages[0]["content"].splitlines()[0], len(images), max_new_tokens))
        return self.answers[messages[0]["content"].splitlines()[0]]


def test_generation_through_the_chat_protocol_resumes_and_scores(tmp_path):
    data = write_tsv(
        tmp_path / "MME.tsv",
        [
            {
                "index": 0,
                "question": "Is it red?",
                "answer": "Yes",
                "category": "color",
                "image_path": "a",
                "image": png_base64(),
            },
            {
                "index": 1,
                "question": "Is it blue?",
                "answer": "No",
                "category": "color",
                "image_path": "a",
                "image": "0",
            },
        ],
    )
    benchmark = get_benchmark("mme")
    questions = benchmark.load(data)
    chat = ScriptedChat({"Is it red?": "Yes", "Is it blue?": "Yes"})
    out = tmp_path / "predictions.jsonl"
    generate_predictions(chat, questions.questions[:1], out, progress=False)
    predictions = generate_predictions(chat, questions.questions, out, progress=False)
    assert chat.calls == [("Is it red?", 1, 16), ("Is it blue?", 1, 16)]  # the first was not asked twice
    assert read_predictions(out) == predictions == {"0": "Yes", "1": "Yes"}
    report = evaluate_understanding(benchmark, questions, predictions, tmp_path / "out", data.name)
    assert report.metrics["perception"] == 50.0  # acc 50 + acc+ 0
    assert report.settings["gpt_judge"] == "no" and report.settings["questions"] == 2
    samples = (tmp_path / "out" / "mme_samples.jsonl").read_text().splitlines()
    assert len(samples) == 2 and json.loads(samples[1])["parsed"] == "yes"
    with pytest.raises(ValueError, match="unknown understanding benchmark 'gqa'"):
        get_benchmark("gqa")


def test_table_errors_name_the_file_and_row(tmp_path):
    rows = mmbench_rows()
    with pytest.raises(BenchmarkDataError, match="index '1' appears in more than one row"):
        pope.load_questions(
            write_tsv(
                tmp_path / "twice.tsv",
                [
                    {"index": 1, "question": "q", "answer": "Yes", "category": "random", "image": rows[0]["image"]},
                    {"index": 1, "question": "q", "answer": "No", "category": "random", "image": rows[0]["image"]},
                ],
            )
        )
    with pytest.raises(BenchmarkDataError, match=r"row 1 lacks the column\(s\) \['category'\]"):
        pope.load_questions(write_tsv(tmp_path / "nocat.tsv", [{"index": 1, "question": "q", "answer": "Yes"}]))
    with pytest.raises(BenchmarkDataError, match="refers to image row '7', which holds no image"):
        mmbench.load_questions(write_tsv(tmp_path / "ref.tsv", [{**rows[0], "image": "7"}]))
    with pytest.raises(BenchmarkDataError, match="benchmark file not found"):
        mme.load_questions(tmp_path / "MME.tsv")
