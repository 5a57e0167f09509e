"""Export: standalone sparse-delta files, applied to a loaded model, stream-merged into checkpoints, composed.

Sparse-delta file format (``peft-isolate/sparse-delta``, version 1)
-------------------------------------------------------------------
A plain safetensors file; reading it needs only ``safetensors`` and ``json``. For every changed weight
``W`` of the base model, under its full parameter name (e.g. ``model.layers.0.self_attn.q_proj.weight``):

- ``<name>.indices``: int32 ``[k]``, sorted unique flat positions into ``W`` (row-major, ``W.reshape(-1)``);
- ``<name>.values``: float ``[k]`` (float32 unless exported as float16/bfloat16), the delta at those positions.

Header metadata (safetensors ``__metadata__``, all strings):

- ``format``: ``"peft-isolate/sparse-delta"``; ``version``: ``"1"``;
- ``shapes``: JSON ``{name: [dims]}``, the shape of each ``W``;
- ``base_fingerprint`` (optional): sha256 hex of the base the delta was made for: of the UTF-8 JSON
  ``json.dumps(sorted([name, shape, dtype, quant] ...), separators=(",", ":"))`` over every parameter and
  persistent buffer, where ``dtype`` is the torch name without ``torch.`` (``"float32"``), and for
  bitsandbytes weights ``shape``/``dtype`` are the unquantized ones and ``quant`` is ``"nf4"``, ``"fp4"`` or
  ``"int8"`` (else ``"none"``);
- ``base_layout`` (optional): the same hash over ``[name, shape]`` only (same model at another precision);
- ``base_quantization`` (optional): the base's quantization types, comma-separated (``"none"`` if none).

Applying it without peft-isolate::

    import json
    from safetensors import safe_open
    with safe_open("delta.safetensors", "pt") as f:
        for name in json.loads(f.metadata()["shapes"]):
            w = state_dict[name].view(-1)
            idx = f.get_tensor(name + ".indices").long()
            w[idx] = (w[idx].float() + f.get_tensor(name + ".values").float()).to(w.dtype)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import merge_utils
from peft.utils.integrations import get_bnb_param_type
from torch import nn

from ._io import TensorReader, honour_umask, load_json, load_tensors, save_tensors
from .regions import IsolationDelta, _Checkpoint, check_index_set
from .tuner.layer import _store_weight, dequantized_weight

FORMAT = "peft-isolate/sparse-delta"
VERSION = "1"
INT32_MAX = 2**31 - 1
_WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf"}
_INDEX = "model.safetensors.index.json"

# name -> (peft merge function, needs density); each takes (task_tensors, weights[, density])
RULES: dict[str, tuple[Callable[..., torch.Tensor], bool]] = {
    "sum": (merge_utils.task_arithmetic, False),
    "magnitude_prune": (merge_utils.magnitude_prune, True),
    "ties": (merge_utils.ties, True),
    "dare_linear": (merge_utils.dare_linear, True),
    "dare_ties": (merge_utils.dare_ties, True),
}

Base = str | os.PathLike | nn.Module


# --------------------------------------------------------------------------------------- fingerprint


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _model_entries(model: nn.Module) -> dict[str, tuple[tuple[int, ...], str, str]]:
    """{name: (shape, dtype, quant)} of a model's parameters and persistent buffers, unquantized shapes for bnb."""
    if any(isinstance(m, BaseTunerLayer) for m in model.modules()):
        raise ValueError(
            "the model holds peft adapter layers: pass the plain base model (merge_and_unload() a PeftModel first)"
        )
    out: dict[str, tuple[tuple[int, ...], str, str]] = {}
    for name, p in model.named_parameters():
        kind = get_bnb_param_type(p)
        if kind == "4bit":
            state = p.quant_state  # bitsandbytes' CPU repacking sets dtype to bf16 and keeps the real one aside
            dtype = state.original_dtype if getattr(state, "packing_format_for_cpu", False) else state.dtype
            out[name] = (tuple(state.shape), _dtype_name(dtype), state.quant_type)
        else:
            out[name] = (tuple(p.shape), _dtype_name(p.dtype), "int8" if kind == "8bit" else "none")
    for name, b in model.named_buffers():
        owner, _, attr = name.rpartition(".")
        if attr not in model.get_submodule(owner)._non_persistent_buffers_set:
            out[name] = (tuple(b.shape), _dtype_name(b.dtype), "none")
    return out


