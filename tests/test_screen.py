"""bench/screen.py's rules: answer formats, the seeded draw of task sets, and screening items that are never the
benchmark's eval items."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
from screen import (  # noqa: E402
    BENCH_SEEDS,
    SCREEN_SEED,
    answer_format,
    draw_new_sets,
    draw_sets,
    generation_length,
    probe_recipe,
    screen_one,
    screening_task,
    write_report,
)
from seesaw import SIZES  # noqa: E402

from peft_isolate.data import TaskData, load_task  # noqa: E402
from peft_isolate.pipeline import load_run, probe_key  # noqa: E402


@pytest.mark.parametrize(
    ("answers", "expected"),
    [
        (["3", "-12", "1/2", "0.25"], "number"),
        (["a, b", "[1, 2]", "x"], "list"),
        (["olleh", "3"], "word"),  # one word is enough to make it words
        (["a, b", "c", "d"], "word"),  # a comma in a minority of the answers
    ],
)
def test_answer_formats(answers, expected):
    assert answer_format(answers) == expected


def test_sets_are_disjoint_span_two_formats_and_repeat_with_the_seed():
    passing = {f"n{i}": "number" for i in range(5)} | {"w0": "word", "w1": "word", "l0": "list"}
    sets = draw_sets(passing, 2, 3, seed=0)
    assert sets == draw_sets(passing, 2, 3, seed=0) and sets != draw_sets(passing, 2, 3, seed=1)
    assert len({t for s in sets for t in s}) == 6
    assert all(len({passing[t] for t in s}) >= 2 for s in sets)


def test_too_few_or_too_uniform_passing_tasks_say_screen_more():
    with pytest.raises(ValueError, match="screen more"):
        draw_sets({f"n{i}": "number" for i in range(9)}, 3, 3, seed=0)  # one format only
    with pytest.raises(ValueError, match="screen more"):
        draw_sets({"n0": "number", "w0": "word"}, 1, 3, seed=0)


def test_sets_are_drawn_as_soon_as_the_pool_allows_and_stay():
    passed = {"passed": True}
    generators = {f"n{i}": {"format": "number", **passed} for i in range(2)} | {"w0": {"format": "word", **passed}}
    saved = {"seed": 0, "generators": generators | {"x": {"format": "word", "passed": False}}}
    draw_new_sets(saved, 3)
    first = saved["sets"][0]
    assert saved["sets"] == [["n0", "n1", "w0"]] and saved["drawn_after"] == [4]  # three pass: set 0 at once
    assert saved["sets_error"].startswith("set 1: 0 passing generators")
    saved["generators"] |= {f"n{i}": {"format": "number", **passed} for i in range(2, 6)}
    draw_new_sets(saved, 3)
    assert len(saved["sets"]) == 1 and "screen more" in saved["sets_error"]  # 4 more, one format: no set 1
    saved["generators"] |= {f"w{i}": {"format": "word", **passed} for i in range(1, 4)}
    draw_new_sets(saved, 3)
    sets = saved["sets"]
    assert sets[0] is first and len(sets) == 3 and saved["sets_error"] is None and saved["drawn_after"] == [4, 11, 11]
    assert len({t for s in sets for t in s}) == 9 and all(len({t[0] for t in s}) == 2 for s in sets)
    again = {"seed": 0, "generators": saved["generators"], "sets": [first], "drawn_after": [4]}
    draw_new_sets(again, 3)
    assert again["sets"] == sets  # set K's draw is seeded by its number: the same pool draws the same set
    saved["generators"] |= {f"l{i}": {"format": "list", **passed} for i in range(9)}
    draw_new_sets(saved, 3)
    assert saved["sets"] == sets  # later passes add no set past --sets and change none


def test_longer_answers_generate_in_the_next_tier():
    assert [generation_length(n) for n in (1, 12, 13, 28, 29)] == [16, 16, 32, 32, None]


def test_screening_items_are_none_of_the_benchmarks_eval_items():
    task = screening_task("basic_arithmetic", 40)
    assert len(task.eval) == 40 and len({e.prompt for e in task.eval}) == 40
    for seed in BENCH_SEEDS:
        for train in {s["train"] for s in SIZES.values()}:
            bench = {
                e.prompt for e in load_task("reasoning_gym:basic_arithmetic", train=train, eval=200, seed=seed).eval
            }
            assert not bench & {e.prompt for e in task.eval}
    assert not {e.prompt for e in task.train} & {e.prompt for e in task.eval}


def test_a_longer_list_of_generators_keeps_each_probes_key(tiny_dir, tmp_path):
    two = probe_recipe(["basic_arithmetic", "letter_counting"], tmp_path, str(tiny_dir))
    three = probe_recipe(["basic_arithmetic", "letter_counting", "word_sorting"], tmp_path, str(tiny_dir))
    assert {spec.seed for spec in three.tasks.values()} == {SCREEN_SEED}
    shorter, longer = load_run(two), load_run(three)
    assert probe_key(shorter, "letter_counting") == probe_key(longer, "letter_counting")
    assert probe_key(longer, "letter_counting") != probe_key(longer, "word_sorting")


def test_screening_trains_only_its_generators_probe_and_once(tiny_dir, tmp_path):
    task = screening_task("basic_arithmetic", 16)
    first = screen_one(task, str(tiny_dir), tmp_path)
    probe = tmp_path / "probes" / "basic_arithmetic" / "adapter_model.safetensors"
    trained = probe.stat().st_mtime_ns
    again = screen_one(task, str(tiny_dir), tmp_path)
    assert probe.stat().st_mtime_ns == trained  # a complete probe is not trained again
    assert [p.parent.name for p in (tmp_path / "probes").glob("*/adapter_model.safetensors")] == ["basic_arithmetic"]
    for result in (first, again):
        assert {"base", "majority", "probe", "passed", "minutes"} <= set(result)
        assert all(0 <= result[k] <= 1 for k in ("base", "majority", "probe"))
    assert again["probe"] == first["probe"] and again["base"] == first["base"]


def test_no_probe_trains_where_the_majority_answer_leaves_no_room_to_pass(tiny_dir, tmp_path):
    task = screening_task("basic_arithmetic", 16)
    one = task.train[0].answer  # every item's reference answer the same: the majority answer scores 100
    task = TaskData(
        task.name,
        [replace(e, answer=one) for e in task.train],
        [replace(e, answer=one) for e in task.eval],
        lambda prediction, example: float(prediction == example.answer),
    )
    result = screen_one(task, str(tiny_dir), tmp_path)
    assert result["majority"] == 1.0 and result["passed"] is False and "probe" not in result
    assert not (tmp_path / "probes").exists()


def test_the_report_tells_a_pending_generator_from_a_long_one(tmp_path):
    screened = {"base": 0.1, "majority": 0.2, "probe": 0.5, "passed": True, "minutes": 3.0}
    generators = {"a": {"format": "number", "tokens": 2, **screened}, "b": {"format": "word", "tokens": 3}}
    saved = {"command": "c", "date": "d", "device": "e", "commit": "f", "seed": 0, "items": 200}
    generators |= {"c": {"format": "list", "tokens": 40}, "d": {"format": "word", "tokens": 2, "unusable": "few"}}
    generators |= {"e": {"format": "word", "tokens": 1, "base": 0.5, "majority": 1.0, "passed": False, "minutes": 1.0}}
    text = write_report(saved | {"generators": generators}, tmp_path / "s.md")
    rows = [line.split(" | ")[1:9] for line in text.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert rows == [
        ["a", "number", "2", "16", "10.0", "20.0", "50.0", "yes"],
        ["b", "word", "3", "-", "-", "-", "-", "not screened yet"],
        ["c", "list", "40", "-", "-", "-", "-", "not short"],
        ["d", "word", "2", "-", "-", "-", "-", "unusable"],
        ["e", "word", "1", "16", "50.0", "100.0", "-", "no room"],
    ]
    assert (tmp_path / "s.md").read_text() == text
    generators["c"] |= {"tokens": 20}  # the second tier: pending once the stream screens answers up to 28 tokens
    text = write_report(saved | {"generators": generators, "max_answer_tokens": 28}, tmp_path / "s.md")
    assert "| 2 | c | list | 20 | - | - | - | - | not screened yet | - |" in text
