"""The isolation layer: a linear base layer (full precision, 4-bit or 8-bit) plus a sparse delta per adapter."""

from __future__ import annotations

import warnings
import zlib
from typing import Any, NamedTuple

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from peft.utils.integrations import dequantize_bnb_weight, get_bnb_param_type
from torch import nn

from ..regions import check_index_set, core_count, unit_count, unit_entries, unit_of, unit_sizes
from .config import IsolationConfig
from .ops import DeltaPattern, dense_delta, merged_delta_linear, sparse_delta_linear


def _generator(config: IsolationConfig, module_name: str) -> torch.Generator:
    """A CPU generator seeded per module, so each module draws its own reproducible support and values."""
    return torch.Generator().manual_seed(config.seed + zlib.crc32(module_name.encode()))


class DeltaParts(NamedTuple):
    """One adapter's delta in one layer: two disjoint parts on sorted int32 flat positions into its `[out, in]`
    weight, the trainable entries and the frozen ones (held, or locked for good)."""

    indices: torch.Tensor
    values: torch.Tensor
    frozen_indices: torch.Tensor
    frozen_values: torch.Tensor
    frozen_locked: torch.Tensor


class IsolationLayer(BaseTunerLayer):
    """Per-adapter sparse delta of a linear layer: trainable values and a frozen part (held or locked entries).

    Frozen values are parameters that never require grad, so peft counts them in "all params" (constant when entries
    move between trainable and held) but never as trainable.
    """

    adapter_layer_names = ("isolation_values",)
    other_param_names = (
        "isolation_indices",
        "isolation_frozen_indices",
        "isolation_frozen_values",
        "isolation_frozen_locked",
    )

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self.isolation_values = nn.ParameterDict({})
        self.isolation_indices = BufferDict(persistent=True)
        self.isolation_frozen_indices = BufferDict(persistent=True)
        self.isolation_frozen_values = nn.ParameterDict({})
        self.isolation_frozen_locked = BufferDict(persistent=True)
        self._disable_adapters = False
        self.merged_adapters = []
        self._delta_patterns: dict[str, tuple[torch.Tensor, torch.Tensor, tuple[int, int], DeltaPattern]] = {}
        base = self.get_base_layer()
        self.in_features, self.out_features = base.in_features, base.out_features

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def update_layer(
        self,
        adapter_name: str,
        config: IsolationConfig,
        indices: torch.Tensor | None = None,
        locked: torch.Tensor | None = None,
        module_name: str = "",
    ) -> None:
        """Allocate the adapter: support from `indices` or chosen by `config.init`; `locked` entries are frozen."""
        numel = self.out_features * self.in_features
        device = self.get_base_layer().weight.device
        empty = torch.zeros(0, dtype=torch.int32, device=device)
        locked = empty if locked is None else locked.to(device)
        check_index_set(locked, numel, f"{module_name}: frozen regions")
        if indices is None and config.init == "regions":
            indices = empty  # not in the regions file (or none given, as when loading): sized by a loaded file
        elif indices is None:
            indices = self._select_support(config, locked, module_name)
        indices = indices.to(device)
        check_index_set(indices, numel, f"{module_name}: regions")
        clash = int(torch.isin(indices, locked).sum())
        if clash:
            raise ValueError(
                f"{module_name}: the trainable support intersects the frozen set at {clash} entries; "
                "remove them from the regions file"
            )
        values = torch.zeros(indices.numel(), device=device)
        if not config.init_weights:
            values = (0.01 * torch.randn(indices.numel(), generator=_generator(config, module_name))).to(device)
        self.isolation_values[adapter_name] = nn.Parameter(values)
        self.isolation_indices[adapter_name] = indices
        self.isolation_frozen_indices[adapter_name] = locked
        self.isolation_frozen_values[adapter_name] = nn.Parameter(
            torch.zeros(locked.numel(), device=device), requires_grad=False
        )
        self.isolation_frozen_locked[adapter_name] = torch.ones(locked.numel(), dtype=torch.bool, device=device)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def _select_support(self, config: IsolationConfig, locked: torch.Tensor, module_name: str) -> torch.Tensor:
        """The `density` fraction of entries by seeded random score or base magnitude, never a locked one; with a
        `granularity`, whole rows, columns or blocks by their random score or summed squared magnitude, taken while
        they fit in the same count, minus any locked entries."""
        numel = self.out_features * self.in_features
        k = min(core_count(config.density, numel), numel - locked.numel())
        if config.init == "magnitude":
            score = dequantized_weight(self.get_base_layer()).float().flatten()
            score = score.abs() if config.granularity == "element" else score.square()
        else:
            score = torch.rand(numel, generator=_generator(config, module_name))
        if config.granularity == "element":
            score[locked.long()] = -1.0
            return torch.topk(score, k, sorted=False).indices.sort().values.to(torch.int32)
        g, b = config.granularity, config.block
        if config.init == "magnitude":
            units = torch.zeros(unit_count(self.shape, g, b), dtype=torch.float64)
            units.index_add_(0, unit_of(torch.arange(numel), self.shape, g, b), score.double())
        else:
            units = score[: unit_count(self.shape, g, b)]
        sizes, chosen = unit_sizes(self.shape, g, b), []
        for unit in torch.argsort(units, descending=True, stable=True).tolist():
            if sizes[unit] <= k:
                chosen.append(unit)
                k -= int(sizes[unit])
        if not chosen and k:
            warnings.warn(
                f"density {config.density:g} gives some weights fewer entries than one {g} holds, so they train "
                "nothing: raise density or take a finer granularity",
                stacklevel=2,
            )
        entries = unit_entries(torch.tensor(chosen, dtype=torch.int64), self.shape, g, b)
        return entries[~torch.isin(entries, locked.long())].to(torch.int32)

    def _move_adapter_to_device_of_base_layer(
        self, adapter_name: str, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> None:
        """Move to the base layer's device, and the float tensors to `dtype` if given. Unlike peft's move, which
        casts to the base dtype, values stay fp32 on a bf16 or 4-bit base unless asked; `requires_grad` is kept."""
        device = device or self.get_base_layer().weight.device
        for name in self.adapter_layer_names + self.other_param_names:
            store = getattr(self, name)
            if adapter_name not in store or store[adapter_name].is_meta:
                continue
            tensor = store[adapter_name]
            moved = tensor.to(device, dtype if tensor.is_floating_point() else None)
            if moved is tensor:
                continue
            if isinstance(tensor, nn.Parameter):  # a ParameterDict would wrap a plain tensor as a trainable one
                moved = nn.Parameter(moved, tensor.requires_grad)
            store[adapter_name] = moved

    def delete_adapter(self, adapter_name: str) -> None:
        """Delete the adapter and its cached sparsity structure."""
        super().delete_adapter(adapter_name)
        self._delta_patterns.pop(adapter_name, None)

    def _parts(self, adapter: str) -> DeltaParts:
        return DeltaParts(
            self.isolation_indices[adapter],
            self.isolation_values[adapter].detach(),
            self.isolation_frozen_indices[adapter],
            self.isolation_frozen_values[adapter].detach(),
            self.isolation_frozen_locked[adapter],
        )

    def _set_parts(self, adapter: str, parts: DeltaParts) -> None:
        """Replace an adapter's two parts; the trainable values become a new parameter (rebuild the optimizer)."""
        order = torch.argsort(parts.frozen_indices)
        requires_grad = self.isolation_values[adapter].requires_grad
        self.isolation_values[adapter] = nn.Parameter(parts.values.clone(), requires_grad=requires_grad)
        self.isolation_indices[adapter] = parts.indices.to(torch.int32)
        self.isolation_frozen_indices[adapter] = parts.frozen_indices[order].to(torch.int32)
        self.isolation_frozen_values[adapter] = nn.Parameter(parts.frozen_values[order], requires_grad=False)
        self.isolation_frozen_locked[adapter] = parts.frozen_locked[order]

    def lock(self, region: torch.Tensor, adapter_name: str | None = None) -> int:
        """Lock every entry of `region` (sorted flat positions): trainable and held ones keep their values, entries
        outside the support join at zero. Returns how many trainable entries became locked."""
        adapter = adapter_name or self.active_adapters[0]
        p = self._parts(adapter)
        region = region.to(p.indices.device, torch.int32)
        moving = torch.isin(p.indices, region)
        outside = region[~torch.isin(region, p.indices) & ~torch.isin(region, p.frozen_indices)]
        newly_locked = torch.ones(int(moving.sum()) + outside.numel(), dtype=torch.bool, device=region.device)
        self._set_parts(
            adapter,
            DeltaParts(
                p.indices[~moving],
                p.values[~moving],
                torch.cat([p.frozen_indices, p.indices[moving], outside]),
                torch.cat([p.frozen_values, p.values[moving], p.values.new_zeros(outside.numel())]),
                torch.cat([p.frozen_locked | torch.isin(p.frozen_indices, region), newly_locked]),
            ),
        )
        return int(moving.sum())

    def hold(self, adapter_name: str | None = None) -> int:
        """Move every trainable entry to the held part (in the forward, not trained). Returns how many."""
        adapter = adapter_name or self.active_adapters[0]
        p = self._parts(adapter)
        self._set_parts(
            adapter,
            DeltaParts(
                p.indices[:0],
                p.values[:0],
                torch.cat([p.frozen_indices, p.indices]),
                torch.cat([p.frozen_values, p.values]),
                torch.cat([p.frozen_locked, p.frozen_locked.new_zeros(p.indices.numel())]),
            ),
        )
        return p.indices.numel()

    def add_trainable(
        self, region: torch.Tensor, values: torch.Tensor | None = None, adapter_name: str | None = None
    ) -> int:
        """Make every entry of `region` trainable: held entries keep their value, new ones start at zero, unless
        `values` (aligned with `region`) are given. Locked entries are refused. Returns the new trainable count."""
        adapter = adapter_name or self.active_adapters[0]
        p = self._parts(adapter)
        region = region.to(p.indices.device, torch.int32)
        hit = torch.isin(p.frozen_indices, region)
        if (hit & p.frozen_locked).any():
            first = int(p.frozen_indices[hit & p.frozen_locked][0])
            raise ValueError(
                f"{int((hit & p.frozen_locked).sum())} requested entries are locked (frozen cores can never be "
                f"trained again), e.g. flat position {first}: remove them from the regions to train"
            )
        new = region[~torch.isin(region, p.indices) & ~torch.isin(region, p.frozen_indices)]
        indices, order = torch.sort(torch.cat([p.indices, p.frozen_indices[hit], new]))
        trainable = torch.cat([p.values, p.frozen_values[hit], p.values.new_zeros(new.numel())])[order]
        if values is not None:
            trainable[torch.isin(indices, region)] = values.to(trainable)
        self._set_parts(
            adapter,
            DeltaParts(indices, trainable, p.frozen_indices[~hit], p.frozen_values[~hit], p.frozen_locked[~hit]),
        )
        return indices.numel()


def _has_hooks(module: nn.Module) -> bool:
    """Whether `module` has forward or backward hooks, or an accelerate hook, which only its own forward runs."""
    torch_hooks = (module._forward_pre_hooks, module._forward_hooks, module._backward_pre_hooks, module._backward_hooks)
    return any(torch_hooks) or hasattr(module, "_hf_hook")


def dequantized_weight(base: nn.Module) -> torch.Tensor:
    """The base weight as a dense float tensor (dequantized for bitsandbytes 4-bit and 8-bit layers)."""
    weight = base.weight
    if getattr(getattr(weight, "quant_state", None), "packing_format_for_cpu", False):
        # bitsandbytes repacks 4-bit weights for its CPU inference kernel; dequantize needs the standard layout
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
    if get_bnb_param_type(weight):
        return dequantize_bnb_weight(base.weight, state=getattr(base, "state", None)).float()
    return base.weight.data


def store_weight(base: nn.Module, weight: torch.Tensor) -> None:
    """Write a dense weight back into `base`, requantizing for bitsandbytes layers (this rounds)."""
    import bitsandbytes as bnb

    old = base.weight
    kind = get_bnb_param_type(old)
    if kind == "4bit":
        kwargs = {k: v for k, v in old.__dict__.items() if not k.startswith("_") and k != "data"}
        kwargs.update(bnb_quantized=False, requires_grad=False)
        base.weight = bnb.nn.Params4bit(weight.to("cpu"), **kwargs).to(old.device)
    else:
        base.weight = bnb.nn.Int8Params(
            weight.to("cpu"), requires_grad=False, has_fp16_weights=old.has_fp16_weights
        ).to(old.device)
        base.state.reset_grads()


class Linear(nn.Module, IsolationLayer):
    """An isolation adapter on `nn.Linear`, bitsandbytes `Linear4bit` or `Linear8bitLt`."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: IsolationConfig, **kwargs) -> None:
        super().__init__()
        IsolationLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, **kwargs)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        """Size each adapter's tensors from the incoming state dict (supports differ per module) after checking it."""
        for adapter in list(self.isolation_values.keys()):
            keys = {name: f"{prefix}{name}.{adapter}" for name in self.adapter_layer_names + self.other_param_names}
            if not all(k in state_dict for k in keys.values()):
                continue
            self._check_incoming({n: state_dict[k] for n, k in keys.items()}, f"{prefix}*.{adapter}")
            for name, key in keys.items():
                store, incoming = getattr(self, name), state_dict[key]
                if store[adapter].shape != incoming.shape:
                    old = store[adapter]
                    fresh = torch.empty(incoming.shape, dtype=old.dtype, device=old.device)
                    store[adapter] = nn.Parameter(fresh, old.requires_grad) if isinstance(old, nn.Parameter) else fresh
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _check_incoming(self, t: dict[str, torch.Tensor], where: str) -> None:
        numel = self.out_features * self.in_features
        check_index_set(t["isolation_indices"], numel, f"{where} isolation_indices")
        check_index_set(t["isolation_frozen_indices"], numel, f"{where} isolation_frozen_indices")
        for values, indices in (
            ("isolation_values", "isolation_indices"),
            ("isolation_frozen_values", "isolation_frozen_indices"),
        ):
            if t[values].shape != t[indices].shape or not t[values].is_floating_point():
                raise ValueError(f"{where}: {values} must be floats, one per entry of {indices}")
        if t["isolation_frozen_locked"].shape != t["isolation_frozen_indices"].shape:
            raise ValueError(f"{where}: isolation_frozen_locked must have one flag per frozen entry")
        if torch.isin(t["isolation_indices"], t["isolation_frozen_indices"]).any():
            raise ValueError(f"{where}: trainable and frozen entries overlap; the adapter file is corrupt")

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """The adapter's full delta (trainable + frozen) as a dense `[out, in]` float tensor."""
        p = self._parts(adapter)
        dtype = self.get_base_layer().weight.dtype
        dtype = dtype if dtype.is_floating_point else torch.float32
        return dense_delta(
            torch.cat([p.indices, p.frozen_indices]), torch.cat([p.values, p.frozen_values]), self.shape, dtype
        )

    def _apply_delta(self, adapter: str, sign: float, safe_merge: bool = False) -> None:
        base = self.get_base_layer()
        quantized = bool(get_bnb_param_type(base.weight))
        if quantized:
            warnings.warn("Merging into a quantized base dequantizes, adds and requantizes: this rounds.", stacklevel=3)
        weight = dequantized_weight(base)
        weight = weight.clone() if safe_merge or quantized else weight
        p = self._parts(adapter)
        self.delta_pattern(adapter).add_to(weight, sign * p.values, sign * p.frozen_values)
        if safe_merge and not torch.isfinite(weight).all():
            raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken")
        if quantized:
            store_weight(base, weight)
        elif safe_merge:
            base.weight.data = weight

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the active (or named) adapters' deltas into the base weight."""
        for adapter in check_adapters_to_merge(self, adapter_names):
            if adapter in self.isolation_values:
                self._apply_delta(adapter, 1.0, safe_merge)
                self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        """Subtract merged deltas again, last merged first."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter in self.isolation_values:
                self._apply_delta(adapter, -1.0)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        adapters = [a for a in self.active_adapters if a in self.isolation_values]
        if len(adapters) == 1 and self._trains_merged(x, adapters[0]):
            return self._merged_forward(x, adapters[0])
        result = self.base_layer(x, *args, **kwargs)
        for adapter in adapters:
            values, frozen_values = self.isolation_values[adapter], self.isolation_frozen_values[adapter]
            delta = sparse_delta_linear(x, values, frozen_values, self.delta_pattern(adapter))
            result = result + delta.to(result.dtype)
        return result

    def _trains_merged(self, x: torch.Tensor, adapter: str) -> bool:
        """Training steps on several rows of a full-precision or 4-bit base with a frozen weight take the merged
        product (base and delta in one dense product); the rest keeps the base layer's own kernels, and a base
        with hooks of its own (torch's, or accelerate's for offloading and device alignment) keeps its forward,
        the only place they run."""
        base = self.get_base_layer()
        return (
            torch.is_grad_enabled()
            and not _has_hooks(base)
            and self.isolation_values[adapter].requires_grad
            and x.numel() > x.shape[-1]
            and not base.weight.requires_grad
            and get_bnb_param_type(base.weight) != "8bit"
            and not self.delta_pattern(adapter).empty
        )

    def _merged_forward(self, x: torch.Tensor, adapter: str) -> torch.Tensor:
        """`x @ (W + Delta)^T + b` in the base layer's compute dtype, returned in `x`'s dtype as bitsandbytes does."""
        base = self.get_base_layer()
        dtype = getattr(base, "compute_dtype", None) or base.weight.dtype
        dtype = dtype if dtype.is_floating_point else x.dtype

        def base_weight() -> torch.Tensor:  # a copy of its own: the delta is added into it
            if get_bnb_param_type(base.weight):
                return dequantized_weight(base).to(dtype)
            return base.weight.detach().to(dtype, copy=True)

        bias = None if base.bias is None else base.bias.to(dtype)
        values, frozen_values = self.isolation_values[adapter], self.isolation_frozen_values[adapter]
        y = merged_delta_linear(x.to(dtype), values, frozen_values, bias, self.delta_pattern(adapter), base_weight)
        return y.to(x.dtype)

    def delta_pattern(self, adapter: str) -> DeltaPattern:
        """The adapter's sparsity structure, rebuilt only when an index set is replaced or changed in place (lock,
        hold, add, load, a device move): the forward and backward of every step reuse it."""
        indices, frozen = self.isolation_indices[adapter], self.isolation_frozen_indices[adapter]
        versions = (indices._version, frozen._version)
        cached = self._delta_patterns.get(adapter)  # holds the index tensors, so `is` cannot see a reused address
        if cached is None or cached[0] is not indices or cached[1] is not frozen or cached[2] != versions:
            cached = (indices, frozen, versions, DeltaPattern(indices, frozen, self.shape))
            self._delta_patterns[adapter] = cached
        return cached[3]

    def __repr__(self) -> str:
        return "isolation." + super().__repr__()
