"""Adapter directories on disk: atomic writes, checksums, and safetensors-only loading."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


@contextlib.contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yield a temporary directory beside ``target``; rename it into place only if the block succeeds.

    An interrupted save leaves at most a ``.tmp-*`` folder, never a loadable-but-wrong ``target``.
    An existing ``target`` is replaced.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".old-{target.name}-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))


def refuse_pickle_files(directory: Path) -> None:
    """We only ever load safetensors: a pickle file in an artifact could execute code."""
    bad = [p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if bad:
        raise ValueError(f"{directory}: contains pickle files {bad}; secvec loads safetensors only "
                         "(re-save the adapter with safe_serialization=True)")


def load_verified_tensors(directory: Path, expected_sha256: str | None) -> dict[str, torch.Tensor]:
    """Load ``adapter_model.safetensors`` after checking its checksum against the metadata."""
    weights = directory / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{directory}: no {ADAPTER_WEIGHTS}; is this an adapter directory?")
    refuse_pickle_files(directory)
    if expected_sha256 is not None:
        actual = sha256_file(weights)
        if actual != expected_sha256:
            raise ValueError(f"{weights}: checksum mismatch (expected {expected_sha256}, found {actual}); "
                             "the file is corrupted or was modified: re-download or retrain it")
    try:
        return load_file(str(weights))
    except Exception as err:  # safetensors raises its own error types
        raise ValueError(f"{weights}: not a readable safetensors file ({err})") from None
