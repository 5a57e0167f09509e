"""The recipe: one YAML file that says what a CPI-FT run does, validated with errors that name the bad key."""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, get_args, get_origin

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from transformers import TrainingArguments

from .models import QUANTIZATIONS
from .plan import FREEZES, ORDERS
from .regions import BLOCK_SIZES, GRANULARITIES
from .selection import SCOPES

TASK_NAME = re.compile(r"[A-Za-z0-9_-]+")  # task names become file names
RG_PREFIX = "reasoning_gym:"  # a task source naming a reasoning-gym generator
SEED_MAX = 2**32 - 1  # numpy's and reasoning-gym's generators take seeds in [0, 2**32)
MAX_STEPS = 10_000_000  # optimizer steps of one training step: beyond this a typo, not a plan (months of GPU)
MAX_ITEMS = 10_000_000  # examples generated or scored per task
MAX_RECIPE_BYTES = 1 << 20


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    # fields added after runs existed: left out of the section's hash while at their default, so that the keys of
    # those runs' steps stay valid
    added: ClassVar[tuple[str, ...]] = ()

    def hashed(self) -> dict[str, Any]:
        """The section as its steps' keys see it."""
        fields = type(self).model_fields
        return {
            k: v
            for k, v in self.model_dump(mode="json").items()
            if not (k in self.added and getattr(self, k) == fields[k].default)
        }


class _Budget(_Section):
    """A training budget given as optimizer `steps` or as `epochs` over the data (not both)."""

    @model_validator(mode="after")
    def _one_budget(self) -> _Budget:
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give steps or epochs, not both")
        return self

    def budget(self, examples: int, global_batch: int) -> int:
        """Optimizer steps: `steps`, or enough for `epochs` passes over `examples`, or 50."""
        if self.epochs is None:
            return self.steps or 50
        steps = self.epochs * examples / global_batch
        if not steps <= MAX_STEPS:
            raise ValueError(
                f"epochs: {self.epochs} over {examples} examples is {steps:.3g} optimizer steps, over the ceiling of "
                f"{MAX_STEPS:,}: lower epochs"
            )
        return max(1, math.ceil(steps))


class TaskSpec(_Section):
    """One task: where its data comes from and how much of it."""

    source: str = Field(description="'reasoning_gym:<name>', a JSONL/JSON/parquet file or a save_to_disk dir")
    eval_source: str | None = Field(None, description="held-out file; else a part of `source` is held out")
    config: dict[str, Any] = Field(default_factory=dict, description="generator settings (reasoning_gym)")
    train: int | None = Field(
        None, gt=0, le=MAX_ITEMS, description="training examples (default: reasoning_gym 1000, files all)"
    )
    eval: int | None = Field(
        None, gt=0, le=MAX_ITEMS, description="eval examples (default: reasoning_gym 200, files 10%)"
    )
    seed: int = Field(1, ge=0, le=SEED_MAX, description="generator seed")


class ProbeSpec(_Budget):
    """Step 1: the short single-task fine-tune whose update marks the task's core."""

    method: Literal["lora", "full", "sparse"] | None = Field(
        None, description="how each task's update is probed (default: lora in adapter mode, full in dense mode)"
    )
    steps: int | None = Field(
        None, gt=0, le=MAX_STEPS, description="optimizer steps per probe (default 50 unless epochs)"
    )
    epochs: float | None = Field(None, gt=0, description="passes over the task's data, instead of steps")
    lr: float = Field(2e-4, gt=0, description="probe learning rate")
    rank: int = Field(16, gt=0, description="LoRA rank of a lora probe")
    density: float = Field(0.05, gt=0, le=1, description="support density of a sparse probe")


class RegionSpec(_Section):
    """Step 1: how many entries a core holds and over what the top-p is taken."""

    added: ClassVar[tuple[str, ...]] = ("mass", "granularity", "block")
    p: Annotated[float, Field(gt=0, le=1)] | Literal["auto"] = Field(
        0.01,
        description="fraction of the entries in each task's core; 'auto': chosen from the probes (see `mass`)",
    )
    mass: float = Field(
        0.25, gt=0, lt=1, description="with p: auto, the share of every probe's squared update its core must hold"
    )
    scope: Literal[SCOPES] = Field("global", description="where the top-p is taken")
    granularity: Literal[GRANULARITIES] = Field(
        "element", description="what a core takes whole: entries, or rows, columns or blocks of each weight"
    )
    block: Literal[BLOCK_SIZES] | None = Field(None, description="block side with granularity: block")

    @model_validator(mode="after")
    def _block_with_blocks(self) -> RegionSpec:
        if (self.granularity == "block") != (self.block is not None):
            raise ValueError("give regions.block (16, 32, 64 or 128) with granularity: block, and only then")
        return self


