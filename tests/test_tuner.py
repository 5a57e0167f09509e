"""The isolation tuner on a tiny random Llama in full precision, nf4 and int8: the peft tuner contract."""

from __future__ import annotations

import contextlib
import copy
import gc
import weakref

import pytest
import torch
from peft import AutoPeftModelForCausalLM, PeftModel, get_peft_model
from peft.utils.peft_types import PeftType

import peft_isolate
from peft_isolate import IsolationConfig
from peft_isolate.tuner.layer import IsolationLayer, dequantized_weight

KINDS = ["fp32", "nf4", "int8"]
# supports of single entries, and of whole units (the structured fast path: tests/test_fast_path.py)
GRANULARITIES = {"element": {}, "row": {"granularity": "row"}, "column": {"granularity": "column"}}
GRANULARITIES["block16"] = {"granularity": "block", "block": 16}
TOKENS = torch.randint(3, 200, (2, 11), generator=torch.Generator().manual_seed(0))


def layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, IsolationLayer)}


def logits(model, tokens=TOKENS):
    with torch.no_grad():
        return model(tokens).logits


def train_steps(model, steps=3, lr=1e-2, weight_decay=0.1):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        loss = model(TOKENS, labels=TOKENS).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return opt


def test_registration_is_idempotent_and_enum_member_exists():
    assert PeftType.ISOLATION == "ISOLATION" and PeftType("ISOLATION") is PeftType.ISOLATION
    peft_isolate.tuner.register()
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING

    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.ISOLATION] is IsolationConfig
    assert PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.ISOLATION] == "isolation_"


@pytest.mark.parametrize("kind", KINDS)
def test_zero_values_equal_base_exactly(load_tiny, kind):
    model = load_tiny(kind)
    ref = logits(model)
    peft_model = get_peft_model(model, IsolationConfig(target_modules="all-linear", density=0.05))
    assert torch.equal(logits(peft_model), ref)


@pytest.mark.parametrize("kind", KINDS)
def test_only_sparse_values_train(load_tiny, kind):
    model = load_tiny(kind)
    peft_model = get_peft_model(model, IsolationConfig(target_modules="all-linear", density=0.05))
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all(".isolation_values." in n for n in trainable)
    opt = train_steps(peft_model)
    with_grad = {n for n, p in peft_model.named_parameters() if p.grad is not None}
    assert with_grad <= trainable
    state_ids = set(opt.state)
    assert state_ids == {p for p in peft_model.parameters() if p.requires_grad}
    layer = next(iter(layers(peft_model).values()))
    k = layer.isolation_indices["default"].numel()
    assert k == int(0.05 * layer.in_features * layer.out_features)
    assert layer.isolation_values["default"].dtype == torch.float32
    assert layer.isolation_indices["default"].dtype == torch.int32


def _stage_model(load_tiny, kind, granularity="element"):
    """An adapter with trained values, then a third of each support locked and a third held (holes in each unit of
    a structured support)."""
    model = load_tiny(kind)
    config = IsolationConfig(target_modules="all-linear", density=0.1, init_weights=False, **GRANULARITIES[granularity])
    peft_model = get_peft_model(model, config)
    lock, keep = {}, {}
    for name, layer in layers(peft_model.base_model.model).items():
        idx = layer.isolation_indices["default"]
        lock[f"{name}.weight"] = idx[0::3]
        keep[f"{name}.weight"] = idx[1::3]
    peft_model.base_model.lock(lock)
    peft_model.base_model.hold()
    peft_model.base_model.add_trainable(keep)
    return peft_model


def _locked_effective_weights(peft_model):
    """The effective weight (base + delta) at every frozen entry, from a merged copy."""
    merged = copy.deepcopy(peft_model).merge_and_unload()
    out = {}
    for name, layer in layers(peft_model.base_model.model).items():
        module = merged.get_submodule(name)
        frozen = layer.isolation_frozen_indices["default"].long()
        out[name] = dequantized_weight(module).flatten()[frozen].clone()
    return out


@pytest.mark.parametrize("kind", ["fp32", "nf4"])
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_frozen_values_bit_identical_after_adamw_with_weight_decay(load_tiny, kind, granularity):
    peft_model = _stage_model(load_tiny, kind, granularity)
    before = {
        n: (layer.isolation_frozen_values["default"].clone(), layer.isolation_values["default"].detach().clone())
        for n, layer in layers(peft_model).items()
    }
    eff_before = _locked_effective_weights(peft_model) if kind == "fp32" else None
    train_steps(peft_model, steps=3, lr=1e-2, weight_decay=0.5)
    moved = 0
    for name, layer in layers(peft_model).items():
        assert torch.equal(layer.isolation_frozen_values["default"], before[name][0])
        moved += int((layer.isolation_values["default"].detach() != before[name][1]).sum())
    assert moved > 0
    if kind == "fp32":
        eff_after = _locked_effective_weights(peft_model)
        assert all(torch.equal(eff_before[n], eff_after[n]) for n in eff_before)


