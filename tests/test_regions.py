"""Core regions: exact top-p selection, every delta source, set algebra, errors and the `regions` CLI."""

from __future__ import annotations

import copy
import math
import random
import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from tiny import tiny_llama
from transformers import LlamaForCausalLM

from peft_isolate import IsolationConfig
from peft_isolate.cli import main
from peft_isolate.plan import expected_jaccard, jaccard, overlap_matrix
from peft_isolate.regions import CoreRegions, canonical_order, core_count
from peft_isolate.selection import SCOPES, find_core_regions, layer_of
from peft_isolate.sources import CheckpointDelta, IsolationDelta, LoraDelta, ModelDelta


def tiny_model(seed: int = 0, hidden: int = 32) -> LlamaForCausalLM:
    return tiny_llama(seed=seed, hidden_size=hidden)[0]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A base model and a 'fine-tuned' copy (every parameter moved), both also saved; tuned is sharded."""
    root = tmp_path_factory.mktemp("pair")
    base = tiny_model()
    tuned = copy.deepcopy(base)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.01)
    base.save_pretrained(root / "base")
    tuned.save_pretrained(root / "tuned", max_shard_size="40KB")
    assert (root / "tuned" / "model.safetensors.index.json").is_file()
    return base, tuned, root / "base", root / "tuned"


def brute_force(deltas: dict[str, torch.Tensor], p: float, scope: str) -> dict[str, torch.Tensor]:
    """Top floor(p*D) per group by (-|delta|, name order, flat index), by sorting every entry."""
    groups: dict[str, list[str]] = {}
    for n in canonical_order(deltas):
        groups.setdefault("" if scope == "global" else layer_of(n) if scope == "layer" else n, []).append(n)
    out: dict[str, list[int]] = {n: [] for n in deltas}
    for names in groups.values():
        items = [
            (-v, rank, i, n) for rank, n in enumerate(names) for i, v in enumerate(deltas[n].abs().reshape(-1).tolist())
        ]
        for _, _, i, n in sorted(items)[: core_count(p, len(items))]:
            out[n].append(i)
    return {n: torch.tensor(sorted(v), dtype=torch.int32) for n, v in out.items()}


@pytest.mark.parametrize("case", range(40))
def test_exact_count_and_tie_break_against_brute_force(case):
    rng = random.Random(case)
    names = [f"model.layers.{i}.{m}.weight" for i in range(rng.randint(1, 3)) for m in "ab"]
    names += ["lm_head.weight", "model.norm.weight"]
    g = torch.Generator().manual_seed(case)
    levels = rng.choice([2, 3, 50])  # few levels: many ties
    tuned = {
        n: torch.randint(0, levels, (rng.randint(0, 5), rng.randint(1, 6)), generator=g).float() * 0.5 for n in names
    }
    base = {n: torch.zeros_like(t) for n, t in tuned.items()}
    p, scope = rng.choice([0.01, 0.07, 0.1, 0.29, 0.5, 1.0]), rng.choice(SCOPES)
    expected = brute_force(tuned, p, scope)
    chunk = rng.choice([1, 2, 7, 1000])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if not any(i.numel() for i in expected.values()):  # a p that keeps no entry anywhere is refused
            with pytest.raises(ValueError, match="keeps no entry"):
                find_core_regions(ModelDelta(base, tuned), p=p, scope=scope, chunk_size=chunk)
            return
        got = find_core_regions(ModelDelta(base, tuned), p=p, scope=scope, chunk_size=chunk)
    for n in names:
        assert torch.equal(got[n], expected[n]), n
    if scope == "global":
        assert got.size == math.floor(p * sum(t.numel() for t in tuned.values()) + 1e-9)


def test_ties_follow_natural_parameter_order():
    tuned = {"model.layers.10.w.weight": torch.ones(10), "model.layers.2.w.weight": torch.ones(10)}
    base = {n: torch.zeros(10) for n in tuned}
    got = find_core_regions(ModelDelta(base, tuned), p=0.5, chunk_size=3)
    assert got["model.layers.2.w.weight"].tolist() == list(range(10))
    assert got["model.layers.10.w.weight"].numel() == 0
    assert core_count(0.29, 100) == 29  # exact decimal floor, not 28.999...


def test_global_and_layer_and_matrix_scope_on_a_known_delta():
    # layer 0 moves a lot, layer 1 a little; inside each, entry i moves by (i + 1) * scale
    tuned = {
        f"model.layers.{layer}.{m}.weight": (torch.arange(8, dtype=torch.float32) + 1 + (8 if m == "b" else 0)) * s
        for layer, s in ((0, 10.0), (1, 0.01))
        for m in "ab"
    }
    base = {n: torch.zeros(8) for n in tuned}
    src = ModelDelta(base, tuned)
    a0, b0, a1, b1 = (f"model.layers.{i}.{m}.weight" for i in (0, 1) for m in "ab")
    glob = find_core_regions(src, p=0.125, scope="global")  # 4 of 32: the 4 largest of layer 0 (its b)
    assert glob[b0].tolist() == [4, 5, 6, 7] and glob.size == 4
    layer = find_core_regions(src, p=0.125, scope="layer")  # 2 of 16 per layer: the top of each b
    assert layer[b0].tolist() == [6, 7] and layer[b1].tolist() == [6, 7] and layer.size == 4
    matrix = find_core_regions(src, p=0.25, scope="matrix")  # 2 of 8 per matrix
    assert all(matrix[n].tolist() == [6, 7] for n in (a0, b0, a1, b1))
    assert layer_of("model.layers.3.mlp.up_proj.weight") == "model.layers.3"
    assert layer_of("lm_head.weight") == "lm_head.weight"


def test_unchanged_entries_fill_up_with_a_warning():
    base = {"w": torch.zeros(10)}
    tuned = {"w": torch.tensor([0, 0, 3.0, 0, 0, 0, 0, 0, 0, 0])}
    with pytest.warns(UserWarning, match="zero delta"):
        got = find_core_regions(ModelDelta(base, tuned), p=0.3)
    assert got["w"].tolist() == [0, 1, 2]


def test_checkpoint_dirs_match_in_memory_models_and_brute_force(pair):
    base, tuned, base_dir, tuned_dir = pair
    from_disk = find_core_regions(CheckpointDelta(base_dir, tuned_dir), p=0.01, chunk_size=100)
    in_memory = find_core_regions(ModelDelta(base, tuned), p=0.01)
    assert from_disk == in_memory
    deltas = {n: t.detach() - base.state_dict()[n] for n, t in tuned.named_parameters()}
    expected = brute_force(deltas, 0.01, "global")
    assert all(torch.equal(from_disk[n], expected[n]) for n in deltas)
    assert from_disk.size == int(0.01 * sum(t.numel() for t in deltas.values()))
    name = "model.layers.1.mlp.up_proj.weight"
    assert torch.allclose(CheckpointDelta(base_dir, tuned_dir).delta(name), deltas[name], atol=1e-7)
    in_memory_with_state = ModelDelta({n: p.clone() for n, p in base.named_parameters()}, tuned)
    assert find_core_regions(in_memory_with_state, p=0.01) == in_memory


def test_a_bf16_fine_tune_of_an_fp32_base_has_exactly_its_update_as_delta():
    """Trained in bf16 (as on a GPU) from an fp32 checkpoint: the delta is the update, not the base's rounding."""
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(64, 64, generator=g)}
    tuned = {"w": base["w"].to(torch.bfloat16)}
    tuned["w"].view(-1)[[3, 77, 500]] += torch.tensor([0.5, -0.25, 1.0], dtype=torch.bfloat16)
    delta = ModelDelta(base, tuned).delta("w")
    assert torch.equal(torch.nonzero(delta.flatten()).flatten(), torch.tensor([3, 77, 500]))
    assert find_core_regions(ModelDelta(base, tuned), p=3 / 4096)["w"].tolist() == [3, 77, 500]