class PlanSpec(_Section):
    """Step 2: grouping tasks by core overlap into ordered stages, and what each stage locks."""

    tau: float = Field(0.1, ge=0, description="Jaccard threshold linking two tasks into one group")
    order: Literal[(*ORDERS, "given")] = Field(
        "random", description="stage order of the groups; 'given': plan.groups, in that order, are the stages"
    )
    seed: int = Field(0, ge=0, le=SEED_MAX, description="seed of the random order and of random baseline groups")
    freeze: Literal[FREEZES] = Field(
        "previous", description="cores locked in a stage: earlier groups', all other groups', or none (ablation)"
    )
    groups: list[list[str]] | None = Field(
        None, description="hand-given grouping: the multistage_given baseline, and CPI-FT's stages with order: given"
    )


class FusionSpec(_Section):
    """Step 3: the fused starting point of the stages."""

    enabled: bool = Field(True, description="start the stages from the fused deltas (else from zero)")
    backbone: Literal["base", "multistage", "mean"] | None = Field(
        None, description="delta the SLERP starts from (default: base in adapter mode, multistage in dense mode)"
    )
    omega: float = Field(0.5, ge=0, le=1, description="SLERP factor toward the mean of the task deltas")


class StageSpec(_Budget):
    """Step 4: the budget and data of each stage."""

    steps: int | None = Field(
        None, gt=0, le=MAX_STEPS, description="optimizer steps per stage (default 50 unless epochs)"
    )
    epochs: float | None = Field(None, gt=0, description="passes over the stage's sampled data, instead of steps")
    lr: float = Field(2e-4, gt=0, description="stage learning rate")
    sample: float = Field(0.5, gt=0, le=1, description="fraction of each task's training data a stage samples")
    reselect: bool = Field(
        False, description="find each later group's cores again with a probe started from the previous stage's model"
    )
    replay: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="share of each stage's examples drawn from earlier stages' tasks (rehearsal; 0: the group's only)",
    )

    added: ClassVar[tuple[str, ...]] = ("replay",)


# `TrainingArguments` fields the pipeline sets itself, and what sets each in a recipe
PIPELINE_ARGS = {
    "output_dir": "output_dir (each step trains in <artifact>.work)",
    "max_steps": "probe.steps or stages.steps",
    "num_train_epochs": "probe.epochs or stages.epochs",
    "learning_rate": "probe.lr or stages.lr",
    "per_device_train_batch_size": "training.batch_size (the global batch, split across processes)",
    "gradient_accumulation_steps": "training.grad_accum",
    "weight_decay": "training.weight_decay",
    "seed": "training.seed",
    "data_seed": "training.seed",
    **dict.fromkeys(
        ("save_strategy", "save_steps", "save_total_limit", "save_only_model", "save_on_each_node"),
        "training.save_steps (the pipeline's checkpoints are what a rerun resumes from)",
    ),
    **dict.fromkeys(
        ("resume_from_checkpoint", "ignore_data_skip"), "nothing: a rerun resumes from the last complete checkpoint"
    ),
    "fsdp": "training.fsdp",
    "fsdp_config": "training.fsdp",
    "train_sampling_strategy": "nothing: the pipeline mixes and orders the examples, the same on any process count",
    "remove_unused_columns": "nothing: the pipeline tokenizes the examples itself",
    "use_cpu": "nothing: training runs on the GPU when there is one",
}


