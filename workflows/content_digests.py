"""What the local files a stage reads contain, for its reuse hash.

A finished stage is reused when its spec and inputs hash to the same value. Local files enter the spec as
paths, so without this a data file edited in place, or a model directory overwritten, would hash as before and
the stage would be reused with outputs of the old content. Data files are small next to models: they are
hashed by content (sha256). Model and vector directories can hold tens of GB; they are summarised by each
file's name, size and modification time, which any rewrite changes, and their weights are checked by
fingerprint in the workers anyway.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from secvec_core.artifacts import sha256_file
from workflows.specs import dataset_refs


def stat_stamp(path: Path) -> str:
    """Names, sizes and modification times of ``path`` or of every file below it (not their bytes)."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for item in files:
        stat = item.stat()
        name = item.relative_to(path) if path.is_dir() else item.name
        digest.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return "stat:" + digest.hexdigest()


def local_content_digests(stage, inputs: dict) -> dict[str, str]:
    """``{path: digest}`` for every local data file the stage reads and every local model or vector it loads."""
    digests: dict[str, str] = {}
    for _, ref in dataset_refs(stage):
        if ref.path and Path(ref.path).is_file():
            digests[str(Path(ref.path).resolve())] = sha256_file(ref.path)
    for source in [inputs.get("base"), inputs.get("candidate"), *inputs.get("vectors", [])]:
        if isinstance(source, str) and not source.startswith(("models:/", "builtin:")):
            path = Path(source)
            if path.exists():  # a model or vector directory, or a GGUF file
                digests[str(path.resolve())] = stat_stamp(path)
    return digests
