"""Shared fixtures: a tiny random Llama on disk, loadable in full precision, 4-bit and 8-bit."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_llama
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

QUANTIZATION = {
    "fp32": None,
    "nf4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
    "int8": BitsAndBytesConfig(load_in_8bit=True),
}


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
