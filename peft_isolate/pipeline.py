"""The CPI-FT recipe, top to bottom: probe -> regions -> plan -> fuse -> stages -> baselines -> evaluate.

Every step writes its artifact under `output_dir` and records, in `state.json`, a hash of exactly the recipe
sections (and upstream steps) it depends on. A rerun skips each step whose hash still matches, redoes those
whose inputs changed, and resumes an interrupted training step from its last complete checkpoint.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import shutil
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import reduce
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tqdm.auto import tqdm
from transformers import set_seed

from . import rundir
from .card import write_card
from .data import RG_PREFIX, Example, TaskData, load_task, mix, sample
from .evaluate import evaluate, majority_baseline, merged_for_generation, method_entry, write_results
from .files import artifact_damage, atomic_dir, load_json, load_tensors, save_json, save_pretrained_atomic, save_tensors
from .fusion import fuse_deltas
from .models import load_model, resolve_model
from .plan import StagePlan, draw_overlap, format_plan, plan_stages
from .recipe import Recipe, TaskSpec
from .regions import CoreRegions
from .selection import AUTO_GRID, check_keeps_an_entry, choose_p, find_core_regions, mass_curve
from .sources import Checkpoint, CheckpointDelta, DeltaSource, IsolationDelta, LoraDelta
from .training import TrainSettings, completed_checkpoint, gathered_state_dict, processes, train
from .tuner import IsolationConfig

# What each step's key hashes of the recipe, besides the keys of the steps it starts from (in brackets): a step
# runs again exactly when one of these sections or an upstream key changed, e.g. `fusion.omega` redoes the fused
# start and, through its key, every CPI-FT stage and evaluation after it, and nothing else.
STEP_INPUTS: dict[str, tuple[str, ...]] = {
    "probe": ("model", "quantization", "mode", "target_modules", "probe", "training"),  # [the task's data]
    "cores": ("regions",),  # [the task's probe]
    "plan": ("plan",),  # [every probe, regions]
    "fused": ("fusion",),  # [every probe, regions, the backbone's stages]
    "stages": ("stages", "training"),  # [plan, fused start, the stage before]
    "lora_multitask": ("stages", "training"),  # [plan, rank, steps]
    "eval": ("eval",),  # [the method's artifact]
    "base": ("model", "quantization"),  # [every task's data]
}


@contextmanager
def _peft_quietly() -> Iterator[None]:
    """peft 0.21's PeftModel.__init__ asks transformers for a deprecated attribute, whose FutureWarning would print
    on every adapter this pipeline builds or loads; only those calls are silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def _hash(*parts: str) -> str:
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