def test_stage_operations_move_entries_between_parts(load_tiny):
    peft_model = _stage_model(load_tiny, "fp32")
    for layer in layers(peft_model).values():
        locked = layer.isolation_frozen_locked["default"]
        assert locked.sum() > 0 and (~locked).sum() > 0  # locked and held entries present
        support = torch.cat([layer.isolation_indices["default"], layer.isolation_frozen_indices["default"]])
        assert support.unique().numel() == support.numel()
    name, layer = next(iter(layers(peft_model.base_model.model).items()))
    locked_entry = layer.isolation_frozen_indices["default"][layer.isolation_frozen_locked["default"]][:1]
    with pytest.raises(ValueError, match="locked"):
        peft_model.base_model.add_trainable({f"{name}.weight": locked_entry})
    held = layer.isolation_frozen_indices["default"][~layer.isolation_frozen_locked["default"]][:2]
    held_values = layer.isolation_frozen_values["default"][~layer.isolation_frozen_locked["default"]][:2].clone()
    peft_model.base_model.add_trainable({f"{name}.weight": held})
    where = torch.isin(layer.isolation_indices["default"], held)
    assert torch.equal(layer.isolation_values["default"].detach()[where], held_values)
    given = torch.tensor([0.5, -0.5])
    fresh = torch.tensor([0, 1], dtype=torch.int32)
    fresh = fresh[
        ~torch.isin(fresh, torch.cat([layer.isolation_indices["default"], layer.isolation_frozen_indices["default"]]))
    ]
    peft_model.base_model.add_trainable({f"{name}.weight": fresh}, values={f"{name}.weight": given[: fresh.numel()]})
    where = torch.isin(layer.isolation_indices["default"], fresh)
    assert torch.equal(layer.isolation_values["default"].detach()[where], given[: fresh.numel()])


def _dense_reference_grads(layer, x, grad_out):
    """Gradient of a dense W = base + delta at the support, by plain autograd."""
    w = (dequantized_weight(layer.get_base_layer()).float() + layer.get_delta_weight("default")).requires_grad_()
    y = x @ w.T
    y.backward(grad_out)
    return w.grad.flatten()[layer.isolation_indices["default"].long()], y


