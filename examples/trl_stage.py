"""Train one CPI-FT stage of a finished run with TRL's `SFTTrainer` instead of the pipeline's Trainer.

    python examples/trl_stage.py runs/demo 1 --out runs/demo-trl/1

Reads the run's recipe.json, plan.json and cores/, starts from what the stage before left (stages/<k-1>/; stage 0
starts from the fused values on support.safetensors), locks the cores the plan freezes, trains the stage's own
cores on the stage's data with `trl.SFTTrainer` and saves the adapter to --out. Adapter mode; needs
`pip install trl`. The pipeline's own stages stay where they are: --out is a folder of its own.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import PreTrainedTokenizerBase
from transformers.trainer_utils import TrainOutput
from trl import SFTConfig, SFTTrainer

from peft_isolate import CoreRegions, IsolationConfig
from peft_isolate.data import Example, tokenize_sft
from peft_isolate.pipeline import Run, StageJob, cpi_ft_job, load_run
from peft_isolate.plan import StagePlan
from peft_isolate.recipe import Recipe
from peft_isolate.training import TrainSettings


def train_with_trl(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    settings: TrainSettings,
    output_dir: str | os.PathLike,
) -> TrainOutput:
    """`peft_isolate.training.train`'s settings on `trl.SFTTrainer` (one process, no checkpoints), on the
    pipeline's own tokens and answer-only labels (TRL keeps a `labels` column as it is, and its own prompt-completion
    rows would lose the answer, not the prompt's start, past `max_length`). Trains the trainable entries only:
    held and locked ones do not require grad, so no optimizer holds them."""
    config = SFTConfig(
        output_dir=str(output_dir),
        max_steps=settings.steps,
        learning_rate=settings.lr,
        per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.grad_accum,
        weight_decay=settings.weight_decay,
        seed=settings.seed,
        max_length=settings.max_seq_len,
        save_strategy="no",
        use_cpu=not torch.cuda.is_available(),
        **{"lr_scheduler_type": "constant", "report_to": "none", **settings.args},
    )
    rows = tokenize_sft(examples, tokenizer, settings.max_seq_len)
    trainer = SFTTrainer(model=model, args=config, train_dataset=rows, processing_class=tokenizer)
    return trainer.train()


def stage_start(run: Run, k: int, job: StageJob) -> tuple[PeftModel, PreTrainedTokenizerBase]:
    """The adapter stage k starts from, set up as the pipeline's `train_stages` does: what trained so far is
    held, the plan's frozen cores are locked, the stage's own cores train."""
    if k:
        model, tokenizer = run.load(run.out / "stages" / str(k - 1))
    else:
        base, tokenizer = run.base()
        support = run.out / "support.safetensors"
        cfg = IsolationConfig(target_modules=run.recipe.target_modules, init="regions", regions=str(support))
        model = get_peft_model(base, cfg)
        fused = run.out / "fused" / "delta.safetensors"
        if fused.is_file():
            model.base_model.add_trainable(CoreRegions.load(support), values=load_file(fused))
    model.base_model.hold()
    if job.locked is not None:
        model.base_model.lock(job.locked)
    model.base_model.add_trainable(job.trainable)
    return model, tokenizer


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a run directory whose plan, cores and earlier stages are done")
    parser.add_argument("stage", type=int, help="the stage to train, numbered as stages/<k>")
    parser.add_argument("--out", type=Path, required=True, help="where the stage's adapter is saved")
    args = parser.parse_args(argv)

    recipe = Recipe.model_validate(json.loads((args.run / "recipe.json").read_text()))
    if recipe.mode != "adapter" or recipe.stages.reselect:
        parser.error("this example trains adapter-mode stages with the plan's cores (no stages.reselect)")
    run = load_run(recipe.model_copy(update={"output_dir": str(args.run)}))
    plan = StagePlan.load(run.out / "plan.json")
    cores = {t: CoreRegions.load(run.out / "cores" / f"{t}.safetensors") for t in run.tasks}
    job = cpi_ft_job(run, plan, cores, args.stage)
    model, tokenizer = stage_start(run, args.stage, job)
    examples = run.examples(job.tasks, job.steps, recipe.stages.sample)
    train_with_trl(model, tokenizer, examples, run.settings(job.steps, recipe.stages.lr), f"{args.out}.work")
    model.save_pretrained(args.out)
    print(f"stage {args.stage} ({', '.join(job.tasks)}): {job.steps} steps with trl.SFTTrainer, saved to {args.out}")
    return args.out


if __name__ == "__main__":
    main()