@dataclass
class Run:
    """A run directory: the recipe, its tasks and which steps are complete under which input hash."""

    recipe: Recipe
    tasks: dict[str, TaskData]
    task_keys: dict[str, str]  # each task's spec and data-file contents, hashed once per run

    @property
    def out(self) -> Path:
        return Path(self.recipe.output_dir)

    def step(self, name: str, key: str, artifact: Path, work: Callable[[], object], everywhere: bool = False) -> Path:
        """Run `work` unless `artifact` exists from a run with the same `key`; then record it as done.

        Under several processes (DDP) training steps (`everywhere`) run on every process and the others on the
        main one only; files are written by the main process, and all wait for it before going on."""
        state_path = self.out / "state.json"
        state = load_json(state_path) if state_path.exists() else {}
        if state.get(name) == key:
            damage = artifact_damage(artifact)
            if damage is None:
                return artifact
            print(f"[peft-isolate] {artifact.relative_to(self.out)}: {damage}; redoing it", flush=True)
        main = processes().is_main_process
        if main:
            print(f"[peft-isolate] {artifact.relative_to(self.out)}", flush=True)  # as on disk: stages/0
            rundir.check_own(self.out, name, artifact)
            if name in state:  # the artifact is about to change: never vouch for it under the old key
                save_json({k: v for k, v in state.items() if k != name}, state_path)
            rundir.record_writing(self.out, name, artifact, done=False)
        if everywhere or main:
            try:
                work()
            except BaseException as e:
                ckpt = completed_checkpoint(f"{artifact}.work", key)
                rerun = f"resumes it from {ckpt}" if ckpt else "redoes it"
                e.add_note(f"step {name} stopped before {artifact} was complete; a rerun {rerun}")
                raise
        if main:
            rundir.record_writing(self.out, name, artifact, done=True)
            state = load_json(state_path) if state_path.exists() else {}
            save_json({**state, name: key}, state_path)
        processes().wait_for_everyone()
        return artifact

    def count_steps(self, step: str, steps: int) -> None:
        """Record how many optimizer steps a training step ran (its trainer state's global step) in compute.json."""
        if processes().is_main_process:
            path = self.out / "compute.json"
            save_json({**(load_json(path) if path.is_file() else {}), step: steps}, path)

    def optimizer_steps(self, steps: list[str]) -> int:
        """The optimizer steps the named training steps ran, from compute.json."""
        path = self.out / "compute.json"
        counted = load_json(path) if path.is_file() else {}
        return sum(counted.get(s, 0) for s in steps)

    def inputs(self, step: str) -> str:
        """The hash of the recipe sections `step` depends on (`STEP_INPUTS`)."""
        return self.recipe.section_hash(*STEP_INPUTS[step])

    def settings(self, steps: int, lr: float) -> TrainSettings:
        """The training settings of one step of the run."""
        return TrainSettings(steps, lr, **self.recipe.training.model_dump())

    @property
    def global_batch(self) -> int:
        return self.recipe.training.batch_size * self.recipe.training.grad_accum

    def examples(
        self, task_names: list[str], steps: int, fraction: float = 1.0, replay: list[str] = (), share: float = 0.0
    ) -> list[Example]:
        """The uniform mixture of the named tasks (each sampled to `fraction`) for `steps` optimizer steps; with
        `replay` tasks, a `share` of the examples is their uniform mixture instead (rehearsal of earlier stages)."""
        seed, n = self.recipe.training.seed, steps * self.global_batch
        replayed = round(share * n) if replay else 0

        def mixture(names: list[str], count: int) -> list[Example]:
            return mix([sample(self.tasks[t], fraction, seed) for t in names], count, seed)

        if not replayed:
            return mixture(task_names, n)
        out = mixture(task_names, n - replayed) + mixture(list(replay), replayed)
        random.Random(seed).shuffle(out)
        return out

    def stage_steps(self, task_names: list[str]) -> int:
        """The stage budget for a group: `stages.steps`, or `stages.epochs` over its sampled data."""
        sampled = sum(len(sample(self.tasks[n], self.recipe.stages.sample, 0).train) for n in task_names)
        return self.recipe.stages.budget(sampled, self.global_batch)

    def base(self):
        """A fresh copy of the base model (as the recipe quantizes it) and its tokenizer."""
        return load_model(self.recipe.model, self.recipe.quantization, device=processes().device)

    def load(self, artifact: Path | None):
        """(model, tokenizer) of an artifact: None is the base, a dense model directory, or an adapter on the base."""
        if artifact is None:
            return self.base()
        if not (artifact / "adapter_config.json").is_file():
            return load_model(artifact, "none", device=processes().device)
        model, tokenizer = self.base()
        with _peft_quietly():
            return PeftModel.from_pretrained(model, artifact, is_trainable=True), tokenizer

    def save(self, model, tokenizer, path: Path, card: dict | None = None) -> None:
        """Save an adapter, or a whole model with its tokenizer, atomically and once; call it on every process
        (under FSDP the weights are gathered first). An isolation adapter's card says `card` and the recipe."""
        state = gathered_state_dict(model)
        if processes().is_main_process:
            adapter = isinstance(model, PeftModel)
            isolation = adapter and model.peft_config[model.active_adapter].peft_type == "ISOLATION"
            about = {**(card or {}), "recipe": self.recipe.model_dump(mode="json")}
            finish = (lambda tmp: write_card(tmp, about)) if isolation else None
            save_pretrained_atomic(model, path, None if adapter else tokenizer, state, finish)


def load_run(recipe: Recipe) -> Run:
    """Generate or read every task's data (cheap and deterministic, so it is not cached)."""
    tasks = {
        name: load_task(
            spec.source,
            name,
            config=spec.config,
            train=spec.train,
            eval=recipe.eval.items or spec.eval,
            seed=spec.seed,
            eval_source=spec.eval_source,
        )
        for name, spec in recipe.tasks.items()
    }
    run = Run(recipe, tasks, {name: _task_key(spec) for name, spec in recipe.tasks.items()})
    # refuse, before any training, budgets past the ceiling and a p that keeps nothing (checked again where used)
    for task in tasks.values():
        recipe.probe.budget(len(task.train), run.global_batch)
    recipe.stages.budget(sum(len(sample(t, recipe.stages.sample, 0).train) for t in tasks.values()), run.global_batch)
    entries = sum(math.prod(s) for s in Checkpoint(resolve_model(recipe.model)).shapes().values())
    check_keeps_an_entry(AUTO_GRID[0] if recipe.regions.p == "auto" else recipe.regions.p, entries)
    return run