def test_lora_regions_equal_regions_of_the_merged_weights(pair, tmp_path):
    base, _, base_dir, _ = pair
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"v_proj": 2},
        alpha_pattern={"down_proj": 32},
        init_lora_weights=False,
    )
    peft_model = get_peft_model(copy.deepcopy(base), config)
    peft_model.save_pretrained(tmp_path / "lora")
    peft_model.merge_and_unload().save_pretrained(tmp_path / "merged")
    source = LoraDelta(tmp_path / "lora", base=base_dir)
    names = list(source.shapes())
    assert len(names) == 6 and all(n.startswith("model.layers.") for n in names)
    merged = CheckpointDelta(base_dir, tmp_path / "merged")
    for name in names:
        assert torch.allclose(source.delta(name), merged.delta(name), atol=1e-6), name
    assert find_core_regions(source, p=0.05) == find_core_regions(merged, p=0.05, names=names)
    assert find_core_regions(source, p=0.05, chunk_size=40) == find_core_regions(source, p=0.05)


def test_isolation_adapter_delta_from_a_hand_built_file(pair, tmp_path):
    base, _, base_dir, _ = pair
    q, down = "model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"
    g = torch.Generator().manual_seed(3)
    parts = {}
    expected = {}
    for module in (q, down):
        numel = base.get_submodule(module).weight.numel()
        support = torch.randperm(numel, generator=g)[:60].sort().values
        trainable, frozen = support[::2], support[1::2]
        values, frozen_values = torch.randn(30, generator=g), torch.randn(30, generator=g)
        key = f"base_model.model.{module}"
        parts[f"{key}.isolation_indices"] = trainable.to(torch.int32)
        parts[f"{key}.isolation_values"] = values
        parts[f"{key}.isolation_frozen_indices"] = frozen.to(torch.int32)
        parts[f"{key}.isolation_frozen_values"] = frozen_values
        parts[f"{key}.isolation_frozen_locked"] = torch.ones(30, dtype=torch.bool)
        dense = torch.zeros(numel)
        dense[trainable], dense[frozen] = values, frozen_values
        expected[f"{module}.weight"] = dense.reshape(base.get_submodule(module).weight.shape)
    (tmp_path / "iso").mkdir()
    save_file(parts, str(tmp_path / "iso" / "adapter_model.safetensors"))
    source = IsolationDelta(tmp_path / "iso", base=base_dir)
    assert set(source.shapes()) == set(expected)
    assert source.support_size == 120  # trainable and frozen entries of both modules
    for name, dense in expected.items():
        assert torch.equal(source.delta(name), dense)
    zeros = {n: torch.zeros_like(d) for n, d in expected.items()}
    got = find_core_regions(source, p=0.02, chunk_size=50)
    assert got == find_core_regions(ModelDelta(zeros, expected), p=0.02)
    shapes_only = IsolationDelta(tmp_path / "iso", base={n: tuple(d.shape) for n, d in expected.items()})
    assert find_core_regions(shapes_only, p=0.02) == got
    with pytest.raises(ValueError, match="does not match its base model.*pass the base"):
        IsolationDelta(tmp_path / "iso", base={n: (2, 2) for n in expected})


