"""The `peft-isolate` command in-process: export -> merge -> load, validate, and errors as one clear line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from tiny import tiny_tokenizer
from transformers import AutoModelForCausalLM

from peft_isolate import IsolationConfig
from peft_isolate.cli import main


def test_export_then_merge_gives_the_merged_model(tiny_dir, load_tiny, tmp_path):
    peft_model = get_peft_model(
        load_tiny(), IsolationConfig(target_modules="all-linear", density=0.1, init_weights=False)
    )
    peft_model.save_pretrained(tmp_path / "adapter")
    tokens = torch.arange(3, 20).view(1, -1)
    with torch.no_grad():
        expected = peft_model.merge_and_unload()(tokens).logits
    assert (
        main(["export", str(tmp_path / "adapter"), "--out", str(tmp_path / "d.safetensors"), "--base", str(tiny_dir)])
        == 0
    )
    args = ["merge", "--base", str(tiny_dir), "--delta", str(tmp_path / "d.safetensors"), "--out", str(tmp_path / "m")]
    assert main(args) == 0
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "m")(tokens).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_apply_keeps_a_bf16_checkpoint_bf16_and_its_fingerprint(tiny_dir, tmp_path):
    """`export --base DIR` fingerprints the checkpoint as stored (bf16 here); `apply DIR` must load it so, not in
    the CPU default fp32 (which refused as another base), and save it back in bf16, as `merge` does."""
    bf16 = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.bfloat16).save_pretrained(bf16)
    tiny_tokenizer().save_pretrained(bf16)
    model = AutoModelForCausalLM.from_pretrained(bf16, dtype=torch.float32)
    get_peft_model(
        model, IsolationConfig(target_modules="all-linear", density=0.1, init_weights=False)
    ).save_pretrained(tmp_path / "adapter")
    delta = str(tmp_path / "d.safetensors")
    assert main(["export", str(tmp_path / "adapter"), "--out", delta, "--base", str(bf16)]) == 0
    assert main(["apply", str(bf16), delta, "--out", str(tmp_path / "applied")]) == 0
    assert main(["merge", "--base", str(bf16), "--delta", delta, "--out", str(tmp_path / "merged")]) == 0
    applied, merged = (AutoModelForCausalLM.from_pretrained(tmp_path / d).state_dict() for d in ("applied", "merged"))
    assert all(t.dtype == torch.bfloat16 for t in applied.values())
    assert all(torch.equal(applied[n], merged[n]) for n in merged)


EXAMPLES = sorted((Path(__file__).parents[1] / "examples").glob("*.yaml"))


@pytest.mark.parametrize("recipe", EXAMPLES, ids=lambda p: p.name)
def test_every_example_recipe_validates(recipe, capsys):
    assert main(["validate", str(recipe), "output_dir=runs/overridden"]) == 0
    assert "output_dir: runs/overridden" in capsys.readouterr().out


def test_user_errors_exit_2_with_one_line(tmp_path, capsys):
    bad = tmp_path / "r.yaml"
    bad.write_text("model: x\nunknown_key: 1\n")
    with pytest.raises(SystemExit) as e:
        main(["validate", str(bad)])
    assert e.value.code == 2
    assert "unknown_key" in capsys.readouterr().err
    for argv, message in [
        (["regions", "--lora", str(tmp_path), "--include", "(q_proj", "--out", "x"], "not a valid regular"),
        (["export", str(tmp_path), "--out", "x", "--quantization", "nf4"], "give --base too"),
    ]:
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


def test_demo_fails_loudly_unless_the_probes_learn(tiny_dir, tmp_path, capsys):
    """The demo's honesty check: a random tiny model learns nothing in two steps, so the demo must exit 1."""
    tiny = [
        f"model={tiny_dir}",
        "tasks={a: {source: 'reasoning_gym:spell_backward', train: 8, eval: 4}, "
        "b: {source: 'reasoning_gym:chain_sum', train: 8, eval: 4}}",
        "probe.steps=2",
        "stages.steps=2",
        "baselines=[]",
        "training.max_seq_len=32",
        "eval.max_new_tokens=2",
        f"output_dir={tmp_path / 'demo'}",
    ]
    assert main(["demo", *tiny]) == 1
    assert "DEMO FAILED: the single-task probes of ['a', 'b']" in capsys.readouterr().out
    assert main(["demo", "--margin", "-1", *tiny]) == 0  # same run, cached; any lift above -1 passes
    assert "Demo check passed" in capsys.readouterr().out
