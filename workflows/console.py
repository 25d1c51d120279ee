"""The ``secvec`` console script. It imports nothing outside the standard library before the CLI itself, so
that ``pip install secvec`` (the core library alone) gives a one-line hint instead of a traceback."""

from __future__ import annotations

import sys

# The extra that brings each optional top-level module the CLI imports.
EXTRA_FOR_MODULE = {
    "typer": "pipeline",
    "rich": "pipeline",
    "yaml": "pipeline",
    "pydantic": "pipeline",
    "mlflow": "pipeline",
    "ray": "pipeline",
    "matplotlib": "pipeline",
    "gguf": "pipeline",
    "kubernetes": "kube",
    "psycopg2": "postgres",
    "datasets": "hf",
}


def missing_extra_hint(err: ModuleNotFoundError) -> str | None:
    """One line naming the extra to install, or None when the missing module is not one an extra provides."""
    top = (err.name or "").split(".")[0]
    extra = EXTRA_FOR_MODULE.get(top)
    if extra is None:
        return None
    return (
        f"error: this secvec command needs the {top!r} package, which comes with the {extra} extra: "
        f"pip install 'secvec[{extra}]'"
    )


# Checked before the CLI is imported: some of them arrive with the core's own dependencies (transformers 5
# brings typer and pyyaml through huggingface_hub), so `secvec --help` would otherwise start and every
# command then fail on a later import.
PIPELINE_MODULES = tuple(module for module, extra in EXTRA_FOR_MODULE.items() if extra == "pipeline")


def missing_pipeline_module() -> str | None:
    """The first module of the pipeline extra that is not installed, or None."""
    from importlib.util import find_spec

    return next((name for name in PIPELINE_MODULES if find_spec(name) is None), None)


def main() -> None:
    missing = missing_pipeline_module()
    if missing is not None:
        sys.stderr.write(missing_extra_hint(ModuleNotFoundError(name=missing)) + "\n")
        raise SystemExit(1)
    try:
        from workflows.cli import app

        app()
    except ModuleNotFoundError as err:
        hint = missing_extra_hint(err)
        if hint is None:
            raise
        sys.stderr.write(hint + "\n")
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
