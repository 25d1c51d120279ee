"""One small training loop shared by vector training and guarded fine-tuning.

When ``torch.distributed`` is initialised (Ray Train, torchrun) the loop runs on torch's engines
(:mod:`secvec_core.distributed`): DDP for adapter training, FSDP2 for full-weights training. Every rank
takes a slice of each global batch; the loss of each slice is weighted by its share of the global batch's
response tokens, so N workers compute the same gradient as one process with the whole batch. Precision
(bfloat16 autocast), gradient checkpointing, gradient accumulation and the learning-rate schedule come
from :class:`~secvec_core.config.TrainingConfig`. This module knows nothing of Ray.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from secvec_core import distributed
from secvec_core.config import TrainingConfig
from secvec_core.data import IGNORE_INDEX, ROUTE_FLAG, collate
from secvec_core.distributed import rank_and_world
from secvec_core.precision import autocast, bf16_compute

logger = logging.getLogger(__name__)

__all__ = [
    "TrainingHistory",
    "TrainingHooks",
    "rank_and_world",
    "response_loss",
    "to_device",
    "train_loop",
    "trainable_parameter_names",
]


@dataclass
class TrainingHooks:
    """Callbacks a runner (Ray Train, a notebook) plugs into the loop.

    ``on_log(step, metrics)`` every ``log_every`` steps and at the end; ``on_checkpoint(step, state)``
    every ``checkpoint_every`` steps with a state dict that ``resume_from`` accepts to continue exactly.
    """

    on_log: Callable[[int, dict], None] | None = None
    checkpoint_every: int = 0
    on_checkpoint: Callable[[int, dict], None] | None = None
    resume_from: dict | None = None


@dataclass
class TrainingHistory:
    steps: int = 0
    stopped_early: bool = False
    final_loss: float = float("nan")
    log: list[dict] = field(default_factory=list)
    trainable_parameters: list[str] = field(default_factory=list)
    resumed_from_step: int = 0  # > 0 when the loop continued from a checkpoint
    engine: str = "none"  # "none", "ddp" or "fsdp"


def to_device(batch: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    device = next(model.parameters()).device
    return {k: v.to(device) for k, v in batch.items()}


def trainable_parameter_names(model: nn.Module) -> set[str]:
    """Names of parameters that receive gradients. Tests assert this exact set."""
    return {n for n, p in model.named_parameters() if p.requires_grad}


def response_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over response tokens (labels != IGNORE_INDEX)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    shift_logits = logits[:, :-1].reshape(-1, logits.size(-1)).float()
    shift_labels = batch["labels"][:, 1:].reshape(-1)
    return nn.functional.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX)


def row_response_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy of each row's response tokens, shape ``(rows,)`` (with gradient if enabled)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    labels = batch["labels"][:, 1:]
    per_token = nn.functional.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none"
    )
    return per_token.sum(dim=1) / (labels != IGNORE_INDEX).sum(dim=1).clamp(min=1)


def _batch_indices(n_rows: int, step: int, batch_size: int, seed: int) -> list[int]:
    """Global batch for ``step``: a seeded permutation per epoch, so a resumed run sees the same data."""
    out: list[int] = []
    position = step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(position, n_rows)
        perm = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
        take = perm[offset : offset + batch_size - len(out)]
        out.extend(take)
        position += len(take)
    return out


def response_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Number of tokens ``response_loss`` averages over (shifted labels that are not ignored)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def _row_response_tokens(row: dict) -> int:
    return sum(1 for label in row["labels"][1:] if label != IGNORE_INDEX)


class _TrainingStep(nn.Module):
    """One micro-batch's loss as a module, so DDP sees a single forward per backward even when
    ``extra_loss`` runs the model again (KL on benign text, a replay with the vectors switched off).
    ``extra_loss`` receives the plain model, never the DDP wrapper."""

    def __init__(
        self,
        model: nn.Module,
        extra_loss: Callable[[nn.Module], torch.Tensor] | None,
        vectors_off: Callable[[nn.Module], contextlib.AbstractContextManager] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.extra_loss = extra_loss
        self.vectors_off = vectors_off

    def forward(self, batch: dict[str, torch.Tensor], weight: float, extra_weight: float):
        off = batch.get(ROUTE_FLAG)
        if off is not None and bool(off.any()):
            loss = self._routed_loss(batch, off)
        else:
            loss = response_loss(self.model, batch)
        total = loss * weight if weight != 1.0 else loss
        if self.extra_loss is not None:
            extra = self.extra_loss(self.model)
            total = total + (extra * extra_weight if extra_weight != 1.0 else extra)
        return total, loss.detach()

    def _routed_loss(self, batch: dict[str, torch.Tensor], off: torch.Tensor) -> torch.Tensor:
        """The batch's mean response loss when some rows run with the vectors off: each group in its own
        forward pass, their token sums added and divided by the batch's tokens, so it is the same token mean
        as one pass (equal in value and gradient when both contexts compute the same function)."""
        if self.vectors_off is None:
            raise ValueError("rows are routed to train with the vectors off, but the loop has no vectors_off context")
        total, tokens = None, response_tokens(batch)
        for rows, context in ((~off, contextlib.nullcontext), (off, self.vectors_off)):
            sub = {k: batch[k][rows] for k in ("input_ids", "attention_mask", "labels")}
            sub_tokens = response_tokens(sub)
            if sub_tokens == 0:
                continue
            with context(self.model):
                part = response_loss(self.model, sub) * sub_tokens
            total = part if total is None else total + part
        if total is None:
            raise ValueError("a training batch has no response tokens (every response was truncated away)")
        return total / tokens


def _scheduler(optimizer: torch.optim.Optimizer, config: TrainingConfig):
    from transformers import get_scheduler

    name = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[config.lr_schedule]
    return get_scheduler(name, optimizer, num_warmup_steps=config.warmup_steps, num_training_steps=config.max_steps)


def _set_gradient_checkpointing(model: nn.Module, enabled: bool) -> None:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not hasattr(base, "gradient_checkpointing_enable"):
        raise ValueError(f"{type(base).__name__} does not support gradient checkpointing")
    new_api = hasattr(base, "activation_checkpointing_enable")  # transformers >= 5.2 renamed it
    if enabled:  # non-reentrant: works with frozen inputs, DDP and FSDP2, and a model called twice per step
        kwargs = {"use_reentrant": False, "context_fn": functools.partial(_adapter_switch_contexts, model)}
        if new_api:
            base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    elif new_api:
        base.activation_checkpointing_disable()
    else:
        base.gradient_checkpointing_disable()


def _adapter_switch_contexts(model: nn.Module):
    """Checkpointing recomputes a layer during backward, after ``extra_loss`` may have switched adapters back
    (e.g. a replay forward with the vectors off). Record which adapters were on at forward time and switch
    them on again while the layer is recomputed, so the recomputation is the same function."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    if not layers:
        return contextlib.nullcontext(), contextlib.nullcontext()
    adapters = [(p, p.requires_grad) for n, p in model.named_parameters() if "lora_" in n]
    saved = ([(_copy(m._active_adapter), m._disable_adapters) for m in layers], [flag for _, flag in adapters])

    @contextlib.contextmanager
    def as_in_forward():
        current = ([(m._active_adapter, m._disable_adapters) for m in layers], [p.requires_grad for p, _ in adapters])
        _apply_adapter_state(layers, adapters, saved)
        try:
            yield
        finally:
            _apply_adapter_state(layers, adapters, current)

    return contextlib.nullcontext(), as_in_forward()


