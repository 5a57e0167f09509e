"""Delta sources: where a task's update (tuned minus base) comes from, streamed one flat chunk at a time.

Two checkpoints (read with pread, shard by shard), a LoRA adapter (scale * B @ A, a row block at a time), an
isolation adapter (its sparse values), or two in-memory models. Selection (`peft_isolate.selection`) holds only a
chunk of any of them at a time.
"""

from __future__ import annotations

import math
import os
import queue
import re
import threading
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from .files import TensorReader, load_json, load_tensors
from .regions import canonical_order, strip_peft_prefix

DEFAULT_CHUNK = 1 << 20


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


def prefetch(items: Iterator[_T], depth: int = 3) -> Iterator[_T]:
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
