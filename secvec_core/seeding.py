"""Seeded randomness that leaves the caller's random stream alone.

transformers' weight init and peft's LoRA init draw from torch's global CPU generator and take no
generator argument. A library call that ran ``torch.manual_seed`` would reset the caller's stream
(a notebook's sampling, another library's shuffling); :func:`seeded` forks the generator instead.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block with torch's global CPU generator seeded to ``seed``; restore its state afterwards.

    Only the CPU generator is forked and seeded (weights are initialised on the CPU, then moved), so
    CUDA generators are neither touched nor snapshotted.
    """
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield
