"""What an outside audit found: ways to lose a user's files, silently wrong results, and bad input that got a
traceback or no limit. Each test failed before its fix."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from peft import get_peft_model
from safetensors.torch import load_file, save_file
from tiny import tiny_llama
from transformers import AutoModelForCausalLM

from peft_isolate import IsolationConfig, find_core_regions
from peft_isolate.cli import main
from peft_isolate.export import (
    CONTENT_TOLERANCE,
    SparseDelta,
    apply_delta,
    base_samples,
    compose_deltas,
    content_distance,
    decode_indices,
    encode_indices,
    export_delta,
    merge_checkpoint,
)
from peft_isolate.recipe import load_recipe
from peft_isolate.sources import ModelDelta


@pytest.fixture(scope="module")
def saved(tiny_dir, tmp_path_factory):
    """An isolation adapter on the tiny Llama, its delta file, and a second delta on another support."""
    path = tmp_path_factory.mktemp("saved")
    for name, seed in (("a", 0), ("b", 1)):
        model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
        peft_model = get_peft_model(
            model, IsolationConfig(target_modules="all-linear", density=0.05, seed=seed, init_weights=False)
        )
        peft_model.save_pretrained(path / f"adapter-{name}")
        export_delta(path / f"adapter-{name}", path / f"{name}.safetensors", base=tiny_dir)
    return path


def _cli(capsys, *argv: str) -> tuple[int, str]:
    """Run the CLI; (exit code, what it printed to stderr), asserting it is one line and no traceback."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    said = [line for line in err.splitlines() if line.startswith("peft-isolate")]  # not the loaders' progress bars
    assert "Traceback" not in err and len(said) <= 1, err
    return code, "\n".join(said)


# --- data loss -------------------------------------------------------------------------------------------------


def test_apply_refuses_an_output_that_exists_and_writes_atomically(saved, tiny_dir, tmp_path, capsys, monkeypatch):
    before = {f.name: f.read_bytes() for f in Path(tiny_dir).iterdir()}
    code, err = _cli(capsys, "apply", tiny_dir, saved / "a.safetensors", "--out", tiny_dir)
    assert code == 2 and "exists and is not empty" in err
    assert {f.name: f.read_bytes() for f in Path(tiny_dir).iterdir()} == before  # the base is untouched
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    code, err = _cli(capsys, "apply", tiny_dir, saved / "a.safetensors", "--out", tmp_path / "link")
    assert code == 2 and "symbolic link" in err

    def full_disk(self, path, *args, **kwargs):
        (Path(path) / "model.safetensors").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(type(AutoModelForCausalLM.from_pretrained(tiny_dir)), "save_pretrained", full_disk)
    code, err = _cli(capsys, "apply", tiny_dir, saved / "a.safetensors", "--out", tmp_path / "out")
    assert code == 2 and f"could not write {tmp_path / 'out'}" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link"]  # neither out nor a temporary folder


def test_read_only_output_dir_is_refused_before_any_work(tmp_path, capsys, tiny_dir):
    recipe = tmp_path / "r.yaml"
    tasks = {t: {"source": "reasoning_gym:basic_arithmetic", "train": 8, "eval": 4} for t in ("a", "b")}
    # /sys refuses every write (EPERM): as root, a chmod cannot make a folder unwritable
    recipe.write_text(yaml.safe_dump({"model": str(tiny_dir), "tasks": tasks, "output_dir": "/sys/peft-isolate/x"}))
    code, err = _cli(capsys, "run", recipe)
    assert code == 2 and "cannot write output_dir /sys/peft-isolate/x" in err


# --- silently wrong results ------------------------------------------------------------------------------------


def test_export_against_a_base_of_other_shapes_is_refused(saved, tmp_path):
    wide = tmp_path / "wide"
    tiny_llama(wide, hidden_size=128)  # every index of the 64-wide adapter is in range of the 128-wide weights
    with pytest.raises(ValueError, match=r"weight is \(64, \d+\) in the adapter but \(128, \d+\) in the base"):
        export_delta(saved / "adapter-a", tmp_path / "d.safetensors", base=wide)
    assert not (tmp_path / "d.safetensors").exists()