def test_base_and_tuned_with_different_names_or_shapes_fail_clearly(pair, tmp_path):
    _, tuned, base_dir, _ = pair
    state = {n: t.detach().clone() for n, t in tuned.state_dict().items()}
    save_file({**state, "extra.weight": torch.zeros(3)}, str(tmp_path / "extra.safetensors"))
    with pytest.raises(ValueError, match=r"names differ.*only in tuned.*extra\.weight.*pass the checkpoint"):
        CheckpointDelta(base_dir, tmp_path / "extra.safetensors")
    tiny_model(hidden=48).save_pretrained(tmp_path / "wide")
    with pytest.raises(ValueError, match="shapes differ.*pass the checkpoint the tuned model was trained from"):
        CheckpointDelta(base_dir, tmp_path / "wide")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors weights"):
        CheckpointDelta(base_dir, tmp_path / "empty")


@pytest.mark.parametrize("p", [0, -0.1, 1.5, float("nan"), True])
def test_p_outside_the_unit_interval_is_rejected(pair, p):
    base, tuned, _, _ = pair
    with pytest.raises(ValueError, match=r"outside \(0, 1\].*p=0.01"):
        find_core_regions(ModelDelta(base, tuned), p=p)


def test_lora_adapter_on_another_base_is_rejected(pair, tmp_path):
    base, _, _, _ = pair
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["q_proj"]))
    peft_model.save_pretrained(tmp_path / "lora")
    tiny_model(hidden=48).save_pretrained(tmp_path / "wide")
    with pytest.raises(ValueError, match="does not match its base model: 2 shapes differ.*pass the base"):
        LoraDelta(tmp_path / "lora", base=tmp_path / "wide")
    with pytest.raises(ValueError, match="not in the base"):
        LoraDelta(tmp_path / "lora", base={"other.weight": (2, 2)})
    with pytest.raises(ValueError, match="is a LORA adapter, not ISOLATION: pass a LoRA adapter as --lora"):
        IsolationDelta(tmp_path / "lora", base=tmp_path / "wide")


