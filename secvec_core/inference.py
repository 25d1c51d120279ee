"""Inference: the fine-tuned model as it ships, with no security vector anywhere."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from peft import PeftModel
from safetensors import safe_open
from torch import nn

from secvec_core.artifacts import (
    ADAPTER_CONFIG,
    VECTOR_METADATA,
    VectorLeakError,
    load_verified_tensors,
    read_artifact_metadata,
    refuse_pickle_files,
    sha256_file,
)
from secvec_core.fingerprint import model_fingerprint
from secvec_core.vectors import FingerprintMismatchError, SecurityVector

__all__ = ["VectorLeakError", "assert_no_vector", "load_finetuned", "read_artifact_metadata"]


def assert_no_vector(directory: str | Path, vectors: Sequence[SecurityVector] = ()) -> None:
    """Check a shipped artifact: no vector metadata or sub-adapter folders, no key naming a vector,
    no LoRA keys in full weights, and (when ``vectors`` are given) no tensor equal to a vector tensor."""
    directory = Path(directory)
    meta = read_artifact_metadata(directory)
    problems = []
    if (directory / VECTOR_METADATA).exists():
        problems.append(f"vector metadata file {VECTOR_METADATA}")
    problems += [f"sub-folder {p.name}/" for p in directory.iterdir() if p.is_dir()]
    weights = directory / meta["weights_file"]
    vector_names = [v["name"] for v in meta.get("guarded_by", [])] + [v.name for v in vectors]
    with safe_open(str(weights), framework="pt") as fh:
        keys = list(fh.keys())
        bad_keys = [k for k in keys if any(name in k for name in vector_names)]
        if meta["mode"] == "full":
            bad_keys += [k for k in keys if "lora_" in k]
        problems += [f"key {k}" for k in bad_keys[:3]]
        for vector in vectors:
            vector_tensors = list(vector.weights.values())
            for k in keys:
                t = fh.get_tensor(k)
                if any(t.shape == v.shape and torch.equal(t, v) for v in vector_tensors):
                    problems.append(f"tensor {k} equals a weight of vector {vector.name!r}")
                    break
    if problems:
        raise VectorLeakError(f"{directory}: security-vector content in a shipped artifact: {'; '.join(problems)}")


def load_finetuned(
    base_model: nn.Module,
    directory: str | Path,
    *,
    check_fingerprint: bool = True,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
) -> nn.Module:
    """The model to serve: base + task adapter (``lora``) or the fine-tuned weights (``full``).

    Verifies the checksum, refuses pickle files and vector content, and (``lora``) that the base
    model is the one the adapter was trained on. ``full`` weights load in ``dtype`` and move to ``device``
    (a GPU worker passes its device and bfloat16); a ``lora`` adapter follows its base model's device.
    """
    directory = Path(directory)
    meta = read_artifact_metadata(directory)
    refuse_pickle_files(directory)
    assert_no_vector(directory)
    if meta["mode"] == "lora":
        if not (directory / ADAPTER_CONFIG).is_file():
            raise FileNotFoundError(f"{directory}: missing {ADAPTER_CONFIG}")
        load_verified_tensors(directory, meta["weights_sha256"])
        if check_fingerprint:
            actual = model_fingerprint(base_model)
            if actual != meta["base_fingerprint"]:
                raise FingerprintMismatchError(
                    f"adapter {directory} was trained on base {meta['base_fingerprint']}, this base is {actual}"
                )
        model = PeftModel.from_pretrained(base_model, str(directory), is_trainable=False)
    else:
        weights = directory / meta["weights_file"]
        if sha256_file(weights) != meta["weights_sha256"]:
            raise ValueError(f"{weights}: checksum mismatch; the artifact is corrupted")
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(directory), use_safetensors=True, dtype=dtype)
        if device is not None:
            model = model.to(device)
    model.eval()
    return model
