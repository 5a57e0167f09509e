"""Greedy generation through an adapter: unmerged against merged into its full-precision base (what evaluation
does, `evaluate.merged_for_generation`), on the seesaw's own prompts.

    python bench/generation.py                 # SmolLM2-135M fp32, LoRA r16 and isolation 5%, 64 prompts

Each adapter has random values (the speed does not depend on them); both runs generate from the same prompts,
batch 16, 16 new tokens. Writes bench/results/generation.md: seconds, the ratio, and how many generations agree.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import provenance
import torch
from peft import LoraConfig, get_peft_model
from seesaw import TASKS

from peft_isolate import IsolationConfig
from peft_isolate.data import load_task, prompt_text
from peft_isolate.evaluate import generate, merged_for_generation
from peft_isolate.files import write_atomic
from peft_isolate.models import load_model

RESULTS = Path(__file__).parent / "results"
ADAPTERS = {
    "lora r16": LoraConfig(r=16, target_modules="all-linear", init_lora_weights=False),
    "isolation 5%": IsolationConfig(target_modules="all-linear", density=0.05),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--prompts", type=int, default=64, help="prompts, split evenly over the seesaw's three tasks")
    args = p.parse_args()
    base, tokenizer = load_model(args.model, "none")
    per_task = args.prompts // 3
    examples = [e for t in TASKS[:3] for e in load_task(f"reasoning_gym:{t}", train=1, eval=per_task, seed=100).eval]
    prompts = [prompt_text(e, tokenizer) for e in examples]
    rows = []
    for name, config in ADAPTERS.items():
        torch.manual_seed(0)
        model = get_peft_model(copy.deepcopy(base), config)
        for param in model.parameters():
            if param.requires_grad and param.abs().max() == 0:  # isolation values start at zero: give them some
                torch.nn.init.normal_(param, std=1e-3)
        start = time.perf_counter()
        unmerged = generate(model, tokenizer, prompts, 16, 16, desc=f"{name} unmerged")
        middle = time.perf_counter()
        merged = generate(merged_for_generation(model), tokenizer, prompts, 16, 16, desc=f"{name} merged")
        end = time.perf_counter()
        same = sum(a == b for a, b in zip(unmerged, merged, strict=True))
        rows.append(
            f"| {name} | {middle - start:.1f} | {end - middle:.1f} | {(end - middle) / (middle - start):.2f} "
            f"| {same} of {len(prompts)} |"
        )
        print(rows[-1], flush=True)
    lines = [
        "# Generation through an adapter: unmerged against merged",
        "",
        f"Command: `python bench/generation.py {' '.join(sys.argv[1:])}`; {time.strftime('%Y-%m-%d')}; "
        f"{provenance.device()}; commit {provenance.commit()}; model {args.model} (fp32), {len(prompts)} prompts "
        f"of {', '.join(TASKS[:3])}, batch 16, 16 new tokens, greedy.",
        "",
        "| adapter | unmerged (s) | merged (s) | merged x unmerged | same generations |",
        "|---|---|---|---|---|",
        *rows,
    ]
    text = "\n".join(lines) + "\n"
    write_atomic(RESULTS / "generation.md", lambda path: path.write_text(text))
    print(text)


if __name__ == "__main__":
    main()
