"""Core regions: per-parameter sorted index sets, their set algebra, and exact streaming top-p selection.

A task's core region is the top p of all entries by |theta_task - theta_0| (docs/method.md, "Core regions").
Deltas come from a `DeltaSource` (two checkpoints, a LoRA adapter, an isolation adapter, two in-memory models) one
chunk at a time, so selecting over a model of any size holds only a chunk, the candidate buffer and
the result.
"""

from __future__ import annotations

import json
import math
import os
import queue
import re
import threading
import warnings
from abc import ABC, abstractmethod
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ._io import TensorReader, load_json, load_tensors, save_tensors

FORMAT = "peft-isolate/core-regions"
SCOPES = ("global", "layer", "matrix")
PEFT_PREFIX = "base_model.model."
DEFAULT_CHUNK = 1 << 20
_LAYER = re.compile(r"^(.*?\.(?:layers|layer|h|blocks|block)\.\d+)\.")

# ----------------------------------------------------------------------------------------- set algebra


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


def _intersection_size(a: np.ndarray, b: np.ndarray) -> int:
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
        """Write as safetensors: an int32 tensor per parameter, shapes and p/scope/source in the header."""
        meta = {
            "format": FORMAT,
            "version": "1",
            "shapes": json.dumps({n: list(s) for n, s in self.shapes.items()}),
            "p": json.dumps(self.p),
            "scope": json.dumps(self.scope),
            "source": self.source,
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
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(
                f"{path}: its header's shapes, p or scope is missing or malformed ({e!r}); recreate the file with "
                "`peft-isolate regions` or CoreRegions.save"
            ) from None
        return cls(tensors, shapes, p, scope, meta.get("source", ""))


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


def jaccard(a: CoreRegions, b: CoreRegions) -> float:
    """|A ∩ B| / |A ∪ B| over all parameters (0 when both are empty)."""
    inter = sum(
        _intersection_size(a.indices[n].numpy(), b.indices[n].numpy()) if n in b.indices else 0 for n in a.indices
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


def chance_matrix(regions: Mapping[str, CoreRegions], universe: int | None = None) -> torch.Tensor:
    """Expected Jaccard of random sets with each pair's sizes over the entries they could lie at: `universe`
    when the cores come from updates confined to one shared support (sparse probes), else every entry of the
    union of their shapes."""
    tasks = list(regions)
    m = torch.zeros(len(tasks), len(tasks), dtype=torch.float64)
    for i, a in enumerate(tasks):
        for j in range(i, len(tasks)):
            b = tasks[j]
            total = universe or sum(math.prod(s) for s in {**regions[a].shapes, **regions[b].shapes}.values())
            m[i, j] = m[j, i] = expected_jaccard(regions[a].size, regions[b].size, total)
    return m


# ------------------------------------------------------------------------------------------ delta sources


class DeltaSource(ABC):
    """Where a task's update (tuned minus base) comes from, streamed one flat chunk at a time."""

    description: str = ""
    _shapes: dict[str, tuple[int, ...]]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every parameter name the source covers (base-model names) and its weight shape."""
        return {n: self._shapes[n] for n in canonical_order(self._shapes)}

    @abstractmethod
    def iter_deltas(
        self, names: Sequence[str], chunk_size: int = DEFAULT_CHUNK
    ) -> Iterator[tuple[str, int, torch.Tensor]]:
        """Yield (name, flat start, fp32 delta chunk on CPU, owned by the caller) for `names` in order."""

    @property
    def support_size(self) -> int | None:
        """How many entries the update can be non-zero at: a sparse adapter's support; None when it is dense."""
        return None

    def delta(self, name: str) -> torch.Tensor:
        """The whole fp32 delta of one parameter, in its shape."""
        numel = math.prod(self.shapes()[name])
        parts = [d for _, _, d in self.iter_deltas([name], max(numel, 1))]
        return (torch.cat(parts) if parts else torch.zeros(0)).reshape(self.shapes()[name])


def _sub(tuned: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """tuned - base in fp32 on CPU (fp64 when either is fp64, then rounded), never aliasing the inputs.

    A base wider than the tuned weights is first rounded to their dtype, as it was when the model was loaded to
    train (bf16 on a GPU): else every entry's delta would hold that rounding, as large as a small update."""
    if base.is_floating_point() and tuned.is_floating_point() and base.itemsize > tuned.itemsize:
        base = base.to(tuned.dtype)
    if torch.float64 in (tuned.dtype, base.dtype):
        return (tuned.double() - base.to(tuned.device).double()).float().cpu()
    d = tuned.to(torch.float32, copy=True)
    return d.sub_(base.to(d.device)).cpu()


def _check_same(base: Mapping[str, tuple], tuned: Mapping[str, tuple], what: str, fix: str) -> None:
    """Raise a ValueError naming parameters that are missing on one side or differ in shape."""
    only_b, only_t = sorted(set(base) - set(tuned)), sorted(set(tuned) - set(base))
    if only_b or only_t:
        raise ValueError(
            f"{what}: parameter names differ: {len(only_b)} only in base (e.g. {only_b[:3]}), "
            f"{len(only_t)} only in tuned (e.g. {only_t[:3]}); {fix}"
        )
    bad = [(n, base[n], tuned[n]) for n in base if tuple(base[n]) != tuple(tuned[n])]
    if bad:
        n, sb, st = bad[0]
        raise ValueError(f"{what}: {len(bad)} parameter shapes differ, e.g. {n}: base {sb}, tuned {st}; {fix}")


_T = TypeVar("_T")


def _prefetch(items: Iterator[_T], depth: int = 3) -> Iterator[_T]:
    """Run `items` in a background thread `depth` items ahead, so reading overlaps the caller's math."""
    q: queue.Queue = queue.Queue(depth)
    stop = threading.Event()
    end = object()

    def put(x: object) -> bool:
        while not stop.is_set():
            try:
                q.put(x, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(end)
        except BaseException as e:  # handed to the consumer, which raises it
            put(_Raised(e))

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        while (item := q.get()) is not end:
            if isinstance(item, _Raised):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join()


@dataclass
class _Raised:
    error: BaseException


class Checkpoint:
    """The safetensors tensors of a model directory (sharded or not) or of one file, read with pread."""

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        if path.is_file():
            files = [path]
        elif path.is_dir():
            index = path / "model.safetensors.index.json"
            if index.is_file():
                listing = load_json(index)
                weight_map = listing.get("weight_map") if isinstance(listing, dict) else None
                if not isinstance(weight_map, dict):
                    raise ValueError(f"{index} has no weight_map: re-save the model with save_pretrained")
                files = sorted({path / f for f in weight_map.values()})
            else:
                files = sorted(f for f in path.glob("*.safetensors") if f.name != "adapter_model.safetensors")
            if not files:
                hint = (
                    "it is a peft adapter: pass it as --lora/--adapter"
                    if (path / "adapter_config.json").is_file()
                    else "save the model with save_pretrained (safetensors; pickle .bin files are not read)"
                )
                raise FileNotFoundError(f"no *.safetensors weights in {path}: {hint}")
        else:
            raise FileNotFoundError(f"{path} does not exist")
        self.path = path
        self.readers = [TensorReader(f) for f in files]
        self.where: dict[str, TensorReader] = {}
        for r in self.readers:
            for k in r.names():
                if k in self.where:
                    raise ValueError(f"{path}: tensor {k} appears in both {self.where[k].path} and {r.path}")
                self.where[k] = r

    def shapes(self, floating_only: bool = True) -> dict[str, tuple[int, ...]]:
        return {n: r.shape(n) for n, r in self.where.items() if not floating_only or r.dtype(n).is_floating_point}

    def read(self, name: str, start: int, count: int) -> torch.Tensor:
        return self.where[name].read(name, start, count)

    def will_need(self, name: str) -> None:
        self.where[name].will_need(name)


class CheckpointDelta(DeltaSource):
    """Delta between two checkpoints (directories or single safetensors files), streamed chunk by chunk.

    Only a chunk of each is in memory at a time, read with pread; the kernel is asked to fetch the
    next tensor ahead. Non-floating tensors (integer buffers) are skipped.
    """

    def __init__(self, base: str | os.PathLike, tuned: str | os.PathLike):
        self.base, self.tuned = Checkpoint(base), Checkpoint(tuned)
        self.description = f"checkpoints base={base} tuned={tuned}"
        self._shapes = self.base.shapes()
        _check_same(
            self._shapes,
            self.tuned.shapes(),
            f"checkpoints {base} and {tuned}",
            "pass the checkpoint the tuned model was trained from (same architecture and parameter names)",
        )

    def iter_deltas(
        self, names: Sequence[str], chunk_size: int = DEFAULT_CHUNK
    ) -> Iterator[tuple[str, int, torch.Tensor]]:
        for i, name in enumerate(names):
            if i + 1 < len(names):  # let the kernel fetch the next tensor while this one is ranked
                self.base.will_need(names[i + 1])
                self.tuned.will_need(names[i + 1])
            numel = math.prod(self._shapes[name])
            for s in range(0, numel, chunk_size):
                c = min(chunk_size, numel - s)
                yield name, s, _sub(self.tuned.read(name, s, c), self.base.read(name, s, c))


def _parameters(model: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if isinstance(model, nn.Module):
        return {n: p.detach() for n, p in model.named_parameters()}
    return {n: t.detach() for n, t in model.items()}


class ModelDelta(DeltaSource):
    """Delta between two in-memory models, or a model and its saved initial state ({name: tensor})."""

    def __init__(self, base: nn.Module | Mapping[str, torch.Tensor], tuned: nn.Module | Mapping[str, torch.Tensor]):
        self.base = {n: t for n, t in _parameters(base).items() if t.is_floating_point()}
        self.tuned = {n: t for n, t in _parameters(tuned).items() if t.is_floating_point()}
        self.description = "in-memory models"
        _check_same(
            {n: tuple(t.shape) for n, t in self.base.items()},
            {n: tuple(t.shape) for n, t in self.tuned.items()},
            "in-memory models",
            "pass the tuned model and the state it started from (same architecture)",
        )

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: tuple(self.base[n].shape) for n in canonical_order(self.base)}

    def iter_deltas(
        self, names: Sequence[str], chunk_size: int = DEFAULT_CHUNK
    ) -> Iterator[tuple[str, int, torch.Tensor]]:
        for name in names:
            b, t = self.base[name].reshape(-1), self.tuned[name].reshape(-1)
            for s in range(0, b.numel(), chunk_size):
                yield name, s, _sub(t[s : s + chunk_size], b[s : s + chunk_size])


def base_shapes(
    base: str | os.PathLike | nn.Module | Mapping[str, torch.Tensor | Sequence[int]],
) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of a base model given as a checkpoint path, a model, or {name: tensor or shape}.

    4-bit bitsandbytes weights report their unquantized shape; peft wrappers' names are unwrapped.
    """
    if isinstance(base, (str, os.PathLike)):
        return Checkpoint(base).shapes(floating_only=False)
    if isinstance(base, nn.Module):
        out = {}
        for n, p in base.named_parameters():
            state = getattr(p, "quant_state", None)
            out[strip_peft_prefix(n).replace(".base_layer.", ".")] = tuple(state.shape if state else p.shape)
        return out
    return {n: tuple(v.shape) if isinstance(v, torch.Tensor) else tuple(v) for n, v in base.items()}


def _adapter_file(adapter: str | os.PathLike) -> Path:
    path = Path(adapter)
    file = path / "adapter_model.safetensors" if path.is_dir() else path
    if not file.is_file():
        hint = (
            " (only pickle .bin weights found: re-save with safe_serialization=True)"
            if (path / "adapter_model.bin").is_file()
            else ""
        )
        raise FileNotFoundError(f"no adapter_model.safetensors in {path}{hint}")
    return file


# the adapter_config.json fields peft-isolate reads, and the JSON types each may have
_CONFIG_TYPES: dict[str, tuple[type, ...]] = {
    "base_model_name_or_path": (str, type(None)),
    "lora_alpha": (int, float),
    "alpha_pattern": (dict,),
    "use_rslora": (bool,),
    "fan_in_fan_out": (bool,),
    "weight_shapes": (dict, type(None)),
}


def read_adapter_config(adapter: str | os.PathLike, peft_type: str | None = None) -> dict[str, Any]:
    """An adapter directory's adapter_config.json, checked: a mapping naming a known `peft_type` (`peft_type` if
    given) whose fields peft-isolate reads have their JSON types; else one error naming the file and the fix."""
    from peft.utils.peft_types import PeftType

    path = Path(adapter) / "adapter_config.json"
    cfg = load_json(path)
    fix = "re-save the adapter with save_pretrained"
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} holds a {type(cfg).__name__}, not a mapping of config fields: {fix}")
    kind = cfg.get("peft_type")
    if kind not in {t.value for t in PeftType}:
        raise ValueError(f"{path}: peft_type {kind!r} is not a peft method this peft knows: {fix}")
    if peft_type is not None and kind != peft_type:
        hint = "use --adapter for isolation adapters" if peft_type == "LORA" else "pass a LoRA adapter as --lora"
        raise ValueError(f"{adapter} is a {kind} adapter, not {peft_type}: {hint}")
    for name, types in _CONFIG_TYPES.items():
        value = cfg.get(name)
        if name in cfg and not (isinstance(value, types) and (bool in types or not isinstance(value, bool))):
            raise ValueError(f"{path}: {name} is {cfg[name]!r}, not a {' or '.join(t.__name__ for t in types)}: {fix}")
    return cfg


def _check_against_base(shapes: Mapping[str, tuple[int, ...]], base: Mapping[str, tuple[int, ...]], what: str) -> None:
    missing = [n for n in shapes if n not in base]
    bad = [(n, shapes[n], base[n]) for n in shapes if n in base and tuple(base[n]) != tuple(shapes[n])]
    if missing or bad:
        detail = (
            f"{len(missing)} adapted weights are not in the base, e.g. {missing[0]}"
            if missing
            else f"{len(bad)} shapes differ, e.g. {bad[0][0]}: adapter {bad[0][1]}, base {bad[0][2]}"
        )
        raise ValueError(f"{what} does not match its base model: {detail}; pass the base it was trained on")


class LoraDelta(DeltaSource):
    """Delta of a peft LoRA adapter directory: scale * B @ A per module, built a row block at a time.

    `base` (checkpoint path, model or {name: shape}) is optional and only checks the adapter fits it.
    """

    def __init__(
        self,
        adapter: str | os.PathLike,
        base: str | os.PathLike | nn.Module | Mapping[str, Any] | None = None,
    ):
        from peft import LoraConfig
        from peft.utils.other import get_pattern_key

        cfg = read_adapter_config(adapter, "LORA")
        variants = [
            f.name
            for f in LoraConfig.__dataclass_fields__.values()
            if f.metadata.get("is_lora_variant") and cfg.get(f.name)
        ]
        if variants:
            raise ValueError(
                f"{adapter} uses LoRA variant(s) {variants}, whose update is not scale * B @ A; "
                "probe with plain LoRA, or merge it and pass --base/--tuned checkpoints"
            )
        tensors, _ = load_tensors(_adapter_file(adapter))
        self.modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
        for key, a in tensors.items():
            if not key.endswith(".lora_A.weight"):
                continue
            module = strip_peft_prefix(key[: -len(".lora_A.weight")])
            b = tensors.get(key.replace(".lora_A.", ".lora_B."))
            if b is None or a.dim() != 2 or b.dim() != 2:
                raise ValueError(f"{adapter}: {module} is not a Linear LoRA pair (2-D lora_A and lora_B)")
            r = a.shape[0]
            alpha = cfg.get("alpha_pattern", {}).get(
                get_pattern_key(cfg.get("alpha_pattern", {}).keys(), module), cfg["lora_alpha"]
            )
            scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
            self.modules[f"{module}.weight"] = (a, b, scale)
        unsupported = [k for k in tensors if "lora_embedding" in k or "lora_magnitude" in k]
        if unsupported or not self.modules:
            raise ValueError(
                f"{adapter}: no Linear LoRA weights to read"
                + (f" (unsupported tensors, e.g. {unsupported[0]})" if unsupported else "")
            )
        self.fan_in_fan_out = bool(cfg.get("fan_in_fan_out"))
        self._shapes = {
            n: (a.shape[1], b.shape[0]) if self.fan_in_fan_out else (b.shape[0], a.shape[1])
            for n, (a, b, _) in self.modules.items()
        }
        if base is not None:
            _check_against_base(self._shapes, base_shapes(base), f"LoRA adapter {adapter}")
        self.description = f"lora adapter={adapter}"

    def iter_deltas(
        self, names: Sequence[str], chunk_size: int = DEFAULT_CHUNK
    ) -> Iterator[tuple[str, int, torch.Tensor]]:
        for name in names:
            a, b, scale = self.modules[name]
            a, b = a.float(), b.float()
            rows, cols = self._shapes[name]
            step = max(1, chunk_size // max(cols, 1))
            for r0 in range(0, rows, step):
                # fan_in_fan_out: the weight is (in, out), so rows of the delta are columns of B @ A
                block = (b @ a[:, r0 : r0 + step]).T.contiguous() if self.fan_in_fan_out else b[r0 : r0 + step] @ a
                yield name, r0 * cols, block.mul_(scale).reshape(-1)


_ISO_KEY = re.compile(r"^(.+)\.(isolation_(?:frozen_)?(?:indices|values|locked))$")


class IsolationDelta(DeltaSource):
    """Sparse delta of an isolation adapter: trainable plus frozen values at their indices, zero elsewhere.

    `base` (checkpoint path, model or {name: shape}) gives the weight shapes; they must equal the shapes the
    adapter's config recorded (`weight_shapes`), else flat indices would point elsewhere.
    """

    def __init__(self, adapter: str | os.PathLike, base: str | os.PathLike | nn.Module | Mapping[str, Any]):
        config = Path(adapter) / "adapter_config.json"
        recorded = read_adapter_config(adapter, "ISOLATION").get("weight_shapes") if config.is_file() else None
        tensors, _ = load_tensors(_adapter_file(adapter))
        parts: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in tensors.items():
            m = _ISO_KEY.match(strip_peft_prefix(key))
            if m is None and "lora_" in key:
                raise ValueError(f"{adapter}: {key} is a LoRA tensor, not an isolation one: pass it as --lora")
            if m is None:
                raise ValueError(
                    f"{adapter}: {key} is not an isolation adapter tensor but a whole module (modules_to_save), "
                    "which a sparse delta cannot hold: merge such an adapter with merge_and_unload instead"
                )
            parts.setdefault(f"{m.group(1)}.weight", {})[m.group(2)] = t
        self.entries: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for name, p in parts.items():
            empty_i, empty_v = torch.zeros(0, dtype=torch.int64), torch.zeros(0)
            idx = torch.cat(
                [
                    p.get("isolation_indices", empty_i).long(),
                    p.get("isolation_frozen_indices", empty_i).long(),
                ]
            )
            val = torch.cat(
                [
                    p.get("isolation_values", empty_v).float(),
                    p.get("isolation_frozen_values", empty_v).float(),
                ]
            )
            if idx.shape != val.shape:
                raise ValueError(f"{adapter}: {name} has {idx.numel()} indices but {val.numel()} values")
            idx, order = idx.sort()
            if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
                raise ValueError(f"{adapter}: {name} lists an entry twice (trainable and frozen parts overlap)")
            self.entries[name] = (idx, val[order])
        shapes = base_shapes(base)
        if config.is_file() and recorded is None:
            warnings.warn(
                f"{adapter} was saved before isolation adapters recorded their weight shapes: only index ranges can "
                "be checked against the base; re-save it to check shapes",
                stacklevel=2,
            )
        for name, (idx, _) in self.entries.items():
            made = (recorded or {}).get(name.removesuffix(".weight"))
            if name not in shapes:
                problem = f"the base has no {name}"
            elif made is not None and tuple(made) != tuple(shapes[name]):
                problem = f"{name} is {tuple(made)} in the adapter but {tuple(shapes[name])} in the base"
            elif idx.numel() and int(idx[-1]) >= math.prod(shapes[name]):
                problem = f"{name} has index {int(idx[-1])} but the base weight has shape {shapes[name]}"
            else:
                continue
            raise ValueError(
                f"isolation adapter {adapter} does not match its base model: {problem}; pass the base it was trained on"
            )
        self._shapes = {n: shapes[n] for n in self.entries}
        self.description = f"isolation adapter={adapter}"

    @property
    def support_size(self) -> int:
        return sum(idx.numel() for idx, _ in self.entries.values())

    def iter_deltas(
        self, names: Sequence[str], chunk_size: int = DEFAULT_CHUNK
    ) -> Iterator[tuple[str, int, torch.Tensor]]:
        for name in names:
            idx, val = self.entries[name]
            numel = math.prod(self._shapes[name])
            for s in range(0, numel, chunk_size):
                c = min(chunk_size, numel - s)
                lo, hi = torch.searchsorted(idx, torch.tensor([s, s + c])).tolist()
                out = torch.zeros(c)
                out[idx[lo:hi] - s] = val[lo:hi]
                yield name, s, out


# ------------------------------------------------------------------------------------------- selection


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


def core_count(p: float, total: int) -> int:
    """floor(p * total), exact in decimal (0.29 * 100 is 29, not 28)."""
    return int(Decimal(repr(float(p))) * total)


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
) -> CoreRegions:
    """Select exactly floor(p * D) entries with the largest |delta| (D per scope: global, layer, matrix).

    Ties go to the earlier (parameter in `canonical_order`, flat index). One pass over the source;
    memory about 8 bytes x 2 floor(p * D) plus a few chunks. `names` restricts the selection to those
    parameters (adapter mode: the targeted linear weights). Torch runs single-threaded while streaming
    (the work is memory-bound and the source runs in a second thread); the thread count is restored after.
    """
    p = _check_p(p)
    if scope not in SCOPES:
        raise ValueError(f"scope={scope!r} is not one of {SCOPES}")
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
        for name, start, a, top in _prefetch(magnitudes()):
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
