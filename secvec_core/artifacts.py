"""The on-disk formats in one place: file names, metadata, atomic writes, checksums, safetensors-only loading.

Two kinds of directory are written by secvec: a security vector (a peft adapter plus
``secvec_vector.json``) and a fine-tuned artifact, the thing that ships (a task adapter or full weights
plus ``secvec_artifact.json``). Every module that reads or writes them takes the names and helpers
from here, so the format is defined once (and ``guard`` and ``inference`` need not import each other).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ARTIFACT_METADATA = "secvec_artifact.json"  # a fine-tuned artifact (what ships)
ARTIFACT_FORMAT = "secvec.finetuned/v1"
VECTOR_METADATA = "secvec_vector.json"  # a security vector (never ships)
VECTOR_FORMAT = "secvec.security-vector/v1"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


class VectorLeakError(AssertionError):
    """A shipped artifact (or the state about to be saved as one) contains security-vector content."""


def sha256_file(path: str | Path) -> str:
    """``"sha256:<hex>"`` of a file's bytes, read in 1 MiB blocks (weights can be gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def replace_directory_atomically(staging: str | Path, target: str | Path) -> None:
    """Move the finished directory ``staging`` to ``target``, replacing any old ``target``.

    ``rename`` cannot replace a non-empty directory, so an old target is first renamed aside and
    deleted afterwards. At every instant ``target`` is either absent, the old complete directory,
    or the new complete one: never a half-written mix.
    """
    staging, target = Path(staging), Path(target)
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(target, old)
    os.replace(staging, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yield a staging directory beside ``target``; move it into place only if the block succeeds.

    An interrupted save leaves at most a ``.tmp-<name>-*`` folder (removed on error), never a
    loadable-but-wrong ``target``. An existing ``target`` is replaced (see
    :func:`replace_directory_atomically`).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary shared directory
    try:
        yield staging
        replace_directory_atomically(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")


def read_artifact_metadata(directory: str | Path) -> dict:
    """The ``secvec_artifact.json`` of a fine-tuned artifact; a clear error for any other directory."""
    path = Path(directory) / ARTIFACT_METADATA
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: not a secvec fine-tuned artifact (no {ARTIFACT_METADATA})")
    return json.loads(path.read_text(encoding="utf-8"))


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))


def refuse_pickle_files(directory: Path) -> None:
    """We only ever load safetensors: a pickle file in an artifact could execute code."""
    bad = [p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if bad:
        raise ValueError(
            f"{directory}: contains pickle files {bad}; secvec loads safetensors only "
            "(re-save the adapter with safe_serialization=True)"
        )


def load_verified_tensors(directory: Path, expected_sha256: str | None) -> dict[str, torch.Tensor]:
    """Load ``adapter_model.safetensors`` after checking its checksum against the metadata."""
    weights = directory / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{directory}: no {ADAPTER_WEIGHTS}; is this an adapter directory?")
    refuse_pickle_files(directory)
    if expected_sha256 is not None:
        actual = sha256_file(weights)
        if actual != expected_sha256:
            raise ValueError(
                f"{weights}: checksum mismatch (expected {expected_sha256}, found {actual}); "
                "the file is corrupted or was modified: re-download or retrain it"
            )
    try:
        return load_file(str(weights))
    except Exception as err:  # safetensors raises its own error types
        raise ValueError(f"{weights}: not a readable safetensors file ({err})") from None
