"""What a distillation run is set by: the trainer's hyperparameters and where its data comes from.

Plain dataclasses without JAX, so the command line reads their defaults (each written once, here)
before anything heavy is imported.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

CORPORA = ("teacher-answers", "sharegpt")


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """Hyperparameters; the defaults are the recipe of SWIFTKV.md (batch shape aside)."""

    learning_rate: float = 2e-4
    warmup_fraction: float = 0.05
    b1: float = 0.9
    b2: float = 0.999
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    temperature: float = 2.0
    mse_weight: float = 1.0
    batch_size: int = 4
    grad_accum: int = 1
    seq_len: int = 240
    epochs: float = 1.0
    max_steps: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {self.seq_len}")
        for name in ("batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def num_steps(self, num_rows: int) -> int:
        """Optimizer steps: `max_steps`, else `epochs` passes over `num_rows` packed rows."""
        if self.max_steps is not None:
            return int(self.max_steps)
        return max(1, int(self.epochs * num_rows) // (self.batch_size * self.grad_accum))


@dataclasses.dataclass(frozen=True)
class DataChoice:
    """Training and held-out data: a file (`path`: JSONL chats or text records, or plain text), or
    a built-in ShareGPT corpus. Both built-in corpora hold out the same teacher-answered prompts
    (by a hash of the prompt, among ShareGPT's first `num_prompts`), so their runs are evaluated
    on one set: `teacher-answers` trains on the teacher's answers to the other prompts, `sharegpt`
    on ShareGPT's own conversations (none of which starts with a held-out prompt)."""

    path: str | Path | None = None
    held_out_percent: float = 10.0
    corpus: str = "teacher-answers"
    num_prompts: int = 480
    num_conversations: int = 4000
    conversation_chars: int = 3000
    answer_tokens: int = 160
    generate_batch_size: int = 16
    cache_dir: str | Path | None = None

    def __post_init__(self) -> None:
        if self.corpus not in CORPORA:
            raise ValueError(f"corpus must be one of {', '.join(CORPORA)}, got {self.corpus!r}")
