"""Streaming top-p selection: exactly floor(p * D) entries with the largest |delta|, in bounded memory."""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .regions import (
    BLOCK_SIZES,
    GRANULARITIES,
    CoreRegions,
    canonical_order,
    core_count,
    unit_count,
    unit_entries,
    unit_of,
    unit_sizes,
)
from .sources import DEFAULT_CHUNK, DeltaSource, prefetch

SCOPES = ("global", "layer", "matrix")
_LAYER = re.compile(r"^(.*?\.(?:layers|layer|h|blocks|block)\.\d+)\.")


def _kth_largest(vals: np.ndarray, k: int, step: int) -> tuple[float, int]:
    """The k-th largest of finite non-negative fp32 `vals` and how many are strictly larger.

    Two 16-bit radix passes over the float bits (monotonic for non-negative floats), a slice at a time,
    so it needs no copy of `vals`.
    """
    bits = vals.view(np.int32)
    top = 0x7F81  # high halves of finite non-negative floats
    hist = np.zeros(top, dtype=np.int64)
    for s in range(0, len(bits), step):
        hist += np.bincount(bits[s : s + step] >> 16, minlength=top)
    above = np.cumsum(hist[::-1])
    j = int(np.searchsorted(above, k))
    high, greater = top - 1 - j, int(above[j - 1]) if j else 0
    hist = np.zeros(1 << 16, dtype=np.int64)
    for s in range(0, len(bits), step):
        b = bits[s : s + step]
        hist += np.bincount(b[(b >> 16) == high] & 0xFFFF, minlength=1 << 16)
    above = np.cumsum(hist[::-1])
    j = int(np.searchsorted(above, k - greater))
    greater += int(above[j - 1]) if j else 0
    return float(np.array([(high << 16) | ((1 << 16) - 1 - j)], dtype=np.int32).view(np.float32)[0]), greater


class _TopK:
    """Exact top-k of a stream of |delta| chunks, ties to the earlier position, in bounded memory.

    Candidates (value, flat index) live in a buffer of k + slack entries, in stream order. When it
    fills, it is cut to the k best and their smallest value becomes the bar a later entry must beat
    strictly (an equal later entry loses the tie). Memory: 8 bytes x (k + slack). numpy does the
    bookkeeping (compress/take are several times faster than boolean indexing on CPU).
    """

    def __init__(self, k: int, total: int, slack: int):
        self.k, self.everything = k, k == total
        self.cap = 0 if k == 0 or self.everything else min(total, k + max(k, slack))
        self.step = max(slack, 1 << 16)
        self.vals = np.empty(self.cap, dtype=np.float32)
        self.idx = np.empty(self.cap, dtype=np.int32)
        self.n = 0
        self.segments: list[list[Any]] = []  # [name, count] in stream order
        self.bar: float | None = None  # None: keep everything until the buffer first fills

    def add(self, name: str, start: int, a: np.ndarray, top: float) -> None:
        """Offer non-negative values (largest: `top`) at flat positions `start`... of `name`."""
        if not self.cap:
            return
        if self.bar is None and self.n + len(a) > self.cap:
            self._cut()
        if self.bar is None:
            sel = None
            c = len(a)
        else:
            if top <= self.bar:
                return
            sel = np.flatnonzero(a > self.bar)
            if self.n + len(sel) > self.cap:
                self._cut()
                sel = np.compress(a.take(sel) > self.bar, sel)
            c = len(sel)
        if not c:
            return
        end = self.n + c
        if sel is None:
            self.vals[self.n : end] = a
            self.idx[self.n : end] = np.arange(start, start + c, dtype=np.int32)
        else:
            self.vals[self.n : end] = a.take(sel)
            self.idx[self.n : end] = sel + start
        self.n = end
        if self.segments and self.segments[-1][0] == name:
            self.segments[-1][1] += c
        else:
            self.segments.append([name, c])

    def _cut(self) -> None:
        """Keep the k best entries (ties: the earliest), in place and in order; raise the bar to the k-th."""
        bar, greater = _kth_largest(self.vals[: self.n], self.k, self.step)
        ties = self.k - greater
        w, r, segments = 0, 0, []
        for name, count in self.segments:
            kept = 0
            for s in range(r, r + count, self.step):
                e = min(s + self.step, r + count)
                v = self.vals[s:e]
                keep = v > bar
                if ties:
                    first = np.flatnonzero(v == bar)[:ties]
                    keep[first] = True
                    ties -= len(first)
                kv, ki = np.compress(keep, v), np.compress(keep, self.idx[s:e])  # copies: safe to write back
                self.vals[w : w + len(kv)], self.idx[w : w + len(kv)] = kv, ki
                w += len(kv)
                kept += len(kv)
            r += count
            if kept:
                segments.append([name, kept])
        self.n, self.segments, self.bar = w, segments, bar

    def finish(
        self, names: Sequence[str], shapes: Mapping[str, tuple[int, ...]]
    ) -> tuple[dict[str, torch.Tensor], int]:
        """The selected indices per name and how many of them have a zero value."""
        if self.everything:
            return {n: torch.arange(math.prod(shapes[n]), dtype=torch.int32) for n in names}, 0
        if self.n > self.k:
            self._cut()
        zeros = int(np.count_nonzero(self.vals[: self.n] == 0))
        out, r = {}, 0
        for name, count in self.segments:
            out[name] = torch.from_numpy(self.idx[r : r + count].copy())
            r += count
        return out, zeros


