"""Task loading (reasoning-gym and files), SFT tokenization with answer-only labels, sampling and mixing."""

from __future__ import annotations

import json

import pytest
from datasets import Dataset, DatasetDict
from tiny import tiny_llama, tiny_tokenizer
from transformers import Trainer, TrainingArguments

from peft_isolate.data import (
    DEFAULT_INSTRUCTION,
    Example,
    SFTCollator,
    TaskData,
    exact_match,
    load_task,
    mix,
    prompt_text,
    sample,
    tokenize_sft,
)

ROWS = [{"prompt": f"What is {i} plus {i}?", "response": str(2 * i)} for i in range(20)]
CHAT_ROWS = [
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": f"Capital number {i}?"},
            {"role": "assistant", "content": f"City {i}"},
        ]
    }
    for i in range(10)
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_reasoning_gym_is_deterministic_and_disjoint():
    a = load_task("reasoning_gym:chain_sum", train=200, eval=50, seed=3)
    b = load_task("reasoning_gym:chain_sum", train=200, eval=50, seed=3)
    c = load_task("reasoning_gym:chain_sum", train=200, eval=50, seed=4)
    assert a.name == "chain_sum" and len(a.train) == 200 and len(a.eval) == 50
    assert [e.messages for e in a.train + a.eval] == [e.messages for e in b.train + b.eval]
    assert [e.prompt for e in a.train] != [e.prompt for e in c.train]
    assert not {e.prompt for e in a.train} & {e.prompt for e in a.eval}
    assert all(e.prompt.endswith("\n" + DEFAULT_INSTRUCTION) for e in a.train + a.eval)
    assert all(a.scorer(e.answer, e) == 1.0 for e in a.eval)
    assert a.eval[0].entry["answer"] == a.eval[0].answer


def test_reasoning_gym_config_system_and_no_instruction():
    task = load_task(
        "reasoning_gym:spell_backward",
        name="spell",
        config={"min_word_len": 3, "max_word_len": 5},
        train=5,
        eval=5,
        system="Be terse.",
        instruction="",
    )
    assert task.name == "spell"
    assert all(3 <= len(e.answer) <= 5 for e in task.train)
    assert task.train[0].messages[0] == {"role": "system", "content": "Be terse."}
    assert DEFAULT_INSTRUCTION not in task.train[0].prompt


def test_reasoning_gym_errors():
    with pytest.raises(ValueError, match="did you mean chain_sum"):
        load_task("reasoning_gym:chain_sm")
    with pytest.raises(ValueError, match="valid keys: .*min_terms"):
        load_task("reasoning_gym:chain_sum", config={"terms": 3})
    with pytest.raises(ValueError, match="eval=0 must be a positive"):
        load_task("reasoning_gym:chain_sum", eval=0)
    with pytest.raises(ValueError, match="not in `config`"):
        load_task("reasoning_gym:chain_sum", config={"seed": 1})
    with pytest.raises(ValueError, match="too few distinct questions"):
        load_task("reasoning_gym:chain_sum", config={"min_terms": 2, "max_terms": 2, "max_digits": 1}, eval=200)


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "disk"])
def test_file_formats_round_trip(tmp_path, fmt):
    path = tmp_path / f"data.{fmt}"
    if fmt == "jsonl":
        write_jsonl(path, ROWS)
    elif fmt == "json":
        path.write_text(json.dumps(ROWS))
    elif fmt == "parquet":
        Dataset.from_list(ROWS).to_parquet(str(path))
    else:
        Dataset.from_list(ROWS).save_to_disk(str(path))
    task = load_task(str(path), seed=0)
    assert task.name == "data" and len(task.train) == 18 and len(task.eval) == 2
    everything = {(e.prompt, e.answer) for e in task.train + task.eval}
    assert everything == {(r["prompt"], r["response"]) for r in ROWS}
    assert task.scorer(" " + task.eval[0].answer + ".", task.eval[0]) == 1.0


def test_held_out_split_is_seeded_and_sized(tmp_path):
    src = write_jsonl(tmp_path / "t.jsonl", ROWS)
    a, b = load_task(src, eval=5, seed=1), load_task(src, eval=5, seed=1)
    assert [e.prompt for e in a.eval] == [e.prompt for e in b.eval]
    assert [e.prompt for e in a.eval] != [e.prompt for e in load_task(src, eval=5, seed=2).eval]
    assert len(a.train) == 15 and not {e.prompt for e in a.train} & {e.prompt for e in a.eval}
    assert len(load_task(src, train=4, eval=5).train) == 4


def test_chat_messages_and_eval_source(tmp_path):
    train = write_jsonl(tmp_path / "chat.jsonl", CHAT_ROWS)
    evals = write_jsonl(tmp_path / "eval.jsonl", ROWS[:3])
    task = load_task(train, name="chat", eval_source=evals)
    assert len(task.train) == 10 and len(task.eval) == 3
    first = task.train[0]
    assert [m["role"] for m in first.messages] == ["system", "user"] and first.answer == "City 0"
    assert task.eval[0] == Example(({"role": "user", "content": ROWS[0]["prompt"]},), ROWS[0]["response"])


