"""Resolve model and vector references to objects in a worker: builtins, local paths, the MLflow registry."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

from secvec_core.guard import ARTIFACT_METADATA
from secvec_core.vectors import VECTOR_METADATA, SecurityVector

logger = logging.getLogger(__name__)


def download_registered(uri: str, tracking_uri: str, dest_root: str | Path | None = None) -> Path:
    """Download a registered version (``models:/name/3`` or ``models:/name@alias``) to a local folder.

    Raises a one-line error naming the model and alias when they do not exist.
    """
    from workflows.registry import Registry

    registry = Registry(tracking_uri)
    version = registry.resolve(uri)
    dest = Path(dest_root or tempfile.mkdtemp(prefix="secvec-dl-")) / f"{version.name}-v{version.version}"
    if dest.exists() and any(dest.iterdir()):
        return _only_child(dest)
    import mlflow.artifacts

    dest.mkdir(parents=True, exist_ok=True)
    mlflow.artifacts.download_artifacts(artifact_uri=version.source, dst_path=str(dest), tracking_uri=tracking_uri)
    return _only_child(dest)


def _only_child(dest: Path) -> Path:
    children = [p for p in dest.iterdir() if p.is_dir()]
    return children[0] if len(children) == 1 and not (dest / ARTIFACT_METADATA).exists() else dest


def load_base_model(
    source: str,
    tracking_uri: str,
    *,
    trust_remote_code: bool = False,
    cache: str | None = None,
    dtype=None,
    device=None,
):
    """(model, tokenizer) for a ``ModelRef.source`` string, in ``dtype`` (default float32) on ``device``."""
    import torch

    dtype = dtype or torch.float32
    if source == "builtin:tiny":
        from secvec_core.tiny import build_tiny_model_and_tokenizer

        model, tokenizer = build_tiny_model_and_tokenizer(seed=0)
        return model.to(device=device, dtype=dtype), tokenizer
    if source.startswith("models:/"):
        directory = download_registered(source, tracking_uri, cache)
        return load_model_directory(directory, dtype=dtype, device=device)
    from secvec_core.model_loading import load_model_and_tokenizer

    return load_model_and_tokenizer(source, trust_remote_code=trust_remote_code, dtype=dtype, device=device)


def load_base_for_device(
    source: str,
    tracking_uri: str,
    device,
    dtype_setting: str,
    *,
    full_weights: bool,
    trust_remote_code: bool = False,
    cache: str | None = None,
):
    """(model, tokenizer, fingerprint) for a stage: the model in the dtype ``dtype_setting`` resolves to on
    ``device``, and the fingerprint of its float32 weights (the one vectors and the registry record). A
    lower-precision model is loaded in float32 on the host first, fingerprinted, then cast and moved."""
    import torch

    from secvec_core.fingerprint import model_fingerprint
    from secvec_core.precision import weights_dtype

    dtype = weights_dtype(dtype_setting, device.type, full_weights=full_weights)
    if dtype == torch.float32:
        model, tokenizer = load_base_model(
            source, tracking_uri, trust_remote_code=trust_remote_code, cache=cache, device=device
        )
        return model, tokenizer, model_fingerprint(model)
    model, tokenizer = load_base_model(source, tracking_uri, trust_remote_code=trust_remote_code, cache=cache)
    fingerprint = model_fingerprint(model)
    return model.to(device=device, dtype=dtype), tokenizer, fingerprint


def load_model_directory(directory: Path, *, dtype=None, device=None):
    """A full-weights model saved by a secvec stage (alignment or full fine-tune) with its tokenizer."""
    from transformers import AutoTokenizer

    from secvec_core.inference import load_finetuned

    meta_path = directory / ARTIFACT_METADATA
    if not meta_path.is_file():
        from secvec_core.model_loading import load_model_and_tokenizer

        return load_model_and_tokenizer(str(directory), dtype=dtype or "float32", device=device)
    meta = json.loads(meta_path.read_text())
    if meta["mode"] != "full":
        raise ValueError(f"{directory} is a LoRA adapter, not a base model; use it as a candidate")
    import torch

    model = load_finetuned(None, directory, dtype=dtype or torch.float32, device=device)
    return model, AutoTokenizer.from_pretrained(str(directory))


def load_vector(ref: str, tracking_uri: str, cache: str | None = None) -> SecurityVector:
    """A vector from a local directory or a registry URI."""
    if ref.startswith("models:/"):
        return SecurityVector.load(download_registered(ref, tracking_uri, cache))
    path = Path(ref)
    if not (path / VECTOR_METADATA).is_file():
        raise FileNotFoundError(f"security vector not found at {path} (no {VECTOR_METADATA})")
    return SecurityVector.load(path)
