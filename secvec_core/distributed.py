"""The distributed engines the training loop runs on: torch's DDP and FSDP2, nothing written by hand.

- ``ddp``: :class:`torch.nn.parallel.DistributedDataParallel` wraps the whole training step (see
  ``training._TrainingStep``), so a loss that calls the model twice in one step (the KL term of vector
  training, a safety-replay term with the vectors switched off) is still one DDP forward and one
  backward: gradients are bucketed, overlapped with backward, and averaged by DDP's reducer.
  Frozen parameters (the base, the vectors) are excluded from DDP's start-up broadcast: every rank
  loaded the same bytes, and they never change.
- ``fsdp``: FSDP2 ``fully_shard`` on every decoder layer (the model's ``_no_split_modules``) and on
  the root. Weights, gradients and AdamW state are sharded over the ranks; frozen security vectors are
  left out of sharding (``ignored_params``), so each rank keeps them whole and bit-identical. Under
  mixed precision the shards stay float32 (master weights) and layers compute in bfloat16
  (``MixedPrecisionPolicy``), with gradients reduced in float32.

This module knows nothing of Ray: Ray Train (or torchrun) initialises ``torch.distributed``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn

logger = logging.getLogger(__name__)

Engine = Literal["none", "ddp", "fsdp"]


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def trains_base_weights(model: nn.Module) -> bool:
    """True when any non-adapter parameter requires gradients (full-weights training)."""
    return any(p.requires_grad and "lora_" not in n for n, p in model.named_parameters())


def choose_engine(setting: str, model: nn.Module) -> Engine:
    """The engine for ``TrainingConfig.parallel``: ``auto`` shards full-weights training and replicates
    adapter training; without an initialised process group everything runs as one process."""
    initialised = dist.is_available() and dist.is_initialized()
    if setting == "none" or not initialised:
        if setting in ("ddp", "fsdp") and not initialised:
            raise ValueError(f"parallel={setting!r} needs torch.distributed to be initialised (Ray Train, torchrun)")
        return "none"
    if setting == "auto":
        if dist.get_world_size() == 1:
            return "none"
        return "fsdp" if trains_base_weights(model) else "ddp"
    return setting  # type: ignore[return-value]


def frozen_parameter_names(module: nn.Module) -> list[str]:
    return [n for n, p in module.named_parameters() if not p.requires_grad]


def wrap_ddp(step: nn.Module, parallelize: Callable[[nn.Module, dict], nn.Module] | None = None) -> nn.Module:
    """Wrap the training step in DDP. ``parallelize(module, ddp_kwargs)`` lets a runner use its own
    wrapper (Ray Train's ``prepare_model``); the default is plain DDP on the module's device."""
    frozen = frozen_parameter_names(step)
    buffers = [n for n, _ in step.named_buffers()]
    torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(step, frozen + buffers)
    kwargs = {"broadcast_buffers": False, "find_unused_parameters": False}
    if parallelize is not None:
        return parallelize(step, kwargs)
    device = next(p for p in step.parameters() if p.requires_grad).device
    device_ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(step, device_ids=device_ids, **kwargs)


def _layers_to_shard(model: nn.Module) -> list[nn.Module]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    layers = [m for m in base.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"{type(base).__name__} declares no _no_split_modules; cannot pick layers to shard with FSDP")
    return layers


def shard_fsdp(model: nn.Module, *, bf16_compute: bool) -> None:
    """Apply FSDP2 ``fully_shard`` in place: each decoder layer, then the root. Frozen adapter weights (the
    security vectors) are ignored, so they stay unsharded and bit-identical on every rank."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    device = next(model.parameters()).device
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    vectors = {p for n, p in model.named_parameters() if "lora_" in n and not p.requires_grad}
    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if bf16_compute
        else MixedPrecisionPolicy()
    )
    for layer in _layers_to_shard(model):
        fully_shard(layer, mesh=mesh, mp_policy=policy, ignored_params=vectors)
    fully_shard(model, mesh=mesh, mp_policy=policy, ignored_params=vectors)
    logger.info("FSDP2: sharded over %d ranks (%d vector tensors kept whole)", dist.get_world_size(), len(vectors))


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def gathered_state_dict(model: nn.Module, *, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """Full (unsharded) tensors on the CPU. For a sharded model this is a collective: every rank must call
    it, rank 0 receives the tensors and the others an empty dict."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not is_sharded(model):
        state = model.state_dict()
        if trainable_only:
            names = {n for n, p in model.named_parameters() if p.requires_grad}
            state = {k: v for k, v in state.items() if k in names}
        return {k: v.detach().cpu().clone() for k, v in state.items()}
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    return get_model_state_dict(model, options=options)


def sharded_training_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(trainable weights, optimizer state) gathered to full tensors (rank 0) for a checkpoint."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    return get_state_dict(model, optimizer, options=options)


def load_sharded_training_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, weights: dict, optimizer_state: dict
) -> None:
    """Load a checkpoint written by :func:`sharded_training_state`; every rank holds the full dicts."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    options = StateDictOptions(full_state_dict=True, ignore_frozen_params=True, strict=False)
    set_state_dict(model, optimizer, model_state_dict=weights, optim_state_dict=optimizer_state, options=options)