def _open_checkpoint(path: str | os.PathLike) -> _Checkpoint:
    """The tensors of a full-precision safetensors checkpoint (directory or file); pre-quantized ones are refused."""
    config = Path(path) / "config.json"
    if config.is_file() and load_json(config).get("quantization_config"):
        raise ValueError(
            f"{path} is a pre-quantized checkpoint; use its full-precision original, or pass the loaded model"
        )
    return _Checkpoint(path)


def _checkpoint_entries(ckpt: _Checkpoint) -> dict[str, tuple[tuple[int, ...], str, str]]:
    return {n: (r.shape(n), _dtype_name(r.dtype(n)), "none") for n, r in ckpt.where.items()}


def _entries(base: Base) -> dict[str, tuple[tuple[int, ...], str, str]]:
    return _model_entries(base) if isinstance(base, nn.Module) else _checkpoint_entries(_open_checkpoint(base))


def _sha(rows: list) -> str:
    return hashlib.sha256(json.dumps(sorted(rows), separators=(",", ":")).encode()).hexdigest()


def _fingerprints(entries: dict[str, tuple[tuple[int, ...], str, str]]) -> dict[str, str]:
    """The header fields that identify a base: fingerprint, layout hash and quantization types."""
    quant = sorted({q for _, _, q in entries.values() if q != "none"}) or ["none"]
    return {
        "base_fingerprint": _sha([[n, list(s), d, q] for n, (s, d, q) in entries.items()]),
        "base_layout": _sha([[n, list(s)] for n, (s, _, _) in entries.items()]),
        "base_quantization": ",".join(quant),
    }


def base_fingerprint(model_or_checkpoint: Base) -> str:
    """sha256 over parameter names, shapes, dtypes and quantization type, so a delta can refuse a foreign base."""
    return _fingerprints(_entries(model_or_checkpoint))["base_fingerprint"]


def _check_base(delta: SparseDelta, base: dict[str, str], force: bool, what: str) -> str:
    """Compare a delta's recorded base with `base`; raise unless `force`. Returns "match", "forced" or "unknown"."""
    recorded = delta.base.get("base_fingerprint")
    if recorded is None:
        return "unknown"
    if recorded == base["base_fingerprint"]:
        return "match"
    if delta.base.get("base_layout") == base["base_layout"]:
        made, here = delta.base.get("base_quantization", "none"), base["base_quantization"]
        other = "dtypes" if made == here else f"quantization (delta made on {made}, this base {here})"
        why = (
            f"same names and shapes, other {other}, so the result differs from the trained model by the rounding "
            "between the two"
        )
    else:
        why = "its parameter names or shapes differ"
    if not force:
        raise ValueError(
            f"{delta.path} was made for another base than {what}: {why}; to apply it anyway pass force=True "
            "(CLI: --force)"
        )
    warnings.warn(f"applying {delta.path} to another base than it was made for ({why})", stacklevel=3)
    return "forced"


# ------------------------------------------------------------------------------------------ the file


