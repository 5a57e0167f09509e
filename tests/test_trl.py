"""TRL as a training path: `trl.SFTTrainer` never moves a locked entry of an isolation adapter (examples/)."""

from __future__ import annotations

import importlib.util
import math
from functools import reduce
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from safetensors.torch import load_file
from tiny import tiny_llama

from peft_isolate import CoreRegions, IsolationConfig, IsolationLayer
from peft_isolate.data import Example
from peft_isolate.pipeline import run_pipeline
from peft_isolate.plan import StagePlan
from peft_isolate.recipe import load_recipe
from peft_isolate.sources import IsolationDelta
from peft_isolate.training import TrainSettings

pytest.importorskip("trl")
pytestmark = pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated")  # TRL's SFTConfig default
spec = importlib.util.spec_from_file_location("trl_stage", Path(__file__).parents[1] / "examples" / "trl_stage.py")
trl_stage = importlib.util.module_from_spec(spec)
spec.loader.exec_module(trl_stage)


def _frozen_part(model) -> dict[str, tuple[torch.Tensor, ...]]:
    """Per isolation layer: the frozen (held and locked) indices, values and lock flags, copied."""
    return {
        name: tuple(
            t["default"].detach().clone()
            for t in (m.isolation_frozen_indices, m.isolation_frozen_values, m.isolation_frozen_locked)
        )
        for name, m in model.named_modules()
        if isinstance(m, IsolationLayer)
    }


def test_sft_trainer_leaves_locked_entries_bit_identical(tmp_path):
    model, tokenizer = tiny_llama()
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters() if n.endswith("proj.weight")}
    g = torch.Generator().manual_seed(0)

    def core() -> CoreRegions:  # 5% of each targeted weight
        picks = {n: torch.randperm(math.prod(s), generator=g)[: math.prod(s) // 20] for n, s in shapes.items()}
        return CoreRegions({n: idx.sort().values.int() for n, idx in picks.items()}, shapes)

    earlier, own = core(), core()
    support = earlier.union(own)
    regions = support.save(tmp_path / "support.safetensors")
    model = get_peft_model(model, IsolationConfig(target_modules="all-linear", init="regions", regions=str(regions)))
    values = {n: torch.randn(idx.numel(), generator=g) for n, idx in support.items()}
    model.base_model.add_trainable(support, values=values)  # what an earlier stage left: no entry at zero
    model.base_model.hold()
    model.base_model.lock(earlier)
    model.base_model.add_trainable(own.difference(earlier))
    before = _frozen_part(model)
    trainable = torch.cat([p.detach().flatten().clone() for p in model.parameters() if p.requires_grad])

    examples = [Example(({"role": "user", "content": f"upper ab{i}"},), "AB") for i in range(16)]
    settings = TrainSettings(steps=3, lr=1e-2, batch_size=4, max_seq_len=32, weight_decay=0.1)
    result = trl_stage.train_with_trl(model, tokenizer, examples, settings, tmp_path / "work")

    assert result.global_step == 3
    after = _frozen_part(model)
    locked = sum(int(flags.sum()) for _, _, flags in after.values())
    assert locked == earlier.size and all(v[1][v[2]].abs().sum() > 0 for v in before.values())
    for name in before:
        for was, now in zip(before[name], after[name], strict=True):
            assert torch.equal(was, now), name  # held and locked entries: not one bit moved
    moved = torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad])
    assert moved.shape == trainable.shape and not torch.equal(moved, trainable)


def test_example_trains_run_stages_from_their_start_with_earlier_cores_locked(recipe_file, tmp_path):
    recipe = load_recipe(recipe_file, ["training.weight_decay=0.1"])
    run_pipeline(recipe, until="train-stage")
    run, base = Path(recipe.output_dir), recipe.model
    for k in (0, 1):
        trl_stage.main([str(run), str(k), "--out", str(tmp_path / f"trl-{k}")])
    plan = StagePlan.load(run / "plan.json")
    cores = {t: CoreRegions.load(run / "cores" / f"{t}.safetensors") for t in recipe.tasks}

    # stage 0 starts from the fused values and trains its group's cores; the rest of the support stays held
    fused = load_file(run / "fused" / "delta.safetensors")
    trained = reduce(CoreRegions.union, (cores[t] for t in plan.groups[0]))
    changed = 0
    for name, (idx, val) in IsolationDelta(tmp_path / "trl-0", base).entries.items():
        at = torch.isin(idx, trained[name].long())
        assert torch.equal(val[~at], fused[name][~at]), name
        changed += int((val[at] != fused[name][at]).sum())
    assert changed > 0

    # stage 1 starts from the pipeline's stage 0 and locks its cores: their values stay those of stage 0
    locked = plan.frozen_regions(1, cores)
    assert locked is not None and locked.size > 0
    previous, ours, theirs = (
        IsolationDelta(d, base).entries for d in (run / "stages" / "0", run / "stages" / "1", tmp_path / "trl-1")
    )
    changed = 0
    for name, (idx, val) in theirs.items():
        at = torch.isin(idx, locked[name].long())
        for other in (previous, ours):
            o_idx, o_val = other[name]
            assert torch.equal(idx, o_idx), name  # one support all along
            assert torch.equal(val[at], o_val[at]), name  # bit for bit
        changed += int((val[~at] != previous[name][1][~at]).sum())
    assert changed > 0
    flags = [t for k, t in load_file(tmp_path / "trl-1" / "adapter_model.safetensors").items() if "frozen_locked" in k]
    assert sum(int(f.sum()) for f in flags) == locked.size  # locked for good, not merely held
