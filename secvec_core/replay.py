"""Safety replay: a few of the platform's own alignment rows in every guarded fine-tuning step, vectors off.

A harm vector absorbs harmful *data*; it cannot stop the erosion of alignment that ordinary fine-tuning
causes by itself (Qi et al. 2023: benign instruction data alone raises the harmful rate), nor undo what a
task adapter learns in the vector's blind spots. Replay trains the shipped weights, with every vector
switched **off** (as they ship), on rows the platform already has from alignment: refusals to harmful
prompts and the model's own answers to benign ones. The customer's rows still train with the vectors on
and frozen; the replay rows are an extra term of the same step.

Two objectives for the replay rows:

- ``responses`` (cross-entropy on the rows' responses): trains the shipped weights to *say* the replayed
  refusals again and again. Measured on SmolLM2 it holds harm but pushes refusal past the aligned model's
  level (benign requests refused) and crowds out the customer's task.
- ``aligned`` (KL from the aligned model, every adapter off, to the shipped weights, on the rows'
  response positions): the rows are only contexts; the target is what the aligned model already predicts
  there, so replay can pull the shipped weights back toward the aligned model but never past it. Needs a
  frozen reference, i.e. ``lora`` mode (in ``full`` mode the base weights themselves train).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from peft import PeftModel
from torch import nn

from secvec_core.data import IGNORE_INDEX, Example, collate, to_examples, tokenize_examples
from secvec_core.training import response_loss, to_device

Objective = Literal["responses", "aligned"]
OBJECTIVES: tuple[str, ...] = ("responses", "aligned")


@dataclass
class SafetyReplay:
    """Rows replayed with the vectors off in every step of a guarded fine-tune."""

    examples: Sequence[Example | dict]
    rows_per_step: int = 2
    weight: float = 1.0
    seed: int = 0
    objective: Objective = "responses"

    def __post_init__(self) -> None:
        if not self.examples:
            raise ValueError("safety replay needs examples (refusals and benign answers from alignment)")
        if self.rows_per_step <= 0:
            raise ValueError(f"rows_per_step must be positive, got {self.rows_per_step}")
        if self.weight <= 0:
            raise ValueError(f"weight must be positive, got {self.weight}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")

    def describe(self) -> dict[str, object]:
        """What gets logged (MLflow params) next to the run."""
        return {
            "examples": len(self.examples),
            "rows_per_step": self.rows_per_step,
            "weight": self.weight,
            "seed": self.seed,
            "objective": self.objective,
        }


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


def kl_from_aligned(model: nn.Module, batch: dict[str, torch.Tensor], shipped_adapters: Sequence[str]) -> torch.Tensor:
    """KL(aligned || shipped) per response position, averaged: the aligned model is ``model`` with every
    adapter off (no gradient), the shipped one has only ``shipped_adapters`` on. Positions are those whose
    next token is a response token, as in :func:`~secvec_core.training.response_loss`."""
    if not isinstance(model, PeftModel):
        raise TypeError("the 'aligned' replay objective needs a PeftModel (its adapters off = the aligned model)")
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    positions = batch["labels"][:, 1:] != IGNORE_INDEX
    with torch.no_grad(), model.disable_adapter():
        aligned = torch.log_softmax(model(**inputs).logits[:, :-1][positions].float(), dim=-1)
    with only_adapters(model, shipped_adapters):
        shipped = torch.log_softmax(model(**inputs).logits[:, :-1][positions].float(), dim=-1)
    return torch.sum(aligned.exp() * (aligned - shipped), dim=-1).mean()


def replay_loss(replay: SafetyReplay, tokenizer, max_length: int, pad_token_id: int, shipped_adapters: Sequence[str]):
    """The ``extra_loss`` callable of the training loop: each call takes the next ``rows_per_step`` replay
    rows (a seeded permutation per pass) and returns ``weight`` x their loss with only ``shipped_adapters`` on
    (the task adapter in ``lora`` mode, none in ``full`` mode): the response cross-entropy, or the KL from
    the aligned model (``objective="aligned"``, which needs ``shipped_adapters``: ``lora`` mode)."""
    if replay.objective == "aligned" and not shipped_adapters:
        raise ValueError(
            "safety replay objective 'aligned' needs mode 'lora': in 'full' mode the base weights "
            "train, so there is no frozen aligned model to compare against; use objective 'responses'"
        )
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
        if replay.objective == "aligned":
            return replay.weight * kl_from_aligned(model, batch, shipped_adapters)
        with only_adapters(model, shipped_adapters):
            return replay.weight * response_loss(model, batch)

    return loss
