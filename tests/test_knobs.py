"""training.args: TrainingArguments fields passed through to every training step, validated in the recipe."""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from tiny import tiny_llama
from transformers import AutoTokenizer, Trainer

from peft_isolate import IsolationConfig, training
from peft_isolate.data import Example, TaskData, mix
from peft_isolate.pipeline import Run, run_pipeline
from peft_isolate.recipe import Recipe, load_recipe
from peft_isolate.training import TrainSettings, train


@pytest.fixture
def trainers(monkeypatch) -> list[Trainer]:
    """Every Trainer that peft_isolate.training builds, kept for reading its arguments and state."""
    made = []

    class Kept(training.LabelHeadTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(training, "LabelHeadTrainer", Kept)
    return made


def _logged_lr(trainer: Trainer) -> list[float]:
    return [log["learning_rate"] for log in trainer.state.log_history if "learning_rate" in log]


def _train_tiny(tmp_path, settings: TrainSettings) -> torch.nn.Module:
    """An isolation adapter on the tiny Llama, trained with `settings` on sixteen short items."""
    model, tokenizer = tiny_llama()
    model = get_peft_model(model, IsolationConfig(target_modules="all-linear", density=0.1, seed=0))
    examples = [Example(({"role": "user", "content": f"upper ab{i}"},), "AB") for i in range(16)]
    train(model, tokenizer, examples, settings, tmp_path / "work")
    return model


def _trained_values(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad])


def test_cosine_schedule_with_warmup_and_tensorboard_reach_every_probe(recipe_file, trainers):
    args = ["training.args.lr_scheduler_type=cosine", "training.args.warmup_steps=2", "training.args.logging_steps=1"]
    recipe = load_recipe(recipe_file, [*args, "training.args.report_to=tensorboard"])
    run_pipeline(recipe, until="probe")
    lr, steps = recipe.probe.lr, recipe.probe.steps  # 4 steps: 2 of linear warmup, then half a cosine

    def cosine(s: int) -> float:  # the lr of optimizer step s + 1 (transformers' cosine with warmup)
        return lr * s / 2 if s < 2 else lr * 0.5 * (1 + math.cos(math.pi * (s - 2) / (steps - 2)))

    assert len(trainers) == 2  # one Trainer run per probe, each with its own warmup
    for trainer in trainers:
        assert _logged_lr(trainer) == pytest.approx([cosine(s) for s in range(steps)], rel=1e-6, abs=1e-12)
    for task in recipe.tasks:
        assert list((Path(recipe.output_dir) / "probes" / f"{task}.work").rglob("events.out.tfevents.*")), task


def test_without_args_the_schedule_stays_constant_and_nothing_reports(tmp_path, trainers):
    _train_tiny(tmp_path, TrainSettings(steps=4, lr=1e-2, batch_size=4, max_seq_len=32))
    (trainer,) = trainers
    assert _logged_lr(trainer) == [1e-2] * 4  # logging_steps = max(1, steps // 10)
    assert trainer.args.report_to == [] and trainer.args.warmup_steps == 0
    assert not list(tmp_path.rglob("events.out.tfevents.*"))


def test_activation_checkpointing_is_on_and_trains_the_same_adapter(tmp_path, trainers):
    settings = TrainSettings(steps=3, lr=1e-2, batch_size=4, max_seq_len=32)
    plain = _trained_values(_train_tiny(tmp_path / "plain", settings))
    checkpointed = _train_tiny(
        tmp_path / "ckpt", dataclasses.replace(settings, args={"activation_checkpointing": True})
    )
    assert checkpointed.is_activation_checkpointing and not trainers[0].model.is_activation_checkpointing
    torch.testing.assert_close(_trained_values(checkpointed), plain, rtol=0, atol=1e-6)


def _bnb_8bit(trainer: Trainer, paged: bool) -> bool:
    optimizer = trainer.optimizer.optimizer  # accelerate wraps it
    return (
        type(optimizer).__module__.startswith("bitsandbytes")
        and optimizer.args.optim_bits == 8
        and optimizer.is_paged == paged
    )


@pytest.mark.parametrize(
    ("args", "check"),
    [
        ({"optim": "paged_adamw_8bit"}, lambda t: _bnb_8bit(t, paged=True)),
        ({"optim": "adamw_bnb_8bit"}, lambda t: _bnb_8bit(t, paged=False)),
        ({"bf16": True}, lambda t: t.accelerator.mixed_precision == "bf16"),
    ],
    ids=["paged_adamw_8bit", "adamw_bnb_8bit", "bf16"],
)
@pytest.mark.filterwarnings("ignore:Paged optimizers are not supported on CPU")  # bitsandbytes: unpaged there
def test_optimizer_and_precision_reach_the_trainer(tmp_path, trainers, args, check):
    model = _train_tiny(tmp_path, TrainSettings(steps=2, lr=1e-2, batch_size=4, max_seq_len=32, args=args))
    assert check(trainers[0])
    assert torch.isfinite(_trained_values(model)).all() and _trained_values(model).abs().sum() > 0


TASKS = {"a": {"source": "reasoning_gym:basic_arithmetic"}, "b": {"source": "reasoning_gym:spell_backward"}}


