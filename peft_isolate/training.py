"""Supervised fine-tuning of one step of the pipeline (a probe, a stage, a baseline) on `transformers.Trainer`.

The Trainer brings accelerate (DDP/FSDP), progress bars and logging. We add three things: dense-mode freezing
(gradients masked at frozen entries and the entries restored after each optimizer step, so they stay
bit-identical under AdamW with weight decay), resuming only from checkpoints whose completion marker exists, and
the output head run only where a label is (answer-only SFT labels a few tokens a row; the vocabulary-wide head
and its softmax at every prompt and padding position would be thrown away).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import PartialState
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor, Shard
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import TrainOutput

from .data import Example, SFTCollator, tokenize_sft
from .files import load_json, save_json

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
    fsdp: bool = False  # shard parameters, gradients and optimizer state across GPUs (FSDP2); dense mode
    args: Mapping[str, Any] = field(default_factory=dict)  # more TrainingArguments fields (recipe: training.args)


class FreezeEntries(TrainerCallback):
    """Keeps the entries `frozen[name]` (flat positions) of dense parameters bit-identical during training.

    Their gradients are zeroed as soon as backward accumulates them, so gradient clipping, which the Trainer runs
    before any callback, sees only the trainable entries, as in adapter mode. Under FSDP2 a parameter is a DTensor
    sharded on dim 0 and each process holds a block of its rows; each process then masks and restores the frozen
    entries that fall in its own rows before the optimizer step (FSDP2 sets sharded gradients after backward's
    hooks, so there clipping still counts them)."""

    def __init__(self, model: nn.Module, frozen: Mapping[str, torch.Tensor]):
        params = dict(model.named_parameters())
        unknown = sorted(set(frozen) - set(params))
        if unknown:
            raise ValueError(f"frozen set names {unknown[0]!r}, which is not a parameter of the model")
        self.model = model
        self.frozen = {n: idx.long().to(params[n].device) for n, idx in frozen.items() if idx.numel()}
        self.saved = {n: params[n].detach().flatten()[idx].clone() for n, idx in self.frozen.items()}
        self._entries: list[tuple[nn.Parameter, torch.Tensor, torch.Tensor]] | None = None
        for n, idx in self.frozen.items():
            params[n].register_post_accumulate_grad_hook(functools.partial(_zero_grad_at, idx=idx))

    def entries(self) -> list[tuple[nn.Parameter, torch.Tensor, torch.Tensor]]:
        """(parameter, flat positions in this process's part of it, saved values), resolved after the Trainer
        has wrapped the model (FSDP replaces the parameters)."""
        if self._entries is None:
            params = dict(self.model.named_parameters())
            self._entries = [(params[n], *_local_part(params[n], idx, self.saved[n])) for n, idx in self.frozen.items()]
        return self._entries

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        for param, idx, _ in self.entries():
            if param.grad is not None:
                _local(param.grad).view(-1)[idx] = 0

    def on_optimizer_step(self, args, state, control, **kwargs):
        with torch.no_grad():
            for param, idx, saved in self.entries():
                _local(param).view(-1)[idx] = saved


def _zero_grad_at(param: torch.Tensor, idx: torch.Tensor) -> None:
    param.grad.view(-1)[idx] = 0


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _local_part(param: torch.Tensor, idx: torch.Tensor, saved: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The flat positions `idx` of a whole parameter and their `saved` values, restricted to this process's rows
    and made local: all of them for a plain tensor, one dim-0 block for an FSDP2 DTensor."""
    if not isinstance(param, DTensor):
        return idx, saved
    if param.device_mesh.ndim != 1 or param.placements != (Shard(0),):
        raise NotImplementedError(f"frozen entries of a DTensor placed as {param.placements}; FSDP2's Shard(0) only")
    rows, row_numel = param.shape[0], math.prod(param.shape[1:])
    block = -(-rows // param.device_mesh.size())  # torch.chunk's split, which FSDP2 uses
    start = min(rows, block * param.device_mesh.get_local_rank()) * row_numel
    local = param.to_local()
    inside = (idx >= start) & (idx < start + local.numel())
    return idx[inside] - start, saved[inside]


def predicting_labels(labels: torch.Tensor) -> torch.Tensor:
    """The positions (batch x sequence, bool) whose logits predict a label: a causal LM's position t predicts t+1."""
    return F.pad(labels[:, 1:] != -100, (0, 1), value=False)


@contextlib.contextmanager
def head_at_labels(model: nn.Module, labels: torch.Tensor) -> Iterator[None]:
    """Within it, `model`'s output head runs only at the positions that predict one of `labels`: its input
    (batch x sequence x hidden) is packed to 1 x positions x hidden, so the logits come out packed alike.
    Everything before the head, and the loss at those positions (`label_loss`), is unchanged."""
    keep = predicting_labels(labels)

    def pack(module: nn.Module, args: tuple) -> tuple | None:
        hidden = args[0]
        return (hidden[keep].unsqueeze(0), *args[1:]) if hidden.shape[:2] == keep.shape else None

    handle = model.get_output_embeddings().register_forward_pre_hook(pack)
    try:
        yield
    finally:
        handle.remove()


def label_loss(logits: torch.Tensor, labels: torch.Tensor, num_items: torch.Tensor | int | None = None) -> torch.Tensor:
    """Next-token cross-entropy of `labels`, summed and divided by `num_items` (the Trainer's label count over
    the accumulated batch; default: this batch's), from packed logits (`head_at_labels`) or full ones."""
    targets = labels[:, 1:][labels[:, 1:] != -100]
    packed = logits[0] if logits.shape[:2] != labels.shape else logits[predicting_labels(labels)]
    loss = F.cross_entropy(packed.float(), targets, reduction="sum")
    return loss / (targets.numel() if num_items is None else num_items)


class LabelHeadTrainer(Trainer):
    """The Trainer with its causal LM head run only where a label is (`head_at_labels`) and the same loss."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, compute_loss_func=self._label_loss, **kwargs)

    @staticmethod
    def _label_loss(outputs, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
        return label_loss(outputs.logits, labels, num_items_in_batch)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The Trainer's loss (labels popped, the DDP token averaging), inside `head_at_labels`."""
        with head_at_labels(self.accelerator.unwrap_model(model), inputs["labels"]):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def gathered_state_dict(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """Under FSDP, the whole state dict gathered onto the main process for saving (a collective: every process
    must call it; the others get an empty dict). None for an unsharded model, which `save_pretrained` reads."""
    if not any(isinstance(p, DTensor) for p in model.parameters()):
        return None
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def completed_checkpoint(output_dir: str | os.PathLike, key: str = "") -> Path | None:
    """The newest `checkpoint-N` folder whose completion marker exists and names `key`: a half-written one, or
    one a run with other inputs left (another lr, data or starting model), is ignored."""
    ckpts = [p for p in Path(output_dir).glob("checkpoint-*") if _marked_key(p) == key]
    return max(ckpts, key=lambda p: int(p.name.split("-")[-1]), default=None)


def _marked_key(ckpt: Path) -> str | None:
    marker = ckpt / COMPLETE
    return load_json(marker).get("key", "") if marker.is_file() else None


class _MarkComplete(TrainerCallback):
    """Writes the completion marker, with the key of the run's inputs, into each checkpoint the Trainer saves."""

    def __init__(self, key: str):
        self.key = key

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            marker = Path(args.output_dir) / f"checkpoint-{state.global_step}" / COMPLETE
            save_json({"step": state.global_step, "key": self.key}, marker)


def _fsdp_arguments(model: nn.Module) -> dict:
    """TrainingArguments for FSDP2 wrapping each transformer block, with full state dicts for saving."""
    blocks = list(getattr(model, "_no_split_modules", None) or [])
    config = {"version": 2, "state_dict_type": "FULL_STATE_DICT"}
    return {"fsdp": True, "fsdp_config": config | ({"transformer_layer_cls_to_wrap": blocks} if blocks else {})}


def train(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    settings: TrainSettings,
    output_dir: str | os.PathLike,
    frozen: Mapping[str, torch.Tensor] | None = None,
    key: str = "",
) -> TrainOutput:
    """Train `model` in place for `settings.steps` optimizer steps on `examples`; resume from the last complete
    checkpoint in `output_dir` that a run with the same `key` (a hash of all its inputs) saved, and delete the
    others. Returns the Trainer's output (its `global_step` counts the steps resumed from too).

    Under `accelerate launch` / `torchrun` (DDP) each process takes `batch_size / world size` examples, in the
    same order a single process would, so the global batch and the result stay those of one process.
    `settings.args` override the defaults below (constant lr, no warmup, ten logs a run, no reporting)."""
    world = processes().num_processes
    if settings.fsdp and not torch.cuda.is_available():
        raise ValueError(
            "training.fsdp needs GPUs: accelerate runs FSDP only on accelerators. On CPU, train with several "
            "processes without fsdp (DDP: torchrun or accelerate launch)"
        )
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
        seed=settings.seed,
        data_seed=settings.seed,
        save_strategy="steps",
        save_steps=settings.save_steps,
        save_total_limit=2,
        remove_unused_columns=False,
        use_cpu=not torch.cuda.is_available(),
        **(_fsdp_arguments(model) if settings.fsdp else {}),
        **{
            "lr_scheduler_type": "constant",
            "logging_steps": max(1, settings.steps // 10),
            "report_to": "none",
            "disable_tqdm": False,
            "dataloader_pin_memory": torch.cuda.is_available(),
            **settings.args,
        },
    )
    callbacks: list[TrainerCallback] = [_MarkComplete(key)]
    if frozen:
        callbacks.append(FreezeEntries(model, frozen))
    trainer = LabelHeadTrainer(
        model=model,
        args=args,
        train_dataset=tokenize_sft(examples, tokenizer, settings.max_seq_len),
        data_collator=SFTCollator(tokenizer.pad_token_id),
        callbacks=callbacks,
    )
    resume = completed_checkpoint(output_dir, key)
    if trainer.is_world_process_zero():  # stale or half-written ones would only confuse the Trainer's rotation
        _delete_checkpoints([c for c in Path(output_dir).glob("checkpoint-*") if c != resume])
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    if trainer.is_world_process_zero():
        _delete_checkpoints(list(Path(output_dir).glob("checkpoint-*")))
    return result


def _delete_checkpoints(ckpts: list[Path]) -> None:
    for ckpt in ckpts:  # markers first: a kill during the rmtree must not leave a gutted "complete" checkpoint
        (ckpt / COMPLETE).unlink(missing_ok=True)
    for ckpt in ckpts:
        shutil.rmtree(ckpt, ignore_errors=True)