def _check_p(p: float) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
        raise ValueError(f"p={p!r} is outside (0, 1]: give the fraction of entries to keep, e.g. p=0.01 for 1%")
    return float(p)


def check_keeps_an_entry(p: float, largest: int, scope: str = "global") -> None:
    """Refuse a `p` that selects nothing even from the `largest` group of entries a core is taken over."""
    if not core_count(p, largest):
        raise ValueError(
            f"p={p!r} keeps no entry (floor(p x {largest:,}) is 0 even for the largest {scope} group of entries): "
            f"a p of at least 1/{largest} (about {1 / largest:.2e}) keeps one"
        )


def layer_of(name: str) -> str:
    """The group a parameter belongs to under scope="layer": its block (`...layers.N`), else itself."""
    m = _LAYER.match(name)
    return m.group(1) if m else name


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def find_core_regions(
    source: DeltaSource,
    p: float = 0.01,
    scope: str = "global",
    names: Collection[str] | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    granularity: str = "element",
    block: int | None = None,
) -> CoreRegions:
    """Select exactly floor(p * D) entries with the largest |delta| (D per scope: global, layer, matrix).

    Ties go to the earlier (parameter in `canonical_order`, flat index). One pass over the source;
    memory about 8 bytes x 2 floor(p * D) plus a few chunks. `names` restricts the selection to those
    parameters (adapter mode: the targeted linear weights). Torch runs single-threaded while streaming
    (the work is memory-bound and the source runs in a second thread); the thread count is restored after.
    `granularity` row, column or block (with `block`) selects whole units instead (see `_select_units`).
    """
    p = _check_p(p)
    if scope not in SCOPES:
        raise ValueError(f"scope={scope!r} is not one of {SCOPES}")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity={granularity!r} is not one of {GRANULARITIES}")
    if (granularity == "block") != (block is not None) or (block is not None and block not in BLOCK_SIZES):
        raise ValueError(f"give block= (one of {BLOCK_SIZES}) with granularity='block', and only then")
    shapes = source.shapes()
    if names is not None:
        missing = sorted(set(names) - set(shapes))
        if missing:
            raise ValueError(f"{source.description}: no parameter {missing[:5]}; it has e.g. {list(shapes)[:3]}")
        shapes = {n: s for n, s in shapes.items() if n in names}
    order = canonical_order(shapes)
    numel = {n: math.prod(shapes[n]) for n in order}
    too_big = [n for n in order if numel[n] >= 2**31]
    if too_big:
        raise ValueError(f"{too_big[0]} has {numel[too_big[0]]} entries: int32 flat indices cap a tensor at 2**31 - 1")
    group_of = {n: "" if scope == "global" else layer_of(n) if scope == "layer" else n for n in order}
    members: dict[str, list[str]] = {}
    for n in order:
        members.setdefault(group_of[n], []).append(n)
    left = {g: sum(numel[n] for n in ns) for g, ns in members.items()}
    if left:
        check_keeps_an_entry(p, max(left.values()), scope)
    if granularity != "element":
        picked = _select_units(source, shapes, members, p, granularity, block, chunk_size)
        return CoreRegions(picked, {n: shapes[n] for n in order}, p, scope, source.description, granularity, block)
    selectors = {g: _TopK(core_count(p, d), d, chunk_size) for g, d in left.items()}
    indices: dict[str, torch.Tensor] = {}
    zeros = 0

    def finish(g: str) -> None:
        nonlocal zeros
        got, z = selectors.pop(g).finish(members[g], shapes)
        indices.update(got)
        zeros += z

    for g in [g for g, d in left.items() if d == 0]:
        finish(g)

    def magnitudes() -> Iterator[tuple[str, int, torch.Tensor, float]]:
        for name, start, d in source.iter_deltas([n for n in order if numel[n]], chunk_size):
            a = d.abs_()
            yield name, start, a, float(a.max()) if a.numel() else 0.0

    total = sum(numel.values())
    with (
        _torch_threads(1),
        tqdm(total=total, unit="param", unit_scale=True, desc="core regions", disable=None) as bar,
    ):
        # the source (reading, B @ A, subtracting) runs a few chunks ahead in a second thread
        for name, start, a, top in prefetch(magnitudes()):
            if not math.isfinite(top):
                raise ValueError(f"{source.description}: the delta of {name} is not finite (NaN or inf in a weight)")
            g = group_of[name]
            selectors[g].add(name, start, a.numpy(), top)
            left[g] -= a.numel()
            if not left[g]:
                finish(g)
            bar.update(a.numel())
    if selectors:
        raise RuntimeError(f"{source.description} yielded too few values for {sorted(selectors)[:3]}")
    if zeros:
        warnings.warn(
            f"{zeros} selected entries have a zero delta (p * D exceeds the entries that changed); "
            "they were taken in parameter order. Lower p or check the probe trained.",
            stacklevel=2,
        )
    ordered = {n: indices.get(n, torch.zeros(0, dtype=torch.int32)) for n in order}
    return CoreRegions(ordered, {n: shapes[n] for n in order}, p, scope, source.description)