def _task_key(spec: TaskSpec) -> str:
    """A task's spec and, for a file task, its files' contents: a data file edited in place redoes its steps."""
    files = [f for f in (spec.source, spec.eval_source) if f and not f.startswith(RG_PREFIX)]
    return spec.model_dump_json() + "".join(hashlib.sha256(Path(f).read_bytes()).hexdigest() for f in files)


# --- step 1: probes and core regions -------------------------------------------------------------------------


def probe_key(run: Run, task: str) -> str:
    """What a task's probe depends on: the model, mode, targets, probe and training settings, its own data."""
    return _hash(run.inputs("probe"), run.task_keys[task])


def _train_single_adapter(
    run: Run,
    name: str,
    key: str,
    tasks: list[str],
    steps: int,
    lr: float,
    method: str,
    rank: int,
    start: Path | None = None,
    fraction: float = 1.0,
) -> tuple[Path, str]:
    """Fine-tune the base (or the model a stage left, `start`, merged) on the mixture of `tasks` with a LoRA, a
    sparse isolation adapter or all weights (`method`), each task's data sampled to `fraction`; save it to
    `<output_dir>/<name>` (probes, and the LoRA multi-task baseline)."""
    r, out = run.recipe, run.out / name

    def work():
        set_seed(r.training.seed)  # adapter inits draw from the global generator
        model, tokenizer = run.load(start)
        if isinstance(model, PeftModel):
            model = model.merge_and_unload()
        if method == "lora":
            lora = LoraConfig(r=rank, lora_alpha=rank, target_modules=r.target_modules, lora_dropout=0.0)
            with _peft_quietly():
                model = get_peft_model(model, lora)
        elif method == "sparse":
            sparse = IsolationConfig(target_modules=r.target_modules, density=r.probe.density, seed=r.training.seed)
            with _peft_quietly():
                model = get_peft_model(model, sparse)
        done = train(
            model, tokenizer, run.examples(tasks, steps, fraction), run.settings(steps, lr), f"{out}.work", key=key
        )
        run.save(model, tokenizer, out, {"method": name, "tasks": tasks, "optimizer steps": done.global_step})
        run.count_steps(name.replace("/", ":"), done.global_step)

    return run.step(name.replace("/", ":"), key, out, work, everywhere=True), key


def run_probe(run: Run, task: str, start: tuple[Path, str] | None = None, label: str = "") -> tuple[Path, str]:
    """Fine-tune a copy of the base on one task alone (the probe) and save it under probes/<task>; with `start`
    (an artifact and its key), a copy of that model, under probes/<task><label>."""
    r = run.recipe
    steps = r.probe.budget(len(run.tasks[task].train), run.global_batch)
    key = probe_key(run, task) if start is None else _hash(probe_key(run, task), start[1])
    return _train_single_adapter(
        run,
        f"probes/{task}{label}",
        key,
        [task],
        steps,
        r.probe.lr,
        r.probe_method,
        r.probe.rank,
        start=None if start is None else start[0],
    )


def run_lora_multitask(
    run: Run, support: CoreRegions, steps: int, key: str, name: str = "lora_multitask"
) -> tuple[Path, str]:
    """The everyday alternative: one LoRA on the uniform mixture, at the rank whose trainable count is nearest
    to the isolation support's, for `steps` optimizer steps (CPI-FT's stages, or all of its steps if matched)."""
    matrices = [n for n, shape in support.shapes.items() if len(shape) == 2]  # dense mode: norms are 1-D
    fan = sum(sum(support.shapes[n]) for n in matrices)
    rank = max(1, round(sum(support.indices[n].numel() for n in matrices) / fan))
    r = run.recipe
    key = _hash(key, str(rank), str(steps), run.inputs("lora_multitask"))
    tasks = list(run.tasks)  # on the data the staged baselines see: each task sampled to stages.sample
    return _train_single_adapter(run, name, key, tasks, steps, r.stages.lr, "lora", rank, fraction=r.stages.sample)