def test_isolation_adapter_with_modules_to_save_names_what_a_sparse_delta_cannot_hold(pair, tmp_path):
    base, _, _, _ = pair
    config = IsolationConfig(target_modules=["q_proj"], density=0.1, modules_to_save=["lm_head"])
    get_peft_model(copy.deepcopy(base), config).save_pretrained(tmp_path / "iso")
    with pytest.raises(ValueError, match="lm_head.* a whole module \\(modules_to_save\\).*merge_and_unload"):
        IsolationDelta(tmp_path / "iso", base=base)


def random_regions(seed: int, shapes: dict[str, tuple[int, ...]], density: float) -> CoreRegions:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n, s in shapes.items():
        numel = math.prod(s)
        out[n] = torch.randperm(numel, generator=g)[: int(density * numel)].sort().values.to(torch.int32)
    return CoreRegions(out, shapes, p=density, scope="global", source=f"random {seed}")


SHAPES = {"a.weight": (40, 30), "b.weight": (50,), "c.weight": (7, 3)}


def as_set(r: CoreRegions) -> set[tuple[str, int]]:
    return {(n, int(i)) for n, idx in r.items() for i in idx}


def test_set_algebra_and_jaccard_against_python_sets():
    a, b = random_regions(0, SHAPES, 0.3), random_regions(1, SHAPES, 0.2)
    sa, sb = as_set(a), as_set(b)
    assert as_set(a.union(b)) == sa | sb
    assert as_set(a.intersection(b)) == sa & sb
    assert as_set(a.difference(b)) == sa - sb
    assert a.union(b).size == len(sa | sb) and a.size == len(sa)
    assert jaccard(a, b) == pytest.approx(len(sa & sb) / len(sa | sb))
    assert jaccard(a, a) == 1.0
    m = overlap_matrix({"a": a, "b": b, "c": random_regions(2, SHAPES, 0.1)})
    assert torch.equal(m, m.T) and m[0, 1] == pytest.approx(jaccard(a, b))
    other = CoreRegions({}, {"a.weight": (3, 3)})
    with pytest.raises(ValueError, match="different models"):
        a.union(other)


def test_expected_jaccard_is_the_exact_hypergeometric_mean():
    total, size_a, size_b = 30, 7, 12
    exact = sum(
        math.comb(size_a, k)
        * math.comb(total - size_a, size_b - k)
        / math.comb(total, size_b)
        * k
        / (size_a + size_b - k)
        for k in range(0, min(size_a, size_b) + 1)
    )
    assert expected_jaccard(size_a, size_b, total) == pytest.approx(exact, rel=1e-9)
    big = expected_jaccard(10**7, 10**7, 10**9)  # 1% regions of 1e9 parameters: chance ~ 0.005
    assert big == pytest.approx(0.01 / 1.99, rel=1e-4)
    assert expected_jaccard(0, 0, 10) == 0.0


