"""Stage plan: overlap of the tasks' core regions, groups at tau, stage order and each stage's frozen set.

docs/method.md, "Plan": tasks whose cores overlap (Jaccard >= tau) are linked; the connected components
are the groups; one group trains per stage while earlier groups' cores stay frozen.
"""

from __future__ import annotations

import math
import os
import random
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import reduce
from pathlib import Path

import torch

from .files import atomic_path, load_json, save_json
from .regions import CoreRegions, intersection_size, unit_count

ORDERS = ("random", "size", "union")
FREEZES = ("previous", "all", "none")
FORMAT = "peft-isolate/stage-plan"


# ------------------------------------------------------------------------------ overlap of core regions


def jaccard(a: CoreRegions, b: CoreRegions) -> float:
    """|A ∩ B| / |A ∪ B| over all parameters (0 when both are empty)."""
    inter = sum(
        intersection_size(a.indices[n].numpy(), b.indices[n].numpy()) if n in b.indices else 0 for n in a.indices
    )
    union = a.size + b.size - inter
    return inter / union if union else 0.0


def expected_jaccard(size_a: int, size_b: int, total: int) -> float:
    """Expected Jaccard of two uniformly random sets of the given sizes out of `total` entries (chance level).

    Exact: the intersection is hypergeometric; the sum runs over mean ± 40 sd, beyond which terms vanish.
    """
    if not 0 <= size_a <= total or not 0 <= size_b <= total:
        raise ValueError(f"set sizes {size_a} and {size_b} must lie in [0, total={total}]")
    if size_a + size_b == 0:
        return 0.0
    lo, hi = max(0, size_a + size_b - total), min(size_a, size_b)
    mean = size_a * size_b / total
    var = size_a * size_b * (total - size_a) * (total - size_b) / (total**2 * max(total - 1, 1))
    width = 40 * math.sqrt(var) + 2
    k = torch.arange(max(lo, math.floor(mean - width)), min(hi, math.ceil(mean + width)) + 1, dtype=torch.float64)

    def log_comb(n: float, r: torch.Tensor) -> torch.Tensor:
        return torch.lgamma(torch.tensor(n + 1.0, dtype=torch.float64)) - torch.lgamma(r + 1) - torch.lgamma(n - r + 1)

    logp = log_comb(size_a, k) + log_comb(total - size_a, size_b - k)
    w = torch.exp(logp - logp.max())
    return float((w * k / (size_a + size_b - k)).sum() / w.sum())


def overlap_matrix(regions: Mapping[str, CoreRegions]) -> torch.Tensor:
    """Pairwise Jaccard of several tasks' core regions, in the mapping's order (float64, symmetric)."""
    tasks = list(regions)
    m = torch.zeros(len(tasks), len(tasks), dtype=torch.float64)
    for i, a in enumerate(tasks):
        m[i, i] = 1.0 if regions[a].size else 0.0
        for j in range(i + 1, len(tasks)):
            m[i, j] = m[j, i] = jaccard(regions[a], regions[tasks[j]])
    return m


def _units(regions: CoreRegions) -> tuple[int, int]:
    """(selected units, all units) of structured cores: a row core of k rows is k draws, not k x columns."""
    g, b = regions.granularity, regions.block
    per_unit = {n: math.prod(s) / max(unit_count(s, g, b), 1) for n, s in regions.shapes.items()}
    chosen = sum(round(regions.indices[n].numel() / per_unit[n]) for n in regions.shapes if per_unit[n])
    return chosen, sum(unit_count(s, g, b) for s in regions.shapes.values())


def chance_matrix(regions: Mapping[str, CoreRegions], universe: int | None = None) -> torch.Tensor:
    """Expected Jaccard of random sets with each pair's sizes over the entries they could lie at: `universe`
    when the cores come from updates confined to one shared support (sparse probes), else every entry of the
    union of their shapes. Structured cores (rows, columns, blocks) are random sets of units instead."""
    tasks = list(regions)
    m = torch.zeros(len(tasks), len(tasks), dtype=torch.float64)
    for i, a in enumerate(tasks):
        for j in range(i, len(tasks)):
            ra, rb = regions[a], regions[tasks[j]]
            if ra.granularity != "element" and (ra.granularity, ra.block, ra.shapes) == (
                rb.granularity,
                rb.block,
                rb.shapes,
            ):
                (size_a, total), (size_b, _) = _units(ra), _units(rb)
            else:
                size_a, size_b = ra.size, rb.size
                total = universe or sum(math.prod(s) for s in {**ra.shapes, **rb.shapes}.values())
            m[i, j] = m[j, i] = expected_jaccard(size_a, size_b, total)
    return m


