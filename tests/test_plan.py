"""Stage plans: components at tau, stage orders, frozen sets, JSON round trip and the `plan` CLI."""

from __future__ import annotations

import warnings

import pytest
import torch

from peft_isolate.cli import main
from peft_isolate.plan import StagePlan, connected_groups, expected_jaccard, order_groups, plan_stages
from peft_isolate.regions import CoreRegions

# A-B overlap 0.6, B-C 0.2, A-C 0.05, D alone
OVERLAP = [
    [1.0, 0.6, 0.05, 0.0],
    [0.6, 1.0, 0.2, 0.0],
    [0.05, 0.2, 1.0, 0.01],
    [0.0, 0.0, 0.01, 1.0],
]


@pytest.mark.parametrize(
    ("tau", "groups"),
    [
        (0.0, [[0, 1, 2, 3]]),  # tau = 0: one group, plain multi-task SFT
        (0.1, [[0, 1, 2], [3]]),  # A-C joined through B
        (0.3, [[0, 1], [2], [3]]),
        (0.6, [[0, 1], [2], [3]]),  # >= tau links
        (0.61, [[0], [1], [2], [3]]),
        (1.5, [[0], [1], [2], [3]]),  # tau > 1: singletons
    ],
)
def test_connected_groups_on_a_hand_made_matrix(tau, groups):
    assert connected_groups(OVERLAP, tau) == groups
    assert connected_groups(torch.tensor(OVERLAP), tau) == groups


def test_group_orders():
    groups = [[0, 1, 2], [3], [4, 5]]
    assert order_groups(groups, "size") == [[3], [4, 5], [0, 1, 2]]
    union = {(0, 1, 2): 5, (3,): 9, (4, 5): 1}
    assert order_groups(groups, "union", union_size=lambda g: union[tuple(g)]) == [[4, 5], [0, 1, 2], [3]]
    shuffled = order_groups(groups, "random", seed=3)
    assert shuffled == order_groups(groups, "random", seed=3)
    assert sorted(shuffled) == sorted(groups)
    assert len({tuple(map(tuple, order_groups(groups, "random", seed=s))) for s in range(20)}) > 1
    with pytest.raises(ValueError, match="not one of"):
        order_groups(groups, "alphabetical")


def regions(entries: list[int]) -> CoreRegions:
    return CoreRegions({"w": torch.tensor(sorted(entries), dtype=torch.int32)}, {"w": (10, 10)}, p=0.1)


@pytest.fixture
def cores() -> dict[str, CoreRegions]:
    return {
        "math": regions(list(range(0, 10))),
        "code": regions(list(range(2, 12))),  # J(math, code) = 8 / 12
        "chat": regions(list(range(50, 56))),
        "logic": regions(list(range(80, 83))),
    }


def test_plan_stages_groups_orders_and_frozen_sets(cores):
    plan = plan_stages(cores, tau=0.1, order="size")
    assert plan.groups == [["chat"], ["logic"], ["math", "code"]]
    assert plan.jaccard[0][1] == pytest.approx(8 / 12)
    assert 0 < plan.chance[0][1] < 0.1  # 10 and 10 of 100 at random: about 0.05
    assert [s.frozen for s in plan.stages] == [[], ["chat"], ["chat", "logic"]]
    assert [s.core_size for s in plan.stages] == [6, 3, 12]
    assert [s.frozen_size for s in plan.stages] == [0, 6, 9]
    frozen = plan.frozen_regions(2, cores)
    assert frozen == cores["chat"].union(cores["logic"]) and plan.frozen_regions(0, cores) is None
    union_first = plan_stages(cores, tau=0.1, order="union", freeze="all")
    assert union_first.groups == [["logic"], ["chat"], ["math", "code"]]
    assert union_first.stages[0].frozen == ["chat", "math", "code"]
    assert plan_stages(cores, tau=0.0).groups == [["math", "code", "chat", "logic"]]
    assert len(plan_stages(cores, tau=1.1).stages) == 4
    with pytest.raises(ValueError, match="freeze"):
        plan_stages(cores, freeze="nothing")


def test_plan_stages_chance_within_a_shared_support_and_the_tau_it_makes_meaningless(cores):
    # the same cores, as if found within one 20-entry probe support: 10 and 10 of 20 overlap by chance at ~0.35
    with pytest.warns(UserWarning, match=r"tau=0.3 is at or under .*\(0.3\d\d within 20 entries\).*set tau above"):
        plan = plan_stages(cores, tau=0.3, universe=20)
    assert plan.chance[0][1] == pytest.approx(expected_jaccard(10, 10, 20))
    assert plan.chance[2][3] == pytest.approx(expected_jaccard(6, 3, 20))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert plan_stages(cores, tau=0.5, universe=20).groups  # above the chance level
        plan_stages(cores, tau=0.3, universe=20, groups=[["math", "code", "chat", "logic"]])  # no grouping made
        plan_stages(cores, tau=0.1)  # chance over all 100 entries is ~0.05


def test_plan_json_round_trip(cores, tmp_path):
    plan = plan_stages(cores, tau=0.1, order="random", seed=7)
    plan.save(tmp_path / "plan.json")
    assert StagePlan.load(tmp_path / "plan.json") == plan
    (tmp_path / "bad.json").write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match="not a stage plan.*recreate it"):
        StagePlan.load(tmp_path / "bad.json")


def test_plan_cli_prints_overlap_and_writes_json_and_heatmap(cores, tmp_path, capsys):
    for task, c in cores.items():
        c.save(tmp_path / "cores" / f"{task}.safetensors")
    files = [str(tmp_path / "cores" / f"{t}.safetensors") for t in cores]
    out = tmp_path / "run" / "plan.json"
    assert main(["plan", *files, "--tau", "0.1", "--order", "size", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "chance" in printed and "0.6667" in printed and "stages/2: train math, code" in printed
    plan = StagePlan.load(out)
    assert plan.tasks == list(cores) and plan.groups == [["chat"], ["logic"], ["math", "code"]]
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_given_groups_replace_grouping_and_order(cores):
    tasks = list(cores)
    given = [[tasks[-1]], tasks[:-1]]
    plan = plan_stages(cores, tau=0.0, groups=given)
    assert plan.groups == given and plan.order == "given"
    assert plan.stages[1].frozen == [tasks[-1]]
    with pytest.raises(ValueError, match="exactly once"):
        plan_stages(cores, groups=[tasks[:1]])


def test_freeze_none_freezes_nothing(cores):
    assert all(not stage.frozen for stage in plan_stages(cores, tau=0.1, freeze="none").stages)
