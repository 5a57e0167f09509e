"""lm-evaluation-harness 0.4 scores a run's held-out items as peft-isolate does (peft_isolate.lm_eval_task)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from peft_isolate import IsolationConfig
from peft_isolate.data import Example, TaskData, exact_match, load_task, prompt_text
from peft_isolate.evaluate import evaluate, extract_answer, generate
from peft_isolate.lm_eval_task import main, score, write_task
from peft_isolate.recipe import load_recipe

pytest.importorskip("lm_eval")
MAX_NEW_TOKENS = 8
ARITHMETIC = {"source": "reasoning_gym:basic_arithmetic", "name": "arithmetic", "train": 4, "eval": 4, "seed": 1}


@pytest.fixture(scope="module")
def saved(tiny_dir, tmp_path_factory) -> Path:
    """A tiny Llama that often says a newline inside its answer (so that answer extraction matters) and an
    isolation adapter of random values on it: saved as base/ and adapter/, and merged/."""
    root = tmp_path_factory.mktemp("lm-eval")
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    swap = tokenizer.encode("\n\x1e", add_special_tokens=False)  # it says "\x1e" a lot: make that a newline
    with torch.no_grad():
        model.lm_head.weight[swap] = model.lm_head.weight[swap[::-1]]
    model.save_pretrained(root / "base")
    model = get_peft_model(model, IsolationConfig(target_modules="all-linear", density=0.2, seed=0))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    model.save_pretrained(root / "adapter")
    model.merge_and_unload().save_pretrained(root / "merged")
    for folder in ("base", "merged"):
        tokenizer.save_pretrained(root / folder)
    return root


def _echo_task(model, tokenizer) -> TaskData:
    """Eight items whose generations hold a newline, every other one answered by the first line of what `model`
    says to it: a score of exactly 0.5 needs lm-eval to prompt, generate and extract exactly as peft-isolate."""
    asks = [Example(({"role": "user", "content": f"upper {a}{b}"},), "") for a in "abcdefgh" for b in "abcdefgh"]
    said = generate(model, tokenizer, [prompt_text(e, tokenizer) for e in asks], MAX_NEW_TOKENS, batch_size=1)
    lines = [(e, s) for e, s in zip(asks, said, strict=True) if "\n" in s.strip()][:8]
    assert len(lines) == 8
    items = [dataclasses.replace(e, answer=extract_answer(s) if i % 2 else "zzz") for i, (e, s) in enumerate(lines)]
    return TaskData("echo", items[:1], items, exact_match)


@pytest.mark.parametrize("kind", ["merged", "adapter"])
def test_lm_eval_scores_equal_peft_isolate_evaluate(saved, tmp_path, kind):
    tokenizer = AutoTokenizer.from_pretrained(saved / "base")
    merged = AutoModelForCausalLM.from_pretrained(saved / "merged", dtype=torch.float32)
    echo, arithmetic = _echo_task(merged, tokenizer), load_task(**ARITHMETIC)
    tasks = tmp_path / "tasks"
    write_task(echo, tokenizer, tasks, MAX_NEW_TOKENS)
    write_task(arithmetic, tokenizer, tasks, MAX_NEW_TOKENS, generator=ARITHMETIC)

    if kind == "merged":  # a plain lm-eval process
        model = merged
        command = [str(Path(sys.executable).parent / "lm_eval"), "--model_args", f"pretrained={saved / 'merged'}"]
    else:  # an unmerged isolation adapter: lm-eval's command line, with peft_isolate imported first
        base = AutoModelForCausalLM.from_pretrained(saved / "base", dtype=torch.float32)
        model = PeftModel.from_pretrained(base, saved / "adapter")
        command = [sys.executable, "-m", "peft_isolate.lm_eval_task", "lm_eval"]
        command += ["--model_args", f"pretrained={saved / 'base'},peft={saved / 'adapter'}"]
    ours = evaluate(model, tokenizer, [echo, arithmetic], MAX_NEW_TOKENS, batch_size=1)
    if kind == "merged":
        echo_items = ours["echo"]["items"]
        assert (ours["echo"]["score"], ours["echo"]["exact"], sum(echo_items)) == (0.5, 0.5, len(echo_items) / 2)

    offline = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "datasets")}
    args = ["--model", "hf", "--include_path", str(tasks), "--tasks", "peft_isolate"]
    args += ["--batch_size", "1", "--device", "cpu", "--output_path", str(tmp_path / "out")]
    done = subprocess.run([*command, *args], cwd=tmp_path, env=os.environ | offline, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    (results,) = (tmp_path / "out").rglob("results_*.json")
    theirs = json.loads(results.read_text())["results"]
    for task, scores in ours.items():
        got = theirs[f"peft_isolate_{task}"]
        assert got["score,extract_answer"] == pytest.approx(scores["score"], abs=1e-12), task
        assert got["exact,extract_answer"] == pytest.approx(scores["exact"], abs=1e-12), task


def test_reasoning_gym_items_are_scored_by_their_generator(tiny_dir, tmp_path):
    task = load_task(**ARITHMETIC)
    for i, example in enumerate(task.eval):
        for prediction in (example.answer, f"{example.answer}0", "nothing"):
            reference = json.dumps({"index": i, "answer": example.answer})
            assert score([reference], [prediction], ARITHMETIC) == task.scorer(prediction, example)
    assert score([reference], [example.answer], ARITHMETIC) == 1.0
    with pytest.raises(ValueError, match="write the lm-eval task again"):
        score([json.dumps({"index": 0, "answer": "not it"})], ["1"], ARITHMETIC)
    with pytest.raises(ValueError, match="its own scorer"):
        write_task(task, AutoTokenizer.from_pretrained(tiny_dir), tmp_path)


def test_write_command_writes_every_recipe_task(recipe_file, tmp_path, capsys):
    main(["write", str(recipe_file), "eval.max_new_tokens=5", "--out", str(tmp_path / "tasks")])
    printed = capsys.readouterr().out
    assert "peft_isolate_upper" in printed and "peft_isolate_count" in printed and "--tasks peft_isolate" in printed
    tokenizer = AutoTokenizer.from_pretrained(yaml.safe_load(recipe_file.read_text())["model"])
    for name in ("upper", "count"):
        config = (tmp_path / "tasks" / f"peft_isolate_{name}.yaml").read_text()
        assert "metric: !function 'utils.score'" in config and "max_gen_toks: 5" in config
        rows = [
            json.loads(line) for line in (tmp_path / "tasks" / f"peft_isolate_{name}.jsonl").read_text().splitlines()
        ]
        spec = load_recipe(recipe_file).tasks[name]
        task = load_task(spec.source, name, eval=spec.eval, seed=spec.seed)
        assert [r["prompt"] for r in rows] == [prompt_text(e, tokenizer) for e in task.eval]
        assert [json.loads(r["target"])["answer"] for r in rows] == [e.answer for e in task.eval]
    assert (tmp_path / "tasks" / "utils.py").is_file()
