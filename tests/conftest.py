"""Shared fixtures: a tiny random Llama on disk (loadable in full precision, 4-bit and 8-bit) and a recipe over it."""

from __future__ import annotations

import random

import pytest
import torch
import yaml
from runs import write_lines
from tiny import tiny_llama
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

QUANTIZATION = {
    "fp32": None,
    "nf4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
    "int8": BitsAndBytesConfig(load_in_8bit=True),
}


@pytest.fixture(autouse=True)
def seeded_random():
    """Each test draws the same random numbers alone as in the whole suite, whatever ran before it."""
    torch.manual_seed(0)
    random.seed(0)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(path)
    return path


@pytest.fixture
def load_tiny(tiny_dir):
    """Load the tiny Llama fresh, in `fp32`, `nf4` or `int8`."""

    def load(kind: str = "fp32"):
        return AutoModelForCausalLM.from_pretrained(
            tiny_dir, quantization_config=QUANTIZATION[kind], dtype=torch.float32
        ).eval()

    return load


def _write_task(path, make, n=48, seed=0):
    rng = random.Random(seed)
    return write_lines(path, [make(rng) for _ in range(n)])


def _upper(rng):
    word = "".join(rng.choice("abcdef") for _ in range(4))
    return {"prompt": f"upper {word}", "response": word.upper()}


def _count(rng):
    word = "".join(rng.choice("ab") for _ in range(5))
    return {"prompt": f"count a in {word}", "response": str(word.count("a"))}


@pytest.fixture
def recipe_file(tmp_path, tiny_dir):
    recipe = {
        "model": str(tiny_dir),
        "quantization": "none",
        "tasks": {
            "upper": {"source": _write_task(tmp_path / "upper.jsonl", _upper), "eval": 8},
            "count": {"source": _write_task(tmp_path / "count.jsonl", _count, seed=1), "eval": 8},
        },
        "probe": {"steps": 4, "lr": 1e-2, "rank": 4},  # lora in adapter mode, full in dense mode
        "regions": {"p": 0.05},
        "plan": {"tau": 0.9, "order": "size"},  # high tau: two stages, so the second one locks the first core
        "stages": {"steps": 4, "lr": 1e-2, "sample": 1.0},
        "training": {"batch_size": 4, "max_seq_len": 32, "weight_decay": 0.1},
        "baselines": ["multitask", "multistage_random", "lora_multitask"],
        "eval": {"max_new_tokens": 4, "batch_size": 8, "stages": True},
        "output_dir": str(tmp_path / "run"),
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path
