"""Watch what guarded fine-tuning runs: every forward pass of its training loop, and the vectors before it."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Forward:
    adapters: tuple[str, ...]  # the adapters switched on for this pass
    rows: int
    grad: bool  # whether the pass builds a graph (trains)


@dataclass
class TrainingSpy:
    forwards: list[Forward] = field(default_factory=list)
    vector_before: dict[str, torch.Tensor] = field(default_factory=dict)  # the vector's weights at the first step


def spy_on_training(monkeypatch, vector_name: str) -> TrainingSpy:
    """Patch ``secvec_core.guard.train_loop`` for this test: record each forward pass of the loop (not the
    routing measurement before it) and keep a copy of the vector's weights as training starts."""
    from secvec_core import guard

    spy, original = TrainingSpy(), guard.train_loop

    def record(module, args, kwargs):
        spy.forwards.append(
            Forward(tuple(module.base_model.active_adapters), kwargs["input_ids"].shape[0], torch.is_grad_enabled())
        )

    def spying_train_loop(peft_model, *args, **kwargs):
        spy.vector_before.update({n: p.detach().clone() for n, p in peft_model.named_parameters() if vector_name in n})
        handle = peft_model.register_forward_pre_hook(record, with_kwargs=True)
        try:
            return original(peft_model, *args, **kwargs)
        finally:
            handle.remove()

    monkeypatch.setattr(guard, "train_loop", spying_train_loop)
    return spy
