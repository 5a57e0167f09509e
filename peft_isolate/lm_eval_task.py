"""A run's held-out items as an lm-evaluation-harness (0.4) task, scored as `peft-isolate evaluate` scores them.

    python -m peft_isolate.lm_eval_task write RECIPE --out tasks/
    lm_eval --model hf --model_args pretrained=MERGED_DIR --include_path tasks/ --tasks peft_isolate --batch_size 1
    python -m peft_isolate.lm_eval_task lm_eval --model hf --model_args pretrained=BASE,peft=runs/x/final ...

Each task is a YAML file and a JSONL file of its eval items. The prompt is already rendered by the model's chat
template (`data.prompt_text`), so pass no `--apply_chat_template`; generation is greedy to the end of the turn;
a `custom` filter extracts the answer (`evaluate.extract_answer`) and `!function` metrics score it: `score` with
the task's scorer (a reasoning-gym generator's own, its items regenerated from the task's spec, or normalised exact
match for file tasks) and `exact`. A plain lm-eval process does not know the ISOLATION PEFT method, so an
unmerged isolation adapter goes through the `lm_eval` subcommand, which imports peft_isolate first.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from .data import Example, TaskData, exact_match, load_task, prompt_text
from .evaluate import extract_answer
from .files import write_atomic
from .models import FALLBACK_CHAT_TEMPLATE, resolve_model
from .recipe import RG_PREFIX, Recipe, load_recipe

TAG = "peft_isolate"  # `--tasks peft_isolate` runs every task written into one folder
HOOKS = (
    '"""lm-eval hooks of the peft-isolate tasks in this folder (written by peft_isolate.lm_eval_task)."""\n\n'
    "from peft_isolate.lm_eval_task import exact, extract, score  # noqa: F401\n"
)


def extract(resps: list[list[str]], docs: list[dict]) -> list[list[str]]:
    """lm-eval filter: each generation's answer, as `peft-isolate evaluate` extracts it."""
    return [[extract_answer(r) for r in rs] for rs in resps]


def score(references: list[str], predictions: list[str], task: dict[str, Any] | None = None) -> float:
    """lm-eval metric: the task's scorer on one item. `task` holds the `load_task` arguments that regenerate a
    reasoning-gym task, whose scorer needs the generator's entry; without it the score is normalised exact match."""
    item = json.loads(references[0])
    if task is None:
        return exact_match(predictions[0], Example((), item["answer"]))
    data = _generated(json.dumps(task, sort_keys=True))
    example = data.eval[item["index"]]
    if example.answer != item["answer"]:
        raise ValueError(
            f"{task['source']} regenerated item {item['index']} with answer {example.answer!r}, not "
            f"{item['answer']!r}: write the lm-eval task again with this reasoning-gym version"
        )
    return data.scorer(predictions[0], example)


def exact(references: list[str], predictions: list[str]) -> float:
    """lm-eval metric: normalised exact match with the reference answer (`exact` in results.json)."""
    return exact_match(predictions[0], Example((), json.loads(references[0])["answer"]))


@functools.cache
def _generated(task: str) -> TaskData:
    """A reasoning-gym task regenerated from its `load_task` arguments (JSON), once per process."""
    return load_task(**json.loads(task))


class _Dumper(yaml.SafeDumper):
    """YAML with lm-eval's `!function module.name` tag."""


class _Function(str):
    """A `!function` reference in a task YAML."""


_Dumper.add_representer(_Function, lambda dumper, ref: dumper.represent_scalar("!function", ref))