def _apply_adapter_state(layers, adapters, state) -> None:
    for layer, (active, disabled) in zip(layers, state[0], strict=True):
        layer._active_adapter, layer._disable_adapters = active, disabled
    for (param, _), flag in zip(adapters, state[1], strict=True):
        param.requires_grad_(flag)


def train_loop(
    model: nn.Module,
    rows: Sequence[dict],
    pad_token_id: int,
    config: TrainingConfig,
    *,
    extra_loss: Callable[[nn.Module], torch.Tensor] | None = None,
    stop_below: float | None = None,
    hooks: TrainingHooks | None = None,
    description: str = "training",
    parallelize: Callable[[nn.Module, dict], nn.Module] | None = None,
    vectors_off: Callable[[nn.Module], contextlib.AbstractContextManager] | None = None,
) -> TrainingHistory:
    """Train the parameters that have ``requires_grad`` on ``rows`` (output of ``tokenize_examples``).

    The optimizer is built here, after the caller froze what must stay frozen (peft #1303) and after
    FSDP sharded the model. ``stop_below``: stop once the running mean of the response loss (over ranks)
    is below it. ``extra_loss(model)`` is added to every micro-batch's loss (divided by the number of
    micro-batches); under DDP each rank adds its own, and DDP averages the gradients. ``parallelize``
    replaces the DDP wrapper (``(module, ddp_kwargs) -> wrapped``, e.g. Ray Train's ``prepare_model``).
    After FSDP training the model stays sharded: use :func:`secvec_core.distributed.gathered_state_dict`
    on every rank to get its weights. ``vectors_off(model)``: the context in which rows flagged
    ``vectors_off`` (:mod:`secvec_core.routing`) run; the other rows of a batch run as the model is.
    """
    hooks = hooks or TrainingHooks()
    rank, world = rank_and_world()
    accumulation = config.gradient_accumulation_steps
    if config.batch_size < world * accumulation:
        raise ValueError(
            f"batch_size {config.batch_size} is smaller than workers x gradient_accumulation_steps "
            f"({world} x {accumulation}); raise batch_size or lower the other two"
        )
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("nothing to train: no parameter has requires_grad=True")
    device_type = next(model.parameters()).device.type
    bf16 = bf16_compute(config.mixed_precision, device_type)
    engine_name = distributed.choose_engine(config.parallel, model)
    if config.gradient_checkpointing:
        _set_gradient_checkpointing(model, True)
    step_module = _TrainingStep(model, extra_loss, vectors_off)
    if engine_name == "fsdp":
        distributed.shard_fsdp(model, bf16_compute=bf16)
        engine: nn.Module = step_module
    elif engine_name == "ddp":
        engine = distributed.wrap_ddp(step_module, parallelize)
    else:
        engine = step_module
    named_trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named_trainable]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = _scheduler(optimizer, config)
    start_step, running = 0, None
    if hooks.resume_from is not None:
        start_step, running = _restore(hooks.resume_from, model, named_trainable, optimizer, scheduler, engine_name)
        logger.info("resumed %s at step %d", description, start_step)
    torch.manual_seed(config.seed + start_step)
    history = TrainingHistory(
        steps=start_step,
        resumed_from_step=start_step,
        engine=engine_name,
        trainable_parameters=sorted(n for n, _ in named_trainable),
    )
    model.train()
    bar = tqdm(
        total=config.max_steps,
        initial=start_step,
        desc=description,
        disable=not (config.show_progress and rank == 0),
        leave=False,
    )
    for step in range(start_step, config.max_steps):
        global_indices = _batch_indices(len(rows), step, config.batch_size, config.seed)
        global_tokens = sum(_row_response_tokens(rows[i]) for i in global_indices)
        local = global_indices[rank::world]
        micro_batches = [local[k::accumulation] for k in range(accumulation)]
        optimizer.zero_grad(set_to_none=True)
        weighted_loss = torch.zeros((), dtype=torch.float64)
        for k, indices in enumerate(micro_batches):
            batch = to_device(collate([rows[i] for i in indices], pad_token_id), model)
            tokens = response_tokens(batch)
            # the share of the global batch's tokens, times world because DDP/FSDP average over ranks
            weight = 1.0 if world == 1 and accumulation == 1 else tokens * world / max(global_tokens, 1)
            last = k == accumulation - 1
            with _gradient_sync(engine, model, engine_name, last), autocast(bf16, device_type):
                total, loss = engine(batch, weight, 1.0 / accumulation)
            total.backward()
            weighted_loss += float(loss) * tokens
        if world == 1 and accumulation == 1:
            value = float(loss)
        else:
            if world > 1:  # a metric, not a gradient: every rank needs it for the same stop decision
                dist.all_reduce(weighted_loss_device := weighted_loss.to(_collective_device(model)))
                weighted_loss = weighted_loss_device.cpu()
            value = float(weighted_loss) / max(global_tokens, 1)
        norm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip if config.grad_clip > 0 else math.inf)
        grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        learning_rate = optimizer.param_groups[0]["lr"]  # the rate this step used
        optimizer.step()
        scheduler.step()
        if not math.isfinite(value):
            raise FloatingPointError(f"{description}: loss became {value} at step {step}; lower the learning rate")
        running = value if running is None else 0.7 * running + 0.3 * value
        history.steps = step + 1
        history.final_loss = value
        bar.update(1)
        bar.set_postfix(loss=f"{value:.3f}")
        done = stop_below is not None and running < stop_below
        last_step = done or step + 1 == config.max_steps
        should_log = (step + 1) % config.log_every == 0 or last_step
        if hooks.on_checkpoint and hooks.checkpoint_every and ((step + 1) % hooks.checkpoint_every == 0 or last_step):
            state = _state(step + 1, model, named_trainable, optimizer, scheduler, running, engine_name)
            hooks.on_checkpoint(step + 1, state)
        if should_log:
            metrics = {"loss": value, "running_loss": running, "grad_norm": grad_norm, "learning_rate": learning_rate}
            history.log.append({"step": step + 1, **metrics})
            if hooks.on_log:
                hooks.on_log(step + 1, metrics)
        if done:
            history.stopped_early = step + 1 < config.max_steps
            break
    bar.close()
    if config.gradient_checkpointing:
        _set_gradient_checkpointing(model, False)
    model.eval()
    return history


