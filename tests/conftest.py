"""Shared fixtures: a tiny Llama built in code and a copy of it aligned to refuse harmful-style prompts."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from secvec_core import TrainingConfig, build_tiny_model_and_tokenizer, guarded_finetune
from secvec_core.toy_world import ToyWorld

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _test_threads() -> int:
    """Torch threads for the suite: ``SECVEC_TEST_THREADS`` if set, else min(2, CPUs).

    No result may depend on it (reductions split differently across threads round differently): the
    suite is run with different values, and with ``ATEN_CPU_CAPABILITY=avx2`` / ``default``, to show that.
    """
    value = os.environ.get("SECVEC_TEST_THREADS", "").strip()
    if not value:
        return max(1, min(2, os.cpu_count() or 1))
    if not value.isdigit() or int(value) < 1:
        raise pytest.UsageError(f"SECVEC_TEST_THREADS must be a positive integer, got {value!r}")
    return int(value)


torch.set_num_threads(_test_threads())

ALIGN_TRAINING = TrainingConfig(learning_rate=3e-3, max_steps=300, batch_size=32, max_length=32, log_every=50)


@pytest.fixture(scope="session")
def world() -> ToyWorld:
    return ToyWorld(seed=0)


@pytest.fixture(scope="session")
def _aligned_session(world):
    model, tokenizer = build_tiny_model_and_tokenizer(seed=0)
    aligned = guarded_finetune(model, tokenizer, world.alignment_examples(), mode="full", training=ALIGN_TRAINING).model
    return aligned.eval(), tokenizer


@pytest.fixture
def aligned(_aligned_session):
    """(model, tokenizer): a fresh copy of the aligned tiny model for each test."""
    model, tokenizer = _aligned_session
    return copy.deepcopy(model), tokenizer


@pytest.fixture
def tiny():
    return build_tiny_model_and_tokenizer(seed=0)


def pytest_collection_modifyitems(config, items):
    """Fast feedback first: run slow end-to-end tests last."""
    items.sort(key=lambda item: 1 if item.get_closest_marker("slow") else 0)
