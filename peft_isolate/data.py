"""Task data: reasoning-gym generators and chat/prompt-response files, SFT tokenization, mixing and sampling.

A task is `TaskData(name, train, eval, scorer)`. Sources:

- `reasoning_gym:<generator>` (+ `config`): generated offline. Train items are the generator's indices
  `0..train-1` and eval items come after them (reasoning-gym seeds item i with `seed + i`, so the two never
  share a seed); eval items whose question also occurs in train are skipped. Scored by the generator's scorer.
- a `.jsonl`/`.json`/`.parquet` file or a `datasets.save_to_disk` directory whose rows are either
  `{"prompt", "response"}` (optional `"system"`) or `{"messages": [...]}` ending with the assistant's turn.
  Scored by normalised exact match.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import random
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, DatasetDict, load_from_disk
from transformers import PreTrainedTokenizerBase

from .recipe import RG_PREFIX

DEFAULT_INSTRUCTION = "Answer with only the final answer."
HELD_OUT_FRACTION = 0.1


@dataclass(frozen=True)
class Example:
    """One item: the prompt conversation (ending with a user turn), the reference answer, the scoring entry.

    Args:
        messages: chat messages before the answer (optional system turn, earlier turns, the final user turn).
        answer: the reference answer; for SFT it is the assistant's response.
        entry: the reasoning-gym entry its generator's scorer needs; None for file tasks.
    """

    messages: tuple[dict[str, str], ...]
    answer: str
    entry: dict[str, Any] | None = None

    @property
    def prompt(self) -> str:
        """The final user turn's text."""
        return self.messages[-1]["content"]


Scorer = Callable[[str, Example], float]


@dataclass(frozen=True)
class TaskData:
    """A task's train and eval examples and its scorer (prediction, example) -> score in [0, 1]."""

    name: str
    train: list[Example]
    eval: list[Example]
    scorer: Scorer


def normalize(text: str) -> str:
    """Lowercase, collapse whitespace and drop trailing punctuation, so "Paris." matches "paris"."""
    return " ".join(text.lower().split()).rstrip(string.punctuation + " ")


def exact_match(prediction: str, example: Example) -> float:
    """1.0 if the normalised prediction equals the normalised reference answer, else 0.0."""
    return float(normalize(prediction) == normalize(example.answer))


def load_task(
    source: str,
    name: str | None = None,
    *,
    config: dict[str, Any] | None = None,
    train: int | None = None,
    eval: int | None = None,
    seed: int = 0,
    eval_source: str | None = None,
    system: str | None = None,
    instruction: str | None = None,
) -> TaskData:
    """Load or generate one task's train and eval examples.

    `train`/`eval` are item counts (reasoning-gym defaults: 1000/200; files: all rows, and an eval split of
    10% held out deterministically by `seed` unless `eval_source` is given). `instruction` is appended to
    every prompt: None means the source's default (reasoning-gym: DEFAULT_INSTRUCTION; files: none) and ""
    means none. `system` adds a system turn to prompts that have none.
    """
    for what, n in (("train", train), ("eval", eval)):
        if n is not None and n < 1:
            raise ValueError(f"{source}: {what}={n} must be a positive number of examples (or unset)")
    if source.startswith(RG_PREFIX):
        if eval_source is not None:
            raise ValueError(f"{source}: eval_source is only for file tasks; reasoning-gym generates eval items")
        generator = source[len(RG_PREFIX) :]
        instruction = DEFAULT_INSTRUCTION if instruction is None else instruction
        train_ex, eval_ex, scorer = _reasoning_gym(
            generator, config or {}, 1000 if train is None else train, 200 if eval is None else eval, seed
        )
        task_name = name or generator
    else:
        if config:
            raise ValueError(f"{source}: `config` is only for reasoning_gym:<name> sources; remove it")
        train_ex, eval_ex = _file_task(source, train, eval, seed, eval_source)
        scorer = exact_match
        task_name = name or Path(source).stem
    train_ex = [_decorate(e, system, instruction) for e in train_ex]
    eval_ex = [_decorate(e, system, instruction) for e in eval_ex]
    return TaskData(task_name, train_ex, eval_ex, scorer)


def _decorate(example: Example, system: str | None, instruction: str | None) -> Example:
    """Add the system turn and append the instruction to the final user turn."""
    messages = list(example.messages)
    if instruction:
        messages[-1] = {**messages[-1], "content": f"{messages[-1]['content'].rstrip()}\n{instruction}"}
    if system and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    return dataclasses.replace(example, messages=tuple(messages))


