"""Fusion: SLERP and its fallbacks, the equal-weight spherical mean, and core transplant (dense and sparse)."""

from __future__ import annotations

import math

import pytest
import torch

from peft_isolate.fusion import fuse_deltas, slerp, spherical_mean
from peft_isolate.regions import CoreRegions


def test_slerp_of_equal_tensors_is_that_tensor():
    a = torch.randn(4, 5)
    out, path = slerp(a, a.clone(), 0.3)
    assert torch.allclose(out, a) and path == "lerp"


def test_slerp_matches_the_formula_and_its_endpoints():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])  # orthogonal: theta = pi / 2
    out, path = slerp(a, b, 0.5)
    assert path == "slerp" and torch.allclose(out, torch.tensor([1.0, 2.0]) * math.sin(math.pi / 4))
    assert torch.allclose(slerp(a, b, 0.0)[0], a) and torch.allclose(slerp(a, b, 1.0)[0], b)
    x, y = torch.randn(3, 7), torch.randn(3, 7)
    theta = math.acos(float((x * y).sum() / (x.norm() * y.norm())))
    expected = (math.sin(0.7 * theta) * x + math.sin(0.3 * theta) * y) / math.sin(theta)
    assert torch.allclose(slerp(x, y, 0.3)[0], expected, atol=1e-6)


@pytest.mark.parametrize("scale", [2.0, -3.0])
def test_colinear_and_zero_norm_fall_back_to_linear(scale):
    a = torch.randn(10)
    out, path = slerp(a, scale * a, 0.25)
    assert path == "lerp" and torch.allclose(out, 0.75 * a + 0.25 * scale * a)
    nearly = a + 1e-4 * torch.randn(10)
    assert slerp(a, nearly, 0.5)[1] == "lerp"
    out, path = slerp(torch.zeros(10), a, 0.4)
    assert path == "lerp" and torch.allclose(out, 0.4 * a)


def test_spherical_mean_weights_tasks_equally():
    a, b = torch.randn(6), torch.randn(6)
    m = spherical_mean([a, b])
    assert torch.allclose(m, spherical_mean([b, a]))
    direction = slerp(a / a.norm(), b / b.norm(), 0.5)[0]
    assert torch.allclose(m / m.norm(), direction / direction.norm(), atol=1e-6)
    assert float(m.norm()) == pytest.approx(float(a.norm() + b.norm()) / 2, rel=1e-6)
    e = torch.eye(3) * torch.tensor([1.0, 2.0, 3.0])[:, None]  # orthogonal, norms 1, 2, 3
    assert torch.allclose(spherical_mean(list(e)), torch.full((3,), 2 / math.sqrt(3)))
    assert torch.allclose(spherical_mean([a, -a]), torch.zeros(6))  # directions cancel: arithmetic mean
    assert torch.allclose(spherical_mean([a]), a)


def cores_of(entries: dict[str, list[int]], shape=(2, 3)) -> CoreRegions:
    return CoreRegions({"w": torch.tensor(entries["w"], dtype=torch.int32)}, {"w": shape})


def hand_mean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    u = a / a.norm() + b / b.norm()
    return u / u.norm() * (a.norm() + b.norm()) / 2


def test_transplant_against_hand_computed_tensors():
    da = torch.tensor([[4.0, 0.0, 1.0], [0.5, -3.0, 0.0]])
    db = torch.tensor([[0.0, 2.0, -5.0], [1.0, 0.0, 0.2]])
    cores = {"a": cores_of({"w": [0, 2, 4]}), "b": cores_of({"w": [1, 2]})}  # entry 2 is shared: |-5| > |1|
    omega = 0.3
    result = fuse_deltas({"a": {"w": da}, "b": {"w": db}}, cores, backbone=None, omega=omega)
    expected = (omega * hand_mean(da, db)).reshape(-1)  # zero backbone: SLERP falls back to omega * mean
    expected[[0, 4]] = da.reshape(-1)[[0, 4]]
    expected[[1, 2]] = db.reshape(-1)[[1, 2]]
    assert torch.allclose(result.deltas["w"].reshape(-1), expected, atol=1e-6)
    assert result.stats["lerp"] == 1 and result.stats["slerp"] == 0
    assert result.stats["contested"] == 1 and result.stats["core_entries"] == {"a": 2, "b": 2}

    backbone = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, -1.0]])
    result = fuse_deltas({"a": {"w": da}, "b": {"w": db}}, cores, backbone={"w": backbone}, omega=omega)
    mean = hand_mean(da, db)
    theta = math.acos(float((backbone * mean).sum() / (backbone.norm() * mean.norm())))
    blend = (math.sin((1 - omega) * theta) * backbone + math.sin(omega * theta) * mean) / math.sin(theta)
    expected = blend.reshape(-1)
    expected[[0, 4]] = da.reshape(-1)[[0, 4]]
    expected[[1, 2]] = db.reshape(-1)[[1, 2]]
    assert torch.allclose(result.deltas["w"].reshape(-1), expected, atol=1e-6)
    assert result.stats["slerp"] == 1


def test_sparse_support_gives_the_dense_result_on_the_support():
    g = torch.Generator().manual_seed(0)
    support = torch.tensor([1, 3, 4, 8, 9, 11, 15], dtype=torch.int32)
    dense = {}
    for t in ("a", "b", "c"):
        d = torch.zeros(16)
        d[support.long()] = torch.randn(7, generator=g)
        dense[t] = d.reshape(4, 4)
    backbone = torch.zeros(16)
    backbone[support.long()] = torch.randn(7, generator=g)
    cores = {
        "a": cores_of({"w": [1, 4]}, (4, 4)),
        "b": cores_of({"w": [4, 9]}, (4, 4)),
        "c": cores_of({"w": [15]}, (4, 4)),
    }
    want = fuse_deltas({t: {"w": d} for t, d in dense.items()}, cores, {"w": backbone.reshape(4, 4)}, 0.6)
    sparse = {t: {"w": d.reshape(-1)[support.long()]} for t, d in dense.items()}
    got = fuse_deltas(sparse, cores, {"w": backbone[support.long()]}, 0.6, support={"w": support})
    assert torch.allclose(got.deltas["w"], want.deltas["w"].reshape(-1)[support.long()], atol=1e-6)
    assert got.stats == want.stats
    outside = {**cores, "c": cores_of({"w": [2]}, (4, 4))}
    with pytest.raises(ValueError, match="outside the support"):
        fuse_deltas(sparse, outside, None, 0.6, support={"w": support})


def test_fuse_rejects_bad_inputs():
    d = {"a": {"w": torch.ones(2, 3)}}
    with pytest.raises(ValueError, match="omega"):
        fuse_deltas(d, {"a": cores_of({"w": [0]})}, omega=1.5)
    stray = CoreRegions({"v": torch.tensor([0], dtype=torch.int32)}, {"v": (3,)})
    with pytest.raises(ValueError, match="no delta"):
        fuse_deltas(d, {"a": stray})
    with pytest.raises(ValueError, match="differ"):
        fuse_deltas(d, {"b": cores_of({"w": [0]})})