def delta_source(run: Run, probe: Path, reference: Path | None = None) -> DeltaSource:
    """A probe's update, read back from its artifact; a full probe's against `reference` (default: the base)."""
    base = reference or resolve_model(run.recipe.model)
    return {
        "lora": lambda: LoraDelta(probe, base),
        "sparse": lambda: IsolationDelta(probe, base),
        "full": lambda: CheckpointDelta(base, probe),
    }[run.recipe.probe_method]()


def run_regions(run: Run, task: str, start: tuple[Path, str] | None = None, label: str = "") -> CoreRegions:
    """Core region of a task: the top-p entries of its probe's |update|; with `start`, of a probe started from
    that model instead of the base (`stages.reselect`), saved as cores/<task><label>."""
    r, path = run.recipe, run.out / "cores" / f"{task}{label}.safetensors"
    probe, key = run_probe(run, task, start, label)
    reference = start[0] if start is not None and r.mode == "dense" else None

    p = core_size(run)["p"]

    def work():
        source, spec = delta_source(run, probe, reference), r.regions
        find_core_regions(source, p, spec.scope, granularity=spec.granularity, block=spec.block).save(path)

    # an automatic p comes from every probe, so then each task's core depends on all of them
    auto = (cores_key(run),) if r.regions.p == "auto" else ()
    run.step(f"cores:{task}{label}", _hash(key, run.inputs("cores"), *auto), path, work)
    return CoreRegions.load(path)


def core_size(run: Run) -> dict:
    """The cores' p: the recipe's, or with `regions.p: auto` the one chosen once every probe is done (p.json: the
    rule, each task's share of its update at that p, and the curves it was read from)."""
    r, path = run.recipe, run.out / "p.json"
    if r.regions.p != "auto":
        return {"p": r.regions.p, "rule": "given by the recipe"}

    def work():
        curves = {t: mass_curve(delta_source(run, run.out / "probes" / t)) for t in run.tasks}
        save_json(choose_p(curves, r.regions.mass), path)

    run.step("p", cores_key(run), path, work)
    return load_json(path)


# --- step 2 and 3: plan and fusion ---------------------------------------------------------------------------


def cores_key(run: Run) -> str:
    """What the set of cores depends on: every probe and the regions settings."""
    return _hash(*(probe_key(run, t) for t in run.tasks), run.inputs("cores"))


def run_plan(run: Run, cores: dict[str, CoreRegions]) -> StagePlan:
    """Group the tasks into stages (plan.json, overlap.png) and print the overlap matrix and the stages."""
    r, path = run.recipe, run.out / "plan.json"

    def work():
        given = r.plan.groups if r.plan.order == "given" else None
        # sparse probes all train one seeded support, so their cores can only lie there
        universe = delta_source(run, run.out / "probes" / next(iter(cores))).support_size
        plan = plan_stages(cores, r.plan.tau, r.plan.order, r.plan.seed, r.plan.freeze, given, universe)
        plan.p = {k: v for k, v in core_size(run).items() if k != "curves"}
        draw_overlap(plan, run.out / "overlap.png")
        plan.save(path)

    run.step("plan", _hash(cores_key(run), run.inputs("plan")), path, work)
    plan = StagePlan.load(path)
    print(format_plan(plan))
    return plan


def support_of(cores: dict[str, CoreRegions]) -> CoreRegions:
    """Adapter mode trains (and fuses) on the union of every task's core."""
    return reduce(CoreRegions.union, cores.values())


def _fuse_tensor(
    run: Run,
    name: str,
    deltas: dict[str, torch.Tensor],
    backbone: torch.Tensor | None,
    cores: dict[str, CoreRegions],
    support: torch.Tensor | None,
    stats: Counter,
) -> torch.Tensor:
    """Fuse one tensor's task deltas (dense, or values at `support`); counts the SLERP/LERP paths in `stats`."""
    one = {
        t: CoreRegions({name: c.indices[name]}, {name: c.shapes[name]}) for t, c in cores.items() if name in c.shapes
    }
    if run.recipe.backbone == "mean":
        backbone = torch.stack(list(deltas.values())).mean(0)
    fused = fuse_deltas(
        {t: {name: d} for t, d in deltas.items()},
        one,
        None if backbone is None else {name: backbone},
        run.recipe.fusion.omega,
        support=None if support is None else {name: support},
    )
    stats.update({k: v for k, v in fused.stats.items() if k in ("slerp", "lerp", "contested")})
    return fused.deltas[name]


