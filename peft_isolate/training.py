"""Supervised fine-tuning of one step of the pipeline (a probe, a stage, a baseline) on `transformers.Trainer`.

The Trainer brings accelerate (DDP/FSDP), progress bars and logging. We add two things: dense-mode freezing
(gradients masked at frozen entries and the entries restored after each optimizer step, so they stay
bit-identical under AdamW with weight decay) and resuming only from checkpoints whose completion marker exists.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import PartialState
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainerCallback, TrainingArguments

from ._io import save_json
from .data import Example, SFTCollator, tokenize_sft

COMPLETE = "complete.json"


def processes() -> PartialState:
    """This process's place among the training processes (one, or several under torchrun/accelerate launch).

    Without a GPU, several processes train on CPU with gloo, which accelerate only sets up when told `cpu`."""
    return PartialState(cpu=not torch.cuda.is_available())


@dataclass(frozen=True)
class TrainSettings:
    """How long and how fast one training step runs."""

    steps: int
    lr: float = 2e-4
    batch_size: int = 8
    grad_accum: int = 1
    max_seq_len: int = 256
    weight_decay: float = 0.0
    seed: int = 0
    save_steps: int = 50


class FreezeEntries(TrainerCallback):
    """Keeps the entries `frozen[name]` (flat positions) of dense parameters bit-identical during training."""

    def __init__(self, model: nn.Module, frozen: Mapping[str, torch.Tensor]):
        params = dict(model.named_parameters())
        unknown = sorted(set(frozen) - set(params))
        if unknown:
            raise ValueError(f"frozen set names {unknown[0]!r}, which is not a parameter of the model")
        self.entries = [(params[n], idx.long().to(params[n].device)) for n, idx in frozen.items() if idx.numel()]
        self.saved = [p.detach().flatten()[idx].clone() for p, idx in self.entries]

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        for param, idx in self.entries:
            if param.grad is not None:
                param.grad.view(-1)[idx] = 0

    def on_optimizer_step(self, args, state, control, **kwargs):
        with torch.no_grad():
            for (param, idx), saved in zip(self.entries, self.saved, strict=True):
                param.view(-1)[idx] = saved


def completed_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest `checkpoint-N` folder whose completion marker exists (a half-written one is ignored)."""
    ckpts = [p for p in Path(output_dir).glob("checkpoint-*") if (p / COMPLETE).is_file()]
    return max(ckpts, key=lambda p: int(p.name.split("-")[-1]), default=None)


class _MarkComplete(TrainerCallback):
    """Writes the completion marker into each checkpoint after the Trainer has saved it."""

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            save_json({"step": state.global_step}, Path(args.output_dir) / f"checkpoint-{state.global_step}" / COMPLETE)


def train(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    settings: TrainSettings,
    output_dir: str | os.PathLike,
    frozen: Mapping[str, torch.Tensor] | None = None,
) -> float:
    """Train `model` in place for `settings.steps` optimizer steps on `examples`; resume from the last complete
    checkpoint in `output_dir` if there is one. Returns the final training loss.

    Under `accelerate launch` / `torchrun` (DDP) each process takes `batch_size / world size` examples, in the
    same order a single process would, so the global batch and the result stay those of one process."""
    world = processes().num_processes
    if settings.batch_size % world:
        raise ValueError(f"batch_size {settings.batch_size} is not divisible by the {world} processes; change one")
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=settings.steps,
        learning_rate=settings.lr,
        per_device_train_batch_size=settings.batch_size // world,
        train_sampling_strategy="sequential",  # `examples` come shuffled; keep their order on any world size
        gradient_accumulation_steps=settings.grad_accum,
        weight_decay=settings.weight_decay,
        lr_scheduler_type="constant",
        seed=settings.seed,
        data_seed=settings.seed,
        save_strategy="steps",
        save_steps=settings.save_steps,
        save_total_limit=2,
        logging_steps=max(1, settings.steps // 10),
        report_to="none",
        remove_unused_columns=False,
        disable_tqdm=False,
        dataloader_pin_memory=torch.cuda.is_available(),
        use_cpu=not torch.cuda.is_available(),
    )
    callbacks: list[TrainerCallback] = [_MarkComplete()]
    if frozen:
        callbacks.append(FreezeEntries(model, frozen))
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=tokenize_sft(examples, tokenizer, settings.max_seq_len),
        data_collator=SFTCollator(tokenizer.pad_token_id),
        callbacks=callbacks,
    )
    resume = completed_checkpoint(output_dir)
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    if trainer.is_world_process_zero():
        ckpts = list(Path(output_dir).glob("checkpoint-*"))
        for ckpt in ckpts:  # markers first: a kill during the rmtree must not leave a gutted "complete" checkpoint
            (ckpt / COMPLETE).unlink(missing_ok=True)
        for ckpt in ckpts:
            shutil.rmtree(ckpt, ignore_errors=True)
    return float(result.training_loss)
