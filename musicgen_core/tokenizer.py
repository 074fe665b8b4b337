"""The T5 sentencepiece tokenizer: pieces of each prompt, then </s>; batches padded with <pad> and masked."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import sentencepiece
import torch

MAX_TEXT_TOKENS = 512  # T5Tokenizer's model_max_length for the t5 checkpoints MusicGen uses


class PromptTooLongError(ValueError):
    """A text prompt that tokenizes to more tokens than the text encoder accepts."""


@dataclass(frozen=True)
class TokenBatch:
    input_ids: torch.Tensor  # (batch, length) int64
    attention_mask: torch.Tensor  # (batch, length) int64, 1 for real tokens


class T5Tokenizer:
    def __init__(self, spiece_path: str | Path, max_tokens: int = MAX_TEXT_TOKENS):
        self.processor = sentencepiece.SentencePieceProcessor(model_file=str(spiece_path))
        self.pad_id = self.processor.pad_id() if self.processor.pad_id() >= 0 else 0
        self.eos_id = self.processor.eos_id() if self.processor.eos_id() >= 0 else 1
        self.max_tokens = max_tokens

    def encode(self, text: str) -> list[int]:
        """Token ids of one prompt with </s> appended; raises PromptTooLongError past `max_tokens`."""
        if not isinstance(text, str):
            raise TypeError(f"prompt must be a str, got {type(text).__name__}")
        ids = self.processor.encode(text, out_type=int) + [self.eos_id]
        if len(ids) > self.max_tokens:
            raise PromptTooLongError(
                f"text prompt is {len(ids)} tokens long; the text encoder accepts at most {self.max_tokens}")
        return ids

    def batch(self, texts: list[str]) -> TokenBatch:
        """Right-padded ids and attention mask for a batch of prompts."""
        encoded = [self.encode(text) for text in texts]
        length = max(len(ids) for ids in encoded)
        ids = torch.full((len(encoded), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(encoded), length), dtype=torch.long)
        for row, tokens in enumerate(encoded):
            ids[row, : len(tokens)] = torch.tensor(tokens)
            mask[row, : len(tokens)] = 1
        return TokenBatch(ids, mask)