def run_fusion(
    run: Run, cores: dict[str, CoreRegions], support: CoreRegions, backbone: tuple[Path, str] | None
) -> Path:
    """The fused starting point, one tensor at a time: each task's core transplanted, the other entries
    SLERP(backbone delta, spherical mean of the task deltas, omega). Adapter mode: values on the support
    (fused/delta.safetensors); dense mode: a whole model (fused/)."""
    dense = run.recipe.mode == "dense"
    path = run.out / "fused" if dense else run.out / "fused" / "delta.safetensors"
    base_dir = resolve_model(run.recipe.model)

    def work():
        sources = {t: delta_source(run, run.out / "probes" / t) for t in cores}
        backbone_source = CheckpointDelta(base_dir, backbone[0]) if backbone else None  # dense mode only (recipe)
        stats, values = Counter(), {}
        model, tokenizer = run.base() if dense else (None, None)
        params = dict(model.named_parameters()) if dense else {}
        names = (
            [n for n in support.indices if n in params]
            if dense
            else [n for n, i in support.indices.items() if i.numel()]
        )
        for name in tqdm(names, desc="fuse", unit="tensor"):
            idx = None if dense else support.indices[name].long()
            deltas = {t: src.delta(name) if dense else src.delta(name).flatten()[idx] for t, src in sources.items()}
            b = backbone_source.delta(name) if backbone_source else None
            fused = _fuse_tensor(run, name, deltas, b, cores, None if dense else support.indices[name], stats)
            if dense:
                with torch.no_grad():
                    params[name].add_(fused.to(params[name].dtype))
            else:
                values[name] = fused
        if dense:
            run.save(model, tokenizer, path)
        else:
            save_tensors(values, path)
        save_json(dict(stats), run.out / "fusion.json")

    run.step("fused", fusion_key(run, backbone), path, work)
    return path


def fusion_key(run: Run, backbone: tuple[Path, str] | None) -> str:
    """What the fused starting point depends on: the cores, the fusion settings and the backbone's own key."""
    return _hash(cores_key(run), run.inputs("fused"), backbone[1] if backbone else "")


# --- step 4: stages with frozen cores ------------------------------------------------------------------------


@dataclass(frozen=True)
class StageJob:
    """One stage: the tasks it trains on and, for CPI-FT, the entries it trains and the entries it locks."""

    tasks: list[str]
    steps: int
    trainable: CoreRegions | None = None  # None: every unlocked entry trains
    locked: CoreRegions | None = None


def cpi_ft_job(run: Run, plan: StagePlan, cores: dict[str, CoreRegions], k: int) -> StageJob:
    """Stage k trains its group's cores minus the plan's frozen set, which it locks."""
    group = plan.groups[k]
    locked = plan.frozen_regions(k, cores)
    own = reduce(CoreRegions.union, (cores[t] for t in group))
    trainable = own.difference(locked) if locked is not None else own
    return StageJob(group, run.stage_steps(group), trainable, locked)


def cpi_ft_jobs(run: Run, plan: StagePlan, cores: dict[str, CoreRegions]) -> list[StageJob]:
    return [cpi_ft_job(run, plan, cores, k) for k in range(len(plan.groups))]


def reselecting(run: Run, plan: StagePlan, cores: dict[str, CoreRegions]) -> Callable[..., StageJob]:
    """`stages.reselect`: before stage k > 0 each task of its group gets its core found again, by a probe of the
    same budget started from the model stage k-1 left (importance drifts as training goes); the cores earlier
    stages trained are the ones locked."""
    if run.recipe.quantization != "none":
        warnings.warn(
            f"stages.reselect on a {run.recipe.quantization} base: each re-probe starts from the previous stage "
            "merged into the base and requantized, which rounds away updates smaller than a quantization step; "
            "use quantization: none for exact re-probes",
            stacklevel=2,
        )
    used = dict(cores)

    def refine(k: int, previous: tuple[Path, str]) -> StageJob:
        used.update({t: run_regions(run, t, previous, f"@{k}") for t in plan.groups[k]})
        return cpi_ft_job(run, plan, used, k)

    return refine