@dataclass
class Stage:
    """One training stage: the tasks trained together and the tasks whose cores stay frozen."""

    tasks: list[str]
    frozen: list[str]
    core_size: int = 0  # entries in the union of this stage's cores
    frozen_size: int = 0  # entries in the union of the frozen cores


@dataclass
class StagePlan:
    """The grouping of tasks into stages, with the overlap it was derived from."""

    tasks: list[str]
    jaccard: list[list[float]]
    chance: list[list[float]]  # expected Jaccard of random sets of the same sizes
    core_sizes: dict[str, int]
    tau: float
    order: str
    seed: int
    freeze: str
    stages: list[Stage]
    p: dict | None = None  # the cores' p and how it was chosen (the pipeline's, with `regions.p: auto`)

    @property
    def groups(self) -> list[list[str]]:
        return [s.tasks for s in self.stages]

    def frozen_regions(self, stage: int, cores: Mapping[str, CoreRegions]) -> CoreRegions | None:
        """The union of the cores frozen during `stage` (0-based), or None when nothing is frozen."""
        frozen = [cores[t] for t in self.stages[stage].frozen]
        return reduce(CoreRegions.union, frozen) if frozen else None

    def to_dict(self) -> dict:
        return {"format": FORMAT, **asdict(self)}

    @classmethod
    def from_dict(cls, d: Mapping) -> StagePlan:
        if d.get("format") != FORMAT:
            raise ValueError(f"not a stage plan (format is {d.get('format')!r}, expected {FORMAT!r})")
        fields = {k: v for k, v in d.items() if k != "format"}
        return cls(**{**fields, "stages": [Stage(**s) for s in d["stages"]]})

    def save(self, path: str | os.PathLike) -> Path:
        return save_json(self.to_dict(), path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> StagePlan:
        try:
            return cls.from_dict(load_json(path))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}; recreate it with `peft-isolate plan`") from e