def _reasoning_gym(
    generator: str, config: dict[str, Any], n_train: int, n_eval: int, seed: int
) -> tuple[list[Example], list[Example], Scorer]:
    """Generate train items 0..n_train-1 and eval items after them whose question is not in train."""
    import reasoning_gym
    from reasoning_gym.factory import DATASETS

    if generator not in DATASETS:
        close = difflib.get_close_matches(generator, DATASETS, n=5)
        hint = f"did you mean {', '.join(close)}?" if close else f"available: {', '.join(sorted(DATASETS))}"
        raise ValueError(f"unknown reasoning-gym generator {generator!r}; {hint}")
    reserved = {"seed", "size"} & set(config)
    if reserved:
        raise ValueError(f"reasoning_gym:{generator}: set {sorted(reserved)} on the task, not in `config`")
    pool = n_train + 10 * n_eval + 100  # items are generated lazily, so a generous pool costs nothing
    try:
        dataset = reasoning_gym.create_dataset(generator, size=pool, seed=seed, **config)
    except TypeError as e:
        fields = [f.name for f in dataclasses.fields(DATASETS[generator][1])]
        valid = ", ".join(f for f in fields if f not in ("seed", "size"))
        raise ValueError(f"bad config for reasoning_gym:{generator} ({e}); valid keys: {valid}") from e
    except AssertionError as e:
        reason = e or "a value is out of range"
        raise ValueError(f"invalid config for reasoning_gym:{generator}: {reason}") from e

    def example(i: int) -> Example:
        entry = dataset[i]
        return Example(({"role": "user", "content": entry["question"]},), str(entry["answer"]), entry)

    train = [example(i) for i in range(n_train)]
    seen = {e.prompt for e in train}
    evals: list[Example] = []
    for i in range(n_train, pool):
        if len(evals) == n_eval:
            break
        candidate = example(i)
        if candidate.prompt not in seen:
            evals.append(candidate)
    if len(evals) < n_eval:
        raise ValueError(
            f"reasoning_gym:{generator} gave only {len(evals)} eval questions unseen in train out of {pool}; "
            "its config allows too few distinct questions: widen it or lower eval"
        )
    return train, evals, lambda prediction, ex: float(dataset.score_answer(prediction, ex.entry))


def _file_task(
    source: str, n_train: int | None, n_eval: int | None, seed: int, eval_source: str | None
) -> tuple[list[Example], list[Example]]:
    """Read train (and eval) rows from files, holding out a seeded eval split when no eval file is given."""
    rows, split_eval = _read_rows(source)
    examples = [_row_to_example(row, i, source) for i, row in enumerate(rows)]
    if eval_source is not None:
        eval_rows, _ = _read_rows(eval_source)
        evals = [_row_to_example(row, i, eval_source) for i, row in enumerate(eval_rows)]
    elif split_eval is not None:
        evals = [_row_to_example(row, i, f"{source} (eval split)") for i, row in enumerate(split_eval)]
    else:
        order = list(range(len(examples)))
        random.Random(seed).shuffle(order)
        n_held = n_eval if n_eval is not None else max(1, round(HELD_OUT_FRACTION * len(examples)))
        if n_held >= len(examples):
            raise ValueError(f"{source} has {len(examples)} rows: too few to hold out {n_held} for eval")
        held = set(order[:n_held])
        evals = [examples[i] for i in sorted(held)]
        examples = [e for i, e in enumerate(examples) if i not in held]
    for what, items, n in (("train", examples, n_train), ("eval", evals, n_eval)):
        if n is not None and n > len(items):
            raise ValueError(f"{source}: asked for {n} {what} examples but only {len(items)} are available")
    return examples[:n_train], evals[:n_eval]


def _read_rows(source: str) -> tuple[list[dict], list[dict] | None]:
    """Rows of a JSONL/JSON/parquet file or a saved `datasets` dir, plus its test split if it has one."""
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"task file {source} does not exist")
    if path.is_dir():
        data = load_from_disk(str(path))
        if isinstance(data, DatasetDict):
            if "train" not in data:
                raise ValueError(f"{source} is a DatasetDict without a 'train' split (splits: {list(data)})")
            test = next((data[s] for s in ("test", "validation", "eval") if s in data), None)
            return data["train"].to_list(), test.to_list() if test is not None else None
        return data.to_list(), None
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{source} line {lineno} is not valid JSON: {e}") from e
        return rows, None
    if suffix == ".json":
        try:
            rows = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{source} is not valid JSON: {e}") from e
        if not isinstance(rows, list):
            raise ValueError(f"{source} must hold a JSON list of rows, got {type(rows).__name__}")
        return rows, None
    if suffix == ".parquet":
        return Dataset.from_parquet(str(path)).to_list(), None
    raise ValueError(f"{source}: unsupported task file type {suffix!r}; use .jsonl, .json, .parquet or a datasets dir")


