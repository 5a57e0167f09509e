"""Dense-mode freezing: frozen entries leave the gradient before the Trainer clips it."""

from __future__ import annotations

import torch

from peft_isolate.training import FreezeEntries


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
