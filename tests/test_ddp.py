"""Several CPU processes (gloo, via torchrun), DDP and FSDP2: same result as one process with the same global
batch, and frozen entries bit-identical on every rank."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainingArguments

from peft_isolate.data import Example
from peft_isolate.models import load_model
from peft_isolate.recipe import Recipe
from peft_isolate.training import TrainSettings, _fsdp_arguments, train

WORKER = Path(__file__).with_name("ddp_worker.py")
FSDP_WORKER = Path(__file__).with_name("fsdp_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def _torchrun(*args: object) -> None:
    torchrun = Path(sys.executable).with_name("torchrun")
    port = str(_free_port())
    _run([str(torchrun), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", port, *map(str, args)])


@pytest.mark.parametrize("mode", ["adapter", "dense"])
def test_two_process_ddp_matches_one_process(tiny_dir, tmp_path, mode):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    _run([sys.executable, str(WORKER), str(tiny_dir), str(single), mode])
    _torchrun(WORKER, tiny_dir, ddp, mode)
    one = load_file(single / "rank0.safetensors")
    ranks = [load_file(ddp / f"rank{r}.safetensors") for r in (0, 1)]
    for key, value in one.items():
        if key.startswith("frozen_after."):
            before = key.replace("frozen_after.", "frozen_before.")
            for rank in ranks:
                assert torch.equal(rank[key], rank[before])  # frozen entries never moved, on every rank
        assert torch.equal(ranks[0][key], ranks[1][key])  # DDP keeps the replicas identical
        # same global batch, gradients averaged over processes: equal up to float reduction order, which Adam's
        # normalisation can amplify on near-zero gradients; 1e-4 is 1% of one step at lr 1e-2
        torch.testing.assert_close(ranks[0][key], value, rtol=0, atol=1e-4)
    assert any(k.startswith("trained.") for k in one)


def test_fsdp2_sharded_freezing_matches_one_process(tiny_dir, tmp_path):
    """Dense mode under FSDP2: every process masks and restores the frozen entries in its own rows, and the
    gathered weights equal a single unsharded process's."""
    _run([sys.executable, str(FSDP_WORKER), str(tiny_dir), str(tmp_path / "single")])
    _torchrun(FSDP_WORKER, tiny_dir, tmp_path / "fsdp")
    one = load_file(tmp_path / "single" / "model.safetensors")
    sharded = load_file(tmp_path / "fsdp" / "model.safetensors")
    assert one.keys() == sharded.keys()
    frozen = [k for k in one if k.startswith("frozen_after.")]
    assert frozen
    for key in frozen:
        assert torch.equal(sharded[key], sharded[key.replace("frozen_after.", "frozen_before.")])
    moved = 0
    for key in (k for k in one if k.startswith("trained.")):
        torch.testing.assert_close(sharded[key], one[key], rtol=0, atol=1e-4)  # as for DDP above
        moved += int((sharded[key] != sharded[key.replace("trained.", "initial.")]).sum())
    assert moved > 0.5 * sum(one[k].numel() for k in one if k.startswith("trained."))  # 2/3 are free to move


def test_fsdp_settings_dense_mode_and_gpus_only(tiny_dir, tmp_path):
    """The Trainer gets FSDP2 wrapping each transformer block; adapter mode and CPUs are refused by name."""
    tasks = {t: {"source": "reasoning_gym:chain_sum", "train": 4, "eval": 2} for t in ("a", "b")}
    with pytest.raises(ValueError, match="training.fsdp shards full weights"):
        Recipe.model_validate({"tasks": tasks, "training": {"fsdp": True}})
    assert Recipe.model_validate({"tasks": tasks, "mode": "dense", "quantization": "none", "training": {"fsdp": True}})
    model, tokenizer = load_model(tiny_dir, "none", device="cpu")
    plugin = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, **_fsdp_arguments(model)).fsdp_plugin_args
    assert plugin["fsdp_version"] == 2 and plugin["transformer_cls_names_to_wrap"] == "LlamaDecoderLayer"
    if torch.cuda.is_available():
        pytest.skip("the CPU refusal only")
    example = Example(({"role": "user", "content": "hi"},), "HI")
    with pytest.raises(ValueError, match="training.fsdp needs GPUs"):
        train(model, tokenizer, [example], TrainSettings(steps=1, fsdp=True), tmp_path)
