"""Fusion (docs/method.md, "Fusion"): core transplant plus per-tensor SLERP.

Per tensor, with task deltas D_i and backbone delta D_b: core entries take D_i of their task (an entry
claimed by several tasks goes to the largest |D_i|); every other entry takes
SLERP(D_b, spherical mean of the D_i, omega). Works on dense deltas (dense mode) and on values aligned
to a sorted support (adapter mode), where the norms and angles are taken over the support's entries only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .regions import CoreRegions

COLINEAR = 0.9995
NORM_EPS = 1e-8


def _lerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    return (1 - t) * a + t * b


def slerp(
    a: torch.Tensor, b: torch.Tensor, t: float, colinear: float = COLINEAR, eps: float = NORM_EPS
) -> tuple[torch.Tensor, str]:
    """Spherical interpolation from `a` (t=0) to `b` (t=1), angle taken over the flattened tensors.

    As in mergekit, the raw tensors are mixed with the spherical weights sin((1-t)θ)/sin θ and sin(tθ)/sin θ.
    Falls back to linear interpolation when |cos θ| > `colinear` or a norm is below `eps` (the angle is
    then meaningless or the weights blow up). Returns the fp32 result and "slerp" or "lerp".
    """
    if a.shape != b.shape:
        raise ValueError(f"slerp needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    a, b = a.float(), b.float()
    na, nb = float(a.norm()), float(b.norm())
    if na < eps or nb < eps:
        return _lerp(a, b, t), "lerp"
    cos = float(torch.dot(a.reshape(-1), b.reshape(-1))) / (na * nb)
    if abs(cos) > colinear:
        return _lerp(a, b, t), "lerp"
    theta = math.acos(max(-1.0, min(1.0, cos)))
    s = math.sin(theta)
    return math.sin((1 - t) * theta) / s * a + math.sin(t * theta) / s * b, "slerp"


def spherical_mean(tensors: Sequence[torch.Tensor], eps: float = NORM_EPS) -> torch.Tensor:
    """Equal-weight spherical mean: the normalized sum of the unit directions, scaled to the mean norm.

    This closed form (the projected, extrinsic mean) is chosen over the iterative Karcher mean: it needs
    no iteration count or tolerance, does not depend on the order of the tensors, and for two tensors
    its direction is exactly SLERP at 0.5; for clustered directions it differs from the Karcher mean
    only at third order in their spread. Zero tensors add no direction but count in the mean norm; if
    the directions cancel (or all norms are below `eps`) the arithmetic mean is returned.
    """
    if not tensors:
        raise ValueError("spherical_mean needs at least one tensor")
    xs = [t.float() for t in tensors]
    norms = [float(x.norm()) for x in xs]
    direction = torch.zeros_like(xs[0])
    units = 0
    for x, n in zip(xs, norms, strict=True):
        if n >= eps:
            direction.add_(x, alpha=1 / n)
            units += 1
    length = float(direction.norm())
    if length <= 1e-6 * units:  # no direction left, or only rounding noise
        return torch.stack(xs).mean(0)
    return direction.mul_(sum(norms) / len(norms) / length)


@dataclass
class FusionResult:
    """Fused deltas (fp32, same layout as the inputs) and what fusion did, for the fusion artifact."""

    deltas: dict[str, torch.Tensor]
    stats: dict[str, Any] = field(default_factory=dict)


def fuse_deltas(
    task_deltas: Mapping[str, Mapping[str, torch.Tensor]],
    cores: Mapping[str, CoreRegions],
    backbone: Mapping[str, torch.Tensor] | None = None,
    omega: float = 0.5,
    support: Mapping[str, torch.Tensor] | None = None,
) -> FusionResult:
    """Fuse task deltas: core transplant, then SLERP(backbone, spherical mean of the tasks, omega) elsewhere.

    Dense mode: each delta has its parameter's shape. Adapter mode: pass `support` ({name: sorted flat
    indices}); each delta (and the backbone's) is then the 1-D values at those indices, and every core
    entry must lie in the support. `backbone=None` means a zero backbone delta (backbone = base).
    Shared core entries go to the task with the largest |delta| there (the first task on equal |delta|).
    Tensors are independent: call it one tensor at a time to bound memory.
    """
    if not 0 <= omega <= 1:
        raise ValueError(f"omega={omega} is outside [0, 1]: 0 keeps the backbone, 1 the spherical mean of the tasks")
    tasks = list(task_deltas)
    if not tasks:
        raise ValueError("fuse_deltas needs at least one task")
    if set(cores) != set(tasks):
        raise ValueError(f"tasks with deltas {sorted(tasks)} and tasks with cores {sorted(cores)} differ")
    names = list(task_deltas[tasks[0]])
    for t in tasks:
        if set(task_deltas[t]) != set(names):
            diff = sorted(set(task_deltas[t]) ^ set(names))
            raise ValueError(f"task {t} has deltas for different parameters than {tasks[0]}, e.g. {diff[:3]}")
    for t in tasks:
        stray = [n for n, idx in cores[t].indices.items() if idx.numel() and n not in task_deltas[t]]
        if stray:
            raise ValueError(
                f"the core region of {t} covers {stray[:3]}, which have no delta: regions must cover only "
                "the fused (in adapter mode: targeted) weights"
            )
    fused: dict[str, torch.Tensor] = {}
    paths = {"slerp": 0, "lerp": 0}
    won = torch.zeros(len(tasks), dtype=torch.int64)
    contested = 0
    for name in names:
        ds = [task_deltas[t][name].float().reshape(-1) for t in tasks]
        shape = task_deltas[tasks[0]][name].shape
        if any(task_deltas[t][name].shape != shape for t in tasks):
            raise ValueError(
                f"{name}: task deltas differ in shape: {[tuple(task_deltas[t][name].shape) for t in tasks]}"
            )
        base = torch.zeros(shape) if backbone is None else backbone[name].float()
        if base.shape != shape:
            raise ValueError(f"{name}: backbone delta has shape {tuple(base.shape)}, task deltas {tuple(shape)}")
        out, path = slerp(base, spherical_mean(ds).reshape(shape), omega)
        paths[path] += 1
        # every (position, |delta|, task) claim; the winner per position: largest |delta|, then earliest task
        pos = [_core_positions(cores[t], name, shape, None if support is None else support[name], t) for t in tasks]
        pos_all = torch.cat(pos)
        val_all = torch.cat([d[p] for d, p in zip(ds, pos, strict=True)])
        task_all = torch.cat([torch.full((len(p),), i) for i, p in enumerate(pos)])
        order = torch.sort(-val_all.abs(), stable=True).indices
        order = order[torch.sort(pos_all[order], stable=True).indices]
        first = torch.ones(len(order), dtype=torch.bool)
        first[1:] = pos_all[order[1:]] != pos_all[order[:-1]]
        winners = order[first]
        out.view(-1)[pos_all[winners]] = val_all[winners]
        won += torch.bincount(task_all[winners], minlength=len(tasks))
        contested += int((torch.unique_consecutive(pos_all[order], return_counts=True)[1] > 1).sum())
        fused[name] = out
    stats = {
        "omega": omega,
        **paths,
        "contested": contested,
        "core_entries": dict(zip(tasks, won.tolist(), strict=True)),
    }
    return FusionResult(fused, stats)


def _core_positions(
    core: CoreRegions, name: str, shape: torch.Size, support: torch.Tensor | None, task: str
) -> torch.Tensor:
    """Positions of `task`'s core entries of `name` in the delta's flat layout (dense or support-aligned)."""
    idx = core.indices.get(name)
    if idx is None or not idx.numel():
        return torch.zeros(0, dtype=torch.int64)
    idx = idx.long()
    if support is None:
        if math.prod(core.shapes[name]) != math.prod(shape):
            raise ValueError(f"{name}: core region of {task} has shape {core.shapes[name]}, delta {tuple(shape)}")
        return idx
    support = support.long()
    if support.numel() != math.prod(shape):
        raise ValueError(f"{name}: {math.prod(shape)} delta values for a support of {support.numel()} indices")
    pos = torch.searchsorted(support, idx).clamp_(max=max(support.numel() - 1, 0))
    if not support.numel() or not bool((support[pos] == idx).all()):
        raise ValueError(f"{name}: core entries of {task} lie outside the support; the support must contain every core")
    return pos
