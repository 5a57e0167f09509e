"""`IsolationConfig`: which linear weights get a sparse delta, and where its support comes from."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

from peft.config import PeftConfig

from ..files import open_tensors
from ..regions import BLOCK_SIZES, GRANULARITIES
from ._peft_type import ensure_peft_type

INIT_CHOICES = ("random", "magnitude", "regions")


@dataclass
class IsolationConfig(PeftConfig):
    """Configuration of an isolation adapter: a sparse delta per targeted linear weight, W = W_base + Delta.

    Each entry of the delta's support is *trainable*, *held* (in the forward, not trained now) or *locked*
    (a frozen core: never trainable). Index sets are stored in the adapter file, never in the config.

    Args:
        target_modules (`Union[list[str], str]`, *optional*):
            Module names or a regex of the linear layers to adapt; `"all-linear"` picks every linear layer except
            the output layer.
        exclude_modules (`Union[list[str], str]`, *optional*):
            Module names or a regex of layers not to adapt.
        density (`float`, defaults to `0.01`):
            Fraction of each targeted weight that is trainable, in (0, 1], when `init` is `random` or `magnitude`.
        init (`str`, defaults to `"random"`):
            How the support is chosen: `random` (seeded), `magnitude` (largest |W_base|) or `regions` (the entries
            of the core-regions file `regions`).
        regions (`str`, *optional*):
            Path to a core-regions file (safetensors) giving the trainable support; requires `init="regions"`.
            Without one, `init="regions"` starts with an empty support: a loaded adapter sizes it from its file
            (a saved config keeps no paths), and `add_trainable` opens entries.
        frozen (`str`, *optional*):
            Path to a core-regions file whose entries are locked: never trainable, delta held at zero.
        seed (`int`, defaults to `0`):
            Seed of the random support, combined with each module's name but not with the adapter's: adapters made
            from one config get the same support (so a saved config reproduces it under any name); give each
            adapter its own seed for independent supports.
        init_weights (`bool`, defaults to `True`):
            Start from a zero delta (the adapter equals the base). `False` draws small random values (for tests).
        modules_to_save (`list[str]`, *optional*):
            Modules apart from the isolation layers to train fully and save in the checkpoint.
        granularity (`str`, defaults to `"element"`):
            With `init` random or magnitude: take whole `row`s, `column`s or `block`s (of side `block`) by their
            random score or summed squared magnitude, while they fit in the `density` count.
        block (`int`, *optional*):
            Block side (16, 32, 64 or 128) with `granularity="block"`.
        weight_shapes (`dict[str, list[int]]`, *optional*):
            Filled in at injection: each adapted module's weight shape `[out, in]`. Saved with the adapter, so loading
            it on, or exporting it against, a base of other shapes is refused (flat indices would point elsewhere).
    """

    target_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "Module names or regex of the linear layers to adapt; 'all-linear' for every one."},
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Module names or regex of layers not to adapt."}
    )
    density: float = field(
        default=0.01,
        metadata={"help": "Fraction in (0, 1] of each targeted weight that is trainable (init random/magnitude)."},
    )
    init: Literal[INIT_CHOICES] = field(
        default="random", metadata={"help": "Support selection: 'random' (seeded), 'magnitude' or 'regions'."}
    )
    regions: str | None = field(
        default=None, metadata={"help": "Core-regions file (safetensors) giving the trainable support."}
    )
    frozen: str | None = field(
        default=None, metadata={"help": "Core-regions file whose entries are locked: never trainable."}
    )
    seed: int = field(
        default=0,
        metadata={
            "help": "Seed of the random support, combined with module names but not adapter names: adapters from one "
            "config share their support; give each its own seed for independent ones."
        },
    )
    init_weights: bool = field(
        default=True, metadata={"help": "Zero initial delta; False draws small random values (tests only)."}
    )
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Other modules to train fully and save in the checkpoint."}
    )

    granularity: Literal[GRANULARITIES] = field(
        default="element",
        metadata={"help": "What a random or magnitude support takes whole: entries, rows, columns or blocks."},
    )
    block: int | None = field(default=None, metadata={"help": "Block side (16, 32, 64, 128) with granularity block."})
    weight_shapes: dict[str, list[int]] | None = field(
        default=None, metadata={"help": "Adapted weight shapes, recorded at injection; checked when loading."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = ensure_peft_type("ISOLATION")
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if self.init not in INIT_CHOICES:
            raise ValueError(f"init={self.init!r} is not one of {INIT_CHOICES}")
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"density={self.density} must be in (0, 1]: it is the trainable fraction of a weight")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity={self.granularity!r} is not one of {GRANULARITIES}")
        if (self.granularity == "block") != (self.block is not None) or self.block not in (None, *BLOCK_SIZES):
            raise ValueError(f"give block= (one of {BLOCK_SIZES}) with granularity='block', and only then")
        if self.regions is not None and self.init != "regions":
            raise ValueError(f"a `regions` file is only used with init='regions', not init={self.init!r}")
        for what in ("regions", "frozen"):
            path = getattr(self, what)
            if path is not None and not os.path.isfile(path):
                raise FileNotFoundError(f"{what}={path!r} does not exist: pass a core-regions .safetensors file")

    def to_dict(self) -> dict:
        """Serialise without machine paths: the index sets are saved in the adapter file itself."""
        d = super().to_dict()
        d["regions"] = d["frozen"] = None
        return d

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        """Save the config; beside adapter weights (peft saves them first), also the card's peft-isolate section."""
        super().save_pretrained(save_directory, **kwargs)
        if os.path.isfile(os.path.join(save_directory, "adapter_model.safetensors")):
            from ..card import write_card

            write_card(save_directory)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs):
        """Load a saved config, checking first that the adapter file beside it is readable safetensors."""
        path = os.path.join(pretrained_model_name_or_path, subfolder or "")
        weights = os.path.join(path, "adapter_model.safetensors")
        if os.path.isfile(weights):
            with open_tensors(weights):  # a clear error for a truncated file, before any load
                pass
        return super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