def unit_scores(
    source: DeltaSource, shapes: Mapping[str, tuple[int, ...]], granularity: str, block: int | None, chunk_size: int
) -> dict[str, torch.Tensor]:
    """Per weight, each unit's share of the update: the sum of its squared delta entries (float64), one pass."""
    scores = {n: torch.zeros(unit_count(s, granularity, block), dtype=torch.float64) for n, s in shapes.items()}
    names = [n for n in canonical_order(shapes) if math.prod(shapes[n])]
    with _torch_threads(1):
        for name, start, d in prefetch(source.iter_deltas(names, chunk_size)):
            if not bool(torch.isfinite(d).all()):
                raise ValueError(f"{source.description}: the delta of {name} is not finite (NaN or inf in a weight)")
            flat = torch.arange(start, start + d.numel())
            scores[name].index_add_(0, unit_of(flat, shapes[name], granularity, block), d.double().square())
    return scores


def _select_units(
    source: DeltaSource,
    shapes: Mapping[str, tuple[int, ...]],
    members: Mapping[str, list[str]],
    p: float,
    granularity: str,
    block: int | None,
    chunk_size: int,
) -> dict[str, torch.Tensor]:
    """Per scope group, whole units by falling score (ties: parameter order, then unit number), each taken if
    its entries still fit in floor(p * D) of the group: a unit that would overflow is skipped, a smaller one after
    it may still fit. Returns the selected entries (int32, sorted) per weight."""
    scores = unit_scores(source, shapes, granularity, block, chunk_size)
    picked: dict[str, torch.Tensor] = {}
    zeros = 0
    for names in members.values():
        budget = core_count(p, sum(math.prod(shapes[n]) for n in names))
        score = torch.cat([scores[n] for n in names]).numpy()
        owner = np.concatenate([np.full(scores[n].numel(), i) for i, n in enumerate(names)])
        local = np.concatenate([np.arange(scores[n].numel()) for n in names])
        sizes = torch.cat([unit_sizes(shapes[n], granularity, block) for n in names]).numpy()
        take = []
        for u in np.lexsort((local, owner, -score)):  # the last key sorts first: score, then parameter, then unit
            if sizes[u] <= budget:
                take.append(u)
                budget -= int(sizes[u])
                zeros += int(score[u] == 0)
        take = np.array(take, dtype=np.int64)
        for i, n in enumerate(names):
            units = torch.from_numpy(local[take[owner[take] == i]])
            picked[n] = unit_entries(units, shapes[n], granularity, block).to(torch.int32)
    if zeros:
        warnings.warn(f"{zeros} selected units have a zero update (p * D exceeds the units that changed)", stacklevel=3)
    return picked


