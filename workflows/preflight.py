"""Check a pipeline's inputs in the driver before any Ray job starts.

Everything that can be checked without training is checked here: local dataset files are parsed, local
models and vectors are opened (GGUF magic, safetensors only, chat template, checksums), registry URIs are
resolved, and vectors are matched to their base model by fingerprint where both are known without loading
a model. A problem raises :class:`PreflightError` with one line naming where it is, what is wrong and how
to fix it. Nothing is written to the registry. Checks that need the model itself (prompt lengths against
``max_length``, fingerprints of local or hub models) run in the stage and fail it the same way.
"""

from __future__ import annotations

import json
from pathlib import Path

from workflows.specs import DatasetRef, EvaluationStage, GuardedFinetuneStage, PipelineSpec, dataset_refs


class PreflightError(ValueError):
    """A pipeline input that cannot work; the message is one line: where, what, and the fix."""


def preflight(spec: PipelineSpec, tracking_uri: str) -> None:
    """Raise :class:`PreflightError` on the first input that cannot work."""
    from workflows.registry import Registry

    registry = Registry(tracking_uri)
    _check_model(spec.base_model.source, spec.base_model.trust_remote_code, "base_model", registry)
    for i, stage in enumerate(spec.stages):
        where = f"stages[{i}] ({stage.name})"
        if stage.base_model and stage.base_model.source:
            _check_model(stage.base_model.source, stage.base_model.trust_remote_code, f"{where}.base_model", registry)
        for field, ref, role in _datasets(stage):
            _check_dataset(ref, role, f"{where}.{field}")
        if isinstance(stage, EvaluationStage) and stage.candidate.source:
            _check_model(stage.candidate.source, False, f"{where}.candidate", registry)
        if isinstance(stage, GuardedFinetuneStage):
            refs = []
            for j, v in enumerate(stage.vectors):
                if v.stage is None:
                    refs.append(_check_vector(v.path, v.uri, f"{where}.vectors[{j}]", registry))
            base = stage.base_model or spec.base_model
            if base.source and len(refs) == len(stage.vectors):  # all inputs known before any stage runs
                check_fingerprints(stage.name, base.source, refs, tracking_uri)


def check_fingerprints(stage_name: str, base_source: str, vector_refs: list[str], tracking_uri: str) -> None:
    """Refuse vectors trained on other base weights, when both fingerprints are known without loading a model
    (the built-in model, registry versions, vector metadata). Otherwise the stage checks after loading."""
    base = _known_fingerprint(base_source, tracking_uri)
    if base is None:
        return
    for ref in vector_refs:
        trained_on = _vector_fingerprint(ref, tracking_uri)
        if trained_on is not None and trained_on != base:
            raise PreflightError(
                f"stage {stage_name!r}: security vector {ref} was trained for base model {trained_on[:19]}..., but "
                f"the base {base_source} is {base[:19]}...; train the vector on this base (or fine-tune the base "
                "it was trained on)"
            )


def _datasets(stage) -> list[tuple[str, DatasetRef, str]]:
    """Every data set of the stage, nested ones included (a data_preparation stage's ``parts[i].prompts``)."""
    return [(where, ref, "prompts" if where.endswith("prompts") else "examples") for where, ref in dataset_refs(stage)]


def _check_dataset(ref: DatasetRef, role: str, where: str) -> None:
    from workflows.datasets import load_examples, load_prompt_list

    if ref.hf is not None or ref.stage is not None:
        return  # may be remote or large, or not written yet: the stage loads it
    if ref.path is not None and not Path(ref.path).is_file():
        raise PreflightError(
            f"{where}.path: dataset file not found: {Path(ref.path).absolute()}; fix the path "
            "(relative paths are resolved from the directory secvec runs in)"
        )
    try:
        load_examples(ref) if role == "examples" else load_prompt_list(ref)
    except (ValueError, KeyError) as err:
        raise PreflightError(f"{where}: {str(err).splitlines()[0]}") from None


def _looks_like_path(source: str) -> bool:
    return source.endswith(".gguf") or source.startswith(("/", "./", "../", "~"))


def _check_model(source: str | None, trust_remote_code: bool, where: str, registry) -> None:
    from workflows.registry import RegistryError

    if source is None or source.startswith("builtin:"):
        return
    if source.startswith("models:/"):
        try:
            registry.resolve(source)
        except RegistryError as err:
            raise PreflightError(f"{where}.source: {err}") from None
        return
    path = Path(source).expanduser()
    if not path.exists():
        if _looks_like_path(source):
            raise PreflightError(
                f"{where}.source: model not found: {path.absolute()}; pass an existing .gguf file, "
                "a Hugging Face model directory, or a hub id"
            )
        return  # a hub id: the stage downloads it
    from secvec_core.model_loading import is_gguf_file, require_chat_template, require_safetensors_directory

    if path.is_file():
        if not is_gguf_file(path):
            with path.open("rb") as fh:
                magic = fh.read(4)
            raise PreflightError(
                f"{where}.source: {path} is not a GGUF file (it starts with {magic!r}, not b'GGUF'); "
                "pass a .gguf model file or a Hugging Face model directory"
            )
        return
    try:
        require_safetensors_directory(path)
        from transformers import AutoTokenizer

        require_chat_template(AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code))
    except (ValueError, OSError) as err:
        raise PreflightError(f"{where}.source: {str(err).splitlines()[0]}") from None


def _check_vector(path: str | None, uri: str | None, where: str, registry) -> str:
    """Open a vector given by path (metadata + checksum) or resolve its registry URI; returns the ref string."""
    from workflows.registry import RegistryError

    if uri is not None:
        try:
            registry.resolve(uri)
        except RegistryError as err:
            raise PreflightError(f"{where}.uri: {err}") from None
        return uri
    from secvec_core.vectors import SecurityVector

    try:
        SecurityVector.load(path)
    except (ValueError, OSError, KeyError) as err:
        raise PreflightError(f"{where}.path: {str(err).splitlines()[0]}") from None
    return str(Path(path).resolve())


def _known_fingerprint(source: str, tracking_uri: str) -> str | None:
    if source == "builtin:tiny":
        from secvec_core.fingerprint import model_fingerprint
        from secvec_core.tiny import build_tiny_model_and_tokenizer

        return model_fingerprint(build_tiny_model_and_tokenizer(seed=0)[0])
    if source.startswith("models:/"):
        from workflows.registry import Registry

        return Registry(tracking_uri).resolve(source).tags.get("secvec.fingerprint")
    return None


def _vector_fingerprint(ref: str, tracking_uri: str) -> str | None:
    if ref.startswith("models:/"):
        from workflows.registry import Registry

        return Registry(tracking_uri).resolve(ref).tags.get("secvec.base_fingerprint")
    from secvec_core.vectors import VECTOR_METADATA

    meta = Path(ref) / VECTOR_METADATA
    return json.loads(meta.read_text(encoding="utf-8")).get("base_fingerprint") if meta.is_file() else None