@pytest.mark.parametrize("kind", KINDS)  # int8 takes the inference (CSR) product in training too
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_value_gradient_is_dense_weight_gradient_at_indices(load_tiny, kind, granularity):
    peft_model = _stage_model(load_tiny, kind, granularity)
    layer = peft_model.base_model.model.model.layers[0].mlp.down_proj
    assert (layer.delta_pattern("default").cover is None) == (granularity == "element")
    x = torch.randn(3, 5, layer.in_features)
    grad_out = torch.randn(3, 5, layer.out_features)
    y = layer(x)
    y.backward(grad_out)
    ref_grad, ref_y = _dense_reference_grads(layer, x.detach(), grad_out)
    torch.testing.assert_close(layer.isolation_values["default"].grad, ref_grad, rtol=1e-4, atol=1e-5)
    if kind == "fp32":
        torch.testing.assert_close(y, ref_y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_merged_forward_equals_unmerged(load_tiny, kind):
    model = load_tiny(kind)
    base_ref = logits(model)
    peft_model = get_peft_model(model, IsolationConfig(target_modules="all-linear", density=0.1, init_weights=False))
    unmerged = logits(peft_model)
    assert not torch.equal(unmerged, base_ref)
    with pytest.warns(UserWarning, match="rounds") if kind != "fp32" else contextlib.nullcontext():
        peft_model.merge_adapter()
    merged = logits(peft_model)
    if kind == "fp32":
        torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
    else:
        # requantizing the merged weight costs one more rounding of the base: bound it by the base's own error
        quant_error = (logits(load_tiny("fp32")) - base_ref).abs().max()
        assert (merged - unmerged).abs().max() <= 2 * quant_error
    peft_model.unmerge_adapter()
    if kind == "fp32":
        torch.testing.assert_close(logits(peft_model), unmerged, rtol=1e-5, atol=1e-5)
        unloaded = peft_model.merge_and_unload()
        assert not any(isinstance(m, IsolationLayer) for m in unloaded.modules())
        torch.testing.assert_close(logits(unloaded), unmerged, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["fp32", "nf4"])
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_training_product_equals_inference_product(load_tiny, kind, granularity):
    """Training steps take the merged product (base and delta in one dense product), inference the base layer plus
    the CSR product: the same function, bit for bit against the merged model on a full-precision base."""
    peft_model = _stage_model(load_tiny, kind, granularity)
    layer = peft_model.base_model.model.model.layers[0].mlp.down_proj
    assert layer.isolation_frozen_indices["default"].numel() and layer.isolation_indices["default"].numel()
    x = torch.randn(3, 5, layer.in_features, requires_grad=True)
    training = layer(x)
    assert type(training.grad_fn).__name__ == "_MergedDeltaLinearBackward"
    with torch.no_grad():
        inference = layer(x)
    torch.testing.assert_close(training, inference, rtol=1e-5, atol=1e-6)
    if kind == "fp32":
        layer.merge()
        assert torch.equal(training, layer(x))


def test_base_with_an_accelerate_hook_keeps_its_forward(load_tiny):
    from accelerate.hooks import ModelHook, add_hook_to_module

    class Count(ModelHook):
        calls = 0

        def pre_forward(self, module, *args, **kwargs):
            Count.calls += 1
            return args, kwargs

    peft_model = _stage_model(load_tiny, "fp32")
    layer = peft_model.base_model.model.model.layers[0].mlp.down_proj
    add_hook_to_module(layer.base_layer, Count())
    y = layer(torch.randn(3, 5, layer.in_features, requires_grad=True))
    assert Count.calls == 1 and type(y.grad_fn).__name__ != "_MergedDeltaLinearBackward"


def test_per_sample_adapter_names_are_refused_not_ignored(load_tiny):
    peft_model = get_peft_model(load_tiny(), IsolationConfig(target_modules="all-linear", init_weights=False))
    with pytest.raises(ValueError, match="do not take adapter_names"):
        peft_model(TOKENS, adapter_names=["default", "__base__"])
    assert torch.equal(peft_model(TOKENS).logits, peft_model(TOKENS, adapter_names=None).logits)


def test_disable_unload_and_multiple_adapters(load_tiny):
    model = load_tiny("fp32")
    base_ref = logits(model)
    peft_model = get_peft_model(model, IsolationConfig(target_modules="all-linear", density=0.1, init_weights=False))
    first = logits(peft_model)
    with peft_model.disable_adapter():
        assert torch.equal(logits(peft_model), base_ref)
    peft_model.add_adapter("other", IsolationConfig(target_modules=["q_proj"], density=0.2, init_weights=False, seed=7))
    peft_model.set_adapter("other")
    other = logits(peft_model)
    assert not torch.equal(other, first)
    assert all(not p.requires_grad for n, p in peft_model.named_parameters() if ".default" in n)
    peft_model.set_adapter("default")
    assert torch.equal(logits(peft_model), first)
    peft_model.delete_adapter("other")
    assert all("other" not in n for n, _ in peft_model.named_parameters())
    assert torch.equal(peft_model.unload()(TOKENS).logits.detach(), base_ref)


@pytest.mark.parametrize("kind", ["fp32", "nf4"])
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_save_and_reload_bit_identical(load_tiny, tiny_dir, tmp_path, kind, granularity):
    peft_model = _stage_model(load_tiny, kind, granularity)
    train_steps(peft_model, steps=2)
    expected = logits(peft_model)
    peft_model.save_pretrained(tmp_path)
    saved = {n: t.clone() for n, t in peft_model.state_dict().items() if "isolation_" in n}
    reloaded = PeftModel.from_pretrained(load_tiny(kind), tmp_path, is_trainable=True)
    got = {n: t for n, t in reloaded.state_dict().items() if "isolation_" in n}
    assert saved.keys() == got.keys()
    assert all(torch.equal(saved[n], got[n]) and saved[n].dtype == got[n].dtype for n in saved)
    assert torch.equal(logits(reloaded), expected)
    assert {n for n, p in reloaded.named_parameters() if p.requires_grad} == {
        n for n, p in peft_model.named_parameters() if p.requires_grad
    }
    if kind == "fp32":
        auto = AutoPeftModelForCausalLM.from_pretrained(tmp_path)
        assert torch.equal(logits(auto), expected)


def _weights(peft_model):
    """(weight name, layer) of every isolation layer, named as regions name them."""
    return [(f"{n}.weight", layer) for n, layer in layers(peft_model.base_model.model).items()]


def _outside(layer, n, adapter="default"):
    """`n` flat positions of the layer's weight outside the adapter's support."""
    support = torch.cat([layer.isolation_indices[adapter], layer.isolation_frozen_indices[adapter]])
    free = torch.arange(layer.in_features * layer.out_features, dtype=torch.int32)
    return free[~torch.isin(free, support)][:n]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("autocast", [True, False], ids=["autocast", "no_autocast"])
def test_adapter_dtype_follows_autocast_adapter_dtype(tiny_dir, dtype, autocast):
    """Values are fp32 on a half-precision base by default; `autocast_adapter_dtype=False` keeps the base dtype, as
    LoRA does, for added adapters too and through the stage operations, which build new tensors; the adapter
    trains in that dtype (and merges: test_peft_contract.py)."""
    from transformers import AutoModelForCausalLM

    expected = torch.float32 if autocast else dtype
    cfg = IsolationConfig(target_modules="all-linear", density=0.1, init_weights=False)
    peft_model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=dtype), cfg, autocast_adapter_dtype=autocast
    )
    peft_model.add_adapter("other", cfg, autocast_adapter_dtype=autocast)

    def dtypes():
        return {p.dtype for n, p in peft_model.named_parameters() if "isolation_" in n}

    assert dtypes() == {expected}
    name, layer = next(iter(layers(peft_model.base_model.model).items()))
    support, free = layer.isolation_indices["default"], _outside(layer, 4)
    peft_model.base_model.lock({f"{name}.weight": torch.cat([support[:3], free[:2]]).sort().values})
    peft_model.base_model.hold()
    peft_model.base_model.add_trainable({f"{name}.weight": torch.cat([support[3:6], free[2:]]).sort().values})
    assert dtypes() == {expected}
    peft_model(TOKENS, labels=TOKENS).loss.backward()  # SGD: AdamW's eps of 1e-8 is zero in fp16
    torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2).step()
    assert dtypes() == {expected}