@pytest.mark.parametrize("sharded", [False, True])
def test_a_delta_merged_twice_is_refused_another_one_is_not(saved, tiny_dir, tmp_path, sharded):
    base = tiny_dir
    if sharded:
        base = tmp_path / "sharded"
        AutoModelForCausalLM.from_pretrained(tiny_dir).save_pretrained(base, max_shard_size="40KB")
    merge_checkpoint(base, saved / "a.safetensors", tmp_path / "xa")
    with pytest.raises(ValueError, match="already holds .*a.safetensors.*add it twice.*force=True"):
        merge_checkpoint(tmp_path / "xa", saved / "a.safetensors", tmp_path / "xaa")
    assert not (tmp_path / "xaa").exists()
    report = merge_checkpoint(tmp_path / "xa", saved / "b.safetensors", tmp_path / "xab")  # B, made for X: fine
    assert report["fingerprint"] == "match"
    records = json.loads((tmp_path / "xab" / "config.json").read_text())["peft_isolate_deltas"]
    assert [r["file"] for r in records] == ["a.safetensors", "b.safetensors"]
    with pytest.warns(UserWarning, match="a second time"):
        merge_checkpoint(tmp_path / "xa", saved / "a.safetensors", tmp_path / "xaa", force=True)
    # the record travels through a loaded model: apply refuses the same delta on base X + [A]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "xa")
    with pytest.raises(ValueError, match="already holds"):
        apply_delta(model, saved / "a.safetensors")


def test_apply_twice_in_memory_and_through_save_is_refused(saved, load_tiny, tmp_path):
    model = load_tiny()
    apply_delta(model, saved / "a.safetensors")
    with pytest.raises(ValueError, match="the model already holds"):
        apply_delta(model, saved / "a.safetensors")
    model.save_pretrained(tmp_path / "xa")
    with pytest.raises(ValueError, match="already holds"):
        apply_delta(AutoModelForCausalLM.from_pretrained(tmp_path / "xa"), saved / "a.safetensors")


def test_content_fingerprint_tells_other_weights_apart_and_matches_a_quantized_load(saved, load_tiny, tmp_path):
    other = tmp_path / "other"
    tiny_llama(other, seed=1)  # the same names, shapes and dtypes: version 1 could not tell it apart
    with pytest.raises(ValueError, match="same names and shapes but other weights"):
        merge_checkpoint(other, saved / "a.safetensors", tmp_path / "m")
    with pytest.raises(ValueError, match="other weights"):
        apply_delta(AutoModelForCausalLM.from_pretrained(other), saved / "a.safetensors")
    meta_values = json.loads(SparseDelta.load(saved / "a.safetensors").base["base_content"])["values"]
    nf4 = base_samples(load_tiny("nf4"))
    far = base_samples(other)
    assert content_distance(meta_values, nf4) < CONTENT_TOLERANCE["quantized"] < content_distance(meta_values, far)
    assert content_distance(meta_values, base_samples(load_tiny("fp32"))) < 1e-6
    # the 4-bit base is refused for its quantization only (the content matches within the stated tolerance)
    with pytest.raises(ValueError, match=r"same weights, other quantization \(delta made on none, this base nf4\)"):
        apply_delta(load_tiny("nf4"), saved / "a.safetensors")


def test_a_version_1_delta_still_applies_with_a_warning(saved, load_tiny, tmp_path):
    tensors = load_file(saved / "a.safetensors")
    from safetensors import safe_open

    with safe_open(str(saved / "a.safetensors"), "pt") as f:
        meta = {k: v for k, v in f.metadata().items() if k != "base_content"} | {"version": "1"}
    save_file(tensors, str(tmp_path / "v1.safetensors"), meta)
    model = load_tiny()
    with pytest.warns(UserWarning, match="version-1 sparse delta.*cannot be told apart"):
        assert apply_delta(model, tmp_path / "v1.safetensors")["fingerprint"] == "match"


