"""One small training loop shared by vector training and guarded fine-tuning.

Data-parallel when ``torch.distributed`` is initialised (Ray Train, torchrun): each rank takes a
slice of every global batch and gradients of the trainable parameters are averaged with
``all_reduce``. That is plain torch; this module knows nothing of Ray.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from secvec_core.config import TrainingConfig
from secvec_core.data import IGNORE_INDEX, collate

logger = logging.getLogger(__name__)


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


def to_device(batch: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    device = next(model.parameters()).device
    return {k: v.to(device) for k, v in batch.items()}


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def trainable_parameter_names(model: nn.Module) -> set[str]:
    """Names of parameters that receive gradients. Tests assert this exact set."""
    return {n for n, p in model.named_parameters() if p.requires_grad}


def response_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over response tokens (labels != IGNORE_INDEX)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    shift_logits = logits[:, :-1].reshape(-1, logits.size(-1)).float()
    shift_labels = batch["labels"][:, 1:].reshape(-1)
    return nn.functional.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX)


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
) -> TrainingHistory:
    """Train the parameters that have ``requires_grad`` on ``rows`` (output of ``tokenize_examples``).

    The optimizer is built here, after the caller froze what must stay frozen (peft #1303).
    ``stop_below``: stop once the running mean of the response loss (over ranks) is below it.
    """
    hooks = hooks or TrainingHooks()
    rank, world = rank_and_world()
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: no parameter has requires_grad=True")
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    named_trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    start_step, running = 0, None
    if hooks.resume_from is not None:
        start_step, running = _restore(hooks.resume_from, named_trainable, optimizer)
        logger.info("resumed %s at step %d", description, start_step)
    torch.manual_seed(config.seed + start_step)
    history = TrainingHistory(steps=start_step, resumed_from_step=start_step,
                              trainable_parameters=sorted(n for n, _ in named_trainable))
    model.train()
    bar = tqdm(total=config.max_steps, initial=start_step, desc=description,
               disable=not (config.show_progress and rank == 0), leave=False)
    for step in range(start_step, config.max_steps):
        indices = _batch_indices(len(rows), step, config.batch_size, config.seed)[rank::world]
        if not indices:  # more workers than examples in a batch
            indices = _batch_indices(len(rows), step, config.batch_size, config.seed)[:1]
        batch = to_device(collate([rows[i] for i in indices], pad_token_id), model)
        loss = response_loss(model, batch)
        total = loss if extra_loss is None else loss + extra_loss(model)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        loss_value = loss.detach().clone()
        if world > 1:
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
                p.grad /= world
            dist.all_reduce(loss_value, op=dist.ReduceOp.SUM)
            loss_value /= world
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        value = float(loss_value)
        if not math.isfinite(value):
            raise FloatingPointError(f"{description}: loss became {value} at step {step}; lower the learning rate")
        running = value if running is None else 0.7 * running + 0.3 * value
        history.steps = step + 1
        history.final_loss = value
        bar.update(1)
        bar.set_postfix(loss=f"{value:.3f}")
        done = stop_below is not None and running < stop_below
        last = done or step + 1 == config.max_steps
        should_log = (step + 1) % config.log_every == 0 or last
        if hooks.on_checkpoint and hooks.checkpoint_every and ((step + 1) % hooks.checkpoint_every == 0 or last):
            hooks.on_checkpoint(step + 1, _state(step + 1, named_trainable, optimizer, running))
        if should_log:
            metrics = {"loss": value, "running_loss": running}
            history.log.append({"step": step + 1, **metrics})
            if hooks.on_log:
                hooks.on_log(step + 1, metrics)
        if done:
            history.stopped_early = step + 1 < config.max_steps
            break
    bar.close()
    model.eval()
    return history


def _state(step: int, named_trainable, optimizer, running: float | None) -> dict:
    return {
        "step": step,
        "running_loss": running,  # early stopping (``stop_below``) continues from the same running mean
        "trainable": {n: p.detach().clone() for n, p in named_trainable},
        "optimizer": optimizer.state_dict(),
    }


def _restore(state: dict, named_trainable, optimizer) -> tuple[int, float | None]:
    saved = state["trainable"]
    names = {n for n, _ in named_trainable}
    if set(saved) != names:
        raise ValueError("checkpoint does not match the trainable parameters of this run "
                         f"(missing {sorted(names - set(saved))[:3]}, extra {sorted(set(saved) - names)[:3]})")
    with torch.no_grad():
        for n, p in named_trainable:
            p.copy_(saved[n])
    optimizer.load_state_dict(state["optimizer"])
    return int(state["step"]), state.get("running_loss")
