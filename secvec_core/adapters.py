"""peft wiring: attach named LoRA adapters, activate several at once, and freeze exactly what must be frozen.

Guards against peft's traps (docs/design.md, "peft traps"): ``set_adapter([a, b])`` makes every listed adapter
trainable again (peft #1374), so we activate in inference mode and then re-enable gradients only on
the adapter we train.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn

TASK_ADAPTER = "task"


def lora_config(rank: int, alpha: int, dropout: float, target_modules: Sequence[str]) -> LoraConfig:
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def attach_adapter(model: nn.Module, name: str, config: LoraConfig) -> PeftModel:
    """Add a fresh adapter ``name``; wraps a plain model in a PeftModel the first time."""
    if isinstance(model, PeftModel):
        if name in model.peft_config:
            raise ValueError(f"adapter {name!r} is already attached")
        for other in model.peft_config:
            if other.startswith(name) or name.startswith(other):
                raise ValueError(
                    f"adapter names {name!r} and {other!r} are prefixes of each other "
                    "(peft confuses them); pick distinct names"
                )
        model.add_adapter(name, config)
        return model
    return get_peft_model(model, config, adapter_name=name)


def load_adapter_weights(model: PeftModel, name: str, state: dict[str, torch.Tensor]) -> None:
    """Copy saved adapter weights (peft's saved key format) into adapter ``name``; all keys must match."""
    result = set_peft_model_state_dict(model, state, adapter_name=name)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    missing = [k for k in (getattr(result, "missing_keys", []) or []) if f".{name}." in k and "lora_" in k]
    if unexpected or missing:
        raise ValueError(
            f"adapter {name!r} does not fit this model: unexpected keys {unexpected[:3]}, missing keys {missing[:3]}"
        )


def adapter_state(model: PeftModel, name: str) -> dict[str, torch.Tensor]:
    """Weights of adapter ``name`` only, in peft's saved format (adapter name stripped from keys)."""
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model, adapter_name=name).items()}


def adapter_parameter_names(model: nn.Module, name: str) -> set[str]:
    return {n for n, _ in model.named_parameters() if "lora_" in n and n.split(".")[-2] == name}


def activate(model: PeftModel, active: Sequence[str], trainable: Sequence[str] = (), train_base: bool = False) -> None:
    """Switch on exactly ``active`` adapters; make only ``trainable`` adapters (and the base if
    ``train_base``) require gradients. Everything else is frozen, whatever peft did before."""
    missing = [a for a in active if a not in model.peft_config]
    if missing:
        raise KeyError(f"unknown adapters {missing}; attached: {sorted(model.peft_config)}")
    model.base_model.set_adapter(list(active), inference_mode=True)
    for param_name, param in model.named_parameters():
        if "lora_" in param_name:
            param.requires_grad_(param_name.split(".")[-2] in trainable)
        else:
            param.requires_grad_(train_base)


@contextlib.contextmanager
def active_adapters(model: PeftModel, names: Sequence[str]) -> Iterator[PeftModel]:
    """Temporarily run with only ``names`` switched on (no gradients change permanently)."""
    before = list(model.base_model.active_adapters)
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        if names:
            model.base_model.set_adapter(list(names), inference_mode=True)
            yield model
        else:
            with model.disable_adapter():
                yield model
    finally:
        model.base_model.set_adapter(before, inference_mode=True)
        for n, p in model.named_parameters():
            p.requires_grad_(grads[n])