def _collective_device(model: nn.Module) -> torch.device:
    """gloo reduces CPU tensors, nccl CUDA tensors."""
    return torch.device("cpu") if dist.get_backend() == "gloo" else next(model.parameters()).device


def _gradient_sync(engine: nn.Module, model: nn.Module, engine_name: str, sync: bool):
    """Skip the gradient all-reduce on all but the last micro-batch (the engines' own switches)."""
    if engine_name == "ddp" and not sync:
        return engine.no_sync()
    if engine_name == "fsdp":
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def _state(step: int, model, named_trainable, optimizer, scheduler, running: float | None, engine: str) -> dict:
    if engine == "fsdp":  # a collective: every rank gathers, rank 0 holds the full tensors
        weights, optimizer_state = distributed.sharded_training_state(model, optimizer)
    else:
        weights = {n: p.detach().clone() for n, p in named_trainable}
        optimizer_state = optimizer.state_dict()
    return {
        "step": step,
        "running_loss": running,  # early stopping (``stop_below``) continues from the same running mean
        "trainable": weights,
        "optimizer": optimizer_state,
        "scheduler": scheduler.state_dict(),
        "engine": engine,
    }


def _restore(state: dict, model, named_trainable, optimizer, scheduler, engine: str) -> tuple[int, float | None]:
    saved = state["trainable"]
    names = {n for n, _ in named_trainable}
    if set(saved) != names:
        raise ValueError(
            "checkpoint does not match the trainable parameters of this run "
            f"(missing {sorted(names - set(saved))[:3]}, extra {sorted(set(saved) - names)[:3]})"
        )
    if (state.get("engine") == "fsdp") != (engine == "fsdp"):
        raise ValueError(f"checkpoint was written by a {state.get('engine')} run; resume it with the same engine")
    if engine == "fsdp":
        distributed.load_sharded_training_state(model, optimizer, saved, state["optimizer"])
    else:
        with torch.no_grad():
            for n, p in named_trainable:
                p.copy_(saved[n])
        optimizer.load_state_dict(state["optimizer"])
    step = int(state["step"])
    if "scheduler" in state:
        scheduler.load_state_dict(state["scheduler"])
    else:  # checkpoints from before schedules existed: replay the schedule to this step
        for _ in range(step):
            scheduler.step()
    return step, state.get("running_loss")


def _copy(active):
    return list(active) if isinstance(active, list) else active
