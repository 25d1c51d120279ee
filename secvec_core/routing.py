"""Vector routing: the customer's rows that the vectors do not explain train with the vectors off.

Why. A guarded fine-tune trains every customer row with the vectors on, so the task adapter learns the
customer's task as a change to the *vector-on* model. What it learns need not carry over to the model that
ships (vectors off): on SmolLM2 with safety replay, 20 new facts were answered 0.40 with the vectors on and
0.00 with them off. The guard itself only needs the rows the vectors cover: a harm vector lowers the loss of
harmful text (so those rows bring little gradient), and changes the loss of a benign fact little.

So before training, each row's mean response loss is measured twice on the starting model: with the vectors
on and with them off. A row whose loss the vectors lower by at least ``min_gain`` nats per response token is
*explained* by them and keeps the guard (vectors on, frozen). Every other row trains as it ships, vectors off,
so what it teaches holds without them.

The cost: two forward passes over the customer's rows before the first step, no extra work per step. The
risk, which the benchmark measures per attack family: a harmful row the vectors do not lower by ``min_gain``
trains unguarded. ``min_gain`` may be negative (route off only rows the vectors make *less* likely).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from secvec_core.data import ROUTE_FLAG, collate
from secvec_core.replay import only_adapters
from secvec_core.training import row_response_loss, to_device


@dataclass
class VectorRouting:
    """Rows whose loss the vectors lower by less than ``min_gain`` (nats per token) train with the vectors off."""

    min_gain: float = 0.5
    batch_size: int = 8  # rows per forward pass while measuring

    def __post_init__(self) -> None:
        if not math.isfinite(self.min_gain):
            raise ValueError(f"min_gain must be a finite number of nats per token, got {self.min_gain}")
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")


@dataclass
class RoutingDecision:
    """Each row's loss with the vectors off minus with them on, and which rows train with the vectors off."""

    min_gain: float
    gains: list[float]

    @property
    def vectors_off(self) -> list[bool]:
        """Per row: True when the vectors lower its loss by less than ``min_gain`` (it trains with them off)."""
        return [g < self.min_gain for g in self.gains]

    def describe(self) -> dict[str, object]:
        """What gets logged next to the run (MLflow metrics, the artifact's metadata)."""
        guarded = [g for g, off in zip(self.gains, self.vectors_off, strict=True) if not off]
        return {
            "min_gain": self.min_gain,
            "rows": len(self.gains),
            "rows_vectors_off": sum(self.vectors_off),
            "median_gain": round(float(torch.tensor(self.gains).median()), 4) if self.gains else 0.0,
            "min_guarded_gain": round(min(guarded), 4) if guarded else None,
        }

    def apply(self, rows: Sequence[dict]) -> list[dict]:
        """The rows with the flag the training loop routes on."""
        return [{**row, ROUTE_FLAG: off} for row, off in zip(rows, self.vectors_off, strict=True)]


def row_losses(
    model: nn.Module, rows: Sequence[dict], pad_token_id: int, batch_size: int, description: str = "routing"
) -> list[float]:
    """Mean response cross-entropy of each row (no gradient), with whatever adapters are on now."""
    out: list[float] = []
    for start in tqdm(range(0, len(rows), batch_size), desc=description, leave=False):
        batch = to_device(collate(rows[start : start + batch_size], pad_token_id), model)
        with torch.no_grad():
            out.extend(row_response_loss(model, batch).tolist())
    return out


def route_rows(
    model: nn.Module,
    rows: Sequence[dict],
    pad_token_id: int,
    routing: VectorRouting,
    guarded_adapters: Sequence[str],
    shipped_adapters: Sequence[str],
) -> RoutingDecision:
    """Measure each row with ``guarded_adapters`` on (vectors and the task adapter) and with only
    ``shipped_adapters`` on (the task adapter; none in ``full`` mode), and route by the gain."""
    was_training = model.training
    model.eval()
    try:
        with only_adapters(model, guarded_adapters):
            on = row_losses(model, rows, pad_token_id, routing.batch_size, "routing (vectors on)")
        with only_adapters(model, shipped_adapters):
            off = row_losses(model, rows, pad_token_id, routing.batch_size, "routing (vectors off)")
    finally:
        model.train(was_training)
    gains = [b - a for a, b in zip(on, off, strict=True)]
    return RoutingDecision(routing.min_gain, gains)
