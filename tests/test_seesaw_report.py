"""bench/seesaw.py's paired bootstrap of CPI-FT's margin over a baseline on per-item scores whose answer is known,
the task sets bench/screen.py draws, and their pooled report."""

from __future__ import annotations

import importlib.metadata
import json
import random
import re
import statistics
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
import seesaw  # noqa: E402
from seesaw import bootstrap_margin, forgetting_section, margins_section, pooled_section  # noqa: E402

from peft_isolate.files import save_json  # noqa: E402
from peft_isolate.pipeline import load_run, probe_key  # noqa: E402


def _args(command: str):
    """seesaw.py's command line as its parser reads it, defaults filled in."""
    return seesaw.parse_args(command.split())


def _items(p: float, n: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    return [float(rng.random() < p) for _ in range(n)]


def test_a_clear_margin_is_separated_from_zero_and_no_margin_is_not():
    ahead = [
        (
            {"t": _items(0.6, 200, s), "u": _items(0.5, 200, s + 9)},
            {"t": _items(0.3, 200, s + 1), "u": _items(0.2, 200, s + 8)},
        )
        for s in range(3)
    ]
    margin, low, high = bootstrap_margin(ahead)
    assert 0.2 < margin < 0.4 and 0 < low < margin < high
    same = [({"t": _items(0.4, 200, s)}, {"t": _items(0.4, 200, s + 100)}) for s in range(3)]
    margin, low, high = bootstrap_margin(same)
    assert low < 0 < high and abs(margin) < 0.1


def test_paired_items_cancel_what_both_methods_share():
    """Identical per-item scores but for 10 items give an interval that holds only those 10 items' difference."""
    a = _items(0.5, 200, 0)
    b = list(a)
    for i in range(10):
        b[i] = 0.0 if a[i] else b[i]
    gain = sum(a[i] - b[i] for i in range(10)) / 200
    margin, low, high = bootstrap_margin([({"t": a}, {"t": b})])
    assert margin == pytest.approx(gain, abs=1e-12) and 0 <= low <= margin <= high <= 3 * gain


def test_the_table_says_which_margins_the_interval_separates():
    def seed(s):
        cpi = {"t": _items(0.7, 200, s)}
        return {
            "methods": {
                "cpi_ft": {"avg": sum(cpi["t"]) / 200, "items": cpi},
                "multitask": {"avg": 0.2, "items": {"t": _items(0.2, 200, s + 1)}},
                "lora_multitask": {"avg": 0.7, "items": {"t": _items(0.7, 200, s + 2)}},
                "probe": {"avg": 0.5, "items": {"other": [1.0]}},  # single-task rows: other items, no margin
            }
        }

    rows = "\n".join(margins_section([seed(0), seed(1)]))
    assert "| multitask | +" in rows and "yes, CPI-FT ahead" in rows.split("| multitask |")[1].split("\n")[0]
    assert "| no |" in rows.split("| lora_multitask |")[1].split("\n")[0] and "| probe |" not in rows


def test_a_baseline_on_fewer_seeds_gets_its_margin_over_those_seeds_only():
    runs = [_run(0.5, {"multitask": 0.3, "all_weights": 0.5}, ["t"], s) for s in range(3)]
    del runs[2]["methods"]["all_weights"]  # a baseline added later, not yet run on the third seed
    rows = margins_section(runs)
    cells = next(r for r in rows if r.startswith("| all_weights")).split(" | ")
    margins = [r["methods"]["cpi_ft"]["avg"] - r["methods"]["all_weights"]["avg"] for r in runs[:2]]
    assert cells[0] == "| all_weights (2 of 3 runs)" and cells[2] == ", ".join(f"{100 * m:+.1f}" for m in margins)
    assert cells[-1] == f"{sum(m > 0 for m in margins)} of 2 |"
    assert next(r for r in rows if r.startswith("| multitask |")).endswith("| 3 of 3 |")


def _run(cpi: float, others: dict[str, float], tasks: list[str], seed: int) -> dict:
    """One run's results.json: per method per task 200 per-item scores drawn at the given rate."""
    methods = {}
    for k, (method, p) in enumerate({"cpi_ft": cpi, **others}.items()):
        items = {t: _items(p, 200, 1000 * seed + 10 * k + i) for i, t in enumerate(tasks)}
        scores = {t: sum(v) / len(v) for t, v in items.items()}
        methods[method] = {"avg": sum(scores.values()) / len(scores), "tasks": scores, "exact": scores, "items": items}
    return {"methods": methods, "majority": dict.fromkeys(tasks, 0.1)}


def _forgetting(a: str, b: str, drops: dict[str, float]) -> dict:
    methods = {}
    for method, drop in drops.items():
        methods[f"{method}@0"] = {"tasks": {a: 0.5, b: 0.1}}
        methods[method] = {"tasks": {a: 0.5 - drop, b: 0.4}}
    return {"methods": methods}


def test_task_sets_pool_into_margins_sign_counts_goals_and_a_plot(tmp_path):
    """Two sets x two seeds: CPI-FT ahead of multi-task in all four runs, clearly behind LoRA in all four; the
    forgetting cut is pooled over the sets' pairs; the plot needs two sets."""
    sets = {}
    for k, tasks in enumerate([["a", "b", "c"], ["d", "e", "f"]]):
        matched = {
            str(s): _run(0.6, {"multitask": 0.3, "lora_multitask_matched": 0.9}, tasks, 10 * k + s) for s in (0, 1)
        }
        forgetting = {
            str(s): _forgetting(tasks[0], tasks[1], {"multistage_given": 0.2, "cpi_ft": 0.04}) for s in (0, 1)
        }
        sets[f"small-eval200-set{k}"] = {"runs": {"matched": matched, f"forgetting/{tasks[0]}>{tasks[1]}": forgetting}}
    assert pooled_section({"small-eval200-set0": sets["small-eval200-set0"]}) == []
    text = "\n".join(pooled_section(sets))
    assert text.startswith("## Pooled over 2 task sets nobody picked") and "4 set x seed runs" in text
    row = text.split("| multitask |")[1].split("\n")[0]
    assert "yes, CPI-FT ahead" in row and row.endswith("| 4 of 4 |")
    row = text.split("| lora_multitask_matched |")[1].split("\n")[0]
    assert "yes, CPI-FT behind" in row and row.endswith("| 0 of 4 |")
    assert "| CPI-FT average >= multi-task average | +" in text
    assert "| CPI-FT average >= lora_multitask_matched average | -" in text
    assert "| forgetting cut >= 70% (pooled) | cut 80% | yes |" in text
    assert "| forgetting cut >= 70% (a>b (small-eval200-set0)) | cut 80% | yes |" in text
    assert seesaw.plot_task_sets({"small-eval200-set0": sets["small-eval200-set0"]}, tmp_path / "one.png") is None
    png = seesaw.plot_task_sets(sets, tmp_path / "sets.png")
    assert png.read_bytes().startswith(b"\x89PNG") and not (tmp_path / "one.png").exists()


def _forgetting_items(a: str, before: dict[str, list[float]], after: dict[str, list[float]]) -> dict:
    """A forgetting pair's result with A's per-item scores after A's stage (`m@0`) and after B's, per method."""
    methods = {}
    for m in before:
        for name, items in ((f"{m}@0", before[m]), (m, after[m])):
            methods[name] = {"tasks": {a: statistics.mean(items)}, "items": {a: items}}
    return {"methods": methods}


def test_forgetting_gets_intervals_over_seeds_and_items_and_pools_only_when_asked():
    """Sequential SFT loses 30 of A's 200 items in every seed and CPI-FT 6: its drop is 12 points under, the cut
    80%, both exact, and both intervals separate it; without per-item scores there is no interval; pairs pool only
    with pairs at their core size p, and a pair whose sequential SFT forgot nothing has no cut."""

    def seed(s: int) -> dict:
        before = [1.0] * 100 + _items(0.5, 100, s)
        lost = {"multistage_given": 30, "cpi_ft": 6}
        after = {m: [0.0] * n + before[n:] for m, n in lost.items()}
        return _forgetting_items("a", dict.fromkeys(lost, before), after)

    seeds = [seed(s) for s in range(3)]
    lines, means = forgetting_section({"a>b": seeds})
    assert means["a>b"]["multistage_given"] == pytest.approx(0.15) and means["a>b"]["cpi_ft"] == pytest.approx(0.03)
    row = next(line for line in lines if line.startswith("| a>b |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:4] == ["a>b", "3", "15.0 ± 0.0", "3.0 ± 0.0"] and cells[-1] == "3 of 3"
    difference = re.fullmatch(r"-12\.0 \[([-+][\d.]+), ([-+][\d.]+)\]", cells[4])
    assert cells[5] == "-12.0, -12.0, -12.0"
    cut = re.fullmatch(r"80% \[(\d+)%, (\d+)%\]", cells[6])
    assert difference and float(difference[1]) <= -12.0 <= float(difference[2]) < 0
    assert cut and 0 < int(cut[1]) <= 80 <= int(cut[2]) <= 100
    assert not any(line.startswith("| pooled |") for line in lines)

    bare = [_forgetting("c", "d", {"multistage_given": 0.2, "cpi_ft": 0.04})]
    larger_core = [_forgetting("c", "d", {"multistage_given": -0.01, "cpi_ft": 0.02})]  # pools with none
    lines, means = forgetting_section({"a>b": seeds, "c>d": bare, "c>d (p = 0.05)": larger_core}, pool=True)
    assert set(means) == {"a>b", "c>d", "c>d (p = 0.05)", "pooled"}
    goals = "\n".join(seesaw.goals({"forgetting": means}))
    assert "| forgetting cut >= 70% (c>d (p = 0.05)) | none to cut: sequential SFT's drop -1.0 | - |" in goals
    assert next(line for line in lines if line.startswith("| c>d |")).split("|")[5:8] == [" -16.0 ", " -16.0 ", " 80% "]
    pooled = next(line for line in lines if line.startswith("| pooled |"))
    assert "| 4 |" in pooled and "[" not in pooled and pooled.endswith("| 4 of 4 |")
    assert means["pooled"]["cpi_ft"] == pytest.approx((3 * 0.03 + 0.04) / 4)


def test_a_baseline_run_on_one_set_only_is_left_out_of_the_pooled_goals():
    """Its mean over fewer runs than CPI-FT's is not a like-for-like goal: the margins table pairs it, the goals
    leave it out and say so."""
    sets = {
        f"small-eval200-set{k}": {"runs": {"matched": {"0": _run(0.6, others, tasks, k)}}}
        for k, (tasks, others) in enumerate(
            [(["a", "b"], {"multitask": 0.3, "lora_multitask_matched": 0.5}), (["c", "d"], {"multitask": 0.3})]
        )
    }
    text = "\n".join(pooled_section(sets))
    assert "| lora_multitask_matched (1 of 2 runs) |" in text
    assert "lora_multitask_matched: 1 of 2 runs so far, left out of the goals" in text
    assert ">= lora_multitask_matched average" not in text and "| CPI-FT average >= multi-task average | +" in text


def test_a_task_set_runs_its_drawn_tasks_in_their_own_directories(tmp_path, monkeypatch):
    monkeypatch.setattr(seesaw, "SCREENED", tmp_path / "screen.json")
    args = _args("--parts matched forgetting --task-set 1 --matched-baselines multitask_matched")
    with pytest.raises(SystemExit, match="bench/screen.py --sets 2"):
        seesaw.drawn_set(1)
    generators = {t: {"new_tokens": 16} for t in "abcxy"}
    save_json({"sets": [["a", "b", "c"], ["x", "y", "z"]], "generators": generators}, tmp_path / "screen.json")
    with pytest.raises(SystemExit, match="lacks 'z' of set 1: run bench/screen.py again"):
        seesaw.drawn_set(1)
    save_json(
        {"sets": [["a", "b", "c"], ["x", "y", "z"]], "generators": generators | {"z": {"new_tokens": 32}}},
        tmp_path / "screen.json",
    )
    assert seesaw.drawn_set(0) == (["a", "b", "c"], 16)
    tasks, new_tokens = seesaw.drawn_set(1)
    assert new_tokens == 32  # the longest-answer generator of the set decides
    size = {**seesaw.SIZES["small"], "new_tokens": new_tokens}
    configs, _ = seesaw.seed_configs(args, size, tasks, tmp_path / "seed3", 3)
    assert {c.eval.max_new_tokens for c in configs.values()} == {32}
    assert sorted(configs) == ["forgetting/x>y", "matched"]  # one ordered pair: the set's first two tasks
    assert list(configs["matched"].tasks) == ["x", "y", "z"] and configs["matched"].plan.groups is None
    assert Path(configs["forgetting/x>y"].output_dir) == tmp_path / "seed3" / "forget-x-y"
    assert seesaw.work_root("small-eval200-set1") == seesaw.WORK / "small" / "set1"
    assert seesaw.work_root("small-eval200") == seesaw.WORK / "small"


def test_a_forgetting_pair_starts_from_the_matched_run_whose_probes_it_trains_again_otherwise(tiny_dir, tmp_path):
    """The pair's recipe differs from `matched`'s in tasks, fusion, plan, baselines and eval only: copied from it, the
    pipeline keeps the two tasks' probes."""
    tasks = ["basic_arithmetic", "letter_counting", "word_sorting"]
    args = _args(f"--parts matched forgetting --model {tiny_dir} --pairs basic_arithmetic>letter_counting")
    configs, starts = seesaw.seed_configs(args, seesaw.SIZES["small"], tasks, tmp_path, 0)
    pair = "forgetting/basic_arithmetic>letter_counting"
    assert starts[pair][:2] == [tmp_path / "forget-basic_arithmetic-letter_counting", tmp_path / "matched"]
    matched, forgetting = load_run(configs["matched"]), load_run(configs[pair])
    assert [probe_key(forgetting, t) for t in tasks[:2]] == [probe_key(matched, t) for t in tasks[:2]]
    assert forgetting.inputs("eval") != matched.inputs("eval")  # its evaluations run again (stages too)


def test_a_second_model_keeps_its_own_sections_directories_and_pools():
    names = {
        command: seesaw.section_name(_args(command))
        for command in ("--size small --eval-items 200", "--size small --eval-items 200 --model gemma3-270m")
        + ("--size small --eval-items 200 --task-set 2 --model gemma3-270m", "--size small --task-set 0")
    }
    assert list(names.values()) == [
        "small-eval200",
        "small-eval200@gemma3-270m",
        "small-eval200-set2@gemma3-270m",
        "small-set0",
    ]
    assert seesaw.work_root("small-eval200@gemma3-270m") == seesaw.WORK / "small" / "gemma3-270m"
    assert seesaw.work_root("small-eval200-set2@gemma3-270m") == seesaw.WORK / "small" / "set2" / "gemma3-270m"
    sections = dict.fromkeys(["small-eval200-set0", "small-eval200-set1", "small-eval200-set0@gemma3-270m"], {})
    groups = seesaw.task_set_groups({**sections, "small-eval200": {}, "small-eval200@gemma3-270m": {}})
    assert {k: sorted(v) for k, v in groups.items()} == {
        "small-eval200": ["small-eval200-set0", "small-eval200-set1"],
        "small-eval200@gemma3-270m": ["small-eval200-set0@gemma3-270m"],
    }


def test_each_core_size_p_of_matched_is_its_own_run_and_row(tmp_path):
    args = _args("--parts matched --matched-p auto --matched-baselines multitask_matched")
    configs, starts = seesaw.seed_configs(args, seesaw.SIZES["small"], seesaw.TASKS[:3], tmp_path, 0)
    assert starts["matched-pauto"][:2] == [tmp_path / "matched", tmp_path / "main"]  # the probes reused
    assert list(configs) == ["matched-pauto"] and configs["matched-pauto"].regions.p == "auto"
    assert Path(configs["matched-pauto"].output_dir) == tmp_path / "matched-pauto"
    assert [seesaw.matched_name(p) for p in (0.05, 0.01)] == ["matched", "matched-p0.01"]


def test_matched_runs_every_baseline_at_the_stage_budget_and_at_the_whole_budget(tmp_path):
    args = _args("--parts matched")
    configs, _ = seesaw.seed_configs(args, seesaw.SIZES["small"], seesaw.TASKS[:3], tmp_path, 0)
    baselines = configs["matched"].baselines
    stems = {b.removesuffix("_matched") for b in baselines}
    assert stems == {"multitask", "lora_multitask", "multitask_all_weights"}
    assert sorted(baselines) == sorted(s + budget for s in stems for budget in ("", "_matched"))


def _at_p(rate: float, p: float, seeds) -> dict[str, dict]:
    return {str(s): {**_run(rate, {}, ["t"], s), "meta": {"core size p": p}} for s in seeds}


def test_auto_earns_the_default_only_at_or_above_the_better_fixed_p():
    """CPI-FT at 1% (`main`), 5% (`matched`, and the same run again as `element_p0.05`), auto (an ablation): one row
    per p, whatever config holds it; rows and blocks are no p's row. The rule compares the seeds all three ran."""
    runs = {
        "ablation/p_0.05": {"0": _run(0.9, {}, ["t"], 0)},  # an older run at 5%, its p not recorded: passed over
        "main": _at_p(0.2, 0.01, (0, 1, 2)),
        "matched": _at_p(0.3, 0.05, (0, 1)),
        "ablation/row_p0.05": _at_p(0.9, 0.05, (0, 1)),
        "ablation/p_auto": _at_p(0.4, 0.02, (0, 1)),
    }
    runs["ablation/element_p0.05"] = {**runs["matched"], "2": _at_p(0.3, 0.05, (2,))["2"]}
    lines = seesaw.p_section(runs)
    rows = {r.split(" | ")[0].strip("| "): r for r in lines if r.startswith("| ")}
    assert set(rows) == {"p", "0.01", "0.05", "auto"}
    assert rows["auto"].endswith("| 0.02, 0.02 |") and rows["0.05"].startswith("| 0.05 | 3 | ")
    assert [r.split(" | ")[0] for r in lines if r.startswith("| 0")] == ["| 0.01", "| 0.05"]  # auto last
    assert lines[-1].startswith("On seeds 0, 1: `auto` ") and lines[-1].endswith("so `auto` earns the recipe default.")
    runs["ablation/p_auto"] = _at_p(0.25, 0.02, (0, 1))  # between 1% and 5%: under the better one
    assert seesaw.p_section(runs)[-1].endswith("does not earn the recipe default.")
    assert seesaw.p_section({"matched": runs["matched"], "ablation/element_p0.05": runs["matched"]}) == []


def _record_run_starts(monkeypatch) -> dict[str, str | None]:
    """A stand-in pipeline that leaves what a copy reads, a state.json, and records what each run directory held
    when its run began."""
    began = {}

    def pipeline(config):
        out = Path(config.output_dir)
        state = out / "state.json"
        began[f"{out.parent.name}/{out.name}"] = state.read_text() if state.exists() else None
        out.mkdir(parents=True, exist_ok=True)
        state.write_text(f"{out.parent.name}/{out.name}")
        return {}

    monkeypatch.setattr(seesaw, "run_pipeline", pipeline)
    return began


def test_an_ablation_starts_from_the_matched_run_or_from_one_run_before_it(tmp_path, monkeypatch):
    """An ablation copies whichever finished run trains its probes, one of this invocation included: at a new seed
    only the first ablation with default probes trains them, and the first with sparse ones."""
    began = _record_run_starts(monkeypatch)
    args = _args("--parts ablations --ablations row_p0.05 probe_sparse sparse_probes_tau_0.2 column_p0.05 --seeds 0 1")
    (tmp_path / "seed0" / "matched").mkdir(parents=True)
    (tmp_path / "seed0" / "matched" / "state.json").write_text("seed0/matched")
    (tmp_path / "seed1" / "ablation-probe_sparse").mkdir(parents=True)  # an existing run is kept as it is
    (tmp_path / "seed1" / "ablation-probe_sparse" / "state.json").write_text("kept")
    out = seesaw.runs(args, seesaw.SIZES["small"], seesaw.TASKS[:3], tmp_path)
    assert list(out) == [
        f"ablation/{n}" for n in ("row_p0.05", "probe_sparse", "sparse_probes_tau_0.2", "column_p0.05")
    ]
    assert began == {
        "seed0/ablation-row_p0.05": "seed0/matched",
        "seed0/ablation-probe_sparse": None,  # no finished run trains sparse probes
        "seed0/ablation-sparse_probes_tau_0.2": "seed0/ablation-probe_sparse",
        "seed0/ablation-column_p0.05": "seed0/matched",
        "seed1/ablation-row_p0.05": None,  # no finished run at seed 1: rows train the probes
        "seed1/ablation-probe_sparse": "kept",
        "seed1/ablation-sparse_probes_tau_0.2": "seed1/ablation-probe_sparse",
        "seed1/ablation-column_p0.05": "seed1/ablation-row_p0.05",  # not from sparse probes: they differ
    }


def test_the_matched_run_starts_from_an_ablation_on_the_same_probes(tmp_path, monkeypatch):
    """At a seed whose ablations ran first, `matched` reuses their probes (and element cores' CPI-FT at its p);
    a sparse-probe ablation, listed before them, trains other probes and is passed over."""
    began = _record_run_starts(monkeypatch)
    args = _args("--parts matched --seeds 2")
    for run in ("ablation-probe_sparse", "ablation-element_p0.05"):
        (tmp_path / "seed2" / run).mkdir(parents=True)
        (tmp_path / "seed2" / run / "state.json").write_text(f"seed2/{run}")
    assert list(seesaw.runs(args, seesaw.SIZES["small"], seesaw.TASKS[:3], tmp_path)) == ["matched"]
    assert began == {"seed2/matched": "seed2/ablation-element_p0.05"}


def test_matched_at_another_p_starts_from_matched_at_a_third(tmp_path, monkeypatch):
    """`matched-pauto` at a seed where only `matched-p0.01` ran reuses its probes rather than training them again,
    and an ablation at that seed does too."""
    began = _record_run_starts(monkeypatch)
    (tmp_path / "seed0" / "matched-p0.01").mkdir(parents=True)
    (tmp_path / "seed0" / "matched-p0.01" / "state.json").write_text("seed0/matched-p0.01")
    args = _args("--parts matched ablations --ablations reselect_p0.05 --matched-p auto --seeds 0")
    assert list(seesaw.runs(args, seesaw.SIZES["small"], seesaw.TASKS[:3], tmp_path)) == [
        "matched-pauto",
        "ablation/reselect_p0.05",
    ]
    assert began == {
        "seed0/matched-pauto": "seed0/matched-p0.01",
        "seed0/ablation-reselect_p0.05": "seed0/matched-p0.01",
    }


def test_structured_cores_are_judged_against_element_cores_seed_spread():
    """Element cores near 30, 32, 34 points (floor: mean - std, near 30); rows far under it on the same items,
    columns at the element scores themselves (margin exactly 0, inside the spread); blocks ran one seed only."""
    element = {str(s): _run(0.30 + 0.02 * s, {}, ["t"], s) for s in range(3)}
    rows = {s: _run(0.1, {}, ["t"], 7 + int(s)) for s in element}
    blocks = {"1": _run(0.5, {}, ["t"], 40)}
    columns = element  # the same per-item scores
    ablations = {"element_p0.05": element, "row_p0.05": rows, "column_p0.05": columns, "block64_p0.05": blocks}
    ablations["p_0.001"] = rows  # an element-core ablation at another p: no row of this table
    table = {r.split(" | ")[0].strip("| "): r for r in seesaw.structured_section(ablations) if r.startswith("| ")}
    assert set(table) == {"cores", "element_p0.05", "row_p0.05", "column_p0.05", "block64_p0.05"}
    assert table["row_p0.05"].endswith("| no |") and "(seeds 0, 1, 2) | [-" in table["row_p0.05"]
    assert "| +0.0 (seeds 0, 1, 2) | [+0.0, +0.0] | yes |" in table["column_p0.05"]
    same = table["element_p0.05"].split(" | ")[1:5]  # seeds, task t, avg, per seed
    assert table["column_p0.05"].split(" | ")[1:5] == same
    assert table["block64_p0.05"].startswith("| block64_p0.05 | 1 |") and "(seeds 1)" in table["block64_p0.05"]
    assert table["block64_p0.05"].endswith("| yes |")
    assert seesaw.structured_section({"row_p0.05": rows}) == []  # no element reference, no table


def test_a_baseline_run_later_joins_its_seeds_saved_run():
    def run(methods: dict[str, float], steps: dict[str, int]) -> dict:
        scored = {m: {"avg": v, "tasks": {"t": v}, "exact": {"t": v}, "items": {"t": [v]}} for m, v in methods.items()}
        return {"methods": scored, "majority": {"t": 0.1}, "meta": {"optimizer steps": steps, "core size p": 0.05}}

    size = seesaw.SIZES["small"]
    first = run({"cpi_ft": 0.3, "multitask_matched": 0.33}, {"cpi_ft": 240, "multitask_matched": 240})
    saved = {"sizes": {"small": {"size": size, "runs": {"matched": {"0": first}, "main": {"0": first}}}}}
    later = run({"cpi_ft": 0.31, "multitask_all_weights_matched": 0.29}, {"multitask_all_weights_matched": 240})
    runs = seesaw.merged(saved, "small", size, {"matched": {"0": later, "1": later}, "dense": {"0": later}})
    kept = runs["matched"]["0"]
    assert set(kept["methods"]) == {"cpi_ft", "multitask_matched", "multitask_all_weights_matched"}
    assert kept["methods"]["cpi_ft"]["avg"] == 0.31  # the newer run's score of a method both ran
    steps = {"cpi_ft": 240, "multitask_matched": 240, "multitask_all_weights_matched": 240}
    assert kept["meta"] == {"optimizer steps": steps, "core size p": 0.05, "kept": ["multitask_matched"]}
    assert runs["matched"]["1"] is later and runs["dense"]["0"] is later  # a new seed, a new config
    assert runs["main"]["0"] is first  # the other configs as they were
    entry = {
        "size": size,
        "runs": {"matched": runs["matched"]},
        "command": "c",
        "minutes": 1,
        "device": "d",
        "date": "x",
    }
    report = "\n".join(seesaw.report("small", entry)[0])
    assert "Seed 0: multitask_matched from an earlier training of the same recipe" in report
    # seed 1 lacks multitask_matched: its seed-0 score against CPI-FT's two-seed mean would be no goal at all
    assert "multitask_matched: seeds 0 so far: its margin is over those, and it is left out of the goals" in report
    assert "CPI-FT average >= multitask_all_weights_matched average" in report
    assert "CPI-FT average >= multitask_matched average" not in report


def test_larger_stages_spend_the_matched_budget_and_are_judged_against_its_baselines(tmp_path):
    size = seesaw.SIZES["small"]
    args = _args("--parts ablations --ablations short_probes_p0.05 reselect_p0.05")
    configs, starts = seesaw.seed_configs(args, size, seesaw.TASKS[:3], tmp_path, 0)
    rebalanced = configs["ablation/short_probes_p0.05"]
    reselect = configs["ablation/reselect_p0.05"]
    assert reselect.stages.reselect and reselect.regions.p == seesaw.MATCHED_P and reselect.probe.steps == size["probe"]
    assert tmp_path / "matched" in starts["ablation/reselect_p0.05"]  # `matched`'s probes: no probe trains again
    # three tasks, three stages: the whole budget equals `matched`'s CPI-FT (probes plus stages)
    assert 3 * rebalanced.probe.steps + 3 * rebalanced.stages.steps == 3 * size["probe"] + 3 * size["stage"]
    assert rebalanced.probe.steps < size["probe"] and rebalanced.regions.p == seesaw.MATCHED_P

    def run(methods: dict[str, float], seed: int) -> dict:
        items = {m: {"t": _items(v, 200, seed + i)} for i, (m, v) in enumerate(methods.items())}
        scored = {m: {"avg": statistics.mean(items[m]["t"]), "items": items[m]} for m in methods}
        return {"methods": scored, "meta": {"optimizer steps": {"cpi_ft parts": {"probes": 30, "stages": 210}}}}

    matched = {str(k): run({"cpi_ft": 0.3, "multitask_matched": 0.33}, 10 * k) for k in range(3)}
    ablation = {str(k): run({"cpi_ft": 0.6}, 10 * k + 5) for k in (0, 2)}
    text = "\n".join(
        seesaw.same_budget_section({"matched": matched, "ablation/short_probes_p0.05": ablation}, "short_probes_p0.05")
    )
    assert "### Larger stages at the same budget (`short_probes_p0.05` against `matched`, seeds 0, 2)" in text
    assert '"probes": 30' in text
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert "yes, CPI-FT ahead" in rows["multitask_matched"] and "2 of 2" in rows["multitask_matched"]
    assert "yes, CPI-FT ahead" in rows["cpi_ft (`matched`)"]  # the 40-step-probe CPI-FT of the same seeds
    assert seesaw.same_budget_section({"matched": matched}, "reselect_p0.05") == []


def test_the_overlap_table_reads_the_plan_a_result_kept_once_its_run_directory_is_gone(tmp_path):
    plan = {"tasks": ["a", "b", "c"], "jaccard": [[1, 0.1, 0.2], [0.1, 1, 0.3], [0.2, 0.3, 1]], "stages": [1, 2]}
    plan["chance"] = [[1, 0.05, 0.05], [0.05, 1, 0.05], [0.05, 0.05, 1]]
    (tmp_path / "seed1" / "ablation-p_0.05").mkdir(parents=True)
    save_json(plan | {"groups": []}, tmp_path / "seed1" / "ablation-p_0.05" / "plan.json")
    assert seesaw.plan_summary(tmp_path / "seed1" / "ablation-p_0.05") == plan
    seeds = {"0": {"plan": plan}, "1": {}, "2": {}}  # seed 1 from its plan.json, seed 2's run gone
    lines = seesaw.overlap_section(tmp_path, {"p_0.05": seeds, "no_fusion": {"0": {"plan": plan}}})
    assert lines[-1] == "| p_0.05 | 0.200 | 0.050 | 2 |"  # mean of (0.1, 0.2, 0.3) twice; two stages each
    assert len(lines) == 6  # the title, the header and one row: no_fusion changes neither p nor granularity


def test_an_invocation_stopped_in_its_second_run_keeps_its_first(tmp_path, monkeypatch):
    """`matched` finishes, the forgetting run after it is killed: seesaw.json already holds `matched`'s results
    (and its tables were drawn), so a session that ends mid-invocation loses only the run in progress."""
    monkeypatch.setattr(seesaw, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(seesaw, "WORK", tmp_path / "work")
    (tmp_path / "results").mkdir()

    def pipeline(config):
        if len(config.tasks) == 2:
            raise KeyboardInterrupt  # the forgetting run, on a pair
        return _run(0.4, {"multitask": 0.3}, list(config.tasks), 0)

    monkeypatch.setattr(seesaw, "run_pipeline", pipeline)
    monkeypatch.setattr(
        sys, "argv", ["seesaw.py", "--size", "small", "--parts", "matched", "forgetting", "--seeds", "0"]
    )
    with pytest.raises(KeyboardInterrupt):
        seesaw.main()
    saved = json.loads((tmp_path / "results" / "seesaw.json").read_text())
    assert list(saved["sizes"]["small"]["runs"]) == ["matched"]
    assert saved["sizes"]["small"]["runs"]["matched"]["0"]["methods"]["multitask"]["avg"] < 0.4
    assert "## " in (tmp_path / "results" / "seesaw.md").read_text()


def test_results_name_the_commit_the_invocation_started_from_and_the_library_versions(tmp_path, monkeypatch):
    """A long invocation saves after each run; a commit made meanwhile is not the code that ran. The versions of
    torch, transformers, peft and trl go beside it: floating-point results move between their releases."""
    monkeypatch.setattr(seesaw, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(seesaw, "WORK", tmp_path / "work")
    (tmp_path / "results").mkdir()
    commits = iter(["started", "committed meanwhile", "committed later"])
    monkeypatch.setattr(seesaw.provenance, "commit", lambda: next(commits))
    monkeypatch.setattr(seesaw, "run_pipeline", lambda config: _run(0.4, {"multitask": 0.3}, list(config.tasks), 0))
    monkeypatch.setattr(sys, "argv", ["seesaw.py", "--size", "small", "--parts", "matched", "--seeds", "0", "1"])
    seesaw.main()
    saved = json.loads((tmp_path / "results" / "seesaw.json").read_text())
    assert saved["sizes"]["small"]["commit"] == "started"
    assert saved["sizes"]["small"]["versions"] == seesaw.provenance.versions()
    assert f"transformers {importlib.metadata.version('transformers')}" in saved["sizes"]["small"]["versions"]
    assert f"commit started, {seesaw.provenance.versions()}." in (tmp_path / "results" / "seesaw.md").read_text()


def test_versions_say_a_missing_library_rather_than_raise(monkeypatch):
    """The GPU machine has torch, transformers and peft but may lack trl: its tables still get written."""
    real = seesaw.provenance.version

    def version(name: str) -> str:
        if name == "trl":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(seesaw.provenance, "version", version)
    assert "trl not installed" in seesaw.provenance.versions()
    assert f"peft {importlib.metadata.version('peft')}" in seesaw.provenance.versions()


def _staged(order: list[str], scores: dict[str, dict[str, float]]) -> dict:
    """A `matched` result whose kept plan trains the tasks of `order` one a stage, with the given task scores."""
    methods = {m: {"tasks": tasks, "avg": statistics.mean(tasks.values())} for m, tasks in scores.items()}
    return {"methods": methods, "plan": {"stages": [{"tasks": [t]} for t in order]}}


def test_stage_position_pairs_each_task_with_its_probe_by_the_stage_that_trained_it():
    """The task trained last loses 0.2 to its probe, the others nothing, whatever the task; multitask_matched (no
    stages) loses nothing anywhere. Runs that are not `matched`, or whose stage holds two tasks, are left out."""
    probe = {"a": 0.5, "b": 0.6, "c": 0.7}

    def run(order: list[str]) -> dict:
        cpi = {t: probe[t] - (0.2 if t == order[-1] else 0.0) for t in order}
        return _staged(order, {"probe": probe, "cpi_ft": cpi, "multitask_matched": probe})

    shared = {"probe": probe, "cpi_ft": {t: 0.0 for t in probe}}
    sections = {
        "small-eval200": {"runs": {"matched": {"0": run(["a", "b", "c"]), "1": run(["c", "a", "b"])}}},
        "small-eval200-set0": {
            "runs": {
                "matched-p0.01": {"0": run(["b", "c", "a"])},
                "ablation/no_fusion": {"0": _staged(["a", "b", "c"], shared)},
                "matched": {"1": {**_staged(["a", "b"], shared), "plan": {"stages": [{"tasks": ["a", "b"]}] * 3}}},
            }
        },
        "small": {"runs": {"main": {"0": {"methods": {}}}}},
    }
    lines = seesaw.stage_position_section(sections)
    assert lines[1] == "## CPI-FT by stage position (small-eval200, small-eval200-set0)"
    assert lines[-3:] == [
        "| first | 3 | +0.0 (+0.0 to +0.0) | +0.0 (+0.0 to +0.0) |",
        "| middle | 3 | +0.0 (+0.0 to +0.0) | +0.0 (+0.0 to +0.0) |",
        "| last | 3 | -20.0 (-20.0 to -20.0) | +0.0 (+0.0 to +0.0) |",
    ]
    assert seesaw.stage_position_section({"small": sections["small"]}) == []


def test_report_writes_the_tables_again_from_the_saved_results_and_trains_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(seesaw, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(seesaw, "WORK", tmp_path / "work")
    (tmp_path / "results").mkdir()
    monkeypatch.setattr(seesaw, "run_pipeline", lambda config: pytest.fail("--report trained"))
    run = _run(0.4, {"multitask_matched": 0.3, "probe": 0.5}, ["a", "b", "c"], 0)
    run["plan"] = {"stages": [{"tasks": [t]} for t in ("a", "b", "c")]}
    entry = {"size": seesaw.SIZES["small"], "runs": {"matched": {"0": run}}, "command": "c", "minutes": 1.0}
    save_json({"sizes": {"small-eval200": entry | {"device": "d", "date": "x"}}}, tmp_path / "results" / "seesaw.json")
    monkeypatch.setattr(sys, "argv", ["seesaw.py", "--report"])
    seesaw.main()
    text = (tmp_path / "results" / "seesaw.md").read_text()
    assert "## Size small-eval200" in text and "## CPI-FT by stage position (small-eval200)" in text
    assert "aggregate" in json.loads((tmp_path / "results" / "seesaw.json").read_text())["sizes"]["small-eval200"]


def test_overlap_against_chance_names_each_runs_most_overlapping_pair_and_whether_it_linked():
    """The pair with the largest Jaccard / chance ratio (not the largest Jaccard: chance differs with core sizes),
    and a plan that put two tasks in one stage counted as linked; runs without a kept plan are left out."""
    plan = {
        "tasks": ["a", "b", "c"],
        "jaccard": [[1, 0.03, 0.05], [0.03, 1, 0.04], [0.05, 0.04, 1]],
        "chance": [[1, 0.01, 0.05], [0.01, 1, 0.02], [0.05, 0.02, 1]],
        "stages": [{"tasks": ["a"]}, {"tasks": ["b"]}, {"tasks": ["c"]}],
    }
    joined = {**plan, "stages": [{"tasks": ["a", "b"]}, {"tasks": ["c"]}]}
    sections = {
        "small-eval200": {"runs": {"matched": {"1": {"plan": joined}, "0": {"plan": plan}}, "main": {"0": {}}}},
        "small-eval200-set2": {"runs": {"matched-p0.01": {"0": {"methods": {}}}}},
    }
    lines = seesaw.overlap_chance_section(sections)
    assert lines[1] == "## Core overlap against chance (small-eval200)"  # the sections with such a run
    assert "Over 2 runs the highest overlap is 3.00-3.00x chance; 1 of 2 plans linked" in lines[3]
    assert lines[-2:] == [
        "| small-eval200 | 0.05 | 0 | a, b | 0.0300 | 0.0100 | 3.00 | no |",
        "| small-eval200 | 0.05 | 1 | a, b | 0.0300 | 0.0100 | 3.00 | yes |",
    ]
    assert seesaw.overlap_chance_section({"x": sections["small-eval200-set2"]}) == []


def test_a_variant_pools_over_sections_with_its_control_and_the_matched_baselines():
    """replay_p0.05 against element_p0.05 (same probes) and `matched`'s baselines, over the seeds of every section
    that ran all three; `matched`'s own CPI-FT is left out (the control stands for it), a seed missing one is too."""

    def scored(value: float) -> dict:
        items = {"a": [value] * 4, "b": [value] * 4}
        return {"tasks": {"a": value, "b": value}, "avg": value, "items": items}

    def ran(value: float) -> dict:
        return {"methods": {"cpi_ft": scored(value)}}

    matched = {"methods": {"cpi_ft": scored(0.9), "multitask_matched": scored(0.3)}}
    sections = {
        "small-eval200-set2": {
            "runs": {
                "ablation/replay_p0.05": {"1": ran(0.5), "0": ran(0.4)},
                "ablation/element_p0.05": {"1": ran(0.2), "0": ran(0.4)},
                "matched": {"1": matched, "0": matched},
            }
        },
        "small-eval200@gemma3-270m": {
            "runs": {"ablation/replay_p0.05": {"0": ran(0.6), "1": ran(0.6)}, "ablation/element_p0.05": {"0": ran(0.1)}}
        },
    }
    lines = seesaw.variant_pooled_section(sections, "replay_p0.05")
    assert lines[1] == "## `replay_p0.05` pooled over 2 runs (small-eval200-set2 seed 0, small-eval200-set2 seed 1)"
    rows = {line.split(" | ")[0]: line for line in lines if line.startswith("| ") and "margin" not in line}
    assert set(rows) == {"| cpi_ft (element_p0.05)", "| multitask_matched"}
    assert rows["| cpi_ft (element_p0.05)"].startswith("| cpi_ft (element_p0.05) | +15.0 | +0.0, +30.0 |")
    assert rows["| multitask_matched"].startswith("| multitask_matched | +15.0 | +10.0, +20.0 | [+10.0, +20.0] | yes")
    assert seesaw.variant_pooled_section({"x": sections["small-eval200@gemma3-270m"]}, "replay_p0.05") == []


def test_the_multi_stage_goal_is_checked_at_each_budget_it_ran():
    """The sets run multi-stage only at matched compute: the goal must read it there, not skip it."""
    methods = {"cpi_ft": {"avg": 0.40}, "multistage_random": {"avg": 0.30}, "multistage_random_matched": {"avg": 0.37}}
    text = "\n".join(seesaw.goals({"methods": methods}))
    assert "| CPI-FT average >= best multi-stage average + 5 | +5.0 points | yes |" in text
    assert "| CPI-FT average >= best multi-stage average at matched compute + 5 | -2.0 points | no |" in text
    del methods["multistage_random"]
    assert "multi-stage average + 5" not in "\n".join(seesaw.goals({"methods": methods}))