def _row_to_example(row: Any, index: int, source: str) -> Example:
    """Check one row's format and turn it into an Example."""
    where = f"{source} row {index}"
    expected = 'expected {"prompt": str, "response": str} (optional "system") or {"messages": [...]}'
    if not isinstance(row, dict):
        raise ValueError(f"{where} is a {type(row).__name__}, not an object; {expected}")
    if "messages" in row:
        msgs = row["messages"]
        ok = isinstance(msgs, list) and len(msgs) >= 2
        ok = ok and all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in msgs)
        if not ok or msgs[-1]["role"] != "assistant" or msgs[-2]["role"] != "user":
            raise ValueError(
                f"{where}: `messages` must be a list of {{role, content}} turns ending with a user turn "
                "followed by the assistant's answer"
            )
        turns = tuple({"role": str(m["role"]), "content": str(m["content"])} for m in msgs[:-1])
        return Example(turns, str(msgs[-1]["content"]))
    if isinstance(row.get("prompt"), str) and isinstance(row.get("response"), str):
        turns = ({"role": "user", "content": row["prompt"]},)
        if row.get("system"):
            turns = ({"role": "system", "content": str(row["system"])}, *turns)
        return Example(turns, row["response"])
    raise ValueError(f"{where} has keys {sorted(row)}; {expected}")


def prompt_text(example: Example, tokenizer: PreTrainedTokenizerBase) -> str:
    """The example's prompt rendered by the tokenizer's chat template, ending where the answer starts."""
    if tokenizer.chat_template is None:
        raise ValueError("the tokenizer has no chat template: load it with peft_isolate.models.load_model")
    return tokenizer.apply_chat_template(list(example.messages), tokenize=False, add_generation_prompt=True)


def _response_text(example: Example, tokenizer: PreTrainedTokenizerBase, prompt: str) -> str:
    """The chat template's text after the prompt: the answer plus the end-of-turn tokens."""
    full = tokenizer.apply_chat_template(
        [*example.messages, {"role": "assistant", "content": example.answer}], tokenize=False
    )
    if full.startswith(prompt):
        return full[len(prompt) :]
    return example.answer + (tokenizer.eos_token or "")  # templates that rewrite earlier turns


def tokenize_sft(examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase, max_seq_len: int) -> Dataset:
    """Tokenize for answer-only SFT: labels are -100 on prompt tokens, the response tokens elsewhere.

    Prompt and response are tokenized separately (so the prompt tokens match generation time). Too long
    pairs keep the response, right-truncated only if it exceeds the larger of half the window and what the
    prompt leaves; the prompt loses its beginning.
    """
    if max_seq_len < 2:
        raise ValueError(f"max_seq_len must be at least 2, got {max_seq_len}")
    rows: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
    for example in examples:
        prompt = prompt_text(example, tokenizer)
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        r = tokenizer(_response_text(example, tokenizer, prompt), add_special_tokens=False)["input_ids"]
        if len(p) + len(r) > max_seq_len:
            r = r[: min(len(r), max(max_seq_len - len(p), max_seq_len // 2))]
            p = p[len(p) - (max_seq_len - len(r)) :]
        rows["input_ids"].append(p + r)
        rows["attention_mask"].append([1] * (len(p) + len(r)))
        rows["labels"].append([-100] * len(p) + r)
    return Dataset.from_dict(rows)


@dataclass
class SFTCollator:
    """Right-pads a batch of tokenize_sft rows: pad id in input_ids, 0 in attention_mask, -100 in labels."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        """Pad every field to the batch's longest row and stack into tensors."""
        length = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            length = math.ceil(length / self.pad_to_multiple_of) * self.pad_to_multiple_of
        pads = {"input_ids": self.pad_token_id, "attention_mask": 0, "labels": -100}
        return {
            key: torch.tensor([list(f[key]) + [pad] * (length - len(f[key])) for f in features])
            for key, pad in pads.items()
        }


def sample(task: TaskData, fraction: float, seed: int) -> TaskData:
    """The task with a seeded random `fraction` of its training examples (at least one), for a stage."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    k = max(1, round(fraction * len(task.train)))
    picked = sorted(random.Random(seed).sample(range(len(task.train)), k))
    return dataclasses.replace(task, train=[task.train[i] for i in picked])


def mix(tasks: Sequence[TaskData], n: int, seed: int) -> list[Example]:
    """`n` shuffled training examples, an equal share from each task (remainder to the first tasks).

    Within a task, examples are drawn without replacement, cycling through fresh permutations if a share
    exceeds the task's training set.
    """
    if not tasks:
        raise ValueError("mix needs at least one task")
    rng = random.Random(seed)
    out: list[Example] = []
    for i, task in enumerate(tasks):
        if not task.train:
            raise ValueError(f"task {task.name!r} has no training examples to mix")
        share = n // len(tasks) + (i < n % len(tasks))
        while share > 0:
            order = rng.sample(range(len(task.train)), len(task.train))[:share]
            out.extend(task.train[j] for j in order)
            share -= len(order)
    rng.shuffle(out)
    return out
