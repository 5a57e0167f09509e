"""The whole adapter-mode pipeline on a tiny random Llama and two tiny synthetic tasks."""

from __future__ import annotations

import json
import random

import pytest
import torch
import yaml
from safetensors.torch import load_file

from peft_isolate.pipeline import run_pipeline
from peft_isolate.recipe import load_recipe
from peft_isolate.regions import CoreRegions


def _write_task(path, make, n=48, seed=0):
    rng = random.Random(seed)
    path.write_text("\n".join(json.dumps(make(rng)) for _ in range(n)) + "\n")
    return str(path)


def _upper(rng):
    word = "".join(rng.choice("abcdef") for _ in range(4))
    return {"prompt": f"upper {word}", "response": word.upper()}


def _count(rng):
    word = "".join(rng.choice("ab") for _ in range(5))
    return {"prompt": f"count a in {word}", "response": str(word.count("a"))}


@pytest.fixture
def recipe_file(tmp_path, tiny_dir):
    recipe = {
        "model": str(tiny_dir),
        "quantization": "none",
        "tasks": {
            "upper": {"source": _write_task(tmp_path / "upper.jsonl", _upper), "eval": 8},
            "count": {"source": _write_task(tmp_path / "count.jsonl", _count, seed=1), "eval": 8},
        },
        "probe": {"method": "lora", "steps": 4, "lr": 1e-2, "rank": 4},
        "regions": {"p": 0.05},
        "plan": {"tau": 0.9, "order": "size"},  # high tau: two stages, so the second one locks the first core
        "stages": {"steps": 4, "lr": 1e-2, "sample": 1.0},
        "training": {"batch_size": 4, "max_seq_len": 32, "weight_decay": 0.1},
        "baselines": ["multitask", "multistage_random"],
        "eval": {"max_new_tokens": 4, "batch_size": 8},
        "output_dir": str(tmp_path / "run"),
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _adapter_tensors(path):
    return {k: v for k, v in load_file(path / "adapter_model.safetensors").items()}


def test_adapter_pipeline_end_to_end(recipe_file):
    recipe = load_recipe(recipe_file)
    results = run_pipeline(recipe)
    out = recipe.output_dir
    from pathlib import Path

    out = Path(out)
    for artifact in ["probes/upper", "cores/upper.safetensors", "plan.json", "overlap.png", "fused/delta.safetensors",
                     "stages/0", "stages/1", "final", "results.json", "results.md", "scores.png"]:
        assert (out / artifact).exists(), artifact
    assert set(results["methods"]) == {"base", "cpi_ft", "multitask", "multistage_random"}
    for entry in results["methods"].values():
        assert set(entry["tasks"]) == {"upper", "count"} and all(0 <= s <= 1 for s in entry["tasks"].values())
    # the first stage's core is locked in the second: its effective values are bit-identical
    plan = json.loads((out / "plan.json").read_text())
    first_core = CoreRegions.load(out / "cores" / f"{plan['stages'][0]['tasks'][0]}.safetensors")
    s0, s1 = _adapter_tensors(out / "stages/0"), _adapter_tensors(out / "stages/1")
    checked = 0
    for key in s1:
        if not key.endswith("isolation_frozen_indices"):
            continue
        module = key.rsplit(".", 1)[0]
        name = module.removeprefix("base_model.model.") + ".weight"
        core = first_core.indices[name].long()
        if not core.numel():
            continue
        def values_at(t):
            idx = torch.cat([t[f"{module}.isolation_indices"], t[f"{module}.isolation_frozen_indices"]]).long()
            val = torch.cat([t[f"{module}.isolation_values"], t[f"{module}.isolation_frozen_values"]])
            return val[torch.searchsorted(idx.sort().values, core)], idx, val
        order0 = torch.cat([s0[f"{module}.isolation_indices"], s0[f"{module}.isolation_frozen_indices"]]).long()
        val0 = torch.cat([s0[f"{module}.isolation_values"], s0[f"{module}.isolation_frozen_values"]])
        order1 = torch.cat([s1[f"{module}.isolation_indices"], s1[f"{module}.isolation_frozen_indices"]]).long()
        val1 = torch.cat([s1[f"{module}.isolation_values"], s1[f"{module}.isolation_frozen_values"]])
        v0 = val0[order0.argsort()][torch.searchsorted(order0.sort().values, core)]
        v1 = val1[order1.argsort()][torch.searchsorted(order1.sort().values, core)]
        assert torch.equal(v0, v1)
        assert not torch.isin(core, s1[f"{module}.isolation_indices"].long()).any()
        checked += int(core.numel())
    assert checked > 0
    # a rerun skips every step
    state = (out / "state.json").read_text()
    run_pipeline(recipe)
    assert (out / "state.json").read_text() == state


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
