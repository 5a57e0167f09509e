"""The whole pipeline, adapter and dense mode, on a tiny random Llama and two tiny synthetic tasks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from runs import write_lines

from peft_isolate.pipeline import run_pipeline
from peft_isolate.recipe import load_recipe
from peft_isolate.regions import CoreRegions


def _effective_weights(run_dir, stage, mode, base_dir):
    """The merged weights {name: flat tensor} of a stage's artifact."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    path = run_dir / "stages" / str(stage)
    if mode == "dense":
        model = AutoModelForCausalLM.from_pretrained(path)
    else:
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), path).merge_and_unload()
    return {n: p.detach().flatten() for n, p in model.named_parameters()}


@pytest.mark.parametrize("mode", ["adapter", "dense"])
def test_pipeline_end_to_end(recipe_file, tiny_dir, mode):
    recipe = load_recipe(recipe_file, [f"mode={mode}"])
    results = run_pipeline(recipe)
    out = Path(recipe.output_dir)
    fused = "fused" if mode == "dense" else "fused/delta.safetensors"
    for artifact in [
        "probes/upper",
        "cores/upper.safetensors",
        "plan.json",
        "overlap.png",
        fused,
        "stages/0",
        "stages/1",
        "final",
        "results.json",
        "results.md",
        "scores.png",
    ]:
        assert (out / artifact).exists(), artifact
    staged = {"cpi_ft", "multitask", "multistage_random"}
    assert set(results["methods"]) == {"base", "probe", "lora_multitask"} | staged | {f"{m}@0" for m in staged}
    for entry in results["methods"].values():
        assert set(entry["tasks"]) == {"upper", "count"} and all(0 <= s <= 1 for s in entry["tasks"].values())
    # the first stage's cores are frozen in the second: effective weights there are bit-identical
    plan = json.loads((out / "plan.json").read_text())
    assert len(plan["stages"]) == 2 and plan["stages"][1]["frozen"] == plan["stages"][0]["tasks"]
    first_core = CoreRegions.load(out / "cores" / f"{plan['stages'][0]['tasks'][0]}.safetensors")
    before, after = (_effective_weights(out, k, mode, tiny_dir) for k in (0, 1))
    checked = moved = 0
    for name, idx in first_core.indices.items():
        idx = idx.long()
        assert torch.equal(before[name][idx], after[name][idx]), name
        checked += idx.numel()
        moved += int((before[name] != after[name]).sum())
    assert checked > 0 and moved > 0  # the second stage did train, just not there
    # a rerun skips every step
    state = (out / "state.json").read_text()
    run_pipeline(recipe)
    assert (out / "state.json").read_text() == state


@pytest.mark.parametrize("mode", ["adapter", "dense"])
def test_reselect_finds_later_cores_from_the_previous_stage(recipe_file, tiny_dir, mode):
    """stages.reselect: the second group's core comes from a probe started from stage 0's model; stage 1 trains
    there and only there in adapter mode (dense mode trains every unlocked entry and locks the cores stages
    trained), and the first core stays bit-identical."""
    recipe = load_recipe(recipe_file, [f"mode={mode}", "stages.reselect=true", "baselines=[]"])
    run_pipeline(recipe, until="train-stage")
    out = Path(recipe.output_dir)
    first, second = (s["tasks"][0] for s in json.loads((out / "plan.json").read_text())["stages"])
    assert (out / "probes" / f"{second}@1").is_dir()
    original = CoreRegions.load(out / "cores" / f"{second}.safetensors")
    reselected = CoreRegions.load(out / "cores" / f"{second}@1.safetensors")
    assert any(not torch.equal(reselected.indices[n], original.indices[n]) for n in original.indices)
    first_core = CoreRegions.load(out / "cores" / f"{first}.safetensors")
    before, after = (_effective_weights(out, k, mode, tiny_dir) for k in (0, 1))
    moved = 0
    for name, idx in reselected.indices.items():
        changed = torch.nonzero(before[name] != after[name]).flatten()
        assert mode == "dense" or torch.isin(changed, idx.long()).all(), name
        assert torch.equal(before[name][first_core.indices[name].long()], after[name][first_core.indices[name].long()])
        moved += changed.numel()
    assert moved > 0
    state = (out / "state.json").read_text()
    run_pipeline(recipe, until="train-stage")
    assert (out / "state.json").read_text() == state


def test_a_data_file_edited_in_place_redoes_its_task_probe(recipe_file):
    recipe = load_recipe(recipe_file)
    run_pipeline(recipe, until="probe")
    out = Path(recipe.output_dir)
    before = json.loads((out / "state.json").read_text())
    upper = Path(recipe.tasks["upper"].source)
    upper.write_text(upper.read_text().replace("upper", "UPPER"))
    run_pipeline(recipe, until="probe")
    after = json.loads((out / "state.json").read_text())
    assert after["probes:upper"] != before["probes:upper"]
    assert after["probes:count"] == before["probes:count"]