def write_task(
    task: TaskData,
    tokenizer: PreTrainedTokenizerBase,
    out: str | os.PathLike,
    max_new_tokens: int = 32,
    generator: dict[str, Any] | None = None,
) -> str:
    """Write `task`'s eval items as the lm-eval task `peft_isolate_<name>` into the folder `out`; returns its name.

    `generator`: the `load_task` arguments of a reasoning-gym task, from which lm-eval's process regenerates the
    items for their scorer. Without it the task must be scored by exact match (file tasks)."""
    if generator is None and task.scorer is not exact_match:
        raise ValueError(f"task {task.name!r} has its own scorer: give the `load_task` arguments that regenerate it")
    out, name = Path(out), f"{TAG}_{task.name}"
    rows = [
        {"prompt": prompt_text(e, tokenizer), "target": json.dumps({"index": i, "answer": e.answer})}
        for i, e in enumerate(task.eval)
    ]
    items = write_atomic(out / f"{name}.jsonl", lambda p: p.write_text("".join(json.dumps(r) + "\n" for r in rows)))
    config = {
        "task": name,
        "tag": [TAG],
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(items.resolve())}},
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_text": "prompt",
        "doc_to_target": "target",
        # no stop string: lm-eval adds the end of turn, where `peft-isolate evaluate` stops too (a newline would cut
        # the answer that follows a leading blank line, which extract_answer skips)
        "generation_kwargs": {"until": [], "do_sample": False, "max_gen_toks": max_new_tokens},
        "filter_list": [
            {
                "name": "extract_answer",
                "filter": [{"function": "custom", "filter_fn": _Function("utils.extract")}, {"function": "take_first"}],
            }
        ],
        "metric_list": [
            {"metric": _Function("utils.score"), "aggregation": "mean", "higher_is_better": True}
            | ({"task": generator} if generator else {}),
            {"metric": _Function("utils.exact"), "aggregation": "mean", "higher_is_better": True},
        ],
        "metadata": {"version": 1},
    }
    text = yaml.dump(config, Dumper=_Dumper, sort_keys=False)
    write_atomic(out / f"{name}.yaml", lambda p: p.write_text(text))
    write_atomic(out / "utils.py", lambda p: p.write_text(HOOKS))
    return name


def write_tasks(recipe: Recipe, out: str | os.PathLike) -> list[str]:
    """Every task of the recipe, with the eval items its run scores (`eval.items` included) and the prompts its
    model's chat template renders, as lm-eval tasks in the folder `out`; returns their names."""
    path = resolve_model(recipe.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = tokenizer.chat_template or FALLBACK_CHAT_TEMPLATE  # as models.load_model does
    names = []
    for name, spec in recipe.tasks.items():
        args = {
            "source": spec.source,
            "name": name,
            "config": spec.config,
            "train": spec.train,
            "eval": recipe.eval.items or spec.eval,
            "seed": spec.seed,
        }
        task = load_task(**args, eval_source=spec.eval_source)
        generator = args if spec.source.startswith(RG_PREFIX) else None
        names.append(write_task(task, tokenizer, out, recipe.eval.max_new_tokens, generator))
    return names


def main(argv: Sequence[str] | None = None) -> None:
    """`write RECIPE --out DIR`: the recipe's tasks for lm-eval; `lm_eval ARGS...`: lm-eval's own command line, in a
    process that knows the ISOLATION PEFT method (for `--model_args pretrained=BASE,peft=ADAPTER`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["lm_eval"]:  # importing this module imported peft_isolate, which registers ISOLATION
        from lm_eval.__main__ import cli_evaluate

        sys.argv = ["lm_eval", *argv[1:]]
        cli_evaluate()
        return
    parser = argparse.ArgumentParser(prog="python -m peft_isolate.lm_eval_task", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    write = commands.add_parser("write", help="write the recipe's held-out items as lm-eval tasks")
    write.add_argument("recipe", help="the run's recipe (YAML)")
    write.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides, as for peft-isolate run")
    write.add_argument("--out", required=True, help="the folder to pass lm-eval as --include_path")
    commands.add_parser("lm_eval", help="lm-eval's command line with peft_isolate imported first", add_help=False)
    args = parser.parse_args(argv)
    names = write_tasks(load_recipe(args.recipe, args.overrides), args.out)
    print(f"wrote {', '.join(names)} into {args.out}: lm_eval --include_path {args.out} --tasks {TAG} ...")


if __name__ == "__main__":
    main()