def test_compact_indices_round_trip_exactly_and_are_smaller(saved, tmp_path):
    delta = SparseDelta.load(saved / "a.safetensors")
    delta.save(tmp_path / "c.safetensors", torch.bfloat16, compact=True)
    back = SparseDelta.load(tmp_path / "c.safetensors")
    for name, (idx, val) in delta.entries.items():
        assert torch.equal(back.entries[name][0], idx)
        assert torch.equal(back.entries[name][1], val.bfloat16().float())
    assert (tmp_path / "c.safetensors").stat().st_size < 0.6 * (saved / "a.safetensors").stat().st_size


@pytest.mark.parametrize(
    ("indices", "numel", "parts"),
    [
        # a gap past uint16 widens the escapes to int32; uint8 gaps with 3 escapes (18 bytes) beat int32 (24)
        ([0, 3, 300, 301, 70_000, 2**31 - 2], 2**31 - 1, {"gaps": torch.uint8, "escaped": torch.int32}),
        ([0, 3, 300, 301, 700, 60_000], 10**6, {"gaps": torch.uint8, "escaped": torch.uint16}),  # escapes fit 16 bits
        (list(range(0, 4000, 2)), 4000, {"mask": torch.uint8}),  # half the entries: 500 mask bytes beat 2000 gaps
        ([9_000_000], 10**7, {"indices": torch.int32}),  # one far index: 4 bytes, a gap and its escape cost 5
        ([], 64, {"indices": torch.int32}),  # nothing: zero bytes, the first of the smallest
        ([0, 7, 8, 15], 16, {"mask": torch.uint8}),  # the mask's first and last bits: 2 bytes beat 4 gaps
    ],
)
def test_each_index_encoding_round_trips_exactly_and_is_the_smallest(indices, numel, parts):
    idx = torch.tensor(indices, dtype=torch.long)
    encoded = encode_indices(idx, numel)
    assert {k: v.dtype for k, v in encoded.items()} == parts
    assert torch.equal(decode_indices(encoded, numel), idx)
    size = sum(t.numel() * t.element_size() for t in encoded.values())
    assert size <= min(4 * len(indices), -(-numel // 8))


def test_a_mask_with_bits_past_the_weight_is_refused():
    mask = encode_indices(torch.tensor([0, 7, 8, 9]), 10)["mask"]
    assert mask.tolist() == [0b1000_0001, 0b11]
    with pytest.raises(ValueError, match="bits past the end"):
        decode_indices({"mask": mask | 0b100}, 10)


def test_the_documented_numpy_snippet_reads_every_encoding(saved, tmp_path):
    """docs/formats.md's reader, with numpy only, gives the indices peft-isolate reads."""
    import numpy as np
    from safetensors.numpy import load_file as load_numpy

    delta = SparseDelta.load(saved / "a.safetensors")
    name = next(iter(delta.entries))
    numel = math.prod(delta.shapes[name])
    cases = {"mask": torch.arange(0, numel, 3), "gaps": torch.tensor([1, 400, numel - 1])}
    for case, idx in cases.items():
        one = SparseDelta({name: (idx, torch.ones(len(idx)))}, delta.shapes, {})
        one.save(tmp_path / "c.safetensors", compact=True)
        f = load_numpy(str(tmp_path / "c.safetensors"))
        assert f"{name}.{case}" in f
        if name + ".indices" in f:
            got = f[name + ".indices"].astype(np.int64)
        elif name + ".mask" in f:
            got = np.flatnonzero(np.unpackbits(f[name + ".mask"], bitorder="little")[:numel])
        else:
            gaps = f[name + ".gaps"].astype(np.int64)
            big = gaps == np.iinfo(f[name + ".gaps"].dtype).max
            gaps[big] = f.get(name + ".escaped", np.zeros(0, np.int64))
            got = np.cumsum(gaps)
        assert got.tolist() == idx.tolist()


def test_compose_of_a_delta_with_a_base_and_one_without_is_refused(saved, tmp_path):
    d = SparseDelta.load(saved / "b.safetensors")
    SparseDelta(d.entries, d.shapes, {}).save(tmp_path / "bare.safetensors")
    with pytest.raises(ValueError, match="records no base but .*a.safetensors does: re-export"):
        compose_deltas([saved / "a.safetensors", tmp_path / "bare.safetensors"], tmp_path / "out.safetensors", "sum")
    assert not (tmp_path / "out.safetensors").exists()


def test_invalid_deltas_are_refused_before_anything_is_written(saved, tiny_dir, tmp_path):
    tensors = load_file(saved / "adapter-a" / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("isolation_indices"))
    tensors[key] = torch.cat([torch.tensor([-1], dtype=torch.int32), tensors[key][1:]])
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file(tensors, str(bad / "adapter_model.safetensors"))
    (bad / "adapter_config.json").write_text((saved / "adapter-a" / "adapter_config.json").read_text())
    with pytest.raises(ValueError, match="out of range"):
        export_delta(bad, tmp_path / "neg.safetensors", base=tiny_dir)
    with pytest.raises(ValueError, match=r"weights \[1, nan\] hold NaN"):
        compose_deltas(
            [saved / "a.safetensors", saved / "b.safetensors"], tmp_path / "nan.safetensors", "sum", [1, float("nan")]
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]


# --- bad input: one line, with a limit ---------------------------------------------------------------------------


def test_a_yaml_alias_bomb_is_refused(tmp_path):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]  # 10**9 leaves
    (tmp_path / "bomb.yaml").write_text("\n".join(lines) + "\ntasks: *a8\n")
    with pytest.raises(ValueError, match=r"aliases \(\*name\) are not allowed in a recipe"):
        load_recipe(tmp_path / "bomb.yaml")


def _recipe(tmp_path, **changes) -> Path:
    data = {"tasks": {t: {"source": "reasoning_gym:basic_arithmetic"} for t in ("a", "b")}}
    for key, value in changes.items():
        section, _, field = key.partition("__")
        data.setdefault(section, {})[field] = value
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(data))
    return tmp_path / "r.yaml"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"training__seed": 10**30}, r"training.seed: Input should be less than or equal to 4294967295"),
        ({"plan__seed": -1}, r"plan.seed: Input should be greater than or equal to 0"),
        ({"stages__steps": 10**12}, r"stages.steps: Input should be less than or equal to 10000000"),
    ],
)
def test_numbers_out_of_range_are_refused_with_the_reason(tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        load_recipe(_recipe(tmp_path, **change))


def test_budgets_and_a_p_that_cannot_work_are_refused_before_training(tmp_path, tiny_dir):
    from peft_isolate.pipeline import load_run

    recipe = load_recipe(_recipe(tmp_path, probe__epochs=1e308), [f"model={tiny_dir}"])
    with pytest.raises(ValueError, match="over the ceiling of 10,000,000: lower epochs"):
        load_run(recipe)
    recipe = load_recipe(_recipe(tmp_path, regions__p=1e-300), [f"model={tiny_dir}"])
    with pytest.raises(ValueError, match=r"p=1e-300 keeps no entry .* a p of at least 1/\d+"):
        load_run(recipe)
    zeros = {"w": torch.zeros(10, 10)}
    with pytest.raises(ValueError, match=r"a p of at least 1/100 \(about 1.00e-02\) keeps one"):
        find_core_regions(ModelDelta(zeros, {"w": torch.ones(10, 10)}), p=0.005)
    assert find_core_regions(ModelDelta(zeros, {"w": torch.ones(10, 10)}), p=0.01).size == 1


def test_bad_files_get_one_line_naming_the_file(saved, tiny_dir, tmp_path, capsys):
    out = tmp_path / "o.safetensors"
    # a core-regions file without its metadata
    save_file(
        {"w": torch.tensor([1], dtype=torch.int32)},
        str(tmp_path / "r.safetensors"),
        {"format": "peft-isolate/core-regions"},
    )
    (tmp_path / "s.safetensors").write_bytes((tmp_path / "r.safetensors").read_bytes())
    code, err = _cli(
        capsys, "plan", tmp_path / "r.safetensors", tmp_path / "s.safetensors", "--out", tmp_path / "p.json"
    )
    assert code == 2 and "r.safetensors: its header's shapes, p or scope is missing" in err
    # a shard index without weight_map
    ckpt = tmp_path / "ckpt"
    AutoModelForCausalLM.from_pretrained(tiny_dir).save_pretrained(ckpt)
    (ckpt / "model.safetensors.index.json").write_text('{"metadata": {}}')
    code, err = _cli(capsys, "regions", "--tuned", ckpt, "--base", tiny_dir, "--out", out)
    assert code == 2 and "model.safetensors.index.json has no weight_map" in err
    # adapter configs with an unknown peft_type or wrong types
    for change, expected in (
        ({"peft_type": "NOPE"}, "peft_type 'NOPE' is not a peft method"),
        ({"base_model_name_or_path": 3}, "base_model_name_or_path is 3, not a str or NoneType"),
        ([1, 2], "holds a list, not a mapping"),
    ):
        adapter = tmp_path / f"adapter-{len(list(tmp_path.iterdir()))}"
        adapter.mkdir()
        config = json.loads((saved / "adapter-a" / "adapter_config.json").read_text())
        (adapter / "adapter_config.json").write_text(
            json.dumps(config | change if isinstance(change, dict) else change)
        )
        code, err = _cli(capsys, "export", adapter, "--out", out)
        assert code == 2 and expected in err, err
    # a delta whose shapes header is a list
    save_file(
        {"w.indices": torch.tensor([0], dtype=torch.int32), "w.values": torch.ones(1)},
        str(tmp_path / "l.safetensors"),
        {"format": "peft-isolate/sparse-delta", "version": "2", "shapes": "[1, 2]"},
    )
    code, err = _cli(
        capsys, "merge", "--base", tiny_dir, "--delta", tmp_path / "l.safetensors", "--out", tmp_path / "m"
    )
    assert code == 2 and "header's `shapes` is missing or not" in err


def test_ctrl_c_prints_one_line_saying_where_a_rerun_resumes(tmp_path, capsys, monkeypatch):
    from peft_isolate import pipeline
    from peft_isolate.pipeline import Run
    from peft_isolate.training import COMPLETE

    artifact = tmp_path / "stages" / "0"
    (artifact.parent / "0.work" / "checkpoint-4").mkdir(parents=True)
    (artifact.parent / "0.work" / "checkpoint-4" / COMPLETE).write_text(json.dumps({"step": 4, "key": "k"}))
    run = Run.__new__(Run)
    monkeypatch.setattr(Run, "out", tmp_path)

    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt) as info:
        run.step("stages:0", "k", artifact, interrupted)
    assert info.value.__notes__ == [
        f"step stages:0 stopped before {artifact} was complete; a rerun resumes it from "
        f"{artifact.parent / '0.work' / 'checkpoint-4'}"
    ]

    def run_pipeline(recipe, until):
        run.step("stages:0", "other key", artifact, interrupted)

    monkeypatch.setattr(pipeline, "run_pipeline", run_pipeline)
    recipe = _recipe(tmp_path)
    code, err = _cli(capsys, "run", recipe)
    assert (
        code == 130
        and err.strip()
        == f"peft-isolate run: interrupted; step stages:0 stopped before {artifact} was complete; a rerun redoes it"
    )