def test_eval_items_rescores_a_finished_run_without_training_again(recipe_file, tmp_path):
    """`eval.items` scores on more held-out items; no training step's key moves. Each task's eval file has 8 rows
    answered with the task's majority training answer, then 8 with another, so the majority baseline reads
    which items were scored: 1.0 over the first 8, 0.5 over 16."""
    from collections import Counter

    with pytest.raises(ValueError, match="eval.items: task '(upper|count)' holds its eval items out of its source"):
        load_recipe(recipe_file, ["eval.items=16"])
    data = yaml.safe_load(recipe_file.read_text())
    for name, task in data["tasks"].items():
        rows = [json.loads(line) for line in Path(task["source"]).read_text().splitlines()]
        common = Counter(r["response"] for r in rows).most_common(1)[0][0]
        held = [{"prompt": f"{name} {i}", "response": common if i < 8 else "none of these"} for i in range(16)]
        task["eval_source"] = write_lines(tmp_path / f"{name}-eval.jsonl", held)
    data |= {"baselines": [], "eval": {**data["eval"], "stages": False}}
    recipe_file.write_text(yaml.safe_dump(data))
    state = Path(data["output_dir"]) / "state.json"
    first = run_pipeline(load_recipe(recipe_file))
    before = json.loads(state.read_text())
    again = run_pipeline(load_recipe(recipe_file, ["eval.items=16"]))
    after = json.loads(state.read_text())
    assert first["majority"] == {"upper": 1.0, "count": 1.0} and again["majority"] == {"upper": 0.5, "count": 0.5}
    trained = [k for k in before if not k.startswith("eval:")]
    assert trained and all(after[k] == before[k] for k in trained)
    assert all(after[k] != before[k] for k in before if k.startswith("eval:"))


def test_sparse_probes_share_one_support_and_the_plan_takes_chance_within_it(recipe_file):
    from safetensors.torch import load_file

    from peft_isolate.plan import expected_jaccard

    recipe = load_recipe(recipe_file, ["probe={method: sparse, density: 0.2, steps: 4, lr: 0.01}"])
    run_pipeline(recipe, until="plan")
    out = Path(recipe.output_dir)
    supports = [load_file(out / "probes" / t / "adapter_model.safetensors") for t in ("upper", "count")]
    assert supports[0].keys() == supports[1].keys()
    assert all(torch.equal(supports[0][k], supports[1][k]) for k in supports[0] if k.endswith("_indices"))
    universe = sum(t.numel() for k, t in supports[0].items() if k.endswith("_indices"))
    plan = json.loads((out / "plan.json").read_text())
    sizes = plan["core_sizes"]
    assert plan["chance"][0][1] == pytest.approx(expected_jaccard(sizes["upper"], sizes["count"], universe))


def test_recipe_errors_name_the_problem(tmp_path, recipe_file):
    data = yaml.safe_load(recipe_file.read_text())
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**data, "densty": 0.1}))
    with pytest.raises(ValueError, match="densty"):
        load_recipe(bad)
    bad.write_text(yaml.safe_dump({**data, "probe": {"method": "magic"}}))
    with pytest.raises(ValueError, match="probe.method"):
        load_recipe(bad)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_recipe(tmp_path / "nowhere.yaml")
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_recipe(bad)
    bad.write_text(yaml.safe_dump({**data, "probe": None}))
    assert load_recipe(bad, ["probe.steps=3"]).probe.steps == 3  # an empty section takes keys
    with pytest.raises(ValueError, match="model is .* not a section"):
        load_recipe(recipe_file, ["model.name=x"])
    with pytest.raises(ValueError, match="override 'probe.steps=\\[' is not valid YAML"):
        load_recipe(recipe_file, ["probe.steps=["])
    tasks = data["tasks"]
    bad.write_text(yaml.safe_dump({**data, "tasks": {"../up": tasks["upper"], "count": tasks["count"]}}))
    with pytest.raises(ValueError, match="task name '../up'"):
        load_recipe(bad)
    with pytest.raises(ValueError, match="empty group"):
        load_recipe(recipe_file, ["plan.groups=[[upper, count], []]"])
    with pytest.raises(ValueError, match="fusion.backbone: multistage never enters adapter mode"):
        load_recipe(recipe_file, ["fusion.backbone=multistage"])
    assert load_recipe(recipe_file, ["mode=dense", "fusion.backbone=mean"]).backbone == "mean"


def test_budgets_in_epochs_and_baselines_match_cpi_ft_steps(recipe_file):
    from peft_isolate.pipeline import StageJob, baseline_jobs, load_run

    recipe = load_recipe(recipe_file, ["stages={epochs: 2, lr: 0.01, sample: 0.5}", "probe={epochs: 1}"])
    run = load_run(recipe)
    upper = len(run.tasks["upper"].train)
    assert recipe.probe.budget(upper, run.global_batch) == -(-upper // 4)
    assert run.stage_steps(["upper"]) == -(-2 * round(0.5 * upper) // 4)
    cpi = [StageJob(["upper"], 7), StageJob(["count"], 4)]
    total = sum(job.steps for job in cpi)
    for baseline in ["multitask", "multistage_random", "multitask_all_weights_matched"]:
        (jobs,) = baseline_jobs(recipe, baseline, ["upper", "count"], len(cpi), total).values()
        assert [j.steps for j in jobs] == [6, 5]  # the total spread evenly over as many stages as CPI-FT's
    single = baseline_jobs(recipe, "single_task_matched", ["upper", "count"], len(cpi), 30)
    assert {m: [j.steps for j in jobs] for m, jobs in single.items()} == {
        "single_task_matched:upper": [30],
        "single_task_matched:count": [30],
    }
    with pytest.raises(ValueError, match="steps or epochs"):
        load_recipe(recipe_file, ["stages={steps: 3, epochs: 1}"])


def test_missing_data_file_and_unknown_generator_are_named(recipe_file, tmp_path):
    from peft_isolate.pipeline import load_run

    with pytest.raises(FileNotFoundError, match="nothing.jsonl"):
        load_run(load_recipe(recipe_file, [f"tasks.upper.source={tmp_path / 'nothing.jsonl'}"]))
    with pytest.raises(ValueError, match="no_such_generator"):
        load_run(load_recipe(recipe_file, ["tasks.upper.source=reasoning_gym:no_such_generator"]))
