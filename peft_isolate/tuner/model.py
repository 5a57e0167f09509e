"""`IsolationModel`: injects isolation layers and moves entries between trainable, held and locked."""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import NoReturn

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, _maybe_include_all_linear_layers
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn

from ..regions import CoreRegions, as_index_set
from .config import IsolationConfig
from .layer import IsolationLayer, Linear

Regions = CoreRegions | Mapping[str, torch.Tensor] | str | os.PathLike


def _as_index_sets(regions: Regions) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, ...]]]:
    """Regions as {weight name: sorted int32 flat positions} (non-empty sets only) and the shapes the file
    records, from a core-regions file, a `CoreRegions` or a plain mapping."""
    if isinstance(regions, str | os.PathLike):
        regions = CoreRegions.load(regions)
    if isinstance(regions, CoreRegions):
        return {n: i for n, i in regions.indices.items() if i.numel()}, regions.shapes
    for name, idx in regions.items():
        if idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
            raise ValueError(f"regions for {name}: expected integer flat positions, got {idx.dtype}")
    return {n: i for n, i in regions.items() if i.numel()}, {}  # made int32 by `as_index_set` once numel is known


def _check_recorded_shape(shapes: Mapping[str, tuple[int, ...]], name: str, shape: tuple[int, ...], what: str) -> None:
    """Refuse index sets that their file recorded for a weight of another shape than this model's."""
    if name in shapes and tuple(shapes[name]) != tuple(shape):
        raise ValueError(
            f"{what} file entry {name} has shape {tuple(shapes[name])} but the model's weight is {tuple(shape)}: "
            "the file was made for another model"
        )


