"""Generation, scoring, the majority baseline and the results files, on the tiny random Llama."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel, get_peft_model
from tiny import tiny_llama

from peft_isolate import IsolationConfig
from peft_isolate import evaluate as ev
from peft_isolate.data import Example, TaskData, exact_match, load_task, normalize, prompt_text
from peft_isolate.evaluate import (
    evaluate,
    extract_answer,
    generate,
    majority_baseline,
    merged_for_generation,
    method_entry,
    write_results,
)


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama(seed=0)


def ex(prompt: str, answer: str) -> Example:
    return Example(({"role": "user", "content": prompt},), answer)


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        ("Paris.", "paris", True),
        ("  42 ", "42", True),
        ("New   York!", "new york", True),
        ("3.5", "3.5", True),
        ("-4", "4", False),
        ("tac", "cat", False),
    ],
)
def test_exact_match_normalisation(a, b, same):
    assert (normalize(a) == normalize(b)) is same
    assert exact_match(a, ex("q", b)) == float(same)


def test_extract_answer_takes_the_first_line():
    assert extract_answer("\n  42 \nbecause 6*7") == "42"
    assert extract_answer("") == ""


def test_generation_batched_equals_unbatched_and_restores_state(tiny):
    model, tok = tiny
    prompts = [prompt_text(ex("a" * n, ""), tok) for n in (1, 7, 30, 3, 12)]
    model.train()
    one = generate(model, tok, prompts, max_new_tokens=6, batch_size=1)
    many = generate(model, tok, prompts, max_new_tokens=6, batch_size=4)
    assert one == many and all(isinstance(s, str) for s in one)
    assert model.training and tok.padding_side == "right"


@pytest.mark.parametrize("kind", ["fp32", "nf4"])
def test_an_adapter_is_merged_for_generation_only_over_a_full_precision_base(load_tiny, kind):
    model = get_peft_model(load_tiny(kind), IsolationConfig(target_modules=["q_proj", "up_proj"], density=0.2))
    for param in model.parameters():
        if param.requires_grad:
            torch.nn.init.normal_(param, std=0.5)  # an adapter that changes the output
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
    merged = merged_for_generation(model)
    assert isinstance(merged, PeftModel) == (kind == "nf4")  # merging would round a 4-bit base
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted, rtol=1e-5, atol=1e-5)
    base = load_tiny()
    assert merged_for_generation(base) is base


def test_evaluate_scores_each_task_on_its_own_items(tiny, tmp_path, monkeypatch):
    """Two tasks in one call: each is scored on its own held-out items only (3 of 4 right is 0.75, 1 of 6 right is
    1/6), whatever the real model would generate."""
    model, tok = tiny
    rows = [{"prompt": f"{i}+{i}?", "response": str(2 * i)} for i in range(12)]
    (tmp_path / "add.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = [
        load_task("reasoning_gym:spell_backward", train=10, eval=6, seed=0),
        load_task(str(tmp_path / "add.jsonl"), eval=4),
    ]
    right = {prompt_text(e, tok): e.answer for e in tasks[0].eval[:1] + tasks[1].eval[:3]}
    monkeypatch.setattr(ev, "generate", lambda model, tokenizer, prompts, *a, **k: [right.get(p, "x") for p in prompts])
    scores = evaluate(model, tok, tasks, max_new_tokens=4, batch_size=4)
    assert scores["add"] == {"score": 0.75, "exact": 0.75, "items": [1.0, 1.0, 1.0, 0.0]}  # in eval order
    assert scores["spell_backward"]["exact"] == pytest.approx(1 / 6)
    assert scores["spell_backward"]["items"][0] == 1.0 and len(scores["spell_backward"]["items"]) == 6


def test_evaluate_scores_with_the_task_scorer(tiny, monkeypatch):
    model, tok = tiny
    task = load_task("reasoning_gym:spell_backward", train=5, eval=4, seed=0)
    by_prompt = {prompt_text(e, tok): e.answer for e in task.eval}
    first = prompt_text(task.eval[0], tok)

    def fake_generate(model, tokenizer, prompts, *args, **kwargs):
        """Right answers followed by chatter on a second line; the first one reversed (partial credit)."""
        return [by_prompt[p][::-1] if p == first else by_prompt[p] + "\nDone." for p in prompts]

    monkeypatch.setattr(ev, "generate", fake_generate)
    score = evaluate(model, tok, [task])["spell_backward"]
    assert score["exact"] == 0.75
    assert 0.75 <= score["score"] < 1.0


def test_majority_baseline_on_a_hand_made_task():
    train = [ex("q", a) for a in ["1", "1", "2", "1", "3"]]
    evals = [ex("q", a) for a in ["1", "2", "1", "1."]]
    assert majority_baseline(TaskData("count", train, evals, exact_match)) == 0.75


def test_results_files_are_written_and_parse(tmp_path):
    results = {
        "methods": {
            "base": method_entry({"a": {"score": 0.0, "exact": 0.0}, "b": {"score": 0.5, "exact": 0.25}}),
            "cpi_ft": method_entry({"a": {"score": 0.4, "exact": 0.4}, "b": {"score": 0.7, "exact": 0.5}}),
        },
        "majority": {"a": 0.64, "b": 0.01},
        "meta": {"eval items": 32, "seeds": 1, "device": "cpu"},
    }
    paths = write_results(tmp_path / "run", results)
    assert json.loads(paths["json"].read_text()) == results
    assert results["methods"]["cpi_ft"]["avg"] == pytest.approx(0.55)
    md = paths["md"].read_text()
    assert "| method | a | b | avg |" in md and "| cpi_ft | 0.40 | 0.70 | 0.55 |" in md
    assert "| majority answer | 0.64 | 0.01 | 0.33 |" in md and "| base | 0.00 | 0.25 | 0.12 |" in md
    assert "device: cpu" in md
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "results.json",
        "results.md",
        "scores.png",
    ]
    with pytest.raises(ValueError, match="at least one method"):
        write_results(tmp_path, {"methods": {}})
