"""Tiny random Llama and Gemma 3 models and a byte-level tokenizer built in-process, so tests need no downloads."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (one token per byte, no merges) with pad/eos tokens and a ChatML template."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + sorted(alphabet))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<|im_start|>", eos_token="<|im_end|>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_llama(
    path: str | os.PathLike | None = None, seed: int = 0, hidden_size: int = 64
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """A seeded 2-layer random Llama and its tokenizer; also saved as an HF directory at `path` if given.

    64 is the smallest width bitsandbytes' CPU 4-bit kernels take (one quantization block per row).
    """
    tokenizer = tiny_tokenizer()
    config = LlamaConfig(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        **_vocabulary(tokenizer),
    )
    return _built(LlamaForCausalLM, config, tokenizer, seed, path)


def tiny_gemma3(
    path: str | os.PathLike | None = None, seed: int = 0, turns: bool = False
) -> tuple[Gemma3ForCausalLM, PreTrainedTokenizerFast]:
    """A seeded 2-layer random Gemma 3 (text) of `gemma3-270m`'s architecture: embedding tied to the output layer,
    q/k norms, a sliding and a full attention layer; with the byte tokenizer, saved at `path` if given. `turns`:
    the tokenizer has Gemma's turn markers and, like the GGUF's, no chat template."""
    tokenizer = tiny_tokenizer()
    if turns:
        tokenizer.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
        tokenizer.chat_template = None
    config = Gemma3TextConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
        tie_word_embeddings=True,
        **_vocabulary(tokenizer),
    )
    return _built(Gemma3ForCausalLM, config, tokenizer, seed, path)


def _vocabulary(tokenizer: PreTrainedTokenizerFast) -> dict:
    """The config fields a tiny model takes from its tokenizer."""
    return {
        "vocab_size": len(tokenizer),
        "max_position_embeddings": 512,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }


def _built(cls, config, tokenizer, seed: int, path: str | os.PathLike | None):
    """A seeded random `cls(config)` in eval mode, with its tokenizer saved beside it at `path` if given."""
    torch.manual_seed(seed)
    model = cls(config).eval()
    if path is not None:
        model.save_pretrained(Path(path))
        tokenizer.save_pretrained(Path(path))
    return model, tokenizer