def _first_stage(run: Run, start: Path | None, support: Path | None = None):
    """What stage 0 starts from: dense mode the fused (or base) model; adapter mode a fresh isolation adapter on
    the support, holding the fused values if there are any."""
    if run.recipe.mode == "dense":
        return run.load(start)
    support = support or run.out / "support.safetensors"
    model, tokenizer = run.base()
    cfg = IsolationConfig(target_modules=run.recipe.target_modules, init="regions", regions=str(support))
    with _peft_quietly():
        model = get_peft_model(model, cfg)
    if start is not None:
        values, _ = load_tensors(start)
        model.base_model.add_trainable(CoreRegions.load(support), values=values)
    return model, tokenizer


def train_stages(
    run: Run,
    name: str,
    jobs: list[StageJob],
    key: str,
    start: Path | None = None,
    refine: Callable[[int, tuple[Path, str]], StageJob] | None = None,
    support: Path | None = None,
) -> list[tuple[Path, str]]:
    """Train the stages in order into `<output_dir>/<name>/<k>/`; returns every stage's artifact and key.
    `refine(k, (previous artifact, key))` may replace a later stage's job once the stage before it is done.
    Adapter mode's stage 0 starts an isolation adapter on `support` (default: the union of the cores).

    Adapter mode freezes structurally (locked entries leave the trainable set); dense mode masks gradients
    and restores the frozen entries after each optimizer step."""
    r = run.recipe
    previous, done = None, []
    for k, job in enumerate(jobs):
        if refine is not None and k:
            job = refine(k, done[-1])
        out = run.out / name / str(k)
        key = _hash(key, str(k), str(job.tasks), str(job.steps), run.inputs("stages"))

        def work(k=k, job=job, previous=previous, out=out, key=key):
            model, tokenizer = run.load(previous) if k else _first_stage(run, start, support)
            frozen = None
            if r.mode == "dense":
                frozen = job.locked.indices if job.locked is not None else None
            elif job.trainable is not None:
                model.base_model.hold()
                if job.locked is not None:
                    model.base_model.lock(job.locked)
                model.base_model.add_trainable(job.trainable)
            earlier = [t for j in jobs[:k] for t in j.tasks if t not in job.tasks]
            examples = run.examples(
                job.tasks, job.steps, r.stages.sample, list(dict.fromkeys(earlier)), r.stages.replay
            )
            settings = run.settings(job.steps, r.stages.lr)
            done = train(model, tokenizer, examples, settings, f"{out}.work", frozen=frozen, key=key)
            card = {"method": name, "stage": f"{name}/{k} ({k + 1} of {len(jobs)})", "tasks": job.tasks}
            run.save(model, tokenizer, out, card | {"optimizer steps": done.global_step})
            run.count_steps(f"{name}:{k}", done.global_step)

        previous = run.step(f"{name}:{k}", key, out, work, everywhere=True)
        done.append((previous, key))
    return done


# --- baselines and evaluation --------------------------------------------------------------------------------


def random_groups(tasks: list[str], k: int, seed: int) -> list[list[str]]:
    """Tasks shuffled (seeded) and dealt into `k` non-empty groups."""
    shuffled = random.Random(seed).sample(tasks, len(tasks))
    return [shuffled[i::k] for i in range(min(k, len(tasks)))]


