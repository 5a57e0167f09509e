"""Artifacts that travel: adapter cards, the base named as the user named it, and a tuner-only install."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

from peft import get_peft_model
from runs import with_changes

from peft_isolate import IsolationConfig, models, pipeline
from peft_isolate.card import BEGIN, END, entry_counts, write_card
from peft_isolate.models import load_model
from peft_isolate.pipeline import run_pipeline
from peft_isolate.recipe import load_recipe


def test_pipeline_cards_say_counts_tasks_stage_recipe_and_scores(recipe_file):
    recipe = load_recipe(recipe_file, ["baselines=[]"])
    results = run_pipeline(recipe)
    out = Path(recipe.output_dir)
    for k in (0, 1):
        card = (out / "stages" / str(k) / "README.md").read_text()
        counts = entry_counts(out / "stages" / str(k))
        assert f"| trainable | {counts['trainable']:,} |" in card and "| locked (frozen cores" in card
        assert f"| locked (frozen cores, never trained again) | {counts['locked']:,} |" in card
        assert f"stage: stages/{k} ({k + 1} of 2)" in card and '"output_dir": ' in card
        assert card.count(BEGIN) == 1 and card.count(END) == 1 and "library_name: peft" in card  # peft's part kept
    assert entry_counts(out / "stages" / "1")["locked"] > 0  # the second stage locks the first group's core
    final = (out / "final" / "README.md").read_text()
    scores = results["methods"]["cpi_ft"]["tasks"]
    assert "scores: " + ", ".join(f"{t} {s:.3f}" for t, s in scores.items()) in final


def test_an_alias_is_recorded_as_named_and_the_card_says_where_it_comes_from(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(models.ALIASES, "tiny-alias", models.BuiltInModel("tiny_pkg", "tiny.gguf", "tiny-pkg==1.0"))
    resolve = models.resolve_model
    monkeypatch.setattr(models, "resolve_model", lambda name: tiny_dir if name == "tiny-alias" else resolve(name))
    model, _ = load_model("tiny-alias")
    peft_model = get_peft_model(model, IsolationConfig(target_modules="all-linear", density=0.1))
    peft_model.save_pretrained(tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny-alias"  # not the conversion cache's path
    card = write_card(tmp_path / "a").read_text()
    assert "shipped in the PyPI package `tiny-pkg==1.0`" in card and "dequantized from that GGUF" in card
    write_card(tmp_path / "a")  # a second save replaces the section, it does not repeat it
    assert (tmp_path / "a" / "README.md").read_text().count(BEGIN) == 1


def test_a_run_on_an_alias_asks_no_hub_about_it(recipe_file, tiny_dir, tmp_path, monkeypatch):
    """peft looks a base that is not a local folder up on the Hub at every adapter save; the pipeline is offline."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setitem(models.ALIASES, "tiny-alias", models.BuiltInModel("tiny_pkg", "tiny.gguf", "tiny-pkg==1.0"))
    resolve = models.resolve_model
    monkeypatch.setattr(models, "resolve_model", lambda name: tiny_dir if name == "tiny-alias" else resolve(name))
    monkeypatch.setattr(pipeline, "resolve_model", models.resolve_model)
    recipe = load_recipe(with_changes(recipe_file, tmp_path / "run", model="tiny-alias"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_pipeline(recipe, until="train-stage")
    lookups = [str(w.message) for w in caught if "remote file" in str(w.message) or "config file in" in str(w.message)]
    assert (
        lookups == []
        and json.loads((tmp_path / "run" / "final" / "adapter_config.json").read_text())["base_model_name_or_path"]
        == "tiny-alias"
    )


TUNER_ONLY = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    for name in ("datasets", "pydantic", "matplotlib", "gguf", "reasoning_gym"):  # as if not installed
        sys.modules[name] = None
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM
    import peft_isolate
    from peft_isolate.export import compose_deltas, export_delta, merge_checkpoint
    from peft_isolate.cli import main

    base, out = Path(sys.argv[1]), Path(sys.argv[2])
    model = AutoModelForCausalLM.from_pretrained(base)
    peft = get_peft_model(model, peft_isolate.IsolationConfig(target_modules="all-linear", init_weights=False))
    peft.save_pretrained(out / "adapter")
    export_delta(out / "adapter", out / "d.safetensors", base=base)
    compose_deltas([out / "d.safetensors"], out / "c.safetensors")
    merge_checkpoint(base, out / "c.safetensors", out / "merged")
    ours = sorted(m for m in sys.modules if m.startswith("peft_isolate."))
    print("modules", " ".join(ours))
    (out / "r.yaml").write_text("tasks: {}")
    main(["run", str(out / "r.yaml")])
    """
)


def test_the_tuner_export_and_merge_need_no_pipeline_dependency(tiny_dir, tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", TUNER_ONLY, str(tiny_dir), str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert (tmp_path / "merged" / "config.json").is_file()
    modules = set(done.stdout.split("modules", 1)[1].split())
    assert not modules & {"peft_isolate.pipeline", "peft_isolate.recipe", "peft_isolate.data", "peft_isolate.evaluate"}
    assert "pip install 'peft-isolate[pipeline]'" in done.stderr.strip().splitlines()[-1]


def test_save_pretrained_writes_the_card_with_counts_after_stage_operations(load_tiny, tmp_path):
    peft_model = get_peft_model(load_tiny(), IsolationConfig(target_modules="all-linear", density=0.1))
    layer = next(m for m in peft_model.modules() if hasattr(m, "isolation_indices"))
    peft_model.base_model.hold()
    locked = peft_model.base_model.lock(
        {f"{_name_of(peft_model, layer)}.weight": layer.isolation_frozen_indices["default"][:5]}
    )
    peft_model.save_pretrained(tmp_path / "a")
    card = (tmp_path / "a" / "README.md").read_text()
    counts = entry_counts(tmp_path / "a")
    assert counts == {"trainable": 0, "held": counts["held"], "locked": 5, "weights": 14} and locked == 0
    assert "| trainable | 0 |" in card and "| locked (frozen cores, never trained again) | 5 |" in card
    assert f"| held (in the forward, not trained now) | {counts['held']:,} |" in card and counts["held"] > 0
    assert "library_name: peft" in card  # peft's own card stays


def _name_of(model, module) -> str:
    name = next(n for n, m in model.base_model.model.named_modules() if m is module)
    return name