class IsolationModel(BaseTuner):
    """Sparse-delta fine-tuning on a frozen base: the tuner behind `IsolationConfig`.

    Stage control for CPI-FT: `lock` freezes core regions for good, `hold` stops training the current entries
    while keeping them in the forward, `add_trainable` opens new or held entries. After any of them, rebuild
    the optimizer: the trainable values are new parameters.
    """

    prefix: str = "isolation_"
    tuner_layer_cls = IsolationLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        """Read and check the config's regions and frozen files against the model, then inject.

        peft's injection hooks run only from `BaseTuner.__init__`, not from `add_adapter`/`load_adapter`, so the
        files are read here, once per adapter, and checked before any layer changes: on error the model is as it
        was."""
        config = self.peft_config[adapter_name]
        index_sets = {
            what: _as_index_sets(path) if path else ({}, {})
            for what, path in (("regions", config.regions), ("frozen", config.frozen))
        }
        self._check_index_sets(model, config, index_sets)
        self._index_sets = index_sets
        try:
            super().inject_adapter(model, adapter_name, *args, **kwargs)
        finally:
            del self._index_sets
        config.weight_shapes = {
            name: list(module.shape)
            for name, module in model.named_modules()
            if isinstance(module, IsolationLayer) and adapter_name in module.isolation_values
        }

    def _check_index_sets(self, model: nn.Module, config: IsolationConfig, index_sets: dict) -> None:
        """Refuse, before injection, index sets naming weights that are not targeted linear weights of `model`, made
        for other shapes, out of range; and a saved config whose recorded weight shapes differ from `model`'s."""
        targets = _maybe_include_all_linear_layers(copy.copy(config), model)
        modules = dict(model.named_modules())

        def linear(module_name: str) -> nn.Module | None:
            module = modules.get(module_name)
            base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
            return base if isinstance(base, nn.Linear) else None

        for what, (sets, shapes) in index_sets.items():
            for name, region in sets.items():
                module_name = name.removesuffix(".weight")
                base = linear(module_name) if name.endswith(".weight") else None
                if base is None or not self._check_target_module_exists(targets, module_name):
                    raise ValueError(
                        f"{what} file names {name!r}, which is not a targeted linear weight of this model: target it "
                        "(target_modules) or use regions made for this model"
                    )
                shape = (base.out_features, base.in_features)
                _check_recorded_shape(shapes, name, shape, what)
                sets[name] = as_index_set(region, math.prod(shape), f"{what} file entry {name}")
        for module_name, recorded in (config.weight_shapes or {}).items():
            base = linear(module_name)
            if base is not None and tuple(recorded) != (base.out_features, base.in_features):
                raise ValueError(
                    f"the adapter was made for a model whose {module_name} weight is {tuple(recorded)}, but this "
                    f"model's is {(base.out_features, base.in_features)}: load it on the base it was trained on"
                )

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key) -> None:
        weight_name = f"{current_key}.weight"
        kwargs = {"module_name": current_key}
        for what, key in (("regions", "indices"), ("frozen", "locked")):
            sets, shapes = self._index_sets[what]
            if weight_name in sets:
                _check_recorded_shape(shapes, weight_name, (target.out_features, target.in_features), what)
                kwargs[key] = sets[weight_name]
        if isinstance(target, IsolationLayer):
            target.update_layer(adapter_name, config, **kwargs)
            return
        new_module = self._create_new_module(config, adapter_name, target, **kwargs)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    @staticmethod
    def _create_new_module(config: IsolationConfig, adapter_name: str, target: nn.Module, **kwargs) -> Linear:
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if not isinstance(base, nn.Linear):  # bitsandbytes Linear4bit and Linear8bitLt are nn.Linear subclasses
            raise TypeError(
                f"Target module {target} is not supported: isolation adapters wrap torch.nn.Linear and "
                "bitsandbytes Linear4bit / Linear8bitLt layers only"
            )
        return Linear(target, adapter_name, config, **kwargs)

    @contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs) -> Iterator[None]:
        """Refuse `adapter_names=` (peft would drop it silently for a tuner without per-sample adapters)."""
        if kwargs.get("adapter_names") is not None:
            raise ValueError(
                "isolation adapters do not take adapter_names= (one adapter per sample): run one batch per adapter "
                "with set_adapter(), or use disable_adapter() for the base model"
            )
        yield

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """Values are fp32 on any base, as peft upcasts adapter weights by default; `autocast_adapter_dtype=False`
        keeps the base layer's float dtype instead, as a LoRA adapter does (an 8-bit base has none: fp32 stays)."""
        for _, layer in self._isolation_layers(adapter_name):
            _, base_dtype = layer._get_base_layer_device_and_dtype(layer.get_base_layer())
            dtype = torch.float32 if autocast_adapter_dtype else base_dtype
            if dtype is not None and dtype.is_floating_point:
                layer._move_adapter_to_device_of_base_layer(adapter_name, dtype=dtype)

    @classmethod
    def _get_adapter_state_dict(
        cls,
        model: nn.Module,
        config: IsolationConfig,
        adapter_name: str,
        state_dict: dict[str, torch.Tensor],
        unwanted_adapter_names: list[str],
    ) -> dict[str, torch.Tensor]:
        """peft's selection, each tensor marked so that pickling it is refused: `save_pretrained` writes isolation
        adapters as safetensors only (`safe_serialization=False` fails before any tensor is written)."""
        tensors = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        for name, tensor in tensors.items():
            tensors[name] = tensor.detach()  # a tensor of its own to mark, sharing the data
            tensors[name]._isolation_no_pickle = _RefusePickle()
        return tensors

    def _isolation_layers(self, adapter: str) -> Iterator[tuple[str, Linear]]:
        """(weight name, layer) of every isolation layer that holds `adapter`."""
        for name, module in self.model.named_modules():
            if isinstance(module, IsolationLayer) and adapter in module.isolation_values:
                yield f"{name}.weight", module

    def _per_layer(self, regions: Regions, adapter_name: str | None, apply) -> int:
        """Apply `apply(layer, adapter, region, name)` to each layer the regions cover; error on unknown names."""
        adapter = adapter_name or self.active_adapters[0]
        sets, shapes = _as_index_sets(regions)
        layers = dict(self._isolation_layers(adapter))
        unknown = sorted(set(sets) - set(layers))
        if unknown:
            raise ValueError(f"regions name {unknown[0]!r}, which is not an isolation-adapted weight of {adapter!r}")
        for name, region in sets.items():
            _check_recorded_shape(shapes, name, layers[name].shape, "regions")
            sets[name] = as_index_set(region, math.prod(layers[name].shape), f"regions for {name}")
        total = 0
        for name, region in sets.items():
            try:
                total += apply(layers[name], adapter, region, name)
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from e
        return total

    def lock(self, regions: Regions, adapter_name: str | None = None) -> int:
        """Lock every entry of `regions` (a core-regions file or {weight name: indices}); returns how many
        trainable entries became locked. Locked entries keep their values and can never be trained again."""
        return self._per_layer(regions, adapter_name, lambda layer, adapter, region, _: layer.lock(region, adapter))

    def hold(self, adapter_name: str | None = None) -> int:
        """Stop training every trainable entry while keeping it in the forward; returns how many."""
        adapter = adapter_name or self.active_adapters[0]
        return sum(layer.hold(adapter) for _, layer in self._isolation_layers(adapter))

    def add_trainable(
        self,
        regions: Regions,
        values: Mapping[str, torch.Tensor] | None = None,
        adapter_name: str | None = None,
    ) -> int:
        """Make the entries of `regions` trainable (held ones keep their values, new ones start at zero or at
        `values[name]`, aligned with the region); refuses locked entries. Returns the trainable count."""
        return self._per_layer(
            regions,
            adapter_name,
            lambda layer, adapter, region, name: layer.add_trainable(
                region, None if values is None else values[name], adapter
            ),
        )


class _RefusePickle:
    """Carried by the tensors of a saved adapter: pickling one fails with a clear error (copying works)."""

    def __reduce__(self) -> NoReturn:
        raise ValueError(
            "isolation adapters are saved as safetensors only: drop safe_serialization=False (their tensors refuse "
            "pickling)"
        )

    def __deepcopy__(self, memo: dict) -> _RefusePickle:
        return self
