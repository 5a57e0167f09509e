"""Core regions: per-parameter sorted index sets and their set algebra (what a core, a support or a frozen set is).

A task's core region is the top p of all entries by |theta_task - theta_0| (docs/method.md, "Core regions"),
selected by `peft_isolate.selection` from a delta source (`peft_isolate.sources`). This module is all the tuner
needs of them.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .files import load_tensors, save_tensors

FORMAT = "peft-isolate/core-regions"
PEFT_PREFIX = "base_model.model."


def _merged(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Sorted concatenation of two sorted arrays (timsort merges the two runs in linear time)."""
    c = np.concatenate([a, b])
    c.sort(kind="stable")
    return c


# np.compress rather than boolean indexing: several times faster on large arrays


def _intersection(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    c = _merged(a, b)
    return np.compress(c[1:] == c[:-1], c[1:])


def _union(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    c = _merged(a, b)
    keep = np.ones(len(c), dtype=bool)
    keep[1:] = c[1:] != c[:-1]
    return np.compress(keep, c)


def _difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if not len(b):
        return a
    i = np.minimum(np.searchsorted(b, a), len(b) - 1)
    return np.compress(b[i] != a, a)


def intersection_size(a: np.ndarray, b: np.ndarray) -> int:
    c = _merged(a, b)
    return int(np.count_nonzero(c[1:] == c[:-1]))


def _natural_key(name: str) -> list[Any]:
    """Sort key that orders `layers.2` before `layers.10`: the canonical parameter order for tie-breaks."""
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", name)]


def canonical_order(names: Collection[str]) -> list[str]:
    """Parameter names in the order that breaks ties in selection (natural sort of the names)."""
    return sorted(names, key=_natural_key)


def strip_peft_prefix(name: str) -> str:
    """A base-model parameter name from a peft one (drops `base_model.model.`)."""
    return name[len(PEFT_PREFIX) :] if name.startswith(PEFT_PREFIX) else name


@dataclass(eq=False)
class CoreRegions(Mapping[str, torch.Tensor]):
    """Per parameter name, a sorted unique int32 tensor of flat positions into that parameter.

    `shapes` holds every parameter the selection ran over (its size D is the universe of the sets);
    a name without selected entries has an empty index tensor. Never a dense mask. Reads as a mapping
    {name: indices} over every name in `shapes`.
    """

    indices: dict[str, torch.Tensor]
    shapes: dict[str, tuple[int, ...]]
    p: float | None = None
    scope: str | None = None
    source: str = ""
    granularity: str = "element"  # what selection took whole: entries, rows, columns or blocks (see `units`)
    block: int | None = None  # the block side, for granularity "block"
    _size: int = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.shapes = {n: tuple(int(s) for s in shape) for n, shape in self.shapes.items()}
        unknown = sorted(set(self.indices) - set(self.shapes))
        if unknown:
            raise ValueError(f"core region indices for {unknown[:5]} have no shape: add them to `shapes`")
        empty = torch.zeros(0, dtype=torch.int32)
        self.indices = {
            n: as_index_set(self.indices.get(n, empty), math.prod(shape), n) for n, shape in self.shapes.items()
        }
        self._size = sum(int(i.numel()) for i in self.indices.values())

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.indices[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def size(self) -> int:
        """Number of selected entries."""
        return self._size

    @property
    def numel(self) -> int:
        """Number of entries the selection ran over (D)."""
        return sum(math.prod(s) for s in self.shapes.values())

    @property
    def density(self) -> float:
        return self.size / max(self.numel, 1)

    def __eq__(self, other: object) -> bool:
        """Same universe and same sets (metadata is ignored)."""
        if not isinstance(other, CoreRegions):
            return NotImplemented
        return self.shapes == other.shapes and all(torch.equal(self.indices[n], other.indices[n]) for n in self.shapes)

    def __repr__(self) -> str:
        return (
            f"CoreRegions({self.size} of {self.numel} entries over {len(self.shapes)} tensors, "
            f"p={self.p}, scope={self.scope}, source={self.source!r})"
        )

    def _combine(self, other: CoreRegions, op: Any, what: str) -> CoreRegions:
        shapes = dict(self.shapes)
        for name, shape in other.shapes.items():
            if shapes.setdefault(name, shape) != shape:
                raise ValueError(
                    f"cannot take the {what} of core regions: {name} has shape {shapes[name]} in one and "
                    f"{shape} in the other; they come from different models"
                )
        empty = torch.zeros(0, dtype=torch.int32)
        out = {
            n: torch.from_numpy(op(self.indices.get(n, empty).numpy(), other.indices.get(n, empty).numpy()))
            for n in canonical_order(shapes)
        }
        return CoreRegions(out, {n: shapes[n] for n in out}, source=what)

    def union(self, other: CoreRegions) -> CoreRegions:
        return self._combine(other, _union, "union")

    def intersection(self, other: CoreRegions) -> CoreRegions:
        return self._combine(other, _intersection, "intersection")

    def difference(self, other: CoreRegions) -> CoreRegions:
        return self._combine(other, _difference, "difference")

    def save(self, path: str | os.PathLike) -> Path:
        """Write as safetensors: an int32 tensor per parameter, shapes, p/scope/source and granularity in the
        header."""
        meta = {
            "format": FORMAT,
            "version": "1",
            "shapes": json.dumps({n: list(s) for n, s in self.shapes.items()}),
            "p": json.dumps(self.p),
            "scope": json.dumps(self.scope),
            "source": self.source,
            "granularity": self.granularity,
            "block": json.dumps(self.block),
        }
        return save_tensors(self.indices, path, metadata=meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> CoreRegions:
        """Read a file written by `save` (or `peft-isolate regions`)."""
        tensors, meta = load_tensors(path)
        if meta.get("format") != FORMAT:
            raise ValueError(
                f"{path} is not a core-regions file (its header has no format={FORMAT!r}); "
                "create one with `peft-isolate regions` or CoreRegions.save"
            )
        try:
            shapes = {n: tuple(int(d) for d in s) for n, s in json.loads(meta["shapes"]).items()}
            p, scope = json.loads(meta["p"]), json.loads(meta["scope"])
            block = json.loads(meta.get("block", "null"))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(
                f"{path}: its header's shapes, p or scope is missing or malformed ({e!r}); recreate the file with "
                "`peft-isolate regions` or CoreRegions.save"
            ) from None
        return cls(tensors, shapes, p, scope, meta.get("source", ""), meta.get("granularity", "element"), block)


def check_index_set(indices: torch.Tensor, numel: int, what: str) -> None:
    """Raise a `ValueError` naming `what` unless `indices` is a 1-D int32 sorted unique set inside `[0, numel)`."""
    if indices.dtype != torch.int32 or indices.dim() != 1:
        raise ValueError(f"{what}: expected a 1-D int32 index tensor, got {indices.dtype} of shape {indices.shape}")
    if indices.numel() == 0:
        return
    if int(indices[0]) < 0 or int(indices[-1]) >= numel or not bool((indices[1:] > indices[:-1]).all()):
        bad = "out of range" if int(indices.min()) < 0 or int(indices.max()) >= numel else "unsorted or duplicated"
        raise ValueError(
            f"{what}: indices are {bad} (need sorted unique flat positions in [0, {numel}) for this weight); "
            "was the file made for another model?"
        )


def as_index_set(indices: torch.Tensor, numel: int, what: str) -> torch.Tensor:
    """`indices` as a checked int32 index set. Any integer dtype is taken (`arange`, `nonzero` and `topk` give
    int64) when its values are sorted unique flat positions in `[0, numel)`."""
    integer = not (indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool)
    if integer and indices.dtype != torch.int32:
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= numel):
            raise ValueError(f"{what}: indices are out of range (need flat positions in [0, {numel}) for this weight)")
        indices = indices.to(torch.int32)
    check_index_set(indices, numel, what)
    return indices


def core_count(p: float, total: int) -> int:
    """floor(p * total), exact in decimal (0.29 * 100 is 29, not 28)."""
    return int(Decimal(repr(float(p))) * total)


# ----------------------------------------------------------------------------------------- structured units

GRANULARITIES = ("element", "row", "column", "block")
BLOCK_SIZES = (16, 32, 64, 128)


def as_matrix(shape: tuple[int, ...]) -> tuple[int, int]:
    """The (rows, columns) a weight is seen as for structured units: 1-D as one row, N-D as dim 0 by the rest."""
    return (1, shape[0]) if len(shape) == 1 else (shape[0], math.prod(shape[1:]))


def unit_count(shape: tuple[int, ...], granularity: str, block: int | None = None) -> int:
    """How many units (entries, rows, columns or `block` x `block` blocks, edge blocks smaller) a weight has."""
    rows, cols = as_matrix(shape)
    if granularity == "element":
        return rows * cols
    if granularity == "row":
        return rows
    if granularity == "column":
        return cols
    return -(-rows // block) * -(-cols // block)


def unit_sizes(shape: tuple[int, ...], granularity: str, block: int | None = None) -> torch.Tensor:
    """The entries of each unit (int64), in unit order: all equal but for the edge blocks."""
    rows, cols = as_matrix(shape)
    if granularity != "block":
        size = {"element": 1, "row": cols, "column": rows}[granularity]
        return torch.full((unit_count(shape, granularity),), size, dtype=torch.int64)
    heights = (rows - torch.arange(0, rows, block)).clamp(max=block)
    widths = (cols - torch.arange(0, cols, block)).clamp(max=block)
    return (heights[:, None] * widths[None, :]).reshape(-1)


def unit_of(flat: torch.Tensor, shape: tuple[int, ...], granularity: str, block: int | None = None) -> torch.Tensor:
    """The unit of each flat position (int64), numbered row-major over the weight's units."""
    rows, cols = as_matrix(shape)
    r, c = flat // cols, flat % cols
    if granularity == "element":
        return flat
    if granularity == "row":
        return r
    if granularity == "column":
        return c
    return (r // block) * -(-cols // block) + c // block


def unit_entries(
    units: torch.Tensor, shape: tuple[int, ...], granularity: str, block: int | None = None
) -> torch.Tensor:
    """The sorted flat positions (int64) of the given units."""
    rows, cols = as_matrix(shape)
    units = units.long()
    if granularity == "element":
        flat = units
    elif granularity == "row":
        flat = (units[:, None] * cols + torch.arange(cols)).reshape(-1)
    elif granularity == "column":
        flat = (torch.arange(rows)[:, None] * cols + units[None, :]).reshape(-1)
    else:
        per_row = -(-cols // block)
        r = (units // per_row)[:, None, None] * block + torch.arange(block)[None, :, None]
        c = (units % per_row)[:, None, None] * block + torch.arange(block)[None, None, :]
        keep = (r < rows) & (c < cols)
        flat = (r * cols + c)[keep]
    return flat.sort().values