@dataclass
class SparseDelta:
    """A sparse delta in memory: per weight name, sorted flat int64 indices and fp32 values, plus shapes."""

    entries: dict[str, tuple[torch.Tensor, torch.Tensor]]
    shapes: dict[str, tuple[int, ...]]
    base: dict[str, str]
    path: str = "<memory>"

    @classmethod
    def load(cls, path: str | os.PathLike) -> SparseDelta:
        """Read and check a sparse-delta file (format, version, index sets, value counts)."""
        tensors, meta = load_tensors(path)
        if meta.get("format") != FORMAT:
            raise ValueError(
                f"{path} is not a peft-isolate sparse-delta file (format {meta.get('format')!r}); "
                "make one with export_delta (`peft-isolate export`)"
            )
        if meta.get("version") != VERSION:
            raise ValueError(
                f"{path} has sparse-delta version {meta.get('version')}; this peft-isolate reads {VERSION}"
            )
        try:
            shapes = {n: tuple(int(d) for d in s) for n, s in json.loads(meta["shapes"]).items()}
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(
                f"{path}: its header's `shapes` is missing or not {{name: [dims]}} ({e!r}); recreate the file"
            ) from e
        stray = set(tensors) - {f"{n}.{part}" for n in shapes for part in ("indices", "values")}
        if stray:
            raise ValueError(f"{path}: tensor {sorted(stray)[0]} is not listed in the header's shapes; recreate it")
        entries = {}
        for name, shape in shapes.items():
            idx, val = tensors.get(f"{name}.indices"), tensors.get(f"{name}.values")
            if idx is None or val is None:
                raise ValueError(f"{path}: {name} lacks its .indices or .values tensor; recreate the file")
            check_index_set(idx, math.prod(shape), f"{path}: {name}")
            if not val.is_floating_point() or val.shape != idx.shape:
                raise ValueError(f"{path}: {name}.values must be floats, one per index; recreate the file")
            if not torch.isfinite(val).all():
                raise ValueError(f"{path}: {name}.values holds NaN or inf; the adapter it came from diverged")
            entries[name] = (idx.long(), val.float())
        base = {k: meta[k] for k in ("base_fingerprint", "base_layout", "base_quantization") if k in meta}
        return cls(entries, shapes, base, str(path))

    def save(self, path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> Path:
        """Write the delta as a sparse-delta file, values in `dtype`, atomically."""
        if not dtype.is_floating_point:
            raise ValueError(f"values dtype must be a float type (float32, bfloat16, float16), got {dtype}")
        tensors = {}
        for name, (idx, val) in self.entries.items():
            if math.prod(self.shapes[name]) > INT32_MAX:
                raise ValueError(f"{name} has more than 2**31 - 1 entries: int32 flat indices cannot address it")
            tensors[f"{name}.indices"] = idx.to(torch.int32)
            tensors[f"{name}.values"] = val.to(dtype)
        meta = {"format": FORMAT, "version": VERSION, "shapes": json.dumps(self.shapes), **self.base}
        return save_tensors(tensors, path, metadata=meta)

    def check_fits(self, entries: dict[str, tuple[tuple[int, ...], str, str]], what: str) -> None:
        """Raise a ValueError naming the first tensor of the delta that `what` lacks, shapes differently or
        holds as integers."""
        for name, shape in self.shapes.items():
            if name not in entries:
                raise ValueError(f"{self.path}: {what} has no tensor {name}; the delta was made for another model")
            base_shape, dtype, quant = entries[name]
            if tuple(base_shape) != tuple(shape):
                raise ValueError(
                    f"{self.path}: {name} has shape {tuple(shape)} in the delta but {tuple(base_shape)} in {what}; "
                    "the delta was made for another model"
                )
            if quant == "none" and not getattr(torch, dtype).is_floating_point:
                raise ValueError(
                    f"{self.path}: {name} is an integer ({dtype}) tensor in {what}; it cannot take a delta"
                )


def export_delta(
    adapter_dir: str | os.PathLike,
    out_path: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    base: Base | None = None,
) -> dict[str, Any]:
    """Write an isolation adapter's delta (trainable + frozen parts) as a standalone sparse-delta file.

    `base` (checkpoint path or loaded model) gives the weight shapes and the fingerprint; without it the
    adapter's recorded `base_model_name_or_path` is used when it is a local checkpoint.
    """
    if base is None:
        recorded = load_json(Path(adapter_dir) / "adapter_config.json").get("base_model_name_or_path")
        if not recorded or not Path(recorded).is_dir():
            raise ValueError(
                f"{adapter_dir} records base {recorded!r}, which is not a local checkpoint: pass base= "
                "(the checkpoint directory or the loaded model the adapter was trained on)"
            )
        base = recorded
    entries = _entries(base)
    source = IsolationDelta(adapter_dir, {n: s for n, (s, _, _) in entries.items()})
    delta = SparseDelta(source.entries, source.shapes(), _fingerprints(entries))
    delta.save(out_path, dtype)
    return {
        "path": str(out_path),
        "tensors": len(delta.entries),
        "entries": sum(i.numel() for i, _ in delta.entries.values()),
        "dtype": _dtype_name(dtype),
        "base_fingerprint": delta.base["base_fingerprint"],
        "base_quantization": delta.base["base_quantization"],
    }


# ------------------------------------------------------------------------------------------- apply


def _add_entries(flat: torch.Tensor, idx: torch.Tensor, val: torch.Tensor) -> None:
    """flat[idx] += val with one rounding per entry (in fp32 or wider), in place."""
    wide = torch.promote_types(flat.dtype, torch.float32)
    idx = idx.to(flat.device)
    flat[idx] = (flat[idx].to(wide) + val.to(flat.device, wide)).to(flat.dtype)


def apply_delta(model: nn.Module, path: str | os.PathLike, force: bool = False) -> dict[str, Any]:
    """Add a sparse-delta file to a loaded model in place; bnb 4-/8-bit weights are dequantized, added, requantized.

    Refuses a delta made for other shapes (naming the tensor) or, unless `force`, another base fingerprint.
    The report's `rounding` gives max/mean |requantized - intended| over the requantized weights.
    """
    delta = SparseDelta.load(path)
    entries = _model_entries(model)
    delta.check_fits(entries, "the model")
    fingerprint = _check_base(delta, _fingerprints(entries), force, "this model")
    max_err, err_sum, err_count, delta_max = 0.0, 0.0, 0, 0.0
    with torch.no_grad():
        for name, (idx, val) in delta.entries.items():
            owner, _, attr = name.rpartition(".")
            module = model.get_submodule(owner)
            if entries[name][2] == "none":
                _add_entries(getattr(module, attr).data.view(-1), idx, val)
                continue
            intended = dequantized_weight(module).float().clone()
            _add_entries(intended.view(-1), idx, val)
            _store_weight(module, intended.clone())  # the layer may keep the tensor it is given
            err = (dequantized_weight(module).float() - intended).abs()
            max_err = max(max_err, float(err.max()))
            err_sum += float(err.sum())
            err_count += err.numel()
            delta_max = max(delta_max, float(val.abs().max())) if val.numel() else delta_max
    return {
        "tensors": len(delta.entries),
        "entries": sum(i.numel() for i, _ in delta.entries.values()),
        "fingerprint": fingerprint,
        "rounding": None
        if not err_count
        else {"max_abs": max_err, "mean_abs": err_sum / err_count, "delta_max_abs": delta_max},
    }


# ------------------------------------------------------------------------------------------- merge


def _merge_shard(src: TensorReader, dst: Path, delta: SparseDelta) -> int:
    """Copy one shard to `dst` and rewrite, one tensor at a time, those the delta changes. Returns how many."""
    shutil.copyfile(src.path, dst)  # kernel-side copy: the bytes never enter this process
    changed = [n for n in src.names() if n in delta.entries]
    fd = os.open(dst, os.O_WRONLY)
    try:
        for name in changed:
            tensor = src.read(name)
            _add_entries(tensor, *delta.entries[name])
            raw = memoryview(tensor.view(torch.uint8).numpy())
            offset = src._data_start + src._entry(name)["data_offsets"][0]
            done = 0
            while done < len(raw):
                done += os.pwrite(fd, raw[done:], offset + done)
            del tensor, raw
    finally:
        os.close(fd)
    return len(changed)


def merge_checkpoint(
    base_dir: str | os.PathLike, delta_path: str | os.PathLike, out_dir: str | os.PathLike, force: bool = False
) -> dict[str, Any]:
    """Write base checkpoint + delta as a new checkpoint directory, streaming shard by shard, tensor by tensor.

    Peak memory is about the largest changed tensor: shards are copied by the kernel and only the tensors the
    delta touches are read, added to and written back. The output is built in a temporary directory and
    renamed onto `out_dir` (which must not exist or be empty). Unless `force`, refuses another base fingerprint.
    """
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    if not (base_dir / "config.json").is_file():
        raise FileNotFoundError(f"{base_dir} has no config.json: pass a model directory saved with save_pretrained")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} exists and is not empty: remove it or choose another output directory")
    delta = SparseDelta.load(delta_path)
    ckpt = _open_checkpoint(base_dir)
    entries = _checkpoint_entries(ckpt)
    delta.check_fits(entries, f"base checkpoint {base_dir}")
    fingerprint = _check_base(delta, _fingerprints(entries), force, f"checkpoint {base_dir}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    honour_umask(tmp)
    try:
        for f in base_dir.iterdir():
            if f.is_file() and f.suffix not in _WEIGHT_SUFFIXES and f.name != _INDEX:
                shutil.copy2(f, tmp / f.name)
        changed = sum(_merge_shard(r, tmp / r.path.name, delta) for r in ckpt.readers)
        if (base_dir / _INDEX).is_file():
            index = load_json(base_dir / _INDEX)
            index.setdefault("metadata", {})["merged_delta"] = Path(delta_path).name
            (tmp / _INDEX).write_text(json.dumps(index, indent=2) + "\n")
        for f in tmp.iterdir():  # durable before the rename makes the directory visible
            fd = os.open(f, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "out_dir": str(out_dir),
        "shards": len(ckpt.readers),
        "tensors": changed,
        "entries": sum(i.numel() for i, _ in delta.entries.values()),
        "fingerprint": fingerprint,
    }


# ----------------------------------------------------------------------------------------- compose


def _common_base(deltas: Sequence[SparseDelta]) -> dict[str, str]:
    """The recorded base shared by all deltas that record one; raise if two record different bases."""
    recorded = [d for d in deltas if "base_fingerprint" in d.base]
    for d in recorded[1:]:
        if d.base["base_fingerprint"] != recorded[0].base["base_fingerprint"]:
            raise ValueError(
                f"{recorded[0].path} and {d.path} were made for different bases (fingerprints differ): "
                "compose only deltas of the same base model"
            )
    return dict(recorded[0].base) if recorded else {}


def compose_deltas(
    paths: Sequence[str | os.PathLike],
    out_path: str | os.PathLike,
    rule: str | None = None,
    weights: Sequence[float] | None = None,
    density: float | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Combine sparse-delta files into one on the union of their supports.

    Disjoint supports add exactly. Where supports overlap a `rule` must be named: `sum`, or peft's
    `magnitude_prune`, `ties`, `dare_linear`, `dare_ties` (these need `density`; DARE draws with `seed`),
    applied per tensor to the deltas as vectors over the union of supports, zero off their own support. So
    `density` is a fraction of the union: magnitude_prune and ties keep each delta's top density x |union|
    entries (all of a delta that covers less than that), DARE keeps each entry with probability density.
    `weights` default to 1.
    """
    if rule is not None and rule not in RULES:
        raise ValueError(f"unknown compose rule {rule!r}; choose one of {sorted(RULES)}")
    if rule is not None and RULES[rule][1] and (density is None or not 0 < density <= 1):
        raise ValueError(
            f"rule {rule!r} needs density= (the fraction of the union of supports kept per delta) in (0, 1], "
            f"got {density}"
        )
    deltas = [SparseDelta.load(p) for p in paths]
    if not deltas:
        raise ValueError("compose_deltas needs at least one delta file")
    weights = [1.0] * len(deltas) if weights is None else list(weights)
    if len(weights) != len(deltas):
        raise ValueError(f"got {len(weights)} weights for {len(deltas)} deltas: pass one weight per delta")
    shapes: dict[str, tuple[int, ...]] = {}
    for d in deltas:
        for name, shape in d.shapes.items():
            if shapes.setdefault(name, shape) != shape:
                raise ValueError(f"{d.path}: {name} has shape {shape}, another delta has {shapes[name]}")
    entries, overlap = {}, 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name in sorted(shapes):
            parts = [(i, *d.entries[name]) for i, d in enumerate(deltas) if name in d.entries]
            union = torch.unique(torch.cat([idx for _, idx, _ in parts]))
            stacked = torch.zeros(len(deltas), union.numel())
            for i, idx, val in parts:
                stacked[i, torch.searchsorted(union, idx)] = val
            shared = sum(idx.numel() for _, idx, _ in parts) - union.numel()
            if shared and rule is None:
                raise ValueError(
                    f"the deltas overlap at {shared} entries of {name}: name a rule to combine them "
                    f"({', '.join(RULES)}), or compose deltas with disjoint supports"
                )
            overlap += shared
            w = torch.tensor(weights)
            if rule is None:
                values = (stacked * w[:, None]).sum(0)
            else:
                fn, needs_density = RULES[rule]
                values = fn(list(stacked), w, density) if needs_density else fn(list(stacked), w)
            entries[name] = (union, values.float())
    out = SparseDelta(entries, shapes, _common_base(deltas))
    out.save(out_path)
    return {
        "path": str(out_path),
        "tensors": len(entries),
        "entries": sum(i.numel() for i, _ in entries.values()),
        "overlapping_entries": overlap,
        "rule": rule,
    }
