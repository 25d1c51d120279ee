"""Safety replay: a few of the platform's own alignment rows in every guarded fine-tuning step, vectors off.

A harm vector absorbs harmful *data*; it cannot stop the erosion of alignment that ordinary fine-tuning
causes by itself (Qi et al. 2023: benign instruction data alone raises the harmful rate), nor undo what a
task adapter learns in the vector's blind spots. Replay trains the shipped weights, with every vector
switched **off** (as they ship), on rows the platform already has from alignment: refusals to harmful
prompts and the model's own answers to benign ones. The customer's rows still train with the vectors on
and frozen; the replay rows are an extra term of the same step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from peft import PeftModel
from torch import nn

from secvec_core.data import Example, collate, to_examples, tokenize_examples
from secvec_core.training import response_loss, to_device


@dataclass
class SafetyReplay:
    """Rows replayed with the vectors off in every step of a guarded fine-tune."""

    examples: Sequence[Example | dict]
    rows_per_step: int = 2
    weight: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.examples:
            raise ValueError("safety replay needs examples (refusals and benign answers from alignment)")
        if self.rows_per_step <= 0:
            raise ValueError(f"rows_per_step must be positive, got {self.rows_per_step}")
        if self.weight <= 0:
            raise ValueError(f"weight must be positive, got {self.weight}")

    def describe(self) -> dict[str, object]:
        """What gets logged (MLflow params) next to the run."""
        return {"examples": len(self.examples), "rows_per_step": self.rows_per_step, "weight": self.weight,
                "seed": self.seed}


@contextlib.contextmanager
def only_adapters(model: nn.Module, names: Sequence[str]) -> Iterator[nn.Module]:
    """Run with only ``names`` switched on (none: every adapter off) while keeping every parameter's
    ``requires_grad`` as it was, so the trainable weights still receive gradients from this forward pass
    (peft's ``set_adapter(inference_mode=True)`` would freeze them)."""
    if not isinstance(model, PeftModel):
        yield model
        return
    before = list(model.base_model.active_adapters)
    grads = {n: p.requires_grad for n, p in model.named_parameters()}

    def restore_grads() -> None:
        for n, p in model.named_parameters():
            p.requires_grad_(grads[n])

    try:
        if names:
            model.base_model.set_adapter(list(names), inference_mode=True)
            restore_grads()
            yield model
        else:
            with model.disable_adapter():
                yield model
    finally:
        model.base_model.set_adapter(before, inference_mode=True)
        restore_grads()


def replay_loss(replay: SafetyReplay, tokenizer, max_length: int, pad_token_id: int,
                shipped_adapters: Sequence[str]):
    """The ``extra_loss`` callable of the training loop: each call takes the next ``rows_per_step`` replay
    rows (a seeded permutation per pass) and returns ``weight`` x their response loss with only
    ``shipped_adapters`` on (the task adapter in ``lora`` mode, none in ``full`` mode)."""
    rows = tokenize_examples(tokenizer, to_examples(replay.examples), max_length, "truncate")
    generator = torch.Generator().manual_seed(replay.seed)
    order: list[int] = []

    def loss(model: nn.Module) -> torch.Tensor:
        nonlocal order
        take = []
        while len(take) < replay.rows_per_step:
            if not order:
                order = torch.randperm(len(rows), generator=generator).tolist()
            take.append(order.pop())
        batch = to_device(collate([rows[i] for i in take], pad_token_id), model)
        with only_adapters(model, shipped_adapters):
            return replay.weight * response_loss(model, batch)

    return loss