def _did_you_mean(name: str, choices: list[str]) -> str:
    """' (did you mean X?)' for the choice nearest to a mistyped `name`, or '' when none is near."""
    close = difflib.get_close_matches(name, choices, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


class TrainingSpec(_Section):
    """Settings shared by every training step (probes, stages, baselines)."""

    added: ClassVar[tuple[str, ...]] = ("args",)
    batch_size: int = Field(8, gt=0, description="global batch size, split across processes under DDP")
    grad_accum: int = Field(1, gt=0, description="gradient accumulation steps")
    max_seq_len: int = Field(256, ge=8, description="tokens per example, prompt and answer")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    seed: int = Field(0, ge=0, le=SEED_MAX, description="training seed; one run of a recipe is one seed")
    save_steps: int = Field(50, gt=0, description="checkpoint every this many steps (a killed run resumes there)")
    fsdp: bool = Field(False, description="dense mode on GPUs: shard weights, gradients, optimizer state (FSDP2)")
    args: dict[str, Any] = Field(
        {},  # a plain default (pydantic copies it), which `hashed` compares with
        description="more transformers.TrainingArguments fields for every training step, e.g. lr_scheduler_type, "
        "warmup_steps, logging_steps, report_to, optim, bf16, activation_checkpointing. Each probe, stage and "
        "baseline stage is its own Trainer run over its own budget, so a schedule and its warmup start again in "
        "each (warmup_steps < 1: that fraction of the run's steps); a resumed step continues its schedule. Unset: "
        "constant lr, no warmup, logging every tenth of a run, no reporting",
    )

    @field_validator("args")
    @classmethod
    def _training_arguments(cls, args: dict[str, Any]) -> dict[str, Any]:
        """Only fields the pipeline leaves free, with values transformers accepts, checked before any training."""
        fields = [f.name for f in dataclasses.fields(TrainingArguments) if f.init]
        for name in args:
            if name in PIPELINE_ARGS:
                raise ValueError(f"{name} is set by the pipeline; use {PIPELINE_ARGS[name]}")
            if name not in fields:
                raise ValueError(f"{name} is not a transformers.TrainingArguments field{_did_you_mean(name, fields)}")
        try:  # the values, as training.train will pass them (on CPU with use_cpu); writes nothing
            TrainingArguments(output_dir="unused", use_cpu=not torch.cuda.is_available(), **args)
        except (TypeError, ValueError) as e:
            raise ValueError(f"transformers.TrainingArguments refuses them: {e}") from None
        return args


class EvalSpec(_Section):
    """How every method is scored on each task's held-out set."""

    max_new_tokens: int = Field(32, gt=0, description="greedy generation length")
    batch_size: int = Field(16, gt=0, description="generation batch size")
    stages: bool = Field(False, description="also score every earlier stage as `<method>@<k>` (forgetting)")
    items: int | None = Field(
        None,
        gt=0,
        le=MAX_ITEMS,
        description="score on this many held-out items per task instead of each task's `eval`: rescores a finished "
        "run without redoing any training (a task's training items never depend on its eval count)",
    )


# every baseline also runs compute-matched, as `<id>_matched`: its optimizer steps are CPI-FT's probes plus stages
BASELINES = (
    "multitask",
    "multistage_random",
    "multistage_given",
    "single_task",
    "lora_multitask",
    "multitask_all_weights",
)
Baseline = Literal[(*BASELINES, *(f"{b}_matched" for b in BASELINES))]


class Recipe(_Section):
    """A whole CPI-FT run: one YAML file, one seed."""

    model: str = Field("smollm2-135m", description="built-in alias, HF model directory or .gguf file")
    quantization: Literal[QUANTIZATIONS] = Field("nf4", description="how the base is loaded")
    mode: Literal["adapter", "dense"] = Field("adapter", description="sparse deltas on a frozen base, or paper mode")
    target_modules: str | list[str] = Field("all-linear", description="linear layers the adapter targets")
    tasks: dict[str, TaskSpec] = Field(description="task name -> data source")
    probe: ProbeSpec = ProbeSpec()
    regions: RegionSpec = RegionSpec()
    plan: PlanSpec = PlanSpec()
    fusion: FusionSpec = FusionSpec()
    stages: StageSpec = StageSpec()
    training: TrainingSpec = TrainingSpec()
    baselines: list[Baseline] = Field(default_factory=lambda: ["multitask", "multistage_random"])
    eval: EvalSpec = EvalSpec()
    output_dir: str = Field("runs/example", description="where every step writes its artifacts")

    @model_validator(mode="after")
    def _check(self) -> Recipe:
        if len(self.tasks) < 2:
            raise ValueError("tasks: CPI-FT needs at least two tasks")
        unsafe = [t for t in self.tasks if not TASK_NAME.fullmatch(t)]
        if unsafe:
            raise ValueError(
                f"task name {unsafe[0]!r} names files (probes/<task>, cores/<task>.safetensors): use letters, "
                "digits, '_' and '-' (and no '@', which marks re-selected cores)"
            )
        if self.mode == "dense" and self.quantization != "none":
            raise ValueError("mode: dense trains full weights, so it needs quantization: none")
        if self.mode == "adapter" and self.training.fsdp:
            raise ValueError(
                "training.fsdp shards full weights (dense mode); an adapter's few values need no sharding, use DDP"
            )
        if self.mode == "adapter" and self.probe.method == "full":
            raise ValueError("probe.method: full is dense mode's probe; in adapter mode use lora or sparse")
        if self.mode == "adapter" and self.backbone != "base":
            raise ValueError(
                f"fusion.backbone: {self.backbone} never enters adapter mode's fused start: its support is the union "
                "of the cores, so every entry takes its task's core value and none is left to SLERP; use backbone: "
                "base, or mode: dense"
            )
        if self.mode == "adapter" and self.plan.freeze == "all":
            raise ValueError(
                "plan.freeze: all locks every other group's core, and in adapter mode the support is the union of "
                "the cores, so later groups could never train their shared entries; use freeze: previous"
            )
        held_out = next(
            (t for t, s in self.tasks.items() if not s.source.startswith(RG_PREFIX) and not s.eval_source), None
        )
        if self.eval.items and held_out:
            raise ValueError(
                f"eval.items: task {held_out!r} holds its eval items out of its source, so their count changes "
                "its training data; set that task's eval (which retrains), or give it an eval_source"
            )
        if self.mode == "dense" and any(b.startswith("multitask_all_weights") for b in self.baselines):
            raise ValueError(
                "multitask_all_weights spreads an isolation adapter's support over all targeted weights (adapter "
                "mode); dense mode's multitask baseline trains every weight already"
            )
        given = any(b.startswith("multistage_given") for b in self.baselines)
        if (given or self.plan.order == "given") and not self.plan.groups:
            raise ValueError("multistage_given and plan.order: given need plan.groups (a list of task-name lists)")
        if self.plan.groups:
            if not all(self.plan.groups):
                raise ValueError("plan.groups has an empty group; every stage needs at least one task")
            named = [t for g in self.plan.groups for t in g]
            if sorted(named) != sorted(self.tasks):
                raise ValueError("plan.groups must name every task exactly once")
        return self

    @property
    def probe_method(self) -> str:
        """The probe method, defaulting by mode (docs/method.md, "Probe": lora in adapter mode, full in dense mode)."""
        return self.probe.method or ("full" if self.mode == "dense" else "lora")

    @property
    def backbone(self) -> str:
        """The fusion backbone, defaulting by mode (base in adapter mode, multistage in dense mode)."""
        return self.fusion.backbone or ("multistage" if self.mode == "dense" else "base")

    def section_hash(self, *sections: str) -> str:
        """A short hash of the named sections: a step is redone exactly when what it depends on changed."""
        dumped = self.model_dump(mode="json")
        data = {s: getattr(self, s).hashed() if isinstance(getattr(self, s), _Section) else dumped[s] for s in sections}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def load_recipe(path: str | os.PathLike, overrides: list[str] = ()) -> Recipe:
    """Read and validate a recipe; `overrides` are `key.sub=value` strings (YAML values) applied first."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe {path} does not exist")
    if path.stat().st_size > MAX_RECIPE_BYTES:
        raise ValueError(f"{path} is over {MAX_RECIPE_BYTES >> 20} MiB, which no recipe needs: is it the right file?")
    data = _yaml(path.read_text(), f"{path}", "fix the YAML")
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a recipe is a YAML mapping of sections (model:, tasks:, ...), not {type(data)}")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} must look like key.sub=value")
        *parents, leaf = key.split(".")
        node = data
        for depth, part in enumerate(parents):
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                where = ".".join(parents[: depth + 1])
                raise ValueError(f"override {item!r}: {where} is {node!r} in {path}, not a section with keys")
        node[leaf] = _yaml(value, f"override {item!r}", "quote the value")
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'recipe'}: {_message(err)}" for err in e.errors())
        raise ValueError(f"{path}: {problems}") from None


def _message(error: dict) -> str:
    """A pydantic error's message; for an unknown key, the nearest valid key of its section."""
    if error["type"] != "extra_forbidden":
        return error["msg"]
    *parents, key = error["loc"]
    section: Any = Recipe
    parts = iter(parents)
    for part in parts:
        section = section.model_fields[part].annotation
        if get_origin(section) is dict:  # `tasks`: the next part is a task's name
            section = get_args(section)[1]
            next(parts, None)
    return f"unknown key{_did_you_mean(str(key), list(section.model_fields))}"


class _NoAliases(yaml.SafeLoader):
    """safe_load without aliases (`*name`): a few nested aliases expand a small file past any memory."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, "aliases (*name) are not allowed in a recipe: write the value out", event.start_mark
            )
        return super().compose_node(parent, index)


def _yaml(text: str, what: str, fix: str) -> Any:
    try:
        return yaml.load(text, Loader=_NoAliases)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as e:
        raise ValueError(f"{what} is not valid YAML ({' '.join(str(e).split())}); {fix}") from None
