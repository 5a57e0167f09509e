"""Export: standalone sparse-delta files, applied to a loaded model, stream-merged into checkpoints, composed.

The file format (``peft-isolate/sparse-delta``, versions 1 and 2) is specified in docs/formats.md. In short: a
plain safetensors file with, per changed weight ``W`` (full parameter name), its flat positions into
``W.reshape(-1)`` (``<name>.indices`` int32, or ``<name>.gaps`` in a compact encoding) and ``<name>.values``;
header metadata says the shapes and which base the delta was made for (names, shapes, dtypes and, from version 2,
sampled content). Applying it without peft-isolate (plain indices)::

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
import warnings
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import merge_utils
from peft.utils.integrations import get_bnb_param_type
from torch import nn

from .files import TensorReader, atomic_dir, check_new_output, load_json, load_tensors, save_tensors
from .models import ALIASES, resolve_model
from .regions import as_index_set
from .sources import Checkpoint, IsolationDelta, read_adapter_config
from .tuner.layer import dequantized_weight, store_weight

FORMAT = "peft-isolate/sparse-delta"
VERSION = "2"
READABLE_VERSIONS = ("1", "2")
INT32_MAX = 2**31 - 1
SAMPLES = 16  # sampled entries per tensor in a version-2 content fingerprint
# median relative distance of the sampled entries under which two bases have the same weights: nf4 rounds
# weights by about a tenth, bf16 by a few thousandths; independently trained weights differ by about sqrt(2)
CONTENT_TOLERANCE = {"quantized": 0.25, "full": 0.05}
MERGE_RECORD = "peft_isolate_deltas"  # config.json key listing the deltas a merged checkpoint holds
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


def _open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """The tensors of a full-precision safetensors checkpoint (directory or file); pre-quantized ones are refused."""
    config = Path(path) / "config.json"
    if config.is_file() and load_json(config).get("quantization_config"):
        raise ValueError(
            f"{path} is a pre-quantized checkpoint; use its full-precision original, or pass the loaded model"
        )
    return Checkpoint(path)


def _checkpoint_entries(ckpt: Checkpoint) -> dict[str, tuple[tuple[int, ...], str, str]]:
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


def sample_positions(numel: int, count: int = SAMPLES) -> list[int]:
    """The flat positions a content fingerprint reads in a tensor of `numel` entries: `count` evenly spaced."""
    n = min(count, numel)
    return [i * numel // n for i in range(n)]


def _model_samples(model: nn.Module, names: Collection[str] | None = None) -> dict[str, list[float]]:
    """A model's floating parameters (dequantized for bitsandbytes) at their `sample_positions`."""
    out = {}
    for name, param in model.named_parameters():
        if names is not None and name not in names:
            continue
        if get_bnb_param_type(param):
            flat = dequantized_weight(model.get_submodule(name.rpartition(".")[0])).reshape(-1)
        elif param.is_floating_point():
            flat = param.detach().reshape(-1)
        else:
            continue
        out[name] = flat[torch.tensor(sample_positions(flat.numel()), device=flat.device)].float().tolist()
    return out


def _checkpoint_samples(ckpt: Checkpoint, names: Collection[str] | None = None) -> dict[str, list[float]]:
    """A checkpoint's floating tensors at their `sample_positions`: a few small reads per tensor, whatever its size."""
    out = {}
    for name, reader in ckpt.where.items():
        if (names is None or name in names) and reader.dtype(name).is_floating_point:
            numel = math.prod(reader.shape(name))
            out[name] = [float(reader.read(name, i, 1).float()) for i in sample_positions(numel)]
    return out


def base_samples(base: Base, names: Collection[str] | None = None) -> dict[str, list[float]]:
    """A model's or a checkpoint's floating tensors at their `sample_positions`: the content fingerprint's values."""
    return (
        _model_samples(base, names)
        if isinstance(base, nn.Module)
        else _checkpoint_samples(_open_checkpoint(base), names)
    )


def _content_field(samples: dict[str, list[float]]) -> str:
    """The header's `base_content`: every tensor's sampled values, to 7 significant digits."""
    values = {n: [float(f"{v:.7g}") for v in vals] for n, vals in samples.items()}
    return json.dumps({"samples": SAMPLES, "values": values}, separators=(",", ":"))


