"""Honest compute: compute-matched baselines, a multi-task baseline on all targeted weights, and `regions.p: auto`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from peft_isolate.pipeline import run_pipeline, spread_like
from peft_isolate.recipe import load_recipe
from peft_isolate.regions import CoreRegions
from peft_isolate.selection import AUTO_GRID, choose_p, mass_curve
from peft_isolate.sources import ModelDelta


def test_mass_curve_and_choice_on_a_delta_whose_curve_is_known():
    """1000 entries: 10 of 10 (mass 1000) and 990 of 1 (mass 990). The top 0.1% (1 entry) holds 100/1990, 0.5%
    500/1990, 1% all 1000 of the tens, 2% those and 10 ones."""
    delta = torch.ones(1000)
    delta[torch.arange(3, 1000, 100)] = 10.0
    source = ModelDelta({"w": torch.zeros(1000)}, {"w": delta})
    curve = mass_curve(source, [0.001, 0.005, 0.01, 0.02, 1.0])
    assert curve == pytest.approx([100 / 1990, 500 / 1990, 1000 / 1990, 1010 / 1990, 1.0], rel=1e-12)
    grid = mass_curve(source)
    choice = choose_p({"a": grid, "b": grid}, share=0.5)
    assert choice["p"] == 0.01 and AUTO_GRID[AUTO_GRID.index(0.01) - 1] < 0.01  # 0.75% holds only 750/1990
    assert choice["held"] == {"a": round(1000 / 1990, 4), "b": round(1000 / 1990, 4)}
    assert "none does" in choose_p({"a": grid}, share=0.99)["rule"] and choose_p({"a": grid}, 0.99)["p"] == 0.1


def test_unknown_baseline_ids_are_refused(recipe_file):
    with pytest.raises(ValueError, match="baselines.0: Input should be 'multitask'.*'multitask_matched'"):
        load_recipe(recipe_file, ["baselines=[multitask_matchd]"])
    with pytest.raises(ValueError, match="dense mode's multitask baseline trains every weight"):
        load_recipe(recipe_file, ["mode=dense", "baselines=[multitask_all_weights]"])


def test_matched_baselines_all_weights_and_auto_p_end_to_end(recipe_file):
    """Every new option in one tiny run: optimizer steps counted from the trainer states equal probes + stages for
    every matched baseline; the spread support has the size of CPI-FT's, seeded; p.json and plan.json say the p."""
    baselines = ["multitask", "multitask_matched", "lora_multitask_matched", "multitask_all_weights_matched"]
    baselines += ["single_task_matched"]
    recipe = load_recipe(recipe_file, ["regions.p=auto", "regions.mass=0.3", f"baselines=[{','.join(baselines)}]"])
    results = run_pipeline(recipe)
    out = Path(recipe.output_dir)
    steps = results["meta"]["optimizer steps"]
    parts = steps["cpi_ft parts"]
    assert parts == {"probes": 2 * 4, "stages": 2 * 4}  # two tasks' 4-step probes, two 4-step stages
    counted = json.loads((out / "compute.json").read_text())
    assert (
        steps["cpi_ft"]
        == sum(counted[f"probes:{t}"] for t in ("upper", "count")) + counted["stages:0"] + counted["stages:1"]
        == sum(parts.values())
    )
    for matched in ("multitask_matched", "lora_multitask_matched", "multitask_all_weights_matched"):
        assert steps[matched] == steps["cpi_ft"], matched
    assert steps["multitask"] == parts["stages"]
    assert steps["single_task_matched:upper"] == steps["cpi_ft"]
    assert {"multitask_matched", "multitask_all_weights_matched", "single_task_matched"} <= set(results["methods"])

    support, spread = (CoreRegions.load(out / f) for f in ("support.safetensors", "all_weights_support.safetensors"))
    assert spread.size == support.size and spread.shapes == support.shapes and spread != support
    assert spread == spread_like(support, recipe.training.seed) != spread_like(support, recipe.training.seed + 1)

    chosen = json.loads((out / "p.json").read_text())
    plan = json.loads((out / "plan.json").read_text())
    assert plan["p"]["p"] == chosen["p"] == results["meta"]["core size p"] and chosen["p"] in AUTO_GRID
    assert all(held >= 0.3 for held in chosen["held"].values()) and "30%" in plan["p"]["rule"]
    assert CoreRegions.load(out / "cores" / "upper.safetensors").p == chosen["p"]
    assert f"core size p: {chosen['p']}" in (out / "results.md").read_text()