def test_training_section_hash_is_unchanged_without_args_and_covers_them():
    # the hashes before training.args existed: run keys of existing recipes stay valid
    assert Recipe.model_validate({"tasks": TASKS}).section_hash("training") == "d7217add9f1248d7"
    assert Recipe.model_validate({"tasks": TASKS}).section_hash("stages", "training") == "88682ab17aa432f0"
    small = {"batch_size": 4, "max_seq_len": 32, "weight_decay": 0.1}
    assert Recipe.model_validate({"tasks": TASKS, "training": small}).section_hash("training") == "df627b76b84d50b6"
    hashes = {
        Recipe.model_validate({"tasks": TASKS, "training": {"args": args}}).section_hash("training")
        for args in ({}, {"lr_scheduler_type": "cosine"}, {"lr_scheduler_type": "linear"})
    }
    assert len(hashes) == 3


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("training.args.learning_rate=0.1", "learning_rate is set by the pipeline; use probe.lr or stages.lr"),
        ("training.args.per_device_train_batch_size=2", "use training.batch_size"),
        ("training.args.save_total_limit=3", "use training.save_steps"),
        ("training.args.seed=3", "use training.seed"),
        ("training.args.lr_sheduler_type=cosine", "not a transformers.TrainingArguments field (did you mean lr_sch"),
        ("training.args.lr_scheduler_type=cosin", "cosin is not a valid SchedulerType"),
        ("training.batchsize=4", "training.batchsize: unknown key (did you mean batch_size?)"),
        ("stages.step=4", "stages.step: unknown key (did you mean steps?)"),
        ("stages.replay=1", "stages.replay: Input should be less than 1"),  # a stage keeps some of its own data
        ("tasks.upper.sorce=x", "tasks.upper.sorce: unknown key (did you mean source?)"),
    ],
)
def test_recipe_errors_name_the_key_to_use(recipe_file, override, message):
    with pytest.raises(ValueError, match="^" + str(recipe_file)) as e:
        load_recipe(recipe_file, [override])
    assert message in str(e.value)


def test_console_names_a_step_by_its_folder(recipe_file, tmp_path, capsys):
    run = Run(load_recipe(recipe_file, [f"output_dir={tmp_path / 'out'}"]), {}, {})
    artifact = run.out / "stages" / "0"
    run.step("stages:0", "key", artifact, lambda: artifact.mkdir(parents=True))
    assert capsys.readouterr().out == "[peft-isolate] stages/0\n"
    artifact.rmdir()
    run.step("stages:0", "key", artifact, lambda: artifact.mkdir(parents=True))
    assert (
        capsys.readouterr().out
        == f"[peft-isolate] stages/0: {artifact} is missing; redoing it\n[peft-isolate] stages/0\n"
    )


def _items(task: str, n: int) -> list[Example]:
    return [Example(({"role": "user", "content": f"{task} {i}"},), task) for i in range(n)]


def test_stage_replay_draws_its_share_from_earlier_tasks(recipe_file, tmp_path):
    """stages.replay: a stage's examples keep their count, `share` of them the earlier tasks' mixture (rounded);
    without earlier tasks or at share 0 they are exactly the plain mixture."""
    run = Run(load_recipe(recipe_file, [f"output_dir={tmp_path / 'out'}"]), {}, {})
    run.tasks.update({t: TaskData(t, _items(t, 12), [], lambda *_: 0.0) for t in ("a", "b", "c")})
    n = 5 * run.global_batch  # 5 steps of the fixture's batch of 4
    replayed = run.examples(["c"], 5, 1.0, ["a", "b"], 0.3)
    counts = Counter(e.answer for e in replayed)
    assert len(replayed) == n and counts["c"] == n - round(0.3 * n) and counts["a"] + counts["b"] == round(0.3 * n)
    assert abs(counts["a"] - counts["b"]) <= 1  # the replayed share is itself a uniform mixture
    plain = run.examples(["c"], 5)
    assert plain == mix([run.tasks["c"]], n, run.recipe.training.seed)
    assert run.examples(["c"], 5, 1.0, [], 0.3) == plain == run.examples(["c"], 5, 1.0, ["a"], 0.0)


def test_replay_reaches_later_stages_only_and_keys_only_when_set(recipe_file, trainers):
    """A pipeline with stages.replay: stage 0 trains on its group alone, stage 1 on its group plus the share of
    stage 0's task; the stages' hash is unchanged at the default, so runs from before the field keep their steps."""
    recipe = load_recipe(recipe_file, ["stages.replay=0.5", "baselines=[]"])
    run_pipeline(recipe, until="train-stage")
    stages = json.loads((Path(recipe.output_dir) / "plan.json").read_text())["stages"]
    staged = trainers[-2:]  # the two probes' Trainers, then the two stages'
    tokenizer = AutoTokenizer.from_pretrained(recipe.model)
    words = {"upper": "upper", "count": "count a in"}
    for k, trainer in enumerate(staged):
        prompts = tokenizer.batch_decode([row["input_ids"] for row in trainer.train_dataset])
        seen = {t for t, w in words.items() if any(w in p for p in prompts)}
        assert seen == ({stages[0]["tasks"][0]} if k == 0 else set(words)), k
        if k:
            share = sum(words[stages[0]["tasks"][0]] in p for p in prompts) / len(prompts)
            assert share == pytest.approx(0.5, abs=1 / len(prompts))
    assert "replay" not in load_recipe(recipe_file).stages.hashed()  # the default: keys as before the field
    assert recipe.section_hash("stages") != load_recipe(recipe_file).section_hash("stages")
