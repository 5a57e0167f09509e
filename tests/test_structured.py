"""Structured core regions: whole rows, columns and blocks, selected by their share of the update."""

from __future__ import annotations

import math
import random
import re
import warnings

import pytest
import torch
from peft import get_peft_model

from peft_isolate import CoreRegions, IsolationConfig, find_core_regions
from peft_isolate.plan import expected_jaccard, plan_stages
from peft_isolate.regions import BLOCK_SIZES, as_matrix, unit_entries
from peft_isolate.selection import SCOPES, layer_of
from peft_isolate.sources import ModelDelta

GRANULARITIES = [("row", None), ("column", None), ("block", 16)]


def brute_force(tuned: dict[str, torch.Tensor], p: float, scope: str, granularity: str, block: int | None):
    """Every unit of every weight listed with its score, ranked by (-score, parameter order, unit), each taken
    while its entries fit: the rule, written out one unit at a time."""
    names = sorted(tuned, key=lambda n: [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", n)])
    group = {n: "" if scope == "global" else layer_of(n) if scope == "layer" else n for n in names}
    units = []  # (group, -score, parameter index, unit, entries)
    for i, n in enumerate(names):
        rows, cols = as_matrix(tuple(tuned[n].shape))
        w = tuned[n].reshape(rows, cols).double()
        if granularity == "row":
            cells = [[(r, c) for c in range(cols)] for r in range(rows)]
        elif granularity == "column":
            cells = [[(r, c) for r in range(rows)] for c in range(cols)]
        else:
            cells = [
                [(r, c) for r in range(r0, min(r0 + block, rows)) for c in range(c0, min(c0 + block, cols))]
                for r0 in range(0, rows, block)
                for c0 in range(0, cols, block)
            ]
        for u, entries in enumerate(cells):
            score = sum(float(w[r, c]) ** 2 for r, c in entries)
            units.append((group[n], -score, i, u, [r * cols + c for r, c in entries]))
    picked = {n: [] for n in names}
    for g in dict.fromkeys(group.values()):
        budget = math.floor(p * sum(tuned[n].numel() for n in names if group[n] == g) + 1e-9)
        for _, _, i, _, entries in sorted(u for u in units if u[0] == g):
            if len(entries) <= budget:
                picked[names[i]] += entries
                budget -= len(entries)
    return {n: sorted(v) for n, v in picked.items()}


@pytest.mark.parametrize("case", range(24))
def test_unit_top_p_against_brute_force(case):
    rng = random.Random(case)
    granularity, block = GRANULARITIES[case % 3]
    names = [f"model.layers.{i}.{m}.weight" for i in range(rng.randint(1, 2)) for m in "ab"] + ["model.norm.weight"]
    g = torch.Generator().manual_seed(case)
    levels = rng.choice([2, 3, 50])  # few levels: many tied units
    shapes = {n: (rng.randint(1, 20), rng.randint(1, 40)) for n in names[:-1]} | {names[-1]: (rng.randint(1, 30),)}
    tuned = {n: torch.randint(0, levels, s, generator=g).float() * 0.5 for n, s in shapes.items()}
    base = {n: torch.zeros_like(t) for n, t in tuned.items()}
    p, scope = rng.choice([0.05, 0.1, 0.3, 0.5, 1.0]), rng.choice(SCOPES)
    expected = brute_force(tuned, p, scope, granularity, block)
    if not any(expected.values()):
        pytest.skip("no unit fits the budget in this draw")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zero-score units taken when p exceeds what changed
        got = find_core_regions(
            ModelDelta(base, tuned),
            p=p,
            scope=scope,
            chunk_size=rng.choice([3, 64, 1000]),
            granularity=granularity,
            block=block,
        )
    assert {n: got[n].tolist() for n in names} == expected
    assert got.granularity == granularity and got.block == block


def test_unit_entries_cover_each_weight_exactly_once():
    for shape in [(5, 7), (33, 17), (40,), (16, 16)]:
        for granularity, block in [("row", None), ("column", None), *[("block", b) for b in BLOCK_SIZES]]:
            rows, cols = as_matrix(shape)
            units = {"row": rows, "column": cols}.get(granularity) or -(-rows // block) * -(-cols // block)
            flat = unit_entries(torch.arange(units), shape, granularity, block)
            assert flat.tolist() == list(range(math.prod(shape))), (shape, granularity, block)


def test_a_structured_support_trains_like_the_same_entries_as_elements(load_tiny, tmp_path):
    """Row cores of one task, then the same entries as an element support: the same forward, merge and gradients
    (both are entry sets to the layer); locked entries inside a later task's rows stay bit-identical through
    AdamW with weight decay, and the plan reads the units' overlap against chance of unit sets."""
    model = load_tiny()
    weights = {n: p.detach() for n, p in model.named_parameters() if n.endswith("proj.weight")}
    torch.manual_seed(0)
    tuned_a = {n: w + torch.randn_like(w) * torch.rand(w.shape[0], 1) for n, w in weights.items()}
    tuned_b = {n: w + torch.randn_like(w) * torch.rand(w.shape[0], 1) for n, w in weights.items()}
    rows_a = find_core_regions(ModelDelta(weights, tuned_a), p=0.1, granularity="row")
    rows_b = find_core_regions(ModelDelta(weights, tuned_b), p=0.1, granularity="row")
    rows_a.save(tmp_path / "a.safetensors")
    back = CoreRegions.load(tmp_path / "a.safetensors")
    assert back == rows_a and back.granularity == "row" and back.block is None
    as_elements = CoreRegions(dict(rows_a.indices), rows_a.shapes)
    as_elements.save(tmp_path / "e.safetensors")
    tokens = torch.arange(3, 19).view(2, 8)
    outs = []
    for path in ("a", "e"):
        cfg = IsolationConfig(
            target_modules="all-linear", init="regions", regions=str(tmp_path / f"{path}.safetensors")
        )
        cfg.init_weights = False
        peft_model = get_peft_model(load_tiny(), cfg)
        loss = peft_model(tokens, labels=tokens).loss
        loss.backward()
        grads = [p.grad for p in peft_model.parameters() if p.requires_grad and p.numel()]
        merged = peft_model.merge_and_unload().state_dict()
        outs.append((float(loss), grads, merged))
    assert outs[0][0] == outs[1][0] and all(torch.equal(a, b) for a, b in zip(outs[0][1], outs[1][1], strict=True))
    assert all(torch.equal(outs[0][2][n], outs[1][2][n]) for n in outs[0][2])

    # stage 2 trains B's rows minus A's locked entries: partly locked units
    peft_model = get_peft_model(
        load_tiny(),
        IsolationConfig(target_modules="all-linear", init="regions", regions=str(tmp_path / "a.safetensors")),
    )
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.normal_()
    peft_model.base_model.hold()
    peft_model.base_model.lock(rows_a)
    assert peft_model.base_model.add_trainable(rows_b.difference(rows_a)) == rows_b.difference(rows_a).size
    assert rows_b.intersection(rows_a).size > 0  # some of B's rows hold A's locked entries
    before = {n: t.clone() for n, t in peft_model.state_dict().items() if "isolation_frozen_values" in n}
    assert sum(t.numel() for t in before.values()) == rows_a.size  # every locked entry is checked
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        peft_model(tokens, labels=tokens).loss.backward()
        opt.step()
        opt.zero_grad()
    after = peft_model.state_dict()
    assert all(torch.equal(after[n], b) for n, b in before.items())

    plan = plan_stages({"a": rows_a, "b": rows_b}, tau=0.5)
    rows = sum(s[0] for s in rows_a.shapes.values())
    chosen_a, chosen_b = (sum(c[n].numel() // s[1] for n, s in c.shapes.items()) for c in (rows_a, rows_b))
    assert plan.chance[0][1] == pytest.approx(
        expected_jaccard(chosen_a, chosen_b, rows), rel=1e-12
    )  # rows, not entries
    assert plan.chance[0][1] != pytest.approx(expected_jaccard(rows_a.size, rows_b.size, rows_a.numel), rel=0.05)


@pytest.mark.parametrize("init", ["random", "magnitude"])
@pytest.mark.parametrize(("granularity", "block"), GRANULARITIES)
def test_random_and_magnitude_supports_take_whole_units(load_tiny, init, granularity, block):
    model = load_tiny()
    weight = model.get_submodule("model.layers.0.mlp.down_proj").weight.detach().clone()  # [64, 128]
    config = IsolationConfig(target_modules="all-linear", density=0.1, init=init, granularity=granularity, block=block)
    peft_model = get_peft_model(model, config)
    layer = peft_model.base_model.model.get_submodule("model.layers.0.mlp.down_proj")
    idx = layer.isolation_indices["default"].long()
    rows, cols = weight.shape
    per_unit = cols if granularity == "row" else rows if granularity == "column" else block * block
    assert idx.numel() == (int(0.1 * rows * cols) // per_unit) * per_unit  # whole units that fit in the count
    if granularity == "block":
        units = torch.unique((idx // cols // block) * (cols // block) + idx % cols // block)
    else:
        units = torch.unique(idx // cols if granularity == "row" else idx % cols)
    assert torch.equal(unit_entries(units, (rows, cols), granularity, block), idx)  # each unit whole
    if init == "magnitude":  # the units with the largest summed squares
        view = {"row": weight.square().sum(1), "column": weight.square().sum(0)}.get(granularity)
        if view is not None:
            assert set(units.tolist()) == set(torch.topk(view, units.numel()).indices.tolist())
    with pytest.raises(ValueError, match="give block="):
        IsolationConfig(target_modules="all-linear", granularity="block")


def test_a_density_below_one_unit_warns_that_those_weights_train_nothing(load_tiny):
    config = IsolationConfig(target_modules="all-linear", density=0.01, granularity="block", block=64)
    with pytest.warns(UserWarning, match="fewer entries than one block holds, so they train nothing"):
        peft_model = get_peft_model(load_tiny(), config)  # 1% of a 64 x 128 weight: 81 entries, a block is 4096
    assert sum(p.numel() for p in peft_model.parameters() if p.requires_grad) == 0