# p from the probes (`regions.p: auto`) --------------------------------------------------------------------------

# the p a core may take under `regions.p: auto`: 0.1% to 10% in eighths of a decade
AUTO_GRID = tuple(float(f"{0.001 * 10 ** (k / 8):.3g}") for k in range(17))


def mass_curve(source: DeltaSource, ps: Sequence[float] = AUTO_GRID, chunk_size: int = DEFAULT_CHUNK) -> list[float]:
    """For each p, the share of the update's squared norm held by its top floor(p * D) entries (global scope).

    One pass over the source: entries are counted and their squares summed per bucket of the top 16 bits of
    their float32 magnitude (buckets 2**-7 wide, relatively), so a share is exact up to the one bucket the cut
    falls in, where entries count at that bucket's mean square."""
    buckets = 0x7F81  # high halves of finite non-negative floats
    count, mass = np.zeros(buckets, dtype=np.int64), np.zeros(buckets, dtype=np.float64)
    shapes = source.shapes()
    names = [n for n in shapes if math.prod(shapes[n])]
    for name, _, d in prefetch(source.iter_deltas(names, chunk_size)):
        a = d.abs_().numpy()
        if not np.isfinite(a).all():
            raise ValueError(f"{source.description}: the delta of {name} is not finite (NaN or inf in a weight)")
        high = a.view(np.int32) >> 16
        count += np.bincount(high, minlength=buckets)
        mass += np.bincount(high, weights=np.square(a, dtype=np.float64), minlength=buckets)
    count, mass = count[::-1], mass[::-1]  # largest first
    above_count, above_mass, total = np.cumsum(count), np.cumsum(mass), float(mass.sum())
    curve, entries = [], sum(math.prod(shapes[n]) for n in names)
    for p in ps:
        k = core_count(p, entries)
        j = int(np.searchsorted(above_count, k))  # the bucket the k-th largest entry falls in
        if j >= buckets or not total:
            curve.append(1.0 if total else 0.0)
            continue
        before_count = int(above_count[j - 1]) if j else 0
        before_mass = float(above_mass[j - 1]) if j else 0.0
        inside = (k - before_count) * float(mass[j]) / int(count[j]) if count[j] else 0.0
        curve.append(min(1.0, (before_mass + inside) / total))
    return curve


def choose_p(curves: Mapping[str, Sequence[float]], share: float, ps: Sequence[float] = AUTO_GRID) -> dict[str, Any]:
    """The smallest p of `ps` at which every task's core holds at least `share` of its probe's squared update
    (the largest p if none does), with the rule and each task's share at that p, for plan.json and results.md."""
    chosen = next((i for i in range(len(ps)) if all(c[i] >= share for c in curves.values())), len(ps) - 1)
    met = all(c[chosen] >= share for c in curves.values())
    rule = f"smallest p in {ps[0]:g}..{ps[-1]:g} whose cores hold {share:.0%} of every probe's squared update"
    return {
        "p": ps[chosen],
        "rule": rule if met else f"{rule}: none does, so the largest",
        "share": share,
        "held": {t: round(c[chosen], 4) for t, c in curves.items()},
        "curves": {"p": list(ps), **{t: [round(v, 4) for v in c] for t, c in curves.items()}},
    }
