"""Dense-mode freezing: frozen entries leave the gradient before the Trainer clips it. The output head run only
where a label is: the loss and the gradients of the full head, from a fraction of its work."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny import tiny_gemma3, tiny_llama
from transformers import Trainer, TrainingArguments

from peft_isolate import IsolationConfig
from peft_isolate.data import Example, SFTCollator, tokenize_sft
from peft_isolate.training import FreezeEntries, LabelHeadTrainer, head_at_labels, label_loss


def test_frozen_gradients_are_zero_before_clipping(load_tiny):
    model = load_tiny()
    frozen = {n: torch.arange(1, p.numel(), 7, dtype=torch.int32) for n, p in model.named_parameters()}
    FreezeEntries(model, frozen)
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    model(input_ids=ids, labels=ids).loss.backward()
    expected = torch.linalg.vector_norm(
        torch.stack(
            [
                torch.linalg.vector_norm(p.grad.flatten()[torch.isin(torch.arange(p.numel()), frozen[n], invert=True)])
                for n, p in model.named_parameters()
            ]
        )
    )
    for n, p in model.named_parameters():
        assert torch.count_nonzero(p.grad.flatten()[frozen[n].long()]) == 0, n
    torch.testing.assert_close(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0), expected, rtol=1e-6, atol=0)


def _sft_batch(tokenizer, n: int = 4) -> dict[str, torch.Tensor]:
    """Answer-only SFT rows of different lengths, right-padded: labels on a few tokens at different places."""
    examples = [
        Example(({"role": "user", "content": f"count the letters of {'ab' * (i + 1)}"},), str(2 * i + 2))
        for i in range(n)
    ]
    rows = tokenize_sft(examples, tokenizer, 64)
    return SFTCollator(tokenizer.pad_token_id)([rows[i] for i in range(n)])


@pytest.mark.parametrize(
    ("build", "adapter"),
    [
        (tiny_llama, LoraConfig(r=4, target_modules=["q_proj", "down_proj"])),
        (tiny_gemma3, IsolationConfig(target_modules=["q_proj", "down_proj"], density=0.1)),  # tied embedding
    ],
)
def test_the_head_at_labels_gives_the_full_heads_loss_and_gradients(build, adapter):
    base, tokenizer = build()
    model = get_peft_model(base, adapter)
    batch = _sft_batch(tokenizer)
    targets = int((batch["labels"][:, 1:] != -100).sum())
    full = model(**batch).loss
    full.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    with head_at_labels(model, batch["labels"]):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert logits.shape == (1, targets, model.config.vocab_size) and targets < batch["labels"].numel() // 2
    packed = label_loss(logits, batch["labels"])
    packed.backward()
    torch.testing.assert_close(packed, full, rtol=1e-6, atol=1e-6)  # the same sum over fewer rows: float order
    for name, grad in expected.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, rtol=1e-5, atol=1e-7)
    assert not model.get_output_embeddings()._forward_pre_hooks  # the head is whole again outside


def test_the_trainers_loss_counts_the_accumulated_labels_as_the_models_own_loss_does(tmp_path):
    base, tokenizer = tiny_llama()
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"]))
    args = TrainingArguments(str(tmp_path), use_cpu=True, report_to="none", remove_unused_columns=False)
    batch = _sft_batch(tokenizer)
    accumulated = 3 * int((batch["labels"][:, 1:] != -100).sum())  # as if two more micro-batches followed
    losses = [
        trainer.compute_loss(model, dict(batch), num_items_in_batch=torch.tensor(accumulated))
        for trainer in (Trainer(model=model, args=args), LabelHeadTrainer(model=model, args=args))
    ]
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(losses[1], model(**batch).loss / 3, rtol=1e-6, atol=1e-6)
