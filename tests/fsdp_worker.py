"""Dense training of the tiny Llama with part of every weight frozen, sharded with FSDP2 when run under torchrun.

    python tests/fsdp_worker.py MODEL_DIR OUT_DIR

accelerate runs FSDP only on accelerators, so on CPU this shards with torch's `fully_shard` itself (gloo) and
steps the optimizer in the Trainer's order around `FreezeEntries`' two hooks: the parts under test are the
shard-local freezing and gathering the whole state dict for saving. Writes OUT_DIR/model.safetensors (main
process) with every weight after training and the frozen entries from before it.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.fsdp import fully_shard

from peft_isolate.data import Example, SFTCollator, tokenize_sft
from peft_isolate.models import load_model
from peft_isolate.training import FreezeEntries, gathered_state_dict, processes


def main(model_dir: str, out_dir: str) -> None:
    state = processes()
    torch.manual_seed(0)
    model, tokenizer = load_model(model_dir, "none", device="cpu")
    frozen = {n: torch.arange(0, p.numel(), 3, dtype=torch.int32) for n, p in model.named_parameters()}
    before = {f"initial.{n}": p.detach().clone() for n, p in model.named_parameters()}
    before |= {
        f"frozen_before.{n}": p.detach().flatten()[frozen[n].long()].clone() for n, p in model.named_parameters()
    }
    freeze = FreezeEntries(model, frozen)
    if state.num_processes > 1:
        for block in model.model.layers:
            fully_shard(block)
        fully_shard(model)
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdef") for _ in range(5)) for _ in range(16)]
    rows = tokenize_sft(
        [Example(({"role": "user", "content": f"upper {w}"},), w.upper()) for w in words], tokenizer, 32
    )
    collate = SFTCollator(tokenizer.pad_token_id)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    per_process = 4 // state.num_processes
    for step in range(4):
        start = 4 * step + per_process * state.process_index
        model(**collate([rows[i] for i in range(start, start + per_process)])).loss.backward()
        freeze.on_pre_optimizer_step(None, None, None)
        optimizer.step()
        freeze.on_optimizer_step(None, None, None)
        optimizer.zero_grad()
    gathered = gathered_state_dict(model)
    weights = gathered if gathered is not None else model.state_dict()
    if state.is_main_process:
        after = {f"trained.{n}": t.detach().clone().contiguous() for n, t in weights.items()}
        after |= {f"frozen_after.{n}": weights[n].flatten()[frozen[n].long()].clone() for n in frozen if n in weights}
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        save_file(after | before, str(Path(out_dir) / "model.safetensors"))
    if dist.is_initialized():
        dist.barrier()


if __name__ == "__main__":
    main(*sys.argv[1:])