def test_frozen_values_never_require_grad_through_casts_and_loads(tiny_dir, tmp_path):
    """Held and locked values are parameters that never require grad, also after peft upcasts a bf16 adapter
    loaded with `low_cpu_mem_usage` (it rewraps each value, which a ParameterDict would make trainable)."""
    from transformers import AutoModelForCausalLM

    def load_bf16():
        return AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.bfloat16)

    cfg = IsolationConfig(target_modules="all-linear", density=0.1, init_weights=False)
    peft_model = get_peft_model(load_bf16(), cfg, autocast_adapter_dtype=False)
    peft_model.base_model.lock({n: layer.isolation_indices["default"][::2] for n, layer in _weights(peft_model)})
    peft_model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(load_bf16(), tmp_path, is_trainable=True, low_cpu_mem_usage=True)
    frozen = [p for n, p in reloaded.named_parameters() if "isolation_frozen_values" in n]
    trained = [p for n, p in reloaded.named_parameters() if "isolation_values" in n]
    assert frozen and all(p.dtype == torch.float32 and not p.requires_grad for p in frozen)
    assert all(p.dtype == torch.float32 and p.requires_grad for p in trained)


def test_trainable_count_counts_each_support_entry_once(load_tiny):
    """peft's "all params" is the base plus every entry of the support: held and locked values are parameters that
    never require grad, so moving entries between the parts leaves it as it was, and entries joining the support
    raise it by their number."""
    model = load_tiny()
    base = sum(p.numel() for p in model.parameters())
    peft_model = get_peft_model(model, IsolationConfig(target_modules="all-linear", density=0.1))
    k = sum(layer.isolation_indices["default"].numel() for _, layer in _weights(peft_model))
    assert peft_model.get_nb_trainable_parameters() == (k, base + k)
    peft_model.base_model.hold()
    assert peft_model.get_nb_trainable_parameters() == (0, base + k)
    name, layer = _weights(peft_model)[0]
    held, free = layer.isolation_frozen_indices["default"], _outside(layer, 5)
    peft_model.base_model.lock({name: torch.cat([held[:4], free[:2]]).sort().values})
    assert peft_model.get_nb_trainable_parameters() == (0, base + k + 2)
    peft_model.base_model.add_trainable({name: torch.cat([held[4:10], free[2:]]).sort().values})
    assert peft_model.get_nb_trainable_parameters() == (6 + 3, base + k + 5)


