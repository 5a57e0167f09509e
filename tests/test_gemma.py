"""A second architecture, Gemma 3 (the `gemma3-270m` alias's): its tied embedding, q/k norms and mixed sliding and
full attention, through the tuner, export, merge and the pipeline on a tiny random model; and the alias itself,
a GGUF joined from chunk packages."""

from __future__ import annotations

import sys

import pytest
import torch
from peft import PeftModel, get_peft_model
from runs import final_adapter, with_changes
from tiny import tiny_gemma3
from transformers import AutoModelForCausalLM

from peft_isolate import IsolationConfig, models
from peft_isolate.cli import main
from peft_isolate.export import export_delta, merge_checkpoint
from peft_isolate.tuner.layer import IsolationLayer

TOKENS = torch.randint(3, 200, (2, 11), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-gemma3")
    tiny_gemma3(path)
    return path


def _logits(model):
    with torch.no_grad():
        return model(TOKENS).logits


def _trained(gemma_dir):
    model = AutoModelForCausalLM.from_pretrained(gemma_dir, dtype=torch.float32).eval()
    peft_model = get_peft_model(model, IsolationConfig(target_modules="all-linear", density=0.05))
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        peft_model(TOKENS, labels=TOKENS).loss.backward()
        opt.step()
        opt.zero_grad()
    return peft_model.eval()


def test_the_adapter_takes_every_projection_and_leaves_the_tied_embedding(gemma_dir):
    model = AutoModelForCausalLM.from_pretrained(gemma_dir, dtype=torch.float32).eval()
    base = _logits(model)
    peft_model = get_peft_model(model, IsolationConfig(target_modules="all-linear", density=0.05))
    adapted = {n.split(".")[-1] for n, m in peft_model.named_modules() if isinstance(m, IsolationLayer)}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert not isinstance(peft_model.base_model.model.lm_head, IsolationLayer)
    inner = peft_model.base_model.model
    assert inner.lm_head.weight is inner.model.embed_tokens.weight  # still tied, and frozen
    assert torch.equal(_logits(peft_model), base)


def test_trained_save_reload_merge_and_export_agree(gemma_dir, tmp_path):
    peft_model = _trained(gemma_dir)
    expected = _logits(peft_model)
    peft_model.save_pretrained(tmp_path / "adapter")
    base = AutoModelForCausalLM.from_pretrained(gemma_dir, dtype=torch.float32).eval()
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter")
    assert torch.equal(_logits(reloaded), expected)
    merged = reloaded.merge_and_unload()
    torch.testing.assert_close(_logits(merged), expected, rtol=1e-5, atol=1e-5)
    export_delta(tmp_path / "adapter", tmp_path / "d.safetensors", base=gemma_dir)
    merge_checkpoint(gemma_dir, tmp_path / "d.safetensors", tmp_path / "merged")
    streamed = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert streamed.lm_head.weight is streamed.model.embed_tokens.weight
    torch.testing.assert_close(_logits(streamed), expected, rtol=1e-5, atol=1e-5)


def test_the_pipeline_runs_on_gemma3(recipe_file, gemma_dir, tmp_path):
    out = tmp_path / "gemma-run"
    main(["run", str(with_changes(recipe_file, out, model=str(gemma_dir)))])
    tensors = final_adapter(out)
    assert any("q_proj" in k for k in tensors) and not any("lm_head" in k or "embed" in k for k in tensors)
    assert (out / "results.json").is_file()


def test_a_tokenizer_without_a_template_but_with_gemma_turns_gets_gemma_turns(tmp_path):
    """The GGUF's tokenizer carries no chat template: prompts use Gemma's own turn markers (in its vocabulary)
    rather than ChatML text, and generation stops at the end of the model's turn as at the end of text."""
    tiny_gemma3(tmp_path / "g", turns=True)
    model, tokenizer = models.load_model(tmp_path / "g")
    messages = [{"role": "user", "content": "2+3?"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<start_of_turn>user\n2+3?<end_of_turn>\n<start_of_turn>model\n"
    stops = model.generation_config.eos_token_id
    assert tokenizer.convert_tokens_to_ids("<end_of_turn>") in stops and tokenizer.eos_token_id in stops


@pytest.fixture
def chunked_alias(tmp_path, monkeypatch):
    """A built-in alias of the `gemma3-270m` kind: a package whose `assemble(path)` joins the GGUF; the
    conversion is recorded instead of run (it needs a real GGUF)."""
    package = tmp_path / "pkg" / "tiny_chunks"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(
        "CALLS = []\n"
        "def assemble(output_path, overwrite=False):\n"
        "    CALLS.append(output_path)\n"
        "    open(output_path, 'wb').write(b'GGUF' + bytes(60))\n"
        "    return output_path\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path / "pkg"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    alias = models.BuiltInModel("tiny_chunks", "tiny.gguf", "tiny-chunks==1.0", assembled=True)
    monkeypatch.setitem(models.ALIASES, "tiny-chunked", alias)
    converted = []

    def convert(gguf, target):
        converted.append(gguf.read_bytes())
        target.mkdir(parents=True)
        (target / "config.json").write_text("{}")

    monkeypatch.setattr(models, "_convert_gguf", convert)
    yield converted
    sys.modules.pop("tiny_chunks", None)


def test_a_chunked_alias_is_joined_once_converted_and_the_joined_file_removed(chunked_alias):
    target = models.resolve_model("tiny-chunked")
    assert target == models.cache_dir() / "tiny-chunked" and chunked_alias == [b"GGUF" + bytes(60)]
    assert sorted(p.name for p in models.cache_dir().iterdir()) == ["tiny-chunked"]  # no .gguf, no temporary
    assert models.resolve_model("tiny-chunked") == target
    assert len(sys.modules["tiny_chunks"].CALLS) == 1 and len(chunked_alias) == 1


def test_a_missing_chunk_package_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setitem(models.ALIASES, "ghost", models.BuiltInModel("no_such_chunks", "g.gguf", "g==1", True))
    with pytest.raises(FileNotFoundError, match=r"needs the g==1 package, which holds g.gguf; install it with `pip"):
        models.resolve_model("ghost")
