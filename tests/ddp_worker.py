"""Trains the tiny Llama for a few steps with part of its weights frozen; run alone or under torchrun (DDP).

    python tests/ddp_worker.py MODEL_DIR OUT_DIR adapter|dense

Each process writes `OUT_DIR/rank<r>.safetensors`: the frozen entries before training and every trained tensor
after, so a test can compare processes with each other and with a single-process run.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import torch
from peft import get_peft_model
from safetensors.torch import save_file

from peft_isolate import IsolationConfig
from peft_isolate.data import Example
from peft_isolate.models import load_model
from peft_isolate.training import TrainSettings, processes, train


def main(model_dir: str, out_dir: str, mode: str) -> None:
    state = processes()
    torch.manual_seed(0)
    model, tokenizer = load_model(model_dir, "none", device="cpu")
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdef") for _ in range(5)) for _ in range(64)]
    examples = [Example(({"role": "user", "content": f"upper {w}"},), w.upper()) for w in words]
    settings = TrainSettings(steps=4, lr=1e-2, batch_size=4, max_seq_len=32, weight_decay=0.1, save_steps=100)
    frozen = None
    if mode == "adapter":
        model = get_peft_model(model, IsolationConfig(target_modules="all-linear", density=0.1, init_weights=False))
        locked = {
            f"{n}.weight": m.isolation_indices["default"][::2]
            for n, m in model.base_model.model.named_modules()
            if hasattr(m, "isolation_indices")
        }
        model.base_model.lock(locked)
        before = {n: t.clone() for n, t in model.state_dict().items() if "isolation_frozen_values" in n}
        assert before and any(t.numel() for t in before.values())
    else:
        frozen = {n: torch.arange(0, p.numel(), 3, dtype=torch.int32) for n, p in model.named_parameters()}
        before = {n: p.detach().flatten()[frozen[n].long()].clone() for n, p in model.named_parameters()}
    train(model, tokenizer, examples, settings, Path(out_dir) / f"work{state.process_index}", frozen=frozen)
    after = {f"trained.{n}": p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    after |= {f"frozen_before.{n}": t for n, t in before.items()}
    if mode == "adapter":
        after |= {
            f"frozen_after.{n}": t.clone() for n, t in model.state_dict().items() if "isolation_frozen_values" in n
        }
    else:
        after |= {
            f"frozen_after.{n}": p.detach().flatten()[frozen[n].long()].clone() for n, p in model.named_parameters()
        }
    save_file(
        {k: v.contiguous() for k, v in after.items()}, str(Path(out_dir) / f"rank{state.process_index}.safetensors")
    )


if __name__ == "__main__":
    main(*sys.argv[1:])