def test_adapters_from_one_config_share_their_random_support(load_tiny):
    """The random support depends on the config's seed and the module name, not on the adapter name: two adapters
    from one config get the same support (as a saved config reused under another name does), another seed another."""
    cfg = IsolationConfig(target_modules="all-linear", density=0.05)
    peft_model = get_peft_model(load_tiny(), cfg)
    peft_model.add_adapter("same", cfg)
    peft_model.add_adapter("reseeded", IsolationConfig(target_modules="all-linear", density=0.05, seed=1))
    for _, layer in _weights(peft_model):
        assert torch.equal(layer.isolation_indices["same"], layer.isolation_indices["default"])
        assert not torch.equal(layer.isolation_indices["reseeded"], layer.isolation_indices["default"])


def test_stage_operations_reach_only_the_layers_holding_the_adapter(load_tiny):
    """An adapter may target some layers only: the model's `hold` / `lock` / `add_trainable` leave the others alone
    and name a weight it does not adapt; each layer has the same three verbs."""
    peft_model = get_peft_model(load_tiny(), IsolationConfig(target_modules="all-linear", density=0.05))
    peft_model.add_adapter("q", IsolationConfig(target_modules=["q_proj"], density=0.05))
    q_layers = [(n, layer) for n, layer in _weights(peft_model) if "q" in layer.isolation_values]
    assert len(q_layers) == 2 and peft_model.base_model.hold("q") == sum(
        layer.isolation_frozen_indices["q"].numel() for _, layer in q_layers
    )
    with pytest.raises(ValueError, match="k_proj.weight', which is not an isolation-adapted weight of 'q'"):
        peft_model.base_model.lock({"model.layers.0.self_attn.k_proj.weight": torch.tensor([0])}, "q")
    _, layer = q_layers[0]
    held = layer.isolation_frozen_indices["q"][:4]
    assert layer.add_trainable(held, adapter_name="q") == 4
    assert layer.lock(held[:1], "q") == 1
    assert layer.hold("q") == 3
    assert torch.equal(
        layer.isolation_frozen_locked["q"][torch.isin(layer.isolation_frozen_indices["q"], held)],
        torch.tensor([True, False, False, False]),
    )


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("hook", ["forward_pre", "forward"])
def test_hooks_on_the_base_layer_run_in_training_and_eval(hook, training):
    """A hook on the base layer runs in every forward: a training step then takes the base layer's forward plus the
    sparse product, since the merged product reads the base weight and would skip the hook."""
    base = torch.nn.Linear(16, 8)
    cfg = IsolationConfig(target_modules=["0"], density=0.25, init_weights=False)
    peft_model = get_peft_model(torch.nn.Sequential(base), cfg)
    layer = peft_model.base_model.model[0]
    calls = []

    def double_input(module, args):
        calls.append(module)
        return (2 * args[0],)

    def add_one(module, args, output):
        calls.append(module)
        return output + 1

    if hook == "forward_pre":
        base.register_forward_pre_hook(double_input)
    else:
        base.register_forward_hook(add_one)
    x = torch.randn(3, 16)
    with torch.no_grad():  # the hooked base layer's output plus the delta's, computed densely
        base_out = torch.nn.functional.linear(2 * x if hook == "forward_pre" else x, base.weight, base.bias)
        expected = base_out + (1.0 if hook == "forward" else 0.0) + x @ layer.get_delta_weight("default").T
    peft_model.train(training)
    with torch.set_grad_enabled(training):
        y = peft_model(x)
    assert calls == [base]
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)
    if training:
        y.sum().backward()
        assert layer.isolation_values["default"].grad.abs().sum() > 0


def test_a_backward_hook_on_the_base_layer_runs_in_training():
    base = torch.nn.Linear(16, 8)
    peft_model = get_peft_model(torch.nn.Sequential(base), IsolationConfig(target_modules=["0"], density=0.25))
    calls = []
    base.register_full_backward_hook(lambda module, grad_input, grad_output: calls.append(module))
    peft_model.train()
    peft_model(torch.randn(3, 16, requires_grad=True)).sum().backward()  # as inside a model: a backward reaches it
    assert calls == [base]


def test_delete_adapter_frees_its_sparsity_structure(load_tiny):
    peft_model = get_peft_model(load_tiny(), IsolationConfig(target_modules="all-linear", density=0.05))
    peft_model.add_adapter("other", IsolationConfig(target_modules="all-linear", density=0.05, seed=1))
    peft_model.set_adapter("other")
    logits(peft_model)  # builds and caches the sparsity structures of "other"
    cached = [weakref.ref(layer.delta_pattern("other")) for _, layer in _weights(peft_model)]
    peft_model.set_adapter("default")
    peft_model.delete_adapter("other")
    gc.collect()
    assert all(ref() is None for ref in cached)
    assert all(set(layer._delta_patterns) <= {"default"} for _, layer in _weights(peft_model))


