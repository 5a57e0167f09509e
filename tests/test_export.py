"""Export and compose: sparse-delta files, apply to a model, stream-merge into checkpoints, composition."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from peft import get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file
from tiny import tiny_llama
from transformers import AutoModelForCausalLM, AutoTokenizer

import peft_isolate.export as export
from peft_isolate import IsolationConfig
from peft_isolate.export import (
    SparseDelta,
    apply_delta,
    base_fingerprint,
    compose_deltas,
    export_delta,
    merge_checkpoint,
)
from peft_isolate.tuner.layer import IsolationLayer, dequantized_weight

TOKENS = torch.randint(3, 200, (2, 11), generator=torch.Generator().manual_seed(0))
Q_PROJ = "model.layers.0.self_attn.q_proj.weight"


def logits(model):
    with torch.no_grad():
        return model(TOKENS).logits


@pytest.fixture(scope="module")
def adapter(tiny_dir, tmp_path_factory):
    """A saved isolation adapter with trainable and locked (frozen, non-zero) parts, and its merged fp32 model."""
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    peft_model = get_peft_model(model, IsolationConfig(target_modules="all-linear", density=0.1, init_weights=False))
    layer = next(m for m in peft_model.modules() if isinstance(m, IsolationLayer))
    assert layer.lock(layer.isolation_indices["default"][::3].clone(), "default") > 0
    path = tmp_path_factory.mktemp("adapter")
    peft_model.save_pretrained(path)
    merged = copy.deepcopy(peft_model).merge_and_unload()
    delta = path / "delta.safetensors"
    export_delta(path, delta, base=tiny_dir)
    return SimpleNamespace(dir=path, delta=delta, state=merged.state_dict(), logits=logits(merged))


def test_export_round_trip_readable_with_plain_safetensors(adapter, tiny_dir, tmp_path):
    saved = load_file(adapter.dir / "adapter_model.safetensors")
    with safe_open(str(adapter.delta), "pt") as f:
        meta = f.metadata()
        got = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    shapes = json.loads(meta["shapes"])
    assert meta["format"] == "peft-isolate/sparse-delta" and meta["version"] == "2"
    assert meta["base_fingerprint"] == base_fingerprint(tiny_dir) and meta["base_quantization"] == "none"
    assert len(shapes) == 14 and shapes[Q_PROJ] == [64, 64]
    frozen_seen = False
    for name in shapes:
        prefix = "base_model.model." + name.removesuffix(".weight")
        idx = torch.cat([saved[f"{prefix}.isolation_indices"], saved[f"{prefix}.isolation_frozen_indices"]])
        val = torch.cat([saved[f"{prefix}.isolation_values"], saved[f"{prefix}.isolation_frozen_values"]])
        frozen_seen |= saved[f"{prefix}.isolation_frozen_values"].abs().sum() > 0
        order = idx.argsort()
        assert got[f"{name}.indices"].dtype == torch.int32 and got[f"{name}.values"].dtype == torch.float32
        assert torch.equal(got[f"{name}.indices"], idx[order]) and torch.equal(got[f"{name}.values"], val[order])
    assert frozen_seen
    # the docstring's recipe, without peft-isolate, reproduces merge_and_unload bit for bit
    state = load_file(Path(tiny_dir) / "model.safetensors")
    with safe_open(str(adapter.delta), "pt") as f:
        for name in json.loads(f.metadata()["shapes"]):
            w = state[name].view(-1)
            idx = f.get_tensor(name + ".indices").long()
            w[idx] = (w[idx].float() + f.get_tensor(name + ".values").float()).to(w.dtype)
    assert all(torch.equal(state[n], adapter.state[n]) for n in state)
    # without base=, the adapter's recorded local base is used: the same tensors and header
    export_delta(adapter.dir, tmp_path / "recorded.safetensors")
    with safe_open(str(tmp_path / "recorded.safetensors"), "pt") as f:
        assert f.metadata() == meta and all(torch.equal(f.get_tensor(k), got[k]) for k in got)


def test_export_in_bf16_rounds_only_values(adapter, tiny_dir, tmp_path):
    report = export_delta(adapter.dir, tmp_path / "bf16.safetensors", dtype=torch.bfloat16, base=tiny_dir)
    assert report["dtype"] == "bfloat16" and report["tensors"] == 14
    full, half = load_file(adapter.delta), load_file(tmp_path / "bf16.safetensors")
    assert torch.equal(half[f"{Q_PROJ}.indices"], full[f"{Q_PROJ}.indices"])
    assert torch.equal(half[f"{Q_PROJ}.values"], full[f"{Q_PROJ}.values"].bfloat16())
    with pytest.raises(ValueError, match="float type"):
        export_delta(adapter.dir, tmp_path / "int.safetensors", dtype=torch.int8, base=tiny_dir)


def test_fingerprint_of_model_and_checkpoint(load_tiny, tiny_dir, tmp_path):
    tiny_llama(tmp_path, seed=1)  # other values, same names/shapes/dtypes: the same base as far as a delta goes
    assert base_fingerprint(load_tiny("fp32")) == base_fingerprint(tiny_dir) == base_fingerprint(tmp_path)
    assert len({base_fingerprint(load_tiny(k)) for k in ("fp32", "nf4", "int8")}) == 3
    nf4 = load_tiny("nf4")
    before = base_fingerprint(nf4)
    logits(nf4)  # bitsandbytes repacks 4-bit weights for its CPU kernel on the first forward
    assert base_fingerprint(nf4) == before == base_fingerprint(load_tiny("nf4"))
    peft_model = get_peft_model(load_tiny(), IsolationConfig(target_modules="all-linear"))
    with pytest.raises(ValueError, match="merge_and_unload"):
        base_fingerprint(peft_model)


def test_apply_to_fp32_equals_merge_and_unload_exactly(adapter, load_tiny):
    model = load_tiny("fp32")
    report = apply_delta(model, adapter.delta)
    assert report["fingerprint"] == "match" and report["rounding"] is None and report["tensors"] == 14
    assert all(torch.equal(t, adapter.state[n]) for n, t in model.state_dict().items())


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_apply_to_quantized_reports_rounding(adapter, load_tiny, tmp_path, kind):
    base = load_tiny(kind)
    with pytest.raises(ValueError, match=f"made on none, this base {kind}.*force=True"):
        apply_delta(base, adapter.delta)
    delta = tmp_path / "delta.safetensors"
    export_delta(adapter.dir, delta, base=base)  # the delta as if trained on this quantized base
    base_error = (logits(base) - logits(load_tiny("fp32"))).abs().max()
    before = dequantized_weight(base.get_submodule(Q_PROJ.removesuffix(".weight"))).clone()
    report = apply_delta(base, delta)
    rounding = report["rounding"]
    assert report["fingerprint"] == "match" and rounding is not None
    assert 0 < rounding["mean_abs"] <= rounding["max_abs"] and rounding["delta_max_abs"] > 0
    # the requantized weight is the intended one (base + delta) up to the reported rounding
    d = SparseDelta.load(delta).entries[Q_PROJ]
    intended = before.view(-1).clone()
    intended[d[0]] += d[1]
    after = dequantized_weight(base.get_submodule(Q_PROJ.removesuffix(".weight"))).view(-1)
    assert (after - intended).abs().max() <= rounding["max_abs"]
    # stated tolerance: within twice the base's own quantization error (logits) of the fp32 merged model
    assert (logits(base) - adapter.logits).abs().max() <= 2 * base_error


def _variant(src: Path, dst: Path, rename=lambda n: n, shapes=None, **base: str) -> Path:
    """A copy of a delta file with renamed tensors, other shapes or another recorded base."""
    d = SparseDelta.load(src)
    shapes = {rename(n): tuple(s) for n, s in {**d.shapes, **(shapes or {})}.items()}
    SparseDelta({rename(n): e for n, e in d.entries.items()}, shapes, {**d.base, **base}).save(dst)
    return dst


def test_refuses_other_shapes_naming_the_tensor(adapter, load_tiny, tiny_dir, tmp_path):
    wider = _variant(adapter.delta, tmp_path / "wider.safetensors", shapes={Q_PROJ: (128, 64)})
    with pytest.raises(ValueError, match=rf"{Q_PROJ} has shape \(128, 64\) in the delta but \(64, 64\)"):
        apply_delta(load_tiny(), wider)
    with pytest.raises(ValueError, match=rf"{Q_PROJ} has shape \(128, 64\)"):
        merge_checkpoint(tiny_dir, wider, tmp_path / "out")
    foreign = _variant(adapter.delta, tmp_path / "foreign.safetensors", rename=lambda n: n.replace(".1.", ".7."))
    with pytest.raises(ValueError, match=r"has no tensor model\.layers\.7\."):
        apply_delta(load_tiny(), foreign)
    assert not (tmp_path / "out").exists()


def test_refuses_other_fingerprint_unless_forced(adapter, load_tiny, tiny_dir, tmp_path):
    other = _variant(adapter.delta, tmp_path / "other.safetensors", base_fingerprint="0" * 64, base_layout="1")
    with pytest.raises(ValueError, match="another base.*names or shapes differ.*force=True"):
        apply_delta(load_tiny(), other)
    with pytest.raises(ValueError, match="another base"):
        merge_checkpoint(tiny_dir, other, tmp_path / "out")
    model = load_tiny()
    with pytest.warns(UserWarning, match="another base"):
        assert apply_delta(model, other, force=True)["fingerprint"] == "forced"
    assert all(torch.equal(t, adapter.state[n]) for n, t in model.state_dict().items())
    with pytest.warns(UserWarning, match="another base"):
        assert merge_checkpoint(tiny_dir, other, tmp_path / "out", force=True)["fingerprint"] == "forced"


@pytest.mark.parametrize("sharded", [False, True])
def test_merge_checkpoint_loads_and_matches_merged_model(adapter, tiny_dir, tmp_path, sharded):
    base = tiny_dir
    if sharded:
        base = tmp_path / "sharded"
        model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
        model.save_pretrained(base, max_shard_size="40KB")
        AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(base)
        assert len(list(base.glob("*.safetensors"))) > 2
        assert base_fingerprint(base) == base_fingerprint(tiny_dir)
    out = tmp_path / "merged"
    report = merge_checkpoint(base, adapter.delta, out)
    assert report["tensors"] == 14 and report["fingerprint"] == "match"
    assert report["shards"] == len(list(Path(base).glob("*.safetensors")))
    expected = {f.name for f in Path(base).iterdir()}
    assert {f.name for f in out.iterdir()} == expected  # weights, index, config, tokenizer, generation config
    if sharded:
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"].values()) == {f.name for f in out.glob("*.safetensors")}
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert all(torch.equal(t, adapter.state[n]) for n, t in merged.state_dict().items())
    torch.testing.assert_close(logits(merged), adapter.logits, rtol=1e-6, atol=1e-6)
    assert AutoTokenizer.from_pretrained(out)("ab")["input_ids"]
    with pytest.raises(FileExistsError, match="not empty"):
        merge_checkpoint(base, adapter.delta, out)


def test_merge_checkpoint_output_is_as_readable_as_a_plain_mkdir(adapter, tiny_dir, tmp_path):
    merge_checkpoint(tiny_dir, adapter.delta, tmp_path / "merged")
    (tmp_path / "plain").mkdir()
    assert (tmp_path / "merged").stat().st_mode == (tmp_path / "plain").stat().st_mode


def test_merge_checkpoint_is_atomic(adapter, tiny_dir, tmp_path, monkeypatch):
    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(export, "_merge_shard", fail)
    with pytest.raises(OSError, match="disk full"):
        merge_checkpoint(tiny_dir, adapter.delta, tmp_path / "merged")
    assert list(tmp_path.iterdir()) == []


def test_truncated_or_foreign_delta_is_a_clear_error(adapter, load_tiny, tmp_path):
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(adapter.delta.read_bytes()[: adapter.delta.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated"):
        apply_delta(load_tiny(), cut)
    with pytest.raises(ValueError, match="not a peft-isolate sparse-delta file"):
        SparseDelta.load(adapter.dir / "adapter_model.safetensors")
    with pytest.raises(IsADirectoryError, match="is a directory"):
        SparseDelta.load(adapter.dir)


@pytest.mark.parametrize(
    ("shapes", "values", "message"),
    [
        (None, [1.0], "header's `shapes` is missing"),
        ('{"w": 8}', [1.0], "header's `shapes` is missing or not"),
        ("{not json", [1.0], "header's `shapes` is missing or not"),
        ('{"w": [2, 4]}', [float("nan")], "w.values holds NaN or inf"),
    ],
)
def test_bad_delta_header_or_values_is_a_clear_error(tmp_path, shapes, values, message):
    from safetensors.torch import save_file

    meta = {"format": "peft-isolate/sparse-delta", "version": "1", **({"shapes": shapes} if shapes else {})}
    path = tmp_path / "bad.safetensors"
    save_file({"w.indices": torch.tensor([3], dtype=torch.int32), "w.values": torch.tensor(values)}, path, meta)
    with pytest.raises(ValueError, match=message):
        SparseDelta.load(path)


# ---------------------------------------------------------------------------------------------- compose

SHAPES = {"w": (2, 4), "v": (3,)}


def _delta(path: Path, fingerprint: str = "f" * 64, **parts: tuple[list[int], list[float]]) -> Path:
    entries = {n: (torch.tensor(i), torch.tensor(v)) for n, (i, v) in parts.items()}
    base = {"base_fingerprint": fingerprint, "base_layout": "l", "base_quantization": "none"}
    SparseDelta(entries, {n: SHAPES[n] for n in parts}, base).save(path)
    return path


def _read(path: Path) -> dict[str, tuple[list[int], list[float]]]:
    return {n: (i.tolist(), v.tolist()) for n, (i, v) in SparseDelta.load(path).entries.items()}


def test_compose_disjoint_adds_exactly(tmp_path):
    a = _delta(tmp_path / "a.safetensors", w=([0, 2], [1.5, -2.0]))
    b = _delta(tmp_path / "b.safetensors", w=([1, 5], [0.1, 3.0]), v=([2], [7.0]))
    report = compose_deltas([a, b], tmp_path / "ab.safetensors")
    assert report["overlapping_entries"] == 0 and report["entries"] == 5
    out = SparseDelta.load(tmp_path / "ab.safetensors")
    assert torch.equal(out.entries["w"][0], torch.tensor([0, 1, 2, 5]))
    assert torch.equal(out.entries["w"][1], torch.tensor([1.5, 0.1, -2.0, 3.0]))  # bit-exact fp32
    assert _read(tmp_path / "ab.safetensors")["v"] == ([2], [7.0])
    assert out.shapes == SHAPES and out.base["base_fingerprint"] == "f" * 64


def test_compose_overlap_needs_a_rule(tmp_path):
    a = _delta(tmp_path / "a.safetensors", w=([0, 1, 2], [1.0, -3.0, 0.5]))
    b = _delta(tmp_path / "b.safetensors", w=([1, 2, 3], [2.0, 0.25, -1.0]))
    with pytest.raises(ValueError, match="overlap at 2 entries of w: name a rule"):
        compose_deltas([a, b], tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()
    compose_deltas([a, b], tmp_path / "sum.safetensors", rule="sum", weights=[1.0, 0.5])
    assert _read(tmp_path / "sum.safetensors")["w"] == ([0, 1, 2, 3], [1.0, -2.0, 0.625, -0.5])
    # TIES, density 0.5 of the 4-entry union: a keeps {0: 1, 1: -3}, b keeps {1: 2, 3: -1}; the elected sign at
    # entry 1 is minus (-3 + 2 < 0), so b's +2 drops out; entry 2 was pruned from both
    report = compose_deltas([a, b], tmp_path / "ties.safetensors", rule="ties", density=0.5)
    assert report["overlapping_entries"] == 2
    assert _read(tmp_path / "ties.safetensors")["w"] == ([0, 1, 2, 3], [1.0, -3.0, 0.0, -1.0])
    compose_deltas([a, b], tmp_path / "d1.safetensors", rule="dare_ties", density=0.5, seed=3)
    compose_deltas([a, b], tmp_path / "d2.safetensors", rule="dare_ties", density=0.5, seed=3)
    assert _read(tmp_path / "d1.safetensors") == _read(tmp_path / "d2.safetensors")


def test_compose_refusals(tmp_path):
    a = _delta(tmp_path / "a.safetensors", w=([0], [1.0]))
    b = _delta(tmp_path / "b.safetensors", fingerprint="0" * 64, w=([1], [1.0]))
    with pytest.raises(ValueError, match="different bases"):
        compose_deltas([a, b], tmp_path / "out.safetensors")
    with pytest.raises(ValueError, match="needs density"):
        compose_deltas([a, a], tmp_path / "out.safetensors", rule="ties")
    for density in (0.0, 1.5):  # DARE rescales by 1 / density: 0 wrote an all-NaN delta
        with pytest.raises(ValueError, match=r"in \(0, 1\], got"):
            compose_deltas([a, a], tmp_path / "out.safetensors", rule="dare_ties", density=density)
    with pytest.raises(ValueError, match="unknown compose rule 'mean'.*'sum'"):
        compose_deltas([a, a], tmp_path / "out.safetensors", rule="mean")
    with pytest.raises(ValueError, match="2 weights for 1 deltas"):
        compose_deltas([a], tmp_path / "out.safetensors", weights=[1.0, 2.0])
    assert not (tmp_path / "out.safetensors").exists()