def content_distance(recorded: Mapping[str, Sequence[float]], here: Mapping[str, Sequence[float]]) -> float:
    """Median over the tensors both hold of the relative distance |a - b| / max(|a|, |b|) of their sampled values:
    about 0 for the same weights (up to quantization), about sqrt(2) for independently trained ones."""
    distances = []
    for name in recorded.keys() & here.keys():
        a, b = torch.tensor(recorded[name], dtype=torch.float64), torch.tensor(here[name], dtype=torch.float64)
        if a.shape != b.shape:
            return math.inf
        scale = max(float(a.norm()), float(b.norm()))
        distances.append(float((a - b).norm()) / scale if scale else 0.0)
    return float(torch.tensor(distances).median()) if distances else math.inf


def _check_base(
    delta: SparseDelta,
    base: dict[str, str],
    samples: Callable[[Collection[str]], dict[str, list[float]]],
    force: bool,
    what: str,
) -> str:
    """Compare a delta's recorded base with `base` (names, shapes, dtypes, then sampled content); raise unless
    `force`. Returns "match", "forced" or "unknown" (the delta records no base)."""
    if delta.base.get("base_fingerprint") is None:
        return "unknown"
    why = None
    if delta.base.get("base_layout") != base["base_layout"]:
        why = "its parameter names or shapes differ"
    elif "base_content" not in delta.base:
        warnings.warn(
            f"{delta.path} is a version-1 sparse delta: it records its base's names, shapes and dtypes only, so "
            "another model of this architecture cannot be told apart; re-export it to record the base's content",
            stacklevel=3,
        )
    else:
        recorded = json.loads(delta.base["base_content"])["values"]
        distance = content_distance(recorded, samples(recorded.keys()))
        made, here = delta.base.get("base_quantization", "none"), base["base_quantization"]
        tolerance = CONTENT_TOLERANCE["full" if made == here == "none" else "quantized"]
        if distance > tolerance:
            why = (
                f"same names and shapes but other weights (sampled entries differ by a median relative distance of "
                f"{distance:.3g}, over the {tolerance} that rounding explains)"
            )
    if why is None and delta.base["base_fingerprint"] != base["base_fingerprint"]:
        made, here = delta.base.get("base_quantization", "none"), base["base_quantization"]
        other = "dtypes" if made == here else f"quantization (delta made on {made}, this base {here})"
        why = (
            f"same weights, other {other}, so the result differs from the trained model by the rounding between the two"
        )
    if why is None:
        return "match"
    if not force:
        raise ValueError(
            f"{delta.path} was made for another base than {what}: {why}; to apply it anyway pass force=True "
            "(CLI: --force)"
        )
    warnings.warn(f"applying {delta.path} to another base than it was made for ({why})", stacklevel=3)
    return "forced"


def _file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _merge_records(delta: SparseDelta, records: Any, force: bool, what: str) -> list[dict[str, Any]]:
    """The record of deltas merged into `what` (its config's `peft_isolate_deltas`) with `delta` added; a delta it
    already holds is refused unless `force` (it would be added twice)."""
    records = list(records) if isinstance(records, list) else []
    sha = _file_sha256(delta.path)
    if any(isinstance(r, dict) and r.get("sha256") == sha for r in records):
        if not force:
            raise ValueError(
                f"{what} already holds {delta.path} (its config lists the deltas merged into it): applying it again "
                "would add it twice; to do so anyway pass force=True (CLI: --force)"
            )
        warnings.warn(f"adding {delta.path} to {what} a second time", stacklevel=3)
    entries = sum(i.numel() for i, _ in delta.entries.values())
    return [*records, {"file": Path(delta.path).name, "sha256": sha, "entries": entries}]


# ------------------------------------------------------------------------------------------ the file


_GAP_DTYPES = (torch.uint8, torch.uint16)
_INDEX_PARTS = ("indices", "gaps", "escaped", "mask")
_BASE_FIELDS = ("base_fingerprint", "base_layout", "base_quantization", "base_content")