def test_unknown_target_module_is_named(load_tiny):
    with pytest.raises(ValueError, match="not_a_module"):
        get_peft_model(load_tiny(), IsolationConfig(target_modules=["not_a_module"]))


def test_bad_config_values():
    with pytest.raises(ValueError, match="density"):
        IsolationConfig(density=0.0)
    with pytest.raises(ValueError, match="init"):
        IsolationConfig(init="everything")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        IsolationConfig(init="regions", regions="/nowhere.safetensors")


def test_truncated_adapter_file_is_a_clear_error(load_tiny, tmp_path):
    peft_model = get_peft_model(load_tiny(), IsolationConfig(target_modules="all-linear", density=0.05))
    peft_model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated"):
        PeftModel.from_pretrained(load_tiny(), tmp_path)


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda t: t + 10**6, "out of range"),
        (lambda t: t.flip(0), "unsorted or duplicated"),
        (lambda t: torch.cat([t[:1], t[:-1]]), "unsorted or duplicated"),
    ],
)
def test_bad_indices_in_adapter_file(load_tiny, tmp_path, corrupt, message):
    from safetensors.torch import load_file, save_file

    peft_model = get_peft_model(load_tiny(), IsolationConfig(target_modules="all-linear", density=0.05))
    peft_model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    key = next(k for k in tensors if k.endswith("isolation_indices"))
    tensors[key] = corrupt(tensors[key]).to(torch.int32)
    save_file(tensors, path)
    with pytest.raises(ValueError, match=message):
        PeftModel.from_pretrained(load_tiny(), tmp_path)


def test_trainable_region_intersecting_locked_is_refused(load_tiny):
    peft_model = get_peft_model(load_tiny(), IsolationConfig(target_modules="all-linear", density=0.05))
    name, layer = next(iter(layers(peft_model.base_model.model).items()))
    part = layer.isolation_indices["default"][:3]
    peft_model.base_model.lock({f"{name}.weight": part})
    with pytest.raises(ValueError, match="locked"):
        peft_model.base_model.add_trainable({f"{name}.weight": part})
    with pytest.raises(ValueError, match="not an isolation-adapted weight"):
        peft_model.base_model.lock({"model.embed_tokens.weight": part})


def test_lock_and_add_trainable_check_plain_index_mappings(load_tiny):
    """A {weight: indices} mapping gets the checks a regions file gets: int64 is taken, and out-of-range,
    unsorted or float indices, or regions found on another shape, are refused before anything changes."""
    from peft_isolate import CoreRegions

    peft_model = get_peft_model(load_tiny(), IsolationConfig(target_modules="all-linear", density=0.05))
    name, layer = next(iter(layers(peft_model.base_model.model).items()))
    weight, numel = f"{name}.weight", layer.weight.numel()
    before = layer.isolation_indices["default"].clone()
    for bad, message in [
        (torch.tensor([0, numel]), "out of range"),
        (torch.tensor([5, 2]), "unsorted or duplicated"),
        (torch.tensor([1.0, 2.0]), "integer flat positions"),
    ]:
        for call in (peft_model.base_model.lock, peft_model.base_model.add_trainable):
            with pytest.raises(ValueError, match=message):
                call({weight: bad})
    other = CoreRegions({weight: torch.tensor([0], dtype=torch.int32)}, {weight: (numel, 1)})
    with pytest.raises(ValueError, match="made for another model"):
        peft_model.base_model.lock(other)
    assert torch.equal(layer.isolation_indices["default"], before)
    assert peft_model.base_model.lock({weight: before[:2].long()}) == 2


def _regions_file(path, model, pick, shapes=None):
    """A core-regions file over the model's targeted linear weights, taking `pick(numel)` entries of each."""
    from peft_isolate import CoreRegions

    weights = {n: p for n, p in model.named_parameters() if n.endswith("proj.weight")}
    shapes = shapes or {n: tuple(p.shape) for n, p in weights.items()}
    indices = {n: pick(int(torch.tensor(shapes[n]).prod())).to(torch.int32) for n in weights}
    CoreRegions(indices, shapes).save(path)
    return path


