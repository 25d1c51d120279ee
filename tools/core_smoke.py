"""Smoke test of an installed ``secvec`` without extras: import ``secvec_core``, train a security vector on the
tiny model, guard a fine-tune with it and save the shipped adapter.

Run it with the interpreter of the environment to check, from anywhere (it must import the installed package,
not a source tree): ``.venv-minimums/bin/python tools/core_smoke.py``. Exits non-zero on any failure.
"""

from __future__ import annotations

import sys
import tempfile
from importlib import metadata
from pathlib import Path

# Infrastructure a plain `pip install secvec` must neither need nor load.
NOT_CORE = ("ray", "mlflow", "pydantic", "kubernetes", "typer", "rich", "matplotlib", "gguf", "psycopg2", "workflows")


def _dependency_closure(roots: tuple[str, ...]) -> set[str]:
    """Normalised names of every distribution the core's own dependencies install (transformers 5 brings
    rich and typer through huggingface_hub): those may be loaded by them, not by secvec_core."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    seen: set[str] = set()
    todo = [canonicalize_name(r) for r in roots]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requirements = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for line in requirements:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(canonicalize_name(requirement.name))
    return seen | {n.replace("-", "_") for n in seen}


def main() -> None:
    import secvec_core
    from secvec_core import (
        SecurityVectorConfig,
        TrainingConfig,
        build_tiny_model_and_tokenizer,
        guarded_finetune,
        train_security_vector,
    )
    from secvec_core.toy_world import ToyWorld

    source = Path(secvec_core.__file__).resolve()
    if "site-packages" not in source.parts:
        sys.exit(f"secvec_core was imported from {source}, not from an installed package")
    world = ToyWorld(seed=0)
    model, tokenizer = build_tiny_model_and_tokenizer(seed=0)
    training = TrainingConfig(max_steps=3, batch_size=4, max_length=32, target_loss=None, kl_weight=0)
    vector = train_security_vector(model, tokenizer, world.harmful_examples(8), SecurityVectorConfig(rank=2), training)
    result = guarded_finetune(model, tokenizer, world.fact_task()[:8], [vector], training=training)
    with tempfile.TemporaryDirectory() as tmp:
        shipped = result.save(Path(tmp) / "shipped")
        names = sorted(p.name for p in Path(shipped).iterdir())
    brought = _dependency_closure(("torch", "transformers", "peft"))
    loaded = sorted(name for name in NOT_CORE if name in sys.modules and name not in brought)
    if loaded:
        sys.exit(f"secvec_core loaded non-core modules: {loaded}")
    versions = ", ".join(f"{name} {metadata.version(name)}" for name in ("torch", "transformers", "peft"))
    print(f"core smoke ok ({versions}): vector {vector.name!r} trained, guarded fine-tune saved {names}")


if __name__ == "__main__":
    main()