def encode_indices(indices: torch.Tensor, numel: int) -> dict[str, torch.Tensor]:
    """Sorted flat indices into a weight of `numel` entries in the smallest of three encodings (docs/formats.md):
    plain int32 `indices`; `gaps` (the first from 0) in uint8 or uint16, a gap of the type's maximum or more
    written as that maximum with its true value, in order, in `escaped` (uint16 or int32, the narrowest that holds
    them); or a bitmap `mask` of the weight (uint8, little-endian bits), smallest where a weight's cores are dense."""
    indices = indices.long()
    gaps = torch.diff(indices, prepend=torch.zeros(1, dtype=torch.long))
    candidates = [{"indices": indices.to(torch.int32)}]
    for dtype in _GAP_DTYPES:
        top = torch.iinfo(dtype).max
        escaped = gaps[gaps >= top]
        wide = escaped.numel() and int(escaped.max()) > torch.iinfo(torch.uint16).max
        escaped = escaped.to(torch.int32 if wide else torch.uint16)
        candidates.append({"gaps": gaps.clamp(max=top).to(dtype), "escaped": escaped})
    bits = torch.zeros(-(-numel // 8) * 8, dtype=torch.uint8)
    bits[indices] = 1
    candidates.append({"mask": (bits.view(-1, 8) << torch.arange(8, dtype=torch.uint8)).sum(1, dtype=torch.uint8)})
    return min(candidates, key=lambda parts: sum(t.numel() * t.element_size() for t in parts.values()))


def decode_indices(parts: Mapping[str, torch.Tensor], numel: int) -> torch.Tensor:
    """Inverse of `encode_indices` (any of its encodings, and version 1's int32 indices): int64 flat indices.
    Raises a ValueError naming what is inconsistent."""
    if "indices" in parts:
        return parts["indices"]
    if "mask" in parts:
        mask = parts["mask"]
        if mask.dtype != torch.uint8 or mask.numel() != -(-numel // 8):
            raise ValueError(f"its .mask must be {-(-numel // 8)} uint8 bytes, got {mask.numel()} {mask.dtype}")
        bits = (mask.unsqueeze(1) >> torch.arange(8, dtype=torch.uint8)) & 1
        if bits.view(-1)[numel:].any():
            raise ValueError("its .mask sets bits past the end of the weight")
        return bits.view(-1)[:numel].nonzero().squeeze(1)
    gaps, escaped = parts.get("gaps"), parts.get("escaped", torch.zeros(0, dtype=torch.int32))
    if gaps is None or gaps.dtype not in _GAP_DTYPES or escaped.is_floating_point():
        raise ValueError("it lacks its .indices (or uint8/uint16 .gaps, or uint8 .mask)")
    wide = gaps.long()
    big = wide == torch.iinfo(gaps.dtype).max
    if int(big.sum()) != escaped.numel():
        raise ValueError(f"{int(big.sum())} escaped gaps but {escaped.numel()} escape values")
    wide[big] = escaped.long()
    return wide.cumsum(0)


@dataclass
class SparseDelta:
    """A sparse delta in memory: per weight name, sorted flat int64 indices and fp32 values, plus shapes."""

    entries: dict[str, tuple[torch.Tensor, torch.Tensor]]
    shapes: dict[str, tuple[int, ...]]
    base: dict[str, str]
    path: str = "<memory>"

    @classmethod
    def load(cls, path: str | os.PathLike) -> SparseDelta:
        """Read and check a sparse-delta file of either version (format, index sets, values)."""
        tensors, meta = load_tensors(path)
        if meta.get("format") != FORMAT:
            raise ValueError(
                f"{path} is not a peft-isolate sparse-delta file (format {meta.get('format')!r}); "
                "make one with export_delta (`peft-isolate export`)"
            )
        if meta.get("version") not in READABLE_VERSIONS:
            raise ValueError(
                f"{path} has sparse-delta version {meta.get('version')}; this peft-isolate reads versions "
                f"{', '.join(READABLE_VERSIONS)}: upgrade peft-isolate"
            )
        try:
            shapes = {n: tuple(int(d) for d in s) for n, s in json.loads(meta["shapes"]).items()}
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(
                f"{path}: its header's `shapes` is missing or not {{name: [dims]}} ({e!r}); recreate the file"
            ) from e
        stray = set(tensors) - {f"{n}.{part}" for n in shapes for part in (*_INDEX_PARTS, "values")}
        if stray:
            raise ValueError(f"{path}: tensor {sorted(stray)[0]} is not listed in the header's shapes; recreate it")
        entries = {}
        for name, shape in shapes.items():
            parts = {part: tensors[f"{name}.{part}"] for part in _INDEX_PARTS if f"{name}.{part}" in tensors}
            if f"{name}.values" not in tensors:
                raise ValueError(f"{path}: {name} lacks its .values; recreate the file")
            try:
                entries[name] = (decode_indices(parts, math.prod(shape)), tensors[f"{name}.values"])
            except ValueError as e:
                raise ValueError(f"{path}: {name}: {e}; recreate the file") from None
        base = {k: meta[k] for k in _BASE_FIELDS if k in meta}
        delta = cls(entries, shapes, base, str(path))
        delta.check()
        return delta

    def check(self) -> None:
        """Raise a ValueError naming the tensor unless every entry is a sorted unique index set inside its weight
        with one finite float value per index; makes the indices int64 and the values fp32. Run before any write
        and after every read."""
        for name, (idx, val) in self.entries.items():
            if name not in self.shapes:
                raise ValueError(f"{self.path}: {name} has no shape in the delta's shapes")
            numel = math.prod(self.shapes[name])
            if numel > INT32_MAX:
                raise ValueError(f"{name} has more than 2**31 - 1 entries: int32 flat indices cannot address it")
            idx = as_index_set(idx, numel, f"{self.path}: {name}")
            if not val.is_floating_point() or val.shape != idx.shape:
                raise ValueError(f"{self.path}: {name}.values must be floats, one per index")
            if not torch.isfinite(val).all():
                raise ValueError(f"{self.path}: {name}.values holds NaN or inf; the adapter it came from diverged")
            self.entries[name] = (idx.long(), val.float())

    def save(self, path: str | os.PathLike, dtype: torch.dtype = torch.float32, compact: bool = False) -> Path:
        """Check the delta, then write it atomically as a version-2 file, values in `dtype`; `compact` writes each
        weight's indices in the smallest encoding (see `encode_indices`), else as int32."""
        if not dtype.is_floating_point:
            raise ValueError(f"values dtype must be a float type (float32, bfloat16, float16), got {dtype}")
        self.check()
        tensors = {}
        for name, (idx, val) in self.entries.items():
            parts = encode_indices(idx, math.prod(self.shapes[name])) if compact else {"indices": idx.to(torch.int32)}
            tensors |= {f"{name}.{part}": t for part, t in parts.items() if t.numel() or part != "escaped"}
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
    compact: bool = False,
) -> dict[str, Any]:
    """Write an isolation adapter's delta (trainable + frozen parts) as a standalone sparse-delta file.

    `base` (checkpoint path or loaded model) gives the weight shapes and the fingerprint; without it the
    adapter's recorded `base_model_name_or_path` is used when it is a local checkpoint. `compact` writes the
    indices as gaps (see `SparseDelta.save`).
    """
    if base is None:
        recorded = read_adapter_config(adapter_dir).get("base_model_name_or_path")
        if recorded in ALIASES or str(recorded).endswith(".gguf"):  # what the user named, resolved as they did
            recorded = str(resolve_model(recorded))
        if not recorded or not Path(recorded).is_dir():
            raise ValueError(
                f"{adapter_dir} records base {recorded!r}, which is not a local checkpoint: pass base= "
                "(the checkpoint directory or the loaded model the adapter was trained on)"
            )
        base = recorded
    entries = _entries(base)
    source = IsolationDelta(adapter_dir, {n: s for n, (s, _, _) in entries.items()})
    fields = _fingerprints(entries) | {"base_content": _content_field(base_samples(base))}
    delta = SparseDelta(source.entries, source.shapes(), fields)
    delta.save(out_path, dtype, compact)
    return {
        "path": str(out_path),
        "tensors": len(delta.entries),
        "entries": sum(i.numel() for i, _ in delta.entries.values()),
        "dtype": _dtype_name(dtype),
        "bytes": Path(out_path).stat().st_size,
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

    Refuses a delta made for other shapes (naming the tensor) or, unless `force`, another base (names, shapes,
    dtypes, sampled content) or a delta the model's config lists as merged already; the model's config then lists
    this one too (`peft_isolate_deltas`, saved in config.json). The report's `rounding` gives max/mean
    |requantized - intended| over the requantized weights.
    """
    delta = SparseDelta.load(path)
    entries = _model_entries(model)
    delta.check_fits(entries, "the model")
    fingerprint = _check_base(delta, _fingerprints(entries), lambda n: _model_samples(model, n), force, "this model")
    records = _merge_records(delta, getattr(model.config, MERGE_RECORD, None), force, "the model")
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
            store_weight(module, intended.clone())  # the layer may keep the tensor it is given
            err = (dequantized_weight(module).float() - intended).abs()
            max_err = max(max_err, float(err.max()))
            err_sum += float(err.sum())
            err_count += err.numel()
            delta_max = max(delta_max, float(val.abs().max())) if val.numel() else delta_max
    setattr(model.config, MERGE_RECORD, records)  # saved with the model: base X + [A] refuses a second A
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
            offset = src.data_offset(name)
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
    renamed onto `out_dir` (which must not exist or be empty). Unless `force`, refuses another base, or a delta the
    base's config.json lists as merged already; the output's config.json lists this one too.
    """
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    if not (base_dir / "config.json").is_file():
        raise FileNotFoundError(f"{base_dir} has no config.json: pass a model directory saved with save_pretrained")
    check_new_output(out_dir, directory=True)
    delta = SparseDelta.load(delta_path)
    ckpt = _open_checkpoint(base_dir)
    entries = _checkpoint_entries(ckpt)
    delta.check_fits(entries, f"base checkpoint {base_dir}")
    what = f"checkpoint {base_dir}"
    fingerprint = _check_base(delta, _fingerprints(entries), lambda n: _checkpoint_samples(ckpt, n), force, what)
    config = load_json(base_dir / "config.json")
    config[MERGE_RECORD] = _merge_records(delta, config.get(MERGE_RECORD), force, what)
    with atomic_dir(out_dir, replace=False) as tmp:
        for f in base_dir.iterdir():
            if f.is_file() and f.suffix not in _WEIGHT_SUFFIXES and f.name not in (_INDEX, "config.json"):
                shutil.copy2(f, tmp / f.name)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        changed = sum(_merge_shard(r, tmp / r.path.name, delta) for r in ckpt.readers)
        if (base_dir / _INDEX).is_file():
            shutil.copy2(base_dir / _INDEX, tmp / _INDEX)
    return {
        "out_dir": str(out_dir),
        "shards": len(ckpt.readers),
        "tensors": changed,
        "entries": sum(i.numel() for i, _ in delta.entries.values()),
        "fingerprint": fingerprint,
    }


# ----------------------------------------------------------------------------------------- compose


def _common_base(deltas: Sequence[SparseDelta]) -> dict[str, str]:
    """The base every delta records; refuses deltas made for different bases (names, shapes, dtypes or sampled
    content), and a mix of deltas that record a base and deltas that do not (the result could vouch for neither)."""
    recorded = [d for d in deltas if "base_fingerprint" in d.base]
    if recorded and len(recorded) < len(deltas):
        bare = next(d for d in deltas if "base_fingerprint" not in d.base)
        raise ValueError(
            f"{bare.path} records no base but {recorded[0].path} does: re-export {bare.path} with its base "
            "(`peft-isolate export --base`) so the composed delta can name one"
        )
    first = recorded[0] if recorded else None
    for d in recorded[1:]:
        content = [json.loads(x.base["base_content"])["values"] for x in (first, d) if "base_content" in x.base]
        if d.base["base_fingerprint"] != first.base["base_fingerprint"] or (
            len(content) == 2 and content_distance(*content) > CONTENT_TOLERANCE["full"]
        ):
            raise ValueError(
                f"{first.path} and {d.path} were made for different bases: compose only deltas of the same base model"
            )
    return dict(first.base) if first else {}


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
    base = _common_base(deltas)
    weights = [1.0] * len(deltas) if weights is None else list(weights)
    if len(weights) != len(deltas):
        raise ValueError(f"got {len(weights)} weights for {len(deltas)} deltas: pass one weight per delta")
    if not all(math.isfinite(w) for w in weights):
        raise ValueError(f"weights {weights} hold NaN or inf: pass finite weights")
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
    out = SparseDelta(entries, shapes, base)
    out.save(out_path)  # checks the result (e.g. NaN from a weight) before anything is written
    return {
        "path": str(out_path),
        "tensors": len(entries),
        "entries": sum(i.numel() for i, _ in entries.values()),
        "overlapping_entries": overlap,
        "rule": rule,
    }