def test_regions_and_frozen_files_set_the_support(load_tiny, tmp_path):
    model = load_tiny()
    regions = _regions_file(tmp_path / "r.safetensors", model, lambda n: torch.arange(0, n, 7))
    frozen = _regions_file(tmp_path / "f.safetensors", model, lambda n: torch.arange(3, n, 7))
    peft_model = get_peft_model(
        model, IsolationConfig(target_modules="all-linear", init="regions", regions=str(regions), frozen=str(frozen))
    )
    for layer in layers(peft_model).values():
        numel = layer.in_features * layer.out_features
        assert torch.equal(layer.isolation_indices["default"], torch.arange(0, numel, 7, dtype=torch.int32))
        assert torch.equal(layer.isolation_frozen_indices["default"], torch.arange(3, numel, 7, dtype=torch.int32))
        assert layer.isolation_frozen_locked["default"].all()
    saved = peft_model.peft_config["default"].to_dict()
    assert saved["regions"] is None and saved["frozen"] is None  # no machine paths in adapter_config.json


def test_regions_adapter_loads_through_any_peft_config_path_and_a_loaded_config_can_be_reused(load_tiny, tmp_path):
    """A saved config keeps no paths, so every way peft builds it (`PeftConfig.from_pretrained` too) must size the
    support from the adapter file; and a loaded random-init config reused on a fresh model selects the same support
    again instead of an empty one."""
    from peft import PeftConfig

    model = load_tiny()
    regions = _regions_file(tmp_path / "r.safetensors", model, lambda n: torch.arange(0, n, 7))
    cfg = IsolationConfig(target_modules="all-linear", init="regions", regions=str(regions), init_weights=False)
    peft_model = get_peft_model(model, cfg)
    peft_model.save_pretrained(tmp_path / "regions")
    expected = logits(peft_model)
    config = PeftConfig.from_pretrained(tmp_path / "regions")
    assert config.init == "regions" and config.regions is None
    assert torch.equal(logits(PeftModel.from_pretrained(load_tiny(), tmp_path / "regions", config=config)), expected)

    random = get_peft_model(load_tiny(), IsolationConfig(target_modules="all-linear", density=0.05, seed=3))
    random.save_pretrained(tmp_path / "random")
    config = IsolationConfig.from_pretrained(tmp_path / "random")
    config.inference_mode = False  # saved configs say inference
    again = get_peft_model(load_tiny(), config)
    assert again.get_nb_trainable_parameters()[0] == random.get_nb_trainable_parameters()[0] > 0
    assert all(
        torch.equal(a.isolation_indices["default"], b.isolation_indices["default"])
        for a, b in zip(layers(random).values(), layers(again).values(), strict=True)
    )


def test_regions_file_for_other_shapes_is_refused(load_tiny, tmp_path):
    model = load_tiny()
    shapes = {n: (p.shape[0] * 2, p.shape[1]) for n, p in model.named_parameters() if n.endswith("proj.weight")}
    bad = _regions_file(tmp_path / "r.safetensors", model, lambda n: torch.arange(0, n, 5), shapes=shapes)
    with pytest.raises(ValueError, match="made for another model"):
        get_peft_model(model, IsolationConfig(target_modules="all-linear", init="regions", regions=str(bad)))


def test_regions_naming_untargeted_weights_are_refused(load_tiny, tmp_path):
    model = load_tiny()
    regions = _regions_file(tmp_path / "r.safetensors", model, lambda n: torch.arange(0, n, 5))
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ValueError, match="k_proj.weight', which is not a targeted linear weight"):
        get_peft_model(model, IsolationConfig(target_modules=["q_proj"], init="regions", regions=str(regions)))
    assert {n: type(m) for n, m in model.named_modules()} == before  # refused before any layer was injected


def test_regions_of_other_shapes_leave_the_model_unchanged(load_tiny, tmp_path):
    """A regions file whose last weight was made for another shape is refused before injection: the caller's model
    is as it was (before, the layers injected ahead of the bad one stayed)."""
    model = load_tiny()
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters() if n.endswith("proj.weight")}
    last = list(shapes)[-1]
    shapes[last] = (shapes[last][0], 2 * shapes[last][1])
    regions = _regions_file(tmp_path / "r.safetensors", model, lambda n: torch.arange(0, n, 5), shapes)
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ValueError, match=rf"{last} has shape \(64, 256\) but the model's weight is \(64, 128\)"):
        get_peft_model(model, IsolationConfig(target_modules="all-linear", init="regions", regions=str(regions)))
    assert {n: type(m) for n, m in model.named_modules()} == before