def test_dataset_dict_uses_its_test_split(tmp_path):
    DatasetDict({"train": Dataset.from_list(ROWS[:8]), "test": Dataset.from_list(ROWS[8:11])}).save_to_disk(
        str(tmp_path / "dd")
    )
    task = load_task(str(tmp_path / "dd"))
    assert len(task.train) == 8 and [e.answer for e in task.eval] == ["16", "18", "20"]


def test_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_task(str(tmp_path / "missing.jsonl"))
    bad = write_jsonl(tmp_path / "bad.jsonl", [*ROWS[:3], {"question": "q", "answer": "a"}])
    with pytest.raises(ValueError, match=r"bad.jsonl row 3 has keys \['answer', 'question'\]; expected.*prompt"):
        load_task(bad)
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(ValueError, match="row 0: `messages` must"):
        load_task(chat)
    with pytest.raises(ValueError, match="100 train examples but only 19 are available"):
        load_task(write_jsonl(tmp_path / "t.jsonl", ROWS), train=100, eval=1)
    with pytest.raises(ValueError, match="unsupported task file type '.csv'"):
        (tmp_path / "t.csv").write_text("a,b\n")
        load_task(str(tmp_path / "t.csv"))


def test_tokenize_sft_masks_exactly_the_prompt():
    tok = tiny_tokenizer()
    examples = [
        Example(({"role": "user", "content": "Spell cat backward"},), "tac"),
        Example(({"role": "system", "content": "S"}, {"role": "user", "content": "2+2?"}), "4"),
    ]
    ds = tokenize_sft(examples, tok, max_seq_len=256)
    for example, row in zip(examples, ds, strict=True):
        n_prompt = len(tok(prompt_text(example, tok), add_special_tokens=False)["input_ids"])
        labels = row["labels"]
        assert labels[:n_prompt] == [-100] * n_prompt
        assert labels[n_prompt:] == row["input_ids"][n_prompt:]
        assert tok.decode(labels[n_prompt:]) == example.answer + "<|im_end|>\n"
        assert row["attention_mask"] == [1] * len(row["input_ids"])


def test_tokenize_sft_truncation_keeps_the_response():
    tok = tiny_tokenizer()
    example = Example(({"role": "user", "content": "x" * 200},), "the answer")
    row = tokenize_sft([example], tok, max_seq_len=64)[0]
    assert len(row["input_ids"]) == 64
    response = [t for t in row["labels"] if t != -100]
    assert tok.decode(response) == "the answer<|im_end|>\n"
    long = Example(({"role": "user", "content": "q"},), "y" * 100)
    row = tokenize_sft([long], tok, max_seq_len=40)[0]
    assert len(row["input_ids"]) == 40 and sum(t != -100 for t in row["labels"]) == 20


def test_collator_pads_right():
    batch = SFTCollator(pad_token_id=0, pad_to_multiple_of=4)(
        [
            {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [-100, 6, 7]},
            {"input_ids": [5], "attention_mask": [1], "labels": [5]},
        ]
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0], [5, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100], [5, -100, -100, -100]]


def _task(name: str, n: int) -> TaskData:
    return TaskData(
        name, [Example(({"role": "user", "content": f"{name}{i}"},), "a") for i in range(n)], [], exact_match
    )


def test_sample_is_seeded_without_replacement():
    task = _task("t", 50)
    part = sample(task, 0.2, seed=1)
    assert len(part.train) == 10 and len({e.prompt for e in part.train}) == 10
    assert part.train == sample(task, 0.2, seed=1).train != sample(task, 0.2, seed=2).train
    assert len(sample(task, 0.001, seed=0).train) == 1
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        sample(task, 0, seed=0)


def test_mix_gives_equal_shares():
    tasks = [_task("a", 100), _task("b", 3), _task("c", 10)]
    mixed = mix(tasks, 31, seed=0)
    counts = {name: sum(e.prompt.startswith(name) for e in mixed) for name in "abc"}
    assert counts == {"a": 11, "b": 10, "c": 10}
    assert len({e.prompt for e in mixed if e.prompt.startswith("b")}) == 3  # cycled through all of b
    assert [e.prompt for e in mixed] == [e.prompt for e in mix(tasks, 31, seed=0)]


def test_sft_rows_train_with_transformers_trainer(tmp_path):
    model, tok = tiny_llama()
    task = load_task("reasoning_gym:chain_sum", train=8, eval=1)
    args = TrainingArguments(
        tmp_path, max_steps=2, per_device_train_batch_size=4, report_to=[], save_strategy="no", use_cpu=True
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=tokenize_sft(task.train, tok, 128),
        data_collator=SFTCollator(tok.pad_token_id),
    )
    assert trainer.train().training_loss > 0