def split_budget(total: int, n: int) -> list[int]:
    """`total` optimizer steps over `n` stages, as evenly as possible."""
    return [total // n + (i < total % n) for i in range(n)]


def baseline_jobs(
    recipe: Recipe, baseline: str, tasks: list[str], n_stages: int, total: int
) -> dict[str, list[StageJob]]:
    """{method id: stages} for one staged baseline (`<id>` or `<id>_matched`): `total` optimizer steps spread
    evenly over the baseline's own stages, as many as CPI-FT's (`n_stages`) where it has no grouping of its own."""
    kind = baseline.removesuffix("_matched")
    if kind in ("multitask", "multitask_all_weights"):
        groups = [tasks] * n_stages
    elif kind == "multistage_random":
        groups = random_groups(tasks, n_stages, recipe.plan.seed)
    elif kind == "multistage_given":
        groups = recipe.plan.groups
    else:
        return {f"{baseline}:{t}": [StageJob([t], total)] for t in tasks}
    return {baseline: [StageJob(g, s) for g, s in zip(groups, split_budget(total, len(groups)), strict=True)]}


def cpi_ft_steps(run: Run, plan: StagePlan, cpi_jobs: list[StageJob]) -> dict[str, int]:
    """CPI-FT's optimizer steps by part: its probes (and re-probes with `stages.reselect`, the backbone's stages
    in dense mode) and its stages. A compute-matched baseline gets their sum."""
    r = run.recipe
    probe = {t: r.probe.budget(len(run.tasks[t].train), run.global_batch) for t in run.tasks}
    steps = {"probes": sum(probe.values()), "stages": sum(job.steps for job in cpi_jobs)}
    if r.stages.reselect:
        steps["re-probes"] = sum(probe[t] for group in plan.groups[1:] for t in group)
    if r.fusion.enabled and r.backbone == "multistage":
        steps["backbone"] = sum(run.stage_steps(g) for g in plan.groups)
    return steps


def spread_like(support: CoreRegions, seed: int) -> CoreRegions:
    """As many entries as `support`, drawn uniformly with `seed` over every weight it was taken over."""
    names = list(support.shapes)
    starts = np.concatenate([[0], np.cumsum([math.prod(support.shapes[n]) for n in names])])
    flat = np.sort(np.random.default_rng(seed).choice(int(starts[-1]), size=support.size, replace=False))
    cut = np.searchsorted(flat, starts)
    indices = {n: torch.from_numpy(flat[cut[i] : cut[i + 1]] - starts[i]) for i, n in enumerate(names)}
    return CoreRegions(indices, support.shapes, source=f"uniform over all targeted weights, seed {seed}")


def spread_support(run: Run, support: CoreRegions) -> Path:
    """The support of `multitask_all_weights`: CPI-FT's support's size, spread over all targeted weights, seeded
    by the training seed."""
    path = run.out / "all_weights_support.safetensors"
    seed = run.recipe.training.seed
    run.step(
        "all_weights_support", _hash(cores_key(run), str(seed)), path, lambda: spread_like(support, seed).save(path)
    )
    return path


def run_evaluations(run: Run, methods: dict[str, tuple[Path | None, str]], meta: dict | None = None) -> dict:
    """Score every method on every task's held-out set; cached per method. A method id `<kind>:<task>` (a
    single-task model) is scored on its own task only and reported under `<kind>`. `meta` goes into the results
    as it is (what each method trained, the cores' p)."""
    r = run.recipe
    results = {"methods": {}, "majority": {t: majority_baseline(d) for t, d in run.tasks.items()}}
    if meta:
        results["meta"] = meta
    for method, (artifact, key) in methods.items():
        kind, _, own = method.partition(":")
        path = run.out / "eval" / f"{method.replace(':', '-')}.json"
        tasks = [run.tasks[own]] if own else list(run.tasks.values())

        def work(artifact=artifact, path=path, tasks=tasks):
            model, tokenizer = run.load(artifact)
            model = merged_for_generation(model)  # a throwaway copy of the base
            scores = evaluate(model, tokenizer, tasks, r.eval.max_new_tokens, r.eval.batch_size)
            save_json(method_entry(scores), path)

        run.step(f"eval:{method}", _hash(key, run.inputs("eval"), "items"), path, work)  # files with item scores
        entry = results["methods"].setdefault(kind, {"tasks": {}, "exact": {}, "items": {}})
        for field, values in load_json(path).items():
            if field != "avg":
                entry[field].update(values)
    for entry in results["methods"].values():
        entry["avg"] = sum(entry["tasks"].values()) / len(entry["tasks"])
    if processes().is_main_process:
        write_results(run.out, results)
        final = run.out / "final"
        if "cpi_ft" in results["methods"] and (final / "adapter_model.safetensors").is_file():
            about = {"method": "cpi_ft (the last stage)", "scores": results["methods"]["cpi_ft"]["tasks"]}
            write_card(final, about | {"recipe": r.model_dump(mode="json")})
    return results


STEPS = ("probe", "regions", "plan", "fuse", "train-stage", "baselines", "evaluate")


def run_pipeline(recipe: Recipe, until: str = "evaluate") -> dict | None:
    """Everything the recipe asks, in order, up to and including step `until` (complete steps are skipped);
    returns the results written to results.json when it gets that far."""
    if until not in STEPS:
        raise ValueError(f"unknown step {until!r}; the steps are {', '.join(STEPS)}")
    # offline: every save of an adapter would otherwise ask the Hub whether its base (often an alias) is a repo
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = Path(recipe.output_dir)
    with warnings.catch_warnings():  # ... and then warn that it could not: no adapter here changes the vocabulary
        warnings.filterwarnings("ignore", message="Could not find a config file in .* vocabulary was not modified")
        if processes().is_main_process:  # under torchrun the main process alone holds the run directory
            with rundir.claim(out):
                processes().wait_for_everyone()
                return _run_steps(recipe, until)
        processes().wait_for_everyone()
        return _run_steps(recipe, until)


def _run_steps(recipe: Recipe, until: str) -> dict | None:
    last = STEPS.index(until)
    run = load_run(recipe)
    main = processes().is_main_process
    if main:
        save_json(recipe.model_dump(mode="json"), run.out / "recipe.json")
    for task in run.tasks:
        run_probe(run, task)
    if last < STEPS.index("regions"):
        return None
    cores = {task: run_regions(run, task) for task in run.tasks}
    if last < STEPS.index("plan"):
        return None
    plan = run_plan(run, cores)
    support = support_of(cores)
    if main:
        support.save(run.out / "support.safetensors")
    base_key = _hash(cores_key(run), run.inputs("plan"))
    backbone = start = None
    if recipe.fusion.enabled:
        if recipe.backbone == "multistage":
            jobs = [StageJob(g, run.stage_steps(g)) for g in plan.groups]
            backbone = train_stages(run, "backbone", jobs, base_key)[-1]
        start = run_fusion(run, cores, support, backbone)
    if last < STEPS.index("train-stage"):
        return None
    methods: dict[str, tuple[Path | None, str]] = {"base": (None, _hash(run.inputs("base"), *run.task_keys.values()))}
    methods |= {f"probe:{t}": (run.out / "probes" / t, probe_key(run, t)) for t in run.tasks}
    key = _hash(base_key, fusion_key(run, backbone) if start else "")
    cpi_jobs = cpi_ft_jobs(run, plan, cores)
    refine = reselecting(run, plan, cores) if recipe.stages.reselect else None
    stages = {"cpi_ft": train_stages(run, "stages", cpi_jobs, key, start, refine)}
    final, final_key = stages["cpi_ft"][-1]

    def copy_final():
        with atomic_dir(run.out / "final") as tmp:
            shutil.copytree(final, tmp, dirs_exist_ok=True)

    run.step("final", final_key, run.out / "final", copy_final)
    if last < STEPS.index("baselines"):
        return None
    parts = cpi_ft_steps(run, plan, cpi_jobs)
    trained = {  # the training steps behind each method, to count their optimizer steps in compute.json
        "cpi_ft": [f"probes:{t}" for t in run.tasks]
        + [f"probes:{t}@{k}" for k, g in enumerate(plan.groups) if k and recipe.stages.reselect for t in g]
        + [f"backbone:{k}" for k in range(len(plan.groups)) if backbone]
        + [f"stages:{k}" for k in range(len(cpi_jobs))]
    }
    for baseline in recipe.baselines:
        total = sum(parts.values()) if baseline.endswith("_matched") else parts["stages"]
        if baseline.startswith("lora_multitask"):
            methods[baseline] = run_lora_multitask(run, support, total, base_key, baseline)
            trained[baseline] = [baseline]
            continue
        spread = spread_support(run, support) if baseline.startswith("multitask_all_weights") else None
        for method, jobs in baseline_jobs(recipe, baseline, list(run.tasks), len(cpi_jobs), total).items():
            name = method.replace(":", "-")
            stages[method] = train_stages(
                run, name, jobs, _hash(base_key, "spread") if spread else base_key, support=spread
            )
            trained[method] = [f"{name}:{k}" for k in range(len(jobs))]
    if last < STEPS.index("evaluate"):
        return None
    for method, done in stages.items():
        methods[method] = done[-1]
        if recipe.eval.stages:  # every earlier stage too, e.g. to measure forgetting
            methods |= {f"{method}@{k}": stage for k, stage in enumerate(done[:-1])}
    compute = {"cpi_ft parts": parts} | {m: run.optimizer_steps(steps) for m, steps in trained.items()}
    return run_evaluations(run, methods, {"optimizer steps": compute, "core size p": core_size(run)["p"]})