def test_trainable_support_intersecting_frozen_file_is_refused(load_tiny, tmp_path):
    model = load_tiny()
    regions = _regions_file(tmp_path / "r.safetensors", model, lambda n: torch.arange(0, n, 5))
    frozen = _regions_file(tmp_path / "f.safetensors", model, lambda n: torch.arange(0, n, 10))
    cfg = IsolationConfig(target_modules="all-linear", init="regions", regions=str(regions), frozen=str(frozen))
    with pytest.raises(ValueError, match="intersects the frozen set"):
        get_peft_model(model, cfg)


def test_random_support_avoids_frozen_entries(load_tiny, tmp_path):
    model = load_tiny()
    frozen = _regions_file(tmp_path / "f.safetensors", model, lambda n: torch.arange(0, n // 2))
    peft_model = get_peft_model(model, IsolationConfig(target_modules="all-linear", density=0.3, frozen=str(frozen)))
    for layer in layers(peft_model).values():
        idx = layer.isolation_indices["default"]
        assert idx.numel() == int(0.3 * layer.in_features * layer.out_features)
        assert not torch.isin(idx, layer.isolation_frozen_indices["default"]).any()


def test_density_counts_entries_as_core_regions_do():
    """floor(density x entries) in exact decimal, as `find_core_regions` counts p: 0.29 of 100 is 29 (float: 28)."""
    model = get_peft_model(
        torch.nn.Sequential(torch.nn.Linear(10, 10)), IsolationConfig(target_modules=["0"], density=0.29)
    )
    assert model.base_model.model[0].isolation_indices["default"].numel() == 29


def test_adapter_memory_is_20_bytes_per_trainable_and_9_per_frozen_entry(load_tiny):
    """int32 index + fp32 value + fp32 gradient + AdamW's two fp32 moments = 20 bytes per trainable entry;
    int32 index + fp32 value + bool locked flag = 9 bytes per held or locked entry; plus, cached for training
    steps, 4 bytes of CSR column per trainable entry and 4 per weight row."""
    peft_model = _stage_model(load_tiny, "fp32")
    opt = train_steps(peft_model, steps=1)
    peft_model(TOKENS, labels=TOKENS).loss.backward()  # gradients as they are between backward and step
    trainable = sum(layer.isolation_indices["default"].numel() for layer in layers(peft_model).values())
    frozen = sum(layer.isolation_frozen_indices["default"].numel() for layer in layers(peft_model).values())
    measured = sum(t.nbytes for n, t in peft_model.state_dict().items() if "isolation_" in n)
    measured += sum(p.grad.nbytes for p in peft_model.parameters() if p.requires_grad)
    measured += sum(t.nbytes for state in opt.state.values() for t in state.values() if t.dim() == 1)
    assert measured == 20 * trainable + 9 * frozen
    # training steps build only the value gradient's CSR pattern: int32 columns and row pointers
    patterns = [layer.delta_pattern("default") for layer in layers(peft_model).values()]
    assert not any("_joined" in vars(p) or "_transposed" in vars(p) for p in patterns)
    rows = sum(p.shape[0] + 1 for p in patterns)
    assert sum(p.trainable[0].nbytes + p.trainable[1].nbytes for p in patterns) == 4 * trainable + 4 * rows


def test_sparsity_structure_is_reused_until_an_index_set_changes(load_tiny):
    """Each step reuses the layer's DeltaPattern; locking (new index tensors) or an in-place change of an index
    set (a load) rebuilds it, and the forward then still equals the merged weights'."""
    peft_model = get_peft_model(
        load_tiny(), IsolationConfig(target_modules="all-linear", density=0.1, init_weights=False)
    )
    name, layer = next(iter(layers(peft_model.base_model.model).items()))
    first = layer.delta_pattern("default")
    tokens = torch.arange(3, 20).view(1, -1)
    peft_model(tokens)
    assert layer.delta_pattern("default") is first
    peft_model.base_model.lock({f"{name}.weight": layer.isolation_indices["default"][::2]})
    locked = layer.delta_pattern("default")
    assert locked is not first and locked.frozen_indices.numel() > 0
    with torch.no_grad():
        layer.isolation_frozen_indices["default"].copy_(layer.isolation_frozen_indices["default"])
    assert layer.delta_pattern("default") is not locked
    with torch.no_grad():
        unmerged = peft_model(tokens).logits
        merged = peft_model.merge_and_unload()(tokens).logits
    torch.testing.assert_close(unmerged, merged, rtol=1e-5, atol=1e-5)