def connected_groups(jaccard: torch.Tensor | Sequence[Sequence[float]], tau: float) -> list[list[int]]:
    """Connected components of the graph linking tasks with overlap >= tau, each sorted, by first member."""
    m = torch.as_tensor(jaccard, dtype=torch.float64)
    parent = list(range(len(m)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(len(m)):
        for j in range(i + 1, len(m)):
            if m[i, j] >= tau:
                parent[root(j)] = root(i)
    groups: dict[int, list[int]] = {}
    for i in range(len(m)):
        groups.setdefault(root(i), []).append(i)
    return sorted(groups.values())


def order_groups(
    groups: Sequence[Sequence[int]],
    order: str = "random",
    seed: int = 0,
    union_size: Callable[[Sequence[int]], int] | None = None,
) -> list[list[int]]:
    """Stage order: "random" (seeded shuffle), "size" (fewer tasks first), "union" (smallest core union
    first).

    Ties keep the groups' given order, so every order is deterministic.
    """
    groups = [list(g) for g in groups]
    if order == "random":
        random.Random(seed).shuffle(groups)
        return groups
    if order == "size":
        return sorted(groups, key=len)
    if order == "union":
        if union_size is None:
            raise ValueError('order="union" needs union_size (the size of a group\'s core union)')
        return sorted(groups, key=union_size)
    raise ValueError(f"order={order!r} is not one of {ORDERS}")


def plan_stages(
    cores: Mapping[str, CoreRegions],
    tau: float = 0.1,
    order: str = "random",
    seed: int = 0,
    freeze: str = "previous",
    groups: Sequence[Sequence[str]] | None = None,
    universe: int | None = None,
) -> StagePlan:
    """Group tasks by core overlap and order the groups into stages with their frozen sets.

    freeze="previous": a stage freezes the cores of all earlier groups; "all": of every other group; "none":
    nothing (the no-freezing ablation).
    `groups` (task names, in stage order) replaces the Jaccard grouping and the ordering: a hand-made plan,
    e.g. task A then task B for a forgetting experiment. The overlap is still computed and reported.
    `universe`: the entries the cores could lie at, when fewer than all (sparse probes share one support), for
    the chance level; a tau at or under it links tasks by chance, which is warned about.
    """
    if freeze not in FREEZES:
        raise ValueError(f"freeze={freeze!r} is not one of {FREEZES}")
    if groups is None and order not in ORDERS:
        raise ValueError(f"order={order!r} is not one of {ORDERS}")
    if not cores:
        raise ValueError("plan_stages needs at least one task's core regions")
    tasks = list(cores)
    jac = overlap_matrix(cores)
    chance = chance_matrix(cores, universe)
    by_chance = max((float(chance[i, j]) for i in range(len(tasks)) for j in range(i)), default=0.0)
    if groups is None and 0 < tau <= by_chance:
        warnings.warn(
            f"tau={tau:g} is at or under the overlap random cores of these sizes reach by chance ({by_chance:.3f}"
            f"{f' within {universe} entries' if universe else ''}), so tasks link by chance, not by their cores; "
            "set tau above it (or use lora probes, whose updates are not confined to one shared support)",
            stacklevel=2,
        )

    def union(ts: Sequence[str]) -> CoreRegions:
        return reduce(CoreRegions.union, [cores[t] for t in ts])

    if groups is None:
        ordered = order_groups(
            connected_groups(jac, tau), order, seed, union_size=lambda g: union([tasks[i] for i in g]).size
        )
        named = [[tasks[i] for i in g] for g in ordered]
    else:
        named = [list(g) for g in groups]
        if sorted(t for g in named for t in g) != sorted(tasks):
            raise ValueError(f"groups {named} must name every task of {tasks} exactly once")
        order = "given"
    stages = []
    for k, g in enumerate(named):
        others = {"previous": named[:k], "all": named[:k] + named[k + 1 :], "none": []}[freeze]
        frozen = [t for grp in others for t in grp]
        stages.append(Stage(g, frozen, union(g).size, union(frozen).size if frozen else 0))
    return StagePlan(
        tasks=tasks,
        jaccard=jac.tolist(),
        chance=chance.tolist(),
        core_sizes={t: c.size for t, c in cores.items()},
        tau=float(tau),
        order=order,
        seed=int(seed),
        freeze=freeze,
        stages=stages,
    )


def format_plan(plan: StagePlan) -> str:
    """The overlap matrix (chance level in brackets) and the stages, as text for a terminal."""
    w = max(8, *(len(t) for t in plan.tasks))
    lines = [f"Jaccard overlap of core regions [chance level], tau = {plan.tau:g}"]
    lines.append(" " * w + "".join(f"  {t:>16}" for t in plan.tasks))
    for i, t in enumerate(plan.tasks):
        cells = "".join(f"  {plan.jaccard[i][j]:7.4f} [{plan.chance[i][j]:6.4f}]" for j in range(len(plan.tasks)))
        lines.append(f"{t:<{w}}{cells}")
    lines.append(f"{len(plan.stages)} stage(s), order={plan.order} (seed {plan.seed}), freeze={plan.freeze}:")
    for k, s in enumerate(plan.stages):  # numbered as their folders, stages/<k>
        frozen = ", ".join(s.frozen) or "nothing"
        lines.append(
            f"  stages/{k}: train {', '.join(s.tasks)} ({s.core_size} core entries); "
            f"frozen: {frozen} ({s.frozen_size} entries)"
        )
    return "\n".join(lines)


def draw_overlap(plan: StagePlan, path: str | os.PathLike) -> Path:
    """Write a heatmap PNG of the overlap, tasks in stage order, each group boxed and labelled by stage."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    order = [plan.tasks.index(t) for s in plan.stages for t in s.tasks]
    names = [plan.tasks[i] for i in order]
    jac = torch.tensor(plan.jaccard)[order][:, order]
    chance = torch.tensor(plan.chance)[order][:, order]
    n = len(names)
    shown = jac.clone()
    shown.fill_diagonal_(float("nan"))  # the diagonal is 1 and would wash out the colour scale
    off = shown[~shown.isnan()]
    vmax = max(float(off.max()) if off.numel() else 0.0, plan.tau if plan.tau <= 1 else 0.0, 1e-6)
    fig = Figure(figsize=(1.2 * n + 3, 1.2 * n + 2))
    ax = fig.add_subplot()
    im = ax.imshow(shown.numpy(), cmap="viridis", vmin=0, vmax=vmax)
    fig.colorbar(im, ax=ax, label="Jaccard (diagonal omitted)")
    for i in range(n):
        for j in range(n):
            if i != j:
                color = "k" if jac[i, j] > 0.6 * vmax else "w"  # readable on both ends of viridis
                label = f"{jac[i, j]:.3f}\n({chance[i, j]:.3f})"
                ax.text(j, i, label, ha="center", va="center", fontsize=8, color=color)
    start = 0
    for k, s in enumerate(plan.stages):  # numbered as their folders, stages/<k>
        size = len(s.tasks)
        ax.add_patch(Rectangle((start - 0.5, start - 0.5), size, size, fill=False, edgecolor="red", lw=2))
        ax.text(start - 0.45, start - 0.3, f"stage {k}", color="red", fontsize=8, va="top")
        start += size
    ax.set_xticks(range(n), names, rotation=45, ha="right")
    ax.set_yticks(range(n), names)
    ax.set_title(f"Core-region overlap (chance in brackets), tau = {plan.tau:g}")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return Path(path)