def test_core_regions_round_trip_and_validation(tmp_path):
    a = random_regions(0, SHAPES, 0.3)
    a.save(tmp_path / "a.safetensors")
    back = CoreRegions.load(tmp_path / "a.safetensors")
    assert back == a and back.p == 0.3 and back.scope == "global" and back.source == "random 0"
    assert back.shapes == SHAPES and list(back) == list(SHAPES)
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a core-regions file"):
        CoreRegions.load(tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="unsorted or duplicated"):
        CoreRegions({"b.weight": torch.tensor([3, 1], dtype=torch.int32)}, {"b.weight": (5,)})
    # any integer dtype is taken (arange, nonzero and topk give int64) and stored as int32, if its values fit
    wide = CoreRegions({"b.weight": torch.tensor([1, 3])}, {"b.weight": (5,)})
    assert wide["b.weight"].dtype == torch.int32 and wide["b.weight"].tolist() == [1, 3]
    with pytest.raises(ValueError, match="out of range"):  # 2**32 + 1 would wrap to 1 in int32
        CoreRegions({"b.weight": torch.tensor([0, 2**32 + 1])}, {"b.weight": (5,)})
    with pytest.raises(ValueError, match="int32"):
        CoreRegions({"b.weight": torch.tensor([1.0, 3.0])}, {"b.weight": (5,)})


def test_regions_cli_for_each_source(pair, tmp_path, capsys):
    base, tuned, base_dir, tuned_dir = pair
    out = tmp_path / "cores" / "math.safetensors"
    assert main(["regions", "--base", str(base_dir), "--tuned", str(tuned_dir), "--p", "0.01", "--out", str(out)]) == 0
    assert CoreRegions.load(out) == find_core_regions(ModelDelta(base, tuned), p=0.01)
    assert "entries" in capsys.readouterr().out
    peft_model = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
    )
    peft_model.save_pretrained(tmp_path / "lora")
    main(["regions", "--lora", str(tmp_path / "lora"), "--scope", "matrix", "--out", str(tmp_path / "l.safetensors")])
    lora = CoreRegions.load(tmp_path / "l.safetensors")
    assert lora.scope == "matrix" and all(v.numel() == 10 for v in lora.values())
    include = ["--include", r"mlp\.up_proj", "--out", str(tmp_path / "u.safetensors")]
    main(["regions", "--base", str(base_dir), "--tuned", str(tuned_dir), *include])
    assert set(CoreRegions.load(tmp_path / "u.safetensors")) == {f"model.layers.{i}.mlp.up_proj.weight" for i in (0, 1)}
    with pytest.raises(SystemExit) as e:
        main(["regions", "--tuned", str(tuned_dir), "--out", str(out)])
    assert e.value.code == 2 and "--tuned needs --base" in capsys.readouterr().err


def test_isolation_adapter_saved_by_the_tuner(pair, tmp_path):
    base, _, base_dir, _ = pair
    config = IsolationConfig(target_modules=["q_proj", "down_proj"], density=0.1, init_weights=False)
    peft_model = get_peft_model(copy.deepcopy(base), config)
    peft_model.save_pretrained(tmp_path / "iso")
    merged = peft_model.merge_and_unload()
    source = IsolationDelta(tmp_path / "iso", base=base_dir)
    names = list(source.shapes())
    assert len(names) == 4
    for name in names:
        assert torch.allclose(source.delta(name), merged.state_dict()[name] - base.state_dict()[name], atol=1e-6)
    assert find_core_regions(source, p=0.05) == find_core_regions(ModelDelta(base, merged), p=0.05, names=names)
