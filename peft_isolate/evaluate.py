"""Greedy-generation evaluation, the majority-answer baseline, and the results files (JSON, Markdown, PNG).

Answer extraction is deliberately simple: strip the generation and keep its first line (prompts ask for
only the final answer, so anything after the first line is ignored). reasoning-gym tasks are scored with
their generator's scorer; every task also gets `exact`, the normalised exact match (see data.normalize).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from statistics import mean
from typing import Any

import torch
from matplotlib.figure import Figure
from peft import PeftModel
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from peft_isolate.data import TaskData, exact_match, prompt_text
from peft_isolate.files import save_json, write_atomic

Scores = dict[str, dict[str, float]]  # task -> {"score": x, "exact": y}


def extract_answer(generation: str) -> str:
    """The first line of the stripped generation."""
    return generation.strip().split("\n", 1)[0].strip()


def merged_for_generation(model: PreTrainedModel) -> PreTrainedModel:
    """`model` with its adapter merged into its base, in place, when the base is full precision: generation then
    runs plain layers instead of adding the adapter's work to every token. A quantized base keeps its adapter
    (merging would round the base); a model without an adapter is returned as it is."""
    if isinstance(model, PeftModel) and getattr(model.get_base_model(), "hf_quantizer", None) is None:
        return model.merge_and_unload()
    return model


@torch.inference_mode()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int = 32,
    batch_size: int = 16,
    desc: str = "generate",
) -> list[str]:
    """Greedy completions of already templated prompts, batched by length with left padding."""
    device = next(model.parameters()).device
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    outputs: list[str] = [""] * len(prompts)
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    try:
        for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch"):
            idx = order[start : start + batch_size]
            batch = tokenizer.pad({"input_ids": [encoded[i] for i in idx]}, return_tensors="pt").to(device)
            generated = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
            new_tokens = generated[:, batch["input_ids"].shape[1] :]
            for i, text in zip(idx, tokenizer.batch_decode(new_tokens, skip_special_tokens=True), strict=True):
                outputs[i] = text
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return outputs


def evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: Sequence[TaskData],
    max_new_tokens: int = 32,
    batch_size: int = 16,
) -> Scores:
    """Score the model on each task's eval set: {task: {"score": mean scorer value, "exact": mean EM, "items": the
    score of each eval item, in order (for paired intervals between methods)}}."""
    results: Scores = {}
    for task in tasks:
        if not task.eval:
            raise ValueError(f"task {task.name!r} has no eval examples")
        prompts = [prompt_text(e, tokenizer) for e in task.eval]
        generations = generate(model, tokenizer, prompts, max_new_tokens, batch_size, desc=f"eval {task.name}")
        answers = [extract_answer(g) for g in generations]
        items = [task.scorer(a, e) for a, e in zip(answers, task.eval, strict=True)]
        results[task.name] = {
            "score": mean(items),
            "exact": mean(exact_match(a, e) for a, e in zip(answers, task.eval, strict=True)),
            "items": items,
        }
    return results


def majority_baseline(task: TaskData) -> float:
    """Eval score of always answering the most common training answer (e.g. letter_counting's "1")."""
    if not task.train or not task.eval:
        raise ValueError(f"task {task.name!r} needs train and eval examples for a majority baseline")
    answer = Counter(e.answer for e in task.train).most_common(1)[0][0]
    return mean(task.scorer(answer, e) for e in task.eval)


def method_entry(scores: Scores) -> dict[str, Any]:
    """One method's results.json entry from evaluate()'s output: task scores, their average, exact matches and
    the per-item scores."""
    tasks = {name: s["score"] for name, s in scores.items()}
    return {
        "tasks": tasks,
        "avg": mean(tasks.values()),
        "exact": {name: s["exact"] for name, s in scores.items()},
        "items": {name: s["items"] for name, s in scores.items() if "items" in s},
    }


def probe_lift(results: dict[str, Any]) -> dict[str, float]:
    """Per task, how far its single-task probe scores above the better of the base model and the majority answer:
    a task whose probe does not learn it cannot show a seesaw."""
    methods, majority = results["methods"], results["majority"]
    return {t: s - max(methods["base"]["tasks"][t], majority[t]) for t, s in methods["probe"]["tasks"].items()}


def write_results(out_dir: str | os.PathLike, results: dict[str, Any]) -> dict[str, Path]:
    """Write results.json, results.md and scores.png atomically into `out_dir`; return their paths.

    `results` = {"methods": {id: method_entry(...)}, "majority": {task: x}} plus an optional "meta" dict
    (eval size, seeds, device...) shown under the tables.
    """
    if not results.get("methods"):
        raise ValueError("results need at least one method under 'methods'")
    out = Path(out_dir)
    return {
        "json": save_json(results, out / "results.json"),
        "md": write_atomic(out / "results.md", lambda p: p.write_text(results_markdown(results))),
        "png": plot_scores(results, out / "scores.png"),
    }


def _tasks(results: dict[str, Any]) -> list[str]:
    """Task names in first-seen order over all methods."""
    return list(dict.fromkeys(t for m in results["methods"].values() for t in m["tasks"]))


def results_markdown(results: dict[str, Any]) -> str:
    """Markdown tables (methods x tasks + avg) of scores and of exact match, with the majority baseline."""
    tasks = _tasks(results)

    def table(title: str, key: str, majority: bool) -> list[str]:
        header = "| method | " + " | ".join([*tasks, "avg"]) + " |"
        lines = [f"### {title}", "", header, "|---" * (len(tasks) + 2) + "|"]
        rows = {mid: m[key] for mid, m in results["methods"].items()}
        if majority and results.get("majority"):
            rows["majority answer"] = results["majority"]
        for mid, scores in rows.items():
            cells = [f"{scores[t]:.2f}" if t in scores else "-" for t in tasks]
            avg = f"{mean(scores[t] for t in tasks if t in scores):.2f}" if scores else "-"
            lines.append(f"| {mid} | " + " | ".join([*cells, avg]) + " |")
        return [*lines, ""]

    lines = [
        "# Results",
        "",
        *table("Score (task scorer)", "tasks", True),
        *table("Exact match", "exact", False),
    ]
    for key, value in (results.get("meta") or {}).items():
        if isinstance(value, dict):
            value = ", ".join(f"{k} {_inline(v)}" for k, v in value.items())
        lines += [f"- {key}: {value}"]
    return "\n".join(lines) + "\n"


def _inline(value: Any) -> str:
    """A nested meta value on one line: `{a: 1, b: 2}` as `(a 1, b 2)`."""
    if isinstance(value, dict):
        return "(" + ", ".join(f"{k} {v}" for k, v in value.items()) + ")"
    return str(value)


def plot_scores(results: dict[str, Any], path: str | os.PathLike) -> Path:
    """Grouped bar chart of each method's task scores and average, majority baseline as dashed marks."""
    tasks = _tasks(results)
    groups = [*tasks, "avg"]
    methods = results["methods"]
    fig = Figure(figsize=(max(6.0, 1.2 * len(groups) * max(1, len(methods)) / 2), 4))
    ax = fig.subplots()
    width = 0.8 / len(methods)
    for k, (mid, m) in enumerate(methods.items()):
        values = [m["tasks"].get(t, 0.0) for t in tasks] + [m["avg"]]
        ax.bar([g + (k - (len(methods) - 1) / 2) * width for g in range(len(groups))], values, width, label=mid)
    majority = {t: results.get("majority", {})[t] for t in tasks if t in results.get("majority", {})}
    for n, (task, value) in enumerate(majority.items()):
        g = tasks.index(task)
        label = "majority answer" if n == 0 else None
        ax.hlines(value, g - 0.4, g + 0.4, colors="black", linestyles="dashed", label=label)
    ax.set_xticks(range(len(groups)), groups, rotation=20, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("score")
    if results.get("meta"):
        ax.set_title(" · ".join(f"{k}: {v}" for k, v in results["meta"].items()), fontsize="small")
    ax.legend(fontsize="small", ncol=2)
    fig.tight_layout()
    return write_atomic(path, lambda p: fig.savefig(p, format="png", dpi=120))
