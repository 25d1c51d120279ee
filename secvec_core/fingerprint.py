"""Base-model fingerprints: a vector is only meaningful on the exact weights it was trained against."""

from __future__ import annotations

import hashlib
import json

import torch
from torch import nn

# Config keys that change between saves of the same weights and must not change the fingerprint.
_VOLATILE_CONFIG_KEYS = {
    "_name_or_path",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "architectures",
    "quantization_config",
    "_commit_hash",
    "use_cache",
}


def _base_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters of the underlying base model, without any peft adapter weights.

    peft wraps a Linear as ``<name>.base_layer``; we strip that so a wrapped and an unwrapped
    model of the same weights hash the same.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    out: dict[str, torch.Tensor] = {}
    for name, tensor in base.state_dict().items():
        if "lora_" in name or "modules_to_save" in name:
            continue
        out[name.replace(".base_layer", "")] = tensor
    return out


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 over the model config (minus volatile keys) and every base weight, in name order.

    Returns ``"sha256:<hex>"``. Stable across save/load and across peft wrapping; any change to a
    single weight changes it. Tied weights are hashed under each of their names.
    """
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None:
        cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        cfg = {k: v for k, v in cfg.items() if k not in _VOLATILE_CONFIG_KEYS}
        digest.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    for name, tensor in sorted(_base_parameters(model).items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(str(tensor.dtype).encode())
        t = tensor.detach().contiguous().cpu()
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + digest.hexdigest()
